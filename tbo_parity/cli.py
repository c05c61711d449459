"""`tbo-parity`: check the PyTorch implementation of two-batch overlap against the JAX spec.

    tbo-parity run [--cases_per_mode=1000] [--seed=0] [--device=cpu] [--dtype=float32]
                   [--nomodel] [--nproc=1]
    tbo-parity verify [--max_seqs=5] [--max_len=12] [--max_bs=256] [--max_draft=8]
                      [--max_graph_bs=256] [--workers=N]
    tbo-parity timeline [--nproc=1] [--device=cpu] [--tokens=1024] [--transport=copy_engine]
                        [--out=timeline.png]
    tbo-parity upstream --sglang_version=V | --sglang_source=PATH [--cases_per_mode=1000]
                        [--seed=0] [--examples=3] [--cache_dir=DIR]
    tbo-parity --help

`run` prints one row per check as it completes:

1. *Split parity*: splits generated batches of every mode on both sides (and through
   TboForwardBatchPreparer) and counts disagreements.
2. *Model parity* (unless ``--nomodel``): runs the small MoE model on each named scenario four
   ways (JAX spec plain and TBO, PyTorch plain and TBO) and reports the max relative errors
   between them against the bound of the dtype (float32 1e-5, bfloat16 2e-2).
3. *Graph replay parity* (unless ``--nomodel``): a DECODE and a TARGET_VERIFY batch padded
   into a graph and one of the graph's exact size, plain and with TBO, against the eager
   forward and the JAX spec; replayed from CUDA graphs with ``--device=cuda`` (`graph` rows),
   through the runner's replay path with the captured forward called eagerly on a CPU
   (`replay-path` rows).
4. *Expert parallelism* (with ``--nproc`` above 1): model parity on that many ranks, as
   processes (parity_tests/ep_parity.py), each rank's outputs and expert load against the
   single-device spec on its own batch (`ep` rows).

A legend under the tables says what each kind of row printed compares, and says nothing of a
kind not printed.

It exits 1 on any mismatch, after printing what failed and a reproducer: the first mismatching
split as a `SplitCase(...)` literal to paste into a test, or the failing model scenario as a
`ModelCase(...)` literal with the comparison, tensor and error that failed.

`verify` checks *every* batch within small bounds instead of a sample
(parity_tests/exhaustive.py): the JAX spec vmapped over all of them, the implementation batch
by batch in worker processes, every index and child field compared and the spec's invariants
asserted. It prints a row per family, the batches per second of each side, and exits 1 with the
first counterexample as a `SplitCase(...)` literal on any disagreement.

`timeline` records one TBO decode step on ``--nproc`` ranks (benchmarks/overlap.py) and draws
it as a PNG with its intervals as JSON next to it (parity_tests/timeline.py); it needs the viz
extra (``pip install ".[viz]"``, matplotlib).

`upstream` checks SGLang releases' split functions against the spec (parity_tests/upstream/,
docs/upstream.md); it has flags of its own.

Exit status: 0 all agree, 1 a mismatch (with a reproducer), 2 bad usage, 130 interrupted
(Ctrl-C), 141 stdout closed early (as `tbo-parity --help | head -1` does; quietly, like a
tool that SIGPIPE ends). Bad flags or commands, and what can be known wrong before any work
(``--nproc`` not dividing the model's experts, no matplotlib for `timeline`, an ``--out`` that
cannot be written), print one line and exit 2 before anything runs. torch and JAX are imported
only by the command that needs them, so `--help` answers at once.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

FLAGS = flags.FlagValues()  # this command's own flags, not absl's global registry
flags.DEFINE_integer("cases_per_mode", 1000, "run: generated batches per forward mode.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "run: seed of the batch generator.", lower_bound=0,
                     upper_bound=2**63 - 1, flag_values=FLAGS)
flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "where the PyTorch model runs.",
                  flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "the PyTorch model's dtype.",
                  flag_values=FLAGS)
flags.DEFINE_bool("model", True, "run: also check model outputs (--nomodel: split parity only).",
                  flag_values=FLAGS)
flags.DEFINE_integer("max_seqs", 5, "verify: EXTEND batches of 1..max_seqs sequences.",
                     lower_bound=1, upper_bound=7, flag_values=FLAGS)
flags.DEFINE_integer("max_len", 12, "verify: EXTEND lengths 1..max_len.", lower_bound=1,
                     upper_bound=64, flag_values=FLAGS)
flags.DEFINE_integer("max_bs", 256, "verify: DECODE/TARGET_VERIFY batch sizes 0..max_bs.",
                     lower_bound=1, upper_bound=4096, flag_values=FLAGS)
flags.DEFINE_integer("max_draft", 8, "verify: draft token counts 1..max_draft.", lower_bound=1,
                     upper_bound=64, flag_values=FLAGS)
flags.DEFINE_integer("max_graph_bs", 256, "verify: captured graph sizes 1..max_graph_bs, each "
                     "with every real batch size 0..size.", lower_bound=1, upper_bound=2048,
                     flag_values=FLAGS)
flags.DEFINE_integer("nproc", 1, "expert-parallel ranks (run: model parity on them; "
                     "timeline: the recorded step's).",
                     lower_bound=1, upper_bound=64, flag_values=FLAGS)
flags.DEFINE_string("out", "timeline.png", "timeline: the PNG to write (its JSON next to it).",
                    flag_values=FLAGS)
flags.DEFINE_integer("tokens", 1024, "timeline: decode tokens per rank of the recorded step.",
                     lower_bound=2, flag_values=FLAGS)
flags.DEFINE_enum("transport", "copy_engine", ["copy_engine", "all_to_all"],
                  "timeline: the expert-parallel transport.", flag_values=FLAGS)
flags.DEFINE_integer("workers", None, "verify: processes running the implementation "
                     "(default: one per CPU; 1 runs it in this process).", lower_bound=1,
                     flag_values=FLAGS)

COMMANDS = {
    "run": ("Split, model, graph-replay and (--nproc) expert-parallel parity of spec and "
            "implementation.",
            ("cases_per_mode", "seed", "device", "dtype", "model", "nproc")),
    "verify": ("Every batch within small bounds, spec against implementation.",
               ("max_seqs", "max_len", "max_bs", "max_draft", "max_graph_bs", "workers")),
    "timeline": ("Record one TBO decode step on N ranks and draw its timeline (a PNG).",
                 ("nproc", "device", "tokens", "transport", "out")),
    # its own flags (parity_tests/upstream/cli.py), listed in the help from there
    "upstream": ("Check SGLang releases' split functions against the spec (docs/upstream.md).",
                 ()),
}
EXAMPLES = ("tbo-parity run", "tbo-parity run --nomodel --cases_per_mode=5000",
            "tbo-parity run --device=cuda --dtype=bfloat16", "tbo-parity verify",
            "tbo-parity verify --max_seqs=6 --max_len=8", "tbo-parity run --nproc=4",
            "tbo-parity timeline --nproc=2 --device=cuda --out=docs/timeline.png",
            "tbo-parity upstream --sglang_version=0.5.23 --sglang_version=0.4.7")
HELP_ARGS = ("-h", "--help", "--helpshort", "--helpfull", "-?", "help")
MODEL_BOUNDS = {"float32": "1e-5", "bfloat16": "2e-2"}  # model_parity.BOUNDS, as printed
BOUNDS_TEXT = ", ".join(f"{dtype} {bound}" for dtype, bound in MODEL_BOUNDS.items())


class CommandLineError(Exception):
    """A bad command or flag: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Help and argument checks.
# ---------------------------------------------------------------------------------------------


def doc_summary_and_usage() -> tuple:
    """(summary line, usage lines) of this module's docstring, the source of ``--help``'s
    description: its first line and its indented synopsis (one entry per command)."""
    doc = __doc__ or ""  # None under python -OO: the help then starts at its command list
    summary, _, rest = doc.partition("\n\n")
    synopsis = rest.split("\n\n", 1)[0] if rest.startswith("    ") else ""
    return summary.replace("`", ""), [line[4:] for line in synopsis.splitlines()]


def help_text() -> str:
    summary, usage = doc_summary_and_usage()
    lines = [summary, "", "usage:"] + [f"  {line}" for line in usage] + ["", "commands:"]
    for name, (summary, _) in COMMANDS.items():
        lines.append(f"  {name:<8} {summary}")
    from tbo_parity.parity_tests import upstream  # light: its heavy imports are deferred

    for name, (_, names) in COMMANDS.items():
        lines += ["", f"flags of {name}:"]
        if name == "upstream":
            for flag in upstream.FLAGS.flags_by_module_dict()[upstream.cli.__name__]:
                shown = f"--{flag.name}"
                help_ = flag.help.split(";\n", 1)[0]  # without absl's "repeat this option"
                lines.append(f"  {shown:<18} {help_} (default: {flag.default})")
            continue
        for flag_name in names:
            flag = FLAGS[flag_name]
            shown = f"--[no]{flag_name}" if flag_name == "model" else f"--{flag_name}"
            help_ = _help_for(flag, name)
            values = getattr(flag.parser, "enum_values", None)
            if values:
                help_ += f" One of {', '.join(values)}."
            lines.append(f"  {shown:<18} {help_} (default: {flag.default})")
    lines += ["", "examples:"] + [f"  {example}" for example in EXAMPLES]
    lines += ["", "Exit status: 0 all agree, 1 a mismatch (with a reproducer), 2 bad usage, "
              "130 interrupted, 141 stdout closed early."]
    return "\n".join(lines)


# Flags two commands share, described for each of them.
SHARED_HELP = {
    ("run", "nproc"): "also model parity on this many expert-parallel ranks, as processes: "
                      "gloo on a CPU; NCCL, every layout/transport pair and CUDA graphs "
                      "with --device=cuda (1: none).",
    ("timeline", "nproc"): "ranks (GPUs) of the recorded step.",
    ("timeline", "device"): "where the ranks run: cuda, or cpu for a tiny model (the picture "
                            "then has no communication lane).",
}


def _help_for(flag, command: str) -> str:
    """A flag's help for one command, without the "run: " / "verify: " tag."""
    text = SHARED_HELP.get((command, flag.name), flag.help)
    if text.startswith("<"):  # absl's "<a|b>: " before an enum's help
        text = text.split(": ", 1)[1]
    if text.split(": ", 1)[0] in COMMANDS:
        text = text.split(": ", 1)[1]
    return text[0].upper() + text[1:]


def parse(argv: list) -> str:
    """The command, with FLAGS parsed and checked; CommandLineError on anything wrong."""
    FLAGS.unparse_flags()  # every call starts from the defaults (main can run in-process)
    try:
        rest = FLAGS(argv)
    except flags.Error as error:
        raise CommandLineError(str(error).splitlines()[0]) from None
    commands = rest[1:]
    names = "|".join(COMMANDS)
    if not commands:
        raise CommandLineError(f"no command given; usage: tbo-parity {{{names}}} [flags] "
                               f"(tbo-parity --help)")
    if len(commands) > 1 or commands[0] not in COMMANDS:
        raise CommandLineError(f"unknown command {' '.join(commands)!r}; usage: tbo-parity "
                               f"{{{names}}} [flags] (tbo-parity --help)")
    command = commands[0]
    own = COMMANDS[command][1]
    for other, (_, names_of_other) in COMMANDS.items():
        given = [n for n in names_of_other
                 if other != command and n not in own and FLAGS[n].present]
        if given:
            raise CommandLineError(f"--{given[0]} applies to `tbo-parity {other}`, not "
                                   f"`tbo-parity {command}`")
    if command == "run" and not FLAGS.model:
        given = [n for n in ("device", "dtype") if FLAGS[n].present]
        if given:
            raise CommandLineError(f"--{given[0]} sets up the model, which --nomodel skips")
    return command


def ep_num_experts() -> int:
    """The expert count of the model that `run --nproc` shards over its ranks: ep_parity's
    ranks build it with ``model_parity.make_models(0)``, the spec's ModelConfig defaults
    (imported from there without torch or JAX)."""
    from tbo_parity.reference.weights import ModelConfig

    return ModelConfig().num_experts


def check_nproc_divides_experts(nproc: int) -> None:
    """Expert parallelism gives each rank an equal share of the experts."""
    experts = ep_num_experts()
    if experts % nproc:
        choices = ", ".join(str(n) for n in range(1, experts + 1)
                            if experts % n == 0 and n <= FLAGS["nproc"].parser.upper_bound)
        raise CommandLineError(f"--nproc={nproc} must divide the model's {experts} experts "
                               f"(each rank hosts an equal share); use one of {choices}")


def check_viz_extra() -> None:
    """`timeline` draws with matplotlib, the viz extra."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CommandLineError('timeline draws with matplotlib, which is not installed: '
                               'pip install ".[viz]"') from None


def check_out_writable(out: str) -> None:
    """``--out``'s folder exists or can be made, and a file can be written in it (probed with a
    temporary file, removed at once; the folder, if made, stays for the picture)."""
    import tempfile

    path = os.path.abspath(out)
    folder = os.path.dirname(path)
    for target in (path, os.path.splitext(path)[0] + ".json"):
        if os.path.isdir(target):
            raise CommandLineError(f"--out={out}: {target} is a directory")
        if os.path.exists(target) and not os.access(target, os.W_OK):
            raise CommandLineError(f"--out={out}: {target} exists and is not writable")
    existing = folder
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if os.path.exists(existing) and not os.path.isdir(existing):
        raise CommandLineError(f"--out={out}: cannot make its folder, {existing} is not a "
                               f"directory")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or str(error).splitlines()[0]
        where = error.filename or folder
        raise CommandLineError(f"--out={out}: cannot write into {folder} ({reason}: {where})"
                               ) from None


def check_before_work(command: str) -> None:
    """What can be known wrong before anything runs; CommandLineError on the first. The
    checks that import nothing heavy come first, --out's (it may create the folder) last."""
    if command == "run" and FLAGS.nproc > 1:
        if not FLAGS.model:
            raise CommandLineError("--nproc runs model parity, which --nomodel skips")
        check_nproc_divides_experts(FLAGS.nproc)
    if command == "timeline":
        if FLAGS.device == "cpu" and FLAGS["transport"].present \
                and FLAGS.transport == "copy_engine":
            raise CommandLineError("--transport=copy_engine needs --device=cuda")
        if not FLAGS.out.endswith(".png"):
            raise CommandLineError(f"--out must name a .png file, got {FLAGS.out!r}")
        check_viz_extra()
    if (command == "timeline" or FLAGS.model) and FLAGS.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CommandLineError("--device=cuda, but torch sees no CUDA device")
        if FLAGS.nproc > torch.cuda.device_count():
            raise CommandLineError(f"--nproc={FLAGS.nproc}, but torch sees "
                                   f"{torch.cuda.device_count()} CUDA devices")
    if command == "timeline":
        check_out_writable(FLAGS.out)


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


def check_mode(mode: str, count: int, seed: int) -> dict:
    """Split parity over `count` generated batches of one mode; the first mismatch kept."""
    from tbo_parity.parity_tests.cases import random_cases
    from tbo_parity.parity_tests.split_parity import preparer_mismatches, split_mismatches

    start = time.perf_counter()
    mismatches, first = 0, None
    for case in random_cases(seed, mode, count):
        wrong = split_mismatches(case) or preparer_mismatches(case)
        if wrong:
            mismatches += 1
            first = first or (case, wrong)
    return {"mode": mode, "cases": count, "mismatches": mismatches,
            "seconds": time.perf_counter() - start, "first": first}


def model_scenarios(ref_cfg) -> dict:
    """name -> (ModelCase, padding sequences, World)."""
    from tbo_parity.parity_tests import model_parity as mp

    scenarios = {name: (case, 0, mp.build_world(case, ref_cfg))
                 for name, case in mp.CASES.items()}
    scenarios.update({name: (case, padding, mp.pad_world(mp.build_world(case, ref_cfg), padding))
                      for name, (case, padding) in mp.PADDED.items()})
    return scenarios


def check_models(device: str, dtype: str):
    """Model parity, one row per named scenario, yielded as each completes."""
    import torch

    from tbo_parity.parity_tests import model_parity as mp

    # bf16 routes densely (top_k = num_experts): see parity_tests/test_model_parity.py.
    routing = {"num_experts": 4, "top_k": 4} if dtype == "bfloat16" else {}
    ref_cfg, _, weights, model = mp.make_models(seed=0, dtype=mp.TORCH_DTYPES[dtype],
                                                device=torch.device(device), **routing)
    for name, (case, padding, world) in model_scenarios(ref_cfg).items():
        start = time.perf_counter()
        result = mp.compare_case(world, ref_cfg, weights, model, dtype)
        reproducer = f"{case!r}" + (f", padded with {padding} sequences" if padding else "")
        yield {"mode": name, "kind": f"model {dtype}", "cases": 1,
               "mismatches": 0 if result["ok"] else 1, "seconds": time.perf_counter() - start,
               "reproducer": f"{reproducer}; {dtype}, model {routing or 'defaults'}", **result}


GRAPH_BATCH_SIZES = (5, 8)  # in the graph of 8: padded (under TBO child B holds padding), exact


def graph_skip_reason(device: str) -> str:
    """Why replay rows are not run (empty when they are): ``--device=cuda`` without a GPU."""
    if device != "cuda":
        return ""
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return ""


def check_graphs(dtype: str, device: str = "cuda"):
    """The graph runner's replay parity: a DECODE and a TARGET_VERIFY batch of 5 sequences
    (padded into the graph of 8) and of 8 (the graph's exact size), plain and with TBO, each
    replayed and compared with the eager forward and the JAX spec (graph_parity.check_step).
    On CUDA the runner replays real CUDA graphs; on a CPU it runs the same replay path (static
    buffers, padding, the plugin's counts) with the captured forward called eagerly."""
    from tbo_parity.parity_tests.graph_parity import SCENARIOS, GraphHarness, check_step

    kind = "graph" if device == "cuda" else "replay-path"  # the dtype is in the table's title
    for tbo in (False, True):
        h = GraphHarness(device=device, dtype_name=dtype, tbo=tbo, max_bs=8)
        for name in ("decode", "verify-tree"):
            for bs in GRAPH_BATCH_SIZES:
                start = time.perf_counter()
                report = check_step(h, h.world(SCENARIOS[name], bs, seed=11))
                size = "padded" if (report["graph_bs"] or 0) > bs else "exact"
                label = f"{name} {'tbo' if tbo else 'plain'} {bs}->{report['graph_bs']} {size}"
                yield {"mode": label, "kind": kind, "cases": 1,
                       "mismatches": 0 if report["ok"] else 1,
                       "seconds": time.perf_counter() - start, **report}


# Every layout/transport pair a GPU host runs (a CPU run takes ep_parity's default).
GPU_DISPATCHERS = ("packed/all_to_all", "packed/exact", "capacity/all_to_all",
                   "capacity/copy_engine")
EP_TIMEOUT_S = 900  # every rank is killed past it (a 4-rank CPU run takes about 20 s)


def check_expert_parallel(nproc: int, device: str):
    """Model parity on ``nproc`` expert-parallel ranks (parity_tests/ep_parity.py), float32:
    one row per check and transport, its cases over all ranks, the worst error."""
    import tempfile

    from tbo_parity.parity_tests import ep_parity
    from tbo_parity.parity_tests.model_parity import BOUNDS

    args = ([f"--dispatchers={','.join(GPU_DISPATCHERS)}", "--device=cuda", "--graphs"]
            if device == "cuda" else [])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            reports = ep_parity.check_launch(nproc, tmp, args, timeout_s=EP_TIMEOUT_S)
        except RuntimeError as error:
            yield {"mode": f"{nproc} ranks", "kind": "ep", "cases": 1, "mismatches": 1,
                   "seconds": time.perf_counter() - start,
                   "failures": str(error).splitlines()[:12]}
            return
    seconds = time.perf_counter() - start
    groups = {}
    for report in reports:
        for row in report["rows"]:
            if "error" in row:
                groups.setdefault((row["check"], row.get("transport")), []).append(
                    (report["rank"], row))
    for (check, transport), rows in groups.items():
        bad = [f"rank {rank} {row['name']}{' tbo' if row.get('tbo') else ''}: error "
               f"{row['error']:.2e}, expert load equal {row.get('expert_load_equal', True)}"
               f"{'' if row.get('shapes_equal', True) else ', shapes differ from the spec'}"
               for rank, row in rows
               if row["error"] > BOUNDS["float32"] or not row.get("expert_load_equal", True)
               or not row.get("shapes_equal", True)]
        yield {"mode": f"{check} {transport}", "kind": f"ep {nproc} ranks", "cases": len(rows),
               "mismatches": len(bad), "seconds": seconds,
               "worst": max(row["error"] for _, row in rows), "failures": bad}


def _row(label: str, row: dict, columns: tuple) -> str:
    errors = " ".join(f"{row[k]:>11.1e}" if k in row else f"{'-':>11}" for k in columns)
    return (f"{label:<44} {row['cases']:>6} {row['mismatches']:>10} {row['seconds']:>6.1f}s  "
            f"{errors}")


def _header(first: str, columns: tuple) -> str:
    names = " ".join(f"{c:>11}" for c in columns)
    return f"{first:<44} {'cases':>6} {'mismatches':>10} {'time':>7}  {names}"


MODEL_COLUMNS = ("plain_vs_jax", "tbo_vs_plain", "tbo_vs_jax", "jax_tbo_vs_jax")
MODEL_TITLES = ("plain-JAX", "TBO-plain", "TBO-JAX", "JAXTBO-JAX")
GRAPH_COLUMNS = ("replay_vs_eager", "replay_vs_spec", "eager_vs_spec")
GRAPH_TITLES = ("replay-eager", "replay-JAX", "eager-JAX")
# The legend under `run`'s tables: one entry per kind of row (a row's kind is the first word of
# its label), each entry starting "<kind> rows"; only the kinds printed are described.
LEGEND = {
    "model": (f"model rows: A-B is the max relative error max|A - B| / max|B| over hidden "
              f"states, logits and both KV pools;\nplain / TBO: the PyTorch model without / "
              f"with two-batch overlap; JAX, JAXTBO: the JAX spec plain / TBO;\nbound: "
              f"{BOUNDS_TEXT}; expert loads must be equal."),
    "graph": ("graph rows: replay of a CUDA graph vs the eager forward and the spec, A-B as for "
              "model rows\n(bounds in parity_tests/graph_parity.py)."),
    "replay-path": ("replay-path rows: the CUDA-graph runner's replay path on a CPU, no graph: "
                    "its captured forward called\neagerly over the padded static buffers, vs "
                    "the eager forward and the spec, A-B as for model rows\n(bounds in "
                    "parity_tests/graph_parity.py)."),
    "ep": (f"ep rows: each rank of an expert-parallel group against the single-device spec on "
           f"its own batch\n(parity_tests/ep_parity.py); worst: the largest relative error of a rank "
           f"vs the spec, as A-B of model rows;\nbound {MODEL_BOUNDS['float32']}; expert loads "
           f"must be equal."),
}


def legend(rows: list) -> str:
    """The legend of the kinds of rows among ``rows`` (those printed), and of no other kind."""
    kinds = {row["kind"].split()[0] for row in rows if "kind" in row}
    return "\n".join(text for kind, text in LEGEND.items() if kind in kinds)


def _print(line: str = "") -> None:
    print(line, flush=True)


def run_parity(count: int, seed: int, *, model: bool = False, device: str = "cpu",
               dtype: str = "float32", nproc: int = 1) -> int:
    from tbo_parity.parity_tests.cases import MODES

    rows = []
    _print(_header("split parity (spec vs implementation)", ()))
    for mode in MODES:
        rows.append(check_mode(mode, count, seed))
        _print(_row(f"split {mode}", rows[-1], ()))
    if model:
        _print()
        _print(_header(f"model parity ({dtype}, bound {MODEL_BOUNDS[dtype]})", MODEL_TITLES))
        for row in check_models(device, dtype):
            rows.append(row)
            _print(_row(f"{row['kind']} {row['mode']}", row, MODEL_COLUMNS))
        skip = graph_skip_reason(device)
        _print()
        if skip:
            _print(f"graph replay parity: skipped, {skip}")
        else:
            title = (f"graph replay parity ({dtype})" if device == "cuda" else
                     f"graph runner's replay path on the CPU, no CUDA graph ({dtype})")
            _print(_header(title, GRAPH_TITLES))
            for row in check_graphs(dtype, device):
                rows.append(row)
                _print(_row(f"{row['kind']} {row['mode']}", row, GRAPH_COLUMNS))
        if nproc > 1:
            _print()
            _print(_header(f"expert parallelism on {nproc} ranks (float32, each rank vs JAX)",
                           ("worst",)))
            for row in check_expert_parallel(nproc, device):
                rows.append(row)
                _print(_row(f"{row['kind']} {row['mode']}", row, ("worst",)))
        _print()
        _print(legend(rows))
    failed = [row for row in rows if row["mismatches"]]
    _report_failures(failed)
    _print("\nFAIL" if failed else "\nOK: spec and implementation agree")
    return 1 if failed else 0


def _report_failures(failed: list) -> None:
    for row in [row for row in failed if row.get("first")][:1]:
        case, wrong = row["first"]
        _print(f"\nfirst mismatch ({row['mode']}):\n    {case!r}")
        for line in wrong:
            _print(f"    {line}")
    for row in [row for row in failed if "reproducer" in row][:1]:
        _print(f"\nfirst failing model scenario ({row['mode']}):\n    {row['reproducer']}")
        for line in row["failures"]:
            _print(f"    {line}")
    for row in [row for row in failed if row.get("kind", "").startswith("ep")][:1]:
        _print(f"\nfirst failing expert-parallel check ({row['mode']}):")
        for line in row["failures"]:
            _print(f"    {line}")
    for row in [row for row in failed if row.get("kind") in ("graph", "replay-path")][:1]:
        _print(f"\nfirst failing graph replay ({row['mode']}): "
               f"{ {k: v for k, v in row.items() if k not in ('kind', 'mode')} }")


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


def run_verify(bounds, workers: int) -> int:
    """The exhaustive check (parity_tests/exhaustive.py): a row per family as it completes."""
    from tbo_parity.parity_tests import exhaustive

    _print(f"every batch within: EXTEND 1..{bounds.max_seqs} sequences of 1..{bounds.max_len} "
           f"tokens at thresholds {', '.join(map(str, bounds.thresholds))} (cached prefixes "
           f"{' and '.join(map(str, bounds.prefixes))} at {exhaustive.spec.DEFAULT_THRESHOLD}); "
           f"DECODE/TARGET_VERIFY batch sizes 0..{bounds.max_bs}, drafts 1..{bounds.max_draft}; "
           f"graph replay of sizes 1..{bounds.max_graph_bs} with every real batch size")
    _print(exhaustive.HEADER)
    reports = exhaustive.verify(bounds, workers,
                                on_report=lambda r: _print(exhaustive.format_row(r)))
    _print(exhaustive.LEGEND)
    total = sum(r.batches for r in reports)
    failed = [r for r in reports if r.disagreements or r.invariant_failures]
    if not failed:
        _print(f"\nOK: {total:,} batches, 0 disagreements, 0 invariant failures")
        return 0
    case, wrong = next(r.first for r in failed if r.first)
    _print(f"\nFAIL: {sum(r.disagreements for r in reports):,} disagreements, "
           f"{sum(r.invariant_failures for r in reports):,} invariant failures; the first:\n"
           f"    {case!r}")
    for line in wrong:
        _print(f"    {line}")
    return 1


# ---------------------------------------------------------------------------------------------
# timeline
# ---------------------------------------------------------------------------------------------


def run_timeline(nproc: int, device: str, tokens: int, transport: str, out: str) -> int:
    """Record one TBO decode step on ``nproc`` ranks (benchmarks/overlap.py's timeline step:
    timing events around every stage on the compute stream and every exchange on the
    communication stream) and draw it (parity_tests/timeline.py)."""
    import json
    import tempfile

    from tbo_parity.parity_tests import ep_parity
    from tbo_parity.parity_tests.timeline import draw_timeline, intervals_from_json, summarize

    args = ["--timeline_only", f"--timeline_tokens={tokens}", f"--device={device}",
            f"--transports={transport}", f"--timeline_transport={transport}"]
    if device == "cpu":
        args += ["--tiny", "--timeline_transport=all_to_all", "--transports=all_to_all"]
    with tempfile.TemporaryDirectory() as tmp:
        ep_parity.launch(nproc, tmp, args, timeout_s=EP_TIMEOUT_S,
                         module="tbo_parity.benchmarks.overlap", report_glob="overlap-nvlink-rank{rank}.json")
        with open(os.path.join(tmp, "overlap-nvlink-rank0.json")) as f:
            recorded = json.load(f)["timeline"]
    intervals = intervals_from_json(recorded)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(recorded, f, indent=1)
    title = (f"TBO decode step, {nproc} x {device}, {transport if device == 'cuda' else 'tiny'}"
             f", {tokens} tokens/rank")
    draw_timeline(intervals, out, title=title)
    summary = summarize(intervals)
    _print(f"wrote {out}: step {summary['total_ms']:.3f} ms, overlap "
           f"{summary['overlap_ms']:.3f} ms, {100 * summary['hidden_fraction']:.0f}% of "
           f"communication hidden under compute")
    return 0


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _main(argv: list) -> int:
    if any(arg in HELP_ARGS for arg in argv[1:]):
        _print(help_text())
        return 0
    if len(argv) > 1 and argv[1] == "upstream":  # a command with its own flags
        from tbo_parity.parity_tests import upstream

        return upstream.main([f"{argv[0]} upstream", *argv[2:]], prog="tbo-parity")
    try:
        command = parse(argv)
        check_before_work(command)
    except CommandLineError as error:
        print(f"tbo-parity: {error}", file=sys.stderr)
        return 2
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the table
    if command == "verify":
        from tbo_parity.parity_tests.exhaustive import Bounds

        bounds = Bounds(FLAGS.max_seqs, FLAGS.max_len, FLAGS.max_bs, FLAGS.max_draft,
                        FLAGS.max_graph_bs)
        return run_verify(bounds, FLAGS.workers or os.cpu_count() or 1)
    if command == "timeline":
        return run_timeline(FLAGS.nproc, FLAGS.device, FLAGS.tokens, FLAGS.transport, FLAGS.out)
    return run_parity(FLAGS.cases_per_mode, FLAGS.seed, model=FLAGS.model, device=FLAGS.device,
                      dtype=FLAGS.dtype, nproc=FLAGS.nproc)


def main(argv: list | None = None) -> None:
    """The console command: `_main`, and its exit status, with two quiet endings. Ctrl-C
    (KeyboardInterrupt) during any command prints one line and exits 130 (128 + SIGINT). A
    reader that closes stdout early (``tbo-parity --help | head -1``) ends it without a
    traceback: Python's recipe (docs.python.org/3/library/signal.html, "Note on SIGPIPE"),
    stdout pointed at devnull so that the exit's flush cannot fail again, but with status 141
    (128 + SIGPIPE, what a shell reports for a tool SIGPIPE ends), since 1 here means a
    mismatch."""
    try:
        status = _main(sys.argv if argv is None else argv)
        sys.stdout.flush()  # a closed reader shows here, inside the try, at the latest
    except KeyboardInterrupt:
        print("tbo-parity: interrupted", file=sys.stderr, flush=True)
        status = 130
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = 141
    sys.exit(status)


if __name__ == "__main__":
    main()
