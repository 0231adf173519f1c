"""In-flight batching against the runtime: every sequence's greedy tokens equal ``generate`` on its
prompt alone, whatever joined or left the batch around it."""

from __future__ import annotations

import random

import pytest

from compiler_core.runtime.generation import GenerationConfig, generate
from compiler_core.runtime.open import open_runner, special_ids
from compiler_core.serve.scheduler import Finished, SamplingParams, Scheduler, Sequence, Token, chunk_sizes
from compiler_core.serve.slots import SlotRunner


class CountingSlots(SlotRunner):
    """A SlotRunner that counts its shifts and prefill chunks, so the test knows it exercised them."""

    shifts = 0
    chunks = 0
    rows_at_once = 0

    def shift(self, offset):
        self.shifts += 1
        super().shift(offset)

    def prefill(self, rows, ids, region_start, start):
        self.chunks += 1
        self.rows_at_once = max(self.rows_at_once, len(rows))
        return super().prefill(rows, ids, region_start, start)


def recorder(outputs: list[list[int]], finished: list[str | None]):
    """``sink(i)``: a sequence sink that appends token ids to ``outputs[i]`` and puts the finish
    reason in ``finished[i]``."""

    def sink(i: int):
        def receive(event):
            if isinstance(event, Token):
                outputs[i].append(event.id)
            else:
                assert isinstance(event, Finished)
                finished[i] = event.reason

        return receive

    return sink


def alone(engine_dir, prompt: list[int], max_tokens: int, end_id: int) -> list[int]:
    runner, _ = open_runner(engine_dir, "cpu")
    config = GenerationConfig(max_new_tokens=max_tokens, temperature=0, end_id=end_id, pad_id=end_id)
    return generate(runner, [prompt], config)[0][0]


@pytest.mark.parametrize(
    ("variant", "decode_mode"),
    [("7b", "dynamic"), ("rw", "dynamic"), ("40b", "dynamic"), ("7b", "static"), ("rw", "static"), ("40b", "static")],
)
def test_greedy_tokens_equal_each_prompt_alone(engine, variant, decode_mode):
    """``static`` decode steps and prompt chunks are the fixed-shape forwards that CUDA captures as
    graphs (run eagerly here; a chunk is padded to a power of two, its padding written past it)."""
    engine_dir = engine(variant)
    runner, config = open_runner(engine_dir, "cpu")
    for session in runner.sessions:
        session.decode_mode = decode_mode
    end_id, pad_id = special_ids(config)
    vocab = config["checkpoint"]["vocab_size"]
    rng = random.Random(0)
    # Mixed prompt lengths (up to max_input_len 40) and budgets (up to max_seq_len 64 in all).
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))] for _ in range(10)]
    budgets = [rng.randint(1, 64 - len(p)) for p in prompts]
    arrivals = sorted(rng.randrange(30) for _ in prompts)

    slots = CountingSlots(runner, rows=3, width=128, pad_id=pad_id)
    scheduler = Scheduler(slots, max_seq_len=64, prefill_chunk=8, max_queue=16)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished: list[str | None] = [None] * len(prompts)

    sink = recorder(outputs, finished)

    step = 0
    while None in finished:
        for i, at in enumerate(arrivals):
            if at == step:
                params = SamplingParams(max_tokens=budgets[i], temperature=0, stop_ids=frozenset({end_id}))
                scheduler.submit([Sequence(prompts[i], params, sink(i))])
        scheduler.step()
        step += 1
        assert step < 2000

    assert slots.shifts > 0 and slots.chunks > len(prompts), "the schedule should shift the frame and chunk prompts"
    for i, prompt in enumerate(prompts):
        assert outputs[i] == alone(engine_dir, prompt, budgets[i], end_id), f"prompt {i} (length {len(prompt)})"
        assert finished[i] == ("stop" if outputs[i][-1] == end_id else "length")
    assert (runner.sessions[0]._step is not None) == (decode_mode == "static")
    assert bool(runner.sessions[0]._chunks) == (decode_mode == "static")


def test_chunks_cover_the_prompt_and_last_chunk_outlasts_the_steps():
    for length in [1, 2, 7, 8, 9, 63, 64, 65, 1000, 5000]:
        for chunk in [1, 4, 8, 64]:
            sizes = chunk_sizes(length, chunk)
            assert sum(sizes) == length and min(sizes) >= 1
            assert sizes[-1] >= len(sizes) - 1
            assert max(sizes) <= max(chunk, int(length**0.5) + 1)


def test_prompts_of_one_length_prefill_together_and_survive_a_cancelled_member(engine):
    engine_dir = engine("7b")
    runner, config = open_runner(engine_dir, "cpu")
    end_id, pad_id = special_ids(config)
    rng = random.Random(2)
    prompts = [[rng.randrange(config["checkpoint"]["vocab_size"]) for _ in range(20)] for _ in range(5)]
    slots = CountingSlots(runner, rows=4, width=128, pad_id=pad_id)
    scheduler = Scheduler(slots, max_seq_len=64, prefill_chunk=8, max_queue=16)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished: list[str | None] = [None] * len(prompts)

    sink = recorder(outputs, finished)

    params = SamplingParams(max_tokens=12, temperature=0, stop_ids=frozenset({end_id}))
    sequences = [Sequence(p, params, sink(i)) for i, p in enumerate(prompts)]
    scheduler.submit(sequences)
    scheduler.step()  # four rows take the first chunk of four prompts in one forward
    assert slots.rows_at_once == 4
    scheduler.cancel([sequences[1]])  # mid-prefill: rows 0 and 2..3 go on as two runs
    while None in finished:
        scheduler.step()
    assert finished[1] == "cancelled" and outputs[1] == []
    for i in (0, 2, 3, 4):
        assert outputs[i] == alone(engine_dir, prompts[i], 12, end_id), f"prompt {i}"


class FailingSlots(SlotRunner):
    """A SlotRunner whose first prefill raises, as a failing engine would."""

    def prefill(self, rows, ids, region_start, start):
        raise RuntimeError("the device fell over")


def test_a_failing_engine_ends_every_request_with_an_error_instead_of_hanging(engine):
    """The engine thread's failure reaches every queued sequence (finish reason ``error``), the
    scheduler stops accepting and keeps the exception for the server to exit 1 with."""
    import threading

    runner, _ = open_runner(engine("7b"), "cpu")
    scheduler = Scheduler(FailingSlots(runner, 2, 64, 0), 32, 16, 8)
    ended: dict[int, Finished] = {}
    done = threading.Event()

    def sink(i):
        def receive(event):
            if isinstance(event, Finished):
                ended[i] = event
                if len(ended) == 3:
                    done.set()

        return receive

    params = SamplingParams(max_tokens=4, temperature=0)
    scheduler.submit([Sequence([5, 6, 7], params, sink(i)) for i in range(3)])
    scheduler.start()
    assert done.wait(30), "the sequences were never ended"
    scheduler.join()
    assert {e.reason for e in ended.values()} == {"error"}
    assert isinstance(scheduler.failure, RuntimeError)
    assert not scheduler.accepting


class PipelineCountingSlots(SlotRunner):
    """Counts the decode steps fed the previous step's tokens on the device (pipelined) and on the host."""

    fed_from_device = 0
    fed_from_host = 0
    row_steps = 0

    def decode(self, tokens, region_starts, cursor):
        self.row_steps += sum(start is not None for start in region_starts)
        if isinstance(tokens, list):
            self.fed_from_host += 1
        else:
            self.fed_from_device += 1
        return super().decode(tokens, region_starts, cursor)


def test_pipelined_steps_stop_on_time_and_hand_over_to_host_steps(engine):
    """Greedy steps run pipelined (each queued before the host reads the last one's tokens): a
    sequence whose stop token is only seen a step later, and ones whose budget runs out, end with
    exactly ``generate``'s tokens; a sampled newcomer turns the steps back to host-fed ones and the
    greedy sequences around it are unaffected; a sequence cancelled while its token is in flight
    ends cancelled without it."""
    engine_dir = engine("7b")
    runner, config = open_runner(engine_dir, "cpu")
    end_id, pad_id = special_ids(config)
    vocab = config["checkpoint"]["vocab_size"]
    rng = random.Random(5)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(3, 12))] for _ in range(4)]
    # A stop id that greedy decoding of prompt 0 produces at its 5th token: it must end there.
    stop = alone(engine_dir, prompts[0], 20, end_id)[4]
    slots = PipelineCountingSlots(runner, rows=4, width=128, pad_id=pad_id)
    scheduler = Scheduler(slots, max_seq_len=64, prefill_chunk=64, max_queue=16)
    outputs: list[list[int]] = [[] for _ in range(5)]
    finished: list[str | None] = [None] * 5

    sink = recorder(outputs, finished)

    greedy = [
        SamplingParams(max_tokens=20, temperature=0, stop_ids=frozenset({stop})),
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=2, temperature=0),
        SamplingParams(max_tokens=9, temperature=0),
    ]
    sequences = [Sequence(p, params, sink(i)) for i, (p, params) in enumerate(zip(prompts, greedy, strict=True))]
    scheduler.submit(sequences)
    for _ in range(3):
        scheduler.step()
    assert slots.fed_from_device > 0, "greedy steps should be pipelined"
    scheduler.cancel([sequences[3]])  # its token of the queued step is never handed on
    sampled = Sequence(prompts[1], SamplingParams(max_tokens=6, temperature=1.0, seed=3), sink(4))
    scheduler.submit([sampled])
    host_before = slots.fed_from_host
    steps = 0
    while None in finished:
        scheduler.step()
        steps += 1
        assert steps < 200
    assert slots.fed_from_host > host_before, "a sampled sequence needs its logits on the host"

    want = alone(engine_dir, prompts[0], 20, end_id)
    assert outputs[0] == want[: want.index(stop) + 1] and finished[0] == "stop"
    assert outputs[1] == alone(engine_dir, prompts[1], 1, end_id) and finished[1] == "length"
    assert outputs[2] == alone(engine_dir, prompts[2], 2, end_id) and finished[2] == "length"
    assert finished[3] == "cancelled" and len(outputs[3]) <= 3
    assert outputs[3] == alone(engine_dir, prompts[3], 9, end_id)[: len(outputs[3])]
    assert len(outputs[4]) == 6 and finished[4] == "length"
    assert not scheduler.stats()["busy"]
    # One decode step per row for each token after the first (the prefill's), plus at most the
    # step run for nothing after the stop token and the one in flight at the cancel.
    assert slots.row_steps <= sum(len(o) - 1 for o in outputs) + 2


def test_pipelined_steps_never_run_a_row_past_its_budget(engine):
    """A row is not queued again once its queued token will be its last: budgets of 2, 3 and 9
    tokens take exactly 1, 2 and 8 decode steps of their row, and give ``generate``'s tokens."""
    engine_dir = engine("7b")
    runner, config = open_runner(engine_dir, "cpu")
    end_id, pad_id = special_ids(config)
    prompts = [[11, 12, 13], [21, 22, 23, 24], [31, 32]]
    budgets = [2, 3, 9]
    slots = PipelineCountingSlots(runner, rows=3, width=128, pad_id=pad_id)
    scheduler = Scheduler(slots, max_seq_len=64, prefill_chunk=64, max_queue=16)
    outputs: list[list[int]] = [[] for _ in prompts]
    sinks = [lambda event, i=i: outputs[i].append(event.id) if isinstance(event, Token) else None for i in range(3)]
    scheduler.submit(
        [
            Sequence(p, SamplingParams(max_tokens=b, temperature=0), sinks[i])
            for i, (p, b) in enumerate(zip(prompts, budgets, strict=True))
        ]
    )
    while scheduler.stats()["busy"] or scheduler.stats()["waiting"]:
        scheduler.step()
    assert slots.fed_from_device > 0
    assert slots.row_steps == sum(b - 1 for b in budgets)
    for prompt, budget, out in zip(prompts, budgets, outputs, strict=True):
        assert out == alone(engine_dir, prompt, budget, end_id)


def test_a_newcomers_first_token_stays_on_the_device_until_its_first_step_is_queued(engine):
    """The decode step of the iteration that ends a prompt's pass takes that pass's first token
    from the device: when the step is queued, the host has handed on no token of the newcomer
    yet; right after the iteration it has the first one, and every sequence ends with
    ``generate``'s tokens."""
    engine_dir = engine("7b")
    runner, config = open_runner(engine_dir, "cpu")
    end_id, pad_id = special_ids(config)
    prompts = [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35]]
    outputs: list[list[int]] = [[] for _ in prompts]
    finished: list[str | None] = [None] * len(prompts)
    seen_at_decode: list[list[int]] = []

    class Watching(SlotRunner):
        def decode(self, tokens, region_starts, cursor):
            assert not isinstance(tokens, list), "greedy steps are fed from the device"
            seen_at_decode.append([len(o) for o in outputs])
            return super().decode(tokens, region_starts, cursor)

    scheduler = Scheduler(Watching(runner, 3, 128, pad_id), max_seq_len=64, prefill_chunk=64, max_queue=16)
    sink = recorder(outputs, finished)
    params = SamplingParams(max_tokens=6, temperature=0)
    scheduler.submit([Sequence(prompts[0], params, sink(0))])
    scheduler.step()  # its pass, and its first decode step fed the pass's token
    assert seen_at_decode == [[0, 0, 0]] and len(outputs[0]) == 1
    scheduler.step()
    scheduler.submit([Sequence(p, params, sink(i + 1)) for i, p in enumerate(prompts[1:])])
    scheduler.step()  # the newcomers' passes (one per prompt length), then the step of all three
    assert seen_at_decode[-1][1:] == [0, 0] and [len(o) for o in outputs[1:]] == [1, 1]
    while None in finished:
        scheduler.step()
    for prompt, out, why in zip(prompts, outputs, finished, strict=True):
        assert out == alone(engine_dir, prompt, 6, end_id) and why == "length"


def test_the_warm_up_prepares_every_chunk_length_and_changes_no_answer(engine):
    """``warm_up`` runs (on CUDA: captures) the static decode step, a one-row first prompt chunk of
    each padded length up to the chunk size and a later chunk of the chunk size; sequences served
    after it get ``generate``'s tokens, and the step counts of /health start at 0."""
    engine_dir = engine("7b")
    runner, config = open_runner(engine_dir, "cpu")
    session = runner.sessions[0]
    session.decode_mode = "static"
    end_id, pad_id = special_ids(config)
    slots = SlotRunner(runner, 3, 128, pad_id)
    slots.warm_up(prefill_chunk=40)
    assert session._step is not None
    # Keys: (whole batch?, rows, padded length, dtype, input shape, last only, new sequences).
    one_row = {(key[2], key[6]): step for key, step in session._chunks.items() if key[:2] == (False, 1)}
    assert sorted(one_row) == [(16, True), (32, True), (64, False), (64, True)]
    assert all(step.uses >= 2 for step in one_row.values())
    assert slots.decode_steps == 0
    prompts = [[7, 8, 9], list(range(40, 75))]
    outputs: list[list[int]] = [[] for _ in prompts]
    finished: list[str | None] = [None] * len(prompts)
    sink = recorder(outputs, finished)
    scheduler = Scheduler(slots, max_seq_len=64, prefill_chunk=40, max_queue=4)
    params = SamplingParams(max_tokens=8, temperature=0)
    scheduler.submit([Sequence(p, params, sink(i)) for i, p in enumerate(prompts)])
    while None in finished:
        scheduler.step()
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out == alone(engine_dir, prompt, 8, end_id)
