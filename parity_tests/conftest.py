"""Hypothesis profiles. "default" is what CI runs (2,000 examples per test, unless a test sets
fewer and says why: 2,000 EXTEND batches for the split properties, 1,000 per uniform mode, whose
every batch size the exhaustive check covers); "quick" is for local iteration:
HYPOTHESIS_PROFILE=quick pytest."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=2000, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("quick", parent=settings.get_profile("default"), max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
