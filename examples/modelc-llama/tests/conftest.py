"""Make the plugin importable and registered whether or not it is pip-installed.

Installed (``pip install -e .``), modelc loads it through its entry point and this does
nothing; run from a source checkout, the package is put on ``sys.path`` and registered by
hand, exactly as the entry point would.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("modelc_llama") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session", autouse=True)
def llama_plugin():
    import modelc_llama

    from compiler_core.plugins import get_plugin_manager, register_checked
    from compiler_core.registry import reset_registry

    pm = get_plugin_manager()
    registered_here = not pm.has_plugin("llama")
    if registered_here:
        register_checked(pm, modelc_llama, "llama")
        reset_registry()
    yield modelc_llama
    if registered_here:
        pm.unregister(modelc_llama, name="llama")
        reset_registry()
