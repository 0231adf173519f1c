"""``modelc summarize``: prompts, datasets, ROUGE, the JSON report, the accuracy gate and mpirun."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from compiler_core.cli import cli
from compiler_core.errors import UsageError
from compiler_core.evaluate.summarize import (
    ROUGE_KEYS,
    agreement,
    load_articles,
    prompt_ids,
    prompt_text,
    rouge,
)
from compiler_core.testing import error_lines, run_mpi

#: Small and quick: two batches of two articles, 64 prompt tokens, 16 new tokens.
QUICK = ["--max_ite", "2", "--batch_size", "2", "--max_input_length", "64", "--output_len", "16", "--device", "cpu"]


def summarize(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["summarize", *args])
    return result.exit_code, result.output


# --- ROUGE, by hand ----------------------------------------------------------------------------


def test_rouge_matches_hand_computed_scores():
    # Pair 1: 6 tokens each, 5 shared unigrams (the x2, cat, on, mat), 3 of 5 bigrams shared
    #   (the-cat, on-the, the-mat), LCS "the cat on the mat" = 5:  R1 = L = Lsum = 5/6, R2 = 3/5.
    # Pair 2: the same six words in swapped sentence order. Unigrams all match (1); bigrams
    #   the-cat, cat-sat, the-dog, dog-ran of 5 match (4/5); the whole-text LCS is one sentence
    #   (3 of 6: 1/2); the summary-level LCS matches each reference sentence with its twin (1).
    predictions = ["the cat sat on the mat", "the dog ran. the cat sat."]
    references = ["the cat is on the mat", "the cat sat. the dog ran."]
    scores = rouge(predictions, references)
    expected = {
        "rouge1": 100 * (5 / 6 + 1) / 2,
        "rouge2": 100 * (3 / 5 + 4 / 5) / 2,
        "rougeL": 100 * (5 / 6 + 1 / 2) / 2,
        "rougeLsum": 100 * (5 / 6 + 1) / 2,
    }
    assert scores == pytest.approx(expected, abs=1e-9)


def test_rouge_f_measure_of_unequal_lengths():
    # 2 of 4 predicted tokens appear in the 2-token reference: P = 1/2, R = 1, F = 2PR/(P+R) = 2/3.
    assert rouge(["alpha beta gamma delta"], ["alpha beta"])["rouge1"] == pytest.approx(200 / 3)


def test_agreement_counts_identical_texts_as_perfect():
    # A tiny random model may emit no words at all; equal outputs still agree fully.
    assert agreement(["...", "one"], ["...", "one"]) == dict.fromkeys(ROUGE_KEYS, 100.0)
    mixed = agreement(["...", "alpha beta gamma delta"], ["...", "alpha beta"])
    assert mixed["rouge1"] == pytest.approx((100 + 200 / 3) / 2)


# --- prompts -----------------------------------------------------------------------------------


def test_prompt_text_follows_the_example():
    assert prompt_text("  It is n't late.") == "It isn't late. TL;DR:"


def test_left_truncation_keeps_the_last_tokens(tokenizer):
    article = load_articles()[0].article
    full = tokenizer(prompt_text(article))["input_ids"]
    assert len(full) > 200
    kept = prompt_ids(tokenizer, article, 50)
    assert kept == full[-50:]
    assert tokenizer.decode(kept).endswith("TL;DR:")
    assert prompt_ids(tokenizer, article, 10_000) == full
    with pytest.raises(UsageError, match="--max_input_length"):
        prompt_ids(tokenizer, article, 0)


# --- datasets ----------------------------------------------------------------------------------


def test_sample_dataset_ships_with_the_package():
    rows = load_articles()
    assert len(rows) >= 20 and all(r.article and r.highlights for r in rows)


def test_jsonl_parquet_and_arrow_read_the_same_rows(jsonl_dataset, parquet_dataset, rows, tmp_path):
    arrow = tmp_path / "rows.arrow"
    with pa.ipc.new_file(arrow, pa.Table.from_pylist(rows).schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows))
    stream = tmp_path / "stream.arrow"  # the layout of Hugging Face datasets' cache files
    with pa.ipc.new_stream(stream, pa.Table.from_pylist(rows).schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows))
    expected = [(r["article"], r["highlights"]) for r in rows]
    for path in (jsonl_dataset, parquet_dataset, arrow, stream):
        assert [(a.article, a.highlights) for a in load_articles(path)] == expected


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_wrong_columns_exit_2_naming_file_and_column(kind, engines, tmp_path):
    path = tmp_path / f"bad.{kind}"
    if kind == "jsonl":
        path.write_text(json.dumps({"document": "text", "highlights": "h"}) + "\n", encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist([{"document": "text", "highlights": "h"}]), path)
    code, output = summarize("--engine_dir", str(engines[1]), "--dataset", str(path), *QUICK)
    assert code == 2, output
    (line,) = error_lines(output)
    assert str(path) in line and "'article'" in line


def test_missing_dataset_exits_2(engines, tmp_path):
    code, output = summarize("--engine_dir", str(engines[1]), "--dataset", str(tmp_path / "nope.jsonl"), *QUICK)
    assert code == 2
    (line,) = error_lines(output)
    assert "nope.jsonl" in line and "not found" in line


def test_jsonl_and_parquet_give_the_same_scores(engines, jsonl_dataset, parquet_dataset, tmp_path):
    reports = []
    for path in (jsonl_dataset, parquet_dataset):
        out = tmp_path / f"{path.suffix}.json"
        code, output = summarize(
            "--engine_dir", str(engines[1]), "--dataset", str(path), *QUICK, "--output_json", str(out)
        )
        assert code == 0, output
        reports.append(json.loads(out.read_text()))
    assert {k: reports[0]["engine"][k] for k in ROUGE_KEYS} == {k: reports[1]["engine"][k] for k in ROUGE_KEYS}


# --- the report --------------------------------------------------------------------------------


def test_engine_equals_transformers_and_report_layout(engines, hf_dir, tmp_path):
    out = tmp_path / "report.json"
    args = ["--engine_dir", str(engines[1]), "--hf_model_dir", str(hf_dir), "--test_trt_llm", "--test_hf"]
    code, output = summarize(*args, *QUICK, "--output_json", str(out))
    assert code == 0, output
    report = json.loads(out.read_text())
    metrics = {*ROUGE_KEYS, "latency_s", "tokens_per_s"}
    assert set(report) == {"engine", "hf", "engine_vs_hf"}
    assert set(report["engine"]) == set(report["hf"]) == metrics
    assert set(report["engine_vs_hf"]) == set(ROUGE_KEYS)
    # fp32 greedy: the engine writes exactly transformers' summaries.
    assert report["engine_vs_hf"]["rouge1"] == 100.0
    assert all(report["engine"][k] == report["hf"][k] for k in ROUGE_KEYS)
    assert report["engine"]["tokens_per_s"] > 0 and report["hf"]["latency_s"] > 0
    assert "rouge1 :" in output and "latency" in output


def test_test_hf_needs_hf_model_dir(engines):
    code, output = summarize("--engine_dir", str(engines[1]), "--test_hf", *QUICK)
    assert code == 2 and "--hf_model_dir" in error_lines(output)[0]


@pytest.mark.parametrize(("threshold", "exit_code"), [("100", 1), ("-1", 0)])
def test_check_accuracy(threshold, exit_code, engines):
    args = ["--engine_dir", str(engines[1]), *QUICK, "--max_ite", "1", "--output_len", "4", "--check_accuracy"]
    code, output = summarize(*args, "--tensorrt_llm_rouge1_threshold", threshold)
    assert code == exit_code, output
    if exit_code:
        (line,) = error_lines(output)
        assert "rouge1" in line and "--tensorrt_llm_rouge1_threshold 100" in line


@pytest.mark.mpi
def test_mpirun_tp2_equals_single_rank(engines, hf_dir, tmp_path):
    args = ["--hf_model_dir", str(hf_dir), "--test_trt_llm", "--test_hf", *QUICK]
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    code, output = summarize("--engine_dir", str(engines[1]), *args, "--output_json", str(single))
    assert code == 0, output
    result = run_mpi(2, "summarize", "--engine_dir", str(engines[2]), *args, "--output_json", str(multi))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("engine (total latency") == 1, result.stdout  # rank 0 alone prints
    one, two = json.loads(single.read_text()), json.loads(multi.read_text())
    # The tp2 summaries are transformers' (agreement 100), and score exactly as the single-rank ones.
    assert two["engine_vs_hf"] == dict.fromkeys(ROUGE_KEYS, 100.0)
    for section in ("engine", "hf"):
        assert {k: two[section][k] for k in ROUGE_KEYS} == {k: one[section][k] for k in ROUGE_KEYS}
