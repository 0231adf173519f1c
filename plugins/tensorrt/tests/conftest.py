from __future__ import annotations

import pytest

from modelc_plugins.onnx.testing import TinyFalcons


@pytest.fixture(scope="session")
def falcons(tmp_path_factory) -> TinyFalcons:
    # The same cache directory as the onnx plugin's tests: one set of HF models per session.
    return TinyFalcons(tmp_path_factory.getbasetemp() / "tiny-falcons")
