"""Sort the survivors of a mutation run (docs/testing.md) into the classes the triage argues.

Run from the repository root after ``mutmut run``::

    python -m tbo_parity.parity_tests.mutation_triage    # Markdown on standard output

It reads ``mutmut results --all true`` and ``mutmut show`` for each mutant that survived or
timed out, and puts each into the first class whose rule matches its diff:

- ``message``: only the text of an error message or of the argument name a check puts in
  its message changed (a string wrapped in ``XX``, its case changed, or replaced by None in a
  ``raise``). The exception, its type and the condition that raises it are unchanged; the
  tests pin a message's start where it names the argument, so what survives is the wording.
- ``gpu``: the mutated line is on the GPU-only path: the communication stream, its events and
  trace, ``torch.cuda``, or a tensor's ``device=`` argument (on a CPU, the default device is
  the CPU, so dropping it changes nothing there). The GPU suite runs these lines; the mutation
  run, on a CPU, cannot tell.
- ``other``: everything else, triaged by hand in docs/testing.md.

This is a reading aid, not a verdict: docs/testing.md says what each class means and lists
the ``other`` survivors one by one.
"""

from __future__ import annotations

import collections
import pathlib
import re
import subprocess
import sys

GPU = re.compile(r"cuda|comm_stream|_record\(|_join\(|_fork\(|\.event\b|\btrace\b|_traced|"
                 r"device=|\bon_gpu\b|nccl", re.IGNORECASE)
STRING = re.compile(r'f?"(?:[^"\\]|\\.)*"' + r"|f?'(?:[^'\\]|\\.)*'")


WRAPPER = pathlib.Path(__file__).with_name("mutmut_run.py")  # mutmut in import names


def _mutmut(*args: str) -> str:
    return subprocess.run([sys.executable, str(WRAPPER), *args], capture_output=True,
                          text=True, check=False).stdout


def survivors() -> list:
    """(name, status) of every mutant that survived, timed out or crashed the interpreter."""
    rows = []
    for line in _mutmut("results", "--all", "true").splitlines():
        name, _, status = line.strip().rpartition(": ")
        if status in ("survived", "timeout", "segfault"):
            rows.append((name, status))
    return rows


def diff_lines(name: str) -> tuple:
    """(removed, added) source lines of the mutant's diff."""
    removed, added = [], []
    for line in _mutmut("show", name).splitlines():
        if line.startswith("-") and not line.startswith("---"):
            removed.append(line[1:].strip())
        elif line.startswith("+") and not line.startswith("+++"):
            added.append(line[1:].strip())
    return removed, added


def _without_strings(line: str) -> str:
    return STRING.sub('""', line).replace("None", '""')


MESSAGE_CONTEXT = re.compile(r"^raise |^f?[\"']|\b(?:_?check\w*|_?as_int|_?as_forward_mode)\(\s*"
                             r"(?:f?[\"']|None)")


def classify(removed: list, added: list) -> str:
    if any(GPU.search(line) for line in removed):
        return "gpu"
    if (removed and len(removed) == len(added)
            and [_without_strings(a) for a in added] == [_without_strings(r) for r in removed]
            and all(MESSAGE_CONTEXT.search(r) for r, a in zip(removed, added) if r != a)):
        return "message"
    if removed and added and all(re.match(r"raise \w+\(None\)$", a) for a in added):
        return "message"
    return "other"


def main() -> int:
    by_file = collections.defaultdict(collections.Counter)
    others = []
    for name, status in survivors():
        removed, added = diff_lines(name)
        kind = classify(removed, added)
        module = name.split(".x")[0]
        by_file[module][kind] += 1
        if kind == "other":
            others.append((name, status, removed, added))
    print("| module | message | gpu | other |\n|---|---|---|---|")
    for module, counts in sorted(by_file.items()):
        print(f"| `{module}` | {counts['message']} | {counts['gpu']} | {counts['other']} |")
    print("\n## other\n")
    for name, status, removed, added in others:
        print(f"- `{name}` ({status})")
        for line in removed:
            print(f"    - `{line}`")
        for line in added:
            print(f"    + `{line}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
