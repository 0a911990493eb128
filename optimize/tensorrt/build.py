"""The engine build, against TensorRT's Python API (10.4; 8.6 where noted), imported lazily.

Everything it decides comes from the BuildPlan; this module only applies the plan to the API.
Never executed on the machines that wrote it (no TensorRT, no GPU there): the tests drive it with a
recording stand-in for the ``tensorrt`` module, so the calls and their arguments are checked, not
TensorRT's behaviour.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import OptimizeError
from ...runtime.backends.cuda import device, import_tensorrt
from .plan import BuildPlan
from ...runtime.backends.tensorrt_versions import check_build, parse


class BuildError(OptimizeError, RuntimeError):
    pass


def _progress_monitor(trt, report: Callable[[str, int, int], None]):
    """An IProgressMonitor that forwards (phase, step, steps) to ``report`` (TensorRT >= 10.0)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            report(phase_name, 0, num_steps)

        def step_complete(self, phase_name, step):
            report(phase_name, step + 1, self.steps.get(phase_name, step + 1))
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            n = self.steps.pop(phase_name, 0)
            report(phase_name, n, n)

    return Monitor()


def keep_fp32(layer, trt, plan: BuildPlan) -> bool:
    types = {"LayerNormalization": trt.LayerType.NORMALIZATION, "Softmax": trt.LayerType.SOFTMAX}
    if layer.type in {types[t] for t in plan.fp32_op_types if t in types}:
        return True
    return any(layer.name == n or layer.name.startswith(n + "_") or layer.name.startswith(n + "/") for n in plan.fp32_nodes)


def build_engine(plan: BuildPlan, progress: Callable[[str, int, int], None] | None = None, trt=None,
                 gpu: dict | None = None) -> dict:
    """Build and write the engine and its timing cache; returns the engine's metadata."""
    trt = trt or import_tensorrt()
    gpu = gpu or device()
    check_build(trt.__version__, gpu["compute_capability"])
    if plan.target_compute_capability and tuple(gpu["compute_capability"]) != tuple(plan.target_compute_capability):
        want = ".".join(map(str, plan.target_compute_capability))
        raise BuildError(f"the plan targets compute capability {want} but this GPU ({gpu['name']}) is "
                         f"{gpu['compute_capability'][0]}.{gpu['compute_capability'][1]}; engines are built on the GPU "
                         "they run on (pass --compute-capability native to build for this one)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0 if parse(trt.__version__) >= (10, 0) else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.graph)):  # resolves the external data beside the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {plan.graph.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    fp32_layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if keep_fp32(layer, trt, plan):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            fp32_layers.append(layer.name)
    if plan.kv_fp16:  # the cache crosses the engine boundary in fp16
        for tensors in ([network.get_input(i) for i in range(network.num_inputs)],
                        [network.get_output(i) for i in range(network.num_outputs)]):
            for t in tensors:
                if t.name.startswith(("past_key_values.", "present.")):
                    t.dtype = trt.float16
    for p in plan.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache_bytes = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    if progress is not None and parse(trt.__version__) >= (10, 0):
        config.progress_monitor = _progress_monitor(trt, progress)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT returned no engine; its log above says why (often: workspace too small "
                         "for the largest profile, or a layer without an fp16/fp32 kernel)")
    _write_atomic(plan.engine, bytes(serialized))
    _write_atomic(plan.timing_cache, bytes(config.get_timing_cache().serialize()))
    return {
        "file": plan.engine.name, "timing_cache": plan.timing_cache.name, "tensorrt": trt.__version__,
        "gpu": gpu["name"], "compute_capability": list(gpu["compute_capability"]), "precision": "fp16",
        "fp32_layers": fp32_layers, "kv_dtype": "fp16" if plan.kv_fp16 else "fp32",
        "profiles": [{"name": p.name, "shapes": p.shapes} for p in plan.profiles], "limits": plan.limits,
        "build_seconds": round(time.perf_counter() - t0, 1),
    }


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_into_bundle(bundle_dir: Path, plan: BuildPlan, progress=None, trt=None, gpu=None) -> dict:
    """Build, then record the engine and its timing cache in the bundle's manifest (with checksums)."""
    from ...runtime.bundle.reader import file_entry, update_manifest

    meta = build_engine(plan, progress, trt, gpu)
    key = plan.engine.stem

    def record(manifest):
        manifest.setdefault("engines", {})[key] = meta
        for f in (plan.engine, plan.timing_cache):
            manifest["files"][f.name] = file_entry(f)

    update_manifest(bundle_dir, record)
    return meta
