"""The stand-ins the lifted functions run among instead of SGLang: a ``ForwardMode`` for a
source that has none, the server arguments (the two-chunk threshold the release reads through
a getter), the speculative-decoding input, and the namespace that holds them.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import logging
import re
import types
from typing import Optional

class StandInForwardMode(enum.IntEnum):
    """Used when the source has no ForwardMode of its own (a lone .py file): the modes and
    predicates the split functions call, with SGLang's meaning (TARGET_VERIFY and MIXED are
    extend modes)."""

    EXTEND = 1
    DECODE = 2
    MIXED = 3
    IDLE = 4
    TARGET_VERIFY = 5
    DRAFT_EXTEND = 6
    PREBUILT = 7

    def is_extend(self, *_, **__):
        return self in (self.EXTEND, self.MIXED, self.DRAFT_EXTEND, self.TARGET_VERIFY)

    def is_decode(self):
        return self is self.DECODE

    def is_mixed(self):
        return self is self.MIXED

    def is_idle(self):
        return self is self.IDLE

    def is_target_verify(self):
        return self is self.TARGET_VERIFY

    def is_prebuilt(self):
        return self is self.PREBUILT

    def is_decode_or_idle(self):
        return self in (self.DECODE, self.IDLE)


class Settings:
    """The stand-in server arguments of one loaded release; the comparison sets ``threshold``
    before each call (the two-chunk threshold the release reads through a getter)."""

    device = "cpu"
    enable_two_batch_overlap = True

    def __init__(self):
        self.threshold = 0.48

    @property
    def tbo_token_distribution_threshold(self):
        return self.threshold

    def __getitem__(self, key):  # the older dict form, global_server_args_dict["..."]
        return getattr(self, key)


@dataclasses.dataclass(frozen=True)
class SpecInfo:
    """Stand-in for the speculative-decoding input the functions read."""

    draft_token_num: Optional[int] = None
    seq_lens_cpu: object = None


def stand_in_namespace(forward_mode, settings: Settings, module_text: str) -> dict:
    """The namespace the lifted functions run in: stand-ins for what they reach outside."""
    device = types.SimpleNamespace(device="cpu")
    namespace = {
        "__builtins__": builtins, "__name__": "sglang_split_rules",
        "ForwardMode": forward_mode,
        "get_tbo_token_distribution_threshold": lambda: settings.threshold,
        "global_server_args_dict": settings, "get_global_server_args": lambda: settings,
        "get_server_args": lambda: settings, "get_device": lambda: device,
        "logger": logging.getLogger("tbo_parity.upstream"), "_tbo_debug": False,
    }
    if re.search(r"\btorch\.", module_text):
        import torch

        namespace["torch"] = torch
    if re.search(r"\bnp\.", module_text):
        import numpy

        namespace["np"] = numpy
    return namespace
