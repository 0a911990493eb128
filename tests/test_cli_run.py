"""cpm-run through click's CliRunner: streaming, JSON lines, benchmark mode, one-line errors."""

import json
import shutil

import pytest
from click.testing import CliRunner

from cpm_deploy.cli.run import main as run_cli


def invoke(*args, input=None):
    return CliRunner().invoke(run_cli, [str(a) for a in args], input=input)


def test_streams_the_continuation(trained_bundle, trained_generator):
    r = invoke(trained_bundle, "清华大学", "-n", "12")
    assert r.exit_code == 0, r.output
    assert "清华大学" + r.output.rstrip("\n") == trained_generator("清华大学", max_new_tokens=12)[0]["generated_text"]


def test_prompts_from_stdin_and_file_give_json_lines(trained_bundle, tmp_path):
    r = invoke(trained_bundle, "-n", "5", input="清华大学\n\n股市\n")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert [row["prompt"] for row in rows] == ["清华大学", "股市"]
    assert rows[0]["generated_text"][0].startswith("清华大学")
    f = tmp_path / "prompts.txt"
    f.write_text("股市\n", encoding="utf-8")
    r2 = invoke(trained_bundle, "-f", f, "-n", "5", "--sample", "-N", "2", "--seed", "4")
    assert r2.exit_code == 0 and len(json.loads(r2.output)["generated_text"]) == 2


def test_sampling_options_and_seed(trained_bundle):
    a = invoke(trained_bundle, "股市", "-n", "10", "-s", "-t", "0.8", "-k", "50", "-p", "0.9", "-r", "1.2", "--seed", "7")
    b = invoke(trained_bundle, "股市", "-n", "10", "-s", "-t", "0.8", "-k", "50", "-p", "0.9", "-r", "1.2", "--seed", "7")
    assert a.exit_code == 0 and a.output == b.output


def test_benchmark_mode(trained_bundle):
    r = invoke(trained_bundle, "清华大学", "--benchmark", "-n", "16")
    assert r.exit_code == 0, r.output
    for label in ("time to first token", "prompt tokens/s", "decode tokens/s", "peak memory"):
        assert label in r.output
    assert "new tokens           16" in r.output


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "max_new_tokens must be >= 1"),
    (["-p", "1.5"], "top_p"),
    (["-t", "0"], "temperature"),
    (["-N", "0"], "num-return-sequences"),
    (["--provider", "tensorrt"], "not available"),
    (["-l", "2000"], "positions"),
])
def test_invalid_parameters(trained_bundle, args, message):
    r = invoke(trained_bundle, "股市", *args)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_bad_bundles(tmp_path, trained_bundle):
    assert "not a bundle folder" in invoke(tmp_path / "nope", "股市").output
    b = tmp_path / "b"
    shutil.copytree(trained_bundle, b)
    data = bytearray((b / "decoder.onnx.data").read_bytes())
    data[-5] ^= 1
    (b / "decoder.onnx.data").write_bytes(bytes(data))
    r = invoke(b, "股市")
    assert r.exit_code == 1 and "checksum mismatch" in r.output
    (b / "spiece.model").unlink()
    r = invoke(b, "股市", "--no-verify")
    assert r.exit_code == 1 and "spiece.model is missing" in r.output
    (b / "manifest.json").write_text("[]")
    assert "not a cpm-deploy-bundle manifest" in invoke(b, "股市").output


def test_weights_that_give_nan_logits_are_named_not_decoded(tmp_path, trained_bundle):
    b = tmp_path / "b"
    shutil.copytree(trained_bundle, b)
    for data in b.glob("*.onnx.data"):  # NaN floats over the middle half of every weight file
        raw = bytearray(data.read_bytes())
        start, floats = len(raw) // 16 * 4, len(raw) // 8  # from a quarter in, half the bytes
        raw[start:start + 4 * floats] = b"\x00\x00\xc0\x7f" * floats
        assert len(raw) == data.stat().st_size
        data.write_bytes(bytes(raw))
    r = invoke(b, "股市", "-n", "3", "--no-verify")
    assert r.exit_code == 1 and "logits are not finite" in r.output and "Traceback" not in r.output


def test_empty_prompt(trained_bundle):
    r = invoke(trained_bundle, "")
    assert r.exit_code == 1 and "empty prompt" in r.output
