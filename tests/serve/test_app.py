"""The app's hand-off from the engine thread and its event encoding, without HTTP in between.

The server tests see the events through a client; here the pieces between the scheduler and the
socket are driven directly: the per-step hand-off (every token exactly once, in order, one
wake-up of the loop per engine iteration) and the coalesced events of one send (still one
well-formed OpenAI chunk per ``data:`` line, in order, the same JSON as each built alone).
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from compiler_core.runtime.generation import GenerationConfig, generate
from compiler_core.runtime.open import open_runner, special_ids
from compiler_core.serve.app import _Events, _Generation, _Outbox, _sse
from compiler_core.serve.protocol import ServedModel, parse_chat, parse_completion
from compiler_core.serve.scheduler import Finished, Scheduler, Token
from compiler_core.serve.slots import SlotRunner


class _NoScheduler:
    """Stands in for the scheduler where nothing runs: records what would be cancelled."""

    def __init__(self) -> None:
        self.cancelled: list = []

    def cancel(self, sequences) -> None:
        self.cancelled.extend(sequences)


@pytest.fixture(scope="module")
def model(tokenizer) -> ServedModel:
    return ServedModel("m", tokenizer, len(tokenizer), max_input_len=40, max_seq_len=64, max_batch_size=4, end_ids=(0,))


def _events(body: str) -> list[dict | str]:
    """The documents of a server-sent event stream, checking its framing: ``data: X`` then a blank line."""
    assert body.endswith("\n\n")
    out: list[dict | str] = []
    for event in body[:-2].split("\n\n"):
        assert event.startswith("data: ") and "\n" not in event, event
        payload = event[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_coalesced_events_are_separate_chunks_in_order(model, tokenizer, chat):
    body = {"max_tokens": 20, "n": 2, "stop": ["mill"], "stream": True}
    if chat:
        request = parse_chat({**body, "messages": [{"role": "user", "content": "x"}]}, model)
    else:
        request = parse_completion({**body, "prompt": "x"}, model)
    scheduler = _NoScheduler()
    run = _Generation(request, model, scheduler, _Outbox(asyncio.new_event_loop()), chat=chat)
    ids = tokenizer("the river ran past the old mill and on")["input_ids"]
    # Both choices' tokens interleaved, as decode steps deliver them, then the second one's end.
    for token in ids:
        run.pending += [(0, Token(token)), (1, Token(token))]
    run.pending.append((1, Finished("length")))
    events = _Events(run)
    deltas = run.advance()
    documents = _events(events.encode(deltas))

    assert len(documents) == len(deltas)  # one chunk per delta, however many went in one send
    started: set[int] = set()
    for document, (index, text, logprobs, finish) in zip(documents, deltas, strict=True):
        # The same JSON as the chunk built on its own (the templates only save the work).
        assert document == json.loads(json.dumps(run.chunk(index, text, logprobs, finish, first=index not in started)))
        started.add(index)
    texts: dict[int, str] = {0: "", 1: ""}
    for document in documents:
        (choice,) = document["choices"]
        texts[choice["index"]] += (choice["delta"].get("content") or "") if chat else choice["text"]
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert texts[0] == texts[1] == expected[: expected.index("mill")]
    finishes = [d["choices"][0]["finish_reason"] for d in documents]
    assert finishes.count("stop") == 2 and finishes[-1] == "stop" and set(finishes) == {None, "stop"}
    assert run.finished and len(scheduler.cancelled) == 2  # a stop string frees the slot at once
    assert events.encode(run.advance()) == ""  # what comes after the end is dropped


def test_the_per_step_hand_off_delivers_every_token_exactly_once(engine, tokenizer):
    """Sequences on a real engine thread: every token arrives once and in order (equal to the
    runtime's generate on the prompt alone), each sequence ends once, and the loop is woken at
    most once per engine iteration, never once per token."""
    engine_dir = engine("7b")
    runner, config = open_runner(engine_dir, "cpu")
    end_id, pad_id = special_ids(config)
    scheduler = Scheduler(SlotRunner(runner, 4, 128, pad_id), max_seq_len=64, prefill_chunk=8, max_queue=16)
    model = ServedModel("m", tokenizer, config["checkpoint"]["vocab_size"], 40, 64, 4, (end_id,))
    iterations = 0

    def count() -> None:
        nonlocal iterations
        iterations += 1

    class CountingOutbox(_Outbox):
        handoffs = 0

        def flush(self) -> None:
            if self._pending:
                CountingOutbox.handoffs += 1
            super().flush()

    rng = random.Random(3)
    prompts = [[rng.randrange(model.vocab_size) for _ in range(rng.randint(1, 30))] for _ in range(8)]

    async def serve_all() -> list[_Generation]:
        loop = asyncio.get_running_loop()
        outbox = CountingOutbox(loop)
        scheduler.add_step_hook(count)
        scheduler.add_step_hook(outbox.flush)
        runs = []
        for prompt in prompts:
            request = parse_completion({"prompt": prompt, "max_tokens": 64 - len(prompt), "temperature": 0}, model)
            runs.append(_Generation(request, model, scheduler, outbox, chat=False))
        received: dict[int, list] = {i: [] for i in range(len(runs))}

        async def drain(i: int, run: _Generation) -> None:
            while not run.finished:
                await run.wait()
                received[i].extend(run.pending)  # what advance() is about to take
                run.advance()

        scheduler.start()
        for run in runs:
            scheduler.submit(run.sequences)
        await asyncio.wait_for(asyncio.gather(*(drain(i, r) for i, r in enumerate(runs))), 120)
        for i, run in enumerate(runs):
            tokens = [e.id for _, e in received[i] if isinstance(e, Token)]
            ends = [e for _, e in received[i] if isinstance(e, Finished)]
            assert tokens == run.choices[0].token_ids and len(ends) == 1, i
        return runs

    try:
        runs = asyncio.run(serve_all())
    finally:
        scheduler.drain(0.0)
        scheduler.join()
    total = 0
    for prompt, run in zip(prompts, runs, strict=True):
        gen = GenerationConfig(max_new_tokens=64 - len(prompt), temperature=0, end_id=end_id, pad_id=pad_id)
        assert run.choices[0].token_ids == generate(runner, [prompt], gen)[0][0]
        total += len(run.choices[0].token_ids)
    assert 0 < CountingOutbox.handoffs <= iterations < total


def test_sse_lines_carry_one_document_each():
    assert _sse({"a": "x\ny"}) == 'data: {"a": "x\\ny"}\n\n'  # a newline in the text stays escaped
    assert _sse("[DONE]") == "data: [DONE]\n\n"
