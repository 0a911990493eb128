"""Text of one growing sequence as it streams: whole characters only, cut at the first stop string,
with a tail that may turn out to begin a stop string held back until it is decided."""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import CPMTokenizer, StreamDecoder


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def longest_stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of text that begins some stop string."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class TextStream:
    def __init__(self, tokenizer: CPMTokenizer, stop: Sequence[str] = ()):
        self.decoder, self.stop = StreamDecoder(tokenizer), tuple(stop)
        self.sent = 0  # characters handed out so far
        self.stopped = False  # a stop string appeared

    def push(self, token_id: int) -> str:
        """Add a generated token; returns the text that became visible."""
        self.decoder.push(token_id)
        visible, self.stopped = cut_at_stop(self.decoder.emitted, self.stop)
        if not self.stopped:
            visible = visible[:len(visible) - longest_stop_prefix(visible, self.stop)]
        return self._take(visible)

    def finish(self) -> str:
        """The rest, once the sequence has ended (a held-back tail that never became a stop)."""
        return self._take(self.text)

    @property
    def text(self) -> str:
        return cut_at_stop(self.decoder.emitted, self.stop)[0]

    def _take(self, visible: str) -> str:
        delta = visible[self.sent:] if len(visible) > self.sent else ""
        self.sent = max(self.sent, len(visible))
        return delta
