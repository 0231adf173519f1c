"""Rotary settings: what the kernels do not implement is refused, and frequencies can be data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from compiler_core.convert.from_hf import convert
from compiler_core.ir import GraphBuilder, validate
from compiler_core.mapping import Mapping
from compiler_core.rope import inv_freq
from compiler_core.runtime.context import positions_from_mask
from compiler_core.runtime.session import TorchSession
from compiler_core.testing import error_lines, run_modelc

HEADS, HEAD_DIM = 2, 8
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def test_a_rope_scaling_the_kernels_ignore_is_refused_at_build(tiny_falcon_7b, tmp_path):
    """A checkpoint whose config asks for llama3 scaling, which the core kernels would skip: the
    build stops with one line naming the node and the value instead of building a wrong engine."""
    checkpoint = tmp_path / "ckpt"
    convert(tiny_falcon_7b, checkpoint, dtype="float32", mapping=Mapping(), show_progress=False)
    config = json.loads((checkpoint / "config.json").read_text())
    config["rope_scaling"] = LLAMA3
    (checkpoint / "config.json").write_text(json.dumps(config))
    done = run_modelc("build", "--checkpoint_dir", str(checkpoint), "--output_dir", str(tmp_path / "engine"))
    assert done.returncode == 2, done.stderr
    assert error_lines(done.stderr) == [
        f"modelc: error: {checkpoint / 'config.json'}: node layers.0.attention.core: rope_scaling type 'llama3' is "
        "not implemented by the attention kernels (implemented: linear); an architecture passes any other scaling "
        "as precomputed frequencies in attribute 'rope_inv_freq'"
    ]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "engine").exists()
    shutil.rmtree(checkpoint)


def _attention_logits(registry, rope: dict) -> torch.Tensor:
    """One rotary attention layer's output for a fixed prompt, under the rotary settings ``rope``."""
    g = GraphBuilder("rope")
    width = HEADS * HEAD_DIM
    qkv = g.add("linear", ["x"], name="qkv", params={"weight": g.param("qkv.weight", [3 * width, width], "float32")})
    out = g.add(
        "attention",
        [qkv],
        name="attn",
        num_heads=HEADS,
        num_kv_heads=HEADS,
        head_dim=HEAD_DIM,
        cache_slot="s",
        position_embedding="rope",
        **rope,
    )
    graph = validate(g.build(["x"], [out], attrs={"dtype": "float32"}), registry.ops)
    torch.manual_seed(0)
    session = TorchSession(registry, graph, {"qkv.weight": torch.randn(3 * width, width)}, "cpu")
    x = torch.randn(1, 12, width)
    mask = torch.ones(1, 12, dtype=torch.long)
    session.allocate(1, 12)
    return session.forward(x, positions_from_mask(mask), mask, 0)


def test_rope_inv_freq_is_what_the_torch_kernel_rotates_by(registry):
    default = {"rope_theta": 500.0}
    as_data = {"rope_inv_freq": inv_freq({"head_dim": HEAD_DIM, **default}).tolist()}
    assert torch.equal(_attention_logits(registry, as_data), _attention_logits(registry, default))
    halved = {"rope_inv_freq": (inv_freq({"head_dim": HEAD_DIM, **default}) / 2).tolist()}
    linear = {**default, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    assert torch.allclose(_attention_logits(registry, halved), _attention_logits(registry, linear), atol=1e-5)
    assert not torch.allclose(_attention_logits(registry, halved), _attention_logits(registry, default), atol=1e-3)


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({"rope_inv_freq": [1.0, 0.1]}, "rope_inv_freq must hold rotary_dim / 2 = 4 numbers"),
        ({"rope_inv_freq": [1.0] * 4, "rope_scaling": {"rope_type": "linear", "factor": 2}}, "not both"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor must be a positive number"),
    ],
    ids=["length", "both", "factor"],
)
def test_malformed_rotary_attributes_name_the_node(rope, message):
    from compiler_core.errors import UsageError
    from compiler_core.rope import check_rope

    g = GraphBuilder("rope")
    out = g.add("attention", ["x"], name="attn", num_heads=1, num_kv_heads=1, head_dim=HEAD_DIM, cache_slot="s",
                position_embedding="rope", **rope)  # fmt: skip
    with pytest.raises(UsageError, match=rf"^here: node attn: .*{message}"):
        check_rope(g.build(["x"], [out]), "here")
