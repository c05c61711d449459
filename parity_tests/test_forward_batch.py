"""TboForwardBatchPreparer builds the children the spec derives, field by field.

The property over generated batches of every mode runs in test_split_parity.py
(``test_every_split_property_holds_on_*``): each generated batch is split once by the spec, and
those results are the oracle of both the split parity and the preparer's children, so neither
the batch nor the spec's split is computed twice. Here: every field is covered by that
comparison, named scenarios, and the comparison's teeth.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tbo_parity.parity_tests.split_parity import (OTHER_FIELDS, SEQ_FIELDS, SHARED_FIELDS,
                                                  SPEC_CHILD_FIELDS, TOKEN_FIELDS,
                                                  VERIFY_TOKEN_FIELDS, SplitCase,
                                                  make_forward_batch, preparer_mismatches)
from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
from tbo_parity.torch_impl.forward_batch import ForwardBatch, VerifyInput


def test_every_field_is_checked():
    checked = TOKEN_FIELDS | SEQ_FIELDS | SHARED_FIELDS | set(SPEC_CHILD_FIELDS) | OTHER_FIELDS
    assert {f.name for f in dataclasses.fields(ForwardBatch)} == checked
    assert {f.name for f in dataclasses.fields(VerifyInput)} == VERIFY_TOKEN_FIELDS | {
        "draft_token_num", "custom_mask", "custom_mask_offsets", "retrieve_index"}


def test_verify_masks_follow_the_per_sequence_offsets():
    case = SplitCase("TARGET_VERIFY", (10, 20, 30, 40), draft_token_num=3)
    parent = make_forward_batch(case)
    a, b = TboForwardBatchPreparer().prepare(parent).tbo_children
    mask = parent.spec_info.custom_mask
    assert mask.shape == (336,)
    assert torch.equal(a.spec_info.custom_mask, mask[:108])  # (10+3)*3 + (20+3)*3
    assert torch.equal(b.spec_info.custom_mask, mask[108:])


def test_two_chunk_children_share_the_straddling_request():
    parent = make_forward_batch(SplitCase("EXTEND", (100, 2000), (100, 2000), (0, 0)))
    a, b = TboForwardBatchPreparer().prepare(parent).tbo_children
    assert a.req_pool_indices[-1] == b.req_pool_indices[0] == parent.req_pool_indices[1]
    assert a.input_ids.shape[0] == b.input_ids.shape[0] == 1050


def test_field_without_a_split_kind_is_an_error_naming_it():
    @dataclasses.dataclass
    class BatchWithExtraField(ForwardBatch):
        sampling_temperature: float = 1.0  # no split declared

    base = make_forward_batch(SplitCase("DECODE", (5, 6)))
    batch = BatchWithExtraField(**{f.name: getattr(base, f.name)
                                   for f in dataclasses.fields(ForwardBatch)})
    with pytest.raises(ValueError, match="sampling_temperature"):
        TboForwardBatchPreparer().prepare(batch)


def test_token_field_of_the_wrong_length_is_an_error_naming_it():
    batch = make_forward_batch(SplitCase("DECODE", (5, 6, 7)))
    batch.out_cache_loc = batch.out_cache_loc[:2]
    with pytest.raises(ValueError, match="out_cache_loc"):
        TboForwardBatchPreparer().prepare(batch)


def test_batch_whose_tokens_disagree_with_its_lengths_is_rejected():
    batch = make_forward_batch(SplitCase("EXTEND", (4, 4), (4, 4), (0, 0)))
    batch.input_ids = batch.input_ids[:7]
    with pytest.raises(ValueError, match="input_ids"):
        TboForwardBatchPreparer().prepare(batch)


def test_preparer_rejects_a_bad_threshold():
    batch = make_forward_batch(SplitCase("DECODE", (5, 6)))
    with pytest.raises(ValueError, match="threshold"):
        TboForwardBatchPreparer(threshold=0.7).prepare(batch)


def test_parity_check_catches_a_preparer_that_swaps_the_children(monkeypatch):
    original = TboForwardBatchPreparer.prepare

    def swapped(self, batch):
        prepared = original(self, batch)
        a, b = prepared.tbo_children
        return dataclasses.replace(prepared, tbo_children=(b, a))

    monkeypatch.setattr(TboForwardBatchPreparer, "prepare", swapped)
    case = SplitCase("EXTEND", (100, 2000), (100, 2000), (0, 0))
    assert "child A: input_ids" in preparer_mismatches(case)


def test_parity_check_catches_children_that_count_padding_as_real(monkeypatch):
    from tbo_parity.torch_impl import batch_splitter

    monkeypatch.setattr(batch_splitter.tbo, "compute_children_num_token_non_padded",
                        lambda split, real: (split, real))
    case = SplitCase("DECODE", (5, 6, 7, 8), num_token_non_padded=3)
    assert "child B: num_token_non_padded" in preparer_mismatches(case)
