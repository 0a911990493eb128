"""cpm-eval: the model card's zero-shot table (TNEWS, IFLYTEK, OCNLI) or perplexity, on any graph."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .common import setup_logging, stage_progress, user_errors

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-T", "--task", type=click.Choice(["tnews", "iflytek", "ocnli", "perplexity"]), required=True,
              help="Zero-shot classification task (CLUE format), or perplexity over a text file.")
@click.option("-d", "--data", type=click.Path(path_type=Path), required=True,
              help="Folder with dev.json (and labels.json) in CLUE's JSON-lines format; for perplexity a text file, "
                   "one text per line.")
@click.option("-g", "--graph", "graphs", multiple=True,
              help="Graph(s) of the bundle (repeatable); default: the bundle's default. With several, their "
                   "agreement with the first is reported.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt scores with the bundle's engine for this GPU.")
@click.option("-n", "--limit", type=click.IntRange(1), help="Only the first N examples (quick runs).")
@click.option("-b", "--batch", type=click.IntRange(1), default=32, show_default=True,
              help="Candidate texts scored together (an example's candidates always go together).")
@click.option("-t", "--threads", type=click.IntRange(1), help="onnxruntime intra-op threads (default: all cores).")
@click.option("-o", "--report", type=click.Path(path_type=Path, dir_okay=False),
              help="JSON report file (default: cpm-eval-TASK.json in the current folder).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def main(bundle, task, data, graphs, backend, limit, batch, threads, report, quiet):
    """Score BUNDLE's graphs the way CPM-Generate's model card does.

    Classification by language-model scoring: each label's prompt followed by the sentence, the
    label with the lowest mean cross-entropy of the sentence wins (zero-shot-cls.py's method,
    sequence length 128). Prints accuracy with per-label counts and examples/s, and writes a JSON
    report. Random or tiny weights say nothing about the model card's numbers.

    \b
    Examples:
      cpm-eval ./cpm-bundle --task tnews --data ./tnews_public --limit 500
      cpm-eval ./cpm-bundle --task tnews --data ./tnews_public -g cpu-fp32 -g cpu-int4
      cpm-eval ./cpm-bundle --task perplexity --data headlines.txt
    """
    setup_logging()
    from ..runtime import BundleError, CPMGenerator, GenerationError, ProviderError
    from ..runtime.zero_shot import EvalDataError, classify, load_task, perplexity_of_lines, summarize

    with user_errors(BundleError, EvalDataError, GenerationError, ProviderError, ValueError, FileNotFoundError):
        if task == "perplexity":
            if not data.is_file():
                raise EvalDataError(f"{data} is not a text file (one text per line)")
            lines = data.read_text(encoding="utf-8").splitlines()[:limit]
        else:
            spec = load_task(task, data, limit)
        results, first = {}, None
        for graph in graphs or (None,):
            gen = CPMGenerator.from_bundle(bundle, threads=threads, variant=graph, backend=backend)
            with stage_progress({}, not quiet) as stage:
                step = lambda done, total, g=gen.graph_name: stage(g, done, total)  # noqa: E731
                t0 = time.perf_counter()
                if task == "perplexity":
                    r = perplexity_of_lines(gen, lines, batch, step)
                    r["lines_per_s"] = r["lines"] / (time.perf_counter() - t0)
                else:
                    out = classify(gen, spec, batch, on_progress=step)
                    r = {**summarize(spec, out["predictions"]), **out}
                    r["examples_per_s"] = len(spec.examples) / (time.perf_counter() - t0)
                    if first is not None:
                        r["agreement_with_first"] = sum(a == b for a, b in zip(out["predictions"], first)) / len(first)
                    first = first if first is not None else out["predictions"]
            results[gen.graph_name] = r
    _print(task, results)
    path = report or Path(f"cpm-eval-{task}.json")
    path.write_text(json.dumps({"bundle": str(bundle), "task": task, "backend": backend, "limit": limit,
                                "graphs": results}, ensure_ascii=False, indent=2) + "\n")
    click.echo(f"report: {path}")


def _print(task: str, results: dict) -> None:
    table = Table(title=f"cpm-eval {task}")
    if task == "perplexity":
        for col in ("graph", "perplexity", "tokens", "lines/s"):
            table.add_column(col)
        for g, r in results.items():
            table.add_row(g, f"{r['perplexity']:.3f}", str(r["tokens"]), f"{r['lines_per_s']:.1f}")
    else:
        for col in ("graph", "accuracy", "examples", "agreement", "examples/s"):
            table.add_column(col)
        for g, r in results.items():
            agree = f"{r['agreement_with_first']:.1%}" if "agreement_with_first" in r else "-"
            table.add_row(g, f"{r['accuracy']:.4f}", str(r["examples"]), agree, f"{r['examples_per_s']:.1f}")
        first = next(iter(results.values()))
        labels = Table(title="per label (first graph)")
        for col in ("label", "examples", "correct", "predicted"):
            labels.add_column(col)
        for name, c in first["per_label"].items():
            labels.add_row(name, str(c["examples"]), str(c["correct"]), str(c["predicted"]))
        Console().print(labels)
    Console().print(table)
