"""Request checking and streamed text, on the real tiny tokenizer (no server needed)."""

from __future__ import annotations

import pytest

from compiler_core.serve.protocol import RequestError, ServedModel, parse_chat, parse_completion
from compiler_core.serve.text import TextStream


@pytest.fixture(scope="module")
def model(tokenizer) -> ServedModel:
    return ServedModel("m", tokenizer, len(tokenizer), max_input_len=40, max_seq_len=64, max_batch_size=4, end_ids=(0,))


def test_defaults_follow_openai_and_the_engine(model):
    completion = parse_completion({"prompt": "Cooking rice"}, model)
    assert completion.params.max_tokens == 16 and completion.params.temperature == 1.0
    assert completion.params.stop_ids == {0}  # the end token stops, unless ignore_eos
    assert parse_completion({"prompt": [1, 2], "ignore_eos": True}, model).params.stop_ids == frozenset()
    chat = parse_chat({"messages": [{"role": "user", "content": "Hi"}]}, model)
    assert chat.params.max_tokens == 64 - len(chat.prompts[0])  # chat: the rest of max_seq_len
    batch = parse_completion({"prompt": ["a", "b"], "n": 2, "max_tokens": 3}, model)
    assert batch.n * len(batch.prompts) == 4 and len(batch.prompts) == 2


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a", "n": 5}, "n"),  # more sequences than slots
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop"),
        ({"prompt": "a", "logprobs": 6}, "logprobs"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": [], "max_tokens": 1}, "prompt"),
        ({"prompt": "a", "stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_refusals_name_the_field(model, body, param):
    with pytest.raises(RequestError) as caught:
        parse_completion(body, model)
    assert caught.value.param == param and caught.value.status == 400


def test_a_tokenizers_chat_template_is_used_when_it_has_one(model, tokenizer):
    # A copy, so that the session's tokenizer keeps no template.
    copy = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token)
    copy.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    with_template = ServedModel("m", copy, len(copy), 40, 64, 4, (0,))
    request = parse_chat({"messages": [{"role": "user", "content": "Hi"}]}, with_template)
    assert request.prompts[0] == copy("<user>Hi<assistant>", add_special_tokens=False)["input_ids"]


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_before_it(tokenizer):
    ids = tokenizer("the river ran past the mill")["input_ids"]
    stream = TextStream(tokenizer, ("ver ran p",))  # spans several tokens
    released = [stream.push(t) for t in ids]
    # Nothing of the stop string was released early, though its first tokens came before it was complete.
    assert stream.stopped and stream.text == "the ri"
    assert "".join(released) == stream.text and stream.flush() == ""
    plain = TextStream(tokenizer)
    assert "".join(plain.push(t) for t in ids) + plain.flush() == tokenizer.decode(ids)


def test_text_stream_decodes_incrementally_as_the_whole_text_decodes(tokenizer):
    """Only a short window is decoded per token; the text still equals decoding everything at once,
    multi-byte characters split over tokens and ids that decode to nothing included."""
    import random

    from compiler_core.serve.text import WINDOW, decoder

    rng = random.Random(0)
    words = tokenizer("the river ran past the old mill: ünïcödé ✓ 日本語, and on")["input_ids"]
    for trial in range(200):
        if trial % 2:
            ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 10 * WINDOW))]
        else:
            ids = [rng.choice(words) for _ in range(rng.randint(1, 10 * WINDOW))]
        stream = TextStream(tokenizer)
        released = "".join(stream.push(t) for t in ids) + stream.flush()
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert released == stream.text == whole, ids
        assert decoder(tokenizer)(ids) == whole
