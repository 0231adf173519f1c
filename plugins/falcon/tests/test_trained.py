"""``modelc tiny-falcon --trained``: deterministic, cached, and English-like where random weights are not."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from modelc_plugins.falcon import trained
from modelc_plugins.falcon.testing import shared_model_cache
from modelc_plugins.falcon.tiny import corpus_text, make_tiny_falcon
from modelc_plugins.falcon.trained import TrainingRecipe, cache_key, cached_trained_falcon

#: What examples/demo.sh asks for (``--variant 7b --num_layers 2 --trained``).
DEMO_RECIPE = TrainingRecipe(num_layers=2)
#: A recipe that trains in a second: enough to exercise every step of training and caching.
QUICK = TrainingRecipe(num_layers=1, hidden_size=64, vocab_size=400, steps=3, batch_size=2, seq_len=32, warmup_steps=1)
#: Prompts the corpus does not contain.
PROMPTS = (
    "The river ran slowly past the old mill, and",
    "In the morning the village",
    "She opened the door and",
    "The city council said that",
    "After the storm, the farmers",
)
WORD = re.compile(r"[a-z]+")


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def greedy_texts(model_dir: Path, prompts: list[list[int]], new_tokens: int = 32) -> list[str]:
    from transformers import AutoTokenizer

    from compiler_core.testing import hf_greedy

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    outputs = hf_greedy(model_dir, prompts, new_tokens, tokenizer.eos_token_id)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]


def prompt_ids(model_dir: Path, texts: tuple[str, ...]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [tokenizer(t)["input_ids"] for t in texts]


def corpus_word_share(texts: list[str]) -> float:
    """The share of the words in ``texts`` that occur in the shipped corpus."""
    vocabulary = set(WORD.findall(corpus_text().lower()))
    words = [w for t in texts for w in WORD.findall(t.lower())]
    return sum(w in vocabulary for w in words) / max(len(words), 1)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The demo's trained model (trained once per session, in the session's shared test cache)."""
    return cached_trained_falcon("7b", DEMO_RECIPE, cache_root=shared_model_cache(tmp_path_factory)).path


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    return make_tiny_falcon(tmp_path_factory.mktemp("random") / "7b", "7b", num_layers=DEMO_RECIPE.num_layers)


def test_two_trainings_write_the_same_bytes(tmp_path):
    first = cached_trained_falcon("7b", QUICK, cache_root=tmp_path / "a", show_progress=False)
    second = cached_trained_falcon("7b", QUICK, cache_root=tmp_path / "b", show_progress=False)
    assert not first.from_cache and not second.from_cache
    assert first.path.name == second.path.name
    files = file_bytes(first.path)
    assert any(name.endswith(".safetensors") for name in files) and "tokenizer.json" in files
    assert files == file_bytes(second.path)


def test_a_second_call_uses_the_cache_and_leaves_no_temporary_dirs(tmp_path, monkeypatch):
    made = cached_trained_falcon("rw", QUICK, cache_root=tmp_path, show_progress=False)

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained again although the cache holds the model")

    monkeypatch.setattr(trained, "train_tiny_falcon", must_not_train)
    again = cached_trained_falcon("rw", QUICK, cache_root=tmp_path, show_progress=False)
    assert again.from_cache and again.path == made.path and again.final_loss == made.final_loss
    assert [p.name for p in (tmp_path / "tiny-falcon").iterdir()] == [made.path.name]


def test_the_cache_key_covers_variant_recipe_and_dtype():
    keys = {
        cache_key("7b", QUICK, "float32"),
        cache_key("rw", QUICK, "float32"),
        cache_key("7b", replace(QUICK, steps=4), "float32"),
        cache_key("7b", replace(QUICK, seed=1), "float32"),
        cache_key("7b", QUICK, "bfloat16"),
    }
    assert len(keys) == 5


def test_interrupted_training_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trained, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cached_trained_falcon("7b", QUICK, cache_root=tmp_path, show_progress=False)
    assert list((tmp_path / "tiny-falcon").iterdir()) == []


def test_concurrent_trainings_share_one_complete_entry(tmp_path):
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from modelc_plugins.falcon.trained import TrainingRecipe, cached_trained_falcon
        made = cached_trained_falcon("7b", TrainingRecipe(**{QUICK.__dict__!r}), cache_root=Path({str(tmp_path)!r}),
                                     show_progress=False)
        print(made.path)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    entry = Path(paths.pop())
    assert [p.name for p in (tmp_path / "tiny-falcon").iterdir()] == [entry.name]
    assert file_bytes(entry) == file_bytes(cached_trained_falcon("7b", QUICK, cache_root=tmp_path / "fresh").path)


def test_the_cli_writes_the_cached_model(tmp_path, tmp_path_factory, demo_model):
    from compiler_core.testing import run_modelc

    out = tmp_path / "hf"
    proc = run_modelc(
        *("tiny-falcon", "--output_dir", str(out), "--variant", "7b", "--num_layers", str(DEMO_RECIPE.num_layers)),
        "--trained",
        env={"MODELC_CACHE_DIR": str(shared_model_cache(tmp_path_factory))},
    )
    assert proc.returncode == 0, proc.stderr
    assert "from the cache" in proc.stdout
    assert file_bytes(out) == file_bytes(demo_model)


def test_greedy_text_is_english_like_where_random_weights_are_not(demo_model, random_model):
    trained_share = corpus_word_share(greedy_texts(demo_model, prompt_ids(demo_model, PROMPTS)))
    random_share = corpus_word_share(greedy_texts(random_model, prompt_ids(random_model, PROMPTS)))
    assert trained_share >= 0.85, trained_share
    assert random_share < 0.5, random_share


def test_summaries_of_the_sample_articles_score_rouge_above_zero(demo_model):
    from transformers import AutoTokenizer

    from compiler_core.evaluate import summarize

    tokenizer = AutoTokenizer.from_pretrained(str(demo_model))
    articles = summarize.load_articles()[:8]
    prompts = [summarize.prompt_ids(tokenizer, a.article, 128) for a in articles]
    scores = summarize.rouge(greedy_texts(demo_model, prompts), [a.highlights for a in articles])
    assert scores["rouge1"] > 5.0, scores
