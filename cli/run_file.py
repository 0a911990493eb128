"""cpm-run -f: a prompt file (text, JSON lines or OpenAI batch lines) through the batching engine."""

from __future__ import annotations

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
    output: object  # serve.offline.Output
    total: int | None  # non-empty input lines, when the input is a file


def open_job(source: str, output: Path | None, fmt: str, defaults: dict) -> FileJob:
    """Input read and checked, output opened (and a killed job's output resumed): before the model
    loads, so a wrong path or an output of another job fails in a second."""
    from ..serve.offline import JobError, Output, skip_done
    from ..serve.offline_formats import detect, parse

    lines, total = _read_lines(source)
    first = next(lines, None)
    fmt = detect(first[1]) if fmt == "auto" and first else ("text" if fmt == "auto" else fmt)
    parsed = (parse(n, t, fmt, defaults) for n, t in _chain(first, lines))
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
    from ..runtime.decoder import SharedKVDecoder
    from ..serve.engine import Engine
    from ..serve.offline import EngineJob, JobError, OutputClosed, run_job, sequential

    try:
        with stage_progress({}, enabled=not quiet and job.total is not None and sys.stderr.isatty()) as step:
            progress = (lambda n: step("prompts", n, job.total)) if job.total else None
            if isinstance(gen.decoder, SharedKVDecoder):
                with Engine(gen, max_batch=max_batch, max_queue=2 * max_batch) as engine:
                    run_job(EngineJob(engine, model_name).run(job.lines), job.output, progress)
            else:
                run_job(sequential(gen, job.lines), job.output, progress)
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


def _chain(first, rest):
    if first is not None:
        yield first
        yield from rest
