"""When to turn two-batch overlap on: the crossover policy (docs/spec.md, "When to overlap").

Splitting a step into two micro-batches costs something whatever the communication: each
micro-batch reads every expert's weights again and launches its own kernels. The overlap only
pays once there is enough communication to hide, that is enough tokens per rank. The policy is
a threshold on the step's tokens per rank, one for the decode layout (DECODE, TARGET_VERIFY)
and one for the prefill layout (EXTEND); ``None`` means never. An IDLE step never overlaps on
its own account (under data parallelism an idle rank follows the others).

How much there is to hide depends on the link the expert-parallel exchange crosses, so the
default thresholds are per link class (``link``, one of ``LINKS``), in ``DEFAULT_THRESHOLDS``:

- ``"nvlink"`` (the default): the GPUs of one host over NVLink, about 204 GB/s leaving each
  GPU in an all-to-all between 2 H200s. The defaults are the crossovers
  ``benchmarks/overlap.py`` measured there for this project's DeepSeek-V3 MoE slice at decode
  contexts of 2048 and 8192 (docs/overlap-benchmark.md): decode gained only at 1024 tokens per
  rank (copy engines; NCCL never did), prefill only at 16384 (it lost at 1024 and 4096).
- ``"network"``: one network-class link per GPU (a 400 Gb/s NIC, or NCCL with peer-to-peer
  access off, through host memory: about 23 GB/s measured between the same H200s, nine
  times slower than NVLink). For the same compute there is much more exchange to hide, so
  TBO pays from fewer tokens: measured, decode from 128 tokens per rank (it lost at 32),
  prefill from 1024.

A threshold passed explicitly (``min_decode_tokens``, ``min_prefill_tokens``; ``None`` for
never) overrides the link's default; a different model or card moves the crossover too:
measure and pass your own thresholds.

Under data parallelism every rank must decide alike (docs/spec.md, "Data-parallel
agreement"): pass the tokens of the largest rank's step.

``tbo_enabled`` is pure and jit/vmap-able over ``num_tokens`` (the mode, the link and the
thresholds are static). The PyTorch twin is ``torch_impl/tbo_policy.py``.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping, Optional

import jax.numpy as jnp

from tbo_parity.reference.split import ForwardMode, _as_forward_mode, _check_count, _describe


def _check_threshold(name: str, value) -> Optional[int]:
    return None if value is None else _check_count(name, value, minimum=1)


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
        raise ValueError(f"link must be one of {LINKS}, got {_describe(link)}")
    return DEFAULT_THRESHOLDS[link]


def _is_concrete(x) -> bool:
    try:
        int(x)
    except Exception:  # a tracer under jit/vmap: checked by the caller's concrete values
        return False
    return True


def tbo_enabled(forward_mode, num_tokens, *, link=DEFAULT_LINK, min_decode_tokens=_LINK_DEFAULT,
                min_prefill_tokens=_LINK_DEFAULT):
    """Whether a step of ``num_tokens`` tokens per rank, over ``link``, runs two-batch overlap:
    a bool array (0-dim, or the shape of a vmapped ``num_tokens``). A threshold not passed is
    the link's default; ``None`` means never."""
    defaults = link_thresholds(link)
    mode = _as_forward_mode("forward_mode", forward_mode)
    if mode not in (ForwardMode.EXTEND, ForwardMode.DECODE, ForwardMode.TARGET_VERIFY,
                    ForwardMode.IDLE):
        raise ValueError(f"forward_mode {mode.name} is not supported by two-batch overlap")
    if min_decode_tokens is _LINK_DEFAULT:
        min_decode_tokens = defaults.min_decode_tokens
    if min_prefill_tokens is _LINK_DEFAULT:
        min_prefill_tokens = defaults.min_prefill_tokens
    decode = _check_threshold("min_decode_tokens", min_decode_tokens)
    prefill = _check_threshold("min_prefill_tokens", min_prefill_tokens)
    if _is_concrete(num_tokens):
        _check_count("num_tokens", num_tokens)
    tokens = jnp.asarray(num_tokens)
    threshold = {ForwardMode.EXTEND: prefill, ForwardMode.DECODE: decode,
                 ForwardMode.TARGET_VERIFY: decode, ForwardMode.IDLE: None}[mode]
    if threshold is None:
        return jnp.zeros(tokens.shape, dtype=bool)
    return tokens >= threshold
