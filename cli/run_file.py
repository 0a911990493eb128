"""cpm-run -f: a prompt file (text, JSON lines or OpenAI batch lines) through the batching engine."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from .common import stage_progress


@dataclass
class FileJob:
    lines: Iterator  # parsed lines still to run
    output: object  # jobs.offline.Output
    total: int | None  # non-empty input lines, when the input is a file


def open_job(source: str, output: Path | None, fmt: str, defaults: dict) -> FileJob:
    """Input read and checked, output opened (and a killed job's output resumed): before the model
    loads, so a wrong path or an output of another job fails in a second."""
    from ..jobs.offline import JobError, Output, skip_done
    from ..jobs.offline_formats import detect, parse

    lines, total = _read_lines(source)
    first = next(lines, None)
    fmt = detect(first[1]) if fmt == "auto" and first else ("text" if fmt == "auto" else fmt)
    parsed = (parse(n, t, fmt, defaults) for n, t in itertools.chain([first] if first else [], lines))
    try:
        out = Output(output, sys.stdout)
        done = out.resume()
        todo = skip_done(parsed, done, fmt)
    except JobError as e:
        raise click.ClickException(str(e)) from None
    if done:
        click.echo(f"resuming: {len(done)} records already in {output}", err=True)
    return FileJob(todo, out, total)


def run_file(gen, job: FileJob, max_batch: int, quiet: bool, model_name: str) -> None:
    from ..jobs.offline import EngineJob, offline_engine, sequential

    with _writing(job, quiet) as write:
        if gen.decoder.kind == "shared":  # the engine batches shared-KV graphs
            with offline_engine(gen, max_batch) as engine:
                write(EngineJob(engine, model_name).run(job.lines))
        else:
            write(sequential(gen, job.lines))


@contextlib.contextmanager
def _writing(job: FileJob, quiet: bool):
    """``write(records)`` into the job's output, with a progress bar on a terminal; the job's file
    errors as one line; the output closed whatever happens."""
    from ..jobs.offline import JobError, OutputClosed, run_job

    try:
        with stage_progress({}, enabled=not quiet and job.total is not None and sys.stderr.isatty()) as step:
            progress = (lambda n: step("prompts", n, job.total)) if job.total else None
            yield lambda records: run_job(records, job.output, progress)
    except OutputClosed:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    except JobError as e:
        raise click.ClickException(str(e)) from None
    finally:
        job.output.close()


def _read_lines(path: str) -> tuple[Iterator[tuple[int, str]], int | None]:
    """(line number, text) of each non-empty line, and their count when the input is a file."""
    if path == "-":
        return ((n, t.rstrip("\n")) for n, t in enumerate(sys.stdin, 1) if t.strip()), None
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as f:
            total = sum(1 for t in f if t.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise click.ClickException(f"cannot read {path}: {e}") from None

    def lines():
        with open(p, encoding="utf-8") as f:
            yield from ((n, t.rstrip("\n")) for n, t in enumerate(f, 1) if t.strip())

    return lines(), total


def run_file_on_ray(bundle: Path, job: FileJob, address: str, workers: int, worker_cpus: float, graph: str | None,
                    threads: int | None, max_batch: int, verify: bool, quiet: bool, chunk: int = 16) -> None:
    """The same job over Ray worker actors (one engine each); records in input order, as locally."""
    ray, ray_job = connect(address)
    actor = ray_job.GenerationWorker.options(num_cpus=worker_cpus)
    pool = [actor.remote(str(bundle.absolute()), graph, threads or max(1, int(worker_cpus)), max_batch, verify,
                         bundle.name) for _ in range(workers)]
    try:
        with _writing(job, quiet) as write:
            results = ray_job.ordered(pool, ray_job.chunked(job.lines, chunk), lambda w, c: w.run.remote(c))
            write(r for chunk_records in results for r in chunk_records)
    except ray.exceptions.RayError as e:
        raise click.ClickException(f"a Ray worker failed {ray_job.RETRIES + 1} times, or the cluster went away: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    finally:
        for a in pool:
            ray.kill(a)


def connect(address: str):
    """Ray and the job module, connected to the cluster at ``address`` ("auto": the one this machine
    belongs to; "local": start one here)."""
    try:
        import ray
    except ImportError:
        raise click.ClickException("--ray needs the [ray] extra (pip install 'cpm-deploy[ray]')") from None
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise click.ClickException(f"cannot reach a Ray cluster at {address!r}: {e}") from None
    from ..jobs import ray_job

    return ray, ray_job
