"""Generated token ids to streamed text, cut at the first stop string."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

#: What a tokenizer decodes an incomplete UTF-8 sequence to: held back until the next token completes it.
_REPLACEMENT = "\ufffd"
#: Tokens of context decoded before the new ones (see :class:`TextStream`): enough for a
#: tokenizer's merges and leading-space rules to come out as in the whole text, few enough that
#: a token costs a decode of a handful of ids however long the sequence is.
WINDOW = 6


class TextStream:
    """The text of one sequence, released as far as it is final.

    Each :meth:`push` decodes only a short window, the new token after up to ``2 * WINDOW``
    tokens of context (``ids[prefix:]``), and releases what that adds to the context's own text;
    decoding the context with the new tokens makes multi-token characters and tokenizers that
    merge across tokens (SentencePiece's leading spaces) come out as ``tokenizer.decode`` gives
    them for the whole sequence, while a token costs the same however long the sequence has
    grown (decoding everything again made a sequence quadratic). It holds back a trailing
    incomplete character and any tail that could still become a stop string; once a stop string
    appears the text ends just before it.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self._decode = decoder(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.stopped = False
        self._parts: list[str] = []  # the released text, joined on demand
        self.released = 0  # its length (logprobs' text offsets)
        self._held = ""  # decoded but not released: it may begin a stop string
        # ids[_prefix:_read] decode to _prefix_text; ids[_read:] wait for a complete character.
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""

    @property
    def text(self) -> str:
        """Everything released so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def push(self, token: int) -> str:
        """Add ``token``; return the text released by it (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        window = self._decode(self.ids[self._prefix :])
        if window.endswith(_REPLACEMENT) or len(window) < len(self._prefix_text):
            return ""  # an incomplete character: the next token may complete it
        new = window[len(self._prefix_text) :]
        self._read = len(self.ids)
        self._prefix_text = window
        if self._read - self._prefix >= 2 * WINDOW:  # keep the window short: a decode per token stays cheap
            self._prefix = self._read - WINDOW
            self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        return self._offer(new) if new else ""

    def flush(self) -> str:
        """The sequence ended: release whatever was held back."""
        if self.stopped:
            return ""
        rest = self._decode(self.ids[self._prefix :])[len(self._prefix_text) :] if self._read < len(self.ids) else ""
        self._read = len(self.ids)
        held, self._held = self._held + rest, ""
        return self._release(held)

    def _offer(self, new: str) -> str:
        """Release what of the unreleased text ``held + new`` can no longer become a stop string."""
        tail = self._held + new
        if self.stop:
            hits = [i for i in (tail.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self._held = ""
                return self._release(tail[: min(hits)])
            keep = self._stop_prefix_len(tail)
            if keep:
                self._held = tail[-keep:]
                return self._release(tail[:-keep])
        self._held = ""
        return self._release(tail)

    def _release(self, delta: str) -> str:
        if delta:
            self._parts.append(delta)
            self.released += len(delta)
        return delta

    def _stop_prefix_len(self, tail: str) -> int:
        """Length of the longest end of ``tail`` (the unreleased text) that begins a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:n]):
                    longest = n
                    break
        return longest


def decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, through the Rust tokenizer directly when
    that is all transformers' decode does (a fast tokenizer that does not clean up spaces, whose
    class keeps transformers' own decode): the Python wrapper costs several times the decode of a
    few ids, once per token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        owners = {name: next((c for c in type(tokenizer).__mro__ if name in vars(c)), None) for name in _DECODES}
        if all(c is not None and c.__module__.startswith("transformers.") for c in owners.values()):
            if owners["_decode"].__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast"):
                return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True)


#: transformers' methods between ``decode`` and the Rust tokenizer.
_DECODES = ("decode", "_decode")
