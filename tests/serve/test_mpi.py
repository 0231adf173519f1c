"""``mpirun -n 2 modelc serve``: rank 0 serves HTTP, both ranks step the same batch (tp2 and pp2 engines)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from compiler_core.runtime.generation import GenerationConfig, generate
from compiler_core.runtime.open import load_tokenizer, open_runner, special_ids
from compiler_core.testing import serving

pytestmark = pytest.mark.mpi

PROMPTS = [
    "The river ran slowly past the old mill, and the miller's daughter counted the boats",
    "Cooking rice well takes patience",
    "Light",
    "The old mill",
    "Boats drifted toward the harbour",
    "Patience",
]


@pytest.mark.parametrize("split", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_every_rank_steps_the_batch_and_answers_equal_one_rank_alone(engine, split, tmp_path):
    tp, pp = split
    single = engine("7b")
    runner, config = open_runner(single, "cpu")
    end_id, _ = special_ids(config)
    tok = load_tokenizer(single)
    budgets = [6 + 3 * i for i in range(len(PROMPTS))]
    expected = [
        generate(runner, [tok(text)["input_ids"]], GenerationConfig(max_new_tokens=n, temperature=0, end_id=end_id))[0][
            0
        ]
        for text, n in zip(PROMPTS, budgets, strict=True)
    ]
    with serving(engine("7b", tp, pp), "--prefill_chunk", "8", ranks=2, log_dir=tmp_path) as server:

        def ask(i: int) -> list[int] | str:
            body = {"prompt": PROMPTS[i], "max_tokens": budgets[i], "temperature": 0}
            if i % 2:  # streamed and whole answers share the batch
                body["stream"] = True
                with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
                    lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
                assert lines[-1] == "[DONE]"
                chunks = [json.loads(line) for line in lines[:-1]]
                return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            return httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(ask, range(len(PROMPTS))))
        for i, answer in enumerate(answers):
            want = tok.decode(expected[i], skip_special_tokens=True) if i % 2 else expected[i]
            assert answer == want, PROMPTS[i]
        assert server.stop() == 0, server.stderr.read_text()
