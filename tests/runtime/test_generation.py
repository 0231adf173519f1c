"""generate() against transformers' generate: greedy, beam search, sampling, EOS, build limits."""

from __future__ import annotations

from collections import Counter

import pytest

from compiler_core.errors import UsageError
from compiler_core.runtime.generation import GenerationConfig, generate
from compiler_core.runtime.open import open_runner, special_ids
from compiler_core.runtime.session import GRAPH_LEN_STEP
from compiler_core.testing import hf_generate, strip_padding

VARIANTS = ["rw", "7b", "40b", "180b", "falcon2"]
NEW_TOKENS = 16
PAD = 0


def only(outputs: list[list[list[int]]]) -> list[list[int]]:
    """The single beam of each prompt."""
    assert all(len(beams) == 1 for beams in outputs)
    return [beams[0] for beams in outputs]


def frequent_token(runner, prompt_ids) -> int:
    """A token greedy decoding emits often, used as end_id so that sequences really end early."""
    outputs = only(generate(runner, prompt_ids, GenerationConfig(NEW_TOKENS)))
    counts = Counter(t for row in outputs for t in row[1:])
    return counts.most_common(1)[0][0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers(variant, engine_dir, hf_model, prompt_ids):
    runner, config = open_runner(engine_dir(variant), "cpu")
    end_id, _ = special_ids(config)
    ours = only(generate(runner, prompt_ids, GenerationConfig(NEW_TOKENS, end_id=end_id, pad_id=PAD)))
    ref = hf_generate(hf_model(variant), prompt_ids, PAD, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert [strip_padding(row, len(seq), {PAD}) for row, seq in zip(ref, ours, strict=True)] == ours
    assert sum(len(row) for row in ours) > 2 * NEW_TOKENS


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_unpadded_prompts_match_transformers(variant, mode, engine_dir, hf_model, prompt_ids):
    """Prompts of one length (each alone, and one repeated) run their prompt pass as new sequences
    (causal attention over their own tokens, no mask) and give transformers' greedy tokens."""
    runner, config = open_runner(engine_dir(variant), "cpu")
    runner.sessions[0].decode_mode = mode
    end_id, _ = special_ids(config)
    model = hf_model(variant)
    batches = [[p] for p in prompt_ids] + [[prompt_ids[1]] * 3]
    for batch in batches:
        ours = only(generate(runner, batch, GenerationConfig(NEW_TOKENS, end_id=end_id, pad_id=PAD)))
        ref = hf_generate(model, batch, PAD, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert [strip_padding(row, len(seq), {PAD}) for row, seq in zip(ref, ours, strict=True)] == ours


@pytest.mark.parametrize("variant", ["7b", "40b", "rw"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_new_sequences_attend_causally_to_their_own_tokens(variant, mode, engine_dir, prompt_ids, monkeypatch):
    """Told that its rows begin their sequences, a prompt pass gives the masked pass's logits and runs
    attention as unmasked causal SDPA; ALiBi models (rw), whose bias needs the mask, keep the mask."""
    import torch
    import torch.nn.functional as F

    from compiler_core.runtime.context import positions_from_mask

    runner, _ = open_runner(engine_dir(variant), "cpu")
    runner.sessions[0].decode_mode = mode
    ids = torch.tensor([prompt_ids[1]] * 2)
    mask = torch.ones_like(ids)
    runner.allocate(2, 64)
    causal: list[bool] = []
    shared_kv: list[bool] = []  # K/V handed over with fewer heads than Q (not repeated per query head)
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        causal.append(kwargs.get("is_causal", False) and kwargs.get("attn_mask") is None)
        shared_kv.append(kwargs.get("enable_gqa", False) and k.shape[1] < q.shape[1])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    masked = runner.last_logits(ids, positions_from_mask(mask), mask, 0)
    assert causal and not any(causal)
    assert not any(shared_kv)  # the masked kernels take K/V repeated per query head
    causal.clear()
    shared_kv.clear()
    own = runner.last_logits(ids, positions_from_mask(mask), mask, 0, new_sequences=True)
    assert causal and all(causal) == (variant != "rw") and any(causal) == (variant != "rw")
    # 7b (MQA) and 40b (GQA) share KV heads: flash attention takes them unrepeated.
    assert all(shared_kv) == (variant != "rw") and any(shared_kv) == (variant != "rw")
    torch.testing.assert_close(own, masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["rw", "7b", "40b"])
@pytest.mark.parametrize("beams", [2, 4])
@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_matches_transformers(variant, beams, early_stopping, engine_dir, hf_model, prompt_ids):
    runner, _ = open_runner(engine_dir(variant), "cpu")
    # Pick an end id that really finishes some hypotheses early, so finished-beam bookkeeping
    # (length penalty, early stopping, the 2B candidates) is exercised, not just max-length beams.
    no_end = generate(runner, prompt_ids, GenerationConfig(NEW_TOKENS, num_beams=beams))
    counts = Counter(t for per_prompt in no_end for seq in per_prompt for t in seq)
    for end_id, _ in counts.most_common(10):
        config = GenerationConfig(NEW_TOKENS, num_beams=beams, end_id=end_id, pad_id=PAD, early_stopping=early_stopping)
        if any(len(seq) < NEW_TOKENS for per_prompt in generate(runner, prompt_ids, config) for seq in per_prompt):
            break
    else:
        pytest.fail("no end id finishes a hypothesis early")
    ours = generate(runner, prompt_ids, config)
    ref = hf_generate(
        hf_model(variant),
        prompt_ids,
        PAD,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        num_beams=beams,
        num_return_sequences=beams,
        early_stopping=early_stopping,
        length_penalty=1.0,
        eos_token_id=end_id,
    )
    assert [len(b) for b in ours] == [beams] * len(prompt_ids)
    flat = [seq for per_prompt in ours for seq in per_prompt]
    assert [strip_padding(row, len(seq), {PAD, end_id}) for row, seq in zip(ref, flat, strict=True)] == flat
    assert all(seq[-1] == end_id for seq in flat if len(seq) < NEW_TOKENS)


def test_greedy_stops_each_sequence_at_end_id(engine_dir, hf_model, prompt_ids):
    runner, _ = open_runner(engine_dir("7b"), "cpu")
    end_id = frequent_token(runner, prompt_ids)
    ours = only(generate(runner, prompt_ids, GenerationConfig(NEW_TOKENS, end_id=end_id, pad_id=PAD)))
    ref = hf_generate(hf_model("7b"), prompt_ids, PAD, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=end_id)
    for seq, row in zip(ours, ref, strict=True):
        assert end_id not in seq[:-1]
        assert seq == strip_padding(row, len(seq), {PAD})
    assert any(seq[-1] == end_id and len(seq) < NEW_TOKENS for seq in ours)
    assert any(len(seq) != len(ours[0]) for seq in ours), "sequences should end at different steps"


def two_stop_tokens(runner, prompt_ids, beams: int) -> tuple[int, int]:
    """Two stop tokens, the second of which changes what the first alone would give."""
    free = generate(runner, prompt_ids, GenerationConfig(NEW_TOKENS, num_beams=beams))
    tokens = [t for per_prompt in free for seq in per_prompt for t in seq[1:]]
    first = Counter(tokens).most_common(1)[0][0]
    alone = generate(runner, prompt_ids, GenerationConfig(NEW_TOKENS, num_beams=beams, end_id=first, pad_id=PAD))
    for second in dict.fromkeys(tokens):
        config = GenerationConfig(NEW_TOKENS, num_beams=beams, end_ids=(first, second), pad_id=PAD)
        if second != first and generate(runner, prompt_ids, config) != alone:
            return first, second
    pytest.fail("no second stop token changes the output")


@pytest.mark.parametrize("beams", [1, 2])
def test_several_stop_tokens_end_sequences_as_transformers_does(beams, engine_dir, hf_model, prompt_ids):
    runner, _ = open_runner(engine_dir("7b"), "cpu")
    stops = two_stop_tokens(runner, prompt_ids, beams)
    ours = generate(runner, prompt_ids, GenerationConfig(NEW_TOKENS, num_beams=beams, end_ids=stops, pad_id=PAD))
    ref = hf_generate(
        hf_model("7b"),
        prompt_ids,
        PAD,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        num_beams=beams,
        num_return_sequences=beams,
        eos_token_id=list(stops),
    )
    flat = [seq for per_prompt in ours for seq in per_prompt]
    assert [strip_padding(row, len(seq), {PAD, *stops}) for row, seq in zip(ref, flat, strict=True)] == flat
    assert all(seq[-1] in stops for seq in flat if len(seq) < NEW_TOKENS)
    assert all(not set(seq[:-1]) & set(stops) for seq in flat)


@pytest.mark.parametrize("variant", ["rw", "7b"])
@pytest.mark.parametrize(
    "options",
    [{"temperature": 0.8}, {"top_k": 5}, {"top_p": 0.7, "temperature": 1.3}, {"do_sample": True}],
    ids=["temperature", "top_k", "top_p", "plain"],
)
def test_sampling_draws_what_transformers_draws_with_the_same_seed(variant, options, engine_dir, hf_model, prompt_ids):
    import torch

    runner, _ = open_runner(engine_dir(variant), "cpu")
    ours = only(generate(runner, prompt_ids, GenerationConfig(NEW_TOKENS, seed=7, pad_id=PAD, **options)))
    torch.manual_seed(7)
    hf_options = {"top_k": 0, **{k: v for k, v in options.items() if k != "do_sample"}}  # HF's top_k default is 50
    ref = hf_generate(hf_model(variant), prompt_ids, PAD, max_new_tokens=NEW_TOKENS, do_sample=True, **hf_options)
    assert ours == ref


def test_sampling_is_reproducible_per_seed(engine_dir, prompt_ids):
    runner, _ = open_runner(engine_dir("7b"), "cpu")

    def sample(seed: int) -> list[list[int]]:
        return only(generate(runner, prompt_ids, GenerationConfig(NEW_TOKENS, temperature=1.5, seed=seed)))

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    greedy = only(generate(runner, prompt_ids, GenerationConfig(NEW_TOKENS)))
    assert first != greedy
    top1 = only(generate(runner, prompt_ids, GenerationConfig(NEW_TOKENS, top_k=1, do_sample=True, seed=3)))
    assert top1 == greedy


def test_tensor_parallel_engine_generates_the_same_tokens(registry, engine_dir, prompt_ids):
    """A tp=2 engine run in one process (ranks as threads) gives the single-rank tokens."""
    from compiler_core.build.engine import engine_mapping, load_rank_session, read_engine_config
    from compiler_core.runtime.runner import LocalRunner

    single, _ = open_runner(engine_dir("40b"), "cpu")
    path = engine_dir("40b", tp=2)
    config = read_engine_config(path)
    mapping = engine_mapping(config)
    runner = LocalRunner([load_rank_session(registry, path, r, "cpu", config) for r in mapping.ranks()], mapping)
    for config in (GenerationConfig(NEW_TOKENS), GenerationConfig(NEW_TOKENS, num_beams=2)):
        assert generate(runner, prompt_ids, config) == generate(single, prompt_ids, config)


@pytest.mark.parametrize(
    ("limits", "batch", "new", "message"),
    [
        ({"max_batch_size": 2}, 3, 4, "3 prompts exceed the engine's max_batch_size 2"),
        ({"max_input_len": 8}, 1, 4, "exceeds the engine's max_input_len 8"),
        ({"max_seq_len": 40}, 1, 30, "exceed the engine's max_seq_len 40"),
    ],
)
def test_build_limits_are_enforced(limits, batch, new, message, engine_dir, prompt_ids):
    runner, config = open_runner(engine_dir("rw"), "cpu")
    assert runner.build_limits == config["build"]
    runner.build_limits = {**config["build"], **limits}
    with pytest.raises(UsageError, match=message):
        generate(runner, prompt_ids[:batch], GenerationConfig(new))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_new_tokens": 0}, "--max_output_len"),
        ({"max_new_tokens": 4, "num_beams": 0}, "--num_beams"),
        ({"max_new_tokens": 4, "top_p": 1.5}, "--top_p"),
        ({"max_new_tokens": 4, "temperature": -1.0}, "--temperature"),
        ({"max_new_tokens": 4, "num_beams": 2, "temperature": 0.5}, "--num_beams"),
    ],
)
def test_bad_generation_settings_name_the_flag(options, field):
    with pytest.raises(UsageError, match=field):
        GenerationConfig(**options)


@pytest.mark.parametrize(("variant", "tp"), [("rw", 1), ("7b", 1), ("40b", 2)])
def test_last_logits_skips_the_tail_without_changing_results(registry, variant, tp, engine_dir, prompt_ids):
    """The prompt pass computes the output layers for the last position only, with the same values."""
    import torch

    from compiler_core.build.engine import engine_mapping, load_rank_session, read_engine_config
    from compiler_core.runtime.context import positions_from_mask
    from compiler_core.runtime.runner import LocalRunner
    from compiler_core.testing import left_padded

    path = engine_dir(variant, tp)
    config = read_engine_config(path)
    mapping = engine_mapping(config)
    runner = LocalRunner([load_rank_session(registry, path, r, "cpu", config) for r in mapping.ranks()], mapping)
    ids, mask = left_padded(prompt_ids, PAD)
    runner.allocate(len(prompt_ids), ids.shape[1])
    full = runner.logits(ids, positions_from_mask(mask), mask, 0)
    last = runner.last_logits(ids, positions_from_mask(mask), mask, 0)
    torch.testing.assert_close(last, full[:, -1], rtol=1e-5, atol=1e-5)
    if tp == 1:
        out = runner.sessions[0].forward(ids, positions_from_mask(mask), mask, 0, last_only=True)
        assert out.shape == (len(prompt_ids), 1, config["checkpoint"]["vocab_size"])


@pytest.mark.parametrize("variant", ["rw", "7b", "40b"])
def test_static_shape_decode_equals_dynamic_decode(variant, engine_dir, prompt_ids):
    """The fixed-shape decode step and prompt pass that CUDA graphs capture (device-held cache
    offset, attention over the whole cache under a mask, the prompt padded to a power of two)
    give the tokens of the default ones, greedy and with beams."""
    runner, _ = open_runner(engine_dir(variant), "cpu")
    session = runner.sessions[0]
    assert session.decode_mode == "dynamic"  # the CPU default
    # The same shapes twice in a row reuse the cache (and, on CUDA, the captured step).
    runs = [
        (p, c)
        for c in (GenerationConfig(NEW_TOKENS), GenerationConfig(NEW_TOKENS, num_beams=3))
        for p in (prompt_ids, prompt_ids[::-1])
    ]
    dynamic = [generate(runner, p, c) for p, c in runs]
    session.decode_mode = "static"
    assert [generate(runner, p, c) for p, c in runs] == dynamic
    assert session._step is not None  # the static path really ran
    assert any(whole for whole, *_ in session._chunks)  # and the static prompt pass


def test_static_session_keeps_its_cache_and_step_across_shorter_runs(engine_dir, prompt_ids):
    """Runs that alternate a long and a short generation share one static cache and its captured
    step (on CUDA, recapturing for each would cost more than the run), with the tokens of the
    dynamic path; a run needing more room than the cache has gets a new one."""
    runner, _ = open_runner(engine_dir("7b"), "cpu")
    session = runner.sessions[0]
    # The long run's cache is a rounding step longer than the 1- and 2-token runs would allocate.
    long = GRAPH_LEN_STEP + NEW_TOKENS
    lengths = [long, 1, long, 2]
    dynamic = [generate(runner, prompt_ids, GenerationConfig(n)) for n in lengths]
    session.decode_mode = "static"
    static = [generate(runner, prompt_ids, GenerationConfig(lengths[0]))]
    cache, step = session.cache, session._step
    static += [generate(runner, prompt_ids, GenerationConfig(n)) for n in lengths[1:]]
    assert static == dynamic
    assert session.cache is cache and session._step is step
    runner.allocate(len(prompt_ids), cache.max_len + 1)
    assert session.cache is not cache and session.cache.max_len > cache.max_len


@pytest.mark.parametrize("variant", ["7b", "rw", "40b"])
def test_static_prompt_pass_gives_every_positions_logits(variant, engine_dir, prompt_ids):
    """The static prompt pass (padded to a power of two, attention over the whole cache) returns
    the logits of every real position, as the default pass does, left padding included."""
    import torch

    from compiler_core.runtime.context import positions_from_mask
    from compiler_core.testing import left_padded

    runner, _ = open_runner(engine_dir(variant), "cpu")
    ids, mask = left_padded(prompt_ids, 0)
    out = {}
    for mode in ("dynamic", "static"):
        runner.sessions[0].decode_mode = mode
        runner.allocate(len(prompt_ids), 128)  # room for the padding to a power of two
        with torch.inference_mode():
            out[mode] = runner.logits(ids, positions_from_mask(mask), mask, 0)
    assert runner.sessions[0]._chunks  # the static pass ran
    assert out["static"].shape == out["dynamic"].shape
    real = mask.bool()
    torch.testing.assert_close(out["static"][real], out["dynamic"][real], rtol=1e-5, atol=1e-5)
