"""docs/ERRORS.md is rendered from the error classes, and every error class modelc raises is in it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import compiler_core
from compiler_core import errors

DOC = Path(__file__).resolve().parents[2] / "docs" / "ERRORS.md"


def test_errors_md_matches_the_error_classes():
    assert DOC.read_text(encoding="utf-8") == errors.errors_markdown(), (
        "docs/ERRORS.md is stale: regenerate it with `python -m compiler_core.errors > docs/ERRORS.md`"
    )


def test_every_error_class_says_its_cause_and_what_to_do():
    classes = errors.error_classes()
    assert {"ModelcError", "UsageError", "ConfigError", "WeightFileError", "InternalError"} <= {
        c.__name__ for c in classes
    }
    for cls in classes:
        doc = inspect.getdoc(cls)
        assert "\n\nCause: " in doc and "\n\nWhat to do: " in doc, cls.__name__
        assert cls.exit_code in (1, 2), cls.__name__
        assert f"## {cls.__name__}\n" in DOC.read_text(encoding="utf-8")


def test_no_error_class_is_defined_outside_errors_py():
    """An error class elsewhere in the core would be missing from docs/ERRORS.md."""
    for module in pkgutil.walk_packages(compiler_core.__path__, "compiler_core."):
        if module.name.endswith("__main__"):
            continue
        mod = importlib.import_module(module.name)
        for name, value in vars(mod).items():
            if inspect.isclass(value) and issubclass(value, errors.ModelcError) and value.__module__ == mod.__name__:
                assert mod is errors, f"{module.name}.{name} is a ModelcError outside compiler_core/errors.py"


def test_exit_codes_follow_bad_input_versus_run_time():
    for cls in errors.error_classes():
        assert cls.exit_code == (2 if issubclass(cls, errors.UsageError) else 1), cls.__name__
