"""TensorRT: preflight, plan, version guard and the build code path without a GPU; the real build
and engine run when TensorRT and a GPU are present (skipped otherwise, with the reason)."""

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

import fake_tensorrt
from cpm_deploy.cli.trt import main as trt_cli
from cpm_deploy.runtime.backends import tensorrt_versions as versions
from cpm_deploy.optimize.tensorrt.build import BuildError, build_into_bundle
from cpm_deploy.optimize.tensorrt.plan import PlanError, check_profile, make_plan
from cpm_deploy.optimize.tensorrt.preflight import preflight
from cpm_deploy.runtime import Bundle

V100 = {"name": "Tesla V100-SXM2-16GB", "compute_capability": (7, 0)}


@pytest.fixture
def bundle(tmp_path, trained_bundle):
    b = tmp_path / "bundle"
    shutil.copytree(trained_bundle, b)
    return b


def test_preflight_accepts_the_standard_graph(trained_bundle):
    report = preflight(trained_bundle / "decoder_last.onnx", "10.4.0")
    assert report.ok, report.problems
    assert {"LayerNormalization", "MatMul", "Softmax", "Gemm"} <= set(report.ops)
    assert preflight(trained_bundle / "decoder_last.onnx", "8.6.1").ok  # opset 17 parses on 8.6 too


def test_preflight_names_what_tensorrt_would_reject(trained_bundle, tmp_path):
    fused = preflight(trained_bundle / "decoder_cpu_fp32.onnx", "10.4.0")
    assert any("GroupQueryAttention" in p and "com.microsoft" in p for p in fused.problems)
    model = onnx.load(str(trained_bundle / "decoder_last.onnx"), load_external_data=False)
    model.opset_import[0].version = 20
    model.graph.node.append(onnx.helper.make_node("Unique", ["input_ids"], ["u"], name="odd"))
    onnx.save(model, tmp_path / "g.onnx")
    (tmp_path / "decoder.onnx.data").write_bytes(b"short")
    problems = "\n".join(preflight(tmp_path / "g.onnx", "8.6.1").problems)
    assert "opset 20 is newer than TensorRT 8.6.1" in problems
    assert "Unique (1x) is not supported" in problems
    assert "decoder.onnx.data is truncated" in problems


def test_profiles_are_consistent_and_checked(trained_bundle):
    m = Bundle.open(trained_bundle, verify=False).manifest
    plan = make_plan(trained_bundle, m, max_batch=4, max_prompt=64, max_total=128)
    ctx, gen = plan.profiles
    assert ctx.shapes["past_key_values.0.key"][2][2] == 0 and ctx.shapes["input_ids"][2] == [4, 64]
    assert gen.shapes["input_ids"][2] == [4, 1] and gen.shapes["attention_mask"][2] == [4, 128]
    assert gen.shapes["past_key_values.0.value"][2][2] == 127
    broken = type(gen)(gen.name, dict(gen.shapes, attention_mask=([1, 2], [4, 64], [4, 100])))
    with pytest.raises(PlanError, match="generation profile, max: attention_mask length 100 != past \\+ seq"):
        check_profile(broken, m["model"]["n_layer"])
    with pytest.raises(PlanError, match="exceeds the model's 128 positions"):
        make_plan(trained_bundle, m, max_total=1024)
    defaults = make_plan(trained_bundle, m).limits
    assert defaults == {"max_batch": 1, "max_prompt": 127, "max_total": 128}
    with pytest.raises(PlanError, match="max prompt"):
        make_plan(trained_bundle, m, max_prompt=128, max_total=128)


def test_precision_policy_uses_the_range_report(bundle):
    m = Bundle.open(bundle, verify=False).manifest
    report = json.loads((bundle / "fp16_ranges.json").read_text())
    report["flagged"] = [{"tensor": "/h.1/fc/matmul/out", "node": "/h.1/fc/matmul", "layer": 1, "max_abs": 9e4}]
    (bundle / "fp16_ranges.json").write_text(json.dumps(report))
    plan = make_plan(bundle, m)
    assert "/h.1/fc/matmul" in plan.fp32_nodes and "/h.0/ln_1" in plan.fp32_nodes and "/h.1/softmax" in plan.fp32_nodes
    assert "--layerPrecisions=" in plan.trtexec() and "/h.1/fc/matmul:fp32" in plan.trtexec()


def test_memory_estimate_for_large():
    from cpm_deploy.exporter.config import PRESETS
    from cpm_deploy.optimize.tensorrt.plan import estimate_memory

    est = estimate_memory(PRESETS["large"].to_dict(), 1, 1024, 4 << 30, kv_fp16=True)
    assert 5.0e9 < est["weights_fp16_bytes"] < 5.5e9  # 2.6B parameters in fp16
    assert est["kv_cache_bytes"] == 2 * 2 * 32 * 1024 * 2560 * 2


@pytest.mark.parametrize("version, cc, message", [
    ("10.5.0", (7, 0), "dropped Volta"), ("10.13.2", (7, 0), "dropped Volta"),
    ("11.0.0", (8, 0), "removed BuilderFlag.FP16"), ("8.5.3", (7, 0), "predates LayerNormalization"),
])
def test_version_guard_refuses(version, cc, message):
    with pytest.raises(versions.TensorRTVersionError, match=message):
        versions.check_build(version, cc)


@pytest.mark.parametrize("version, cc", [("10.4.0", (7, 0)), ("8.6.1", (7, 0)), ("10.13.2", (8, 0))])
def test_version_guard_allows(version, cc):
    versions.check_build(version, cc)


def test_engines_do_not_move_between_gpus():
    meta = {"compute_capability": [7, 0], "tensorrt": "10.4.0"}
    versions.check_runtime(meta, "10.4.0", (7, 0))
    with pytest.raises(versions.TensorRTVersionError, match="rebuild it here"):
        versions.check_runtime(meta, "10.4.0", (8, 0))
    with pytest.raises(versions.TensorRTVersionError, match="rebuild"):
        versions.check_runtime(meta, "10.3.0", (7, 0))


def test_build_code_path_with_a_recording_tensorrt(bundle):
    m = Bundle.open(bundle, verify=False).manifest
    plan = make_plan(bundle, m, max_batch=2, max_prompt=32, max_total=64, workspace_gib=1)
    trt = fake_tensorrt.make("10.4.0")
    phases = []
    meta = build_into_bundle(bundle, plan, progress=lambda *a: phases.append(a), trt=trt, gpu=V100)
    rec = trt.record
    assert rec["flags"] == {"FP16", "OBEY_PRECISION_CONSTRAINTS"} and rec["pools"] == {"WORKSPACE": 1 << 30}
    assert rec["network_flags"] == 0 and rec["timing_cache_in"] == b""
    assert [set(p) for p in rec["profiles"]] == [set(p.shapes) for p in plan.profiles]
    assert rec["profiles"][1]["attention_mask"] == ((1, 2), (2, 32), (2, 64))
    lns = [n.name for n in onnx.load(str(plan.graph), load_external_data=False).graph.node
           if n.op_type in ("LayerNormalization", "Softmax")]
    assert set(rec["layers"]) == set(lns) and set(rec["layers"].values()) == {"float32"}
    assert rec["io_dtypes"]["past_key_values.0.key"] == "float16" and rec["io_dtypes"]["present.1.value"] == "float16"
    assert "logits" not in rec["io_dtypes"] and "input_ids" not in rec["io_dtypes"]
    assert phases[-1] == ("Building engine", 3, 3)
    assert plan.engine.read_bytes() == b"serialized-engine" and plan.timing_cache.read_bytes() == b"timing-cache"
    manifest = Bundle.open(bundle).manifest  # checksums of the new files verify
    engine = manifest["engines"][plan.engine.stem]
    assert engine["compute_capability"] == [7, 0] and engine["tensorrt"] == "10.4.0" and engine["gpu"] == V100["name"]
    assert engine["limits"] == {"max_batch": 2, "max_prompt": 32, "max_total": 64} and meta["kv_dtype"] == "fp16"
    # a second build reuses the timing cache kept next to the engine
    trt2 = fake_tensorrt.make("10.4.0")
    build_into_bundle(bundle, plan, trt=trt2, gpu=V100)
    assert trt2.record["timing_cache_in"] == b"timing-cache"


def test_build_refuses_before_touching_tensorrt(bundle):
    m = Bundle.open(bundle, verify=False).manifest
    plan = make_plan(bundle, m)
    with pytest.raises(versions.TensorRTVersionError, match="dropped Volta"):
        build_into_bundle(bundle, plan, trt=fake_tensorrt.make("10.5.0"), gpu=V100)
    with pytest.raises(BuildError, match="compute capability 7.0 but this GPU"):
        build_into_bundle(bundle, plan, trt=fake_tensorrt.make("10.4.0"), gpu={"name": "A100", "compute_capability": (8, 0)})
    assert not plan.engine.exists()
    old = fake_tensorrt.make("8.6.1")
    build_into_bundle(bundle, plan, trt=old, gpu=V100)
    assert old.record["network_flags"] == 1  # 8.6 needs the explicit-batch flag


def test_cli_preflight_and_dry_run(trained_bundle):
    r = CliRunner().invoke(trt_cli, ["preflight", str(trained_bundle)])
    assert r.exit_code == 0 and "ok:" in r.output
    bad = CliRunner().invoke(trt_cli, ["preflight", str(trained_bundle), "-g", "decoder_cpu_int4.onnx"])
    assert bad.exit_code == 1 and "MatMulNBits" in bad.output
    dry = CliRunner().invoke(trt_cli, ["build", str(trained_bundle), "--dry-run", "-t", "128", "-p", "64"])
    assert dry.exit_code == 0, dry.output
    assert "profile      context" in dry.output and "trtexec --onnx=" in dry.output and "--fp16" in dry.output
    as_json = CliRunner().invoke(trt_cli, ["build", str(trained_bundle), "-n", "--json", "-t", "128", "-p", "64"])
    assert json.loads(as_json.output)["limits"]["max_total"] == 128
    too_long = CliRunner().invoke(trt_cli, ["build", str(trained_bundle), "--dry-run", "-t", "1024"])
    assert too_long.exit_code == 1 and "positions" in too_long.output


def test_cli_build_without_tensorrt_is_one_line(trained_bundle):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; this checks the message without it")
    except ImportError:
        pass
    r = CliRunner().invoke(trt_cli, ["build", str(trained_bundle), "-t", "128", "-p", "64"])
    assert r.exit_code == 1 and "TensorRT is not installed" in r.output and "Traceback" not in r.output


def _gpu_and_tensorrt():
    try:
        import tensorrt  # noqa: F401

        from cpm_deploy.runtime.backends.cuda import device
        return device()
    except Exception:  # noqa: BLE001 - any failure means: not here
        return None


@pytest.mark.skipif(_gpu_and_tensorrt() is None, reason="needs TensorRT and an NVIDIA GPU (neither is on this machine)")
def test_real_engine_generates_like_onnxruntime(bundle):
    from cpm_deploy.runtime import CPMGenerator

    m = Bundle.open(bundle, verify=False).manifest
    plan = make_plan(bundle, m, max_batch=2, max_prompt=32, max_total=64, compute_capability=None)
    build_into_bundle(bundle, plan)
    trt_gen = CPMGenerator.from_bundle(bundle, backend="tensorrt")
    ort_gen = CPMGenerator.from_bundle(bundle)
    prompts = ["清华大学", "股市"]
    assert trt_gen.generate_ids(prompts, max_new_tokens=12) == ort_gen.generate_ids(prompts, max_new_tokens=12)
