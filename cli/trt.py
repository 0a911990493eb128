"""cpm-trt: TensorRT engines for a bundle (preflight, build plan, build)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..runtime.bundle.reader import GENERATION_GRAPH
from .common import stage_progress, user_errors

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
def main():
    """TensorRT engines for cpm-deploy bundles.

    Engines are tied to a GPU architecture and a TensorRT release: export the bundle anywhere,
    then build the engine on the machine (and TensorRT) it will run on. V100 needs TensorRT 10.4
    or 8.6 (`pip install 'cpm-deploy[tensorrt]'`).
    """


@main.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--tensorrt", "version", default="10.4.0", show_default=True, help="TensorRT release to check against.")
@click.option("-g", "--graph", default=GENERATION_GRAPH, show_default=True, help="Graph file in the bundle.")
def preflight(bundle, version, graph):
    """Check, without a GPU, that TensorRT's ONNX parser will take the bundle's graph.

    \b
    Example:
      cpm-trt preflight ./cpm-bundle --tensorrt 8.6.1
    """
    from ..optimize.tensorrt.preflight import preflight as run
    from ..runtime.bundle.reader import Bundle

    with user_errors(FileNotFoundError):
        b = Bundle.open(bundle, verify=False)
        if graph not in b.manifest["files"]:
            raise FileNotFoundError(f"{graph} is not a file of {bundle}")
        report = run(b.resolve(graph), version)
    table = Table(title=f"{graph}: ops for TensorRT {version}")
    table.add_column("op")
    table.add_column("count")
    for op, n in sorted(report.ops.items()):
        table.add_row(op, str(n))
    Console().print(table)
    if not report.ok:
        raise click.ClickException("preflight found problems:\n  " + "\n  ".join(report.problems))
    click.echo(f"ok: every op, type, dimension and data file of {graph} is accepted by TensorRT {version}'s parser table")


def _cc(value: str):
    if value == "native":
        return None
    try:
        major, minor = value.split(".")
        return int(major), int(minor)
    except ValueError:
        raise click.BadParameter("use MAJOR.MINOR (7.0 for V100) or 'native'") from None


@main.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-b", "--max-batch", type=click.IntRange(1, 256), default=1, show_default=True, help="Largest batch.")
@click.option("-p", "--max-prompt", type=click.IntRange(1), help="Longest prompt in tokens (default: 512, or less).")
@click.option("-t", "--max-total", type=click.IntRange(2),
              help="Longest prompt + generation in tokens (default: the model's positions, 1024 for CPM).")
@click.option("-w", "--workspace", type=click.FloatRange(0.25), default=4.0, show_default=True, help="Workspace limit, GiB.")
@click.option("--compute-capability", "cc", default="7.0", show_default=True,
              help="GPU architecture the engine is for (7.0 = V100) or 'native' (this GPU).")
@click.option("-n", "--dry-run", is_flag=True, help="Print the plan and the equivalent trtexec command; build nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON.")
def build(bundle, max_batch, max_prompt, max_total, workspace, cc, dry_run, as_json):
    """Build an fp16 TensorRT engine from BUNDLE's standard-op decoder, into the bundle.

    Two optimization profiles: the context phase (whole prompt, empty past) and the generation
    phase (one token with past). LayerNorm, softmax and the tensors the bundle's fp16 range report
    flags stay in fp32. The timing cache is kept next to the engine; the manifest records the
    engine's TensorRT version, GPU, compute capability and profiles.

    \b
    Examples:
      cpm-trt build ./cpm-bundle --dry-run
      cpm-trt build ./cpm-bundle --max-batch 4 --max-prompt 256 --max-total 512
    """
    from ..optimize.tensorrt.build import build_into_bundle
    from ..optimize.tensorrt.plan import make_plan
    from ..runtime.bundle.reader import Bundle

    with user_errors():
        b = Bundle.open(bundle, verify=not dry_run)
        plan = make_plan(b.path, b.manifest, max_batch, max_prompt, max_total, workspace, _cc(cc))
    if dry_run:
        click.echo(json.dumps(plan.to_dict(), indent=2) if as_json else describe(plan))
        return
    with user_errors():
        with stage_progress({}) as step:
            meta = build_into_bundle(b.path, plan, progress=step)
    click.echo(f"wrote {plan.engine} ({meta['build_seconds']} s, TensorRT {meta['tensorrt']}, {meta['gpu']})")


def describe(plan) -> str:
    gib = 1 << 30
    lines = [f"graph        {plan.graph}", f"engine       {plan.engine}", f"timing cache {plan.timing_cache}",
             f"target       compute capability {'.'.join(map(str, plan.target_compute_capability or ('native',)))}",
             f"precision    fp16; fp32 kept for {len(plan.fp32_nodes)} node(s): every "
             + ", ".join(plan.fp32_op_types) + " and what the fp16 range report flags",
             f"kv cache     {'fp16' if plan.kv_fp16 else 'fp32'} at the engine's inputs and outputs"]
    for p in plan.profiles:
        lines.append(f"profile      {p.name}:")
        for name in ("input_ids", "attention_mask", "past_key_values.0.key"):
            lo, opt, hi = p.shapes[name]
            lines.append(f"               {name:<22} min {lo}  opt {opt}  max {hi}")
    mem = plan.memory_estimate
    lines.append("memory       " + ", ".join(f"{k.removesuffix('_bytes')} {v / gib:.2f} GiB" for k, v in mem.items()))
    lines.append("trtexec      " + plan.trtexec())
    return "\n".join(lines)
