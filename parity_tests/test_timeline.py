"""The timeline chart: summary numbers checked by hand, JSON round trip, validation, the PNG."""

import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from tbo_parity.parity_tests.timeline import (COLORS, Interval, draw_timeline, intervals_from_json,
                                              intervals_to_json, main, summarize,
                                              validate_intervals)


def iv(lane, start, end, mb="a", label="x"):
    return Interval(lane, mb, label, float(start), float(end))


# A two-layer-ish overlapped step: B computes while A's tokens travel and vice versa.
STEP = [
    Interval("compute", "a", "a0: attn dispatch_launch", 0.0, 1.0),
    Interval("comm", "a", "dispatch a L0", 1.0, 2.0),
    Interval("compute", "b", "b0: attn dispatch_launch", 1.0, 2.0),
    Interval("comm", "b", "dispatch b L0", 2.0, 3.2),
    Interval("compute", "a", "a1: dispatch_wait experts combine_launch", 2.0, 3.0),
    Interval("comm", "a", "combine a L0", 3.0, 4.0),
    Interval("compute", "b", "b1: dispatch_wait experts combine_launch", 3.2, 4.0),
]


def test_summarize_simple_overlap():
    s = summarize([iv("compute", 0, 4), iv("comm", 2, 5, mb="b")])
    assert s["total_ms"] == 5
    assert s["compute_busy_ms"] == 4 and s["comm_busy_ms"] == 3
    assert s["overlap_ms"] == 2 and s["exposed_comm_ms"] == 1
    assert s["hidden_fraction"] == pytest.approx(2 / 3)


def test_summarize_merges_nested_adjacent_and_overlapping_intervals():
    compute = [iv("compute", 0, 3), iv("compute", 1, 2),   # nested
               iv("compute", 3, 5),                        # adjacent
               iv("compute", 4, 6),                        # overlapping
               iv("compute", 8, 9)]                        # separate
    comm = [iv("comm", 5, 8.5), iv("comm", 6, 7)]          # nested in the comm lane too
    s = summarize(compute + comm)
    assert s["compute_busy_ms"] == 7                       # [0, 6] + [8, 9]
    assert s["comm_busy_ms"] == 3.5
    assert s["overlap_ms"] == 1.5                          # [5, 6] + [8, 8.5]
    assert s["hidden_fraction"] == pytest.approx(1.5 / 3.5)
    assert s["total_ms"] == 9


def test_summarize_no_overlap():
    s = summarize([iv("compute", 0, 1), iv("comm", 1, 2), iv("compute", 2, 3)])  # only touching
    assert s["overlap_ms"] == 0 and s["hidden_fraction"] == 0
    assert s["exposed_comm_ms"] == 1
    s = summarize([iv("compute", 0, 1, mb="plain")])       # no communication at all
    assert s["comm_busy_ms"] == 0 and s["hidden_fraction"] == 0


def test_summarize_step_offset_does_not_matter():
    shifted = [Interval(i.lane, i.micro_batch, i.label, i.start_ms + 100, i.end_ms + 100)
               for i in STEP]
    assert summarize(shifted) == pytest.approx(summarize(STEP))
    s = summarize(STEP)
    assert s["overlap_ms"] == pytest.approx(2.8)             # [1, 3] + [3.2, 4]
    assert s["comm_busy_ms"] == pytest.approx(3.0) and s["total_ms"] == pytest.approx(4.0)


spans = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 8)), max_size=8)


@settings(max_examples=300)
@given(compute=spans, comm=spans)
def test_summarize_matches_unit_cell_count(compute, comm):
    """With integer endpoints, busy and overlap time are counts of busy unit cells [k, k+1]."""
    intervals = ([iv("compute", s, s + n) for s, n in compute]
                 + [iv("comm", s, s + n) for s, n in comm])
    if not intervals:
        return
    cells = {lane: {k for s, n in spans_ for k in range(s, s + n)}
             for lane, spans_ in (("compute", compute), ("comm", comm))}
    s = summarize(intervals)
    assert s["compute_busy_ms"] == len(cells["compute"])
    assert s["comm_busy_ms"] == len(cells["comm"])
    assert s["overlap_ms"] == len(cells["compute"] & cells["comm"])
    assert 0 <= s["hidden_fraction"] <= 1


def test_json_round_trip():
    text = json.dumps(intervals_to_json(STEP))
    assert intervals_from_json(json.loads(text)) == STEP
    assert json.loads(text)[0] == {"lane": "compute", "micro_batch": "a",
                                   "label": "a0: attn dispatch_launch",
                                   "start_ms": 0.0, "end_ms": 1.0}


@pytest.mark.parametrize("intervals, field", [
    ([], "intervals must not be empty"),
    ([iv("gpu", 0, 1)], "intervals[0].lane"),
    ([iv("compute", 0, 1), iv("comm", 0, 1, mb="c")], "intervals[1].micro_batch"),
    ([iv("compute", 2, 1)], "intervals[0].end_ms"),
    ([iv("compute", math.nan, 1)], "intervals[0].start_ms"),
    ([iv("compute", 0, math.inf)], "intervals[0].end_ms"),
    ([Interval("compute", "a", "x", True, 2.0)], "intervals[0].start_ms"),
    ([Interval("compute", "a", None, 0.0, 1.0)], "intervals[0].label"),
    (["not an interval"], "intervals[0] must be an Interval"),
])
def test_validation_names_the_field(intervals, field):
    for check in (validate_intervals, summarize, intervals_to_json):
        with pytest.raises(ValueError) as e:
            check(intervals)
        assert field in str(e.value)


def test_from_json_rejects_bad_entries():
    good = intervals_to_json(STEP[:1])[0]
    with pytest.raises(ValueError, match="must be a list"):
        intervals_from_json({"lane": "compute"})
    missing = {k: v for k, v in good.items() if k != "end_ms"}
    with pytest.raises(ValueError, match=r"intervals\[0\].*end_ms"):
        intervals_from_json([missing])
    with pytest.raises(ValueError, match=r"intervals\[1\]\.lane"):
        intervals_from_json([good, {**good, "lane": "network"}])


def test_draw_timeline_png(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    from matplotlib.colors import to_rgb

    path = tmp_path / "step.png"
    fig = draw_timeline(STEP, path, title="test step")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    pixels = image.imread(path)
    width, height = (fig.get_size_inches() * fig.dpi).round().astype(int)
    assert pixels.shape[:2] == (height, width) and (width, height) == (1200, 360)

    ax = fig.axes[0]
    # The bars: one per interval, coloured by micro-batch, A and B different.
    bars = {mb: [p for p in ax.patches if p.get_gid() == f"bar:{mb}"] for mb in "ab"}
    assert len(bars["a"]) == 4 and len(bars["b"]) == 3
    face = {mb: {tuple(p.get_facecolor()[:3]) for p in bars[mb]} for mb in "ab"}
    assert face["a"] == {to_rgb(COLORS["a"])} and face["b"] == {to_rgb(COLORS["b"])}
    assert face["a"] != face["b"]
    # ... and so are the pixels: sample just inside the lower-left corner of each compute bar.
    for interval in STEP:
        if interval.lane != "compute":
            continue
        y = 1.0 - 0.25                                       # compute lane is the top row
        x_px, y_px = ax.transData.transform((interval.start_ms + 0.1, y))
        rgb = pixels[height - int(round(y_px)), int(round(x_px)), :3]
        assert rgb == pytest.approx(to_rgb(COLORS[interval.micro_batch]), abs=0.02)

    # Stage boundaries: a dotted line at the start of each compute stage, with its name.
    lines = [line for line in ax.lines if line.get_gid() == "stage"]
    assert sorted(line.get_xdata()[0] for line in lines) == [0.0, 1.0, 2.0, 3.2]
    texts = {t.get_text().strip() for t in ax.texts}
    assert {"a0", "b0", "a1", "b1"} <= texts
    assert "dispatch a L0" in texts                           # a wide bar is labelled
    assert "93% of communication hidden" in fig._suptitle.get_text()   # 2.8 of 3.0 ms
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["micro-batch A", "micro-batch B", "stage boundary"]


def test_overlapping_bars_get_their_own_rows(tmp_path):
    pytest.importorskip("matplotlib")
    crowded = STEP + [Interval("comm", "b", "combine b L0", 3.5, 4.5),
                      Interval("comm", "plain", "all-reduce", 0.5, 4.2),
                      Interval("compute", "a", "a2: nested", 3.4, 3.6)]
    for intervals in (STEP, crowded):
        fig = draw_timeline(intervals, tmp_path / "crowded.png", title="t")
        bars = [p for p in fig.axes[0].patches if (p.get_gid() or "").startswith("bar:")]
        assert len(bars) == len(intervals)
        boxes = [(p.get_x(), p.get_x() + p.get_width(), p.get_y(), p.get_y() + p.get_height())
                 for p in bars]
        for i, (x0, x1, y0, y1) in enumerate(boxes):   # no bar covers part of another
            for u0, u1, v0, v1 in boxes[i + 1:]:
                assert min(x1, u1) <= max(x0, u0) + 1e-9 or min(y1, v1) <= max(y0, v0) + 1e-9
    assert {p.get_gid() for p in bars} == {"bar:a", "bar:b", "bar:plain"}


def test_draw_timeline_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)   # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "\.\[viz\]"'):
        draw_timeline(STEP, tmp_path / "x.png", title="t")
    assert not (tmp_path / "x.png").exists()


def test_module_imports_without_matplotlib():
    code = ("import sys; import tbo_parity.parity_tests.timeline; "
            "assert 'matplotlib' not in sys.modules, 'timeline imported matplotlib'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_main_redraws_saved_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src, out = tmp_path / "step.json", tmp_path / "step.png"
    src.write_text(json.dumps(intervals_to_json(STEP)))
    assert main([str(src), str(out), "redrawn"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(capsys.readouterr().out)["overlap_ms"] == pytest.approx(2.8)
    assert main([str(src)]) == 2
