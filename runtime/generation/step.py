"""One sequence's decoding rules, shared by ``CPMGenerator`` and the serving engine: which ids it
may choose, how it samples (its own settings and random stream), and when it ends. Both call
``choose_next`` and ``SequenceDecoding.accept`` and nothing else, so a seeded request samples on the
server exactly what the generator samples, by construction."""

from __future__ import annotations

import numpy as np

from ..text.text_stream import TextStream
from .sampling import SamplingConfig, next_tokens

GREEDY = SamplingConfig()


def choice_seed(seed: int | None, choice: int):
    """Choice 0 of a prompt draws from ``seed`` itself; choice j > 0 from its own stream, so
    choices differ yet repeat with the seed, whatever else is in the batch."""
    return seed if choice == 0 or seed is None else [seed, choice]


class SequenceDecoding:
    """One growing sequence: its sampling state, its text so far (for stop strings and streaming)
    and its end: ``finish_reason`` "stop" (<eod> or a stop string) or "length"."""

    def __init__(self, prompt: list[int], cfg: SamplingConfig, max_new_tokens: int, tokenizer, vocab: int,
                 eod_id: int, choice: int = 0, track_text: bool = True):
        self.cfg, self.max_new_tokens, self.eod_id = cfg, max_new_tokens, eod_id
        self.rng = np.random.default_rng(choice_seed(cfg.seed, choice))
        self.seen = None  # [V] tokens in context, for the repetition penalty
        if cfg.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab, bool)
            self.seen[prompt] = True
        self.counts = np.zeros(vocab, np.int32) if cfg.counts_tokens else None  # [V] generated, for OpenAI's penalties
        # the text is needed for stop strings and for streaming; a plain batch call skips its decoding
        self.text = TextStream(tokenizer, cfg.stop) if track_text or cfg.stop else None
        self.generated: list[int] = []
        self.finish_reason: str | None = None

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the raw logits: rows like this are chosen together in one call."""
        c = self.cfg
        return not c.do_sample and self.seen is None and self.counts is None and not c.logit_bias

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int) -> str:
        """Append the chosen token; returns the text that became visible (whole characters, never
        past a stop string). Sets ``finish_reason`` when the sequence ends here."""
        self.generated.append(token)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        if token == self.eod_id:
            self.finish_reason = "stop"
            return ""
        piece = self.text.push(token) if self.text is not None else ""
        if self.text is not None and self.text.stopped:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"
        return piece

    def rest(self) -> str:
        """Text held back until the end (a tail that might have begun a stop string)."""
        return self.text.finish() if self.text is not None else ""


def choose_next(logits: np.ndarray, seqs: list[SequenceDecoding], decodable: int) -> np.ndarray:
    """The next token of each row of ``logits`` [B, V] (int64 [B]): row i by ``seqs[i]``'s settings and
    random stream. Ids from ``decodable`` up (a model vocabulary padded past the tokenizer's) are
    never chosen."""
    if decodable < logits.shape[-1]:
        logits[:, decodable:] = -np.inf
    plain = [s.plain_greedy for s in seqs]
    if all(plain):  # the usual greedy batch: one argmax over the logits as they are, no copy
        return next_tokens(logits, GREEDY, None)
    out = np.empty(len(seqs), np.int64)
    if any(plain):
        out[plain] = next_tokens(logits[plain], GREEDY, None)
    for i, s in enumerate(seqs):
        if not plain[i]:
            out[i] = next_tokens(logits[i:i + 1], s.cfg, s.rng, None if s.seen is None else s.seen[None],
                                 None if s.counts is None else s.counts[None])[0]
    return out
