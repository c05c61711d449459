"""The command: ``main`` (``python -m tbo_parity.parity_tests.upstream``, ``tbo-parity
upstream``) and its flags; what it does is the package's docstring.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Optional

from absl import flags

from tbo_parity.parity_tests.upstream.batches import SpecSide, all_probes
from tbo_parity.parity_tests.upstream.classify import compare
from tbo_parity.parity_tests.upstream.fetch import (SourceError, cached_archives, fetch_release,
                                                    read_source)
from tbo_parity.parity_tests.upstream.lift import load_release
from tbo_parity.parity_tests.upstream.report import format_report

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
    batches = "batch" if FLAGS.cases_per_mode == 1 else "batches"
    _progress(command, f"computing the spec's outcomes ({FLAGS.cases_per_mode} {batches} per "
                       "mode, replays, data-parallel reports, bad input)")
    side = SpecSide()
    probes = all_probes(side, FLAGS.cases_per_mode, FLAGS.seed)
    status = 0
    targets = [(f"sglang {v}", v, None) for v in versions] + [(p, None, p) for p in paths]
    for label, version, path in targets:
        try:
            if version is not None:
                folder = pathlib.Path(os.path.expanduser(FLAGS.cache_dir)) / version
                cached = cached_archives(folder)
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
