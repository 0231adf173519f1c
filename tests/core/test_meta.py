"""Meta-tests: every hookspec is documented and exercised by the test suite.

"Exercised" is checked on the test sources (this folder, ``plugins/*/tests`` and the example
plugins' tests), parsed with ``ast``: a hook counts when a test calls it through a plugin
manager (``<...>.hook.<name>(...)``) or defines a ``@hookimpl`` implementation of it that the
core then calls. Parsing, rather than a text search, keeps comments and strings from counting.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from compiler_core import hookspecs

REPO_ROOT = Path(__file__).resolve().parents[2]

SPEC_MARK = "compiler_core_spec"


def hookspec_functions() -> dict[str, object]:
    return {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, SPEC_MARK)}


def test_hookspecs_are_found():
    names = set(hookspec_functions())
    registration = {"register_ops", "register_architectures", "register_quant_schemes", "register_backends"}
    # Per-family and per-scheme behaviour are methods of the registered objects, not hooks.
    assert names == {*registration, "register_commands", "register_lowerings"}


@pytest.mark.parametrize("name", sorted(hookspec_functions()))
def test_hookspec_docstring_says_what_it_takes_returns_and_what_none_means(name):
    fn = hookspec_functions()[name]
    doc = inspect.getdoc(fn) or ""
    assert len(doc) > 80, f"{name}: the docstring must say what the hook receives and returns"
    for param in inspect.signature(fn).parameters:
        assert f"``{param}" in doc, f"{name}: the docstring does not say what ``{param}`` is"
    if getattr(fn, SPEC_MARK).get("firstresult"):
        assert "None" in doc, f"{name} is firstresult: its docstring must say what returning None means"
        assert "Return" in doc
    else:
        assert "Returns nothing" in doc, f"{name}: say that the return value is ignored"


def suite_sources() -> list[Path]:
    """Every test source this meta-test looks at, except itself."""
    roots = [REPO_ROOT / "tests", *sorted((REPO_ROOT / "plugins").glob("*/tests"))]
    roots += sorted((REPO_ROOT / "examples").glob("*/tests"))
    return [p for root in roots for p in root.rglob("*.py") if p.resolve() != Path(__file__).resolve()]


def exercised_hooks(files: list[Path]) -> dict[str, list[str]]:
    """hook name -> the files that call it through ``.hook.<name>(`` or implement it with @hookimpl."""
    found: dict[str, list[str]] = {}
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if isinstance(owner, ast.Attribute) and owner.attr == "hook":
                    name = node.func.attr  # pm.hook.<name>(...)
                elif isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "hook":
                    name = node.func.attr  # hook().<name>(...), a helper returning pm.hook
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                "hookimpl" in ast.unparse(d) for d in node.decorator_list
            ):
                name = node.name
            if name is not None:
                found.setdefault(name, []).append(path.name)
    return found


def test_every_hookspec_is_exercised_by_a_test():
    files = suite_sources()
    assert any(p.name == "test_hooks.py" for p in files)
    found = exercised_hooks(files)
    missing = sorted(set(hookspec_functions()) - set(found))
    assert not missing, f"hookspecs no test calls or implements: {missing}"


def test_the_exercise_detector_is_not_fooled_by_comments(tmp_path):
    """The detector itself: a mention in a comment or a string is not a use; a call or a hookimpl is."""
    fake = tmp_path / "test_fake.py"
    fake.write_text(
        "# pm.hook.scale_groups(graph=g)\n"
        "TEXT = 'def lower_layer('\n"
        "def f(pm):\n    return pm.hook.map_weight(config={}, name='x', tensor=None)\n"
        "class P:\n    @hookimpl\n    def shard_param(self, name):\n        return None\n"
        "    def register_ops(self, register):\n        return None\n"
    )
    assert set(exercised_hooks([fake])) == {"map_weight", "shard_param"}
