"""Make the plugin importable and registered whether or not it is pip-installed.

Installed (``pip install -e .``), modelc loads it through its entry point; run from a source
checkout without installing, the module is put on ``sys.path`` and registered by hand into a host
of its own, exactly as the entry point would.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from compiler_core.host import Host

if importlib.util.find_spec("modelc_hello") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def hello_plugin():
    import modelc_hello

    return modelc_hello


@pytest.fixture
def host(hello_plugin) -> Host:
    """The installed plugins, this one included (registered by hand when it is not installed)."""
    host = Host.load()
    if not host.pm.has_plugin("hello"):
        host = Host.load(extra={"hello": hello_plugin})
    return host
