"""Fixtures every test folder shares: the plugins a test runs with."""

from __future__ import annotations

import pytest

from compiler_core.host import Host
from compiler_core.registry import Registry


@pytest.fixture(scope="session")
def host() -> Host:
    """The core and the installed plugins, loaded once for the session (as the CLI loads them)."""
    return Host.load()


@pytest.fixture(scope="session")
def registry(host: Host) -> Registry:
    """``host``'s registry: what the stage functions and sessions take."""
    return host.registry
