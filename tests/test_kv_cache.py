"""The int8 KV cache: the rewrite rule run by onnxruntime before and after, its gate at export, and
the runtime, the generator and the serving engine on a graph that keeps one."""

import json
import queue
import threading

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cpm_deploy.cli.export import main as export_cli
from cpm_deploy.exporter.kv_calibration import calibration_rows, kv_scales
from cpm_deploy.exporter.verify import mean_kl
from cpm_deploy.optimize import kv_int8
from cpm_deploy.runtime import Bundle, CPMGenerator
from cpm_deploy.runtime.backends import open_decoder
from cpm_deploy.runtime.system.memory import serving_memory
from cpm_deploy.engine import Engine

PROMPTS = ["清华大学是", "股市今天", "人工智能", "春节期间", "今天天气", "北京时间", "据报道", "中国队"]


@pytest.fixture(scope="module")
def kv8_bundle(tmp_path_factory, trained_hf):
    out = tmp_path_factory.mktemp("kv8") / "bundle"
    r = CliRunner().invoke(export_cli, [str(trained_hf), str(out), "-q", "-P", "fp32", "-P", "int8", "-P", "int4",
                                        "--variants-only", "--kv-cache", "int8"])
    assert r.exit_code == 0, r.output
    return out


def test_the_rewrite_keeps_attention_within_reach_of_the_fp32_cache(tiny_bundle, tiny_model, vocab_file):
    """Rule test: the fused graph before and after, decoded side by side past 900 cached positions."""
    from cpm_deploy.runtime import CPMTokenizer

    cfg = tiny_model.config.to_dict()
    rows = calibration_rows(CPMTokenizer(vocab_file), cfg["n_positions"], cfg["vocab_size"])
    scales = kv_scales(tiny_model, rows)
    assert len(scales) == 2 * cfg["n_layer"] and scales["kv_scale.0.key"].shape == (cfg["n_embd"],)
    src = "decoder_cpu_fp32.onnx"  # the default export's fused graph (random weights, 1024 positions)
    try:
        name = kv_int8.build(tiny_bundle, src, scales)
        proto = onnx.load(str(tiny_bundle / name), load_external_data=False)
        nodes = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
        assert len(nodes) == cfg["n_layer"] and all(n.input[12].startswith("kv_scale.") for n in nodes)
        assert {i.type.tensor_type.elem_type for i in proto.graph.input if i.name.startswith("past_")} == {
            onnx.TensorProto.INT8}
        plain, kv8 = (open_decoder(tiny_bundle / f, cfg, "shared", threads=1) for f in (src, name))
        assert kv8.dtype == np.int8 and plain.dtype == np.float32
        row = rows[0]
        (la, sa), (lb, sb) = (d.prefill([row[:950]], 1000) for d in (plain, kv8))
        kls = []
        for t in row[950:990]:
            kls.append(mean_kl(la, lb))
            la, lb = plain.step(sa, np.array([t])), kv8.step(sb, np.array([t]))
        assert np.mean(kls) < 1e-3, np.mean(kls)
        assert sb.past[0].numpy().dtype == np.int8 and sb.past[0].numpy().nbytes * 4 == sa.past[0].numpy().nbytes
    finally:
        (tiny_bundle / kv_int8.kv8_file(src)).unlink(missing_ok=True)


def test_export_records_the_int8_cache_and_its_gate(kv8_bundle):
    manifest = json.loads((kv8_bundle / "manifest.json").read_text())
    for key in ("cpu-fp32", "cpu-int8", "cpu-int4"):
        g = manifest["graphs"][key]
        assert g["kv_dtype"] == "int8" and g["kv_parity"]["passed"], key
        assert g["kv_parity"]["mean_kl"] <= g["kv_parity"]["gate"]["max_mean_kl"]
        assert g["kv_parity"]["contexts"][-1] == 128 - 32 - 1  # the trained model's positions, less the steps
        assert g["score"]["parity"]["passed"]
    assert not list(kv8_bundle.glob("*_kv8.onnx"))  # the twins replaced the graphs
    bundle = Bundle.open(kv8_bundle)
    assert bundle.kv_bytes("cpu-int8") == 1
    assert serving_memory(bundle, "cpu-int8").per_position == 2 * 2 * 64  # layers x (K, V) x width x 1 byte


def test_generator_and_engine_agree_on_an_int8_cache(kv8_bundle):
    """Greedy through the server's batching equals the generator alone on the same graph, 16 at once:
    the cache's scales are static, so batching changes nothing on cpu-fp32. int8 weights quantize
    each call's activations with one scale, so there a batch may tip a near tie (how often depends
    on how arrivals group): those graphs are held to equality one request at a time, and all 16
    concurrent requests must finish."""
    for graph in ("cpu-fp32", "cpu-int8", "cpu-int4"):
        gen = CPMGenerator.from_bundle(kv8_bundle, variant=graph, threads=1)
        assert gen.decoder.dtype == np.int8
        want = [gen(p, max_new_tokens=8)[0]["generated_text"][len(p):] for p in PROMPTS]
        with Engine.from_bundle(kv8_bundle, graph=graph, threads=1, max_batch=16) as engine:
            assert engine.runner.pool.buffers[0].dtype == np.int8
            got, reasons = [None] * 16, [None] * 16
            sinks = [queue.Queue() for _ in range(16)]

            def client(i):
                engine.submit(engine.make_request(PROMPTS[i % 8], 8, sink=sinks[i].put))
                text = ""
                while (ev := sinks[i].get(timeout=60)).kind != "finish":
                    text += ev.text
                got[i], reasons[i] = text, ev.reason

            threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert all(r in ("stop", "length") for r in reasons), (graph, reasons)
            if graph == "cpu-fp32":
                assert got == want * 2
            else:
                assert [engine.complete(p, 8)[0]["text"] for p in PROMPTS[:4]] == want[:4], graph


def test_a_cache_that_misses_its_gate_writes_no_bundle(tmp_path, trained_hf, monkeypatch):
    import cpm_deploy.exporter.kv_calibration as calibration

    monkeypatch.setattr(calibration, "MARGIN", 0.02)  # scales at 2% of the range: nearly everything clamps
    r = CliRunner().invoke(export_cli, [str(trained_hf), str(tmp_path / "b"), "-q", "-P", "int8", "--kv-cache", "int8"])
    assert r.exit_code == 1 and "int8 KV cache misses its gate" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b").exists()


def test_int8_cache_options_are_checked_first(tmp_path, trained_hf):
    r = CliRunner().invoke(export_cli, [str(trained_hf), str(tmp_path / "b"), "-q", "--target", "trt", "-P", "fp16",
                                        "--kv-cache", "int8"])
    assert r.exit_code == 1 and "applies to the CPU graphs" in r.output
    text = tmp_path / "calib.txt"
    text.write_text("清华大学\n", encoding="utf-8")
    r = CliRunner().invoke(export_cli, [str(trained_hf), str(tmp_path / "c"), "-q", "--kv-calibration", str(text)])
    assert r.exit_code == 2 and "--kv-calibration goes with --kv-cache int8" in r.output
