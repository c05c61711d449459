"""Loading a release without importing SGLang: the functions of the split rules the loader
knows, by role (``ROLES``), lifted out of the module's AST with the module functions they
call, stripped of their type annotations and executed among stand-ins (``stand_ins``).
"""

from __future__ import annotations

import ast
import builtins
import copy
import dataclasses
import dis
import enum
import sys
import types
from typing import Callable, Optional

from tbo_parity.parity_tests.upstream.fetch import Source
from tbo_parity.parity_tests.upstream.stand_ins import (Settings, StandInForwardMode,
                                                        stand_in_namespace)

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
# Lifting them out of the module's AST.
# ---------------------------------------------------------------------------------------------


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
    namespace = stand_in_namespace(forward_mode, settings, source.module_text)
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
        parameters = ", ".join(str(p) for p in parameters_of(function).values())
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


def parameters_of(function) -> dict:
    import inspect

    return dict(inspect.signature(function).parameters)
