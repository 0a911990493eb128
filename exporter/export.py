"""cpm-export's pipeline: checkpoint -> verified ONNX bundle (manifest, graph, data, tokenizer)."""

from __future__ import annotations

import gc
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from .. import __version__
from ..runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from ..runtime.session import OnnxRuntimeRunner
from .external_data import ExternalDataWriter
from .load import load_checkpoint
from .onnx_graph import DIMS, build_decoder, io_spec, nodes_per_layer
from .staging import check_output, staged_dir
from .verify import CASES, reference, run_parity

GRAPH_FILE = "decoder.onnx"
DATA_FILE = "decoder.onnx.data"
# (manifest key, file, last_logits_only): the HF-contract graph, and the one generation uses
GRAPHS = (("decoder", GRAPH_FILE, False), ("decoder_last", "decoder_last.onnx", True))

# stage name, done, total
ProgressFn = Callable[[str, int, int], None]


class ParityError(RuntimeError):
    def __init__(self, report: dict):
        self.report = report
        bad = [c for c in report["cases"] if not c["passed"]]
        super().__init__(
            f"parity check failed on {len(bad)} of {len(report['cases'])} cases "
            f"(logits max abs diff {report['logits_max_abs_diff']:.3g}, atol {report['atol']}, rtol {report['rtol']}); "
            "no bundle was written"
        )


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17
    atol: float = 1e-4
    rtol: float = 1e-3
    tokenizer: Path | None = None
    n_heads: int | None = None
    overwrite: bool = False
    threads: int | None = None


def tool_versions() -> dict:
    import numpy
    import onnxruntime
    import torch

    return {"cpm_deploy": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}


def _io_description(cfg, last_logits_only: bool) -> dict:
    inputs, outputs = io_spec(cfg, last_logits_only)

    def describe(specs):
        return [{"name": n, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t).name,
                 "shape": [DIMS.get(d, d) for d in shape]} for n, t, shape in specs]

    return {"inputs": describe(inputs), "outputs": describe(outputs)}


def export_bundle(src: Path, out: Path, options: ExportOptions = ExportOptions(),
                  progress: ProgressFn | None = None) -> dict:
    """Export ``src`` to the bundle folder ``out``; returns the manifest. Raises ParityError on a miss."""
    src, out = Path(src), Path(out)
    check_output(out.absolute(), options.overwrite)
    if options.tokenizer is not None and not Path(options.tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer model {options.tokenizer} not found")
    step = progress or (lambda *a: None)
    t0 = time.perf_counter()

    ckpt = load_checkpoint(src, options.n_heads, lambda d, n: step("load", d, n))
    cfg, source_format = ckpt.config, ckpt.format
    tokenizer = Path(options.tokenizer) if options.tokenizer else ckpt.tokenizer
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer model (spiece.model or chinese_vocab.model) beside {src}; "
                                "pass --tokenizer FILE")
    t_load = time.perf_counter()

    expected = []
    for i, case in enumerate(CASES):
        expected.append(reference(ckpt.model, case))
        step("reference", i + 1, len(CASES))

    with staged_dir(out, options.overwrite) as tmp:
        writer = ExternalDataWriter(tmp / DATA_FILE)
        params = dict(ckpt.model.state_dict())
        graphs = {}
        for key, file, last_only in GRAPHS:  # the second graph reuses the data already written
            model = build_decoder(cfg, lambda name: params[name].numpy(), writer, options.opset,
                                  on_layer=lambda i: step("export", i + 1, cfg.n_layer), last_logits_only=last_only)
            onnx.save(model, tmp / file)
            onnx.checker.check_model(str(tmp / file))  # by path: external data is found, not loaded
            graphs[key] = {"file": file, "data": DATA_FILE, "precision": "fp32", "opset": options.opset,
                           "logits": "last" if last_only else "all", "io": _io_description(cfg, last_only),
                           "nodes": nodes_per_layer(model)}
            del model
        data_sha = writer.close()
        del params, ckpt  # free the torch weights before onnxruntime loads its own copy
        gc.collect()
        t_export = time.perf_counter()

        for key, info in graphs.items():
            runner = OnnxRuntimeRunner(tmp / info["file"], threads=options.threads, optimize=False)
            info["parity"] = run_parity(expected, runner.infer, options.atol, options.rtol,
                                        on_case=lambda d, n, k=key: step(f"verify {k}", d, n))
            del runner
            if not info["parity"]["passed"]:
                raise ParityError(info["parity"])
        t_verify = time.perf_counter()

        files = {DATA_FILE: data_sha}
        shutil.copyfile(tokenizer, tmp / tokenizer.name)
        tok_entry = {"file": tokenizer.name}
        vocab = tokenizer.parent / "vocab.json"
        if vocab.is_file():
            shutil.copyfile(vocab, tmp / "vocab.json")
            tok_entry["vocab"] = "vocab.json"
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": tool_versions(),
            "source": {"path": str(src.absolute()), "format": source_format},
            "model": cfg.to_dict(),
            "special_tokens": {"eod": cfg.eod_id},
            "tokenizer": tok_entry,
            "graphs": graphs,
            "timings_s": {"load": round(t_load - t0, 2), "export": round(t_export - t_load, 2),
                          "verify": round(t_verify - t_export, 2)},
        }
        manifest["files"] = {
            p.name: {"bytes": p.stat().st_size, "sha256": files.get(p.name) or sha256_file(p)}
            for p in sorted(tmp.iterdir())
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest
