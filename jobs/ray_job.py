"""Offline jobs and evaluations across a Ray cluster: worker actors, each with its own engine (or
scorer), take chunks of the input; the driver writes results in input order.

- Backpressure and bounded memory: at most ``in_flight`` chunks per worker are outstanding, and a
  finished chunk waits only for the chunks before it.
- A worker that dies is restarted by Ray and its chunks are run again (``max_restarts``,
  ``max_task_retries``); results reach the output only when their chunk completes, so nothing is
  written twice and nothing is lost.
- Records are those of a local run: a line's result does not depend on its neighbours for fp32
  graphs (greedy, or seeded sampling); int8 quantizes each call's activations over the rows in it,
  so batch company can nudge its tokens wherever it runs. Evaluation chunks are whole multiples of
  ``classify``'s examples per call, so scores are bit for bit those of a local run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import ray

RETRIES = 3


@ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)
class GenerationWorker:
    def __init__(self, bundle: str, graph: str | None, threads: int | None, max_batch: int, verify: bool, model: str):
        from ..runtime import CPMGenerator
        from .offline import offline_engine

        gen = CPMGenerator.from_bundle(bundle, threads=threads, verify=verify, variant=graph)
        self.engine = offline_engine(gen, max_batch).start()
        self.model = model

    def run(self, lines: list) -> list[dict]:
        """Records of these parsed lines (offline_formats.Line), in their order."""
        from .offline import EngineJob

        return list(EngineJob(self.engine, self.model).run(lines))

    def generated_tokens(self) -> int:
        return int(self.engine.metrics.registry.get_sample_value("cpm_generated_tokens_total") or 0)

    def pid(self) -> int:
        import os

        return os.getpid()


@ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)
class ScoringWorker:
    def __init__(self, bundle: str, graph: str | None, method: str, batch: int, threads: int | None, verify: bool):
        from ..runtime.eval import open_scorer

        self.scorer = open_scorer(bundle, graph, method, batch, threads=threads, verify=verify)

    def info(self) -> dict:
        return {"graph": self.scorer.graph_name, "method": self.scorer.method}

    def run(self, chunk: list) -> list[list[float]]:
        from ..runtime.eval import classify

        return classify(self.scorer, chunk)["scores"]

    def pid(self) -> int:
        import os

        return os.getpid()


def ordered(workers: list, chunks: Iterable, submit: Callable, in_flight: int = 2) -> Iterator:
    """Each chunk's result, in chunk order, running ``submit(worker, chunk)`` over the workers with
    at most ``in_flight`` outstanding chunks per worker."""
    chunks = iter(chunks)
    waiting: dict = {}  # future -> (chunk number, worker)
    done: dict[int, object] = {}
    load = {id(w): 0 for w in workers}
    next_chunk, next_out, exhausted = 0, 0, False
    while True:
        while not exhausted:
            worker = min(workers, key=lambda w: load[id(w)])
            if load[id(worker)] >= in_flight:
                break
            chunk = next(chunks, None)
            if chunk is None:
                exhausted = True
                break
            waiting[submit(worker, chunk)] = (next_chunk, worker)
            load[id(worker)] += 1
            next_chunk += 1
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1
        if not waiting:
            return
        (ready,), _ = ray.wait(list(waiting), num_returns=1)
        number, worker = waiting.pop(ready)
        load[id(worker)] -= 1
        done[number] = ray.get(ready)  # a worker that died was restarted and ran it again (max_task_retries)


def chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
