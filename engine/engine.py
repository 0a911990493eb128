"""The engine: continuous (iteration-level) batching over a shared-KV graph, for cpm-serve and
offline jobs alike.

One thread runs the loop; each pass:
  1. drops cancelled and timed-out requests (their slots free at once);
  2. admits waiting requests while KV slots are free, each starting from the longest prefix of
     its prompt already in the prefix cache (copied into its slot), and prefills the next chunk
     of every prompt under way, within a budget of prompt tokens;
  3. runs one decode step for every running sequence (rows still prefilling sit idle in it), each
     token chosen by the runtime's per-sequence step (its own settings and random stream), and
     retires those that finished.
What runs when is the ``Scheduler``'s call, the model work the ``ModelRunner``'s; the engine
validates requests, turns tokens into events and keeps the metrics. Requests arrive from any
thread through ``submit`` and report back through their ``sink``. Nothing here knows of HTTP.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np

from ..runtime import CPMGenerator
from ..runtime.backends import SlotDecoder
from ..runtime.generation.logprobs import TokenLogprob, logprobs_of
from ..runtime.generation.step import choose_next
from .metrics import EngineMetrics
from .prefix_cache import PrefixCache
from .requests import RequestError, RequestRules
from .runner import ModelRunner
from .scheduler import Plan, Scheduler, SchedulerLimits
from .scoring import PromptScoring
from .sequence import EngineError, Event, Request, ScoreRequest, Sequence, State, make_sequences

log = logging.getLogger("cpm_deploy.engine")

PREFIX_BLOCK = 8  # tokens per prefix-cache block: the granularity of a match


def prefix_store_tokens(setting: int | None, capacity: int) -> int:
    """The prefix store's positions: the setting, or by default two full-length prompts' worth."""
    return 2 * capacity if setting is None else max(setting, 0)


class Engine:
    def __init__(self, generator: CPMGenerator, limits: SchedulerLimits | None = None, max_total: int | None = None,
                 warm_up: bool = True, prefix_cache_tokens: int | None = None, scorer=None, **limit_fields):
        """``limits`` (or its fields as keywords: max_batch, max_queue, prefill_tokens,
        max_decode_delay_s) schedule the work; ``max_total`` caps the positions per sequence;
        ``prefix_cache_tokens`` sizes the store of shared prompt prefixes (None: two sequences'
        positions; 0: no reuse); ``scorer`` opens the scorer echoed prompts are scored on (default:
        the scoring twin of the generator's graph in its bundle; none for a generator built by hand)."""
        limits = limits or SchedulerLimits(**limit_fields)
        if not isinstance(generator.decoder, SlotDecoder):
            raise EngineError(f"continuous batching needs a shared-KV graph (cpu-fp32, cpu-int8, cpu-int4, cuda-*); "
                              f"{generator.graph_name or 'this graph'} concatenates its cache")
        if limits.max_batch < 1 or limits.max_queue < 0:
            raise EngineError("max_batch must be >= 1 and max_queue >= 0")
        self.generator, self.decoder, self.tokenizer = generator, generator.decoder, generator.tokenizer
        self.capacity = min(max_total or generator.n_positions, generator.n_positions)
        blocks = prefix_store_tokens(prefix_cache_tokens, self.capacity) // PREFIX_BLOCK
        self.prefix = PrefixCache(blocks, PREFIX_BLOCK) if blocks else None
        self.limits, self.scheduler = limits, Scheduler(limits, self._sequences, self.prefix)
        self.full_warm_up, self.warm_up_s = warm_up, 0.0
        self.runner = ModelRunner(self.decoder, limits.max_batch, self.capacity, self.tokenizer.pad_id, blocks,
                                  PREFIX_BLOCK)
        self.scoring = PromptScoring(scorer or _twin_of(generator))
        self.rules = RequestRules(generator, self.capacity, limits.max_batch)
        self.metrics = EngineMetrics()
        self.metrics.kv_slots.set(limits.max_batch)
        self._cv = threading.Condition()  # guards the scheduler's queue and the flags below
        self._thread: threading.Thread | None = None
        self._accepting, self._stop, self._idle = True, False, True

    @classmethod
    def from_bundle(cls, path: str | Path, graph: str | None = None, threads: int | None = None, provider: str = "cpu",
                    verify: bool = True, **options) -> "Engine":
        gen = CPMGenerator.from_bundle(path, provider=provider, threads=threads, verify=verify, variant=graph)
        return cls(gen, **options)

    @property
    def max_batch(self) -> int:
        return self.limits.max_batch

    # -- requests ---------------------------------------------------------------------------------
    def make_request(self, prompt: str | list[int], max_new_tokens: int, n: int = 1, timeout_s: float | None = None,
                     sink=None, stream: bool = True, logprobs: int | None = None, **sampling) -> Request:
        """Validate and build a request (not yet submitted), by the generator's rules against this
        server's positions per sequence and batch. Raises RequestError."""
        return self.rules.request(prompt, max_new_tokens, n, timeout_s, sink, stream, logprobs, **sampling)

    def make_score_request(self, prompts: list[str | list[int]], top: int, sink) -> ScoreRequest:
        """Prompts to score on the scoring graph (an echo), not to continue. Raises RequestError."""
        if not self.scoring.available:
            raise RequestError("this engine has no scoring graph: echoed log-probabilities need a bundle")
        return self.rules.score_request(prompts, top, sink)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return self.rules.prompt_ids(prompt)

    def submit_scoring(self, request: ScoreRequest) -> ScoreRequest:
        with self._cv:
            if not self._accepting:
                raise EngineError("the server is shutting down")
            self.scoring.waiting.append(request)
            self._idle = False
            self._cv.notify_all()
        return request

    def submit(self, request: Request) -> Request:
        with self._cv:
            if not self._accepting:
                raise EngineError("the server is shutting down")
            try:
                self.scheduler.enqueue(request)
            except EngineError:
                self.metrics.requests.labels("rejected").inc()
                raise
            self._idle = False
            self.metrics.queue_depth.set(len(self.scheduler.waiting))
            self._cv.notify_all()
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
        """Pay first-run costs before requests do (jieba's dictionary, onnxruntime's first run; with
        ``full`` every batch shape, see ModelRunner.warm_up); returns the seconds it took."""
        t0 = time.perf_counter()
        ids = self.generator.prepare(["清华大学"], None, 1, False).prompts[0]
        self.runner.warm_up(ids, full)  # runs the model directly: nothing enters the prefix cache
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
            self._cv.wait_for(lambda: self._idle or not self.running, timeout=drain_s)
            self._stop = True  # the loop cancels what is left: only its thread touches the rows
            self._cv.notify_all()
            if self._thread is None:  # never started: nothing runs, the queue is answered here
                for r in self.scheduler.waiting:
                    self._finish_waiting(r, "cancelled")
                self.scheduler.waiting.clear()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            with self._cv:
                self._idle = sched.idle and not self.scoring.waiting
                self._cv.notify_all()  # a shutdown waiting for the engine to drain
                while sched.idle and not self.scoring.waiting and not self._stop:
                    self._cv.wait()
                if self._stop:
                    for r in sched.waiting:
                        self._finish_waiting(r, "cancelled")
                    sched.waiting.clear()
                    for r in self.scoring.waiting:
                        r.sink(EngineError("the server is shutting down"))
                    self.scoring.waiting.clear()
                    for s in sched.rows:
                        s.request.cancel()  # retired as cancelled by the next pass
                    if not sched.rows:
                        return
            try:
                self._pass()
            except Exception as e:  # noqa: BLE001 - a bug in one pass fails what ran in it; serving goes on
                self._fail(sched.requests_of([s for s in sched.rows if not s.finish_reason]), e)
                sched.compact(self.runner.move)

    def _pass(self) -> None:
        sched, now = self.scheduler, time.perf_counter()
        with self._cv:
            expired, scores = sched.expired_waiting(now), self.scoring.take()
        if scores:
            self.scoring.run(scores)
        for r, why in expired:
            self._finish_waiting(r, why)
        for s, why in sched.expired_running(now):
            self._finish(s, why)
        sched.compact(self.runner.move)
        with self._cv:
            plan = sched.plan()
            self.metrics.queue_depth.set(len(sched.waiting))
        if plan.chunks or plan.reused:  # a cached prefix is loaded even in a pass with no chunk for it
            self._prefill(plan)
        if sched.decode_due(plan.admitted):
            self._decode()
        self.metrics.running.set(len(sched.rows))

    def _sequences(self, r: Request) -> list[Sequence]:
        """The scheduler's way to make an admitted request's sequences; a request that cannot get
        them fails alone (it has left the queue)."""
        try:
            seqs = make_sequences(r, self.generator)
        except Exception as e:  # noqa: BLE001
            self._fail([r], e)
            return []
        if self.prefix is not None:
            self.metrics.prefix_queries.inc(len(r.prompt))
            self.metrics.prefix_hits.inc(r.cached_tokens)
        return seqs

    def _finish_waiting(self, r: Request, reason: str) -> None:
        for s in make_sequences(r, self.generator):
            s.finish(reason)
            self._send(r, Event("finish", s.index, reason=reason))
        self.metrics.requests.labels(reason).inc()

    def _prefill(self, plan: Plan) -> None:
        rows, runner = self.scheduler.rows, self.runner
        slot = {id(s): i for i, s in enumerate(rows)}
        started, logits = [], []
        try:  # admitted requests have left the queue: whatever fails here must answer them
            for s, blocks in plan.reused:
                runner.load(blocks, slot[id(s)])
            for call in _calls([(slot[id(s)], s, n) for s, n in plan.chunks]):
                first, seqs = call[0][0], [s for _, s, _ in call]
                out = runner.prefill([s.request.prompt[s.computed:s.computed + n] for _, s, n in call], first,
                                     np.array([s.computed for s in seqs], np.int64))
                for (i, s, n), row in zip(call, out):
                    s.computed += n
                    runner.save(i, self.scheduler.remember(s))
                    if s.computed == len(s.request.prompt):
                        s.start()
                        started.append(s)
                        logits.append(row)
        except Exception as e:  # noqa: BLE001 - one failed step fails its requests, never the server
            self._fail(self.scheduler.requests_of([s for s, _ in plan.chunks + plan.reused]), e)
            return
        self.metrics.prompt_tokens.inc(sum(n for _, n in plan.chunks))
        if self.prefix is not None:
            self.metrics.prefix_cached.set(self.prefix.cached_tokens)
        if started:
            self._take_tokens(started, np.stack(logits))

    def _decode(self) -> None:
        sched = self.scheduler
        if any(s.finish_reason for s in sched.rows):  # a prefilled sequence that ended at its first token
            sched.compact(self.runner.move)
        rows = sched.rows
        running = np.array([s.state is State.RUNNING for s in rows])
        if not running.any():
            return
        tokens = np.array([s.generated[-1] if go else 0 for s, go in zip(rows, running)], np.int64)
        cached = np.array([s.cached for s in rows], np.int64)
        t0 = time.perf_counter()
        try:
            logits = self.runner.decode(tokens, cached, None if running.all() else ~running)
        except Exception as e:  # noqa: BLE001
            self._fail(sched.requests_of(rows), e)
            return
        self.metrics.step.observe(time.perf_counter() - t0)
        self._take_tokens([s for s, go in zip(rows, running) if go], logits[running])

    def _take_tokens(self, seqs: list[Sequence], logits: np.ndarray) -> None:
        asked = [i for i, s in enumerate(seqs) if s.request.logprobs is not None]
        tokens = choose_next(logits, [s.decoding for s in seqs], self.generator.decodable)
        if asked:  # sampling's settings work on copies: the logits are still the model's own
            rows = logits if len(asked) == len(seqs) else logits[asked]
            top = max(seqs[i].request.logprobs for i in asked)
            for i, lp in zip(asked, logprobs_of(rows[:, :self.generator.decodable], tokens[asked], top)):
                if int(tokens[i]) != self.generator.eod_id:  # <eod> ends the text; it is no token of it
                    seqs[i].pending.append(TokenLogprob(lp.token, lp.logprob, lp.top[:seqs[i].request.logprobs]))
        now = time.perf_counter()
        for s, tok in zip(seqs, tokens.tolist()):
            piece = s.decoding.accept(tok)
            if s.first_token_at is None:
                s.first_token_at = now
                self.metrics.ttft.observe(now - s.request.arrived)
            else:
                self.metrics.itl.observe(now - s.last_token_at)
            s.last_token_at = now
            self.metrics.tokens.inc()
            if piece:
                if s.request.stream:
                    self._send(s.request, Event("token", s.index, piece, tok, logprobs=_take(s.pending)))
                else:
                    s.held.append(piece)
            if s.decoding.done:
                self._finish(s, s.decoding.finish_reason)

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finish(reason)
        text = "".join(s.held) + (s.decoding.rest() if reason in ("stop", "length") else "")
        if text or s.pending:
            self._send(s.request, Event("token", s.index, text, logprobs=_take(s.pending)))
        self._send(s.request, Event("finish", s.index, reason=reason))
        if s.request.finished:
            self.metrics.requests.labels(reason).inc()

    def _fail(self, requests: list[Request], error: Exception) -> None:
        log.exception("engine step failed for %d request(s)", len(requests), exc_info=error)
        for r in requests:
            for s in r.sequences:
                s.finish("error")
            self._send(r, Event("error", text=f"internal error while generating: {type(error).__name__}: {error}"))
            self.metrics.requests.labels("error").inc()

    def _send(self, r: Request, event: Event) -> None:
        try:
            r.sink(event)
        except Exception:  # noqa: BLE001 - a consumer that went away cancels its request
            r.cancel()


def _twin_of(generator: CPMGenerator):
    """Opens the one-pass scorer of the generator's graph in its bundle (None: not from a bundle)."""
    if generator.source is None:
        return None
    from ..runtime.eval import open_scorer

    s = generator.source
    return lambda: open_scorer(s["path"], generator.graph_name, "one-pass", provider=s["provider"],
                               threads=s["threads"], verify=s["verify"])


def _take(pending: list) -> tuple:
    """The pending items, emptied."""
    out = tuple(pending)
    pending.clear()
    return out


def _calls(chunks: list[tuple[int, Sequence, int]]) -> list[list[tuple[int, Sequence, int]]]:
    """Chunks (slot, row, tokens) grouped into prompt calls: rows of neighbouring slots, whose
    padding to the call's widest chunk stays under half of their tokens (or under 32 tokens: a
    call of its own would cost more)."""
    calls: list[list] = []
    for chunk in sorted(chunks, key=lambda c: c[0]):
        call = calls[-1] if calls else None
        if call and chunk[0] == call[-1][0] + 1:
            width, tokens = max(max(n for *_, n in call), chunk[2]), sum(n for *_, n in call) + chunk[2]
            if width * (len(call) + 1) - tokens <= max(0.5 * tokens, 32):
                call.append(chunk)
                continue
        calls.append([chunk])
    return calls
