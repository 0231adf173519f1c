"""The pipe between the engine process and the HTTP frontend, both ends over a real pipe.

The server tests drive the link through HTTP; here each end meets the cases that HTTP reaches
only by races: a submit that arrives after the engine stopped accepting, a frontend that
submits past its queue bound, and an engine process that goes away mid-generation.
"""

from __future__ import annotations

import multiprocessing

import pytest

from compiler_core.runtime.open import open_runner, special_ids
from compiler_core.serve.link import EngineClient, EngineEndpoint
from compiler_core.serve.scheduler import Finished, QueueFull, SamplingParams, Scheduler, Sequence, Token
from compiler_core.serve.slots import SlotRunner


@pytest.fixture
def scheduler(engine) -> Scheduler:
    runner, config = open_runner(engine("7b"), "cpu")
    _, pad_id = special_ids(config)
    return Scheduler(SlotRunner(runner, 2, 128, pad_id), max_seq_len=64, prefill_chunk=16, max_queue=8)


def collect(events: list):
    return lambda event: events.append(event)


def test_a_submit_the_draining_engine_refuses_ends_with_abort(scheduler):
    ours, theirs = multiprocessing.Pipe()
    endpoint = EngineEndpoint(scheduler, ours)
    endpoint.start()
    scheduler.drain(0.0)  # not accepting any more, as after a SIGTERM
    theirs.send(("submit", [(7, [5, 6, 7], SamplingParams(max_tokens=3, temperature=0))]))
    assert theirs.poll(30)
    kind, events, stats = theirs.recv()
    assert kind == "events" and events == [(7, Finished("abort"))] and stats["waiting"] == 0


def test_the_client_bounds_the_queue_and_hands_each_event_to_its_sequence(scheduler):
    ours, theirs = multiprocessing.Pipe()
    endpoint = EngineEndpoint(scheduler, ours)
    client = EngineClient(theirs, slots=2, max_queue=1)
    received: dict[int, list] = {i: [] for i in range(3)}
    steps = []
    client.add_step_hook(lambda: steps.append(len(steps)))
    params = SamplingParams(max_tokens=4, temperature=0)
    sequences = [Sequence([10 + i, 11, 12], params, collect(received[i])) for i in range(3)]
    client.submit(sequences[:2])
    client.submit(sequences[2:])  # two slots + one waiting: the bound is reached, not passed
    with pytest.raises(QueueFull, match="--max_queue 1"):
        client.submit([Sequence([1, 2], params, collect([]))])
    endpoint.start()
    scheduler.start()
    try:
        while any(not events or type(events[-1]) is not Finished for events in received.values()):
            assert theirs.poll(60), "the engine stopped sending"
            client.receive()
    finally:
        scheduler.drain(0.0)
        scheduler.join()
    for events in received.values():
        assert [type(e) for e in events] == [Token] * 4 + [Finished] and events[-1].reason == "length"
    assert steps, "the step hooks run once per message"
    client.submit([Sequence([1, 2], params, collect([]))])  # finished sequences free the bound


def test_an_engine_that_goes_away_ends_open_sequences_with_an_error():
    ours, theirs = multiprocessing.Pipe()
    client = EngineClient(theirs, slots=2, max_queue=4)
    drained: list[bool] = []
    client.on_drain = drained.append
    events: list = []
    client.submit([Sequence([1, 2, 3], SamplingParams(max_tokens=5, temperature=0), collect(events))])
    ours.close()  # the engine process died
    client.receive()
    assert events == [Finished("error")]
    assert client.failure is not None and not client.accepting and drained == [True]
