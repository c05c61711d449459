"""The spec and the implementation stay independent: neither imports the other's framework."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("package,forbidden", [("reference", "torch"), ("torch_impl", "jax")])
def test_package_does_not_import_the_other_framework(package, forbidden):
    code = (
        "import importlib, pkgutil, sys\n"
        f"import {package}\n"
        f"for m in pkgutil.iter_modules({package}.__path__):\n"
        f"    importlib.import_module('{package}.' + m.name)\n"
        f"print('{forbidden}' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
