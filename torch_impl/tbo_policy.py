"""When to turn two-batch overlap on (docs/spec.md, "When to overlap"): the PyTorch twin of
``reference/tbo_policy.py``.

A threshold on the step's tokens per rank, one for the decode layout (DECODE, TARGET_VERIFY)
and one for the prefill layout (EXTEND); ``None`` means never; IDLE never overlaps on its own
account. The default thresholds are per link class (``link``, one of ``LINKS``), in
``DEFAULT_THRESHOLDS``:

- ``"nvlink"`` (the default): the GPUs of one host over NVLink. The crossovers
  ``benchmarks/overlap.py`` measured on 2 x H200 for the project's DeepSeek-V3 MoE slice
  (docs/overlap-benchmark.md): decode from 1024 tokens per rank, prefill from 16384 (it lost
  at 1024 and 4096).
- ``"network"``: one network-class link per GPU (a 400 Gb/s NIC, or NCCL with peer-to-peer
  access off, through host memory: about 23 GB/s measured on 2 x H200, against NVLink's
  204): more to hide, so TBO pays from fewer tokens. Measured: decode from 128 tokens per rank
  (it lost at 32), prefill from 1024.

A threshold passed explicitly (``None`` for never) overrides the link's default. Under data
parallelism pass the largest rank's tokens, so that every rank decides alike, and feed the
answer to ``compute_dp_tbo_decision``.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping, Optional

from tbo_parity.torch_impl.forward_mode import ForwardMode
from tbo_parity.torch_impl.split_rules import check_count, check_mode, describe


def _check_threshold(name: str, value) -> Optional[int]:
    return None if value is None else check_count(name, value, 1)


@dataclasses.dataclass(frozen=True)
class LinkThresholds:
    """A link's default thresholds in tokens per rank, inclusive; ``None``: never."""

    min_decode_tokens: Optional[int]
    min_prefill_tokens: Optional[int]

    def __post_init__(self):
        for field in ("min_decode_tokens", "min_prefill_tokens"):
            object.__setattr__(self, field, _check_threshold(field, getattr(self, field)))


# The default thresholds of each link class: the one place to change them.
DEFAULT_THRESHOLDS: Mapping[str, LinkThresholds] = types.MappingProxyType({
    # measured: the 2 x H200 crossovers of docs/overlap-benchmark.md (context 2048 and 8192)
    "nvlink": LinkThresholds(min_decode_tokens=1024, min_prefill_tokens=16384),
    "network": LinkThresholds(min_decode_tokens=128, min_prefill_tokens=1024),
})
LINKS = tuple(DEFAULT_THRESHOLDS)
DEFAULT_LINK = "nvlink"
DECODE_MIN_TOKENS: Optional[int] = DEFAULT_THRESHOLDS[DEFAULT_LINK].min_decode_tokens
PREFILL_MIN_TOKENS: Optional[int] = DEFAULT_THRESHOLDS[DEFAULT_LINK].min_prefill_tokens


class _LinkDefault:
    """The default of a threshold argument: take the link's (``DEFAULT_THRESHOLDS``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<the link's default>"


_LINK_DEFAULT = _LinkDefault()


def link_thresholds(link) -> LinkThresholds:
    """The default thresholds of ``link``, one of ``LINKS``."""
    if not (isinstance(link, str) and link in DEFAULT_THRESHOLDS):
        raise ValueError(f"link must be one of {LINKS}, got {describe(link)}")
    return DEFAULT_THRESHOLDS[link]


def tbo_enabled(forward_mode, num_tokens, *, link=DEFAULT_LINK, min_decode_tokens=_LINK_DEFAULT,
                min_prefill_tokens=_LINK_DEFAULT) -> bool:
    """Whether a step of ``num_tokens`` tokens per rank, over ``link``, runs two-batch overlap.
    A threshold not passed is the link's default; ``None`` means never."""
    defaults = link_thresholds(link)
    mode = check_mode(forward_mode)
    if min_decode_tokens is _LINK_DEFAULT:
        min_decode_tokens = defaults.min_decode_tokens
    if min_prefill_tokens is _LINK_DEFAULT:
        min_prefill_tokens = defaults.min_prefill_tokens
    decode = _check_threshold("min_decode_tokens", min_decode_tokens)
    prefill = _check_threshold("min_prefill_tokens", min_prefill_tokens)
    tokens = check_count("num_tokens", num_tokens)
    threshold = {ForwardMode.EXTEND: prefill, ForwardMode.DECODE: decode,
                 ForwardMode.TARGET_VERIFY: decode, ForwardMode.IDLE: None}[mode]
    return threshold is not None and tokens >= threshold
