"""modelc-llama against transformers' LlamaForCausalLM on tiny checkpoints made here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 10000.0,
}


def tiny_llama(out: Path, *, tied: bool, vocab_size: int = 97) -> Path:
    """A 2-layer GQA Llama with llama3 rope scaling and norms away from 1, saved in shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        initializer_range=0.2,
        rope_parameters=dict(LLAMA3_ROPE),
        eos_token_id=[5, 6],
        bos_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out, max_shard_size="20KB")
    return out


def test_llama3_frequencies_are_transformers_own():
    from modelc_llama.rope import llama3_inv_freq
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=128, num_attention_heads=4, rope_parameters=dict(LLAMA3_ROPE))
    want, scaling = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert scaling == 1.0
    got = torch.tensor(llama3_inv_freq(LLAMA3_ROPE, 32))
    assert torch.equal(got, want.float())


@pytest.mark.parametrize(("tied", "tp", "pp"), [(False, 1, 1), (True, 2, 1), (False, 2, 2)])
def test_logits_match_transformers(llama_registry, tmp_path, tied, tp, pp):
    from transformers import LlamaForCausalLM

    from compiler_core.convert.from_hf import convert
    from compiler_core.mapping import Mapping
    from compiler_core.model import rank_graph
    from compiler_core.runtime.context import positions_from_mask
    from compiler_core.runtime.loading import checkpoint_runner

    hf_dir = tiny_llama(tmp_path / "hf", tied=tied)
    out = tmp_path / "ckpt"
    mapping = Mapping.create(tp, pp)
    config = convert(hf_dir, out, dtype="float32", mapping=mapping, show_progress=False, registry=llama_registry)
    assert config.architecture == "llama" and config.model["eos_token_id"] == [5, 6]
    attention = rank_graph(llama_registry, config, 0).node("layers.0.self_attn.core")
    assert "rope_inv_freq" in attention.attrs and "rope_scaling" not in attention.attrs
    if tp == 2:  # 97 rows do not split in two: the graph declares its padded head
        last = rank_graph(llama_registry, config, mapping.world_size - 1)
        assert last.attrs["padded_params"] == ["lm_head.weight"]

    ids = torch.tensor([[0, 0, 5, 17, 42, 7, 3, 9, 30, 21], [11, 12, 13, 14, 15, 16, 18, 19, 20, 22]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    hf = LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    runner = checkpoint_runner(out, registry=llama_registry)
    runner.allocate(2, 16)
    positions = positions_from_mask(mask)
    prompt = runner.logits(ids[:, :-1], positions[:, :-1], mask[:, :-1], 0)
    step = runner.logits(ids[:, -1:], positions[:, -1:], mask, ids.shape[1] - 1)
    got = torch.cat([prompt, step], dim=1)
    real = mask.bool()
    assert (got - ref)[real].abs().max().item() < 1e-4
    assert torch.equal(got[real].argmax(-1), ref[real].argmax(-1))


def test_unsupported_rope_type_is_refused_naming_it():
    from modelc_llama.config import config_from_hf

    hf = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    hf |= {"vocab_size": 97, "num_hidden_layers": 2, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        config_from_hf(hf)
