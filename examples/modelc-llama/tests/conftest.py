"""Make the plugin importable and registered whether or not it is pip-installed.

Installed (``pip install -e .``), modelc loads it through its entry point; run from a source
checkout without installing, the package is put on ``sys.path`` and registered by hand into a
host of its own, exactly as the entry point would.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from compiler_core.host import Host
from compiler_core.registry import Registry

if importlib.util.find_spec("modelc_llama") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def llama_registry() -> Registry:
    """The installed plugins, this one included (registered by hand when it is not installed)."""
    import modelc_llama

    host = Host.load()
    if not host.pm.has_plugin("llama"):
        host = Host.load(extra={"llama": modelc_llama})
    return host.registry
