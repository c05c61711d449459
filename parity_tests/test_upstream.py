"""The upstream checker (parity_tests/upstream/): its loader and comparator on small modules
written here, and once on a real SGLang release.

The modules below are written from docs/spec.md, in the shape of an SGLang release's split
module (the function names and parameters upstream uses), not copied from SGLang. Only
``test_a_real_release_*`` needs the network (or a wheel in the cache); it skips, saying why,
when the package index cannot be reached, and only then.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from tbo_parity.parity_tests.split_parity import SplitCase  # noqa: F401 (eval of pasted literals)
from tbo_parity.parity_tests.upstream import batches, classify, fetch, lift, stand_ins
from tbo_parity.parity_tests.upstream import cli as upstream_cli
from tbo_parity.parity_tests.upstream.report import format_report

# A split module that follows the spec (the default rule, "two_chunk"), IDLE replay included.
FAITHFUL = '''
import itertools

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # never executed


def get_token_num_per_seq(forward_mode: ForwardMode, spec_info=None):
    if forward_mode.is_target_verify():
        return spec_info.draft_token_num
    return {ForwardMode.DECODE: 1, ForwardMode.IDLE: 0}.get(forward_mode)


def compute_split_seq_index(forward_mode, num_tokens, extend_lens, token_num_per_seq):
    if forward_mode == ForwardMode.EXTEND:
        assert extend_lens is not None
        return _split_extend_seqs(extend_lens)
    if forward_mode in (ForwardMode.DECODE, ForwardMode.TARGET_VERIFY):
        assert token_num_per_seq
        return num_tokens // token_num_per_seq // 2
    if forward_mode == ForwardMode.IDLE:
        assert num_tokens == 0
        return 0
    raise NotImplementedError(forward_mode)


def _is_two_chunk_split_enabled(extend_lens):
    total = sum(extend_lens)
    left = sum(extend_lens[:_split_array_by_balanced_sum(extend_lens)])
    share = get_tbo_token_distribution_threshold()
    return not (total * share <= left <= total * (1 - share))


def _split_extend_seqs(arr):
    if _is_two_chunk_split_enabled(arr):
        return _split_array_by_cum_less_than_half(arr)
    return _split_array_by_balanced_sum(arr)


def _split_array_by_cum_less_than_half(arr):
    half = sum(arr) // 2
    for index, running in enumerate(itertools.accumulate(arr)):
        if running > half:
            return index
    return 0


def _split_array_by_balanced_sum(arr):
    total, best, best_diff, left = sum(arr), 0, None, 0
    for index in range(1, len(arr)):
        left += arr[index - 1]
        diff = abs(2 * left - total)
        if best_diff is not None and diff > best_diff:
            break
        best, best_diff = index, diff
    return best


def _compute_mask_offset(seq_index, spec_info):
    d = spec_info.draft_token_num
    return int(sum((int(n) + d) * d for n in spec_info.seq_lens_cpu[:seq_index]))


def compute_split_token_index(split_seq_index, forward_mode, extend_seq_lens, token_num_per_seq):
    if forward_mode == ForwardMode.EXTEND:
        assert extend_seq_lens is not None
        if _is_two_chunk_split_enabled(extend_seq_lens):
            return sum(extend_seq_lens) // 2
        return sum(extend_seq_lens[:split_seq_index])
    if forward_mode in (ForwardMode.DECODE, ForwardMode.TARGET_VERIFY):
        return split_seq_index * token_num_per_seq
    assert forward_mode == ForwardMode.IDLE and split_seq_index == 0
    return 0


def compute_split_indices_for_cuda_graph_replay(forward_mode, cuda_graph_num_tokens, spec_info):
    if forward_mode == ForwardMode.IDLE:  # the spec's choice: IDLE replays as DECODE
        forward_mode, per_seq = ForwardMode.DECODE, 1
    else:
        per_seq = get_token_num_per_seq(forward_mode, spec_info)
    seq = compute_split_seq_index(forward_mode, cuda_graph_num_tokens, None, per_seq)
    return seq, compute_split_token_index(seq, forward_mode, None, per_seq)


class TboForwardBatchPreparer(SomeSGLangBase):  # the base is dropped by the loader
    @staticmethod
    def _split_num_token_non_padded(*, tbo_split_token_index, num_token_non_padded):
        return (min(tbo_split_token_index, num_token_non_padded),
                max(0, num_token_non_padded - tbo_split_token_index))

    def filter_batch(self, batch):  # known, outside the spec: never lifted
        raise RuntimeError("not lifted")


class TboDPAttentionPreparer:
    @staticmethod
    def _compute_global_forward_mode(forward_modes):
        busy = [mode for mode in forward_modes if mode != ForwardMode.IDLE.value]
        if not busy:
            return ForwardMode.IDLE, False
        agree = len(set(busy)) == 1
        return (ForwardMode(busy[0]) if agree else None), agree
'''

# The same, with the old, narrower signatures and the balanced split only (no two-chunk, no
# speculative verify): the rule "balanced".
BALANCED_ONLY = '''
def compute_split_seq_index(forward_mode, num_tokens, extend_lens):
    if forward_mode.is_extend():
        assert extend_lens is not None
        return _split_array_by_half_sum(extend_lens)
    if forward_mode.is_decode():
        return num_tokens // 2
    if forward_mode.is_idle():
        assert num_tokens == 0
        return 0
    raise NotImplementedError()


def _split_array_by_half_sum(arr):
    total, best, best_diff, left = sum(arr), 0, None, 0
    for index in range(1, len(arr)):
        left += arr[index - 1]
        diff = abs(2 * left - total)
        if best_diff is not None and diff > best_diff:
            break
        best, best_diff = index, diff
    return best


def compute_split_token_index(split_seq_index, forward_mode, extend_seq_lens):
    if forward_mode.is_extend():
        return sum(extend_seq_lens[:split_seq_index])
    if forward_mode.is_decode():
        return split_seq_index
    assert split_seq_index == 0
    return 0
'''


@pytest.fixture(scope="module")
def probes():
    """A small run's probes (every function, every mode; 25 generated batches per mode)."""
    return batches.all_probes(batches.SpecSide(), cases_per_mode=25, seed=0, max_graph_bs=24)


def load(tmp_path, text, name="two_batch_overlap.py"):
    path = tmp_path / name
    path.write_text(text)
    return lift.load_release(fetch.read_source(path))


def test_the_loader_lifts_every_role_of_a_faithful_module_without_importing_sglang(tmp_path):
    release = load(tmp_path, FAITHFUL)
    assert release.absent == []
    assert all(not loaded.problem and not loaded.renamed for loaded in release.roles.values())
    assert release.unknown == []  # filter_batch is known (outside the spec), not unknown
    assert release.forward_mode is stand_ins.StandInForwardMode
    assert release.roles["split_seq_index"].signature == (
        "compute_split_seq_index(forward_mode, num_tokens, extend_lens, token_num_per_seq)")


def test_a_faithful_module_agrees_under_the_default_rule(tmp_path, probes):
    report = classify.compare(load(tmp_path, FAITHFUL), probes)
    assert report.rule == "two_chunk" and report.ok, format_report(report)
    assert report.rule_counts["balanced"] > 0  # the probes tell the rules apart
    assert report.rule_counts["guarded_two_chunk"] > 0
    for role, result in report.results.items():
        assert result.cases > 0 and result.differ == 0, role
    replay = report.results["replay_split"]
    assert not any("IDLE" in reason for reason in replay.expected)  # it replays IDLE as DECODE
    assert any("validation" in reason for reason in report.results["split_seq_index"].expected)
    assert any("MIXED" in reason for reason in report.results["split_seq_index"].expected)


def test_a_planted_off_by_one_is_found_with_a_pasteable_case(tmp_path, probes):
    planted = FAITHFUL.replace("if running > half:", "if running >= half:")
    assert planted != FAITHFUL
    release = load(tmp_path, planted)
    report = classify.compare(release, probes)
    assert not report.ok
    result = report.results["cum_half_split"]
    assert result.differ > 0 and result.examples
    literal, ours, theirs = result.examples[0]
    case = eval(literal)  # a SplitCase literal, pasteable into a test
    assert isinstance(case, SplitCase) and ours != theirs
    (again,) = [p for p in batches.case_probes(batches.SpecSide(), case)
                if p.role == "cum_half_split"]
    assert again.spec("two_chunk") != classify.upstream_outcome(release, again, "two_chunk")
    assert "first disagreements:" in format_report(report)


def test_the_cli_exits_0_on_a_faithful_module_and_1_on_a_planted_bug(tmp_path, capsys):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(FAITHFUL)
    bad.write_text(FAITHFUL.replace("if running > half:", "if running >= half:"))
    flags = ["--cases_per_mode=10", "--examples=1"]
    assert upstream_cli.main(["upstream", f"--sglang_source={good}", *flags]) == 0
    assert "verdict: AGREES" in capsys.readouterr().out
    assert upstream_cli.main(["upstream", f"--sglang_source={bad}", *flags]) == 1
    out = capsys.readouterr().out
    assert "first disagreements:" in out and "SplitCase(" in out


def test_a_renamed_function_is_absent_and_its_new_name_unknown(tmp_path, probes):
    renamed = FAITHFUL.replace("_split_array_by_balanced_sum", "_split_array_by_even_sum")
    release = load(tmp_path, renamed)
    assert release.absent == ["balanced_split"]
    assert release.unknown == ["_split_array_by_even_sum"]
    report = classify.compare(release, probes)  # its callers still run (lifted as helpers)
    assert report.ok and report.results["extend_split"].agree > 0
    assert "balanced_split       (absent)" in format_report(report)


def test_an_older_name_is_reported_as_a_rename(tmp_path):
    release = load(tmp_path, FAITHFUL.replace("_split_array_by_balanced_sum",
                                              "_split_array_by_half_sum"))
    assert release.roles["balanced_split"].renamed
    assert release.unknown == []


def test_a_function_needing_what_the_stand_ins_lack_is_reported_not_run(tmp_path, probes):
    text = FAITHFUL.replace("    d = spec_info.draft_token_num\n",
                            "    d = sglang_only_helper(spec_info)\n")
    release = load(tmp_path, text)
    assert "sglang_only_helper" in release.roles["mask_offset"].problem
    report = classify.compare(release, probes)
    assert "mask_offset" not in report.results or report.results["mask_offset"].cases == 0
    assert "not run: uses sglang_only_helper" in format_report(report)


def test_old_signatures_are_bound_by_name_and_match_the_balanced_rule(tmp_path, probes):
    release = load(tmp_path, BALANCED_ONLY)
    assert release.roles["balanced_split"].renamed
    assert set(release.absent) >= {"two_chunk", "token_num_per_seq", "replay_split"}
    report = classify.compare(release, probes)
    assert report.rule == "balanced" and report.ok, format_report(report)
    expected = report.results["split_seq_index"].expected
    assert any("TARGET_VERIFY, a mode this release does not have yet" in r for r in expected)


def test_a_source_tree_is_searched_for_the_module(tmp_path):
    (tmp_path / "pkg" / "srt" / "batch_overlap").mkdir(parents=True)
    (tmp_path / "pkg" / "other.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "srt" / "batch_overlap" / "two_batch_overlap.py").write_text(FAITHFUL)
    source = fetch.read_source(tmp_path)
    assert source.module_path.endswith("batch_overlap/two_batch_overlap.py")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "other.py").write_text("x = 1\n")
    with pytest.raises(fetch.SourceError, match="no file defines compute_split_seq_index"):
        fetch.read_source(tmp_path / "elsewhere")


def _never(*args, **kwargs):
    raise AssertionError("work started after a usage error")


def test_usage_errors_exit_2_with_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """Run as `python -m tbo_parity.parity_tests.upstream` they start with "upstream:" (as
    `tbo-parity upstream`, with "tbo-parity:", parity_tests/test_cli_ep.py); a missing --sglang_source is
    refused before the spec's side is built or anything is fetched."""
    for name in ("SpecSide", "all_probes", "fetch_release", "read_source", "load_release"):
        monkeypatch.setattr(upstream_cli, name, _never)
    missing = tmp_path / "missing.py"
    for args, says in [([], "give --sglang_version=V"), (["--cases_per_mode=0"], "cases_per_mode"),
                       ([f"--sglang_source={missing}", "--cases_per_mode=1"],
                        f"--sglang_source={missing}: no such file or directory"),
                       (["--sglang_version=0.4.7", f"--sglang_source={missing}"],
                        "no such file or directory")]:
        assert upstream_cli.main(["upstream", *args]) == 2, args
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, (args, out, err)
        assert err.startswith("upstream: ") and says in err, (args, err)
    assert upstream_cli.main(["upstream", f"--sglang_source={missing}"], prog="tbo-parity") == 2
    assert capsys.readouterr().err == (
        f"tbo-parity: --sglang_source={missing}: no such file or directory\n")


def test_python_m_keeps_its_own_prefix():
    result = subprocess.run([sys.executable, "-m", "tbo_parity.parity_tests.upstream"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "upstream: give --sglang_version=V (repeatable) or --sglang_source=PATH\n")


def test_each_phase_says_so_on_stderr_before_it_starts(tmp_path, capsys, monkeypatch, probes):
    """Progress: one line per phase on stderr, each printed before its phase's work starts;
    the first before the spec's side (JAX) is built. A release from the cache (a wheel put
    there: offline) and a source on disk."""
    wheel = tmp_path / "cache" / "9.9.9" / "sglang-9.9.9-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("sglang/srt/two_batch_overlap.py", FAITHFUL)
    source = tmp_path / "two_batch_overlap.py"
    source.write_text(FAITHFUL)
    out, err, started = [], [], []  # stdout, stderr so far; (phase, the last stderr line)

    def announced(name, function):
        def wrapped(*args, **kwargs):
            now = capsys.readouterr()
            out.append(now.out)
            err.extend(now.err.splitlines())
            started.append((name, err[-1] if err else None))
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(upstream_cli, "all_probes", lambda *args: probes)  # a small run
    for name in ("SpecSide", "fetch_release", "read_source", "load_release", "compare"):
        monkeypatch.setattr(upstream_cli, name, announced(name, getattr(upstream_cli, name)))
    status = upstream_cli.main(["tbo-parity upstream", "--sglang_version=9.9.9",
                            f"--sglang_source={source}", f"--cache_dir={tmp_path / 'cache'}"],
                           prog="tbo-parity")
    assert status == 0
    now = capsys.readouterr()
    err.extend(now.err.splitlines())
    assert "".join(out + [now.out]).count("verdict: AGREES") == 2
    spec = ("tbo-parity upstream: computing the spec's outcomes (1000 batches per mode, "
            "replays, data-parallel reports, bad input)")
    fetching = f"tbo-parity upstream: fetching sglang==9.9.9 (cached at {wheel})"
    lifting = "tbo-parity upstream: lifting the split functions of "
    running = f"tbo-parity upstream: running {len(probes)} cases through "
    assert started == [
        ("SpecSide", spec), ("fetch_release", fetching), ("read_source", fetching),
        ("load_release", lifting + "sglang/srt/two_batch_overlap.py"),
        ("compare", running + "sglang 9.9.9 and the spec"),
        ("read_source", f"tbo-parity upstream: reading {source}"),
        ("load_release", lifting + str(source)),
        ("compare", running + f"{source} and the spec")]
    assert err == [spec, fetching, lifting + "sglang/srt/two_batch_overlap.py",
                   running + "sglang 9.9.9 and the spec", f"tbo-parity upstream: reading {source}",
                   lifting + str(source), running + f"{source} and the spec"]


@pytest.mark.parametrize("count", [1, 2, 1000])
def test_the_spec_phase_counts_its_batches_in_the_right_number(count, capsys, monkeypatch):
    """One batch per mode is "1 batch", any other count "N batches"."""
    monkeypatch.setattr(upstream_cli, "SpecSide", lambda: None)
    monkeypatch.setattr(upstream_cli, "all_probes", lambda *args: [])

    def unread(path, label):  # stop after the spec's phase
        raise fetch.SourceError("not read here")

    monkeypatch.setattr(upstream_cli, "read_source", unread)
    assert upstream_cli.main(["upstream", f"--sglang_source={__file__}",
                              f"--cases_per_mode={count}"]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    noun = "batch" if count == 1 else "batches"
    assert f"({count} {noun} per mode," in first, first


def test_a_release_not_cached_says_where_it_is_fetched_to(tmp_path, capsys, monkeypatch):
    def unreachable(version, cache_dir):
        raise fetch.SourceError(f"could not fetch sglang=={version}: no network", True)

    monkeypatch.setattr(upstream_cli, "SpecSide", lambda: None)
    monkeypatch.setattr(upstream_cli, "all_probes", lambda *args: [])
    monkeypatch.setattr(upstream_cli, "fetch_release", unreachable)
    assert upstream_cli.main(["upstream", "--sglang_version=9.9.9",
                          f"--cache_dir={tmp_path}"]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines()[1] == (
        f"upstream: fetching sglang==9.9.9 into {tmp_path / '9.9.9'} (pip download --no-deps)")
    assert out == "== sglang 9.9.9\nerror: could not fetch sglang==9.9.9: no network\n\n"


def test_a_real_release_is_loaded_from_its_wheel_and_matches_its_rule():
    """SGLang 0.4.7 (a small wheel): the balanced rule, no TARGET_VERIFY, and the
    data-parallel agreement of its time, the rule "idle_as_decode" (an all-idle step runs TBO
    as DECODE): named, and the release agrees."""
    try:
        wheel = fetch.fetch_release("0.4.7", upstream_cli.FLAGS["cache_dir"].default)
    except fetch.SourceError as error:
        if not error.unreachable:
            raise
        pytest.skip(f"the package index cannot be reached: {error}")
    release = lift.load_release(fetch.read_source(wheel, "sglang 0.4.7"))
    assert release.source.module_path == "sglang/srt/two_batch_overlap.py"
    assert release.forward_mode_origin.endswith("forward_batch_info.py")
    assert release.roles["balanced_split"].renamed and "two_chunk" in release.absent
    assert release.unknown == []
    report = classify.compare(release, batches.all_probes(batches.SpecSide(), 10, 0, 24))
    assert report.rule == "balanced", format_report(report)
    assert report.dp_rule == "idle_as_decode" and report.ok, format_report(report)
    assert report.dp_rule_counts["idle_left_out"] > 0  # the current rule would not fit
    dp = report.results["dp_agreement"]
    assert dp.differ == 0 and dp.agree == dp.cases > 0
