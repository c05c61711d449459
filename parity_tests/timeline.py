"""The timeline of one overlapped decode step, drawn as a Gantt chart (a teaching aid).

Two-batch overlap splits a batch into micro-batches A and B. While one micro-batch's tokens are
in all-to-all communication (dispatch before the experts, combine after them) the other one
computes. A timeline makes that visible: it is a list of :class:`Interval` s, each one thing
that kept one *lane* busy from ``start_ms`` to ``end_ms``:

* the **compute** lane (top row): stages run by the executor, e.g.
  ``"a2: dispatch_wait routed_experts combine_launch"`` is stage 2 of micro-batch A;
* the **comm** lane (bottom row): communication in flight, e.g. ``"dispatch a L0"``.

How to read the chart. The x axis is milliseconds since the first interval started. A's bars
are blue, B's orange, those of a plain (non-overlapped) run grey. A dotted vertical line marks
where each compute stage starts, named by the text before the ``:`` of its label (``a2``,
``b0``): that is where the executor switches micro-batch. Overlap is wherever the two rows are
busy at the same time: a comm bar sitting under a compute bar is *hidden* (the GPU did useful
work while the tokens travelled); a comm bar under an empty stretch of the compute row is
*exposed* (everyone waited). The title gives the numbers of :func:`summarize`: the overlap
time and the fraction of communication time hidden under compute. Ideally, B's compute sits
over A's communication and vice versa, and the hidden fraction is close to 1.

A GPU run saves ``intervals_to_json(...)`` with :mod:`json`; the picture can be redrawn
anywhere with ``python -m tbo_parity.parity_tests.timeline step.json step.png``. Only
:func:`draw_timeline` needs matplotlib (``pip install ".[viz]"``); the rest is plain Python.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

LANES = ("compute", "comm")  # top to bottom
MICRO_BATCHES = ("a", "b", "plain")
COLORS = {"a": "#1f77b4", "b": "#ff7f0e", "plain": "#8c8c8c"}


@dataclasses.dataclass(frozen=True)
class Interval:
    """One busy stretch of one lane: ``micro_batch`` ran ``label`` from start_ms to end_ms."""

    lane: str
    micro_batch: str
    label: str
    start_ms: float
    end_ms: float


def stage_name(interval: Interval) -> str | None:
    """The stage a compute interval marks (``"a2"`` for ``"a2: ..."``), or None if no ``:``."""
    if interval.lane != "compute" or ":" not in interval.label:
        return None
    return interval.label.split(":", 1)[0].strip() or None


def validate_intervals(intervals) -> list[Interval]:
    """Check a timeline; return it as a list. Raises ValueError naming the bad field."""
    intervals = list(intervals)
    if not intervals:
        raise ValueError("intervals must not be empty")
    for i, iv in enumerate(intervals):
        where = f"intervals[{i}]"
        if not isinstance(iv, Interval):
            raise ValueError(f"{where} must be an Interval, got {type(iv).__name__}")
        if iv.lane not in LANES:
            raise ValueError(f"{where}.lane must be one of {LANES}, got {iv.lane!r}")
        if iv.micro_batch not in MICRO_BATCHES:
            raise ValueError(
                f"{where}.micro_batch must be one of {MICRO_BATCHES}, got {iv.micro_batch!r}")
        if not isinstance(iv.label, str):
            raise ValueError(f"{where}.label must be a str, got {type(iv.label).__name__}")
        for field in ("start_ms", "end_ms"):
            value = getattr(iv, field)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                raise ValueError(f"{where}.{field} must be a finite number, got {value!r}")
        if iv.end_ms < iv.start_ms:
            raise ValueError(
                f"{where}.end_ms ({iv.end_ms}) must be >= start_ms ({iv.start_ms})")
    return intervals


def intervals_to_json(intervals) -> list[dict]:
    """The timeline as a list of plain dicts, ready for :func:`json.dump`."""
    return [dataclasses.asdict(iv) for iv in validate_intervals(intervals)]


def intervals_from_json(obj) -> list[Interval]:
    """The inverse of :func:`intervals_to_json`; raises ValueError on a malformed entry."""
    if not isinstance(obj, list):
        raise ValueError(f"timeline JSON must be a list of objects, got {type(obj).__name__}")
    fields = [f.name for f in dataclasses.fields(Interval)]
    intervals = []
    for i, entry in enumerate(obj):
        if not isinstance(entry, dict) or set(entry) != set(fields):
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"intervals[{i}] must be an object with keys {fields}, got {keys}")
        intervals.append(Interval(**entry))
    return validate_intervals(intervals)


def _merge(spans):
    """Sorted, disjoint union of (start, end) spans (touching spans are joined)."""
    merged = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _intersection_length(xs, ys):
    """Total length of the intersection of two sorted, disjoint span lists (two pointers)."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        total += max(0.0, min(xs[i][1], ys[j][1]) - max(xs[i][0], ys[j][0]))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(intervals) -> dict:
    """Step time, busy time per lane, overlap, and the hidden fraction of communication.

    ``overlap_ms`` is the time both lanes are busy (each lane's intervals merged first, so
    nested or overlapping intervals count once); ``hidden_fraction`` is overlap_ms over
    comm_busy_ms (0.0 when there is no communication); ``exposed_comm_ms`` the rest of it.
    """
    intervals = validate_intervals(intervals)
    lanes = {lane: _merge((iv.start_ms, iv.end_ms) for iv in intervals if iv.lane == lane)
             for lane in LANES}
    busy = {lane: sum(end - start for start, end in spans) for lane, spans in lanes.items()}
    overlap = _intersection_length(lanes["compute"], lanes["comm"])
    return {
        "total_ms": max(iv.end_ms for iv in intervals) - min(iv.start_ms for iv in intervals),
        "compute_busy_ms": busy["compute"],
        "comm_busy_ms": busy["comm"],
        "overlap_ms": overlap,
        "exposed_comm_ms": busy["comm"] - overlap,
        "hidden_fraction": overlap / busy["comm"] if busy["comm"] > 0 else 0.0,
    }


def _pack_rows(intervals):
    """Sub-row of each interval (by index) and rows per lane, so overlapping bars do not hide
    each other (e.g. A's combine still in flight when B's dispatch starts)."""
    row, ends = {}, {lane: [] for lane in LANES}
    for i in sorted(range(len(intervals)), key=lambda i: intervals[i].start_ms):
        lane_ends = ends[intervals[i].lane]
        r = next((r for r, end in enumerate(lane_ends) if end <= intervals[i].start_ms),
                 len(lane_ends))  # the first row free again by this start, else a new one
        if r == len(lane_ends):
            lane_ends.append(0.0)
        row[i], lane_ends[r] = r, intervals[i].end_ms
    return row, {lane: max(1, len(e)) for lane, e in ends.items()}


def draw_timeline(intervals, path, *, title: str = "TBO decode step"):
    """Write the timeline as a PNG to ``path``; return the matplotlib Figure (for inspection)."""
    intervals = validate_intervals(intervals)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ImportError(
            'draw_timeline needs matplotlib: pip install ".[viz]" (or pip install matplotlib)'
        ) from e
    stats = summarize(intervals)
    t0 = min(iv.start_ms for iv in intervals)
    span = max(stats["total_ms"], 1e-9)
    fig = Figure(figsize=(12, 3.6), dpi=100)  # no pyplot: no global state, no display needed
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.08, 0.2, 0.89, 0.58))
    ax.set_xlim(0, span)
    ax.set_ylim(-0.6, len(LANES) - 0.4)
    ax.set_yticks(range(len(LANES)), list(reversed(LANES)))
    ax.set_xlabel("time since step start (ms)")
    px_per_ms = fig.get_figwidth() * fig.dpi * 0.89 / span
    row, rows = _pack_rows(intervals)
    named_until = -math.inf  # where the last stage name drawn ends (pixels): names never overlap
    for i, iv in enumerate(intervals):
        height = 0.7 / rows[iv.lane]  # a lane's rows share its 0.7-high band, first row on top
        y = len(LANES) - 1 - LANES.index(iv.lane) + 0.35 - height * (row[i] + 0.5)
        x, width = iv.start_ms - t0, iv.end_ms - iv.start_ms
        ax.barh(y, width, left=x, height=height, color=COLORS[iv.micro_batch],
                edgecolor="black", linewidth=0.5, gid=f"bar:{iv.micro_batch}")
        if width * px_per_ms > 6 * len(iv.label) + 4:  # ~6 px a character at 7 pt
            ax.text(x + width / 2, y, iv.label, ha="center", va="center", fontsize=7)
        name = stage_name(iv)
        if name is not None:
            ax.axvline(x, color="black", linestyle=":", linewidth=0.8, gid="stage")
            if x * px_per_ms >= named_until:  # else skipped: the line still marks the stage
                ax.text(x, len(LANES) - 0.4, f" {name}", ha="left", va="bottom", fontsize=7)
                named_until = x * px_per_ms + 6 * (len(name) + 1) + 2
    present = [mb for mb in MICRO_BATCHES if any(iv.micro_batch == mb for iv in intervals)]
    handles = [Patch(facecolor=COLORS[mb], edgecolor="black",
                     label="plain" if mb == "plain" else f"micro-batch {mb.upper()}")
               for mb in present]
    handles.append(Line2D([], [], color="black", linestyle=":", label="stage boundary"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.18), ncol=len(handles),
              fontsize=8, frameon=False)
    fig.suptitle(f"{title}\nstep {stats['total_ms']:.3f} ms, overlap {stats['overlap_ms']:.3f} "
                 f"ms, {stats['hidden_fraction']:.0%} of communication hidden under compute",
                 fontsize=10)
    fig.savefig(path, format="png")
    return fig


def main(argv=None) -> int:
    """``python -m tbo_parity.parity_tests.timeline IN.json OUT.png [TITLE]``: redraw a saved
    timeline."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print("usage: python -m tbo_parity.parity_tests.timeline IN.json OUT.png [TITLE]",
              file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        intervals = intervals_from_json(json.load(f))
    draw_timeline(intervals, argv[1], **({"title": argv[2]} if len(argv) == 3 else {}))
    print(json.dumps(summarize(intervals), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
