"""Spec (JAX) vs implementation (PyTorch) on the split of one batch.

A ``SplitCase`` is a batch in plain Python values; its ``repr`` is a literal that can be pasted
into a test. ``split_mismatches(case)`` runs every split function of both sides on it and
returns what differs (empty when they agree). Both sides must agree on *rejections* too: if
one raises ``ValueError`` the other must.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from tbo_parity.reference import split as spec
from tbo_parity.torch_impl import two_batch_overlap as impl
from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
from tbo_parity.torch_impl.forward_batch import ForwardBatch, VerifyInput


# Short names of the modes and of the split functions, for tables of calls in the tests.
E, D, TV, I = "EXTEND", "DECODE", "TARGET_VERIFY", "IDLE"
SEQ = "compute_split_seq_index"
TOKEN = "compute_split_token_index"
REPLAY = "compute_split_indices_for_cuda_graph_replay"
PADDED = "compute_children_num_token_non_padded"
TNPS = "token_num_per_seq"
CHILDREN = "derive_children"
DP = "compute_dp_tbo_decision"


@dataclasses.dataclass(frozen=True)
class SplitCase:
    """A batch to split. ``mode`` is a ForwardMode name; lengths are per sequence."""

    mode: str
    seq_lens: tuple
    extend_lens: Optional[tuple] = None
    prefix_lens: Optional[tuple] = None
    draft_token_num: Optional[int] = None
    threshold: float = 0.48
    num_token_non_padded: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        """The batch's token count. A TARGET_VERIFY case without ``draft_token_num`` (invalid:
        every split function must reject it) counts one token per sequence, so that such a
        case can still be run through every function of both sides."""
        if self.mode == "EXTEND":
            return sum(self.extend_lens)
        draft = 1 if self.draft_token_num is None else self.draft_token_num
        per_seq = {"DECODE": 1, "TARGET_VERIFY": draft, "IDLE": 0}[self.mode]
        return len(self.seq_lens) * per_seq


def _outcome(fn: Callable):
    """The value of fn(), or the marker ('ValueError',) if it rejects its input."""
    try:
        return fn()
    except ValueError:
        return ("ValueError",)


def resolve_modes(side, args):
    """The args with every ForwardMode name (a str), also inside lists and tuples (the ranks
    of a data-parallel report), turned into the side's own ForwardMode."""
    if isinstance(args, str):
        return side.ForwardMode[args] if args in side.ForwardMode.__members__ else args
    if isinstance(args, (list, tuple)):
        return type(args)(resolve_modes(side, a) for a in args)
    return args


def rejection(side, function: str, args=(), kwargs=None) -> str:
    """The message of the ValueError that ``side.function(*args)`` raises (mode names in args
    resolved to the side's ForwardMode); AssertionError if it raises none."""
    try:
        getattr(side, function)(*resolve_modes(side, args), **(kwargs or {}))
    except ValueError as error:
        return str(error)
    raise AssertionError(f"{side.__name__}.{function}{args!r} accepted its input")


def _child_dict(child) -> dict:
    """The child's fields by name. Both sides' children are flat (tuples and ints), so this is
    ``dataclasses.asdict`` without its deep copy (a third of the time of a split check)."""
    return {field.name: getattr(child, field.name) for field in dataclasses.fields(child)}


def side_results(side, case: SplitCase) -> dict:
    """Every split function of one side (``spec`` or ``impl``) on the case."""
    mode = side.ForwardMode[case.mode]
    tnps = _outcome(lambda: side.token_num_per_seq(mode, case.draft_token_num))
    tnps_arg = None if isinstance(tnps, tuple) else tnps
    extend = case.extend_lens if case.mode == "EXTEND" else None
    n = case.num_tokens
    results = {"token_num_per_seq": tnps}
    results["split_seq_index"] = _outcome(lambda: side.compute_split_seq_index(
        mode, n, extend, tnps_arg, case.threshold))
    seq = results["split_seq_index"]
    results["split_token_index"] = _outcome(lambda: side.compute_split_token_index(
        seq if isinstance(seq, int) else 0, mode, extend, tnps_arg, case.threshold))
    if case.mode != "EXTEND":
        results["cuda_graph_replay"] = _outcome(
            lambda: side.compute_split_indices_for_cuda_graph_replay(mode, n, tnps_arg))
    token = results["split_token_index"]
    padded = n if case.num_token_non_padded is None else case.num_token_non_padded
    results["children_num_token_non_padded"] = _outcome(
        lambda: side.compute_children_num_token_non_padded(
            token if isinstance(token, int) else 0, padded))
    results["children"] = _outcome(lambda: tuple(_child_dict(c) for c in side.derive_children(
        mode, case.seq_lens, extend, case.prefix_lens if case.mode == "EXTEND" else None,
        tnps_arg, case.threshold)))
    return results


def result_mismatches(ours: dict, theirs: dict) -> list:
    """Names and values of every result (of ``side_results``) on which two sides differ."""
    return [f"{key}: spec={ours[key]!r} impl={theirs[key]!r}"
            for key in ours if ours[key] != theirs[key]]


def split_mismatches(case: SplitCase) -> list:
    """Names and values of every result on which spec and implementation differ."""
    return result_mismatches(side_results(spec, case), side_results(impl, case))


# --- a ForwardBatch for a case, to check TboForwardBatchPreparer against derive_children ----


def _scrambled_bits(n: int, seed: int) -> torch.Tensor:
    """n pseudo-random bools, cheap even for millions (a multiplicative hash of the index)."""
    index = torch.arange(n, dtype=torch.int64) + seed
    return ((index * 0x9E3779B1) >> 13) % 2 == 1


def make_forward_batch(case: SplitCase, seed: int = 0) -> ForwardBatch:
    """A ForwardBatch with the case's lengths and random token/sequence contents."""
    gen = torch.Generator().manual_seed(seed)
    mode = impl.ForwardMode[case.mode]
    bs, n = len(case.seq_lens), case.num_tokens
    seq_lens = torch.tensor(case.seq_lens, dtype=torch.int64)

    def ints(*shape, high=1 << 20):
        return torch.randint(0, high, shape, generator=gen, dtype=torch.int64)

    batch = ForwardBatch(
        forward_mode=mode, batch_size=bs, input_ids=ints(n), positions=ints(n),
        out_cache_loc=ints(n), req_pool_indices=ints(bs), seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(), num_token_non_padded=case.num_token_non_padded)
    if case.mode == "EXTEND":
        lens = torch.tensor(case.extend_lens, dtype=torch.int64)
        prefix = torch.tensor(case.prefix_lens, dtype=torch.int64)
        batch.extend_seq_lens, batch.extend_seq_lens_cpu = lens, lens.clone()
        batch.extend_prefix_lens, batch.extend_prefix_lens_cpu = prefix, prefix.clone()
        batch.extend_start_loc = torch.cumsum(lens, 0) - lens
        batch.extend_num_tokens = n
    if case.mode == "TARGET_VERIFY":
        d = case.draft_token_num
        mask_len = sum((s + d) * d for s in case.seq_lens)
        batch.spec_info = VerifyInput(
            draft_token_num=d, draft_tokens=ints(n), positions=ints(n),
            custom_mask=_scrambled_bits(mask_len, seed),
            retrieve_index=ints(bs, d))
    return batch


# --- TboForwardBatchPreparer against the spec, field by field -----------------------------

# What each field of a child must hold, stated here independently of the declarations in
# forward_batch.py (a new field must be added here, see test_every_field_is_checked).
TOKEN_FIELDS = {"input_ids", "positions", "out_cache_loc"}
SEQ_FIELDS = {"req_pool_indices"}
SHARED_FIELDS = {"forward_mode", "req_to_token", "kv_pool"}
SPEC_CHILD_FIELDS = {  # ForwardBatch field -> attribute of the spec's child
    "seq_lens": "seq_lens", "seq_lens_cpu": "seq_lens",
    "extend_seq_lens": "extend_seq_lens", "extend_seq_lens_cpu": "extend_seq_lens",
    "extend_prefix_lens": "extend_prefix_lens",
    "extend_prefix_lens_cpu": "extend_prefix_lens",
    "extend_start_loc": "extend_start_loc", "extend_num_tokens": "extend_num_tokens",
}
OTHER_FIELDS = {"batch_size", "spec_info", "num_token_non_padded", "tbo_split_seq_index",
                "tbo_parent_token_range", "tbo_children"}
VERIFY_TOKEN_FIELDS = {"draft_tokens", "positions"}


def _mask_range(seq_lens, d, seq_range):
    """Offsets of the tree-mask blocks of seq_range, from the rule in docs/spec.md,
    "Children" (the TARGET_VERIFY mask)."""
    blocks = [(n + d) * d for n in seq_lens]
    return sum(blocks[:seq_range[0]]), sum(blocks[:seq_range[1]])


def _as_tuple(value):
    return None if value is None else tuple(value.tolist())


def child_mismatches(parent: ForwardBatch, child: ForwardBatch, want: dict,
                     non_padded: int) -> list:
    """Fields of one child that differ from what the spec says they must hold."""
    start, end = want["token_range"]
    first, last = want["seq_range"]
    wrong = []

    def expect(ok: bool, name: str):
        if not ok:
            wrong.append(name)

    for name in TOKEN_FIELDS:
        expect(torch.equal(getattr(child, name), getattr(parent, name)[start:end]), name)
    for name in SEQ_FIELDS:
        expect(torch.equal(getattr(child, name), getattr(parent, name)[first:last]), name)
    for name in SHARED_FIELDS:
        expect(getattr(child, name) is getattr(parent, name), name)
    for name, attribute in SPEC_CHILD_FIELDS.items():
        value = getattr(child, name)
        got = value if name == "extend_num_tokens" else _as_tuple(value)
        expect(got == want[attribute], name)
    expect(child.batch_size == last - first, "batch_size")
    expect(child.num_token_non_padded == non_padded, "num_token_non_padded")
    expect(child.tbo_parent_token_range == (start, end), "tbo_parent_token_range")
    expect(child.tbo_children is None, "tbo_children")
    expect(child.tbo_split_seq_index is None, "tbo_split_seq_index")
    if parent.spec_info is None:
        expect(child.spec_info is None, "spec_info")
        return wrong
    verify, parent_verify = child.spec_info, parent.spec_info
    for name in VERIFY_TOKEN_FIELDS:
        expect(torch.equal(getattr(verify, name), getattr(parent_verify, name)[start:end]),
               f"spec_info.{name}")
    expect(torch.equal(verify.retrieve_index, parent_verify.retrieve_index[first:last]),
           "spec_info.retrieve_index")
    expect(parent_verify.custom_mask_offsets is None and verify.custom_mask_offsets is None,
           "spec_info.custom_mask_offsets")
    expect(verify.draft_token_num == parent_verify.draft_token_num, "spec_info.draft_token_num")
    lo, hi = _mask_range(parent.seq_lens_cpu.tolist(), parent_verify.draft_token_num,
                         (first, last))
    expect(torch.equal(verify.custom_mask, parent_verify.custom_mask[lo:hi]),
           "spec_info.custom_mask")
    return wrong


def preparer_mismatches(case: SplitCase, spec_results: Optional[dict] = None) -> list:
    """What TboForwardBatchPreparer's children get wrong against the spec (empty if nothing).
    ``spec_results``: ``side_results(spec, case)`` when the caller has it already."""
    parent = make_forward_batch(case)
    prepared = TboForwardBatchPreparer(threshold=case.threshold).prepare(parent)
    # the JAX spec is the oracle
    results = side_results(spec, case) if spec_results is None else spec_results
    wrong = []
    if prepared.tbo_split_seq_index != results["split_seq_index"]:
        wrong.append("parent.tbo_split_seq_index")
    for label, child, want, count in zip("AB", prepared.tbo_children, results["children"],
                                         results["children_num_token_non_padded"]):
        wrong += [f"child {label}: {name}" for name in child_mismatches(parent, child, want,
                                                                        count)]
    return wrong
