"""tbo-parity: two-batch overlap for mixture-of-experts inference. A JAX spec, a PyTorch
implementation, and the parity tests that prove they agree.

The repository keeps one folder per part; installed, each is a subpackage of this one, so that
site-packages gains a single top-level name:

=======================  ================  =============================================
import name              folder            what it is
=======================  ================  =============================================
tbo_parity.reference     ``reference/``    the spec, in JAX (imports no torch)
tbo_parity.torch_impl    ``torch_impl/``   the implementation, in PyTorch (imports no jax)
tbo_parity.parity_tests  ``parity_tests/`` the parity harness (its ``test_*.py`` files are
                                           the suite, and are not installed)
tbo_parity.benchmarks    ``benchmarks/``   the CUDA-graph and overlap benchmarks
tbo_parity.cli           ``tbo_parity/``   the ``tbo-parity`` command
=======================  ================  =============================================

``pyproject.toml`` maps the folders to these names for an install. In a checkout that is not
installed (its root the working directory, or on ``PYTHONPATH``), this file maps them itself:
the root is added to the package's search path, so ``tbo_parity.reference`` is the root's
``reference/``. An installed copy is left as it is.
"""

import pathlib

_ROOT = pathlib.Path(__file__).resolve().parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "reference" / "__init__.py").is_file():
    __path__.append(str(_ROOT))  # noqa: F821 (a package's own search path)
