"""The spec and the implementation stay independent: neither imports the other's framework."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tbo_parity.parity_tests import background

PACKAGES = [("reference", "torch"), ("torch_impl", "jax")]


def _imports(package: str, forbidden: str) -> subprocess.CompletedProcess:
    """A fresh interpreter imports every module of ``package`` and prints whether
    ``forbidden`` got imported; a background job (parity_tests/background.py): 2 s each."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"import {package}\n"
        f"for m in pkgutil.iter_modules({package}.__path__):\n"
        f"    importlib.import_module('{package}.' + m.name)\n"
        f"print('{forbidden}' in sys.modules)\n")
    return background.command([sys.executable, "-c", code])


for _package, _forbidden in PACKAGES:
    background.job(f"imports-of-{_package}", background.reads(
        __name__, fixture="package", param=_package))(
            lambda package=_package, forbidden=_forbidden: _imports(package, forbidden))


@pytest.mark.parametrize("package,forbidden", PACKAGES)
def test_package_does_not_import_the_other_framework(package, forbidden):
    result = background.result(f"imports-of-{package}")
    assert result.returncode == 0, result.stderr  # check=True before it ran as a job
    assert result.stdout.strip() == "False"
