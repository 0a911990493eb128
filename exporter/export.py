"""cpm-export's pipeline: checkpoint -> verified ONNX bundle (manifest, graph, data, tokenizer)."""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from .. import __version__
from ..optimize import kv_int8, score_graph, variants
from ..optimize.quantize import BLOCK_SIZE
from ..runtime.bundle.reader import (BASE_DATA, FORMAT, FORMAT_VERSION, FULL_GRAPH, GENERATION_GRAPH, HF_CONFIG, MANIFEST,
                              sha256_file)
from ..runtime.backends.session import OnnxRuntimeRunner
from ..runtime.text.tokenizer import DEFAULT_VOCAB, CPMTokenizer
from .config import ConfigError
from .external_data import ExternalDataWriter
from .kv_calibration import calibration_rows, kv_scales, read_calibration
from .load import load_checkpoint
from .onnx_graph import DIMS, build_decoder, io_spec, nodes_per_layer
from .staging import check_output, staged_dir
from .errors import ParityError
from .quality import QualityGate
from .verify import CASES, reference, run_parity

# (manifest key, file, last_logits_only): the HF-contract graph, and the one generation uses
GRAPHS = (("decoder", FULL_GRAPH, False), ("decoder_last", GENERATION_GRAPH, True))

# stage name, done, total
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17
    atol: float = 1e-4
    rtol: float = 1e-3
    tokenizer: Path | None = None
    n_heads: int | None = None
    overwrite: bool = False
    threads: int | None = None
    variants: tuple[tuple[str, str], ...] = (("cpu", "fp32"),)  # (target, precision); first is the default
    variants_only: bool = False  # ship only the variants (the standard graphs are still built and verified)
    max_kl: float | None = None  # a looser (or tighter) KL gate for fp16/int8/int4 variants than GATES
    fallback: bool = True  # int8/int4 missing the gate: hold back the MatMuls that cost the accuracy
    int4_prefill: bool = True  # cpu-int4 runs prompts on the int8 graph (built for it when not asked for)
    int4_block_size: int = BLOCK_SIZE  # cpu-int4's 4-bit weight blocks: 32, 64 or 128 (faster decode, coarser weights)
    kv_cache: str = "fp32"  # "int8": the CPU shared-KV graphs keep an int8 cache with calibrated scales
    kv_calibration: Path | None = None  # text (one per line) the int8 cache's scales are calibrated on


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
    variants.check_int4_block_size(options.int4_block_size)
    if options.kv_cache not in ("fp32", "int8"):
        raise variants.VariantError(f"unknown KV cache type {options.kv_cache!r}; choose fp32 or int8")
    if options.kv_cache == "int8" and not any(t == "cpu" for t, _ in options.variants):
        raise variants.VariantError("--kv-cache int8 applies to the CPU graphs: export -P fp32, int8 or int4 for "
                                    "--target cpu")
    if options.tokenizer is not None and not Path(options.tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer model {options.tokenizer} not found")
    step = progress or (lambda *a: None)
    t0 = time.perf_counter()

    ckpt = load_checkpoint(src, options.n_heads, lambda d, n: step("load", d, n))
    cfg, source_format = ckpt.config, ckpt.format
    tokenizer = Path(options.tokenizer) if options.tokenizer else ckpt.tokenizer
    if tokenizer is None:
        tokenizer = DEFAULT_VOCAB
        logging.getLogger("cpm_deploy").warning(
            "no spiece.model or chinese_vocab.model beside %s: using CPM's vocabulary shipped with cpm-deploy "
            "(--tokenizer FILE picks another)", src)
    _check_vocabularies(tokenizer, cfg.vocab_size)
    t_load = time.perf_counter()

    expected = []
    for i, case in enumerate(CASES):
        expected.append(reference(ckpt.model, case))
        step("reference", i + 1, len(CASES))
    kv8 = _calibrate_kv_cache(ckpt.model, cfg, tokenizer, options, step) if options.kv_cache == "int8" else None

    with staged_dir(out, options.overwrite) as tmp:
        graphs, data_sha = _write_base_graphs(tmp, ckpt, options.opset, step)
        del ckpt  # free the torch weights before onnxruntime loads its own copy
        gc.collect()
        t_export = time.perf_counter()
        _verify_base_graphs(tmp, graphs, expected, options, step)
        t_verify = time.perf_counter()
        ranges = _fp16_ranges(tmp, expected, tokenizer, step) if any(p == "fp16" for _, p in options.variants) else None
        gate = QualityGate(tmp, cfg.to_dict(), expected, options.max_kl, options.fallback, options.threads)
        _build_variants(tmp, graphs, cfg.n_layer, gate, options, step)
        if kv8 is not None:
            _int8_caches(tmp, graphs, gate, *kv8, step)
        _add_score_graphs(tmp, graphs, gate, tokenizer, options, step)
        t_variants = time.perf_counter()

        tok_entry = _copy_tokenizer(tokenizer, tmp, cfg.n_positions)
        # GPT-2 config beside decoder.onnx: Hugging Face tools (Optimum) load the bundle as it is
        (tmp / HF_CONFIG).write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
        left_out = _drop_standard_graphs(tmp, graphs) if options.variants_only and options.variants else {}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": tool_versions(),
            "source": {"path": str(src.absolute()), "format": source_format},
            "model": cfg.to_dict(),
            "special_tokens": {"eod": cfg.eod_id},
            "tokenizer": tok_entry,
            "graphs": graphs,
            "default_graph": "-".join(options.variants[0]) if options.variants else "decoder_last",
            "left_out": left_out,
            "fp16_ranges": {"file": "fp16_ranges.json", "flagged": len(ranges["flagged"])} if ranges else None,
            "timings_s": {"load": round(t_load - t0, 2), "export": round(t_export - t_load, 2),
                          "verify": round(t_verify - t_export, 2), "variants": round(t_variants - t_verify, 2)},
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": data_sha if p.name == BASE_DATA else sha256_file(p)}
                      for p in sorted(tmp.iterdir())},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _write_base_graphs(folder: Path, ckpt, opset: int, step) -> tuple[dict, str]:
    """Both standard graphs; the weights stream once into the data file the two share."""
    cfg = ckpt.config
    writer = ExternalDataWriter(folder / BASE_DATA)
    params = dict(ckpt.model.state_dict())
    graphs = {}
    for key, file, last_only in GRAPHS:  # the second graph reuses the data already written
        model = build_decoder(cfg, lambda name: params[name].numpy(), writer, opset,
                              on_layer=lambda i: step("export", i + 1, cfg.n_layer), last_logits_only=last_only)
        onnx.save(model, folder / file)
        onnx.checker.check_model(str(folder / file))  # by path: external data is found, not loaded
        graphs[key] = {"file": file, "data": BASE_DATA, "precision": "fp32", "opset": opset,
                       "logits": "last" if last_only else "all", "io": _io_description(cfg, last_only),
                       "nodes": nodes_per_layer(model)}
    return graphs, writer.close()


def _drop_standard_graphs(folder: Path, graphs: dict) -> dict:
    """--variants-only: remove the standard graphs (their verification stays on record), and their
    files unless a variant reads them (trt-fp32 is decoder_last.onnx; cpu-fp32 reads its data)."""
    standard = {key for key, _, _ in GRAPHS}
    kept = [g for k, g in graphs.items() if k not in standard]
    needed = {name for g in kept for name in (g["file"], g.get("data")) if name}
    dropped = {}
    for key, file, _ in GRAPHS:
        entry = graphs.pop(key)
        dropped[key] = {"file": file, "parity": entry["parity"], "nodes": entry["nodes"], "opset": entry["opset"]}
        for name in (file, BASE_DATA):
            if name not in needed and (folder / name).exists():
                (folder / name).unlink()
    return dropped


def _verify_base_graphs(folder: Path, graphs: dict, expected, options: ExportOptions, step) -> None:
    for key, info in graphs.items():
        runner = OnnxRuntimeRunner(folder / info["file"], threads=options.threads, optimize=False)
        info["parity"] = run_parity(expected, runner.infer, options.atol, options.rtol,
                                    on_case=lambda d, n, k=key: step(f"verify {k}", d, n))
        del runner  # one onnxruntime copy of the weights at a time
        if not info["parity"]["passed"]:
            raise ParityError(info["parity"])


def _build_order(options: ExportOptions) -> list[tuple[str, str]]:
    """The requested variants, cpu-int8 first when cpu-int4 runs its prompts on it (added if not asked)."""
    order = list(options.variants)
    if ("cpu", "int4") in order and options.int4_prefill:
        order = [("cpu", "int8")] + [v for v in order if v != ("cpu", "int8")]
    return order


def _build_variants(folder: Path, graphs: dict, n_layer: int, gate: QualityGate, options: ExportOptions, step) -> None:
    for target, precision in _build_order(options):
        key = f"{target}-{precision}"
        step(f"variant {key}", 0, 2)
        prefill = _int8_prefill(graphs) if key == "cpu-int4" and options.int4_prefill else None

        def build(keep=None):
            return variants.build(folder, target, precision, n_layer, keep=keep, prefill=prefill,
                                  int4_block_size=options.int4_block_size)

        variant = build()
        step(f"variant {key}", 1, 2)
        same_file = next((g for g in graphs.values() if g["file"] == variant.file and "parity" in g), None)
        entry = gate.entry(variant, same_file["parity"] if same_file else None)
        step(f"variant {key}", 2, 2)
        graphs[key] = gate.enforce(key, _label(key, options), variant, entry, build,
                                   lambda d: step(f"{key}: holding back", d, d + 1))
    for key in dict.fromkeys(f"{t}-{p}" for t, p in [*options.variants, ("cpu", "int8")]):  # as asked, then int8
        if key in graphs:
            graphs[key] = graphs.pop(key)


def _add_score_graphs(folder: Path, graphs: dict, gate: QualityGate, tokenizer: Path, options: ExportOptions,
                      step) -> None:
    """Each CPU shared-KV graph's scoring twin (cpm-eval's one pass), checked against the reference
    through the runtime scorer that will run it."""
    from ..runtime.eval.scoring import OnePassScorer

    tok = CPMTokenizer(tokenizer)
    for key, entry in graphs.items():
        if entry.get("target") != "cpu" or entry.get("kv_cache") != "shared":
            continue
        step(f"score graph {key}", 0, 1)
        file = score_graph.build(folder, entry["file"])
        scorer = OnePassScorer(folder / file, tok, gate.config, key, 8, threads=options.threads)
        kv8 = entry.get("kv_dtype") == "int8" and entry["precision"] == "fp32"
        report = gate.check_score(key, "kv-int8" if kv8 else entry["precision"], scorer.logprobs)
        del scorer
        entry["score"] = {"file": file, "data": entry["data"], "parity": report}
        step(f"score graph {key}", 1, 1)


def _calibrate_kv_cache(model, cfg, tokenizer: Path, options: ExportOptions, step) -> tuple[dict, list]:
    """The int8 cache's scales (from the reference model on calibration text) and the rows its gate
    runs along (other text, other random ids)."""
    tok = CPMTokenizer(tokenizer)
    lines = read_calibration(options.kv_calibration) if options.kv_calibration else None
    step("KV cache calibration", 0, 1)
    scales = kv_scales(model, calibration_rows(tok, cfg.n_positions, cfg.vocab_size, lines))
    step("KV cache calibration", 1, 1)
    return scales, calibration_rows(tok, cfg.n_positions, cfg.vocab_size, SAMPLE_TEXT, seed=1)


def _int8_caches(folder: Path, graphs: dict, gate: QualityGate, scales: dict, rows: list, step) -> None:
    """--kv-cache int8: each CPU shared-KV graph is rewritten to keep an int8 cache and checked against
    its fp32 cache (with its prompt graph's int8 twin, which shares its buffers); all pass, or no bundle."""
    keys = [k for k, g in graphs.items() if g.get("target") == "cpu" and g.get("kv_cache") == "shared"]
    built = {graphs[k]["file"]: kv_int8.build(folder, graphs[k]["file"], scales) for k in keys}
    reports = {}
    for i, key in enumerate(keys):
        step("int8 KV cache", i, len(keys))
        g = graphs[key]
        twin = {"file": built[g["file"]]} | ({"prefill": {"file": built[g["prefill"]["file"]]}} if g.get("prefill") else {})
        reports[key] = gate.kv_cache(key, g, twin, rows)
    step("int8 KV cache", len(keys), len(keys))
    for key in keys:
        graphs[key] |= {"kv_dtype": "int8", "kv_parity": reports[key]}
    for plain, twin in built.items():
        os.replace(folder / twin, folder / plain)


def _label(key: str, options: ExportOptions) -> str:
    implied = key == "cpu-int8" and ("cpu", "int8") not in options.variants
    return f"{key} (the graph cpu-int4 runs prompts on; --no-int4-prefill goes without it)" if implied else key


def _int8_prefill(graphs: dict) -> variants.Variant:
    """The built (and gated) cpu-int8 graph, as cpu-int4's prompt graph."""
    g = graphs["cpu-int8"]
    return variants.Variant("cpu-int8", "cpu", "int8", g["file"], g["data"], g["kv_cache"], {}, {})


def _check_vocabularies(tokenizer: Path, model_vocab: int) -> None:
    size = CPMTokenizer(tokenizer).vocab_size
    if size > model_vocab:
        raise ConfigError(f"the tokenizer {tokenizer.name} has {size} pieces but the model only {model_vocab} "
                          "embeddings: it is not this model's tokenizer (pass the right one with --tokenizer)")
    if size < model_vocab:
        logging.getLogger("cpm_deploy").warning(
            "the model has %d embeddings for a %d-piece tokenizer; generation never picks the %d extra ids",
            model_vocab, size, model_vocab - size)


def _copy_tokenizer(tokenizer: Path, folder: Path, n_positions: int) -> dict:
    """The sentencepiece model as spiece.model (the name Hugging Face tokenizers look for), its
    vocab.json if there is one, and the Hugging Face tokenizer files (exporter/hf_tokenizer.py,
    copied, never imported here: exports need no transformers)."""
    shutil.copyfile(tokenizer, folder / HF_SPIECE)
    entry = {"file": HF_SPIECE}
    vocab = tokenizer.parent / "vocab.json"
    if vocab.is_file():
        shutil.copyfile(vocab, folder / "vocab.json")
        entry["vocab"] = "vocab.json"
    shutil.copyfile(Path(__file__).with_name("hf_tokenizer.py"), folder / HF_TOKENIZER_CODE)
    config = {"tokenizer_class": "CPMDeployTokenizer", "model_max_length": n_positions,
              "auto_map": {"AutoTokenizer": [f"{HF_TOKENIZER_CODE.removesuffix('.py')}.CPMDeployTokenizer", None]}}
    (folder / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return entry | {"hf_config": HF_TOKENIZER_CONFIG, "hf_code": HF_TOKENIZER_CODE}


HF_SPIECE, HF_TOKENIZER_CONFIG, HF_TOKENIZER_CODE = "spiece.model", "tokenizer_config.json", "tokenization_cpm_deploy.py"
SAMPLE_TEXT = ["清华大学是中国著名的高等学府，位于北京市海淀区。", "今天天气很好，我们一起去公园散步吧。",
               "人工智能技术正在改变我们的生活和工作方式。"]


def _fp16_ranges(folder: Path, expected, tokenizer: Path, step) -> dict:
    """The fp16 range report, on real sample text and the verification inputs; written to the bundle."""
    import numpy as np

    from ..optimize.precision import range_report

    tok = CPMTokenizer(tokenizer)
    empty = {k: v[:1, :, :0] for k, v in expected[0].feeds.items() if k.startswith("past_key_values.")}
    feeds = []
    for text in SAMPLE_TEXT:
        ids = np.array([tok.encode(text)], np.int64)
        ids = np.minimum(ids, expected[0].outputs["logits"].shape[-1] - 1)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                      "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None], **empty})
    step("fp16 range report", 0, 1)
    report = range_report(folder / FULL_GRAPH, feeds + [e.feeds for e in expected])
    (folder / "fp16_ranges.json").write_text(json.dumps(report, indent=2) + "\n")
    step("fp16 range report", 1, 1)
    return report
