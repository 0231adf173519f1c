"""Packages of the modelc distribution.

The first-party plugins live in ``plugins/<name>/`` and import as ``modelc_plugins.<name>``, as llm
ships ``llm.default_plugins.*``: one namespaced import path, no top-level ``plugins`` package, and
no test folder in the wheel (docs/ARCHITECTURE.md says why). pyproject.toml cannot express a
renamed folder found by search, so the list is computed here.
"""

from setuptools import find_packages, setup

TESTS = ["tests", "tests.*", "*.tests", "*.tests.*"]

setup(
    packages=[
        *find_packages(include=["compiler_core", "compiler_core.*"], exclude=TESTS),
        "modelc_plugins",
        *(f"modelc_plugins.{name}" for name in find_packages("plugins", exclude=TESTS)),
    ],
    package_dir={"modelc_plugins": "plugins"},
)
