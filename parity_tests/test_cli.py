"""The main job reports agreement, and on a planted bug fails with a pasteable case."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tbo_parity import cli
from tbo_parity.parity_tests import background
from tbo_parity.parity_tests.split_parity import SplitCase
from tbo_parity.torch_impl import two_batch_overlap as impl


@background.job("cli-run",
                background.reads(__name__, "test_run_prints_the_table_and_exits_zero"))
def _run_command() -> subprocess.CompletedProcess:
    """`tbo-parity run --cases_per_mode=20`, a background job (parity_tests/background.py): its
    model rows (a JAX compile per scenario, most of its ~30 s on 2 cores) run on a second core
    beside the tests before test_run_prints_the_table_and_exits_zero, which reads it."""
    return background.command([sys.executable, "-m", "tbo_parity.cli", "run",
                               "--cases_per_mode=20"], timeout=600)


def test_run_fails_on_a_planted_bug_and_prints_the_case(monkeypatch, capsys):
    # Plant a bug: every split token index of the implementation is off by one.
    original = impl.compute_split_token_index
    monkeypatch.setattr(impl, "compute_split_token_index",
                        lambda *args, **kw: original(*args, **kw) + 1)
    assert cli.run_parity(count=20, seed=0) == 1
    out = capsys.readouterr().out
    literal = out.split("first mismatch")[1].splitlines()[1].strip()
    case = eval(literal, {"SplitCase": SplitCase})
    assert isinstance(case, SplitCase)
    assert "split_token_index" in out and "FAIL" in out


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tbo_parity.cli", *args],
                          capture_output=True, text=True)


def test_unknown_command_is_a_usage_error():
    result = _cli("walk")
    assert result.returncode == 2
    assert "usage: tbo-parity" in result.stdout + result.stderr


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["-h"], ["verify", "--help"]],
                         ids=["help", "run-help", "h", "verify-help"])
def test_help_lists_commands_flags_defaults_and_examples_and_exits_zero(args):
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for command in cli.COMMANDS:
        assert f"  {command} " in out
    for _, names in cli.COMMANDS.values():
        for name in names:
            line = next(line for line in out.splitlines() if f"--{name} " in line
                        or f"--[no]{name} " in line)
            assert f"(default: {cli.FLAGS[name].default})" in line, line
    assert "examples:" in out and "tbo-parity run" in out
    assert out.count("usage:") == 1


@pytest.mark.parametrize("args,words", [
    ([], "no command given"),
    (["walk"], "unknown command"),
    (["run", "verify"], "unknown command"),
    (["run", "--seed=-1"], "--seed"),
    (["run", "--cases_per_mode=0"], "--cases_per_mode"),
    (["run", "--device=tpu"], "--device"),
    (["run", "--no_such_flag"], "no_such_flag"),
    (["verify", "--max_seqs=0"], "--max_seqs"),
    (["run", "--device=cuda", "--nomodel"], "--nomodel"),
    (["run", "--dtype=bfloat16", "--nomodel"], "--nomodel"),
    (["run", "--max_len=3"], "--max_len applies to `tbo-parity verify`"),
    (["verify", "--seed=3"], "--seed applies to `tbo-parity run`"),
], ids=["none", "unknown", "two", "seed", "cases", "device", "unknown-flag", "max-seqs",
        "cuda-nomodel", "dtype-nomodel", "verify-flag-on-run", "run-flag-on-verify"])
def test_bad_usage_is_one_line_and_exit_two(args, words):
    result = _cli(*args)
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr


def _synopsis() -> dict:
    """command -> its entry in the docstring's usage block (continuation lines joined)."""
    _, usage = cli.doc_summary_and_usage()
    entries = {}
    for line in usage:
        if line.startswith("tbo-parity "):
            name = line.split()[1]
            entries[name] = line
        else:
            entries[name] += " " + line.strip()
    return entries


def test_the_docstring_lists_every_command_and_is_the_help_description():
    """--help's description is the module docstring's: its summary and its usage block, one
    entry per command with that command's flags and their defaults, so none can drift."""
    summary, usage = cli.doc_summary_and_usage()
    synopsis = _synopsis()
    assert set(synopsis) == set(cli.COMMANDS) | {"--help"}
    for name in cli.COMMANDS:
        assert f"`{name}`" in cli.__doc__.split("\n\n", 2)[2], name  # and in the prose
    for name, (_, flag_names) in cli.COMMANDS.items():
        for flag_name in flag_names:
            default = cli.FLAGS[flag_name].default
            shown = ("--nomodel" if flag_name == "model" else
                     f"--{flag_name}=" if default is None else f"--{flag_name}={default}")
            assert shown in synopsis[name], (name, shown)
    from tbo_parity.parity_tests import upstream

    for flag in upstream.FLAGS.flags_by_module_dict()[upstream.cli.__name__]:
        assert f"--{flag.name}=" in synopsis["upstream"], flag.name
    out = _cli("--help").stdout.splitlines()
    assert out[0] == summary == ("tbo-parity: check the PyTorch implementation of two-batch "
                                 "overlap against the JAX spec.")
    start = out.index("usage:") + 1
    assert out[start:start + len(usage)] == [f"  {line}" for line in usage]


@background.job("cli-closed-stdout",
                background.reads(__name__, "test_a_closed_stdout_ends_quietly_with_141"))
def _commands_into_a_closed_pipe() -> list:
    """(args, exit status, stderr) of commands whose stdout is a pipe with no reader; a
    background job (parity_tests/background.py): `run` takes 4 s, importing torch and jax."""
    import os

    read, write = os.pipe()
    os.close(read)  # closed before the command writes anything: every write fails, no race
    try:
        results = []
        for args in (["--help"], ["run", "--nomodel", "--cases_per_mode=1"]):
            result = background.command([sys.executable, "-m", "tbo_parity.cli", *args],
                                        stdout=write)
            results.append((args, result.returncode, result.stderr))
        return results
    finally:
        os.close(write)


def test_a_closed_stdout_ends_quietly_with_141():
    """A reader gone before the output (`tbo-parity --help | head -1`, or any command piped into
    one): no BrokenPipeError traceback, nothing on stderr, exit status 141 (128 + SIGPIPE)."""
    results = background.result("cli-closed-stdout")
    assert [args for args, _, _ in results] == [["--help"],
                                                ["run", "--nomodel", "--cases_per_mode=1"]]
    for args, returncode, stderr in results:
        assert (returncode, stderr) == (141, ""), (args, stderr)


@pytest.mark.parametrize("command,target", [
    ("run", "run_parity"), ("verify", "run_verify"), ("timeline", "run_timeline"),
    ("upstream", "upstream.main")])
def test_ctrl_c_in_any_command_is_one_line_and_exit_130(command, target, monkeypatch, capsys,
                                                         tmp_path):
    from tbo_parity.parity_tests import upstream

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    owner, name = (upstream, "main") if target == "upstream.main" else (cli, target)
    monkeypatch.setattr(owner, name, interrupted)
    args = {"run": ["--nomodel"], "verify": [], "timeline": [f"--out={tmp_path / 't.png'}"],
            "upstream": ["--sglang_version=0.5.23"]}[command]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tbo-parity", command, *args])
    assert exit_.value.code == 130
    assert capsys.readouterr() == ("", "tbo-parity: interrupted\n")


def test_help_and_usage_errors_import_neither_torch_nor_jax():
    code = ("import sys; from tbo_parity import cli; cli._main(['tbo-parity', '--help']); "
            "cli._main(['tbo-parity', 'walk']); "
            "print(sorted(m for m in ('torch', 'jax', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


def test_a_failing_model_row_names_the_comparison_and_prints_a_reproducer(monkeypatch, capsys):
    """Plant a bug: child B's stages run before child A's. The two-chunk scenario's TBO rows
    must fail, and the report must say which pair and tensor failed, with the scenario as a
    pasteable ModelCase literal."""
    from tbo_parity.parity_tests import model_parity as mp
    from tbo_parity.parity_tests.model_parity import ModelCase  # noqa: F401 (the literal's namespace)
    from tbo_parity.torch_impl import overlap

    monkeypatch.setattr(mp, "CASES", {"two-chunk": mp.CASES["extend-two-chunk-prefixed"]})
    monkeypatch.setattr(mp, "PADDED", {})
    original = overlap.execute_overlapped_operations

    def b_first(states, operations_arr, delta_stages, **kwargs):
        return original(states[::-1], operations_arr[::-1], delta_stages, **kwargs)[::-1]

    monkeypatch.setattr(overlap, "execute_overlapped_operations", b_first)
    assert cli.run_parity(count=1, seed=0, model=True) == 1
    out = capsys.readouterr().out
    report = out.split("first failing model scenario (two-chunk):")[1].splitlines()
    literal = report[1].strip().split(";")[0]
    assert eval(literal, {"ModelCase": mp.ModelCase}) == mp.CASES["two-chunk"]
    assert any(line.strip().startswith("tbo_vs_plain hidden:") and "> bound" in line
               for line in report[2:])
    assert "model float32 two-chunk" in out and "FAIL" in out


def test_run_prints_the_table_and_exits_zero():
    result = background.result("cli-run")
    stdout, stderr = result.stdout, result.stderr
    assert result.returncode == 0, stderr
    for mode in ("EXTEND", "DECODE", "TARGET_VERIFY", "IDLE"):
        assert f"split {mode}" in stdout
    assert "OK" in stdout
    # On a CPU the graph runner's replay path runs without a graph, plain and TBO, at a padded
    # and at an exact captured size, and its rows say so.
    assert "no CUDA graph" in stdout and "graph replay parity: skipped" not in stdout
    for tbo in ("plain", "tbo"):
        for name in ("decode", "verify-tree"):
            for size in ("5->8 padded", "8->8 exact"):
                rows = [line for line in stdout.splitlines()
                        if line.startswith(f"replay-path {name} {tbo} {size} ")]
                assert len(rows) == 1 and rows[0].split()[-5] == "0", (name, tbo, size, stdout)
    # Its legend describes the kinds of rows printed (model, replay-path) and no other.
    assert legend_drift(stdout) == []


def test_a_replay_path_bug_fails_the_rows_it_breaks(monkeypatch):
    """Plant a bug in the TBO plugin: the children's counts are never rewritten at replay (they
    keep the last capture's), so a padded replay routes padding rows to experts. The
    replay-path rows of `run` must catch it on a CPU: every padded TBO row fails, and no
    plain row (a plain runner has no plugin)."""
    from tbo_parity.torch_impl import two_batch_overlap

    monkeypatch.setattr(two_batch_overlap.TboCudaGraphRunnerPlugin, "replay_prepare",
                        lambda self, *args, **kwargs: None)
    rows = list(cli.check_graphs("float32", "cpu"))
    assert len(rows) == 8 and {row["kind"] for row in rows} == {"replay-path"}
    failed = {row["mode"] for row in rows if row["mismatches"]}
    assert {"decode tbo 5->8 padded", "verify-tree tbo 5->8 padded"} <= failed
    assert not any(" plain " in mode for mode in failed)


# ---------------------------------------------------------------------------------------------
# The module docstring and --help agree (the help's description is built from the docstring).
# ---------------------------------------------------------------------------------------------


def _doc_parts(doc: str) -> tuple:
    """(summary, usage lines, {command: its usage entry, continuation lines joined}, prose) of a
    docstring laid out as cli's: a summary paragraph, an indented usage block, then prose."""
    summary, _, rest = doc.partition("\n\n")
    block, _, prose = rest.partition("\n\n")
    usage = [line[4:] for line in block.splitlines()]
    entries, name = {}, None
    for line in usage:
        if line.startswith("tbo-parity "):
            name = line.split()[1]
            entries[name] = line
        elif name is not None:
            entries[name] += " " + line.strip()
    return summary.replace("`", ""), usage, entries, prose


def help_doc_drift(doc: str, out: str) -> list:
    """Where the help ``out`` and the docstring ``doc`` disagree, a line each; empty when they
    agree. The help's summary and usage block must be the docstring's; every command the help
    lists must have a usage entry and be described (as `name`) in the prose, and every usage
    entry must be a command the help lists; every flag the help gives a command must be in that
    command's usage entry, with the same default where the entry writes one (not a placeholder
    such as N or DIR), and every flag of the entry must be one the help gives the command."""
    summary, usage, entries, prose = _doc_parts(doc)
    sections = {paragraph.splitlines()[0]: paragraph.splitlines()[1:]
                for paragraph in out.strip().split("\n\n")}
    drift = []
    if out.splitlines()[0] != summary:
        drift.append(f"summary: {out.splitlines()[0]!r} in the help, {summary!r} in the docstring")
    if sections.get("usage:") != [f"  {line}" for line in usage]:
        drift.append("usage: the help's usage block is not the docstring's")
    commands = [line.split()[0] for line in sections.get("commands:", [])]
    for name in commands:
        if name not in entries:
            drift.append(f"command {name}: in the help, not in the docstring's usage")
        if f"`{name}`" not in prose:
            drift.append(f"command {name}: in the help, not described in the docstring")
    drift += [f"command {name}: in the docstring's usage, not in the help"
              for name in entries if not name.startswith("-") and name not in commands]
    for title, lines in sections.items():
        if not title.startswith("flags of "):
            continue
        name = title[len("flags of "):-1]
        entry = entries.get(name)
        if entry is None:  # reported above, its flags with it
            continue
        flags = {}
        for line in lines:
            shown, default = line.split()[0], line.rsplit("(default: ", 1)[1][:-1]
            flags[shown.replace("[no]", "").lstrip("-")] = default
        for flag, default in flags.items():
            written = re.search(rf"--(?:no)?{flag}\b(?:=([^\s\]|]+))?", entry)
            if written is None:
                drift.append(f"{name} --{flag}: in the help, not in the docstring's usage")
            elif written.group(1) and not written.group(1).isupper() \
                    and written.group(1) != default:
                drift.append(f"{name} --{flag}: default {default} in the help, "
                             f"{written.group(1)} in the docstring")
        for flag in re.findall(r"--(\w+)", entry):
            if flag not in flags and not (flag.startswith("no") and flag[2:] in flags):
                drift.append(f"{name} --{flag}: in the docstring's usage, not in the help")
    return drift


def _without_entry(doc: str, command: str) -> str:
    """``doc`` with ``command``'s usage entry (and its continuation lines) removed."""
    head, _, rest = doc.partition("\n\n")
    block, _, prose = rest.partition("\n\n")
    kept, dropping = [], False
    for line in block.splitlines():
        if line.startswith("    tbo-parity "):
            dropping = line.split()[1] == command
        if not dropping:
            kept.append(line)
    return "\n\n".join([head, "\n".join(kept), prose])


def test_help_and_the_docstring_agree():
    """`tbo-parity --help` as the console command prints it, against the module docstring."""
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    assert help_doc_drift(cli.__doc__, result.stdout) == []


def test_the_help_description_is_built_from_the_docstring(monkeypatch):
    """Change the docstring (its summary; one command's usage entry gone) and --help changes with
    it; the drift check then reports the help against the old docstring, and the command the
    help still lists against the new one."""
    original = cli.__doc__
    summary = original.partition("\n\n")[0]
    changed = _without_entry(original, "timeline").replace(summary, "tbo-parity: changed.", 1)
    assert "tbo-parity timeline" not in changed.partition("\n\n")[2].partition("\n\n")[0]
    monkeypatch.setattr(cli, "__doc__", changed)
    out = cli.help_text()
    assert out.splitlines()[0] == "tbo-parity: changed."
    drift = help_doc_drift(original, out)
    assert any(line.startswith("summary:") for line in drift), drift
    assert any(line.startswith("usage:") for line in drift), drift
    assert help_doc_drift(changed, out) == [
        "command timeline: in the help, not in the docstring's usage"]


def _drifted_docs() -> list:
    """(id, docstring drifted from the help in one way, the word its drift line must name)."""
    doc = cli.__doc__
    run_entry = _doc_parts(doc)[2]["run"]
    seed = re.search(r"\[--seed=[^\]]+\] ?", run_entry).group(0)
    max_len = re.search(r"--max_len=(\d+)", doc)
    drifted = [
        ("entry-gone", _without_entry(doc, "verify"), "command verify"),
        ("flag-gone", doc.replace(seed, "", 1), "run --seed"),
        ("default-changed", doc.replace(max_len.group(0),
                                        f"--max_len={int(max_len.group(1)) + 1}", 1),
         "verify --max_len: default"),
        ("flag-added", doc.replace("tbo-parity timeline ", "tbo-parity timeline [--gone=1] ", 1),
         "timeline --gone"),
        ("undescribed", doc.replace("`upstream`", "upstream"), "command upstream"),
        ("unknown-command", doc.replace("    tbo-parity --help", "    tbo-parity walk\n"
                                                                "    tbo-parity --help", 1),
         "command walk"),
    ]
    for name, changed, _ in drifted:
        assert changed != doc, name  # the drift was planted
    return [pytest.param(changed, word, id=name) for name, changed, word in drifted]


@pytest.mark.parametrize("doc,word", _drifted_docs())
def test_the_drift_check_reports_a_docstring_that_drifted_from_the_help(doc, word, monkeypatch):
    """The docstring edited, the help built from it: its usage follows, but the commands and
    flags the code has do not, and the check names the difference, and only it."""
    monkeypatch.setattr(cli, "__doc__", doc)
    drift = help_doc_drift(doc, cli.help_text())
    assert drift and all(word in line for line in drift), drift


# ---------------------------------------------------------------------------------------------
# run's legend describes the kinds of rows printed, and no other.
# ---------------------------------------------------------------------------------------------


TABLE_ROW = re.compile(r"^(\S+) .*\s\d+\s+\d+\s+\d+\.\ds(\s|$)")  # label cases mismatches time
LEGEND_ENTRY = re.compile(r"^([\w-]+) rows\b")


def legend_drift(out: str) -> list:
    """The kinds of rows (a row's kind: its label's first word) that `run`'s legend describes
    but no printed row has, then those printed that it does not describe (split rows, which
    have no error columns, need no entry); empty when the legend fits the table."""
    lines = out.splitlines()
    printed = {m.group(1) for line in lines if (m := TABLE_ROW.match(line))}
    described = {m.group(1) for line in lines if (m := LEGEND_ENTRY.match(line))}
    return ([f"legend describes {kind} rows, none printed"
             for kind in sorted(described - printed)] +
            [f"{kind} rows printed, not in the legend"
             for kind in sorted(printed - described - {"split"})])


def _fake_row(kind: str) -> dict:
    return {"mode": "fake", "kind": kind, "cases": 1, "mismatches": 0, "seconds": 0.0}


def _run_with_fake_checks(monkeypatch, capsys, *, device, skip, nproc) -> str:
    """run_parity's output with every check replaced by one passing row of its kind (the graph
    check's kind is graph on CUDA, replay-path on a CPU, as check_graphs names them)."""
    monkeypatch.setattr(cli, "check_mode", lambda mode, count, seed: {
        "mode": mode, "cases": count, "mismatches": 0, "seconds": 0.0, "first": None})
    monkeypatch.setattr(cli, "check_models", lambda device, dtype: iter([_fake_row(
        f"model {dtype}")]))
    monkeypatch.setattr(cli, "graph_skip_reason", lambda device: skip)
    monkeypatch.setattr(cli, "check_graphs", lambda dtype, device: iter([_fake_row(
        "graph" if device == "cuda" else "replay-path")]))
    monkeypatch.setattr(cli, "check_expert_parallel", lambda nproc, device: iter([_fake_row(
        f"ep {nproc} ranks")]))
    assert cli.run_parity(1, 0, model=True, device=device, nproc=nproc) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("device,skip,nproc", [
    ("cpu", "", 1), ("cpu", "", 2), ("cuda", "", 1), ("cuda", "", 4),
    ("cuda", "torch sees no CUDA device", 1)],
    ids=["cpu", "cpu-ep", "cuda", "cuda-ep", "cuda-skipped"])
def test_the_legend_describes_only_the_row_kinds_printed(device, skip, nproc, monkeypatch,
                                                          capsys):
    out = _run_with_fake_checks(monkeypatch, capsys, device=device, skip=skip, nproc=nproc)
    assert legend_drift(out) == [], out


def test_the_legend_check_reports_a_line_for_a_kind_not_printed(monkeypatch, capsys):
    """A legend of every kind whatever was printed (as it was before) fails the check on a CPU
    run without expert parallelism: no graph and no ep rows were printed."""
    monkeypatch.setattr(cli, "legend", lambda rows: "\n".join(cli.LEGEND.values()))
    out = _run_with_fake_checks(monkeypatch, capsys, device="cpu", skip="", nproc=1)
    assert legend_drift(out) == [f"legend describes {kind} rows, none printed"
                                 for kind in ("ep", "graph")]
