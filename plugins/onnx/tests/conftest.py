from __future__ import annotations

import pytest

from modelc_plugins.onnx.testing import TinyFalcons


@pytest.fixture(scope="session")
def falcons(tmp_path_factory) -> TinyFalcons:
    # One cache for the whole session (the tensorrt tests reuse the same HF models and checkpoints).
    return TinyFalcons(tmp_path_factory.getbasetemp() / "tiny-falcons")
