"""`tbo-parity upstream`: does an SGLang release still split batches the way the spec says?

    python -m parity_tests.upstream --sglang_version=0.5.23 [--sglang_version=0.4.7 ...]
    python -m parity_tests.upstream --sglang_version=0.4.7,0.4.9,0.5.23
    python -m parity_tests.upstream --sglang_source=PATH   (a .py file, a source tree, a wheel
                                                           or sdist, an installed package dir)

For each release it

1. fetches the wheel without dependencies (``pip download sglang==V --no-deps``) into
   ``--cache_dir`` (a wheel already there is reused), or reads ``--sglang_source``;
2. finds the module holding the split functions wherever the release keeps it (the file that
   defines ``compute_split_seq_index``) and the release's ``ForwardMode`` (the file that
   defines ``class ForwardMode``);
3. loads the pure functions of the split rules **without importing SGLang**: it parses the
   module with ``ast``, lifts out the functions and methods it knows (``ROLES``), strips their
   type annotations, and executes them in a namespace of small stand-ins (the threshold getter,
   the server arguments, a device, real ``torch`` where a function builds a tensor);
4. runs the batches of ``tbo-parity run`` (``parity_tests/cases.py``: every mode, skewed
   shapes), degenerate EXTEND batches, every replay size up to 256, and every data-parallel
   report of up to 3 ranks through the release's functions and through ``reference.split``,
   arguments bound by parameter name since signatures differ between releases;
5. picks the EXTEND split rule the release follows (``reference.split.EXTEND_SPLITS``,
   docs/spec.md, "EXTEND split rules") and the data-parallel rule
   (``reference.split.DP_RULES``, docs/spec.md, "Data-parallel agreement"; a release matching
   neither compared under the default) and prints, per function, the cases, agreements,
   expected differences and disagreements, with the first disagreements as pasteable
   ``SplitCase(...)`` literals.

Expected differences are counted apart, not as failures: the spec's documented choices
(docs/spec.md, "Where this spec deliberately differs from upstream SGLang": IDLE graph replay,
a ValueError where upstream asserts), a mode the spec does not cover (MIXED), and a mode the
release does not have yet (TARGET_VERIFY before speculative verify came). A function missing
from a release is reported as absent, one found under an older name as renamed, and a function
of the module that the loader does not know as unknown.

Exit status: 0 every release agrees (up to expected differences) under one of the rules; 1 an
unexplained disagreement, or a release that matches no rule; 2 bad usage, or a release that
could not be fetched or holds no split module.
"""

from __future__ import annotations

import ast
import builtins
import copy
import dataclasses
import dis
import enum
import itertools
import logging
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import time
import types
import zipfile
from typing import TYPE_CHECKING, Callable, Optional

from absl import flags

if TYPE_CHECKING:  # split_parity imports torch and JAX: the command's help must not wait
    from parity_tests.split_parity import SplitCase

FLAGS = flags.FlagValues()  # this command's own flags, not absl's global registry
flags.DEFINE_multi_string("sglang_version", [], "An SGLang release to check (repeatable, or "
                          "comma-separated): its wheel is fetched without dependencies.",
                          flag_values=FLAGS)
flags.DEFINE_multi_string("sglang_source", [], "A .py file, a source tree, a wheel or sdist, or "
                          "an installed package directory to check instead (repeatable).",
                          flag_values=FLAGS)
flags.DEFINE_string("cache_dir", os.path.join("~", ".cache", "tbo-parity", "sglang"),
                    "Where fetched wheels are kept (one folder per release).", flag_values=FLAGS)
flags.DEFINE_integer("cases_per_mode", 1000, "Generated batches per forward mode (those of "
                     "`tbo-parity run`).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the batch generator.", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("examples", 3, "First disagreements printed per function.", lower_bound=0,
                     flag_values=FLAGS)

# The mutation run (docs/testing.md) covers the classifier further down, upstream_outcome to
# compare; fetching, lifting, probes and printing are out of its scope.
# pragma: no mutate start
MODULE_MARKER = re.compile(r"^\s*def compute_split_seq_index\b", re.MULTILINE)
FORWARD_MODE_MARKER = re.compile(r"^class ForwardMode\b", re.MULTILINE)
UNREACHABLE = re.compile(r"connection|resolve|network|timed? ?out|max retries|unreachable|"
                         r"could not fetch url|proxy", re.IGNORECASE)


class SourceError(Exception):
    """A release that cannot be fetched, or a source that holds no split module."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable  # the package index could not be reached


# ---------------------------------------------------------------------------------------------
# What the loader knows: the functions of the split rules, by role.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Role:
    """A rule of the spec and the upstream function(s) that implement it.

    ``names``: the qualified upstream names, the first found is used; ``old_names``: names an
    older release used for the same function (reported as a rename). ``spec``: what it is
    compared with.
    """

    name: str
    names: tuple
    spec: str
    old_names: tuple = ()


ROLES = (
    Role("token_num_per_seq", ("get_token_num_per_seq",), "token_num_per_seq"),
    Role("split_seq_index", ("compute_split_seq_index",), "compute_split_seq_index"),
    Role("split_token_index", ("compute_split_token_index",), "compute_split_token_index"),
    Role("replay_split", ("compute_split_indices_for_cuda_graph_replay",),
         "compute_split_indices_for_cuda_graph_replay"),
    Role("extend_split", ("_split_extend_seqs",), "compute_split_seq_index (EXTEND)"),
    Role("two_chunk", ("_is_two_chunk_split_enabled",), "is_two_chunk"),
    Role("balanced_split", ("_split_array_by_balanced_sum",), "balanced_split_index",
         old_names=("_split_array_by_half_sum",)),
    Role("cum_half_split", ("_split_array_by_cum_less_than_half",), "straddling_seq_index"),
    Role("children_non_padded", ("TboForwardBatchPreparer._split_num_token_non_padded",
                                 "TboForwardBatchPreparer."
                                 "compute_tbo_children_num_token_non_padded_raw"),
         "compute_children_num_token_non_padded"),
    Role("mask_offset", ("_compute_mask_offset",), "docs/spec.md TARGET_VERIFY mask offsets"),
    Role("dp_agreement", ("TboDPAttentionPreparer._compute_global_forward_mode",),
         "compute_dp_tbo_decision"),
)
ROLE_BY_NAME = {role.name: role for role in ROLES}
# Roles whose EXTEND results depend on the EXTEND split rule.
RULE_ROLES = ("split_seq_index", "split_token_index", "extend_split", "two_chunk")

# Functions SGLang releases define next to the split rules that the spec does not state as pure
# functions (they need a ForwardBatch, a device or a model): known, not compared.
KNOWN_OUTSIDE = frozenset({
    "split_spec_info", "_update_device_and_sum_field_from_cpu_field",
    "_compute_extend_num_tokens", "model_forward_maybe_tbo", "model_forward_stages",
    "_model_forward_tbo", "_model_forward_non_tbo", "_model_forward_tbo_split_inputs",
    "_model_forward_tbo_split_inputs_raw", "_model_forward_filter_inputs",
    "_model_forward_tbo_merge_outputs", "_model_forward_tbo_merge_key",
    "TboCudaGraphRunnerPlugin.__init__", "TboCudaGraphRunnerPlugin.capture_one_batch_size",
    "TboCudaGraphRunnerPlugin.replay_prepare", "TboDPAttentionPreparer.prepare_all_gather",
    "TboDPAttentionPreparer.compute_output", "TboDPAttentionPreparer._compute_local_forward_mode",
    "TboDPAttentionPreparer._is_all_same", "TboForwardBatchPreparer.prepare",
    "TboForwardBatchPreparer.prepare_raw", "TboForwardBatchPreparer.filter_batch",
    "TboForwardBatchPreparer.derive_fields_related_to_seq_len_for_two_chunk",
    "TboForwardBatchPreparer.compute_tbo_children_num_token_non_padded",
    "TboForwardBatchPreparer._get_num_token_non_padded_cpu",
    "TboForwardBatchPreparer._compute_split_token_index",
})
KNOWN_OUTSIDE_CLASSES = frozenset({"MaybeTboDeepEPDispatcher"})  # expert dispatch, execution
KEPT_DECORATORS = frozenset({"staticmethod", "classmethod"})


# ---------------------------------------------------------------------------------------------
# Finding the module: a wheel fetched from the package index, or a source on disk.
# ---------------------------------------------------------------------------------------------


def version_key(version: str) -> tuple:
    """Sort key of a release number such as 0.4.9.post3."""
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _archives(folder: pathlib.Path) -> list:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name.endswith((".whl", ".tar.gz", ".tgz", ".zip")))


def fetch_release(version: str, cache_dir) -> pathlib.Path:
    """The release's wheel (or sdist) in ``cache_dir/version``, fetched if not there yet."""
    folder = pathlib.Path(os.path.expanduser(cache_dir)) / version
    found = _archives(folder)
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", f"sglang=={version}", "--no-deps",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "20", "-q",
               "-d", str(folder)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise SourceError(f"pip download sglang=={version} timed out", unreachable=True)
    found = _archives(folder)
    if done.returncode != 0 or not found:
        output = (done.stderr + done.stdout).strip().splitlines()
        reason = output[-1] if output else f"pip exited {done.returncode}"
        raise SourceError(f"could not fetch sglang=={version}: {reason}",
                          unreachable=bool(UNREACHABLE.search(done.stderr + done.stdout)))
    return found[0]


def _python_files(path: pathlib.Path):
    """(name, read) for every .py file of a .py file, tree, wheel/zip or sdist; ``read()``
    returns the text. Likely files come first so that a big wheel is read only in part."""
    def likely_first(names):
        return sorted(names, key=lambda n: (not n.endswith(("two_batch_overlap.py",
                                                             "forward_batch_info.py")), n))

    if path.is_file() and path.suffix == ".py":
        yield str(path), path.read_text
    elif path.is_dir():
        for name in likely_first(str(p) for p in path.rglob("*.py")):
            yield name, pathlib.Path(name).read_text
    elif path.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".py")]
            for name in likely_first(names):
                yield name, (lambda n=name: archive.read(n).decode("utf-8", "replace"))
    elif path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as archive:
            members = {m.name: m for m in archive.getmembers() if m.name.endswith(".py")}
            for name in likely_first(members):
                yield name, (lambda n=name: archive.extractfile(members[n]).read().decode(
                    "utf-8", "replace"))
    else:
        raise SourceError(f"{path}: not a .py file, a directory, a wheel or an sdist")


@dataclasses.dataclass(frozen=True)
class Source:
    """The text of a release's split module, and of its ForwardMode's module if found."""

    label: str
    module_path: str
    module_text: str
    forward_mode_path: Optional[str] = None
    forward_mode_text: Optional[str] = None


def read_source(path, label: Optional[str] = None) -> Source:
    """Find the split module (the file defining ``compute_split_seq_index``; a single .py file
    is taken as it is) and the file defining ``class ForwardMode``."""
    path = pathlib.Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    module = forward_mode = None
    fallback = None  # a two_batch_overlap.py without the marker (a function renamed)
    for name, read in _python_files(path):
        base = name.rsplit("/", 1)[-1]
        if module is None or forward_mode is None or base == "forward_batch_info.py":
            text = read()
        else:
            continue
        if module is None and (MODULE_MARKER.search(text) or path.suffix == ".py"):
            module = (name, text)
        elif fallback is None and base == "two_batch_overlap.py":
            fallback = (name, text)
        if FORWARD_MODE_MARKER.search(text) and (forward_mode is None
                                                 or base == "forward_batch_info.py"):
            forward_mode = (name, text)
        if module is not None and forward_mode is not None and \
                forward_mode[0].endswith("forward_batch_info.py"):
            break
    module = module or fallback
    if module is None:
        raise SourceError(f"{path}: no file defines compute_split_seq_index")
    return Source(label or str(path), module[0], module[1],
                  *(forward_mode if forward_mode else (None, None)))


# ---------------------------------------------------------------------------------------------
# Loading without importing SGLang: lift the known pure functions out of the module's AST.
# ---------------------------------------------------------------------------------------------


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


def _strip_annotations(node):
    """The function (or class) without type annotations: they name SGLang types."""
    for sub in ast.walk(node):
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
            sub.returns = None
            arguments = sub.args
            for arg in arguments.posonlyargs + arguments.args + arguments.kwonlyargs + \
                    [a for a in (arguments.vararg, arguments.kwarg) if a]:
                arg.annotation = None
            sub.decorator_list = [d for d in sub.decorator_list
                                  if isinstance(d, ast.Name) and d.id in KEPT_DECORATORS]
    return node


def _inventory(tree: ast.Module) -> tuple:
    """(top-level functions by name, top-level classes by name -> methods by name)."""
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    classes = {n.name: {m.name: m for m in n.body if isinstance(m, ast.FunctionDef)}
               for n in tree.body if isinstance(n, ast.ClassDef)}
    return functions, classes


def _references(node, class_name: Optional[str], functions, classes) -> set:
    """Qualified names of the module's functions and methods that ``node`` uses."""
    used = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in functions:
            used.add(sub.id)
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
            owner = class_name if sub.value.id in ("cls", "self") else sub.value.id
            if owner in classes and sub.attr in classes[owner]:
                used.add(f"{owner}.{sub.attr}")
    return used


def _global_names(function) -> set:
    """Names a function (with its nested code) reads as globals."""
    names, codes = set(), [function.__code__]
    while codes:
        code = codes.pop()
        names |= {i.argval for i in dis.get_instructions(code)
                  if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return names


def _lift_forward_mode(source: Source):
    """The release's own ForwardMode (from its module's AST), or None."""
    if source.forward_mode_text is None:
        return None
    tree = ast.parse(source.forward_mode_text)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ForwardMode")
    namespace = {"__builtins__": builtins, "IntEnum": enum.IntEnum, "Enum": enum.Enum,
                 "auto": enum.auto, "enum": enum}
    try:
        exec(compile(ast.Module([_strip_annotations(copy.deepcopy(node))], []),
                     source.forward_mode_path, "exec"), namespace)
    except Exception:  # noqa: BLE001 (a ForwardMode we cannot run: use the stand-in)
        return None
    return namespace["ForwardMode"]


@dataclasses.dataclass
class Loaded:
    """One role's function as loaded from a release."""

    qualname: str
    function: Optional[Callable]
    signature: str
    renamed: bool
    problem: str = ""  # why it cannot run (a name the stand-ins do not provide)


@dataclasses.dataclass
class Release:
    """A release's split functions, executable, with what the loader found."""

    source: Source
    forward_mode: type
    forward_mode_origin: str
    settings: Settings
    roles: dict  # role name -> Loaded (roles the module lacks are absent)
    unknown: list  # functions of the module the loader does not know
    has_target_verify: bool

    @property
    def absent(self) -> list:
        return [role.name for role in ROLES if role.name not in self.roles]


def load_release(source: Source) -> Release:
    """Lift the known functions (and the module functions they call) out of the module, and
    execute them in a namespace of stand-ins. Nothing of SGLang is imported."""
    tree = ast.parse(source.module_text)
    functions, classes = _inventory(tree)
    defined = set(functions) | {f"{c}.{m}" for c, methods in classes.items() for m in methods}

    found = {}  # role -> qualified name found
    for role in ROLES:
        qualname = next((n for n in role.names + role.old_names if n in defined), None)
        if qualname is not None:
            found[role.name] = qualname

    # The lifted set: the found roles and everything of the module they use, transitively.
    lifted = set().union(*(_closure(q, functions, classes) for q in found.values()))

    body = []
    for node in tree.body:
        if _is_stdlib_import(node):  # e.g. itertools, math: safe to run, unlike SGLang's
            body.append(node)
        elif isinstance(node, ast.FunctionDef) and node.name in lifted:
            body.append(_strip_annotations(copy.deepcopy(node)))
        elif isinstance(node, ast.ClassDef):
            methods = [_strip_annotations(copy.deepcopy(m)) for m in node.body
                       if isinstance(m, ast.FunctionDef) and f"{node.name}.{m.name}" in lifted]
            if methods:
                body.append(ast.ClassDef(name=node.name, bases=[], keywords=[], body=methods,
                                         decorator_list=[], type_params=[]))
    module = ast.fix_missing_locations(ast.Module(body=body, type_ignores=[]))

    forward_mode = _lift_forward_mode(source)
    origin = source.forward_mode_path if forward_mode is not None else "stand-in"
    forward_mode = forward_mode or StandInForwardMode
    settings = Settings()
    namespace = _stand_ins(forward_mode, settings, source.module_text)
    exec(compile(module, source.module_path, "exec"), namespace)

    roles = {}
    for role_name, qualname in found.items():
        owner, _, name = qualname.rpartition(".")
        function = getattr(namespace[owner], name) if owner else namespace[name]
        needed = set()
        for dependency in _closure(qualname, functions, classes):
            dep_owner, _, dep_name = dependency.rpartition(".")
            dep = getattr(namespace[dep_owner], dep_name) if dep_owner else namespace[dep_name]
            needed |= _global_names(dep)
        missing = sorted(n for n in needed if n not in namespace and not hasattr(builtins, n))
        parameters = ", ".join(str(p) for p in _parameters(function).values())
        roles[role_name] = Loaded(
            qualname, function, f"{name}({parameters})",
            renamed=qualname in ROLE_BY_NAME[role_name].old_names,
            problem=f"uses {', '.join(missing)}, which the stand-ins do not provide"
            if missing else "")

    known = {n for role in ROLES for n in role.names + role.old_names} | KNOWN_OUTSIDE
    unknown = sorted(n for n in defined if n not in known
                     and n.split(".")[0] not in KNOWN_OUTSIDE_CLASSES)
    return Release(source, forward_mode, origin, settings, roles, unknown,
                   has_target_verify="target_verify" in source.module_text.lower())


def _is_stdlib_import(node) -> bool:
    """An ``import`` of standard-library modules only (never a relative import)."""
    if isinstance(node, ast.Import):
        modules = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        modules = [node.module]
    else:
        return False
    return all(m.split(".")[0] in sys.stdlib_module_names and m != "__future__"
               for m in modules)


def _closure(qualname: str, functions, classes) -> set:
    seen, todo = set(), [qualname]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        owner, _, short = name.rpartition(".")
        node = classes[owner][short] if owner else functions[short]
        todo += _references(node, owner or None, functions, classes) - seen
    return seen


def _parameters(function) -> dict:
    import inspect

    return dict(inspect.signature(function).parameters)


def _stand_ins(forward_mode, settings: Settings, module_text: str) -> dict:
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


# ---------------------------------------------------------------------------------------------
# Calling a release's function: arguments bound by parameter name.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Raised:
    """The outcome of a call that raised."""

    error: str

    def __repr__(self):
        return f"raises {self.error}"


SPEC_REJECTS = Raised("ValueError")
IDLE_REPLAY_DIVIDES = Raised("ZeroDivisionError")  # 0.4.9 on: IDLE's token_num_per_seq is 0


class MissingMode(Raised):
    """A probe names a mode the release's own ForwardMode does not have: nothing was called."""


def _plain(value):
    """A result in comparable Python values (tensors and arrays as tuples, modes by name)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, enum.Enum):
        return value.name
    return value


def call_release(release: Release, role: str, values: dict, threshold: float = 0.48):
    """The release's ``role`` function on the values whose names match its parameters."""
    loaded = release.roles[role]
    kwargs = {}
    for name, parameter in _parameters(loaded.function).items():
        if name in values:
            kwargs[name] = values[name]
        elif parameter.default is parameter.empty and parameter.kind not in (
                parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            return Raised(f"TypeError: the loader has no value for parameter {name!r}")
    release.settings.threshold = threshold
    try:
        return _plain(loaded.function(**kwargs))
    except Exception as error:  # noqa: BLE001 (any failure is an outcome to compare)
        return Raised(type(error).__name__)


def _spec_outcome(function: Callable):
    try:
        return _plain(function())
    except ValueError:
        return SPEC_REJECTS


# ---------------------------------------------------------------------------------------------
# The probes: one call of one function, on both sides.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Probe:
    """One comparison. ``spec(rule)`` is the spec's outcome under an EXTEND rule (for a
    data-parallel report, under the default data-parallel rule; ``dp_spec`` holds it per rule);
    ``values`` the upstream arguments by name (``post`` turns the raw upstream result into the
    spec's form); ``literal`` a pasteable reproducer."""

    role: str
    mode: str
    literal: str
    spec: Callable
    values: dict
    rule_dependent: bool = False
    invalid: bool = False
    threshold: float = 0.48
    post: Optional[Callable] = None
    dp_spec: Optional[dict] = None  # data-parallel rule -> the spec's outcome under it


class SpecSide:
    """The spec's functions, with jitted pure helpers built once per run."""

    def __init__(self):
        import jax

        from reference import split as spec

        self.spec = spec
        self._balanced = jax.jit(spec.balanced_split_index)
        self._straddling = jax.jit(spec.straddling_seq_index)
        self._two_chunk = jax.jit(spec.is_two_chunk, static_argnames="extend_split")

    @staticmethod
    def _padded(lens):
        import jax.numpy as jnp

        size = 8
        while size < len(lens):
            size *= 2
        return jnp.asarray(list(lens) + [0] * (size - len(lens)), dtype=jnp.int64)

    def _x64(self, function):
        import jax

        def run():
            with jax.enable_x64(True):
                return function()
        return run

    def balanced(self, lens):
        return self._x64(lambda: int(self._balanced(self._padded(lens), len(lens))))

    def straddling(self, lens):
        return self._x64(lambda: int(self._straddling(self._padded(lens))))

    def two_chunk(self, lens, threshold, rule):
        return self._x64(lambda: bool(self._two_chunk(self._padded(lens), len(lens), threshold,
                                                      extend_split=rule)))


def _memo(function):
    """``function(rule)`` computed once per rule (a probe's spec side is called per rule)."""
    results = {}

    def memoized(rule):
        if rule not in results:
            results[rule] = function(rule)
        return results[rule]
    return memoized


def case_probes(side: SpecSide, case: SplitCase) -> list:
    """The probes of one batch: every split function that applies to its mode."""
    spec, probes = side.spec, []
    mode_name = case.mode
    mode = spec.ForwardMode[mode_name]
    extend = case.extend_lens if mode_name in ("EXTEND", "MIXED") else None
    n = sum(extend) if extend is not None else case.num_tokens
    tnps = _spec_outcome(lambda: spec.token_num_per_seq(mode, case.draft_token_num))
    tnps_arg = None if isinstance(tnps, Raised) else tnps
    spec_info = SpecInfo(case.draft_token_num) if mode_name == "TARGET_VERIFY" else None
    thr = case.threshold
    common = dict(mode=mode_name, literal=repr(case), threshold=thr)

    seq = _memo(lambda rule: _spec_outcome(lambda: spec.compute_split_seq_index(
        mode, n, extend, tnps_arg, thr, extend_split=rule)))

    def seq_or_zero(rule):
        return seq(rule) if isinstance(seq(rule), int) else 0

    token = _memo(lambda rule: _spec_outcome(lambda: spec.compute_split_token_index(
        seq_or_zero(rule), mode, extend, tnps_arg, thr, extend_split=rule)))
    upstream_mode = _UpstreamMode(mode_name)

    probes.append(Probe("token_num_per_seq", spec=lambda rule: tnps,
                        values={"forward_mode": upstream_mode, "spec_info": spec_info}, **common))
    probes.append(Probe("split_seq_index", spec=seq, rule_dependent=True, values={
        "forward_mode": upstream_mode, "num_tokens": n, "extend_lens": extend,
        "token_num_per_seq": tnps_arg}, **common))
    probes.append(Probe("split_token_index", spec=token, rule_dependent=True, values=_Lazy(
        lambda rule: {"split_seq_index": seq_or_zero(rule), "forward_mode": upstream_mode,
                      "extend_seq_lens": extend, "extend_lens": extend,
                      "token_num_per_seq": tnps_arg}), **common))
    if mode_name == "MIXED":
        return probes
    if mode_name == "EXTEND":
        lens = list(extend)
        probes.append(Probe("extend_split", spec=seq, rule_dependent=True,
                            values={"arr": lens, "extend_lens": lens}, **common))
        two_chunk = _memo(lambda rule: side.two_chunk(lens, thr, rule)())
        probes.append(Probe("two_chunk", spec=two_chunk, rule_dependent=True,
                            values={"extend_lens": lens, "arr": lens}, **common))
        balanced = side.balanced(lens)()
        probes.append(Probe("balanced_split", spec=lambda rule: balanced,
                            values={"arr": lens, "extend_lens": lens}, **common))
        straddling = side.straddling(lens)()
        probes.append(Probe("cum_half_split", spec=lambda rule: straddling,
                            values={"arr": lens, "extend_lens": lens}, **common))
    split_token = token(spec.DEFAULT_EXTEND_SPLIT)
    split_token = split_token if isinstance(split_token, int) else 0
    padded = n if case.num_token_non_padded is None else case.num_token_non_padded
    non_padded = _spec_outcome(lambda: spec.compute_children_num_token_non_padded(
        split_token, padded))
    probes.append(Probe("children_non_padded", spec=lambda rule: non_padded, values={
        "tbo_split_token_index": split_token, "num_token_non_padded": padded}, **common))
    if mode_name == "TARGET_VERIFY":
        probes += mask_probes(case)
    return probes


class _Lazy:
    """Upstream values that depend on the EXTEND rule (the split the spec computed under it)."""

    def __init__(self, function):
        self.function = function


class _UpstreamMode(str):
    """A mode name, turned into the release's own ForwardMode member at call time."""


def mask_probes(case: SplitCase) -> list:
    """TARGET_VERIFY mask offsets at a few sequence boundaries (docs/spec.md, "Children")."""
    import numpy as np

    from parity_tests.split_parity import _mask_range

    d, seq_lens = case.draft_token_num, case.seq_lens
    spec_info = SpecInfo(d, np.asarray(seq_lens, dtype=np.int64))
    probes = []
    for index in sorted({0, 1, len(seq_lens) // 2, len(seq_lens)} & set(range(len(seq_lens) + 1))):
        offset = _mask_range(seq_lens, d, (0, index))[1]
        probes.append(Probe("mask_offset", "TARGET_VERIFY",
                            f"{case!r} (mask offset of sequence {index})",
                            spec=lambda rule, offset=offset: offset,
                            values={"seq_index": index, "spec_info": spec_info}))
    return probes


def replay_probes(side: SpecSide, max_graph_bs: int = 256) -> list:
    """Every graph size 0..max_graph_bs (and twice it) in DECODE, TARGET_VERIFY (d = 1..8) and
    IDLE."""
    spec, probes = side.spec, []
    sizes = list(range(0, max_graph_bs + 1)) + [2 * max_graph_bs]
    for mode_name, draft in [("DECODE", None), ("IDLE", None)] + \
            [("TARGET_VERIFY", d) for d in range(1, 9)]:
        mode = spec.ForwardMode[mode_name]
        tnps = {"DECODE": 1, "IDLE": None}.get(mode_name, draft)
        for bs in sizes:
            tokens = bs * (tnps or 1)
            outcome = _spec_outcome(lambda: spec.compute_split_indices_for_cuda_graph_replay(
                mode, tokens, tnps))
            probes.append(Probe(
                "replay_split", mode_name,
                f"compute_split_indices_for_cuda_graph_replay(ForwardMode.{mode_name}, "
                f"{tokens}, {tnps})", spec=lambda rule, outcome=outcome: outcome,
                values={"forward_mode": _UpstreamMode(mode_name),
                        "cuda_graph_num_tokens": tokens, "token_num_per_seq": tnps,
                        "spec_info": SpecInfo(draft) if draft else None}))
    return probes


def dp_probes(side: SpecSide) -> list:
    """Every report of 1 to 3 ranks, each (can_run_tbo, mode or None), the spec's outcome under
    every data-parallel rule."""
    spec = side.spec
    reports = [(can, mode) for can in (True, False)
               for mode in (None, "IDLE", "EXTEND", "DECODE", "TARGET_VERIFY")]
    probes = []
    for ranks in itertools.chain.from_iterable(
            itertools.product(reports, repeat=k) for k in (1, 2, 3)):
        per_rank = [(can, None if mode is None else spec.ForwardMode[mode])
                    for can, mode in ranks]
        outcomes = {dp_rule: _spec_outcome(
            lambda dp_rule=dp_rule: spec.compute_dp_tbo_decision(per_rank, dp_rule=dp_rule))
            for dp_rule in spec.DP_RULES}
        outcome = outcomes[spec.DEFAULT_DP_RULE]
        can_run = all(can for can, _ in ranks)
        probes.append(Probe(
            "dp_agreement", "DP", f"compute_dp_tbo_decision({list(ranks)!r})",
            spec=lambda rule, outcome=outcome: outcome, dp_spec=outcomes,
            values={"forward_modes": [_UpstreamMode(mode or "IDLE") for _, mode in ranks]},
            post=lambda raw, can_run=can_run: _dp_result(raw, can_run)))
    return probes


def _dp_result(raw, can_run: bool):
    """(run_tbo, global mode) from the release's (global mode, modes agree) and the ranks'
    can_run_tbo, as its data-parallel preparer combines them."""
    if isinstance(raw, Raised):
        return raw
    mode, agree = raw
    run = bool(can_run and agree)
    return run, (mode if run else None)


def invalid_probes(side: SpecSide) -> list:
    """Bad input: the spec raises ValueError; upstream asserts, divides by zero or goes on."""
    spec = side.spec
    FM = spec.ForwardMode
    calls = [
        ("split_seq_index", "IDLE", "compute_split_seq_index(IDLE, num_tokens=4)",
         lambda: spec.compute_split_seq_index(FM.IDLE, 4, None, None),
         {"num_tokens": 4, "extend_lens": None, "token_num_per_seq": None}),
        ("split_seq_index", "EXTEND", "compute_split_seq_index(EXTEND, 5, extend_lens=None)",
         lambda: spec.compute_split_seq_index(FM.EXTEND, 5, None, None),
         {"num_tokens": 5, "extend_lens": None, "token_num_per_seq": None}),
        ("split_seq_index", "DECODE", "compute_split_seq_index(DECODE, 5, None, 2)",
         lambda: spec.compute_split_seq_index(FM.DECODE, 5, None, 2),
         {"num_tokens": 5, "extend_lens": None, "token_num_per_seq": 2}),
        ("split_token_index", "IDLE", "compute_split_token_index(1, IDLE, None, None)",
         lambda: spec.compute_split_token_index(1, FM.IDLE, None, None),
         {"split_seq_index": 1, "extend_seq_lens": None, "extend_lens": None,
          "token_num_per_seq": None}),
        ("children_non_padded", "DECODE", "compute_children_num_token_non_padded(-1, 4)",
         lambda: spec.compute_children_num_token_non_padded(-1, 4),
         {"tbo_split_token_index": -1, "num_token_non_padded": 4}),
    ]
    probes = []
    for role, mode, literal, function, values in calls:
        outcome = _spec_outcome(function)
        probes.append(Probe(role, mode, literal, spec=lambda rule, outcome=outcome: outcome,
                            values={"forward_mode": _UpstreamMode(mode), **values},
                            invalid=True))
    return probes


# Degenerate EXTEND batches (and the golden table's): they tell the rules apart.
DEGENERATE_EXTEND = (
    (1,), (2,), (3,), (1, 1), (1, 2), (2, 1), (1, 1, 1), (2, 3), (1, 1, 1, 1, 1), (1, 5, 1),
    (3, 3, 3, 3), (100, 2000), (4000,), (5, 5, 5, 100), (10, 10, 11), (3, 1, 3), (2, 2),
)


def all_probes(side: SpecSide, cases_per_mode: int, seed: int,
               max_graph_bs: int = 256) -> list:
    """The probes of a run: the batches of `tbo-parity run`, degenerate and MIXED ones,
    replays, data-parallel reports and bad input."""
    from parity_tests.cases import MODES, random_cases
    from parity_tests.split_parity import SplitCase

    cases = [case for mode in MODES for case in random_cases(seed, mode, cases_per_mode)]
    for lens in DEGENERATE_EXTEND:
        for threshold in (0.48, 0.5, 0.1):
            cases.append(SplitCase("EXTEND", lens, lens, (0,) * len(lens), threshold=threshold))
    for case in random_cases(seed + 1, "EXTEND", max(1, cases_per_mode // 10)):
        cases.append(dataclasses.replace(case, mode="MIXED"))
    probes = [probe for case in cases for probe in case_probes(side, case)]
    return probes + replay_probes(side, max_graph_bs) + dp_probes(side) + invalid_probes(side)


# pragma: no mutate end


# ---------------------------------------------------------------------------------------------
# The comparison and its classification.
# ---------------------------------------------------------------------------------------------

DOCUMENTED = 'docs/spec.md, "Where this spec deliberately differs from upstream SGLang"'


def upstream_outcome(release: Release, probe: Probe, rule: str):
    values = probe.values.function(rule) if isinstance(probe.values, _Lazy) else probe.values
    resolved = {}
    for name, value in values.items():
        modes = value if isinstance(value, list) else [value]
        missing = [mode for mode in modes if isinstance(mode, _UpstreamMode)
                   and mode not in release.forward_mode.__members__]
        if missing:
            return MissingMode(f"KeyError: the release has no ForwardMode.{missing[0]}")
        if isinstance(value, _UpstreamMode):
            value = release.forward_mode[value]
        elif isinstance(value, list) and value and isinstance(value[0], _UpstreamMode):
            value = [release.forward_mode[v].value for v in value]
        resolved[name] = value
    raw = call_release(release, probe.role, resolved, probe.threshold)
    return probe.post(raw) if probe.post else raw


def classify(release: Release, probe: Probe, ours, theirs) -> Optional[str]:
    """None when the outcomes agree, else why they differ: an expected difference ("expected:
    ...") or "differs"."""
    if ours == theirs:
        return None
    if probe.mode == "MIXED":
        return "expected: MIXED, a mode the spec does not cover"
    if probe.mode == "TARGET_VERIFY" and not release.has_target_verify:
        return "expected: TARGET_VERIFY, a mode this release does not have yet"
    if isinstance(theirs, MissingMode):
        return f"expected: {theirs.error.rsplit('.', 1)[-1]}, a mode this release does not have"
    if probe.role == "replay_split" and probe.mode == "IDLE" and theirs == IDLE_REPLAY_DIVIDES:
        return f"expected: IDLE graph replay ({DOCUMENTED})"
    if probe.invalid and ours == SPEC_REJECTS:
        return f"expected: validation, a ValueError where upstream {_verb(theirs)} ({DOCUMENTED})"
    return "differs"


def _verb(outcome) -> str:
    return f"raises {outcome.error}" if isinstance(outcome, Raised) else "returns a value"


@dataclasses.dataclass
class RoleResult:
    cases: int = 0
    agree: int = 0
    expected: dict = dataclasses.field(default_factory=dict)  # reason -> count
    differ: int = 0
    examples: list = dataclasses.field(default_factory=list)  # (literal, spec, upstream)


@dataclasses.dataclass
class Report:
    release: Release
    rule: Optional[str]  # the EXTEND rule the release matches (None: no rule matches)
    rule_counts: dict  # rule -> disagreements of the EXTEND rule functions under it
    results: dict  # role -> RoleResult, under ``rule`` (or the default when None)
    seconds: float
    # The data-parallel rule the release matches (None: it matches none, compared under the
    # default, or it has no data-parallel agreement), and its disagreements per rule ({}: none).
    dp_rule: Optional[str] = None
    dp_rule_counts: dict = dataclasses.field(default_factory=dict)

    @property
    def unexplained(self) -> int:
        return sum(r.differ for r in self.results.values())

    @property
    def ok(self) -> bool:
        return self.rule is not None and self.unexplained == 0


def compare(release: Release, probes: list, examples: int = 3) -> Report:
    """Every probe on both sides, under every EXTEND rule; the report of the matching one. The
    data-parallel reports are compared under the first data-parallel rule they all agree with
    (the default when none does: their disagreements stay unexplained)."""
    from reference.split import DEFAULT_DP_RULE, DEFAULT_EXTEND_SPLIT, DP_RULES, EXTEND_SPLITS

    start = time.perf_counter()
    runnable = [p for p in probes if p.role in release.roles
                and not release.roles[p.role].problem]
    fixed = {id(p): upstream_outcome(release, p, DEFAULT_EXTEND_SPLIT) for p in runnable
             if not isinstance(p.values, _Lazy)}
    dp = [p for p in runnable if p.dp_spec is not None]
    dp_counts = {dp_rule: sum(classify(release, p, p.dp_spec[dp_rule], fixed[id(p)]) == "differs"
                              for p in dp) for dp_rule in DP_RULES} if dp else {}
    dp_matching = [dp_rule for dp_rule in DP_RULES if dp_counts.get(dp_rule) == 0]
    dp_rule = dp_matching[0] if dp_matching else None
    per_rule, counts = {}, {}
    for rule in EXTEND_SPLITS:
        results = {role.name: RoleResult() for role in ROLES if role.name in release.roles}
        counts[rule] = 0  # the rule is told by EXTEND calls of the rule functions alone
        for probe in runnable:
            ours = probe.spec(rule) if probe.dp_spec is None else \
                probe.dp_spec[dp_rule or DEFAULT_DP_RULE]
            theirs = fixed.get(id(probe))
            if theirs is None and id(probe) not in fixed:
                theirs = upstream_outcome(release, probe, rule)
            verdict = classify(release, probe, ours, theirs)
            result = results[probe.role]
            result.cases += 1
            if verdict is None:
                result.agree += 1
            elif verdict == "differs":
                result.differ += 1
                counts[rule] += probe.mode == "EXTEND" and probe.role in RULE_ROLES
                if len(result.examples) < examples:
                    result.examples.append((probe.literal, ours, theirs))
            else:
                result.expected[verdict] = result.expected.get(verdict, 0) + 1
        per_rule[rule] = results
    matching = [rule for rule in EXTEND_SPLITS if counts[rule] == 0]
    rule = matching[0] if matching else None
    return Report(release, rule, counts, per_rule[rule or DEFAULT_EXTEND_SPLIT],
                  time.perf_counter() - start, dp_rule, dp_counts)


# pragma: no mutate start
# ---------------------------------------------------------------------------------------------
# The printed report.
# ---------------------------------------------------------------------------------------------


def format_report(report: Report) -> str:
    release = report.release
    source = release.source
    counts = ", ".join(f"{rule} {n}" for rule, n in report.rule_counts.items())
    rule_line = (f"EXTEND rule: {report.rule}" if report.rule else
                 "EXTEND rule: matches NO rule (a finding); compared under two_chunk") + \
        f"  (EXTEND disagreements per rule: {counts})"
    lines = [f"== {source.label}", f"module:      {source.module_path}",
             f"ForwardMode: {release.forward_mode_origin}", rule_line]
    if report.dp_rule_counts:
        dp_counts = ", ".join(f"{rule} {n}" for rule, n in report.dp_rule_counts.items())
        lines.append((f"DP rule:     {report.dp_rule}" if report.dp_rule else
                      "DP rule:     matches NO rule; compared under the default") +
                     f"  (data-parallel disagreements per rule: {dp_counts})")
    lines.append("")
    header = f"{'function':<20} {'upstream name':<58} {'cases':>6} {'agree':>6} " \
             f"{'expected':>8} {'differ':>6}"
    lines += [header, "-" * len(header)]
    for role in ROLES:
        loaded = release.roles.get(role.name)
        if loaded is None:
            lines.append(f"{role.name:<20} {'(absent)':<58}")
            continue
        name = loaded.qualname.replace("TboForwardBatchPreparer.", "TboFBP.").replace(
            "TboDPAttentionPreparer.", "TboDPAP.") + (" (renamed)" if loaded.renamed else "")
        if loaded.problem:
            lines.append(f"{role.name:<20} {name:<58} not run: {loaded.problem}")
            continue
        result = report.results[role.name]
        lines.append(f"{role.name:<20} {name:<58} {result.cases:>6} {result.agree:>6} "
                     f"{sum(result.expected.values()):>8} {result.differ:>6}")
    lines.append("(TboFBP: TboForwardBatchPreparer, TboDPAP: TboDPAttentionPreparer)")
    signatures = [f"  {role}: {loaded.signature}" for role, loaded in release.roles.items()]
    lines += ["", "signatures:"] + signatures
    expected = [f"  {role}: {count} x {reason}" for role, result in report.results.items()
                for reason, count in result.expected.items()]
    if expected:
        lines += ["", "expected differences (not failures):"] + expected
    if release.unknown:
        lines += ["", f"unknown functions (not compared): {', '.join(release.unknown)}"]
    firsts = [f"  {role}: {literal}\n      spec={ours!r} upstream={theirs!r}"
              for role, result in report.results.items()
              for literal, ours, theirs in result.examples]
    if firsts:
        lines += ["", "first disagreements:"] + firsts
    verdict = "AGREES" if report.ok else f"{report.unexplained} unexplained disagreement(s)" \
        if report.rule else "matches no EXTEND rule"
    lines += ["", f"verdict: {verdict} ({report.seconds:.1f} s)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _versions(values: list) -> list:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _progress(command: str, message: str) -> None:
    """One line on stderr as a phase starts (the report itself goes to stdout)."""
    print(f"{command}: {message}", file=sys.stderr, flush=True)


def main(argv: Optional[list] = None, prog: str = "upstream") -> int:
    """Check SGLang releases against the spec; the exit status (0, 1, 2; see the docstring).

    ``prog`` starts the usage errors (one line on stderr, exit 2): "tbo-parity" when run as
    `tbo-parity upstream`. Each phase (the spec's side, fetching or reading, lifting, running)
    says so on stderr, one line, before it starts."""
    argv = list(sys.argv if argv is None else argv)
    try:
        FLAGS.unparse_flags()
        FLAGS(argv)
    except flags.Error as error:
        print(f"{prog}: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    versions, paths = _versions(FLAGS.sglang_version), list(FLAGS.sglang_source)
    if not versions and not paths:
        print(f"{prog}: give --sglang_version=V (repeatable) or --sglang_source=PATH",
              file=sys.stderr)
        return 2
    for path in paths:  # refused before any work
        if not os.path.exists(os.path.expanduser(path)):
            print(f"{prog}: --sglang_source={path}: no such file or directory", file=sys.stderr)
            return 2
    command = "upstream" if prog == "upstream" else f"{prog} upstream"
    _progress(command, f"computing the spec's outcomes ({FLAGS.cases_per_mode} batches per "
                       "mode, replays, data-parallel reports, bad input)")
    side = SpecSide()
    probes = all_probes(side, FLAGS.cases_per_mode, FLAGS.seed)
    status = 0
    targets = [(f"sglang {v}", v, None) for v in versions] + [(p, None, p) for p in paths]
    for label, version, path in targets:
        try:
            if version is not None:
                folder = pathlib.Path(os.path.expanduser(FLAGS.cache_dir)) / version
                cached = _archives(folder)
                _progress(command, f"fetching sglang=={version} " + (
                    f"(cached at {cached[0]})" if cached else
                    f"into {folder} (pip download --no-deps)"))
                path = fetch_release(version, FLAGS.cache_dir)
            else:
                _progress(command, f"reading {path}")
            source = read_source(path, label)
            _progress(command, f"lifting the split functions of {source.module_path}")
            release = load_release(source)
        except SourceError as error:
            print(f"== {label}\nerror: {error}\n", flush=True)
            status = max(status, 2)
            continue
        _progress(command, f"running {len(probes)} cases through {label} and the spec")
        report = compare(release, probes, FLAGS.examples)
        print(format_report(report), flush=True)
        if not report.ok:
            status = max(status, 1)
    return status

# pragma: no mutate end
