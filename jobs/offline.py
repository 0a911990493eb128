"""Offline jobs: a file of prompts through the continuous-batching engine, records in input order.

Lines are turned into engine requests as slots and queue room allow (``window`` requests in flight,
finished records held until every earlier line is written), so memory stays bounded whatever the
file's length. Each record is written and flushed as soon as the lines before it are done: a
killed job leaves a prefix of the output, and ``Output.resume`` continues it (a partial last line is
cut and redone). Graphs the engine cannot batch (concatenated KV, TensorRT) run line by line through
``CPMGenerator``, with the same records.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..engine.errors import ServeError
from ..runtime import CPMGenerator, GenerationError
from ..runtime.generation.requests import check_choices
from ..api import completions
from ..engine import Engine, RequestError
from .offline_formats import LENGTH_KEYS, Line, batch_record, generation_record, line_key, record_key
from ..api.openai_protocol import CompletionIds
from ..engine.sequence import QueueFull



class JobError(ServeError, RuntimeError):
    """The job's files cannot be used as asked (unwritable output, an output of another input)."""


class OutputClosed(JobError):
    """The reader of the output went away (``cpm-run -f x | head``): stop quietly."""


class Output:
    """JSON-lines records appended one by one, flushed each time; ``path=None`` writes to ``stream``."""

    def __init__(self, path: Path | None, stream: IO[str] | None = None):
        self.path, self.written = path, 0
        if path is None:
            self.file = stream
            return
        try:
            self.file = open(path, "a+", encoding="utf-8")  # fails now, before the model loads
        except OSError as e:
            raise JobError(f"cannot write {path}: {e.strerror}") from None

    def resume(self) -> list[dict]:
        """The complete records already in the file; a partial last line (a killed write) is cut."""
        if self.path is None or not self.path.is_file():  # stdout, a pipe, /dev/full: nothing to resume
            return []
        self.file.flush()
        data = self.path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            self.file.truncate(len(complete))
            self.file.seek(0, 2)
        records = []
        for n, raw in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError:
                raise JobError(f"{self.path} line {n} is not a record this job wrote; choose another output") from None
        self.written = len(records)
        return records

    def write(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.file.flush()
        except BrokenPipeError:
            raise OutputClosed("the output's reader closed it") from None
        except OSError as e:
            where = self.path or "the output"
            raise JobError(f"cannot write {where}: {e.strerror}; {self.written} records are in it: run the same "
                           "command again to finish the rest") from None
        self.written += 1

    def close(self) -> None:
        if self.path is not None:
            try:
                self.file.close()
            except OSError:  # the write that failed said so already; close retries it
                pass


def skip_done(lines: Iterable[Line], done: list[dict], fmt: str) -> Iterator[Line]:
    """The lines after those whose records ``done`` holds, checking that ``done`` is this input's."""
    it = iter(lines)
    for i, record in enumerate(done):
        line = next(it, None)
        if line is None or line_key(line) != record_key(record, fmt):
            raise JobError(f"the output's record {i + 1} does not belong to input line "
                           f"{line.number if line else 'past the end'}: it is another job's output")
    yield from it


@dataclass(eq=False)
class _Job:
    line: Line
    requests: list = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # plain lines' choices
    reasons: list = field(default_factory=list)
    choices: completions.Choices | None = None  # batch lines' choices, answered as cpm-serve answers
    submitted: int = 0  # requests handed to the engine so far
    done: int = 0  # requests all of whose choices finished
    record: dict | None = None  # set once the job is finished


def offline_engine(gen: CPMGenerator, max_batch: int) -> Engine:
    """An engine for a job (start it, or use it as a context): nobody waits for a first token, so free
    slots are filled in as few prompt calls as they take."""
    return Engine(gen, max_batch=max_batch, max_queue=2 * max_batch, prefill_tokens=4096, warm_up=False)


class EngineJob:
    """Lines through a running Engine (``offline_engine``); ``run`` yields records in input order."""

    def __init__(self, engine: Engine, model_name: str, window: int | None = None):
        self.engine, self.model_name = engine, model_name
        self.window = window or engine.max_batch + engine.limits.max_queue // 2  # requests in flight
        self.events: queue.Queue = queue.Queue()

    def run(self, lines: Iterable[Line]) -> Iterator[dict]:
        pending: list[_Job] = []  # in input order: in flight, or finished and not yet yielded
        in_flight, source, exhausted = 0, iter(lines), False
        while True:
            while len(pending) < 4 * self.window and in_flight < self.window:
                last = pending[-1] if pending else None
                if last is not None and last.record is None and last.submitted < len(last.requests):
                    before = last.submitted  # a job of many prompts goes in as the queue makes room
                    self._feed(last)
                    in_flight += last.submitted - before
                    if last.submitted < len(last.requests):
                        break
                    continue
                line = next(source, None)
                if line is None:
                    exhausted = True
                    break
                pending.append(self._start(line))
            while pending and pending[0].record is not None:
                yield pending.pop(0).record
            if exhausted and not pending:
                return
            if in_flight:
                in_flight -= self._wait()

    def _start(self, line: Line) -> _Job:
        job = _Job(line)
        if line.error is not None:
            job.record = self._failed(line, 400, line.error)
            return job
        try:
            job.requests = self._requests(job)
        except completions.BodyError as e:
            job.record = batch_record(line, e.status, e.body)
        except (GenerationError, RequestError, TypeError, ValueError) as e:
            job.record = self._failed(line, 400, str(e))
        n = len(job.requests) * (job.requests[0].n if job.requests else 0)
        job.texts, job.reasons = [""] * n, [None] * n
        if job.record is None and job.choices is not None and not job.requests:  # echo alone: scored, done
            job.choices.finish_echo_only()
            job.record = self._finished(job)
        return job

    def _requests(self, job: _Job) -> list:
        line, events = job.line, self.events
        if line.fmt == "openai-batch":
            body = completions.parse(line.body, self.engine, self.model_name)
            requests = completions.make_requests(self.engine, body, None, lambda k: lambda ev: events.put((job, k, ev)))
            answer: queue.Queue = queue.Queue()
            score = completions.score_request(self.engine, body, answer.put)
            if score is not None:  # an echo with logprobs: the prompt is scored first (one pass, in the engine)
                self.engine.submit_scoring(score)
                positions = completions.scored(answer.get())
                if isinstance(positions, completions.BodyError):
                    raise positions
            job.choices = completions.Choices(self.engine, body, requests, score)
            job.choices.echoed(positions if score is not None else None)
            return requests
        o, gen = line.options, self.engine.generator
        n = o.get("num_return_sequences", 1)
        check_choices(n, bool(o.get("do_sample")))
        req = gen.prepare([line.prompt], o.get("max_length"), o.get("max_new_tokens"), bool(o.get("truncate_prompt")))
        sampling = {k: v for k, v in o.items() if k not in LENGTH_KEYS}
        return [self.engine.make_request(req.prompts[0], req.max_new_tokens, n, sink=lambda ev: events.put((job, 0, ev)),
                                         stream=False, **sampling)]

    def _feed(self, job: _Job) -> None:
        """Submit the job's requests that are not in yet, while the engine's queue takes them."""
        while job.submitted < len(job.requests):
            try:
                self.engine.submit(job.requests[job.submitted])
            except QueueFull:
                return
            job.submitted += 1

    def _wait(self) -> int:
        """Apply the next event; returns how many requests it took out of the engine (a request is
        out when all its choices finished; a failure takes the job's submitted requests out)."""
        job, k, ev = self.events.get()
        if job.record is not None:
            return 0  # a failed job's other choices
        n = job.requests[0].n
        if (failed := completions.failure(ev)) is not None:
            for r in job.requests:
                r.cancel()
            job.record = self._failed(job.line, failed.status, failed.body["error"]["message"], failed.body)
            return job.submitted - job.done
        if job.choices is not None:
            job.choices.take(k * n + ev.index, ev)
        if ev.kind == "token":
            job.texts[k * n + ev.index] += ev.text
            return 0
        job.reasons[k * n + ev.index] = ev.reason
        if all(r is not None for r in job.reasons[k * n:(k + 1) * n]):
            job.done += 1
            if job.done == len(job.requests):
                job.record = self._finished(job)
            return 1
        return 0

    def _finished(self, job: _Job) -> dict:
        if job.line.fmt == "openai-batch":
            return batch_record(job.line, 200, job.choices.completion(CompletionIds(self.model_name)))
        return generation_record(job.line, job.texts)

    @staticmethod
    def _failed(line: Line, status: int, message: str, body: dict | None = None) -> dict:
        if line.fmt != "openai-batch":
            return generation_record(line, None, message)
        if line.key is None or line.body is None and body is None:  # the line itself is malformed
            return batch_record(line, None, None, message)
        return batch_record(line, status, body or completions.BodyError.of(status, message).body)


def sequential(gen: CPMGenerator, lines: Iterable[Line]) -> Iterator[dict]:
    """Line by line through CPMGenerator (graphs the engine cannot batch): the same records."""
    for line in lines:
        if line.fmt == "openai-batch":
            raise JobError("OpenAI batch files need a graph the serving engine runs (cpu-fp32, cpu-int8, cpu-int4)")
        if line.error is not None:
            yield generation_record(line, None, line.error)
            continue
        o = dict(line.options)
        try:
            out = gen(line.prompt, **o)
            yield generation_record(line, [x["generated_text"][len(line.prompt):] for x in out])
        except (GenerationError, TypeError, ValueError) as e:
            yield generation_record(line, None, str(e))


def run_job(records: Iterator[dict], output: Output, on_progress: Callable[[int], None] | None = None) -> int:
    """Write each record as it comes; returns how many were written in this run."""
    count = 0
    for record in records:
        output.write(record)
        count += 1
        if on_progress:
            on_progress(output.written)
    return count
