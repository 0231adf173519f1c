"""OpenAI-compatible request parsing and checking, and the response documents.

A request is checked completely before anything is queued: an unknown field, a value of the
wrong type or range, a prompt longer than the engine's ``max_input_len`` or a budget past its
``max_seq_len``, or a token id outside the vocabulary is a :class:`RequestError`, which the app
answers with HTTP 400 and OpenAI's error body naming the field (``param``).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from compiler_core.serve.scheduler import SamplingParams

#: Used when the tokenizer has no chat template: one "role: content" line per message, then the
#: assistant's turn (documented in the README's Serving section).
DEFAULT_CHAT_TEMPLATE = "{role}: {content}\n"
DEFAULT_GENERATION_PROMPT = "assistant:"
#: OpenAI's default max_tokens for /v1/completions; chat defaults to the rest of max_seq_len.
COMPLETION_MAX_TOKENS = 16
#: OpenAI accepts at most 4 stop strings and at most 5 logprobs alternatives (completions).
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5

_SAMPLING_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "n",
    "stream",
    "stream_options",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
}
COMPLETION_FIELDS = _SAMPLING_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error body."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error document: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ServedModel:
    """What requests are checked against: the engine's name, tokenizer, vocabulary and limits."""

    name: str
    tokenizer: Any
    vocab_size: int
    max_input_len: int
    max_seq_len: int
    max_batch_size: int
    #: The model's stop tokens (one or several; Llama 3 has three), unless a request says ignore_eos.
    end_ids: tuple[int, ...]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the tokenizer's chat template, else :data:`DEFAULT_CHAT_TEMPLATE`."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = "".join(DEFAULT_CHAT_TEMPLATE.format(**m) for m in messages) + DEFAULT_GENERATION_PROMPT
        return list(self.tokenizer(text)["input_ids"])


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: ``n`` sequences per prompt, each continued with ``params``."""

    prompts: list[list[int]]
    n: int
    params: SamplingParams
    stop_strings: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, else a RequestError."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_completion(body: dict[str, Any], model: ServedModel) -> GenerationRequest:
    """A /v1/completions body: ``prompt`` (text, token ids, or a list of either) and sampling fields."""
    _check_fields(body, COMPLETION_FIELDS)
    _unsupported(body, echo=False, suffix=None, best_of=None)
    prompts = _completion_prompts(body, model)
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    return _request(body, model, prompts, COMPLETION_MAX_TOKENS, logprobs)


def parse_chat(body: dict[str, Any], model: ServedModel) -> GenerationRequest:
    """A /v1/chat/completions body: ``messages`` through the chat template, and sampling fields."""
    _check_fields(body, CHAT_FIELDS)
    _unsupported(body, logprobs=False, top_logprobs=None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    plain = [_message(m, i) for i, m in enumerate(messages)]
    prompt = model.chat_prompt(plain)
    _check_prompt(prompt, model, "messages")
    if "max_completion_tokens" in body and "max_tokens" not in body:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    return _request(body, model, [prompt], None, None)


# --- fields ------------------------------------------------------------------------------------


def _check_fields(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}", unknown[0])


def _unsupported(body: dict[str, Any], **defaults: Any) -> None:
    """Fields of OpenAI's API that this server accepts only at their default (or no-op) values."""
    for name, default in {**defaults, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None}.items():
        value = body.get(name, default)
        if value != default and not (name == "logit_bias" and value == {}):
            raise RequestError(f"{name}={value!r} is not supported by this server (only {default!r})", name)


def _int(body: dict[str, Any], name: str, default: int | None, low: int, high: int | None) -> int | None:
    value = body.get(name, default)
    if value is None or value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"'{name}' must be {bounds}, got {value}", name)
    return value


def _float(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"'{name}' must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value}", name)
    return float(value)


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _token_ids(value: Any, model: ServedModel, param: str) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"'{param}' token ids must be integers", param)
    bad = [t for t in value if not 0 <= t < model.vocab_size]
    if bad:
        raise RequestError(
            f"token id {bad[0]} in '{param}' is outside the vocabulary (0..{model.vocab_size - 1})", param
        )
    return list(value)


def _completion_prompts(body: dict[str, Any], model: ServedModel) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        items = prompt
    else:
        raise RequestError("'prompt' must be a string, a list of token ids, or a non-empty list of either", "prompt")
    prompts = []
    for item in items:
        ids = list(model.tokenizer(item)["input_ids"]) if isinstance(item, str) else _token_ids(item, model, "prompt")
        _check_prompt(ids, model, "prompt")
        prompts.append(ids)
    return prompts


def _check_prompt(ids: list[int], model: ServedModel, param: str) -> None:
    if not ids:
        raise RequestError(f"'{param}' encodes to no tokens", param)
    if len(ids) > model.max_input_len:
        raise RequestError(
            f"'{param}' is {len(ids)} tokens, over the engine's max_input_len {model.max_input_len}", param
        )


def _message(message: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
        raise RequestError(f"'{param}' must be an object with 'role' and 'content'", param)
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "user", "assistant", "developer"):
        raise RequestError(f"'{param}.role' must be system, developer, user or assistant, got {role!r}", param)
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(f"'{param}.content' parts must all be {{'type': 'text', 'text': ...}}", param)
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"'{param}.content' must be a string", param)
    return {"role": role, "content": content}


def _stop(body: dict[str, Any], model: ServedModel) -> tuple[tuple[str, ...], frozenset[int]]:
    stop = body.get("stop")
    if stop is None:
        strings: list[str] = []
    elif isinstance(stop, str):
        strings = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        strings = stop
    else:
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    if len(strings) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(strings)}", "stop")
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list):
        raise RequestError("'stop_token_ids' must be a list of token ids", "stop_token_ids")
    stop_ids = set(_token_ids(ids, model, "stop_token_ids"))
    if not _bool(body, "ignore_eos"):
        stop_ids.update(model.end_ids)
    return tuple(strings), frozenset(stop_ids)


def _request(
    body: dict[str, Any],
    model: ServedModel,
    prompts: list[list[int]],
    default_max_tokens: int | None,
    logprobs: int | None,
) -> GenerationRequest:
    if "model" in body and body["model"] != model.name:
        raise RequestError(f"model {body['model']!r} is not served here (this server serves {model.name!r})", "model")
    longest = max(len(p) for p in prompts)
    room = model.max_seq_len - longest
    max_tokens = _int(body, "max_tokens", None, 1, None)
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    if longest + max_tokens > model.max_seq_len:
        raise RequestError(
            f"prompt {longest} + max_tokens {max_tokens} tokens exceed the engine's max_seq_len {model.max_seq_len}",
            "max_tokens",
        )
    if max_tokens < 1:
        raise RequestError(f"a prompt of {longest} tokens leaves no room in max_seq_len {model.max_seq_len}", "prompt")
    n = _int(body, "n", 1, 1, None)
    if len(prompts) * n > model.max_batch_size:
        raise RequestError(
            f"{len(prompts)} prompt(s) x n={n} sequences exceed the server's max_batch_size {model.max_batch_size}",
            "n",
        )
    temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _float(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _int(body, "top_k", 0, -1, None)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {seed!r}", "seed")
    stop_strings, stop_ids = _stop(body, model)
    stream = _bool(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise RequestError("'stream_options' must be an object like {'include_usage': true}", "stream_options")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),  # -1 is vLLM's "off"
        seed=seed,
        stop_ids=stop_ids,
        logprobs=logprobs,
    )
    return GenerationRequest(prompts, n, params, stop_strings, stream, bool(options.get("include_usage", True)))


# --- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
