"""Prompts scored, not continued (an echoed prompt's log-probabilities, what evaluation clients ask
for): run on the bundle's one-pass scoring twin, the graph cpm-eval scores on, in the engine's
thread between passes, the rows of many requests in one call. The scorer is opened at the first
such request: a server that never scores never loads it."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .sequence import ScoreRequest

log = logging.getLogger("cpm_deploy.engine")

ROWS_PER_PASS = 64  # rows scored between two engine passes (the scorer groups them into calls)


@dataclass(frozen=True)
class ScoredPrompt:
    """One prompt's tokens, and for each after the first its log-probability [n-1]; the top
    alternatives at each position, the one after the prompt last ([n, top])."""

    row: list[int]
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


class PromptScoring:
    def __init__(self, open_scorer: Callable[[], object] | None):
        self.open_scorer, self.scorer = open_scorer, None
        self.waiting: deque[ScoreRequest] = deque()

    @property
    def available(self) -> bool:
        return self.open_scorer is not None

    def take(self) -> list[ScoreRequest]:
        """The requests the next call scores (the caller holds the engine's lock)."""
        batch, rows = [], 0
        while self.waiting and (not batch or rows + len(self.waiting[0].rows) <= ROWS_PER_PASS):
            batch.append(self.waiting.popleft())
            rows += len(batch[-1].rows)
        return batch

    def run(self, batch: list[ScoreRequest]) -> None:
        """Score ``batch`` and answer each request through its sink (the positions, or the error)."""
        try:
            if self.scorer is None:
                self.scorer = self.open_scorer()
                log.info("scoring graph loaded: %s, %s", self.scorer.graph_name, self.scorer.method)
            got = self.scorer.positions([row for r in batch for row in r.rows], max(r.top for r in batch))
        except Exception as e:  # noqa: BLE001 - a failed call fails its requests, never the engine
            for r in batch:
                r.sink(e)
            return
        at = 0
        for r in batch:
            mine, at = got[at:at + len(r.rows)], at + len(r.rows)
            r.sink([ScoredPrompt(row, p.logprobs, p.top_ids[:, :r.top], p.top_logprobs[:, :r.top])
                    for row, p in zip(r.rows, mine)])
