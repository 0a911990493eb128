"""cpm-eval: the model card's zero-shot tables (TNEWS, IFLYTEK, OCNLI, ChID) or perplexity, on any graph."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .common import ray_options, setup_logging, stage_progress, user_errors

CONTEXT = {"help_option_names": ["-h", "--help"]}
TASK_CHOICES = ["tnews", "iflytek", "ocnli", "chid", "perplexity"]


@click.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-T", "--task", type=click.Choice(TASK_CHOICES), required=True,
              help="Zero-shot task (CLUE's TNEWS, IFLYTEK, OCNLI; ChID), or perplexity over a text file.")
@click.option("-d", "--data", type=click.Path(path_type=Path), required=True,
              help="CLUE tasks: folder with dev.json and labels.json (JSON lines). ChID: folder with test.json and "
                   "test_answer.json. Perplexity: a text file, one text per line.")
@click.option("--candidates", type=click.Choice(["sampled", "all"]), default="sampled", show_default=True,
              help="TNEWS/IFLYTEK: 3 random wrong labels + the gold one per example, as the card's numbers were "
                   "measured; 'all' scores every label (the original script's older default).")
@click.option("--seed", type=int, help="Seed of the sampled candidates (default: the card's, 1234 TNEWS, 5 IFLYTEK).")
@click.option("--seq-length", type=click.IntRange(21), default=1024, show_default=True,
              help="TNEWS/IFLYTEK: sentences are cut to this minus 20 tokens, as the original scripts do.")
@click.option("--split", type=click.Choice(["test", "dev"]), default="test", show_default=True,
              help="ChID split (the card's zero-shot column is the test split).")
@click.option("-g", "--graph", "graphs", multiple=True,
              help="Graph(s) of the bundle (repeatable); default: the bundle's default. With several, their "
                   "agreement with the first is reported.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt scores with the bundle's engine for this GPU (step by step).")
@click.option("--scoring", type=click.Choice(["auto", "one-pass", "steps"]), default="auto", show_default=True,
              help="one-pass: every candidate in one forward pass (the graph's scoring twin); steps: one decode "
                   "step per token (any graph, much slower); auto: one pass where the bundle has it.")
@click.option("-n", "--limit", type=click.IntRange(1), help="Only the first N examples; prints the projected time "
                                                             "for all of them.")
@click.option("-b", "--batch", type=click.IntRange(1), default=32, show_default=True,
              help="Candidate texts per forward pass at most.")
@click.option("-t", "--threads", type=click.IntRange(1), help="onnxruntime intra-op threads (default: all cores).")
@click.option("-o", "--report", type=click.Path(path_type=Path, dir_okay=False),
              help="JSON report file (default: cpm-eval-TASK.json in the current folder).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@ray_options("The examples in shards (scores and predictions those of a local run)")
def main(bundle, task, data, candidates, seed, seq_length, split, graphs, backend, scoring, limit, batch, threads,
         report, quiet, ray_address, workers, worker_cpus):
    """Score BUNDLE's graphs the way CPM-Generate's model card does.

    Each candidate (a label's prompt followed by the sentence; a ChID passage with one idiom filled
    in) is scored by the mean cross-entropy of its scored tokens; the lowest wins. The defaults are
    the published method: sampled candidate sets for TNEWS and IFLYTEK, sequence length 1024, ChID's
    test split. Prints accuracy, speed and, with --limit, the projected time for the whole set; the
    JSON report holds every example's candidates, scores and prediction. Random or tiny weights say
    nothing about the model card's numbers.

    \b
    Examples:
      cpm-eval ./cpm-bundle --task tnews --data ./tnews_public --limit 200
      cpm-eval ./cpm-bundle --task iflytek --data ./iflytek_public -g cpu-fp32 -g cpu-int8
      cpm-eval ./cpm-bundle --task chid --data ./chid
      cpm-eval ./cpm-bundle --task perplexity --data headlines.txt
    """
    setup_logging()
    from ..runtime.eval import (EvalDataError, classify, encode_examples, load_chid, load_task, open_scorer,
                                perplexity_of_lines, summarize)

    path = report or Path(f"cpm-eval-{task}.json")
    if not os.access(path.absolute().parent, os.W_OK):  # found out now, not after hours of scoring
        raise click.ClickException(f"cannot write the report {path}: its folder is missing or not writable")
    with user_errors(ValueError, FileNotFoundError):
        if task == "perplexity":
            if not data.is_file():
                raise EvalDataError(f"{data} is not a text file (one text per line)")
            lines = data.read_text(encoding="utf-8").splitlines()[:limit]
            spec = None
        elif task == "chid":
            spec = load_chid(data, split, limit)
        else:
            spec = load_task(task, data, limit, candidates, seed, seq_length)
        if ray_address and spec is None:
            raise click.UsageError("--ray scores the classification tasks and ChID, not perplexity")
        results, first, encoded = {}, None, None
        for graph in graphs or (None,):
            if ray_address:
                scorer = _RayScorer(bundle, graph, scoring, batch, threads, ray_address, workers, worker_cpus)
            else:
                scorer = open_scorer(bundle, graph, scoring, batch, threads=threads, backend=backend)
            with stage_progress({}, not quiet) as stage:
                if spec is not None and encoded is None:  # one tokenizer per bundle: encoded once
                    encoded = encode_examples(spec, scorer.tokenizer, scorer.n_positions,
                                              lambda d, n: stage("tokenize", d, n))
                step = lambda done, total, g=scorer.graph_name: stage(g, done, total)  # noqa: E731
                t0 = time.perf_counter()
                if spec is None:
                    r = perplexity_of_lines(scorer, lines, batch, step)
                    r["lines_per_s"] = r["lines"] / (time.perf_counter() - t0)
                else:
                    out = scorer.classify(encoded, step) if ray_address else classify(scorer, encoded, step)
                    r = {**summarize(spec, out["predictions"]), **_speed(encoded, time.perf_counter() - t0, spec.total)}
                    if first is not None:
                        r["agreement_with_first"] = sum(a == b for a, b in zip(out["predictions"], first)) / len(first)
                    first = first if first is not None else out["predictions"]
                    r |= out
            results[scorer.graph_name] = {"scoring": scorer.method, **r} | ({"ray_workers": workers} if ray_address else {})
            del scorer  # one graph's weights in memory at a time
    _print(task, results, spec)
    doc = {"bundle": str(bundle), "task": task, "backend": backend, "limit": limit,
           "method": spec.method if spec else {}, "graphs": results}
    if spec is not None:
        doc["examples"] = [{"where": e.where, "candidates": list(e.candidates), "label": e.label} for e in spec.examples]
    with user_errors(OSError):
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)  # never a half-written report
    click.echo(f"report: {path}")


def _speed(encoded, seconds: float, total: int) -> dict:
    positions = sum(len(p) + len(s) - 1 for ex in encoded for p, s in ex)
    return {"seconds": round(seconds, 3), "examples_per_s": len(encoded) / seconds,
            "candidate_tokens_per_s": positions / seconds, "projected_full_s": seconds * total / len(encoded),
            "examples_in_file": total}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _print(task: str, results: dict, spec) -> None:
    console = Console()
    table = Table(title=f"cpm-eval {task}")
    if spec is None:
        for col in ("graph", "perplexity", "tokens", "lines/s", "scoring"):
            table.add_column(col)
        for g, r in results.items():
            table.add_row(g, f"{r['perplexity']:.3f}", str(r["tokens"]), f"{r['lines_per_s']:.1f}", r["scoring"])
        console.print(table)
        return
    for col in ("graph", "accuracy", "examples", "agreement", "ex/s", "tokens/s", "scoring"):
        table.add_column(col)
    for g, r in results.items():
        agree = f"{r['agreement_with_first']:.1%}" if "agreement_with_first" in r else "-"
        table.add_row(g, f"{r['accuracy']:.4f}", str(r["examples"]), agree, f"{r['examples_per_s']:.1f}",
                      f"{r['candidate_tokens_per_s']:.0f}", r["scoring"])
    first = next(iter(results.values()))
    if "per_label" in first:
        labels = Table(title="per label (first graph)")
        for col in ("label", "examples", "correct", "predicted"):
            labels.add_column(col)
        for name, c in first["per_label"].items():
            labels.add_row(name, str(c["examples"]), str(c["correct"]), str(c["predicted"]))
        console.print(labels)
    console.print(table)
    method = ", ".join(f"{k} {v}" for k, v in spec.method.items() if k != "source" and v is not None)
    console.print(f"method: {method} ({spec.method['source']})")
    if spec.total > first["examples"]:
        for g, r in results.items():
            console.print(f"{g}: all {spec.total} examples would take about {_duration(r['projected_full_s'])} "
                          f"at this speed")


class _RayScorer:
    """The examples in shards over Ray worker actors, each with its own scorer; what classify returns."""

    def __init__(self, bundle: Path, graph, method, batch, threads, address, workers, worker_cpus):
        from ..runtime import Bundle, CPMTokenizer
        from .run_file import connect

        self.ray, self.ray_job = connect(address)
        b = Bundle.open(bundle, verify=False)
        self.tokenizer, self.n_positions = CPMTokenizer(b.tokenizer_path), b.config["n_positions"]
        actor = self.ray_job.ScoringWorker.options(num_cpus=worker_cpus)
        self.pool = [actor.remote(str(bundle.absolute()), graph, method, batch, threads or max(1, int(worker_cpus)),
                                  True) for _ in range(workers)]
        info = self.ray.get(self.pool[0].info.remote())
        self.graph_name, self.method = info["graph"], f"{info['method']}, on Ray"

    def classify(self, encoded, on_progress=None) -> dict:
        from ..runtime.eval.tasks import EXAMPLES_PER_CALL, decided

        scores = []
        chunks = self.ray_job.chunked(encoded, 4 * EXAMPLES_PER_CALL)
        for part in self.ray_job.ordered(self.pool, chunks, lambda w, c: w.run.remote(c)):
            scores += part
            if on_progress:
                on_progress(len(scores), len(encoded))
        return decided(scores)

    def __del__(self):
        for a in getattr(self, "pool", []):
            self.ray.kill(a)
