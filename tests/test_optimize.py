"""The fusion pipeline and the graph variants of a bundle: structure, parity, quality on real text."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from cpm_deploy.exporter import load_checkpoint
from cpm_deploy.exporter.verify import CASES, reference, run_parity
from cpm_deploy.optimize.fuse import FusionError, fuse_for_ort
from cpm_deploy.optimize.precision import range_report
from cpm_deploy.runtime import Bundle, CPMGenerator
from cpm_deploy.runtime.eval.metrics import log_softmax, next_token_logits, perplexity
from cpm_deploy.runtime.backends import open_decoder

from conftest import corpus_lines


def op_counts(path):
    model = onnx.load(str(path), load_external_data=False)
    counts = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts, model


def test_pipeline_fuses_every_layer_and_matches_the_reference(tiny_bundle, tiny_model, tmp_path):
    model = ir.load(str(tiny_bundle / "decoder_last.onnx"))
    counts = fuse_for_ort(model, tiny_model.config.n_layer)
    L = tiny_model.config.n_layer
    assert counts == {"fast_gelu": L, "fast_gelu_bias": L, "skip_layer_norm": 2 * L, "attention_to_gqa": L,
                      "last_valid_logits": 1}
    ir.save(model, str(tiny_bundle / "scratch_fused.onnx"))  # beside its data file
    try:
        ops, proto = op_counts(tiny_bundle / "scratch_fused.onnx")
        decoder = open_decoder(tiny_bundle / "scratch_fused.onnx", tiny_model.config.to_dict(), "shared")
    finally:
        (tiny_bundle / "scratch_fused.onnx").unlink()
    assert ops["GroupQueryAttention"] == L and ops["SkipLayerNormalization"] == 2 * L and ops["FastGelu"] == L
    assert not {"Softmax", "Where", "Range", "Split"} & set(ops)
    names = [i.name for i in proto.graph.input]
    assert "attention_mask" not in names and {"seqlens_k", "total_sequence_length", "query_seqlens"} <= set(names)
    report = run_parity([reference(tiny_model, c) for c in CASES], decoder.infer, 1e-3, 1e-3, shared_kv_capacity=32)
    assert report["passed"] and report["top1_agreement"] == 1.0


def test_pipeline_fails_loudly_when_attention_does_not_fuse(tiny_bundle, tiny_model):
    model = ir.load(str(tiny_bundle / "decoder_last.onnx"))
    model.graph.initializers["c/scale"].const_value = ir.tensor(np.float32(0.5))  # no longer 1/sqrt(hd)
    with pytest.raises(FusionError, match="attention_to_gqa"):
        fuse_for_ort(model, tiny_model.config.n_layer)


def test_variants_in_the_manifest(trained_bundle):
    m = Bundle.open(trained_bundle).manifest
    assert m["default_graph"] == "cpu-fp32"
    L = m["model"]["n_layer"]
    for name in ("cpu-fp32", "cpu-int8", "cpu-int4", "trt-fp16", "cuda-fp16"):
        g = m["graphs"][name]
        assert g["parity"]["mean_kl"] <= g["gate"].get("max_mean_kl", 1e-3)
        assert g["parity"]["cases"] and all("mean_kl" in c for c in g["parity"]["cases"])
    assert m["graphs"]["cpu-fp32"]["data"] == "decoder.onnx.data"  # fused fp32 shares the weights
    assert m["graphs"]["cpu-fp32"]["parity"]["logits_max_abs_diff"] <= 1e-3
    for bits in ("int8", "int4"):
        g = m["graphs"][f"cpu-{bits}"]
        op = {"int8": "DynamicQuantizeMatMul", "int4": "MatMulNBits"}[bits]
        assert g["ops"][op] == 4 * L + 1 and "MatMul" not in g["ops"]  # the tied head too
        assert g["fusions"]["tied_head_matmul"] == 1
        assert g["fusions"]["bias_into_quantized"] == 3 * L  # qkv, attention out, MLP out (fc's is in FastGelu)
    assert m["graphs"]["cpu-int4"]["block_size"] == 32 and "block_size" not in m["graphs"]["cpu-int8"]
    for name in ("cpu-fp32", "cpu-int8", "cpu-int4"):  # the CPU keeps Add + LayerNormalization (fuse.py)
        assert "SkipLayerNormalization" not in m["graphs"][name]["ops"] and m["graphs"][name]["ops"]["LayerNormalization"] == 2 * L + 1
    assert m["graphs"]["cuda-fp16"]["ops"]["SkipLayerNormalization"] == 2 * L
    assert m["graphs"]["trt-fp16"]["kv_cache"] == "concat"
    assert all(n.domain == "" for n in onnx.load(str(trained_bundle / m["graphs"]["trt-fp16"]["file"]),
                                                   load_external_data=False).graph.node)
    ranges = json.loads((trained_bundle / "fp16_ranges.json").read_text())
    assert ranges["samples"] >= len(CASES) and ranges["largest"]


@pytest.fixture(scope="module")
def real_text(trained_generator):
    tok = trained_generator.tokenizer
    return [tok.encode(line) + [tok.eod_id] for line in corpus_lines(60)]  # lines the tiny model learnt


@pytest.fixture(scope="module")
def reference_logits(trained_hf, real_text):
    model = load_checkpoint(trained_hf).model
    with torch.no_grad():
        return [model(torch.tensor([ids]))[0][0, :-1].numpy() for ids in real_text]


@pytest.mark.parametrize("graph", ["trt-fp16", "cuda-fp16"])
def test_fp16_agrees_with_fp32_on_real_text(trained_bundle, real_text, reference_logits, graph):
    decoder = CPMGenerator.from_bundle(trained_bundle, variant=graph, threads=1).decoder
    agree = total = 0
    kl = []
    for ids, want in zip(real_text, reference_logits):
        got = next_token_logits(decoder, ids)
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(ids) - 1
        lp, lq = log_softmax(want), log_softmax(got)
        kl.append(float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1))))
    assert agree / total >= 0.99, f"top-1 agreement {agree / total:.4f} over {total} positions"
    assert np.mean(kl) < 1e-4


def test_quantized_perplexity_close_to_fp32(trained_bundle, real_text):
    ppl = {g: perplexity(CPMGenerator.from_bundle(trained_bundle, variant=g, threads=1).decoder, real_text[:30])
           for g in ("cpu-fp32", "cpu-int8", "cpu-int4")}
    assert ppl["cpu-fp32"] < 100, ppl  # the model did learn these lines
    assert ppl["cpu-int8"] <= 1.02 * ppl["cpu-fp32"], ppl
    assert ppl["cpu-int4"] <= 1.25 * ppl["cpu-fp32"], ppl


@pytest.mark.parametrize("graph", ["cpu-int8", "cpu-int4", "trt-fp16", "cuda-fp16"])
def test_every_variant_generates(trained_bundle, graph):
    gen = CPMGenerator.from_bundle(trained_bundle, variant=graph, threads=1)
    out = gen.generate_ids(["清华大学", "股市"], max_new_tokens=6)
    assert all(1 <= len(r) <= 6 for r in out)


def test_shared_kv_buffers_allocated_once(trained_generator):
    dec = trained_generator.decoder
    assert dec.kind == "shared"
    logits, state = dec.prefill([[11, 12, 13], [14]], capacity=8)
    buffers = [id(v) for v in state.past]
    shape = state.past[0].shape()
    for _ in range(4):
        dec.step(state, np.array([15, 16]))
    assert [id(v) for v in state.past] == buffers and state.past[0].shape() == shape == [2, dec.n_head, 8, dec.head_dim]
    assert state.lengths.tolist() == [7, 5]
    dec.step(state, np.array([1, 1]))
    with pytest.raises(ValueError, match="KV cache full"):
        dec.step(state, np.array([1, 1]))


def test_range_report_flags_large_activations(tmp_path, tiny_hf, tiny_cfg):
    """A layer whose MLP is scaled up must show in the report with its layer number."""
    import shutil

    from safetensors.torch import load_file, save_file

    from cpm_deploy.exporter import ExportOptions, export_bundle

    ck = tmp_path / "loud"
    shutil.copytree(tiny_hf, ck)
    sd = load_file(ck / "model.safetensors")
    sd["transformer.h.1.mlp.c_fc.weight"] *= 3000
    save_file(sd, ck / "model.safetensors")
    export_bundle(ck, tmp_path / "b", ExportOptions(variants=()))
    cases = [reference(load_checkpoint(ck).model, c) for c in CASES[:2]]
    report = range_report(tmp_path / "b" / "decoder.onnx", [c.feeds for c in cases])
    assert report["flagged"], report["largest"]
    assert {r["layer"] for r in report["flagged"]} >= {1} and all(r["layer"] != 0 for r in report["flagged"])


def test_cli_variant_options(tmp_path, trained_hf):
    from click.testing import CliRunner

    from cpm_deploy.cli.export import main as export_cli
    from cpm_deploy.cli.run import main as run_cli

    r = CliRunner().invoke(export_cli, [str(trained_hf), str(tmp_path / "b"), "-q", "-P", "int4", "-P", "fp32"])
    assert r.exit_code == 0, r.output
    assert "cpu-int4*" in r.output and "cpu-fp32" in r.output
    bad = CliRunner().invoke(export_cli, [str(trained_hf), str(tmp_path / "c"), "-T", "trt", "-P", "int4"])
    assert bad.exit_code == 2 or bad.exit_code == 1
    assert "not built for target trt" in bad.output
    run = CliRunner().invoke(run_cli, [str(tmp_path / "b"), "股市", "-n", "5", "-g", "cpu-fp32"])
    assert run.exit_code == 0, run.output
    nope = CliRunner().invoke(run_cli, [str(tmp_path / "b"), "股市", "-g", "cuda-fp16"])
    assert nope.exit_code == 1 and "no graph 'cuda-fp16'" in nope.output
