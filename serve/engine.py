"""The serving engine: continuous (iteration-level) batching over a shared-KV graph.

One thread owns the decoder and runs one loop; each pass:
  1. drops cancelled and timed-out requests (their slots free at once);
  2. admits waiting requests while KV slots are free, up to a budget of prompt tokens, and
     prefills them together;
  3. runs one decode step for every running sequence, each sampled with its own settings and
     random stream, and retires those that finished (their slots are reused by the next pass).
     While a burst is still waiting to be admitted the step is skipped, for at most
     ``max_decode_delay_s`` since the oldest running sequence's last token.
Requests arrive from any thread through ``submit`` and report back through their ``sink``.
Nothing here knows of HTTP.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from ..runtime import CPMGenerator, GenerationError, SamplingConfig
from ..runtime.generation.sampling import next_tokens
from .metrics import EngineMetrics
from .sequence import EngineError, Event, QueueFull, Request, Sequence, State, make_sequences

log = logging.getLogger("cpm_deploy.serve")


class RequestError(ValueError):
    """A request that cannot be served as asked (a client error; nothing else is disturbed)."""


class Engine:
    def __init__(self, generator: CPMGenerator, max_batch: int = 16, max_queue: int = 64, max_total: int | None = None,
                 prefill_tokens: int = 128, max_decode_delay_s: float = 0.1, warm_up: bool = True):
        dec = generator.decoder
        if getattr(dec, "kind", None) != "shared":
            raise EngineError(f"continuous batching needs a shared-KV graph (cpu-fp32, cpu-int8, cpu-int4, cuda-*); "
                              f"{generator.graph_name or 'this graph'} concatenates its cache")
        if max_batch < 1 or max_queue < 0:
            raise EngineError("max_batch must be >= 1 and max_queue >= 0")
        self.generator, self.decoder, self.tokenizer = generator, dec, generator.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        # prompt tokens prefilled per pass (at least one request): a burst of arrivals is prefilled
        # in groups between decode steps, so the first of them start streaming early and running
        # sequences keep their pace; on the CPU, prompt cost per token barely drops with larger groups
        self.prefill_tokens = prefill_tokens
        # while a burst is still being admitted, decode steps wait (new requests reach their first
        # token sooner), but running sequences never wait longer than this for their next token
        self.max_decode_delay_s = max_decode_delay_s
        self.full_warm_up, self.warm_up_s = warm_up, 0.0
        self.capacity = min(max_total or generator.n_positions, generator.n_positions)
        self.pool = dec.kv_pool(max_batch, self.capacity)
        self._steps: dict = {}  # n rows -> StepBinding over pool slots 0 .. n-1, bound once
        # their logits rows, shared: one array per width would hold max_batch^2 / 2 rows (250 MB at 64)
        self._logits = dec.logits_buffer(max_batch)
        self.metrics = EngineMetrics()
        self.metrics.kv_slots.set(max_batch)
        self.waiting: deque[Request] = deque()
        self.rows: list[Sequence] = []  # rows[i] occupies KV slot i
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False

    @classmethod
    def from_bundle(cls, path: str | Path, graph: str | None = None, threads: int | None = None, provider: str = "cpu",
                    verify: bool = True, **options) -> "Engine":
        gen = CPMGenerator.from_bundle(path, provider=provider, threads=threads, verify=verify, variant=graph)
        return cls(gen, **options)

    # -- requests ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        try:
            return self.generator.prepare([text], None, 1, False).prompts[0]
        except GenerationError as e:
            raise RequestError(str(e)) from None

    def make_request(self, prompt: str | list[int], max_new_tokens: int, n: int = 1, timeout_s: float | None = None,
                     sink=None, stream: bool = True, **sampling) -> Request:
        """Validate and build a request (not yet submitted). Raises RequestError."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("the prompt encodes to no tokens")
        if not isinstance(prompt, str) and not all(isinstance(t, int) and 0 <= t < self.generator.decodable for t in ids):
            raise RequestError(f"prompt token ids must be in 0..{self.generator.decodable - 1}")
        if max_new_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {max_new_tokens}")
        if len(ids) + max_new_tokens > self.capacity:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_new_tokens}) exceeds the "
                               f"{self.capacity} positions this server holds per sequence")
        if not 1 <= n <= self.max_batch:
            raise RequestError(f"n must be between 1 and {self.max_batch} (the server's batch), got {n}")
        try:
            cfg = SamplingConfig(**sampling)
            self.generator.check_sampling(cfg)
        except (TypeError, ValueError) as e:  # GenerationError is a ValueError
            raise RequestError(str(e)) from None
        return Request(ids, max_new_tokens, cfg, n, timeout_s, sink or (lambda e: None), stream)

    def submit(self, request: Request) -> Request:
        with self._cv:
            if not self._accepting:
                raise EngineError("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.metrics.requests.labels("rejected").inc()
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self.waiting.append(request)
            self.metrics.queue_depth.set(len(self.waiting))
            self._cv.notify()
        return request

    def complete(self, prompt: str | list[int], max_new_tokens: int = 16, n: int = 1, **sampling) -> list[dict]:
        """Blocking call for embedding the engine: [{'text', 'finish_reason', 'tokens'}] per choice."""
        events: queue.Queue[Event] = queue.Queue()
        req = self.submit(self.make_request(prompt, max_new_tokens, n, sink=events.put, **sampling))
        texts, done = [""] * n, {}
        while len(done) < n:
            ev = events.get()
            if ev.kind == "error":
                raise EngineError(ev.text)
            if ev.kind == "token":
                texts[ev.index] += ev.text
            else:
                done[ev.index] = ev.reason
        return [{"text": texts[i], "finish_reason": done[i], "tokens": len(req.sequences[i].generated)}
                for i in range(n)]

    # -- lifecycle --------------------------------------------------------------------------------
    def warm_up(self, full: bool = True) -> float:
        """Pay first-run costs before requests do; returns the seconds it took. Always: jieba's
        dictionary and onnxruntime's first run. ``full``: every page of the KV pool, a prompt group
        of each power-of-two size up to the batch, and a decode step at every batch width (each
        width binds its KV views once). What it writes into the pool is overwritten by the next
        prefill of each slot, and never read before."""
        t0 = time.perf_counter()
        ids = self.encode("清华大学")
        self.decoder.run_prefill([ids], self.pool.views(0, 1), self.tokenizer.pad_id)
        if full:
            self.pool.touch()
            prompt = (ids * 8)[:max(1, min(32, self.capacity - 1))]
            group = 1
            while group <= self.max_batch:
                self.decoder.run_prefill([prompt] * group, self.pool.views(0, group), self.tokenizer.pad_id)
                group *= 2
            for width in range(1, self.max_batch + 1):
                self._step_binding(width).run(np.full(width, ids[0], np.int64), np.full(width, len(prompt), np.int64))
        self.warm_up_s = time.perf_counter() - t0
        return self.warm_up_s

    def start(self) -> "Engine":
        """Start the loop, warm (see ``warm_up``; ``Engine(..., warm_up=False)``: the first run only)."""
        if self._thread is None:
            self.warm_up(full=self.full_warm_up)
            self._thread = threading.Thread(target=self._loop, name="cpm-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, drain_s: float = 10.0) -> None:
        """Stop accepting; let running and waiting requests finish for up to ``drain_s``; cancel the rest."""
        with self._cv:
            self._accepting = False
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and (self.rows or self.waiting) and self._thread and self._thread.is_alive():
            time.sleep(0.02)
        with self._cv:
            for r in list(self.waiting) + [s.request for s in self.rows]:
                r.cancel()
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.waiting and not self.rows and not self._stop:
                    self._cv.wait()
                if self._stop and not self.rows:
                    for r in self.waiting:
                        self._finish_waiting(r, "cancelled")
                    self.waiting.clear()
                    return
            try:
                self._pass()
            except Exception as e:  # noqa: BLE001 - a bug in one pass fails what ran in it; serving goes on
                self._fail(list({id(s.request): s.request for s in self.rows if s.state is State.RUNNING}.values()), e)
                self._compact()

    def _pass(self) -> None:
        with self._cv:
            self._retire_waiting()
        self._retire_running()
        self._compact()
        with self._cv:
            admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self.rows and self._decode_due(admitted):
            self._decode()
        self._compact()
        self.metrics.running.set(len(self.rows))

    def _decode_due(self, admitted: list[Request]) -> bool:
        if not admitted or not self.waiting or self.max_batch == len(self.rows):
            return True
        oldest = min((s.last_token_at for s in self.rows if s.last_token_at is not None), default=None)
        return oldest is not None and time.perf_counter() - oldest > self.max_decode_delay_s

    def _admit(self) -> list[Request]:
        admitted, free, budget = [], self.max_batch - len(self.rows), self.prefill_tokens
        while self.waiting and self.waiting[0].n <= free:
            cost = len(self.waiting[0].prompt) * self.waiting[0].n
            if admitted and cost > budget:
                break
            req = self.waiting.popleft()
            free, budget = free - req.n, budget - cost
            admitted.append(req)
        self.metrics.queue_depth.set(len(self.waiting))
        return admitted

    def _retire_waiting(self) -> None:
        now = time.perf_counter()
        for r in [r for r in self.waiting if r.cancelled.is_set() or r.expired(now)]:
            self.waiting.remove(r)
            self._finish_waiting(r, "cancelled" if r.cancelled.is_set() else "timeout")

    def _finish_waiting(self, r: Request, reason: str) -> None:
        for s in make_sequences(r, self.tokenizer, self.generator.config["vocab_size"]):
            s.state, s.finish_reason = State.FINISHED, reason
            self._send(r, Event("finish", s.index, reason=reason))
        self.metrics.requests.labels(reason).inc()

    def _retire_running(self) -> None:
        now = time.perf_counter()
        for s in self.rows:
            if s.state is State.RUNNING and (s.request.cancelled.is_set() or s.request.expired(now)):
                self._finish(s, "cancelled" if s.request.cancelled.is_set() else "timeout")

    def _prefill(self, requests: list[Request]) -> None:
        start = len(self.rows)
        try:  # admitted requests have left the queue: whatever fails here must answer them
            seqs = [s for r in requests for s in make_sequences(r, self.tokenizer, self.generator.config["vocab_size"])]
            logits = self.decoder.run_prefill([s.request.prompt for s in seqs], self.pool.views(start, start + len(seqs)),
                                              self.tokenizer.pad_id)
        except Exception as e:  # noqa: BLE001 - one failed step fails its requests, never the server
            self._fail(requests, e)
            return
        for s in seqs:
            s.state = State.RUNNING
        self.rows.extend(seqs)
        self.metrics.prompt_tokens.inc(sum(len(s.request.prompt) for s in seqs))
        self._take_tokens(seqs, logits)

    def _decode(self) -> None:
        rows = [s for s in self.rows if s.state is State.RUNNING]
        if not rows:
            return
        if len(rows) != len(self.rows):  # finished rows still hold slots until compaction
            self._compact()
            rows = self.rows
        tokens = np.array([s.generated[-1] for s in rows], np.int64)
        cached = np.array([s.cached for s in rows], np.int64)
        t0 = time.perf_counter()
        try:
            logits = self._step_binding(len(rows)).run(tokens, cached)
        except Exception as e:  # noqa: BLE001
            self._fail(list({id(s.request): s.request for s in rows}.values()), e)
            return
        self.metrics.step.observe(time.perf_counter() - t0)
        self._take_tokens(rows, logits)

    def _take_tokens(self, seqs: list[Sequence], logits: np.ndarray) -> None:
        decodable = self.generator.decodable
        if decodable < logits.shape[-1]:
            logits[:, decodable:] = -np.inf
        now = time.perf_counter()
        eod = self.generator.eod_id
        for i, s in enumerate(seqs):
            cfg = s.request.sampling
            tok = int(next_tokens(logits[i:i + 1], cfg, s.rng, None if s.seen is None else s.seen[None],
                                  None if s.counts is None else s.counts[None])[0])
            s.generated.append(tok)
            if s.seen is not None:
                s.seen[tok] = True
            if s.counts is not None:
                s.counts[tok] += 1
            if s.first_token_at is None:
                s.first_token_at = now
                self.metrics.ttft.observe(now - s.request.arrived)
            else:
                self.metrics.itl.observe(now - s.last_token_at)
            s.last_token_at = now
            self.metrics.tokens.inc()
            if tok == eod:
                self._finish(s, "stop")
                continue
            if piece := s.text.push(tok):
                if s.request.stream:
                    self._send(s.request, Event("token", s.index, piece, tok))
                else:
                    s.held.append(piece)
            if s.text.stopped:
                self._finish(s, "stop")
            elif len(s.generated) >= s.request.max_new_tokens or s.cached + 1 >= self.capacity:
                self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str) -> None:
        s.state, s.finish_reason = State.FINISHED, reason
        text = "".join(s.held) + (s.text.finish() if reason in ("stop", "length") else "")
        if text:
            self._send(s.request, Event("token", s.index, text))
        self._send(s.request, Event("finish", s.index, reason=reason))
        if s.request.finished:
            self.metrics.requests.labels(reason).inc()

    def _fail(self, requests: list[Request], error: Exception) -> None:
        log.exception("engine step failed for %d request(s)", len(requests), exc_info=error)
        for r in requests:
            for s in r.sequences:
                s.state, s.finish_reason = State.FINISHED, "error"
            self._send(r, Event("error", text=f"internal error while generating: {type(error).__name__}: {error}"))
            self.metrics.requests.labels("error").inc()

    def _send(self, r: Request, event: Event) -> None:
        try:
            r.sink(event)
        except Exception:  # noqa: BLE001 - a consumer that went away cancels its request
            r.cancel()

    def _step_binding(self, rows: int):
        if rows not in self._steps:
            logits = None if self._logits is None else self._logits[:rows]
            self._steps[rows] = self.decoder.step_binding(self.pool.views(0, rows), logits)
        return self._steps[rows]

    def _compact(self) -> None:
        """Retire finished rows: the last running row moves into each freed slot."""
        rows, i = self.rows, 0
        while i < len(rows):
            if rows[i].state is not State.FINISHED:
                i += 1
                continue
            last = rows.pop()
            if i < len(rows) and last.state is not State.FINISHED:
                self.pool.move(len(rows), i, last.cached)
                rows[i] = last
                i += 1
