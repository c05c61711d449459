"""Only what pyproject.toml cannot say: the test files stay out of the installed package.

The suite (``parity_tests/test_*.py`` and ``conftest.py``) runs from a checkout; the harness
around it (``tbo_parity.parity_tests``: the split, model and graph parity checks that
``tbo-parity`` runs) is installed without it.
"""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithoutTests(build_py):
    """``build_py`` that skips the modules pytest collects."""

    def find_package_modules(self, package, package_dir):
        return [(pkg, module, path)
                for pkg, module, path in super().find_package_modules(package, package_dir)
                if not (module.startswith("test_") or module == "conftest")]


setup(cmdclass={"build_py": BuildPyWithoutTests})
