"""compiler_core.quantize.calibration: reading calibration text, packing it into blocks, observing nodes."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from compiler_core.errors import UsageError
from compiler_core.quantize.calibration import (
    collect_stats,
    load_calibration_set,
    make_calibration_set,
    model_graph,
    read_texts,
    real_tokens,
)


def test_read_texts_from_every_format(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond\n\n\n")
    assert read_texts(txt) == ["first paragraph\nstill first", "second"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"article": "two", "highlights": "x"}) + "\n")
    assert read_texts(jsonl) == ["one", "two"]
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"article": ["p1", None, "p2"], "id": [1, 2, 3]}), parquet)
    assert read_texts(parquet) == ["p1", "p2"]
    assert len(read_texts(None)) > 50  # the shipped corpus, split into paragraphs


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", "{not json\n", "bad.jsonl:1: not valid JSON"),
        ("empty.txt", "\n\n  \n", "empty.txt: calibration dataset holds no text"),
        ("bin.txt", b"\xff\xfe\x00", "bin.txt: not UTF-8 text"),
    ],
)
def test_bad_datasets_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(UsageError, match=message):
        read_texts(path)


def test_parquet_without_a_text_column(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(UsageError, match=r"a\.parquet: no 'text' or 'article' column"):
        read_texts(path)


def test_texts_are_packed_into_full_blocks_with_eos_between(tokenizer):
    texts = ["alpha beta gamma delta", "epsilon zeta eta theta iota"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    stream = ids[0] + [tokenizer.eos_token_id] + ids[1] + [tokenizer.eos_token_id]
    cal = make_calibration_set(texts, tokenizer, num_samples=3, max_seq_length=4, batch_size=2)
    blocks = torch.cat([b.input_ids for b in cal.batches]).tolist()
    assert blocks == [stream[0:4], stream[4:8], stream[8:12]]
    assert [b.input_ids.shape[0] for b in cal.batches] == [2, 1]
    assert cal.num_samples == 3 and cal.num_tokens == 12
    # Too little text for one full block: the short tail is used rather than nothing.
    short = make_calibration_set(["alpha"], tokenizer, num_samples=8, max_seq_length=512)
    alpha = tokenizer("alpha", add_special_tokens=False)["input_ids"]
    assert short.num_samples == 1 and short.num_tokens == len(alpha) + 1
    assert short.batches[0].input_ids[0, -1].item() == tokenizer.eos_token_id


def test_default_calibration_set_uses_the_model_tokenizer(hf_dir):
    cal = load_calibration_set(hf_dir("rw"), num_samples=5, max_seq_length=16, batch_size=2)
    assert cal.source == "compiler_core/data/corpus.txt"
    assert [tuple(b.input_ids.shape) for b in cal.batches] == [(2, 16), (2, 16), (1, 16)]
    assert all(bool(b.attention_mask.all()) for b in cal.batches)


def test_collect_stats_observes_what_the_nodes_saw(registry, hf_dir, tokenizer):
    """Observers get each watched node's real inputs/outputs and can read the batch's KV cache."""
    from compiler_core.backends.torch.executor import GraphExecutor
    from compiler_core.convert.from_hf import load_full_model
    from compiler_core.runtime.context import ForwardContext

    model = load_full_model(registry, hf_dir("7b"), "float32", show_progress=False)
    graph = model_graph(registry, model)
    cal = make_calibration_set(["the river rose after the rain " * 8], tokenizer, num_samples=2, max_seq_length=8)
    seen: dict[str, list] = {}

    def record(node, inputs, output, ctx):
        entry = (real_tokens(inputs[0], ctx).clone(), output.clone())
        if node.op == "attention":
            slot = ctx.cache.slots[node.attrs["cache_slot"]]
            entry += (slot.k[:, :, : inputs[0].shape[1]].clone(),)
        seen.setdefault(node.name, []).append(entry)

    watched = ["layers.0.mlp.fc", "layers.1.attention.core"]
    collect_stats(registry, graph, model.weights, cal, dict.fromkeys(watched, record), show_progress=False)
    assert [len(seen[n]) for n in watched] == [2, 2]
    x, y = seen["layers.0.mlp.fc"][1]
    w = model.weights["layers.0.mlp.fc.weight"]
    torch.testing.assert_close(y.reshape(-1, y.shape[-1]), x @ w.T)
    # The same graph run plainly gives the same values: observing changes nothing.
    plain = GraphExecutor(registry, graph, model.weights)
    ids = cal.batches[1].input_ids
    out = plain.run({"input_ids": ids}, ForwardContext.for_prompt(torch.ones_like(ids)))
    assert out and seen["layers.1.attention.core"][1][2].shape[2] == ids.shape[1]
    with pytest.raises(ValueError, match="no node 'nope' to observe"):
        collect_stats(registry, graph, model.weights, cal, {"nope": record}, show_progress=False)
