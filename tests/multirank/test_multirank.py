"""Multi-rank engines under a real ``mpirun``: tokens equal the single-rank run and transformers."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from compiler_core.cli import cli
from compiler_core.convert.from_hf import model_config_from_hf
from compiler_core.mapping import Mapping
from compiler_core.model import rank_graph
from compiler_core.testing import error_lines, hf_greedy, run_mpi

NEW_TOKENS = 16


def ids_args(prompts: list[list[int]]) -> list[str]:
    return [arg for p in prompts for arg in ("--input_ids", ",".join(map(str, p)))]


def single_rank_run(engine_dir, prompts, out, *extra: str) -> list[list[int]]:
    """``modelc run`` of a tp1 engine in this process."""
    args = ["run", "--engine_dir", str(engine_dir), *ids_args(prompts), "--max_output_len", str(NEW_TOKENS), *extra]
    result = CliRunner().invoke(cli, [*args, "--device", "cpu", "--output_json", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())["output_ids"]


@pytest.mark.parametrize(
    ("variant", "sequential"), [("rw", True), ("7b", False), ("40b", False), ("180b", False), ("falcon2", False)]
)
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (4, 1), (2, 2)])
def test_all_reduces_per_layer(registry, variant, sequential, tp, pp, hf_dir):
    """Sequential blocks reduce after attention and after the MLP; parallel blocks sum both, then reduce once."""
    mapping = Mapping.create(tp, pp)
    config = model_config_from_hf(registry, hf_dir(variant), "float32", mapping)
    for rank in mapping.ranks():
        graph = rank_graph(registry, config, rank)
        layers = range(*graph.attrs["layers"])
        reduces = [n.name for n in graph.nodes if n.op == "all_reduce"]
        assert len(reduces) == (2 if sequential else 1) * len(layers), reduces
        assert all(any(name.startswith(f"layers.{i}.") for i in layers) for name in reduces)
    single = rank_graph(registry, model_config_from_hf(registry, hf_dir(variant), "float32", Mapping()), 0)
    assert not any(n.op == "all_reduce" for n in single.nodes)


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("variant", "tp", "pp"),
    [("rw", 2, 1), ("7b", 1, 2), ("40b", 2, 2), ("falcon2", 4, 1)],
    ids=["rw-tp2", "7b-pp2", "40b-tp2pp2", "falcon2-tp4"],
)
def test_mpirun_tokens_equal_single_rank_and_hf(variant, tp, pp, engine, hf_dir, prompts, tmp_path):
    from compiler_core.build.engine import read_engine_config
    from compiler_core.runtime.open import special_ids

    out = tmp_path / "mpi.json"
    args = ["run", "--engine_dir", str(engine(variant, tp, pp)), *ids_args(prompts)]
    result = run_mpi(tp * pp, *args, "--max_output_len", str(NEW_TOKENS), "--device", "cpu", "--output_json", str(out))
    assert result.returncode == 0, result.stderr
    # Rank 0 alone prints: one "Output" line per prompt.
    assert result.stdout.count("Output [Text 0 Beam 0]") == 1, result.stdout
    multi = json.loads(out.read_text())["output_ids"]

    single = single_rank_run(engine(variant), prompts, tmp_path / "single.json")
    end_id, _ = special_ids(read_engine_config(engine(variant)))
    reference = hf_greedy(hf_dir(variant), prompts, NEW_TOKENS, end_id)
    assert multi == single == reference
    assert sum(map(len, multi)) > NEW_TOKENS  # real continuations, not immediate stops


@pytest.mark.mpi
@pytest.mark.parametrize(("variant", "tp", "pp"), [("40b", 2, 1), ("7b", 1, 2)], ids=["40b-tp2", "7b-pp2"])
def test_mpirun_unpadded_prompt_equals_hf(variant, tp, pp, engine, hf_dir, prompts, tmp_path):
    """One prompt, unpadded: every rank runs its prompt pass as new sequences (causal attention over
    its own tokens) and the tokens are transformers'."""
    from compiler_core.build.engine import read_engine_config
    from compiler_core.runtime.open import special_ids

    out = tmp_path / "mpi.json"
    one = [max(prompts, key=len)]
    args = ["run", "--engine_dir", str(engine(variant, tp, pp)), *ids_args(one)]
    result = run_mpi(tp * pp, *args, "--max_output_len", str(NEW_TOKENS), "--device", "cpu", "--output_json", str(out))
    assert result.returncode == 0, result.stderr
    end_id, _ = special_ids(read_engine_config(engine(variant)))
    assert json.loads(out.read_text())["output_ids"] == hf_greedy(hf_dir(variant), one, NEW_TOKENS, end_id)


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("variant", "tp", "pp"),
    [("rw", 2, 1), ("40b", 2, 1), ("7b", 1, 2)],
    ids=["rw-tp2", "40b-tp2", "7b-pp2"],
)
def test_mpirun_on_gpus_tokens_equal_hf(variant, tp, pp, engine, hf_dir, prompts, tmp_path):
    """One GPU per rank, NCCL between them, decode steps (with their collectives) replayed as CUDA graphs."""
    import torch

    from compiler_core.build.engine import read_engine_config
    from compiler_core.runtime.open import special_ids

    if torch.cuda.device_count() < tp * pp:
        pytest.skip(f"needs {tp * pp} CUDA GPUs, found {torch.cuda.device_count()}")
    out = tmp_path / "mpi.json"
    args = ["run", "--engine_dir", str(engine(variant, tp, pp)), *ids_args(prompts)]
    result = run_mpi(tp * pp, *args, "--max_output_len", str(NEW_TOKENS), "--device", "cuda", "--output_json", str(out))
    assert result.returncode == 0, result.stderr
    assert "CUDA graph capture failed" not in result.stderr
    end_id, _ = special_ids(read_engine_config(engine(variant)))
    assert json.loads(out.read_text())["output_ids"] == hf_greedy(hf_dir(variant), prompts, NEW_TOKENS, end_id)


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("variant", "tp", "pp", "extra"),
    [
        # Beam search reorders each rank's own cache, on both pipeline stages.
        ("7b", 1, 2, ("--num_beams", "2")),
        # Every rank samples from the same broadcast logits with the same seed.
        ("rw", 2, 1, ("--temperature", "0.8", "--top_k", "20", "--seed", "7")),
    ],
    ids=["7b-pp2-beams", "rw-tp2-sampling"],
)
def test_mpirun_beams_and_sampling_equal_single_rank(variant, tp, pp, extra, engine, prompts, tmp_path):
    out = tmp_path / "mpi.json"
    args = ["run", "--engine_dir", str(engine(variant, tp, pp)), *ids_args(prompts), *extra]
    result = run_mpi(tp * pp, *args, "--max_output_len", str(NEW_TOKENS), "--device", "cpu", "--output_json", str(out))
    assert result.returncode == 0, result.stderr
    multi = json.loads(out.read_text())["output_ids"]
    assert multi == single_rank_run(engine(variant), prompts, tmp_path / "single.json", *extra)
    assert len(multi) == len(prompts) * (2 if "--num_beams" in extra else 1)


@pytest.mark.mpi
def test_mpirun_rank_count_mismatch_is_one_line(engine):
    result = run_mpi(
        2, "run", "--engine_dir", str(engine("falcon2", 4)), "--input_ids", "1,2,3", "--max_output_len", "4"
    )
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "world_size 4" in lines[0] and "mpirun -n 4" in lines[0]


def test_multirank_engine_without_mpirun_is_one_line(engine):
    args = ["run", "--engine_dir", str(engine("rw", 2)), "--input_ids", "1,2,3", "--max_output_len", "4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert "world_size 2" in lines[0] and "mpirun -n 2" in lines[0]


@pytest.mark.mpi
def test_distributed_runner_checks_the_rank_count_itself(registry, engine):
    """The runner's own check (for launchers that publish no rank variables): this process is one rank."""
    from compiler_core.build.engine import read_engine_config
    from compiler_core.errors import UsageError
    from compiler_core.runtime.distributed import open_distributed_runner

    engine_dir = engine("rw", 2)
    with pytest.raises(
        UsageError, match="engine has world_size 2 but mpirun started 1 rank; start it with: mpirun -n 2"
    ):
        open_distributed_runner(registry, engine_dir, read_engine_config(engine_dir), "cpu")
