"""What every command shares: user-error mapping, warnings on stderr, rich progress bars."""

from __future__ import annotations

import contextlib
import logging

import click
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

stderr = Console(stderr=True)


class _ClickHandler(logging.Handler):
    def emit(self, record):
        click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


def setup_logging(verbose: bool = False) -> None:
    log = logging.getLogger("cpm_deploy")
    log.handlers[:] = [_ClickHandler()]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


@contextlib.contextmanager
def user_errors(*types: type[BaseException]):
    """Turn the library's user-facing errors (every CPMError, and ``types``) into one-line
    ClickExceptions (no traceback)."""
    from ..runtime.errors import CPMError

    try:
        yield
    except (CPMError, *types) as e:
        raise click.ClickException(str(e)) from None


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "")


@contextlib.contextmanager
def stage_progress(labels: dict[str, str], enabled: bool = True):
    """Yield ``step(stage, done, total)`` that drives one progress bar per stage on stderr."""
    if not enabled:
        yield lambda *a: None
        return
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=False) as bar:
        tasks: dict[str, int] = {}

        def step(stage: str, done: int, total: int):
            if stage not in tasks:
                tasks[stage] = bar.add_task(labels.get(stage, stage), total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield step


def ray_options(what: str):
    """--ray / --workers / --worker-cpus, for commands whose work spreads over a Ray cluster;
    ``what`` says what runs there."""

    def wrap(command):
        command = click.option("--worker-cpus", type=click.FloatRange(min=0, min_open=True), default=1.0,
                               show_default=True, help="With --ray: CPUs each worker reserves (and its onnxruntime "
                                                       "threads).")(command)
        command = click.option("--workers", type=click.IntRange(1), default=2, show_default=True,
                               help="With --ray: worker actors.")(command)
        return click.option("--ray", "ray_address", metavar="ADDRESS",
                            help=f"{what} on a Ray cluster ('auto': the cluster this machine is part of; 'local': "
                                 "start one here; or HOST:PORT); needs the [ray] extra.")(command)

    return wrap
