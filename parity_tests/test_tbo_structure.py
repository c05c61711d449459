"""Structure the outputs cannot show: how a TBO forward actually ran, and how modules import.

Outputs of a forward are identical wherever a batch is cut, so output parity passes a split
that is valid but not the spec's, or a "TBO" forward that quietly ran one micro-batch. These
tests watch the execution instead: the overlapped executor is wrapped so that each stage, as
it starts, records which micro-batch it belongs to and that micro-batch's token counts. A TBO
forward must call the executor once, with two non-empty micro-batches whose token counts are
those of ``reference.split.derive_children`` (real-token counts those of
``compute_children_num_token_non_padded``), stepping their stages in the order
``stage_schedule`` gives. Negative tests show that a wrong cut and a silent fallback to one
micro-batch are caught, while output parity still passes.

The last part checks that ``reference/`` and ``torch_impl/`` import each other's modules
without cycles (parsed with ``ast``, so lazy imports inside functions count too).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
from typing import Callable, Optional

import jax
import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tbo_parity.parity_tests import model_parity as mp
from tbo_parity.reference import model as ref_model
from tbo_parity.reference import operations as ref_ops
from tbo_parity.reference import split as spec
from tbo_parity.torch_impl import operations as torch_ops
from tbo_parity.torch_impl import overlap
from tbo_parity.torch_impl.attention import TboAttnBackend
from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
from tbo_parity.torch_impl.forward_mode import ForwardMode

F32_BOUND = 1e-5
STRUCTURE_CASES = ("decode", "target-verify-chain", "target-verify-tree", "extend-balanced",
                   "extend-two-chunk-prefixed", "extend-skewed", "extend-one-sequence",
                   "extend-empty-piece")
REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("reference", "torch_impl")


@pytest.fixture(scope="module")
def models():
    return mp.make_models(seed=0)


# ---------------------------------------------------------------------------------------------
# Recording what the overlapped executor runs.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageRun:
    """One stage as it started: micro-batch ("a"/"b"), stage index, the micro-batch's tokens
    and real (non-padding) tokens (None where not known at trace time)."""

    who: str
    stage: int
    num_tokens: int
    num_real: Optional[int]


@dataclasses.dataclass
class OverlapRun:
    """One call of the overlapped executor."""

    num_stages: int
    delta_stages: int
    steps: list


@dataclasses.dataclass(frozen=True)
class Side:
    """What the recorder needs of one side: its stage cutter, yield marker, and how to read a
    micro-batch's (tokens, real tokens) off its state."""

    split_stages: Callable
    yield_op: type
    counts: Callable


def _torch_counts(state) -> tuple:
    batch = state.forward_batch
    return batch.num_tokens, batch.num_real_tokens


def _jax_counts(state) -> tuple:
    inputs = state.inputs
    try:
        real = int(inputs.num_token_non_padded)
    except jax.errors.ConcretizationTypeError:  # a traced value under jit
        real = None
    return inputs.input_ids.shape[0], real


TORCH = Side(torch_ops.split_stages, torch_ops.YieldOperation, _torch_counts)
JAX = Side(ref_ops.split_stages, ref_ops.YieldOperation, _jax_counts)


def _probe(side: Side, who: str, stage: int, steps: list) -> Callable:
    def probe(state):
        steps.append(StageRun(who, stage, *side.counts(state)))
    return probe


def _probed(side: Side, operations, who: str, steps: list) -> list:
    """The same operations with a recording probe at the start of every stage."""
    probed = []
    for index, stage in enumerate(side.split_stages(operations)):
        probed += [_probe(side, who, index, steps), *stage, side.yield_op()]
    return probed


def recording_executor(side: Side, real: Callable, runs: list) -> Callable:
    """``real`` (an overlapped executor) that appends an ``OverlapRun`` to ``runs`` per call."""
    def executor(states, operations_arr, delta_stages, **kwargs):
        run = OverlapRun(len(side.split_stages(operations_arr[0])), delta_stages, [])
        runs.append(run)
        probed = [_probed(side, ops, who, run.steps) for who, ops in zip("ab", operations_arr)]
        return real(states, probed, delta_stages, **kwargs)
    return executor


# ---------------------------------------------------------------------------------------------
# What the spec says the run must look like, and the check.
# ---------------------------------------------------------------------------------------------


def spec_children(world: mp.World) -> tuple:
    """(A, B) of ``reference.split.derive_children`` for the world's batch."""
    case = world.case
    mode = spec.ForwardMode[case.mode]

    def as_list(x):
        return None if x is None else x.tolist()

    return spec.derive_children(mode, world.seq_lens.tolist(), as_list(world.extend_lens),
                                as_list(world.prefix_lens),
                                spec.token_num_per_seq(mode, case.draft_token_num))


def _num_tokens(child) -> int:
    return child.token_range[1] - child.token_range[0]


def assert_ran_the_spec_split(runs: list, children: tuple, num_real: int, *,
                              num_stages: int, delta_stages: int, check_real: bool = True):
    """The forward overlapped exactly once: two non-empty micro-batches with the children's
    token (and real-token) counts, stepped in ``stage_schedule(num_stages, delta_stages)``
    order, interleaved."""
    assert len(runs) == 1, f"the overlapped executor ran {len(runs)} times, not once"
    run = runs[0]
    assert (run.num_stages, run.delta_stages) == (num_stages, delta_stages)
    order = [(step.who, step.stage) for step in run.steps]
    assert order == ref_ops.stage_schedule(num_stages, delta_stages), order
    first_b = order.index(("b", 0))
    assert any(who == "a" for who, _ in order[first_b:]) or delta_stages == num_stages, \
        "A and B never interleave"
    reals = spec.compute_children_num_token_non_padded(children[0].token_range[1], num_real)
    for who, child, real in zip("ab", children, reals):
        assert _num_tokens(child) > 0, f"the spec's child {who} is empty: nothing to overlap"
        seen = {(step.num_tokens, step.num_real if check_real else None)
                for step in run.steps if step.who == who}
        want = {(_num_tokens(child), real if check_real else None)}
        assert seen == want, f"micro-batch {who} ran (tokens, real tokens) {seen}, spec {want}"


def torch_schedule_shape(model, mode: str) -> tuple:
    """(stages, delta_stages) of the PyTorch model's operations for ``mode``."""
    operations, delta = model.operations(ForwardMode[mode])
    return len(torch_ops.split_stages(operations)), delta


def jax_schedule_shape(cfg, weights, case: mp.ModelCase) -> tuple:
    """(stages, delta_stages) of the JAX spec's operations for the case's mode."""
    operations, delta = ref_ops.model_operations(cfg, weights, case.mode,
                                                 draft_token_num=case.draft_token_num)
    return len(ref_ops.split_stages(operations)), delta


def run_torch_recorded(world, model, monkeypatch) -> tuple:
    """(outputs, runs) of a torch TBO forward with the overlapped executor recorded."""
    runs = []
    monkeypatch.setattr(overlap, "execute_overlapped_operations",
                        recording_executor(TORCH, torch_ops.execute_overlapped_operations, runs))
    return mp.run_torch(world, model, tbo=True), runs


def run_jax_recorded(world, cfg, weights) -> tuple:
    """(outputs, runs) of a JAX TBO forward (jitted: counts are recorded while tracing)."""
    runs = []
    executor = recording_executor(JAX, ref_ops.execute_overlapped_operations, runs)
    return mp.run_jax(world, cfg, weights, tbo=True, executor=executor), runs


def cut_uniform_at(children: tuple, split_seq: int, tokens_per_seq: int) -> tuple:
    """DECODE/TARGET_VERIFY children (either side's type) cut at ``split_seq`` instead: a
    valid split, but not the spec's."""
    a, b = children
    seq_lens = tuple(a.seq_lens) + tuple(b.seq_lens)
    num_seqs, cut = len(seq_lens), split_seq * tokens_per_seq
    return (dataclasses.replace(a, seq_range=(0, split_seq), token_range=(0, cut),
                                seq_lens=seq_lens[:split_seq]),
            dataclasses.replace(b, seq_range=(split_seq, num_seqs),
                                token_range=(cut, num_seqs * tokens_per_seq),
                                seq_lens=seq_lens[split_seq:]))


def _assert_same_outputs(got, want, what):
    errors = mp.relative_errors(got, want)
    assert max(errors.values()) <= F32_BOUND, f"{what}: {errors}"
    np.testing.assert_array_equal(got["expert_load"], want["expert_load"], err_msg=what)


# ---------------------------------------------------------------------------------------------
# PyTorch.
# ---------------------------------------------------------------------------------------------


def _world(name, cfg):
    if name in mp.PADDED:
        case, num_padding = mp.PADDED[name]
        return mp.pad_world(mp.build_world(case, cfg), num_padding)
    return mp.build_world(mp.CASES[name], cfg)


@pytest.mark.parametrize("name", STRUCTURE_CASES + ("decode-padded", "target-verify-padded"))
def test_torch_tbo_runs_the_spec_children_interleaved(models, name, monkeypatch):
    """A torch TBO forward overlaps two non-empty micro-batches with the spec's token and
    real-token counts, in ``stage_schedule`` order, with the spec's ``delta_stages``."""
    ref_cfg, _, _, model = models
    world = _world(name, ref_cfg)
    _, runs = run_torch_recorded(world, model, monkeypatch)
    num_stages, delta = torch_schedule_shape(model, world.case.mode)
    assert delta == ref_model.DELTA_STAGES[world.case.mode]
    assert_ran_the_spec_split(runs, spec_children(world), world.num_token_non_padded,
                              num_stages=num_stages, delta_stages=delta)


@pytest.mark.parametrize("case", [mp.CASES["decode-one-sequence"],
                                  mp.ModelCase("TARGET_VERIFY", (6,), draft_token_num=3)],
                         ids=["decode", "target-verify"])
def test_torch_tbo_of_one_sequence_runs_one_micro_batch(models, case, monkeypatch):
    """Where the spec leaves child A empty (one sequence), nothing is overlapped: the
    executor never runs."""
    ref_cfg, _, _, model = models
    world = mp.build_world(case, ref_cfg)
    assert min(_num_tokens(child) for child in spec_children(world)) == 0
    _, runs = run_torch_recorded(world, model, monkeypatch)
    assert runs == []


def _shift_torch_split(monkeypatch, shift: int):
    """Make the preparer cut every uniform batch ``shift`` sequences after the spec's cut."""
    original = TboForwardBatchPreparer.split_children

    def wrong(self, batch):
        children = original(self, batch)
        tokens_per_seq = batch.num_tokens // batch.batch_size
        return cut_uniform_at(children, children[1].seq_range[0] + shift, tokens_per_seq)

    monkeypatch.setattr(TboForwardBatchPreparer, "split_children", wrong)


@pytest.mark.parametrize("shift", [1, -2])
def test_a_wrong_cut_passes_output_parity_but_not_the_structure_check(models, shift,
                                                                      monkeypatch):
    """Negative test: the preparer cuts a DECODE batch of 5 at sequence 3 (or 0, leaving A
    empty) instead of the spec's 2. Outputs and expert loads still equal the JAX spec's, so
    only the structure check sees it, and it does."""
    ref_cfg, _, weights, model = models
    world = mp.build_world(mp.CASES["decode"], ref_cfg)
    children = spec_children(world)
    _shift_torch_split(monkeypatch, shift)
    out, runs = run_torch_recorded(world, model, monkeypatch)
    _assert_same_outputs(out, mp.run_jax(world, ref_cfg, weights), "wrong cut vs JAX")
    num_stages, delta = torch_schedule_shape(model, "DECODE")
    with pytest.raises(AssertionError):
        assert_ran_the_spec_split(runs, children, world.num_token_non_padded,
                                  num_stages=num_stages, delta_stages=delta)


def test_a_serial_executor_passes_output_parity_but_not_the_structure_check(models,
                                                                             monkeypatch):
    """Negative test: an executor that runs all of A, then all of B (no overlap) gives the same
    DECODE outputs; the schedule check catches it."""
    ref_cfg, _, weights, model = models
    world = mp.build_world(mp.CASES["decode"], ref_cfg)
    runs = []

    def serial(states, operations_arr, delta_stages, **kwargs):
        for state, operations in zip(states, operations_arr):
            torch_ops.execute_operations(state, operations)
        return list(states)

    monkeypatch.setattr(overlap, "execute_overlapped_operations",
                        recording_executor(TORCH, serial, runs))
    out = mp.run_torch(world, model, tbo=True)
    _assert_same_outputs(out, mp.run_jax(world, ref_cfg, weights), "serial vs JAX")
    num_stages, delta = torch_schedule_shape(model, "DECODE")
    with pytest.raises(AssertionError):
        assert_ran_the_spec_split(runs, spec_children(world), world.num_token_non_padded,
                                  num_stages=num_stages, delta_stages=delta)


def test_profiler_ranges_of_a_tbo_forward_follow_the_schedule(models):
    """Unpatched: with ``profile=True`` a DECODE TBO forward's record_function ranges a0, b0,
    ... start in ``stage_schedule`` order (the same observation, read off a profile)."""
    ref_cfg, _, _, model = models
    world = mp.build_world(mp.CASES["decode"], ref_cfg)
    batch = TboForwardBatchPreparer().prepare(
        mp.torch_batch(world, dtype=torch.float32, device="cpu"))
    backend = TboAttnBackend()
    backend.init_forward_metadata(batch)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        model(batch, backend, profile=True)
    stages = sorted((event.time_range.start, event.name) for event in trace.events()
                    if re.fullmatch(r"[ab]\d+", event.name))
    num_stages, delta = torch_schedule_shape(model, "DECODE")
    assert [name for _, name in stages] == [
        f"{who}{index}" for who, index in ref_ops.stage_schedule(num_stages, delta)]


# ---------------------------------------------------------------------------------------------
# JAX: the executor is injectable, so the same recorder watches the spec.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STRUCTURE_CASES + ("decode-padded",))
def test_jax_tbo_runs_the_spec_children_interleaved(models, name):
    """``reference.operations.forward_tbo`` overlaps two non-empty micro-batches with the spec
    children's token counts in ``stage_schedule`` order (real counts are traced values under
    jit; ``test_model_parity`` checks them through the expert load)."""
    ref_cfg, _, weights, _ = models
    world = _world(name, ref_cfg)
    _, runs = run_jax_recorded(world, ref_cfg, weights)
    num_stages, delta = jax_schedule_shape(ref_cfg, weights, world.case)
    assert delta == ref_model.DELTA_STAGES[world.case.mode]
    assert_ran_the_spec_split(runs, spec_children(world), world.num_token_non_padded,
                              num_stages=num_stages, delta_stages=delta, check_real=False)


def test_jax_tbo_with_a_wrong_cut_passes_output_parity_but_not_the_structure_check(
        models, monkeypatch):
    """Negative test: children cut one sequence late (DECODE of 5 at 3, not 2) give the plain
    outputs; the structure check catches the cut."""
    ref_cfg, _, weights, _ = models
    world = mp.build_world(mp.CASES["decode"], ref_cfg)
    children = spec_children(world)
    original = spec.derive_children

    def wrong(*args, **kwargs):
        good = original(*args, **kwargs)
        return cut_uniform_at(good, good[1].seq_range[0] + 1, 1)

    monkeypatch.setattr(spec, "derive_children", wrong)  # what run_jax derives its split with
    out, runs = run_jax_recorded(world, ref_cfg, weights)
    _assert_same_outputs(out, mp.run_jax(world, ref_cfg, weights), "JAX wrong cut vs plain")
    num_stages, delta = jax_schedule_shape(ref_cfg, weights, world.case)
    with pytest.raises(AssertionError, match="micro-batch a"):
        assert_ran_the_spec_split(runs, children, world.num_token_non_padded,
                                  num_stages=num_stages, delta_stages=delta, check_real=False)


# ---------------------------------------------------------------------------------------------
# The import graph of reference/ and torch_impl/.
# ---------------------------------------------------------------------------------------------


def package_modules(package: str) -> dict:
    """``{module name: path}`` of one package's modules (``__init__`` as the package)."""
    modules = {}
    for path in sorted((REPO / package).glob("*.py")):
        name = package if path.stem == "__init__" else f"{package}.{path.stem}"
        modules[name] = path
    return modules


def _short(name: str) -> str:
    """A module's name in the graph: its folder's (``tbo_parity.reference.moe`` ->
    ``reference.moe``; the folders are ``tbo_parity``'s subpackages, see its docstring)."""
    return name.removeprefix("tbo_parity.")


def _resolve(name: str, known) -> Optional[str]:
    """The longest known module that ``name`` is or lies in (``a.b.c`` -> ``a.b``)."""
    parts = _short(name).split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def imported_modules(source: str, module: str, known) -> set:
    """The known modules ``source`` (module ``module``) imports anywhere, functions included."""
    package = module if module in PACKAGES else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {_resolve(alias.name, known) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {_resolve(f"{base}.{alias.name}", known) or _resolve(base, known)
                      for alias in node.names}
    return found - {None, module}


def import_graph(packages=PACKAGES) -> dict:
    """``{module: set of modules of these packages it imports}``."""
    files = {name: path for package in packages for name, path in package_modules(package).items()}
    return {name: imported_modules(path.read_text(), name, files) for name, path in files.items()}


def find_cycle(graph: dict) -> Optional[list]:
    """A cycle ``[m0, m1, ..., m0]`` of the directed graph, or None (depth-first search)."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            cycle = visit(successor)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_reference_and_torch_impl_import_graphs_have_no_cycle():
    """The modules of reference/ and torch_impl/ import each other as a DAG, lazy imports
    inside functions included; the graph holds the edges the layering promises."""
    graph = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert {"reference.model", "reference.split"} <= graph["reference.operations"]
    assert "reference.moe" in graph["reference.model"]
    assert "torch_impl.moe" in graph["torch_impl.model"]
    assert not graph["reference.moe"] - {"reference.weights"}


def test_the_cycle_check_finds_a_lazy_import_cycle():
    """The check has teeth: the old layout (reference.model importing reference.operations
    inside ``forward``, reference.operations importing reference.model at the top) is a
    cycle, and so is any planted one."""
    known = {"reference", "reference.model", "reference.operations"}
    old = {"reference.model": "def forward():\n    from tbo_parity.reference import operations\n",
           "reference.operations": "from tbo_parity.reference import model as M\n"}
    graph = {name: imported_modules(source, name, known) for name, source in old.items()}
    assert find_cycle(graph) in (["reference.model", "reference.operations", "reference.model"],
                                 ["reference.operations", "reference.model",
                                  "reference.operations"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_collector_resolves_every_import_form():
    """``import x.y``, ``from x import y`` (module or name), ``from .y import z`` and imports
    inside functions all become edges to the module they load."""
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"}
    source = ("import pkg.a\nfrom pkg import b\nfrom tbo_parity.pkg.c import name\n"
              "def f():\n    from .d import other\nimport numpy\n")
    assert imported_modules(source, "pkg.e", known | {"pkg.e"}) == {"pkg.a", "pkg.b", "pkg.c",
                                                                    "pkg.d"}
