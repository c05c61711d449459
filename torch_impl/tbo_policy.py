"""When to turn two-batch overlap on (docs/spec.md, "When to overlap"): the PyTorch twin of
``reference/tbo_policy.py``.

A threshold on the step's tokens per rank, one for the decode layout (DECODE, TARGET_VERIFY)
and one for the prefill layout (EXTEND); ``None`` means never; IDLE never overlaps on its own
account. The defaults are the crossover ``benchmarks/overlap.py`` measured on 2 x H200 for the
project's DeepSeek-V3 MoE slice (docs/overlap-benchmark.md): decode from 1024 tokens per rank,
prefill off (it lost at 1024 and 4096). Under data parallelism pass the largest rank's tokens,
so that every rank decides alike, and feed the answer to ``compute_dp_tbo_decision``.
"""

from __future__ import annotations

from typing import Optional

from torch_impl.forward_mode import ForwardMode
from torch_impl.split_rules import check_count, check_mode

DECODE_MIN_TOKENS: Optional[int] = 1024
PREFILL_MIN_TOKENS: Optional[int] = None


def _check_threshold(name: str, value) -> Optional[int]:
    return None if value is None else check_count(name, value, 1)


def tbo_enabled(forward_mode, num_tokens, *, min_decode_tokens=DECODE_MIN_TOKENS,
                min_prefill_tokens=PREFILL_MIN_TOKENS) -> bool:
    """Whether a step of ``num_tokens`` tokens per rank runs two-batch overlap."""
    mode = check_mode(forward_mode)
    decode = _check_threshold("min_decode_tokens", min_decode_tokens)
    prefill = _check_threshold("min_prefill_tokens", min_prefill_tokens)
    tokens = check_count("num_tokens", num_tokens)
    threshold = {ForwardMode.EXTEND: prefill, ForwardMode.DECODE: decode,
                 ForwardMode.TARGET_VERIFY: decode, ForwardMode.IDLE: None}[mode]
    return threshold is not None and tokens >= threshold
