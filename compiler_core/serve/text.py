"""Generated token ids to streamed text, cut at the first stop string."""

from __future__ import annotations

from typing import Any

#: What a tokenizer decodes an incomplete UTF-8 sequence to: held back until the next token completes it.
_REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one sequence, released as far as it is final.

    Each :meth:`push` decodes the whole sequence again (so multi-token characters and
    tokenizers that merge across tokens come out as ``tokenizer.decode`` gives them) and
    releases the new text, holding back a trailing incomplete character and any tail that could
    still become a stop string. Once a stop string appears the text ends just before it.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add ``token``; return the text released by it (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (full.find(s, len(self.text)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(full[: min(hits)])
        end = len(full) - 1 if full.endswith(_REPLACEMENT) else len(full)
        end -= self._stop_prefix_len(full[:end])
        return self._release(full[:end])

    def flush(self) -> str:
        """The sequence ended: release whatever was held back."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text) :]
        self.text += delta
        return delta

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` (not yet released) that begins a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text) - len(self.text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
