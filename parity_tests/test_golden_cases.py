"""The hand-checked golden table of docs/spec.md holds, on the spec and the implementation."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

from tbo_parity.reference import split as spec
from tbo_parity.torch_impl import two_batch_overlap as impl

SPEC_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "spec.md"
PAIR = re.compile(r"(\w+)=(\S+)")


def _pairs(cell: str) -> dict:
    return {k: ast.literal_eval(v) for k, v in PAIR.findall(cell.strip().strip("`"))}


def golden_rows() -> list:
    rows = []
    for line in SPEC_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].isdigit():
            number, mode, batch, split, child_a, child_b, _ = cells
            rows.append(pytest.param(mode, _pairs(batch), ast.literal_eval(split.strip("`")),
                                     _pairs(child_a), _pairs(child_b), id=f"{number}-{mode}"))
    return rows


def test_golden_table_is_present():
    assert len(golden_rows()) >= 13


def _check_child(child, want: dict, mode: str):
    assert child.seq_range == want["seqs"]
    assert child.token_range == want["toks"]
    if "lens" in want:
        assert child.seq_lens == want["lens"]
    if mode == "EXTEND":
        assert child.extend_seq_lens == want["ext"]
        assert child.extend_prefix_lens == want["pre"]
        assert child.extend_num_tokens == sum(want["ext"])
    else:
        assert child.extend_seq_lens is None and child.extend_start_loc is None


@pytest.mark.parametrize("side", [spec, impl], ids=["spec", "impl"])
@pytest.mark.parametrize("mode,batch,split,want_a,want_b", golden_rows())
def test_golden_case(side, mode, batch, split, want_a, want_b):
    forward_mode = side.ForwardMode[mode]
    threshold = batch.get("thr", 0.48)
    if mode == "EXTEND":
        ext, pre = batch["ext"], batch.get("pre", [0] * len(batch["ext"]))
        seq_lens = [p + e for p, e in zip(pre, ext)]
        num_tokens, tnps = sum(ext), None
    else:
        ext, pre, seq_lens = None, None, batch["seq"]
        tnps = side.token_num_per_seq(forward_mode, batch.get("d"))
        num_tokens = len(seq_lens) * tnps
    split_seq = side.compute_split_seq_index(forward_mode, num_tokens, ext, tnps, threshold)
    split_token = side.compute_split_token_index(split_seq, forward_mode, ext, tnps, threshold)
    assert (split_seq, split_token) == split
    a, b = side.derive_children(forward_mode, seq_lens, ext, pre, tnps, threshold)
    _check_child(a, want_a, mode)
    _check_child(b, want_b, mode)


@pytest.mark.parametrize("side", [spec, impl], ids=["spec", "impl"])
def test_golden_replay_and_padding_counts(side):
    mode = side.ForwardMode
    assert side.compute_split_indices_for_cuda_graph_replay(mode.DECODE, 7, 1) == (3, 3)
    assert side.compute_split_indices_for_cuda_graph_replay(mode.TARGET_VERIFY, 12, 4) == (1, 4)
    assert side.compute_split_indices_for_cuda_graph_replay(mode.IDLE, 8, 0) == (4, 4)
    assert side.compute_children_num_token_non_padded(4, 6) == (4, 2)
    assert side.compute_children_num_token_non_padded(4, 3) == (3, 0)


@pytest.mark.parametrize("side", [spec, impl], ids=["spec", "impl"])
def test_golden_dp_decisions(side):
    mode = side.ForwardMode
    decide = side.compute_dp_tbo_decision
    assert decide([(True, mode.DECODE), (True, None)]) == (True, mode.DECODE)
    assert decide([(True, mode.DECODE), (True, mode.IDLE)]) == (True, mode.DECODE)
    assert decide([(True, mode.DECODE), (False, None)]) == (False, None)
    assert decide([(True, mode.DECODE), (True, mode.EXTEND)]) == (False, None)
    assert decide([(True, None), (True, None)]) == (False, None)
    assert decide([(False, mode.MIXED), (True, mode.EXTEND)]) == (False, None)
