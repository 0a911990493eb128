"""The fast prompt paths: int8 as DynamicQuantizeMatMul, cpu-int4 running prompts on the int8 graph,
long prompts in chunks. Each checked by running onnxruntime against the plain computation."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cpm_deploy.cli.export import main as export_cli
from cpm_deploy.optimize.quantize import fold_bias, per_column_int8, quantize_matmuls
from cpm_deploy.runtime import Bundle, BundleError, CPMGenerator
from cpm_deploy.runtime.backends import ort_decoder as decoder_module
from cpm_deploy.runtime.backends import session as session_module

RNG = np.random.default_rng(0)


def two_matmuls() -> onnx.ModelProto:
    """y = (x @ W) @ z: one MatMul with a constant weight, one with a run-time operand."""
    w = numpy_helper.from_array(RNG.normal(0, 0.5, (64, 48)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="m"), helper.make_node("MatMul", ["h", "z"], ["y"], name="dyn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64]),
                                           helper.make_tensor_value_info("z", TensorProto.FLOAT, [48, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_per_column_int8_round_trips_within_half_a_step():
    w = RNG.normal(0, 1, (32, 7)).astype(np.float32)
    w[:, 3] = 0  # an all-zero column keeps a usable scale
    q, scale = per_column_int8(w)
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and scale[3] == 1.0
    assert np.all(np.abs(q * scale - w) <= scale / 2 + 1e-7)


@pytest.mark.parametrize("keep, op, count", [
    (None, "DynamicQuantizeMatMul", 1),
    ({"m": "fp32_activations"}, "MatMulNBits", 1),
    ({"m": "fp32"}, "MatMul", 0),
])
def test_int8_recipe_and_its_rungs(keep, op, count):
    model = two_matmuls()
    feeds = {"x": RNG.normal(0, 1, (3, 64)).astype(np.float32), "z": RNG.normal(0, 1, (48, 5)).astype(np.float32)}
    before = run(model, feeds)
    out, n = quantize_matmuls(model, bits=8, keep=keep)
    assert n == count
    first = out.graph.node[0]
    assert first.op_type == op and [n.op_type for n in out.graph.node][-1] == "MatMul"  # the run-time MatMul stays
    if op == "MatMulNBits":
        assert {a.name: a.i for a in first.attribute}["accuracy_level"] == 1  # fp32 activations
    if op == "DynamicQuantizeMatMul":
        assert first.name == "m_Q8" and "W" not in {t.name for t in out.graph.initializer}  # fp32 copy dropped
    after = run(out, feeds)
    assert np.abs(after - before).max() <= 0.02 * np.abs(before).max()


def biased_matmul(second_user: bool = False) -> onnx.ModelProto:
    """y = x @ W + c (c a constant [N]); with ``second_user`` the MatMul's output is also a graph output."""
    inits = [numpy_helper.from_array(RNG.normal(0, 0.5, (64, 48)).astype(np.float32), "W"),
             numpy_helper.from_array(RNG.normal(0, 1, 48).astype(np.float32), "c")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="m"), helper.make_node("Add", ["h", "c"], ["y"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 48]) for n in (["y", "h"] if second_user else ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("bits, op", [(8, "DynamicQuantizeMatMul"), (4, "MatMulNBits")])
def test_bias_folds_into_the_quantized_matmul(bits, op):
    feeds = {"x": RNG.normal(0, 1, (3, 64)).astype(np.float32)}
    quantized, _ = quantize_matmuls(biased_matmul(), bits=bits)
    before = run(quantized, feeds)
    assert fold_bias(quantized) == 1
    assert [n.op_type for n in quantized.graph.node] == [op] and quantized.graph.node[0].output[0] == "y"
    np.testing.assert_allclose(run(quantized, feeds), before, rtol=1e-5, atol=1e-5)
    kept, _ = quantize_matmuls(biased_matmul(second_user=True), bits=bits)  # its output is needed as it is
    assert fold_bias(kept) == 0 and [n.op_type for n in kept.graph.node] == [op, "Add"]


def test_int4_runs_prompts_on_the_int8_graph(trained_bundle):
    m = Bundle.open(trained_bundle).manifest
    int4, int8 = m["graphs"]["cpu-int4"], m["graphs"]["cpu-int8"]
    assert int4["prefill"] == {"file": int8["file"], "data": int8["data"]}
    assert int8["file"] in Bundle.open(trained_bundle, verify=False).graph_files("cpu-int4")
    g4 = CPMGenerator.from_bundle(trained_bundle, variant="cpu-int4", threads=1)
    g8 = CPMGenerator.from_bundle(trained_bundle, variant="cpu-int8", threads=1)
    assert g4.decoder.prefill_session is not g4.decoder.session and g8.decoder.prefill_session is g8.decoder.session
    rows = [[11, 12, 13, 14], [15, 16, 17, 18]]
    l4, s4 = g4.decoder.prefill(rows, capacity=8)
    l8, s8 = g8.decoder.prefill(rows, capacity=8)
    np.testing.assert_array_equal(l4, l8)  # the same graph ran the prompt
    tokens = np.array([20, 21])
    assert not np.array_equal(g4.decoder.step(s4, tokens), g8.decoder.step(s8, tokens))  # steps are 4-bit


def test_int4_steps_of_many_rows_run_on_the_int8_graph(trained_bundle):
    g4 = CPMGenerator.from_bundle(trained_bundle, variant="cpu-int4", threads=1)
    g8 = CPMGenerator.from_bundle(trained_bundle, variant="cpu-int8", threads=1)
    many = decoder_module.STEPS_ON_PROMPT_GRAPH_FROM
    assert g4.decoder.step_session(many - 1) is g4.decoder.session
    assert g4.decoder.step_session(many) is g4.decoder.prefill_session
    assert g8.decoder.step_session(64) is g8.decoder.session  # one graph: nothing to choose
    rows = [[11, 12, 13], [14, 15], [16], [17, 18, 19, 20]][:many]
    (l4, s4), (l8, s8) = g4.decoder.prefill(rows, capacity=9), g8.decoder.prefill(rows, capacity=9)
    for t in range(4):  # through the kept binding
        tokens = np.arange(20 + t, 20 + t + many)
        np.testing.assert_array_equal(g4.decoder.step(s4, tokens), g8.decoder.step(s8, tokens))
    p4, p8 = g4.decoder._kv(many, 9), g8.decoder._kv(many, 9)  # and the independent reference path
    g4.decoder.run_prefill(rows, p4), g8.decoder.run_prefill(rows, p8)
    cached, tokens = np.array([len(r) for r in rows]), np.arange(30, 30 + many)
    np.testing.assert_array_equal(g4.decoder.run_step(tokens, cached, p4), g8.decoder.run_step(tokens, cached, p8))


def test_eval_scores_cpu_int4_on_its_4bit_graph_at_any_width(trained_bundle):
    from cpm_deploy.runtime.eval import open_scorer, perplexity_of_lines

    g4 = CPMGenerator.from_bundle(trained_bundle, variant="cpu-int4", threads=1)
    g8 = CPMGenerator.from_bundle(trained_bundle, variant="cpu-int8", threads=1)
    with g4.decoder.own_graph_steps():
        assert g4.decoder.step_session(64) is g4.decoder.session
    assert g4.decoder.step_session(64) is g4.decoder.prefill_session  # as it was
    lines = ["清华大学是中国著名的高等学府", "今天天气很好", "股市今天大幅上涨", "春节期间很多人回家"] * 2
    # routed, the 8-row steps would run the int8 graph and read int8's perplexity exactly
    for method in ("steps", "one-pass"):
        s4, s8 = (open_scorer(trained_bundle, g, method, threads=1) for g in ("cpu-int4", "cpu-int8"))
        assert perplexity_of_lines(s4, lines, batch=8) != perplexity_of_lines(s8, lines, batch=8)


def test_int4_without_the_int8_prompt_graph(tmp_path, trained_hf):
    r = CliRunner().invoke(export_cli, [str(trained_hf), str(tmp_path / "b"), "-q", "-P", "int4", "--no-int4-prefill"])
    assert r.exit_code == 0, r.output
    graphs = json.loads((tmp_path / "b" / "manifest.json").read_text())["graphs"]
    assert "cpu-int8" not in graphs and "prefill" not in graphs["cpu-int4"]
    assert not (tmp_path / "b" / "decoder_cpu_int8.onnx").exists()


def test_a_prefill_graph_outside_the_files_is_refused(tmp_path, trained_bundle):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(trained_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["graphs"]["cpu-int4"]["prefill"]["file"] = "elsewhere.onnx"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="cpu-int4.prefill.file names 'elsewhere.onnx'"):
        Bundle.open(b, verify=False)
    m["graphs"]["cpu-int4"]["prefill"]["file"] = "../elsewhere.onnx"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="leads out"):
        Bundle.open(b, verify=False)
    # a listed graph of another kind (the concatenating one) is refused before it runs
    m["graphs"]["cpu-int4"]["prefill"] = {"file": "decoder_last.onnx", "data": "decoder.onnx.data"}
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="cannot share KV buffers"):
        CPMGenerator.from_bundle(b, variant="cpu-int4", verify=False)


def test_long_prompts_in_chunks_match_one_call(trained_generator, monkeypatch):
    dec = trained_generator.decoder  # cpu-fp32
    rows = [list(range(100, 130)), list(range(200, 230))]  # one length: chunked
    whole = dec.prefill(rows, capacity=40)
    monkeypatch.setattr(decoder_module, "PREFILL_CHUNK", 8)
    chunked = dec.prefill(rows, capacity=40)
    np.testing.assert_allclose(chunked[0], whole[0], atol=1e-4, rtol=1e-4)
    for a, b in zip(chunked[1].past, whole[1].past):
        np.testing.assert_allclose(a.numpy()[:, :, :30], b.numpy()[:, :, :30], atol=1e-4, rtol=1e-4)
    prompt = "清华大学是中国著名的高等学府，位于北京市海淀区。今天天气很好"
    monkeypatch.setattr(decoder_module, "PREFILL_CHUNK", 1024)
    want = trained_generator.generate_ids([prompt], max_new_tokens=8)
    monkeypatch.setattr(decoder_module, "PREFILL_CHUNK", 4)
    assert trained_generator.generate_ids([prompt], max_new_tokens=8) == want


def test_a_kept_step_binding_equals_binding_each_step(trained_generator):
    dec = trained_generator.decoder  # cpu-fp32, shared KV
    rows = [[11, 12, 13, 14, 15], [21, 22, 23]]
    _, fresh = dec.prefill(rows, capacity=12)
    _, kept = dec.prefill(rows, capacity=12)
    steps = dec.step_binding(kept.past)
    cached, tokens = fresh.lengths.copy(), np.array([30, 31])
    for _ in range(4):
        want = dec.run_step(tokens, cached, fresh.past)
        got = steps.run(tokens, cached)
        np.testing.assert_array_equal(got, want)
        assert got is not steps.logits[:, -1, :]  # a copy: the next step rewrites the bound array
        tokens, cached = want.argmax(-1), cached + 1
    for a, b in zip(kept.past, fresh.past):  # it wrote the same cache, in place (beyond: uninitialised)
        for row, n in enumerate(cached):
            np.testing.assert_array_equal(a.numpy()[row, :, :n], b.numpy()[row, :, :n])
    # decoder.step keeps one per state: the generator's greedy tokens are unchanged by it
    prompt = "清华大学是中国著名的高等学府"
    logits, state = dec.prefill([trained_generator.tokenizer.encode(prompt)], capacity=20)
    assert state.steps is None
    dec.step(state, logits.argmax(-1))
    assert state.steps is not None and state.steps.past is state.past


class _RecordingSession:
    """onnxruntime.InferenceSession, noting the attention switch while the kernels are built."""
    seen: list = []

    def __new__(cls, *args, **kwargs):
        cls.seen.append(os.environ.get(session_module.GQA_FLASH_SWITCH))
        return _REAL_SESSION(*args, **kwargs)


_REAL_SESSION = ort.InferenceSession


@pytest.mark.parametrize("user, built_with", [(None, "1"), ("0", "0"), ("1", "1")])
def test_cpu_sessions_build_attention_on_the_plain_path(trained_bundle, monkeypatch, user, built_with):
    if user is None:
        monkeypatch.delenv(session_module.GQA_FLASH_SWITCH, raising=False)
    else:
        monkeypatch.setenv(session_module.GQA_FLASH_SWITCH, user)
    monkeypatch.setattr(_RecordingSession, "seen", [])
    monkeypatch.setattr(ort, "InferenceSession", _RecordingSession)
    graph = trained_bundle / Bundle.open(trained_bundle, verify=False).manifest["graphs"]["cpu-fp32"]["file"]
    session_module.create_session(graph, "cpu", threads=1)
    assert _RecordingSession.seen == [built_with]
    assert os.environ.get(session_module.GQA_FLASH_SWITCH) == user  # the environment as it was


def test_the_plain_attention_path_computes_what_the_tiled_one_does(trained_bundle, monkeypatch):
    """The same prompt (in chunks, as long prompts run) and steps, attention built either way."""
    monkeypatch.delenv(session_module.GQA_FLASH_SWITCH, raising=False)
    monkeypatch.setattr(decoder_module, "PREFILL_CHUNK", 16)
    rows = [list(range(100, 140)), list(range(300, 340))]
    out = {}
    for user in (None, "0"):  # ours (plain), then the user's choice of onnxruntime's tiled path
        if user:
            monkeypatch.setenv(session_module.GQA_FLASH_SWITCH, user)
        gen = CPMGenerator.from_bundle(trained_bundle, variant="cpu-fp32", threads=1)
        logits, state = gen.decoder.prefill(rows, capacity=48)
        out[user] = [logits] + [gen.decoder.step(state, np.array([7 + t, 9 + t])) for t in range(3)]
    for plain, tiled in zip(out[None], out["0"]):
        np.testing.assert_allclose(plain, tiled, rtol=1e-5, atol=1e-5)
