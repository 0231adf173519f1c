"""``modelc serve`` in a subprocess on a loopback port, driven with the official ``openai`` client and plain HTTP.

Every greedy answer is checked against the runtime's own ``generate`` on the same prompt alone
(and once against ``modelc run`` itself), so batching, slots and chunked prefill cannot change
what a request gets.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from compiler_core.runtime.generation import GenerationConfig, generate
from compiler_core.runtime.open import load_tokenizer, open_runner, special_ids
from compiler_core.testing import run_modelc, serving

openai = pytest.importorskip("openai")

VARIANT = "7b"
PROMPTS = [
    "The river ran slowly past the old mill, and the miller's daughter counted the boats",
    "Cooking rice well takes patience",
    "Light",
]


@pytest.fixture(scope="module")
def engine_dir(engine):
    return engine(VARIANT)


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory):
    # A small prefill chunk, so that the long prompts are prefilled over several steps.
    with serving(engine_dir, "--prefill_chunk", "8", log_dir=tmp_path_factory.mktemp("serve")) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(engine_dir):
    """prompt ids, max_tokens, sampling -> the runtime's ``generate`` on that prompt alone."""
    runner, config = open_runner(engine_dir, "cpu")
    end_id, pad_id = special_ids(config)

    def alone(prompt: list[int], max_tokens: int, **sampling) -> list[int]:
        gen = GenerationConfig(max_new_tokens=max_tokens, end_id=end_id, pad_id=pad_id, **sampling)
        return generate(runner, [prompt], gen)[0][0]

    return alone


@pytest.fixture(scope="module")
def tok(engine_dir):
    return load_tokenizer(engine_dir)


def ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def test_models_and_health(client, server, engine_dir):
    (card,) = client.models.list().data
    assert card.id == engine_dir.name
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4


def test_completion_equals_modelc_run(client, engine_dir, tmp_path):
    out = tmp_path / "run.json"
    result = run_modelc(
        "run", "--engine_dir", str(engine_dir), "--input_text", PROMPTS[1], "--max_output_len", "12",
        "--output_json", str(out), "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = json.loads(out.read_text())
    answer = client.completions.create(model=engine_dir.name, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert answer.choices[0].text == expected["output_text"][0]
    assert answer.choices[0].token_ids == expected["output_ids"][0]


def test_completions_and_chat_equal_the_prompt_alone(client, engine_dir, reference, tok):
    for text in PROMPTS:
        answer = client.completions.create(model=engine_dir.name, prompt=text, max_tokens=20, temperature=0)
        expected = reference(ids(tok, text), 20, temperature=0)
        assert answer.choices[0].token_ids == expected
        assert answer.choices[0].text == tok.decode(expected, skip_special_tokens=True)
        assert answer.usage.prompt_tokens == len(ids(tok, text)) and answer.usage.completion_tokens == len(expected)
        assert answer.choices[0].finish_reason == ("stop" if len(expected) < 20 else "length")
    # The tiny tokenizer has no chat template: the documented default applies.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Cook rice"}]
    chat = client.chat.completions.create(model=engine_dir.name, messages=messages, max_tokens=15, temperature=0)
    templated = "system: Be brief.\nuser: Cook rice\nassistant:"
    expected = reference(ids(tok, templated), 15, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    assert chat.usage.prompt_tokens == len(ids(tok, templated))


def test_streams_add_up_to_the_whole_answer(client, engine_dir):
    whole = client.completions.create(model=engine_dir.name, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(model=engine_dir.name, prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True)
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason

    messages = [{"role": "user", "content": PROMPTS[2]}]
    whole = client.chat.completions.create(model=engine_dir.name, messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=engine_dir.name, messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stop_strings_and_stop_token_ids(client, engine_dir, tok):
    full = client.completions.create(model=engine_dir.name, prompt=PROMPTS[1], max_tokens=20, temperature=0)
    text, token_ids = full.choices[0].text, full.choices[0].token_ids
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text[: text.index(stop)]
    for stream in (False, True):
        answer = client.completions.create(
            model=engine_dir.name, prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=[stop], stream=stream
        )
        if stream:
            parts = [c.choices[0] for c in answer if c.choices]
            assert "".join(p.text for p in parts) == cut and parts[-1].finish_reason == "stop"
        else:
            assert answer.choices[0].text == cut and answer.choices[0].finish_reason == "stop"
    answer = client.completions.create(
        model=engine_dir.name,
        prompt=PROMPTS[1],
        max_tokens=20,
        temperature=0,
        extra_body={"stop_token_ids": [token_ids[2]]},
    )
    first = token_ids.index(token_ids[2])
    assert answer.choices[0].token_ids == token_ids[: first + 1] and answer.choices[0].finish_reason == "stop"


def test_logprobs_are_the_models(client, engine_dir, tok):
    runner, _ = open_runner(engine_dir, "cpu")
    prompt = ids(tok, PROMPTS[1])
    mask = torch.ones((1, len(prompt)), dtype=torch.long)
    runner.allocate(1, len(prompt))
    logits = runner.last_logits(torch.tensor([prompt]), torch.arange(len(prompt))[None], mask, 0)[0].float()
    expected = logits.log_softmax(-1)
    answer = client.completions.create(
        model=engine_dir.name, prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=3
    )
    lp = answer.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    first = answer.choices[0].token_ids[0]
    assert lp.token_logprobs[0] == pytest.approx(float(expected[first]), abs=1e-4)
    top3 = torch.topk(expected, 3).values.tolist()
    assert sorted(lp.top_logprobs[0].values(), reverse=True) == pytest.approx(top3, abs=1e-4)
    assert "".join(lp.tokens) == answer.choices[0].text and lp.text_offset[0] == 0


def test_seeded_sampling_is_reproducible_and_n_samples_differ(client, engine_dir, reference, tok):
    kw = dict(model=engine_dir.name, prompt=PROMPTS[1], max_tokens=12, temperature=1.5, top_p=0.95)
    first = client.completions.create(**kw, n=2, seed=7, extra_body={"top_k": 50})
    again = client.completions.create(**kw, n=2, seed=7, extra_body={"top_k": 50})
    assert [c.token_ids for c in first.choices] == [c.token_ids for c in again.choices]
    assert first.choices[0].token_ids != first.choices[1].token_ids
    # Sequence j of a seeded request draws with seed + j, as `modelc run --seed` draws with its seed.
    expected = reference(ids(tok, PROMPTS[1]), 12, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    assert first.choices[0].token_ids == expected


def test_bad_requests_get_400_and_the_server_keeps_serving(client, server, engine_dir):
    url = server.url + "/v1/completions"
    cases = {
        "malformed JSON": (b'{"prompt": "x",', None),
        "not an object": (b"[1, 2]", None),
        "unknown field": (json.dumps({"prompt": "x", "colour": "red"}).encode(), "colour"),
        "prompt over max_input_len": (json.dumps({"prompt": [5] * 41}).encode(), "prompt"),
        "max_tokens past max_seq_len": (json.dumps({"prompt": [5] * 40, "max_tokens": 25}).encode(), "max_tokens"),
        "token id outside the vocabulary": (json.dumps({"prompt": [1, 10**6]}).encode(), "prompt"),
        "wrong type": (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), "temperature"),
        "other model": (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), "model"),
    }
    for name, (body, param) in cases.items():
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, name
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"], name
    response = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0]"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=engine_dir.name, prompt="x", max_tokens=64)
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    answer = client.completions.create(model=engine_dir.name, prompt="x", max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_sixteen_clients_at_once_each_get_the_answer_alone(client, engine_dir, reference, tok):
    rng = random.Random(1)
    words = " ".join(PROMPTS).split()
    jobs = []
    while len(jobs) < 16:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 16)))
        if len(ids(tok, text)) > 40:  # max_input_len
            continue
        budget = rng.randint(1, 64 - len(ids(tok, text)))
        jobs.append((text, budget, len(jobs) % 3 == 0))

    def ask(job):
        text, budget, stream = job
        kw = dict(model=engine_dir.name, prompt=text, max_tokens=budget, temperature=0)
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
        return client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for (text, budget, _), answer in zip(jobs, answers, strict=True):
        expected = reference(ids(tok, text), budget, temperature=0)
        assert answer == tok.decode(expected, skip_special_tokens=True), text


def test_api_key_guards_every_route_but_health(engine_dir, tmp_path):
    with serving(engine_dir, "--api_key", "sesame", log_dir=tmp_path) as server:
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/v1/models").status_code == 401
        wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=engine_dir.name, prompt="x", max_tokens=2)
        right = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)
        assert right.completions.create(model=engine_dir.name, prompt="x", max_tokens=2).usage.completion_tokens >= 1
