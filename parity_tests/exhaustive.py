"""Exhaustive small-scope verification: every batch within bounds, spec against implementation.

Hypothesis samples batches; split bugs live at small sizes (ties, empty pieces, one sequence, a
sum landing exactly on a boundary), and within small bounds every batch can be checked. This
module enumerates them all, runs the JAX spec on all of them at once (``jax.vmap`` of the pure
functions of ``reference/split.py`` over padded arrays) and the PyTorch implementation batch by
batch (``parity_tests/exhaustive_impl.py``, in worker processes), and compares every index and
every child field. It also asserts the spec's own invariants on every batch (docs/spec.md,
"Verified exhaustively"):

- the children partition the tokens, and the sequences up to the straddling one;
- the balanced split minimises ``|left - right|`` over sequence boundaries and picks the last
  minimiser;
- two-chunk cuts at ``total // 2`` exactly when the balanced split is lopsided beyond the
  threshold;
- the children's real-token counts sum to the parent's, and all padding lies in child B;
- a replay's split depends only on the captured size.

Families (``Bounds``): EXTEND, every batch of 1..B sequences with extend lengths 1..L, at each
threshold of a grid, with no cached prefix and (at the default threshold) under a few prefix
patterns; DECODE and TARGET_VERIFY, every batch size 0..S for draft counts 1..D; graph replay,
every (captured size, real batch size) pair up to R, DECODE, TARGET_VERIFY (1..D) and IDLE;
IDLE itself.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tbo_parity.parity_tests import exhaustive_impl
from tbo_parity.parity_tests.split_parity import SplitCase, split_mismatches
from tbo_parity.reference import split as spec

CHUNK = 20_000  # batches per worker task


@dataclasses.dataclass(frozen=True)
class Bounds:
    max_seqs: int = 5  # B: EXTEND batches of 1..B sequences
    max_len: int = 12  # L: extend lengths 1..L
    max_bs: int = 256  # S: DECODE / TARGET_VERIFY batch sizes 0..S
    max_draft: int = 8  # D: draft token counts 1..D
    max_graph_bs: int = 256  # R: captured sizes 1..R, real batch sizes 0..captured
    thresholds: tuple = (0.1, 0.25, spec.DEFAULT_THRESHOLD, 0.5)
    # cached-prefix patterns (cut to a batch's sequences), checked at the default threshold
    prefixes: tuple = ((3, 0, 7, 1, 2), (1, 1, 1, 1, 1))

    def __post_init__(self):
        for name in ("max_seqs", "max_len", "max_bs", "max_draft", "max_graph_bs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if spec.DEFAULT_THRESHOLD not in self.thresholds:
            raise ValueError(f"thresholds must include the default {spec.DEFAULT_THRESHOLD}")
        for threshold in self.thresholds:
            if not 0 < threshold <= 0.5:
                raise ValueError(f"thresholds must lie in (0, 0.5], got {threshold!r}")
        for pattern in self.prefixes:
            if not pattern or any(p < 0 for p in pattern):
                raise ValueError(f"prefixes must be non-empty patterns of ints >= 0, "
                                 f"got {pattern!r}")


@dataclasses.dataclass
class FamilyReport:
    """One family's outcome: counts, times (each side), the first counterexample."""

    name: str
    batches: int
    spec_seconds: float
    impl_seconds: float
    disagreements: int
    invariant_failures: int
    first: Optional[tuple] = None  # (SplitCase, [what differs])


# ---------------------------------------------------------------------------------------------
# Enumeration.
# ---------------------------------------------------------------------------------------------


def extend_batches(max_seqs: int, max_len: int) -> tuple:
    """Every EXTEND batch of 1..max_seqs sequences with lengths 1..max_len, as
    ``(lens [N, max_seqs], num_seqs [N])``, padded slots 0."""
    blocks, counts = [], []
    for n in range(1, max_seqs + 1):
        grid = np.indices((max_len,) * n).reshape(n, -1).T + 1  # [max_len**n, n]
        padded = np.zeros((len(grid), max_seqs), np.int64)
        padded[:, :n] = grid
        blocks.append(padded)
        counts.append(np.full(len(grid), n, np.int64))
    return np.concatenate(blocks), np.concatenate(counts)


def prefix_array(pattern: tuple, num_seqs: np.ndarray, slots: int) -> np.ndarray:
    """[N, slots]: the pattern (repeated to ``slots``) on each batch's valid slots."""
    row = np.resize(np.asarray(pattern, np.int64), slots)
    return np.where(np.arange(slots)[None, :] < num_seqs[:, None], row[None, :], 0)


# ---------------------------------------------------------------------------------------------
# The spec side, vectorised.
# ---------------------------------------------------------------------------------------------


def _child_arrays(label: str, child) -> dict:
    fields = dataclasses.asdict(child)
    return {f"{label}_{name}": np.asarray(value) for name, value in fields.items()}


@jax.jit
def _spec_extend(seq_lens, lens, prefix, num_seqs, threshold):
    derive = jax.vmap(spec.derive_extend_children, in_axes=(0, 0, 0, 0, None))
    indices = jax.vmap(spec.extend_split_indices, in_axes=(0, 0, None))
    a, b = derive(seq_lens, lens, prefix, num_seqs, threshold)
    split_seq, split_token, two_chunk = indices(lens, num_seqs, threshold)
    balanced = jax.vmap(spec.balanced_split_index)(lens, num_seqs)
    return a, b, split_seq, split_token, two_chunk, balanced


def spec_extend(lens, num_seqs, prefix, threshold) -> dict:
    with jax.enable_x64(True):
        a, b, split_seq, split_token, two_chunk, balanced = jax.device_get(_spec_extend(
            prefix + lens, lens, prefix, num_seqs, jnp.float64(threshold)))
    return {"split_seq": np.asarray(split_seq), "split_token": np.asarray(split_token),
            "two_chunk": np.asarray(two_chunk), "balanced": np.asarray(balanced),
            **_child_arrays("a", a), **_child_arrays("b", b)}


@jax.jit
def _spec_uniform(seq_lens, batch_sizes, d):
    a, b = jax.vmap(spec.derive_uniform_children, in_axes=(0, 0, None))(seq_lens, batch_sizes, d)
    split_seq, split_token = jax.vmap(spec.uniform_split_indices, in_axes=(0, None))(
        batch_sizes * d, d)
    return a, b, split_seq, split_token


def spec_uniform(seq_lens, batch_sizes, d) -> dict:
    with jax.enable_x64(True):
        a, b, split_seq, split_token = jax.device_get(_spec_uniform(seq_lens, batch_sizes, d))
    return {"split_seq": np.asarray(split_seq), "split_token": np.asarray(split_token),
            **_child_arrays("a", a), **_child_arrays("b", b)}


@jax.jit
def _spec_replay(graph_bs, real_bs, d):
    split_seq, split_token = jax.vmap(spec.uniform_split_indices, in_axes=(0, None))(
        graph_bs * d, d)
    a, b = jax.vmap(spec.children_num_token_non_padded)(split_token, real_bs * d)
    return split_seq, split_token, a, b


def spec_replay(graph_bs, real_bs, d) -> dict:
    with jax.enable_x64(True):
        values = jax.device_get(_spec_replay(graph_bs, real_bs, d))
    return dict(zip(("split_seq", "split_token", "a_non_padded", "b_non_padded"),
                    (np.asarray(v) for v in values)))


# ---------------------------------------------------------------------------------------------
# Invariants, asserted on the spec's results (numpy, every batch at once).
# ---------------------------------------------------------------------------------------------


def _valid(num: np.ndarray, slots: int) -> np.ndarray:
    return np.arange(slots)[None, :] < num[:, None]


def _gather(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """values[i, index[i]] (index clipped to the row)."""
    return np.take_along_axis(values, np.clip(index, 0, values.shape[1] - 1)[:, None], 1)[:, 0]


def extend_invariants(lens, num_seqs, prefix, threshold, out) -> dict:
    """Each invariant's failures, a bool mask over the batches."""
    slots = lens.shape[1]
    valid = _valid(num_seqs, slots)
    total = lens.sum(1)
    lefts = np.cumsum(lens, 1)  # lefts[:, i-1] = sum(lens[:i])
    s, t, two = out["split_seq"], out["split_token"], out["two_chunk"].astype(bool)
    bad = {}
    # Balanced: the last boundary i in 1..n-1 minimising |2 * left - total|; 0 for n = 1.
    diffs = np.where(_valid(num_seqs - 1, slots), np.abs(2 * lefts - total[:, None]),
                     np.iinfo(np.int64).max)
    last_min = slots - 1 - np.argmin(diffs[:, ::-1], 1)  # last column holding the minimum
    expected = np.where(num_seqs > 1, last_min + 1, 0)
    bad["balanced split minimises |left - right|, last minimiser"] = out["balanced"] != expected
    # Two-chunk exactly when lopsided; then the cut is total // 2 in the straddling sequence.
    left = np.where(expected > 0, _gather(lefts, expected - 1), 0)
    lopsided = (left < total * threshold) | (left > total * (1 - threshold))
    straddle = np.argmax(lefts > (total // 2)[:, None], 1)
    want_seq = np.where(lopsided, straddle, expected)
    want_tok = np.where(lopsided, total // 2, left)
    bad["two-chunk cuts at total // 2 exactly when lopsided"] = (
        (two != lopsided) | (s != want_seq) | (t != want_tok))
    # Partition of the tokens and of the sequences.
    a_ext, b_ext = out["a_extend_seq_lens"], out["b_extend_seq_lens"]
    a_n = out["a_seq_end"] - out["a_seq_start"]
    b_n = out["b_seq_end"] - out["b_seq_start"]
    ranges = ((out["a_token_start"] != 0) | (out["a_token_end"] != t)
              | (out["b_token_start"] != t) | (out["b_token_end"] != total)
              | (a_ext.sum(1) != t) | (b_ext.sum(1) != total - t))
    seqs = ((out["a_seq_start"] != 0) | (out["a_seq_end"] != s + two)
            | (out["b_seq_start"] != s) | (out["b_seq_end"] != num_seqs))
    cols = np.arange(slots)[None, :]
    before = cols < s[:, None]  # sequences wholly in A
    after = (cols >= 1) & (cols < b_n[:, None])  # B's sequences past the straddler
    a_whole = np.where(before, a_ext != lens, False).any(1)
    b_whole = np.where(after, b_ext != np.take_along_axis(
        lens, np.clip(cols + s[:, None], 0, slots - 1), 1), False).any(1)
    piece = np.where(two, _gather(a_ext, s), 0) + b_ext[:, 0]
    straddler = (b_n > 0) & (piece != _gather(lens, s))
    a_pre, b_pre = out["a_extend_prefix_lens"], out["b_extend_prefix_lens"]
    prefixes = (np.where(_valid(a_n, slots), a_pre != prefix, False).any(1)
                | ((b_n > 0) & (b_pre[:, 0] != _gather(prefix, s) + np.where(
                    two, _gather(a_ext, s), 0))))
    lengths = ((out["a_seq_lens"] != a_pre + a_ext).any(1)
               | (out["b_seq_lens"] != b_pre + b_ext).any(1))
    bad["children partition the tokens and the sequences"] = (
        ranges | seqs | a_whole | b_whole | straddler | prefixes | lengths | ~valid[:, 0])
    counts = np.minimum(t, total) + np.maximum(0, total - t)
    bad["children's real-token counts sum to the parent's"] = counts != total
    return bad


def uniform_invariants(seq_lens, batch_sizes, d, out) -> dict:
    half = batch_sizes // 2
    slots = seq_lens.shape[1]
    cols = np.arange(slots)[None, :]
    b_lens = np.take_along_axis(seq_lens, np.clip(cols + half[:, None], 0, slots - 1), 1)
    return {"children partition the tokens and the sequences": (
        (out["split_seq"] != half) | (out["split_token"] != half * d)
        | (out["a_token_end"] != half * d) | (out["b_token_start"] != half * d)
        | (out["b_token_end"] != batch_sizes * d) | (out["a_seq_end"] != half)
        | (out["b_seq_end"] != batch_sizes)
        | np.where(cols < half[:, None], out["a_seq_lens"] != seq_lens, False).any(1)
        | np.where(cols < (batch_sizes - half)[:, None], out["b_seq_lens"] != b_lens,
                   False).any(1))}


def unpadded_splits(graph_bs, real_bs, out) -> dict:
    """``{captured size: (split_seq, split_token)}`` of the replays without padding."""
    rows = real_bs == graph_bs
    return {g: (seq, tok) for g, seq, tok in zip(graph_bs[rows].tolist(),
                                                 out["split_seq"][rows].tolist(),
                                                 out["split_token"][rows].tolist())}


def replay_invariants(graph_bs, real_bs, d, out, unpadded: dict) -> dict:
    """``unpadded``: each captured size's split without padding (``unpadded_splits``); every
    replay of that graph must cut there, however many of its rows are real."""
    real = real_bs * d
    t = out["split_token"]
    want = np.asarray([unpadded[g] for g in graph_bs.tolist()]).reshape(-1, 2)
    return {
        "children's real-token counts sum to the parent's":
            out["a_non_padded"] + out["b_non_padded"] != real,
        "all padding lies in child B": out["a_non_padded"] != np.minimum(t, real),
        "replay splits depend only on the captured size":
            (out["split_seq"] != want[:, 0]) | (t != want[:, 1]),
    }


# ---------------------------------------------------------------------------------------------
# Running both sides and comparing.
# ---------------------------------------------------------------------------------------------


def _disagreements(ours: dict, theirs: dict) -> np.ndarray:
    """Bool mask over the batches: any field of ``theirs`` that differs from ``ours``. A
    child's per-sequence fields are compared on the child's own sequences only (past them the
    spec's padding is not specified: its ``extend_start_loc`` keeps counting)."""
    mask = np.zeros(len(next(iter(theirs.values()))), bool)
    for name, value in theirs.items():
        diff = ours[name] != value
        if diff.ndim == 2:
            child = name[:2]
            count = ours[f"{child}seq_end"] - ours[f"{child}seq_start"]
            diff = (diff & _valid(count, diff.shape[1])).any(1)
        mask |= diff
    return mask


def _chunks(n: int) -> list:
    return [slice(start, min(start + CHUNK, n)) for start in range(0, n, CHUNK)]


def _merge(parts: list) -> dict:
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


class ImplRunner:
    """Runs ``exhaustive_impl`` tasks in worker processes (or in this one with workers=1)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None
        if workers > 1:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"))

    def map(self, kind: str, tasks: list) -> list:
        if self.pool is None:
            return [exhaustive_impl.run((kind, task)) for task in tasks]
        return list(self.pool.map(exhaustive_impl.run, [(kind, task) for task in tasks]))

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def _first(mask: np.ndarray, make_case, why) -> Optional[tuple]:
    rows = np.flatnonzero(mask)
    if not len(rows):
        return None
    case = make_case(int(rows[0]))
    return case, why(int(rows[0]), case)


def _timed(report: FamilyReport, side: str, run):
    """run(), its seconds added to the report's ``<side>_seconds``."""
    start = time.perf_counter()
    result = run()
    setattr(report, f"{side}_seconds",
            getattr(report, f"{side}_seconds") + time.perf_counter() - start)
    return result


def _tally(report: FamilyReport, batches: int, wrong: np.ndarray, broken: dict,
           make_case) -> None:
    """Add one run's counts to the family's report, and keep the first counterexample: a
    disagreement (what differs, from split_mismatches) or a broken invariant (its name)."""
    report.batches += batches
    report.disagreements += int(wrong.sum())
    report.invariant_failures += int(sum(mask.sum() for mask in broken.values()))
    report.first = report.first or _first(wrong, make_case,
                                          lambda row, case: split_mismatches(case))
    for name, mask in broken.items():
        report.first = report.first or _first(mask, make_case,
                                              lambda row, case, name=name: [name])


def check_extend(bounds: Bounds, runner: ImplRunner) -> FamilyReport:
    lens, num_seqs = extend_batches(bounds.max_seqs, bounds.max_len)
    runs = [((0,), t) for t in bounds.thresholds]
    runs += [(pattern, spec.DEFAULT_THRESHOLD) for pattern in bounds.prefixes]
    report = FamilyReport("EXTEND", 0, 0.0, 0.0, 0, 0)
    for pattern, threshold in runs:
        prefix = prefix_array(pattern, num_seqs, bounds.max_seqs)
        tasks = [(lens[c], num_seqs[c], prefix[c], threshold) for c in _chunks(len(lens))]
        ours = _timed(report, "spec", lambda: spec_extend(lens, num_seqs, prefix, threshold))
        theirs = _timed(report, "impl", lambda: _merge(runner.map("extend", tasks)))
        wrong = _disagreements(ours, theirs)
        broken = extend_invariants(lens, num_seqs, prefix, threshold, ours)

        def make_case(row, prefix=prefix, threshold=threshold):
            n = int(num_seqs[row])
            ext, pre = lens[row, :n].tolist(), prefix[row, :n].tolist()
            return SplitCase("EXTEND", tuple(p + e for p, e in zip(pre, ext)), tuple(ext),
                             tuple(pre), threshold=threshold)

        _tally(report, len(lens), wrong, broken, make_case)
    return report


def _uniform_seq_lens(max_bs: int) -> np.ndarray:
    """[max_bs + 1, max_bs]: row bs holds bs positive lengths, then zeros."""
    pattern = (np.arange(max_bs) * 7) % 13 + 1
    return np.where(np.arange(max_bs)[None, :] < np.arange(max_bs + 1)[:, None], pattern, 0)


def check_uniform(bounds: Bounds, runner: ImplRunner) -> FamilyReport:
    seq_lens = _uniform_seq_lens(bounds.max_bs)
    batch_sizes = np.arange(bounds.max_bs + 1)
    report = FamilyReport("DECODE, TARGET_VERIFY", 0, 0.0, 0.0, 0, 0)
    runs = [("DECODE", 1)] + [("TARGET_VERIFY", d) for d in range(1, bounds.max_draft + 1)]
    for mode, d in runs:
        tasks = [(mode, seq_lens, batch_sizes, d)]
        ours = _timed(report, "spec", lambda: spec_uniform(seq_lens, batch_sizes, d))
        theirs = _timed(report, "impl", lambda: _merge(runner.map("uniform", tasks)))
        wrong = _disagreements(ours, theirs)
        broken = uniform_invariants(seq_lens, batch_sizes, d, ours)

        def make_case(row, mode=mode, d=d):
            return SplitCase(mode, tuple(seq_lens[row, :row].tolist()),
                             draft_token_num=d if mode == "TARGET_VERIFY" else None)

        _tally(report, len(batch_sizes), wrong, broken, make_case)
    return report


def replay_pairs(max_graph_bs: int) -> tuple:
    """Every (captured size g in 1..R, real batch size n in 0..g): ``(graph_bs, real_bs)``."""
    graph_bs = np.repeat(np.arange(1, max_graph_bs + 1), np.arange(2, max_graph_bs + 2))
    real_bs = np.concatenate([np.arange(g + 1) for g in range(1, max_graph_bs + 1)])
    return graph_bs, real_bs


def check_replay(bounds: Bounds, runner: ImplRunner) -> FamilyReport:
    graph_bs, real_bs = replay_pairs(bounds.max_graph_bs)
    report = FamilyReport("graph replay", 0, 0.0, 0.0, 0, 0)
    idle = real_bs == 0
    runs = [("DECODE", 1, slice(None)), ("IDLE", 1, idle)]
    runs += [("TARGET_VERIFY", d, slice(None)) for d in range(1, bounds.max_draft + 1)]
    decode_splits = None
    for mode, d, rows in runs:
        g, n = graph_bs[rows], real_bs[rows]
        tasks = [(mode, g[c], n[c], d) for c in _chunks(len(g))]
        ours = _timed(report, "spec", lambda: spec_replay(g, n, d))
        theirs = _timed(report, "impl", lambda: _merge(runner.map("replay", tasks)))
        wrong = _disagreements(ours, theirs)
        # IDLE replays the DECODE graphs (the spec's choice): it must cut where DECODE does.
        splits = decode_splits if mode == "IDLE" else unpadded_splits(g, n, ours)
        decode_splits = splits if mode == "DECODE" else decode_splits
        broken = replay_invariants(g, n, d, ours, splits)

        def make_case(row, mode=mode, d=d, g=g, n=n):
            # A padded replay: the graph's sequences, the real ones' tokens counted as real.
            graph_mode = "DECODE" if mode == "IDLE" else mode
            return SplitCase(graph_mode, (1,) * int(g[row]),
                             draft_token_num=d if mode == "TARGET_VERIFY" else None,
                             num_token_non_padded=int(n[row]) * d)

        _tally(report, len(g), wrong, broken, make_case)
    return report


def check_idle() -> FamilyReport:
    case = SplitCase("IDLE", ())
    start = time.perf_counter()
    wrong = split_mismatches(case)
    seconds = time.perf_counter() - start
    return FamilyReport("IDLE", 1, seconds / 2, seconds / 2, int(bool(wrong)), 0,
                        (case, wrong) if wrong else None)


def verify(bounds: Bounds, workers: int, on_report=None) -> list:
    """Every family's report; ``on_report(report)`` is called as each one completes."""
    runner = ImplRunner(workers)
    reports = []
    try:
        for family in (lambda: check_extend(bounds, runner),
                       lambda: check_uniform(bounds, runner),
                       lambda: check_replay(bounds, runner), check_idle):
            reports.append(family())
            if on_report is not None:
                on_report(reports[-1])
    finally:
        runner.close()
    return reports


def format_row(report: FamilyReport) -> str:
    def rate(seconds):
        return f"{report.batches / seconds:>10,.0f}" if seconds > 0 else f"{'-':>10}"

    return (f"{report.name:<22} {report.batches:>10,} {report.spec_seconds:>7.1f}s "
            f"{rate(report.spec_seconds)} {report.impl_seconds:>7.1f}s "
            f"{rate(report.impl_seconds)} {report.disagreements:>13,} "
            f"{report.invariant_failures:>10,}")


HEADER = (f"{'family':<22} {'batches':>10} {'spec':>8} {'spec b/s':>10} {'impl':>8} "
          f"{'impl b/s':>10} {'disagreements':>13} {'invariants':>10}")
LEGEND = ("spec: the JAX spec, vmapped over every batch; impl: the PyTorch implementation, "
          "batch by batch;\nb/s: batches per second; invariants: batches breaking one of "
          "the spec's invariants.")
