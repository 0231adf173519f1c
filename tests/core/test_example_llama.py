"""The example architecture plugin, examples/modelc-llama, as its users get it.

pip installs it into a fresh venv beside modelc; that venv's ``modelc`` converts a Llama 3 style
checkpoint made here (GQA, llama3 rope scaling, a vocabulary tp 2 does not divide, three stop
tokens) at tp 2, builds it, and ``mpirun -n 2`` runs it: the greedy tokens are transformers' own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compiler_core.testing import Venv, check_ok, hf_generate, require_mpirun, run_mpi

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "modelc-llama"
PROMPTS = [[3, 17, 42, 9], [11, 12, 13, 14, 15, 16]]
NEW_TOKENS = 10


def make_llama(out: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        bos_token_id=1,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def stop_tokens(free: list[list[int]]) -> list[int]:
    """Three stop tokens, as Llama 3 has: one that ends the first row early, one that ends the
    second (and does not occur in the first before its stop), and one never generated."""
    first = free[0][4]
    second = next(t for t in free[1][2:] if t not in free[0][:5])
    never = next(t for t in range(97) if all(t not in row for row in free))
    return [first, second, never]


def cut(row: list[int], stops: list[int]) -> list[int]:
    ends = [i for i, t in enumerate(row) if t in stops]
    return row[: ends[0] + 1] if ends else row


def test_llama_plugin_from_pip_runs_under_mpirun_at_tp2_like_transformers(tmp_path):
    require_mpirun()
    model = make_llama(tmp_path)
    free = hf_generate(model, PROMPTS, 0, max_new_tokens=NEW_TOKENS, do_sample=False)
    stops = stop_tokens(free)
    model.config.eos_token_id = stops
    model.generation_config.eos_token_id = stops
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir, max_shard_size="40KB")
    pad = stops[0]  # modelc's default with no pad_token_id: the first stop token
    ref = hf_generate(model, PROMPTS, pad, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops)
    want = [cut(row, stops) for row in ref]
    assert want[0][-1] == stops[0] and want[1][-1] == stops[1]  # each row ends on a different stop token

    venv = Venv(tmp_path / "venv", REPO_ROOT)
    venv.install_copy(EXAMPLE, tmp_path / "llama-src")
    listed = {p["name"]: p for p in json.loads(check_ok(venv.modelc("plugins", "--json")).stdout)}
    assert listed["llama"]["package"] == "modelc-llama"
    assert listed["llama"]["provides"] == {"architectures": ["llama"], "ops": ["llama_concat"]}
    ckpt, engine, out = tmp_path / "ckpt", tmp_path / "engine", tmp_path / "out.json"
    check_ok(venv.modelc("convert", "--model_dir", str(hf_dir), "--output_dir", str(ckpt), "--tp_size", "2"))
    assert json.loads((ckpt / "config.json").read_text())["architecture"] == "llama"
    check_ok(venv.modelc("build", "--checkpoint_dir", str(ckpt), "--output_dir", str(engine), "--backend", "torch"))
    assert json.loads((engine / "config.json").read_text())["build"]["max_seq_len"] == 64  # max_position_embeddings

    ids = [arg for prompt in PROMPTS for arg in ("--input_ids", ",".join(map(str, prompt)))]
    args = ["--max_output_len", str(NEW_TOKENS), "--device", "cpu", "--output_json", str(out)]
    done = run_mpi(2, "run", "--engine_dir", str(engine), *ids, *args, python=venv.python)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["output_ids"] == want
