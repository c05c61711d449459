"""The implementation's side of the exhaustive check: ``torch_impl``'s split functions called
batch by batch, their results packed into the padded arrays the JAX spec returns.

This module imports numpy and ``torch_impl`` only (no JAX), so that the worker processes of
``parity_tests/exhaustive.py`` start quickly and never touch the JAX runtime.

Array layout (``N`` batches, ``S`` sequence slots): per batch ``split_seq``, ``split_token``
``[N]``; per child (``a_``/``b_`` prefix) ``seq_start``, ``seq_end``, ``token_start``,
``token_end`` ``[N]`` and ``seq_lens``, ``extend_seq_lens``, ``extend_prefix_lens``,
``extend_start_loc`` ``[N, S]``, valid slots first, zeros after (as ``reference.split``
pads its ``ChildArrays``).
"""

from __future__ import annotations

import numpy as np

from tbo_parity.torch_impl import two_batch_overlap as impl

CHILD_SCALARS = ("seq_start", "seq_end", "token_start", "token_end")
CHILD_VECTORS = ("seq_lens", "extend_seq_lens", "extend_prefix_lens", "extend_start_loc")


def empty_result(num_batches: int, slots: int) -> dict:
    result = {"split_seq": np.zeros(num_batches, np.int64),
              "split_token": np.zeros(num_batches, np.int64)}
    for child in "ab":
        for name in CHILD_SCALARS:
            result[f"{child}_{name}"] = np.zeros(num_batches, np.int64)
        for name in CHILD_VECTORS:
            result[f"{child}_{name}"] = np.zeros((num_batches, slots), np.int64)
    return result


def _store(result: dict, row: int, label: str, child) -> None:
    result[f"{label}_seq_start"][row], result[f"{label}_seq_end"][row] = child.seq_range
    result[f"{label}_token_start"][row], result[f"{label}_token_end"][row] = child.token_range
    for name in CHILD_VECTORS:
        values = getattr(child, name)
        if values is not None:
            result[f"{label}_{name}"][row, :len(values)] = values


def extend_results(task: tuple) -> dict:
    """EXTEND batches ``lens [N, S]`` with ``num_seqs [N]`` and ``prefix [N, S]`` at one
    threshold, through the three public functions, one batch at a time."""
    lens, num_seqs, prefix, threshold = task
    result = empty_result(*lens.shape)
    mode = impl.ForwardMode.EXTEND
    for row, (ext, pre, n) in enumerate(zip(lens.tolist(), prefix.tolist(), num_seqs.tolist())):
        ext, pre = ext[:n], pre[:n]
        seq = impl.compute_split_seq_index(mode, sum(ext), ext, None, threshold)
        result["split_seq"][row] = seq
        result["split_token"][row] = impl.compute_split_token_index(seq, mode, ext, None,
                                                                    threshold)
        children = impl.derive_children(mode, [p + e for p, e in zip(pre, ext)], ext, pre,
                                        None, threshold)
        for label, child in zip("ab", children):
            _store(result, row, label, child)
    return result


def uniform_results(task: tuple) -> dict:
    """DECODE / TARGET_VERIFY batches: ``seq_lens [N, S]`` with ``batch_sizes [N]``, ``d``
    tokens per sequence."""
    mode_name, seq_lens, batch_sizes, d = task
    mode = impl.ForwardMode[mode_name]
    result = empty_result(*seq_lens.shape)
    for row, (lens, bs) in enumerate(zip(seq_lens.tolist(), batch_sizes.tolist())):
        seq = impl.compute_split_seq_index(mode, bs * d, None, d)
        result["split_seq"][row] = seq
        result["split_token"][row] = impl.compute_split_token_index(seq, mode, None, d)
        for label, child in zip("ab", impl.derive_children(mode, lens[:bs], None, None, d)):
            _store(result, row, label, child)
    return result


def replay_results(task: tuple) -> dict:
    """Graph replays: ``graph_bs [N]`` captured sizes, ``real_bs [N]`` real sequences, ``d``
    tokens per sequence: the split from the graph and the children's real-token counts."""
    mode_name, graph_bs, real_bs, d = task
    mode = impl.ForwardMode[mode_name]
    out = {name: np.zeros(len(graph_bs), np.int64)
           for name in ("split_seq", "split_token", "a_non_padded", "b_non_padded")}
    for row, (g, n) in enumerate(zip(graph_bs.tolist(), real_bs.tolist())):
        seq, token = impl.compute_split_indices_for_cuda_graph_replay(mode, g * d, d)
        a, b = impl.compute_children_num_token_non_padded(token, n * d)
        out["split_seq"][row], out["split_token"][row] = seq, token
        out["a_non_padded"][row], out["b_non_padded"][row] = a, b
    return out


RUNNERS = {"extend": extend_results, "uniform": uniform_results, "replay": replay_results}


def run(kind_and_task: tuple) -> dict:
    """Entry point of a worker process: ``(kind, task)``."""
    kind, task = kind_and_task
    return RUNNERS[kind](task)
