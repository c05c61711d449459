"""mutmut, with mutant names in the package's import names (docs/testing.md, "The mutation run").

mutmut names a mutant after its file's path (``torch_impl/replay_plan.py`` gives
``torch_impl.replay_plan.x_plan_replay__mutmut_1``) and, while a test runs, activates it when
the running function's ``__module__`` has that name. This project's folders are imported as
subpackages of ``tbo_parity`` (``tbo_parity.torch_impl.replay_plan``), so no name would match
and no mutant would ever run. This wrapper puts ``tbo_parity.`` before the names of the
repository's folders, then runs mutmut's own command line::

    python parity_tests/mutmut_run.py run --max-children 2
    python parity_tests/mutmut_run.py results
    python parity_tests/mutmut_run.py show NAME

It is run as a file, not as ``-m tbo_parity...``: the process must not import the package from
the repository, or the tests it runs would use the unmutated code instead of ``mutants/``.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import mutmut.__main__  # noqa: E402
import mutmut.mutation.file_mutation  # noqa: E402
from mutmut.utils import format_utils  # noqa: E402

FOLDERS = ("reference", "torch_impl", "parity_tests", "benchmarks")
_path_name = format_utils.get_mutant_name


def get_mutant_name(relative_source_path, mutant_method_name: str) -> str:
    """mutmut's name for a mutant, in the import name of the module it is in."""
    name = _path_name(relative_source_path, mutant_method_name)
    return f"tbo_parity.{name}" if name.split(".", 1)[0] in FOLDERS else name


for _module in (format_utils, mutmut.__main__, mutmut.mutation.file_mutation):
    if getattr(_module, "get_mutant_name", None) is _path_name:
        _module.get_mutant_name = get_mutant_name

if __name__ == "__main__":
    sys.argv[0] = "mutmut"
    mutmut.__main__.cli()
