"""The crossover policy: spec and implementation agree, at every boundary and everywhere, for
every link class; the link's defaults apply unless a threshold is passed; an unknown link is
refused alike; the nvlink defaults are the crossover the benchmark recorded
(docs/overlap-benchmark.json); and docs/spec.md's "When to overlap" table holds on both sides."""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tbo_parity.reference import tbo_policy as spec
from tbo_parity.reference.split import ForwardMode as SpecMode
from tbo_parity.torch_impl import tbo_policy as impl
from tbo_parity.torch_impl.forward_mode import ForwardMode as ImplMode

MODES = ("EXTEND", "DECODE", "TARGET_VERIFY", "IDLE")
MAX_COUNT = 2**31 - 1
ROOT = pathlib.Path(__file__).resolve().parent.parent
RECORD = ROOT / "docs" / "overlap-benchmark.json"
KEYS = {"EXTEND": "min_prefill_tokens", "DECODE": "min_decode_tokens",
        "TARGET_VERIFY": "min_decode_tokens"}


class _Unset:
    """The tests' own marker: leave the argument out of the call."""

    def __repr__(self):
        return "UNSET"


UNSET = _Unset()


def both(mode, tokens, **kwargs):
    """Both sides' answers, arguments given as ``UNSET`` left out."""
    kwargs = {k: v for k, v in kwargs.items() if v is not UNSET}
    a = spec.tbo_enabled(SpecMode[mode], tokens, **kwargs)
    assert a.dtype == jnp.bool_ and a.shape == ()
    b = impl.tbo_enabled(ImplMode[mode], tokens, **kwargs)
    assert isinstance(b, bool)
    return bool(a), b


def defaults_of(link) -> tuple:
    """(decode, prefill) default thresholds of a link, as the spec states them."""
    table = spec.DEFAULT_THRESHOLDS[spec.DEFAULT_LINK if link is UNSET else link]
    return table.min_decode_tokens, table.min_prefill_tokens


# --- the two tables ------------------------------------------------------------------------------


def test_both_sides_hold_the_same_link_table():
    assert spec.LINKS == impl.LINKS == ("nvlink", "network")
    assert spec.DEFAULT_LINK == impl.DEFAULT_LINK == "nvlink"
    assert list(spec.DEFAULT_THRESHOLDS) == list(impl.DEFAULT_THRESHOLDS) == list(spec.LINKS)
    for link in spec.LINKS:
        ours, theirs = spec.DEFAULT_THRESHOLDS[link], impl.DEFAULT_THRESHOLDS[link]
        assert dataclasses.asdict(ours) == dataclasses.asdict(theirs), link
        assert spec.link_thresholds(link) is ours and impl.link_thresholds(link) is theirs
    assert (spec.DECODE_MIN_TOKENS, spec.PREFILL_MIN_TOKENS) == defaults_of("nvlink")
    assert (impl.DECODE_MIN_TOKENS, impl.PREFILL_MIN_TOKENS) == defaults_of("nvlink")


def test_network_overlaps_from_fewer_tokens_than_nvlink():
    """The slower link has more to hide: both layouts overlap from fewer tokens there."""
    nvlink, network = defaults_of("nvlink"), defaults_of("network")
    assert None not in nvlink + network
    assert network[0] < nvlink[0] and network[1] < nvlink[1]


@pytest.mark.parametrize("side", [spec, impl], ids=["spec", "impl"])
def test_the_link_table_is_immutable(side):
    with pytest.raises(TypeError):
        side.DEFAULT_THRESHOLDS["nvlink"] = side.LinkThresholds(1, 1)
    with pytest.raises(TypeError):
        side.DEFAULT_THRESHOLDS["pcie"] = side.LinkThresholds(1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        side.DEFAULT_THRESHOLDS["network"].min_decode_tokens = 1
    assert "pcie" not in side.DEFAULT_THRESHOLDS and len(side.DEFAULT_THRESHOLDS) == 2


@pytest.mark.parametrize("side", [spec, impl], ids=["spec", "impl"])
def test_link_thresholds_are_checked_and_normalised(side):
    got = side.LinkThresholds(np.int64(7), None)
    assert got.min_decode_tokens == 7 and type(got.min_decode_tokens) is int
    assert got.min_prefill_tokens is None
    with pytest.raises(ValueError, match=r"^min_decode_tokens must be an int >= 1, got 0"):
        side.LinkThresholds(0, None)
    with pytest.raises(ValueError, match=r"^min_prefill_tokens\b"):
        side.LinkThresholds(None, 1.5)


def test_the_public_functions_have_the_same_parameters_on_both_sides():
    def parameters(fn):
        return [(p.name, p.kind.name, repr(p.default))
                for p in inspect.signature(fn).parameters.values()]

    for name in ("tbo_enabled", "link_thresholds"):
        assert parameters(getattr(spec, name)) == parameters(getattr(impl, name)), name
    link = inspect.signature(spec.tbo_enabled).parameters["link"]
    assert link.kind is inspect.Parameter.KEYWORD_ONLY and link.default == "nvlink"


# --- agreement -----------------------------------------------------------------------------------


thresholds = st.one_of(st.none(), st.integers(1, MAX_COUNT))
maybe = st.one_of(st.just(UNSET), thresholds)


@settings(max_examples=500)
@given(mode=st.sampled_from(MODES), tokens=st.integers(0, MAX_COUNT), decode=maybe,
       prefill=maybe, link=st.sampled_from((UNSET, "nvlink", "network")))
def test_spec_and_implementation_agree(mode, tokens, decode, prefill, link):
    a, b = both(mode, tokens, link=link, min_decode_tokens=decode, min_prefill_tokens=prefill)
    assert a == b
    link_decode, link_prefill = defaults_of(link)
    decode = link_decode if decode is UNSET else decode
    prefill = link_prefill if prefill is UNSET else prefill
    threshold = {"EXTEND": prefill, "DECODE": decode, "TARGET_VERIFY": decode,
                 "IDLE": None}[mode]
    assert a == (threshold is not None and tokens >= threshold)


@settings(max_examples=300)
@given(mode=st.sampled_from(MODES), tokens=st.integers(0, 1 << 16))
def test_leaving_the_link_out_is_nvlink(mode, tokens):
    assert both(mode, tokens) == both(mode, tokens, link="nvlink")
    decode, prefill = defaults_of("nvlink")
    assert both(mode, tokens) == both(mode, tokens, min_decode_tokens=decode,
                                      min_prefill_tokens=prefill)


@pytest.mark.parametrize("mode", ["EXTEND", "DECODE", "TARGET_VERIFY"])
@pytest.mark.parametrize("threshold", [1, 2, 32, 1024, MAX_COUNT])
@pytest.mark.parametrize("link", [UNSET, "nvlink", "network"])
def test_threshold_is_inclusive_on_both_sides(mode, threshold, link):
    key = KEYS[mode]
    assert both(mode, threshold - 1, link=link, **{key: threshold}) == (False, False)
    assert both(mode, threshold, link=link, **{key: threshold}) == (True, True)


@pytest.mark.parametrize("mode", ["EXTEND", "DECODE", "TARGET_VERIFY"])
@pytest.mark.parametrize("link", ["nvlink", "network"])
def test_each_links_default_boundary_on_both_sides(mode, link):
    """Either side of each link's own default, with no threshold passed; a default of None
    never overlaps, not even at the largest count."""
    threshold = dict(zip(("min_decode_tokens", "min_prefill_tokens"), defaults_of(link)))[
        KEYS[mode]]
    if threshold is None:
        for tokens in (0, 1, 1024, 4096, MAX_COUNT):
            assert both(mode, tokens, link=link) == (False, False)
        return
    for tokens, want in ((0, False), (threshold - 2, False), (threshold - 1, False),
                         (threshold, True), (threshold + 1, True), (MAX_COUNT, True)):
        assert both(mode, tokens, link=link) == (want, want), tokens


def test_a_passed_threshold_overrides_the_links_default_and_only_its_own():
    net_decode, net_prefill = defaults_of("network")
    # a larger decode threshold than the network's: the network default no longer applies
    assert both("DECODE", net_decode, link="network",
                min_decode_tokens=net_decode + 1) == (False, False)
    assert both("DECODE", net_decode + 1, link="network",
                min_decode_tokens=net_decode + 1) == (True, True)
    # a smaller one than nvlink's
    assert both("TARGET_VERIFY", 32, link="nvlink", min_decode_tokens=32) == (True, True)
    assert both("TARGET_VERIFY", 32, link="nvlink") == (False, False)
    # None passed means never, whatever the link's default
    for tokens in (net_decode, net_prefill, MAX_COUNT):
        assert both("DECODE", tokens, link="network", min_decode_tokens=None) == (False, False)
        assert both("EXTEND", tokens, link="network", min_prefill_tokens=None) == (False, False)
    # prefill on over nvlink, where its default is never
    assert both("EXTEND", 512, link="nvlink", min_prefill_tokens=512) == (True, True)
    # overriding one layout leaves the other at the link's default
    assert both("DECODE", net_decode, link="network", min_prefill_tokens=None) == (True, True)
    assert both("DECODE", net_decode - 1, link="network",
                min_prefill_tokens=1) == (False, False)
    assert both("EXTEND", net_prefill, link="network", min_decode_tokens=None) == (True, True)
    assert both("EXTEND", net_prefill - 1, link="network",
                min_decode_tokens=1) == (False, False)


@pytest.mark.parametrize("tokens", [0, 1, 1024, MAX_COUNT])
@pytest.mark.parametrize("link", [UNSET, "nvlink", "network"])
def test_idle_and_none_never_overlap(tokens, link):
    assert both("IDLE", tokens, link=link, min_decode_tokens=1,
                min_prefill_tokens=1) == (False, False)
    assert both("IDLE", tokens, link=link) == (False, False)
    assert both("DECODE", tokens, link=link, min_decode_tokens=None) == (False, False)
    assert both("EXTEND", tokens, link=link, min_prefill_tokens=None) == (False, False)


def _first_win(rows: list):
    """The smallest measured token count from which TBO beat the plain step at every larger
    measured count (None: it never did)."""
    rows = sorted(rows, key=lambda r: r["tokens"])
    wins = [r["speedup"] > 1.0 for r in rows]
    return next((rows[i]["tokens"] for i in range(len(rows)) if all(wins[i:])), None)


def _recorded_crossovers(record: dict, link: str) -> tuple:
    """(decode, prefill) of the record for ``link``: the smallest first win over its decode
    runs (per context and transport) and over its prefill runs (per transport, the silent
    transport left out: it moves nothing)."""
    decode = [r for r in record["decode"] if r["link"] == link]
    prefill = [r for r in record["prefill"] if r["link"] == link and r["transport"] != "none"]

    def best(rows, key):
        firsts = [_first_win([r for r in rows if key(r) == k]) for k in {key(r) for r in rows}]
        return min((f for f in firsts if f is not None), default=None)

    return (best(decode, lambda r: (r["context"], r["transport"])),
            best(prefill, lambda r: r["transport"]))


@pytest.mark.parametrize("link", ["nvlink", "network"])
def test_defaults_are_the_recorded_crossovers(link):
    """Each link's defaults are the crossovers docs/overlap-benchmark.json recorded for it,
    so a new measurement cannot leave the policy behind."""
    record = json.loads(RECORD.read_text())
    assert any(r["link"] == link for r in record["decode"])
    assert _recorded_crossovers(record, link) == defaults_of(link)


def test_network_decode_default_keeps_tbo_off_where_it_lost():
    """At 32 tokens per rank TBO lost over the network link: the policy keeps it off there."""
    record = json.loads(RECORD.read_text())
    lost = [r["tokens"] for r in record["decode"] if r["link"] == "network"
            and r["speedup"] < 1.0]
    assert lost and all(both("DECODE", t, link="network") == (False, False) for t in lost)


# --- jit and vmap (the spec) ---------------------------------------------------------------------


def test_spec_vmaps_over_token_counts():
    tokens = jnp.asarray([0, 31, 32, 1023, 1024, 5000], dtype=jnp.int32)
    got = jax.vmap(lambda t: spec.tbo_enabled(SpecMode.DECODE, t, min_decode_tokens=32))(tokens)
    assert np.asarray(got).tolist() == [False, False, True, True, True, True]
    assert got.dtype == jnp.bool_
    idle = jax.vmap(lambda t: spec.tbo_enabled(SpecMode.IDLE, t))(tokens)  # never, as bools
    assert idle.dtype == jnp.bool_ and idle.shape == tokens.shape and not idle.any()
    jitted = jax.jit(lambda t: spec.tbo_enabled(SpecMode.EXTEND, t, min_prefill_tokens=1024))
    assert np.asarray(jax.vmap(jitted)(tokens)).tolist() == [False] * 4 + [True] * 2


@pytest.mark.parametrize("mode", ["EXTEND", "DECODE", "TARGET_VERIFY", "IDLE"])
@pytest.mark.parametrize("link", ["nvlink", "network"])
def test_spec_vmaps_over_token_counts_with_a_link(mode, link):
    """vmapped and jitted over the tokens, the link static: each element is the scalar answer
    of both sides, and the answers change where the link's default says."""
    counts = [0, 1, 255, 256, 257, 1023, 1024, 1025, 4095, 4096, 4097, MAX_COUNT]
    tokens = jnp.asarray(counts, dtype=jnp.int32)
    vmapped = jax.vmap(lambda t: spec.tbo_enabled(SpecMode[mode], t, link=link))(tokens)
    jitted = jax.jit(spec.tbo_enabled, static_argnames=("forward_mode", "link"))
    batched = jax.vmap(lambda t: jitted(SpecMode[mode], t, link=link))(tokens)
    want = [impl.tbo_enabled(ImplMode[mode], c, link=link) for c in counts]
    assert vmapped.dtype == batched.dtype == jnp.bool_ and vmapped.shape == (len(counts),)
    assert np.asarray(vmapped).tolist() == np.asarray(batched).tolist() == want
    threshold = 0 if mode == "IDLE" else dict(
        zip(("min_decode_tokens", "min_prefill_tokens"), defaults_of(link)))[KEYS[mode]]
    assert want == [threshold not in (0, None) and c >= threshold for c in counts]


def test_network_and_nvlink_differ_under_vmap():
    tokens = jnp.arange(0, 2048, 16, dtype=jnp.int32)
    net = jax.vmap(lambda t: spec.tbo_enabled(SpecMode.DECODE, t, link="network"))(tokens)
    nv = jax.vmap(lambda t: spec.tbo_enabled(SpecMode.DECODE, t, link="nvlink"))(tokens)
    net, nv = np.asarray(net), np.asarray(nv)
    assert (net >= nv).all() and (net & ~nv).sum() == (1024 - defaults_of("network")[0]) // 16


# --- refusals ------------------------------------------------------------------------------------


BAD_LINKS = ["pcie", "NVLink", "nvlink ", "", None, 0, True, b"nvlink", ["nvlink"],
             ("network",), {"nvlink": 1}, np.str_("infiniband")]


def _refusal(fn) -> str:
    with pytest.raises(ValueError) as caught:
        fn()
    return str(caught.value)


@pytest.mark.parametrize("link", BAD_LINKS, ids=repr)
def test_unknown_link_refused_alike(link):
    """Refused by name with the allowed values, the same message on both sides, before
    anything else is looked at (a bad mode, token count or threshold comes second)."""
    messages = set()
    for side, mode in ((spec, SpecMode), (impl, ImplMode)):
        messages.add(_refusal(lambda: side.tbo_enabled(mode.DECODE, 8, link=link)))
        messages.add(_refusal(lambda: side.link_thresholds(link)))
        messages.add(_refusal(lambda: side.tbo_enabled(mode.MIXED, -1, link=link,
                                                       min_decode_tokens=0)))
        messages.add(_refusal(lambda: side.tbo_enabled("DECODE", 8, link=link)))
    assert len(messages) == 1, messages
    message = messages.pop()
    assert message.startswith("link must be one of ('nvlink', 'network'), got ")
    assert f"got {link!r} of type {type(link).__name__}" in message


def test_a_str_subclass_naming_a_link_is_that_link():
    link = np.str_("network")
    assert spec.link_thresholds(link) is spec.DEFAULT_THRESHOLDS["network"]
    assert impl.link_thresholds(link) is impl.DEFAULT_THRESHOLDS["network"]
    decode = defaults_of("network")[0]
    assert both("DECODE", decode, link=link) == (True, True)
    assert both("DECODE", decode - 1, link=link) == (False, False)


def test_unknown_link_refused_while_tracing():
    traced = jax.jit(lambda t: spec.tbo_enabled(SpecMode.DECODE, t, link="pcie"))
    with pytest.raises(ValueError, match=r"^link must be one of \('nvlink', 'network'\)"):
        traced(jnp.int32(8))


@pytest.mark.parametrize("kwargs,name", [
    ({"num_tokens": -1}, "num_tokens"), ({"num_tokens": 1.5}, "num_tokens"),
    ({"num_tokens": True}, "num_tokens"), ({"num_tokens": MAX_COUNT + 1}, "num_tokens"),
    ({"num_tokens": 8, "min_decode_tokens": 0}, "min_decode_tokens"),
    ({"num_tokens": 8, "min_decode_tokens": 2.0}, "min_decode_tokens"),
    ({"num_tokens": 8, "min_prefill_tokens": -3}, "min_prefill_tokens"),
    ({"num_tokens": 8, "link": "network", "min_prefill_tokens": 0}, "min_prefill_tokens"),
    ({"num_tokens": -1, "link": "network"}, "num_tokens"),
])
def test_bad_input_rejected_alike(kwargs, name):
    tokens = kwargs.pop("num_tokens")
    messages = set()
    for side, mode in ((spec, SpecMode.DECODE), (impl, ImplMode.DECODE)):
        with pytest.raises(ValueError, match=rf"^{name}\b") as caught:  # it starts the message
            side.tbo_enabled(mode, tokens, **kwargs)
        messages.add(str(caught.value))
    assert len(messages) == 1, messages


def test_a_mode_that_is_not_a_forward_mode_is_refused_by_name():
    for side in (spec, impl):
        with pytest.raises(ValueError, match=r"^forward_mode must be a ForwardMode"):
            side.tbo_enabled("DECODE", 8)


def test_unsupported_mode_rejected_alike():
    for side, mode in ((spec, SpecMode.MIXED), (impl, ImplMode.MIXED)):
        for link in ("nvlink", "network"):
            with pytest.raises(ValueError, match="MIXED"):
                side.tbo_enabled(mode, 8, link=link)


# --- the table of docs/spec.md, "When to overlap" ----------------------------------------------


HEADER = ["link", "mode", "tokens per rank", "`min_decode_tokens`", "`min_prefill_tokens`",
          "overlap"]


def _spec_table() -> list:
    text = (ROOT / "docs" / "spec.md").read_text()
    section = text.split("\n## When to overlap\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    assert cells[0] == HEADER
    assert all(set(cell) == {"-"} for cell in cells[1])
    assert all(len(row) == len(HEADER) for row in cells[2:])
    return cells[2:]


def _threshold_cell(cell: str) -> list:
    """``default``: not passed; ``None``: never; ``any``: each of those and 1; else a count."""
    return {"default": [UNSET], "None": [None], "any": [UNSET, None, 1]}.get(cell) or [int(cell)]


def test_the_table_in_the_spec_holds_on_both_sides():
    rows = _spec_table()
    assert len(rows) == 20
    for link, mode, tokens, decode, prefill, expected in rows:
        assert expected in ("yes", "no")
        links = [UNSET, *spec.LINKS] if link == "any" else [link]
        counts = [0, 1, 255, 256, 1024, 4096, MAX_COUNT] if tokens == "any" else [int(tokens)]
        for one_link in links:
            for count in counts:
                for d in _threshold_cell(decode):
                    for p in _threshold_cell(prefill):
                        want = expected == "yes"
                        got = both(mode, count, link=one_link, min_decode_tokens=d,
                                   min_prefill_tokens=p)
                        assert got == (want, want), (one_link, mode, count, d, p)


def test_the_table_in_the_spec_states_every_links_defaults():
    """For each link and layout the table has, with no threshold passed, the rows either side
    of the link's default (or one that does not overlap, where the default is never): the doc
    cannot go on stating defaults the code no longer has."""
    rows = {(link, mode, tokens, expected) for link, mode, tokens, decode, prefill, expected
            in _spec_table() if decode == prefill == "default"}
    assert {link for link, *_ in rows} == set(spec.LINKS)
    for link in spec.LINKS:
        decode, prefill = defaults_of(link)
        for modes, threshold in ((("DECODE", "TARGET_VERIFY"), decode), (("EXTEND",), prefill)):
            found = [mode for mode in modes if (
                {(link, mode, str(threshold - 1), "no"), (link, mode, str(threshold), "yes")}
                <= rows if threshold is not None else
                any(r[:2] == (link, mode) and r[3] == "no" for r in rows))]
            assert found, (link, modes, threshold)
