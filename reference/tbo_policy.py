"""When to turn two-batch overlap on: the crossover policy (docs/spec.md, "When to overlap").

Splitting a step into two micro-batches costs something whatever the communication: each
micro-batch reads every expert's weights again and launches its own kernels. The overlap only
pays once there is enough communication to hide, that is enough tokens per rank. The policy is
a threshold on the step's tokens per rank, one for the decode layout (DECODE, TARGET_VERIFY)
and one for the prefill layout (EXTEND); ``None`` means never. An IDLE step never overlaps on
its own account (under data parallelism an idle rank follows the others).

The defaults are the crossover measured by ``benchmarks/overlap.py`` on 2 x H200 (NVLink) for
this project's DeepSeek-V3 MoE slice (docs/overlap-benchmark.md): decode gained only from 1024
tokens per rank (of 32 to 1024, with either transport); prefill lost at 1024 and at 4096
tokens per rank, so it stays off. A different model, card or link moves the crossover: measure
and pass your own thresholds.

Under data parallelism every rank must decide alike (docs/spec.md, "Data-parallel
agreement"): pass the tokens of the largest rank's step.

``tbo_enabled`` is pure and jit/vmap-able over ``num_tokens`` (the mode and thresholds are
static). The PyTorch twin is ``torch_impl/tbo_policy.py``.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from reference.split import ForwardMode, _as_forward_mode, _check_count

DECODE_MIN_TOKENS: Optional[int] = 1024
PREFILL_MIN_TOKENS: Optional[int] = None


def _check_threshold(name: str, value) -> Optional[int]:
    return None if value is None else _check_count(name, value, minimum=1)


def _is_concrete(x) -> bool:
    try:
        int(x)
    except Exception:  # a tracer under jit/vmap: checked by the caller's concrete values
        return False
    return True


def tbo_enabled(forward_mode, num_tokens, *, min_decode_tokens=DECODE_MIN_TOKENS,
                min_prefill_tokens=PREFILL_MIN_TOKENS):
    """Whether a step of ``num_tokens`` tokens per rank runs two-batch overlap: a bool array
    (0-dim, or the shape of a vmapped ``num_tokens``)."""
    mode = _as_forward_mode("forward_mode", forward_mode)
    if mode not in (ForwardMode.EXTEND, ForwardMode.DECODE, ForwardMode.TARGET_VERIFY,
                    ForwardMode.IDLE):
        raise ValueError(f"forward_mode {mode.name} is not supported by two-batch overlap")
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
