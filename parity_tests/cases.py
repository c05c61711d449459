"""Random batches for parity runs (numpy only, so the CLI needs no test dependencies).

Shapes are skewed on purpose: a quarter of EXTEND batches hide one huge request among tiny
ones, some have a single request, some are all ones; DECODE and TARGET_VERIFY batches include
batch size 0 and 1.
"""

from __future__ import annotations

import numpy as np

from tbo_parity.parity_tests.split_parity import SplitCase

MODES = ("EXTEND", "DECODE", "TARGET_VERIFY", "IDLE")


def _extend_lens(rng: np.random.Generator) -> list:
    shape = rng.integers(5)
    bs = int(rng.integers(1, 40))
    if shape == 0:  # one request
        return [int(rng.integers(1, 5000))]
    if shape == 1:  # one huge request among tiny ones
        lens = rng.integers(1, 8, size=bs).tolist()
        lens[int(rng.integers(bs))] = int(rng.integers(500, 20000))
        return lens
    if shape == 2:  # all ones
        return [1] * bs
    if shape == 3:  # heavy tailed
        return (rng.geometric(0.01, size=bs)).astype(int).tolist()
    return rng.integers(1, 300, size=bs).tolist()


def random_case(rng: np.random.Generator, mode: str) -> SplitCase:
    """One valid batch of the given mode."""
    threshold = float(rng.choice([0.48, 0.5, 0.3, 0.1, float(rng.uniform(0.01, 0.5))]))
    if mode == "EXTEND":
        lens = _extend_lens(rng)
        prefix = [int(p) for p in rng.integers(0, 100, size=len(lens)) * rng.integers(2)]
        seq_lens = tuple(p + n for p, n in zip(prefix, lens))
        case = SplitCase("EXTEND", seq_lens, tuple(lens), tuple(prefix), threshold=threshold)
    elif mode == "IDLE":
        case = SplitCase("IDLE", (), threshold=threshold)
    else:
        bs = int(rng.choice([0, 1, 2, 3, int(rng.integers(1, 300))]))
        draft = int(rng.integers(1, 9)) if mode == "TARGET_VERIFY" else None
        seq_lens = tuple(int(s) for s in rng.integers(1, 2000, size=bs))
        case = SplitCase(mode, seq_lens, draft_token_num=draft, threshold=threshold)
    padding = int(rng.integers(0, 8))
    non_padded = max(0, case.num_tokens - padding) if rng.integers(2) else None
    return SplitCase(**{**case.__dict__, "num_token_non_padded": non_padded})


def random_cases(seed: int, mode: str, count: int) -> list:
    rng = np.random.default_rng([seed, MODES.index(mode)])
    return [random_case(rng, mode) for _ in range(count)]
