"""`tbo-parity run --nproc N` and `tbo-parity timeline`: expert-parallel rows in the main job,
and the overlap picture (on a CPU, of a tiny model)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

from tbo_parity import cli
from tbo_parity.parity_tests import background
from tbo_parity.parity_tests.timeline import intervals_from_json


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tbo_parity.cli", *args],
                          capture_output=True, text=True)


def _report(rank, rows):
    return {"rank": rank, "world_size": 2, "rows": rows}


def test_expert_parallel_rows_group_every_rank_and_count_failures(monkeypatch):
    """One row per (check, transport) over all ranks: a row over the bound or with an unequal
    expert load is a mismatch; the worst error is reported. (The launch itself and the real
    checks are tested in parity_tests/test_expert_parallel.py.)"""
    from tbo_parity.parity_tests import ep_parity

    good = {"check": "model", "name": "decode", "tbo": True, "transport": "all_to_all",
            "error": 1e-6, "expert_load_equal": True}
    reports = [_report(0, [good, {"check": "layer", "name": "uniform", "tokens": 4,
                                  "transport": "all_to_all", "error": 2e-7},
                           {"check": "layer-transports", "name": "uniform",
                            "bitwise_equal": True}]),
               _report(1, [good | {"error": 3e-5}, good | {"expert_load_equal": False,
                                                          "name": "extend"}])]
    seen = {}

    def fake_launch(nproc, out_dir, args, *, timeout_s):
        seen.update(nproc=nproc, args=args)
        return reports

    monkeypatch.setattr(ep_parity, "check_launch", fake_launch)
    rows = {row["mode"]: row for row in cli.check_expert_parallel(2, "cpu")}
    assert seen == {"nproc": 2, "args": []}
    assert set(rows) == {"model all_to_all", "layer all_to_all"}
    model = rows["model all_to_all"]
    assert (model["cases"], model["mismatches"], model["worst"]) == (3, 2, 3e-5)
    assert any("rank 1 decode tbo: error 3.00e-05" in line for line in model["failures"])
    assert any("rank 1 extend" in line and "False" in line for line in model["failures"])
    assert rows["layer all_to_all"]["mismatches"] == 0
    list(cli.check_expert_parallel(2, "cuda"))
    assert "--graphs" in seen["args"] and ("--dispatchers=packed/all_to_all,packed/exact,"
                                           "capacity/all_to_all,capacity/copy_engine"
                                           in seen["args"])


def test_a_launch_failure_is_a_failing_row(monkeypatch):
    from tbo_parity.parity_tests import ep_parity

    def failing(*args, **kwargs):
        raise RuntimeError("rank 1 exited with 1\n--- rank 1 ---\nboom")

    monkeypatch.setattr(ep_parity, "check_launch", failing)
    (row,) = cli.check_expert_parallel(2, "cpu")
    assert row["mismatches"] == 1 and "rank 1 exited with 1" in row["failures"][0]


def test_a_failing_expert_parallel_row_fails_the_run(monkeypatch, capsys):
    bad = {"mode": "model all_to_all", "kind": "ep 2 ranks", "cases": 24, "mismatches": 1,
           "seconds": 1.0, "worst": 0.5, "failures": ["rank 0 decode: error 5.00e-01"]}
    monkeypatch.setattr(cli, "check_expert_parallel", lambda nproc, device: iter([bad]))
    monkeypatch.setattr(cli, "check_models", lambda device, dtype: iter([]))
    assert cli.run_parity(1, 0, model=True, nproc=2) == 1
    out = capsys.readouterr().out
    assert "expert parallelism on 2 ranks" in out
    assert "first failing expert-parallel check" in out and "rank 0 decode" in out
    assert out.rstrip().endswith("FAIL")


@background.job("cli-timeline",
                background.reads(__name__, "test_timeline_writes_a_png_and_its_intervals"))
def _timeline_command() -> tuple:
    """(result, the PNG's first 8 bytes, the JSON beside it) of `tbo-parity timeline` into a
    fresh folder; a background job (parity_tests/background.py): 4 s on 2 cores."""
    with tempfile.TemporaryDirectory() as folder:
        out = pathlib.Path(folder) / "pictures" / "step.png"
        result = background.command([sys.executable, "-m", "tbo_parity.cli", "timeline",
                                     "--nproc=2", "--tokens=4", f"--out={out}"])
        if result.returncode != 0:
            return result, None, None
        return result, out.read_bytes()[:8], out.with_suffix(".json").read_text()


def test_timeline_writes_a_png_and_its_intervals():
    result, png_head, intervals_json = background.result("cli-timeline")
    assert result.returncode == 0, result.stderr
    assert png_head == b"\x89PNG\r\n\x1a\n"
    intervals = intervals_from_json(json.loads(intervals_json))
    # both micro-batches ran every stage of the decode layout in every layer
    assert {i.micro_batch for i in intervals} == {"a", "b"}
    for mb in "ab":
        stages = [i for i in intervals if i.micro_batch == mb and i.lane == "compute"]
        assert len(stages) == benchmark_layers() * cli_stage_count()
    assert "wrote" in result.stdout


def benchmark_layers() -> int:
    from tbo_parity.benchmarks.overlap import _flags

    return _flags()["layers"].default


def cli_stage_count() -> int:
    from tbo_parity.torch_impl.model import LAYOUTS

    return LAYOUTS["decode"].count("|")


@pytest.mark.parametrize("args,words", [
    (["run", "--nomodel", "--nproc=2"], "--nomodel"),
    (["verify", "--nproc=2"], "--nproc applies to `tbo-parity run`"),
    (["timeline", "--out=picture.jpg"], ".png"),
    (["timeline", "--transport=copy_engine"], "--device=cuda"),
    (["timeline", "--cases_per_mode=3"], "--cases_per_mode applies to `tbo-parity run`"),
    (["run", "--nproc=0"], "--nproc"),
])
def test_bad_usage_is_one_line_and_exit_two(args, words):
    result = _cli(*args)
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr


def test_nproc_not_dividing_the_experts_is_a_usage_error_before_any_work():
    """The expert count is the EP model's (what ep_parity's ranks build), not a constant here."""
    from tbo_parity.parity_tests import model_parity as mp

    experts = cli.ep_num_experts()
    assert experts == mp.make_models(0)[1].num_experts
    nproc = next(n for n in range(2, experts + 2) if experts % n)
    result = _cli("run", f"--nproc={nproc}")
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"tbo-parity: --nproc={nproc} ")
    assert f"{experts} experts" in result.stderr and "Traceback" not in result.stderr


def test_the_nproc_check_follows_the_expert_count(monkeypatch):
    monkeypatch.setattr(cli, "ep_num_experts", lambda: 6)
    cli.check_nproc_divides_experts(3)
    cli.check_nproc_divides_experts(6)
    with pytest.raises(cli.CommandLineError, match="--nproc=4 must divide the model's 6 "
                                                   "experts.*1, 2, 3, 6$"):
        cli.check_nproc_divides_experts(4)


@pytest.fixture
def no_recording(monkeypatch):
    """Any launch of ranks fails the test: the errors below come before recording."""
    from tbo_parity.parity_tests import ep_parity

    def launch(*args, **kwargs):
        raise AssertionError("recorded before checking the command line")

    monkeypatch.setattr(ep_parity, "launch", launch)


def _one_line_exit_two(argv, capsys) -> str:
    assert cli._main(["tbo-parity", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("tbo-parity: ")
    return err


def test_timeline_without_matplotlib_says_how_to_install_it(no_recording, monkeypatch, capsys,
                                                            tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises
    err = _one_line_exit_two(["timeline", f"--out={tmp_path / 'step.png'}"], capsys)
    assert 'pip install ".[viz]"' in err
    assert list(tmp_path.iterdir()) == []


def _file_in_the_way(tmp_path):
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "pictures" / "step.png"


def _a_directory(tmp_path):
    (tmp_path / "step.png").mkdir()
    return tmp_path / "step.png"


def _unwritable_folder(tmp_path):
    (tmp_path / "locked").mkdir(mode=0o500)
    return tmp_path / "locked" / "pictures" / "step.png"


@pytest.mark.parametrize("make_out", [
    _file_in_the_way, _a_directory,
    pytest.param(_unwritable_folder, marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root writes into a folder of mode 0500")),
], ids=["file-in-the-way", "a-directory", "unwritable-folder"])
def test_an_out_that_cannot_be_written_is_a_usage_error_before_recording(
        make_out, no_recording, capsys, tmp_path):
    out = make_out(tmp_path)
    err = _one_line_exit_two(["timeline", f"--out={out}"], capsys)
    assert err.startswith(f"tbo-parity: --out={out}: ")


def test_upstream_is_dispatched_with_its_own_flags():
    """`tbo-parity upstream` runs parity_tests/upstream's command: its own usage errors
    (the command itself is tested in parity_tests/test_upstream.py)."""
    for args, says in [((), "--sglang_version"), (("--nproc=2",), "nproc"),
                       (("--sglang_source=/no/such/sglang",),
                        "--sglang_source=/no/such/sglang: no such file or directory")]:
        result = _cli("upstream", *args)
        assert (result.returncode, result.stdout) == (2, ""), args
        assert result.stderr.startswith("tbo-parity: ") and says in result.stderr, args
        assert result.stderr.count("\n") == 1, result.stderr


@background.job("cli-upstream",
                background.reads(__name__, "test_upstream_says_what_it_does_on_stderr_first"))
def _upstream_command() -> tuple:
    """(the source file, result) of `tbo-parity upstream` on a faithful module; a background
    job (parity_tests/background.py): 11 s on 2 cores."""
    from parity_tests.test_upstream import FAITHFUL

    with tempfile.TemporaryDirectory() as folder:
        source = pathlib.Path(folder) / "two_batch_overlap.py"
        source.write_text(FAITHFUL)
        return source, background.command([sys.executable, "-m", "tbo_parity.cli", "upstream",
                                           f"--sglang_source={source}", "--cases_per_mode=1"])


def test_upstream_says_what_it_does_on_stderr_first():
    """Its first line on stderr names the first phase, printed before that phase's work (the
    phases themselves: parity_tests/test_upstream.py)."""
    source, result = background.result("cli-upstream")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("tbo-parity upstream: computing the spec's outcomes (1 batch per mode")
    assert lines[1:] == [f"tbo-parity upstream: reading {source}",
                         f"tbo-parity upstream: lifting the split functions of {source}",
                         lines[3]] and lines[3].endswith(f"cases through {source} and the spec")
    assert "verdict: AGREES" in result.stdout
