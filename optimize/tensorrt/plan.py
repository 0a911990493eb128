"""The engine build plan: optimization profiles, precision policy, memory. GPU-free, and the very
object the real build consumes, so what --dry-run prints is what a build does."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import OptimizeError
from ...runtime.bundle.reader import GENERATION_GRAPH as GRAPH  # standard ops, last position; fp32 in, fp16 by the builder
FP32_OP_TYPES = ("LayerNormalization", "Softmax")


class PlanError(OptimizeError, ValueError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict  # input name -> (min, opt, max), each a list of dims


@dataclass
class BuildPlan:
    graph: Path
    engine: Path
    timing_cache: Path
    profiles: list[Profile]
    fp32_op_types: tuple[str, ...] = FP32_OP_TYPES
    fp32_nodes: tuple[str, ...] = ()  # the fp32 op types' nodes and those the fp16 range report flags
    kv_fp16: bool = True  # past/present I/O in fp16: half the cache memory and traffic
    workspace_bytes: int = 4 << 30
    target_compute_capability: tuple[int, int] | None = (7, 0)
    limits: dict = field(default_factory=dict)
    memory_estimate: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(graph=str(self.graph), engine=str(self.engine), timing_cache=str(self.timing_cache))
        return d

    def trtexec(self) -> str:
        """The equivalent trtexec command line (one --minShapes/--optShapes/--maxShapes set per profile)."""
        cmd = ["trtexec", f"--onnx={self.graph}", f"--saveEngine={self.engine}", "--fp16",
               "--precisionConstraints=obey", f"--memPoolSize=workspace:{self.workspace_bytes >> 20}M",
               f"--timingCacheFile={self.timing_cache}"]
        cmd.append("--layerPrecisions=" + ",".join(f"{n}:fp32" for n in self.fp32_nodes))  # layers carry node names
        if self.kv_fp16:  # every input / output in graph order: ids, mask, positions, then the cache
            n_kv = len(self.profiles[0].shapes) - 3
            cmd.append("--inputIOFormats=" + ",".join(["int64:chw"] * 3 + ["fp16:chw"] * n_kv))
            cmd.append("--outputIOFormats=" + ",".join(["fp32:chw"] + ["fp16:chw"] * n_kv))
        for p in self.profiles:
            for i, kind in enumerate(("minShapes", "optShapes", "maxShapes")):
                spec = ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in p.shapes.items())
                cmd.append(f"--{kind}={spec}")
        return " ".join(shlex.quote(c) for c in cmd)


def make_plan(bundle_dir: Path, manifest: dict, max_batch: int = 1, max_prompt: int | None = None,
              max_total: int | None = None,
              workspace_gib: float = 4, compute_capability: tuple[int, int] | None = (7, 0),
              fp32_nodes: tuple[str, ...] | None = None) -> BuildPlan:
    cfg = manifest["model"]
    max_total = cfg["n_positions"] if max_total is None else max_total
    max_prompt = min(512, max_total - 1) if max_prompt is None else max_prompt
    if not 1 <= max_batch <= 256:
        raise PlanError(f"max batch {max_batch} out of range 1..256")
    if max_total > cfg["n_positions"]:
        raise PlanError(f"max total length {max_total} exceeds the model's {cfg['n_positions']} positions")
    if not 1 <= max_prompt <= max_total - 1:
        raise PlanError(f"max prompt {max_prompt} must be between 1 and max total - 1 ({max_total - 1})")
    nh, hd, L = cfg["n_head"], cfg["n_embd"] // cfg["n_head"], cfg["n_layer"]
    profiles = [context_profile(L, nh, hd, max_batch, max_prompt), generation_profile(L, nh, hd, max_batch, max_total)]
    for p in profiles:
        check_profile(p, L)
    if fp32_nodes is None:
        fp32_nodes = flagged_nodes(bundle_dir)
    fp32_nodes = tuple(dict.fromkeys(nodes_of_types(bundle_dir / GRAPH, FP32_OP_TYPES) + tuple(fp32_nodes)))
    cc = compute_capability
    tag = f"sm{cc[0]}{cc[1]}" if cc else "native"
    plan = BuildPlan(graph=bundle_dir / GRAPH, engine=bundle_dir / f"decoder_trt_fp16_{tag}.engine",
                     timing_cache=bundle_dir / f"decoder_trt_fp16_{tag}.timing.cache", profiles=profiles,
                     fp32_nodes=tuple(fp32_nodes), workspace_bytes=int(workspace_gib * (1 << 30)),
                     target_compute_capability=cc,
                     limits={"max_batch": max_batch, "max_prompt": max_prompt, "max_total": max_total})
    plan.memory_estimate = estimate_memory(cfg, max_batch, max_total, plan.workspace_bytes, plan.kv_fp16)
    return plan


def _inputs(L: int, batch, seq, total, past, nh: int, hd: int) -> dict:
    shapes = {"input_ids": [batch, seq], "attention_mask": [batch, total], "position_ids": [batch, seq]}
    for i in range(L):
        for kind in ("key", "value"):
            shapes[f"past_key_values.{i}.{kind}"] = [batch, nh, past, hd]
    return shapes


def _profile(name, L, nh, hd, points) -> Profile:
    per_point = [_inputs(L, *pt, nh, hd) for pt in points]  # points: (batch, seq, total, past) min/opt/max
    return Profile(name, {k: tuple(p[k] for p in per_point) for k in per_point[0]})


def context_profile(L, nh, hd, max_batch, max_prompt) -> Profile:
    """The prompt, with an empty past: total = seq, past = 0."""
    opt = min(128, max_prompt)
    return _profile("context", L, nh, hd, [(1, 1, 1, 0), (max_batch, opt, opt, 0), (max_batch, max_prompt, max_prompt, 0)])


def generation_profile(L, nh, hd, max_batch, max_total) -> Profile:
    """One token with past: seq = 1, total = past + 1."""
    opt = max_total // 2
    return _profile("generation", L, nh, hd, [(1, 1, 2, 1), (max_batch, 1, opt, opt - 1),
                                               (max_batch, 1, max_total, max_total - 1)])


def check_profile(profile: Profile, n_layer: int) -> None:
    """The classic build failure: shapes that disagree between inputs at min, opt or max."""
    s = profile.shapes
    for i, point in enumerate(("min", "opt", "max")):
        ids, mask, pos = s["input_ids"][i], s["attention_mask"][i], s["position_ids"][i]
        batch = {ids[0], mask[0], pos[0]} | {s[f"past_key_values.{j}.{k}"][i][0] for j in range(n_layer) for k in ("key", "value")}
        if len(batch) != 1:
            raise PlanError(f"{profile.name} profile, {point}: batch sizes disagree {sorted(batch)}")
        if ids != pos:
            raise PlanError(f"{profile.name} profile, {point}: position_ids {pos} != input_ids {ids}")
        pasts = {s[f"past_key_values.{j}.{k}"][i][2] for j in range(n_layer) for k in ("key", "value")}
        if len(pasts) != 1 or mask[1] != pasts.pop() + ids[1]:
            raise PlanError(f"{profile.name} profile, {point}: attention_mask length {mask[1]} != past + seq")
    for name, (lo, opt, hi) in s.items():
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise PlanError(f"{profile.name} profile: {name} min/opt/max out of order {lo} {opt} {hi}")


def nodes_of_types(graph: Path, op_types) -> tuple[str, ...]:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return tuple(n.name for n in model.graph.node if n.op_type in op_types)


def flagged_nodes(bundle_dir: Path) -> tuple[str, ...]:
    """Nodes the fp16 range report flags (kept in fp32); none when the bundle has no report."""
    report = Path(bundle_dir) / "fp16_ranges.json"
    if not report.is_file():
        return ()
    return tuple(r["node"] for r in json.loads(report.read_text())["flagged"] if r.get("node"))


def estimate_memory(cfg: dict, max_batch: int, max_total: int, workspace: int, kv_fp16: bool) -> dict:
    H, L, V = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
    params = V * H + cfg["n_positions"] * H + L * (12 * H * H + 13 * H) + 2 * H
    kv_bytes = 2 if kv_fp16 else 4
    # the runtime keeps two buffers per past/present (ping-pong), each at the maximum length
    kv = 2 * 2 * L * max_batch * max_total * H * kv_bytes
    est = {"weights_fp16_bytes": params * 2, "kv_cache_bytes": kv, "workspace_bytes": workspace,
           "logits_bytes": max_batch * V * 4}
    est["total_bytes"] = sum(est.values())
    return est
