"""One forward pass per candidate: the scoring twins score what decode steps score, on every CPU
graph; a shard scores as it does inside a full run; bundles without twins still score."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import corpus_lines
from cpm_deploy.cli.eval import main as eval_cli
from cpm_deploy.runtime import Bundle
from cpm_deploy.runtime.eval import classify, encode_examples, load_task, open_scorer, shard
from cpm_deploy.runtime.bundle.onnx_external import external_data_locations
from test_eval_method import write_labelled

@pytest.fixture(scope="module")
def tnews(tmp_path_factory, trained_generator):
    task = load_task("tnews", write_labelled(tmp_path_factory.mktemp("t") / "tnews", "tnews", n_dev=24))
    return task, encode_examples(task, trained_generator.tokenizer, 1024)


def scores(bundle, graph, method, encoded):
    return np.array(classify(open_scorer(bundle, graph, method, threads=1), encoded)["scores"])


def test_one_pass_scores_equal_step_by_step_scores_in_fp32(trained_bundle, tnews):
    _, encoded = tnews
    one = open_scorer(trained_bundle, "cpu-fp32", "one-pass", threads=1)
    steps = open_scorer(trained_bundle, "cpu-fp32", "steps", threads=1)
    assert (one.method, steps.method) == ("one pass", "step by step")
    a, b = classify(one, encoded), classify(steps, encoded)
    assert np.abs(np.array(a["scores"]) - np.array(b["scores"])).max() <= 1e-4
    assert a["predictions"] == b["predictions"]


@pytest.mark.parametrize("graph", ["cpu-int8", "cpu-int4"])
def test_one_pass_scores_are_as_close_to_fp32_as_step_scores(trained_bundle, tnews, graph):
    """Not equal: int8 quantizes activations per call over the rows in it (other rows one pass than
    one step), int4's 4-bit kernel takes another path for many rows than for one."""
    _, encoded = tnews
    fp32 = scores(trained_bundle, "cpu-fp32", "one-pass", encoded)
    one, steps = (scores(trained_bundle, graph, m, encoded) for m in ("one-pass", "steps"))
    assert np.abs(one - steps).mean() <= 0.05
    assert np.abs(one - fp32).mean() <= 2 * np.abs(steps - fp32).mean() + 0.01


@pytest.mark.parametrize("graph", ["decoder", "decoder_last"])
def test_the_standard_graphs_score_in_one_pass_on_their_all_positions_twin(tiny_bundle, graph, trained_generator):
    prefixes = [[11, 12, 13], [14], [15, 16]]
    continuations = [[21, 22], [23, 24, 25, 26], [27]]
    one = open_scorer(tiny_bundle, graph, threads=1)
    steps = open_scorer(tiny_bundle, graph, "steps", threads=1)
    assert one.method == "one pass"
    for x, y in zip(one.logprobs(prefixes, continuations), steps.logprobs(prefixes, continuations)):
        assert x.shape == y.shape and np.abs(x - y).max() <= 1e-4


def test_a_shard_scores_as_it_does_in_the_full_run(trained_bundle, tnews):
    task, encoded = tnews
    scorer = open_scorer(trained_bundle, "cpu-int8", threads=1)
    full = classify(scorer, encoded)
    parts = [classify(scorer, shard(encoded, i, 3)) for i in range(3)]
    assert [len(shard(encoded, i, 3)) for i in range(3)] == [8, 8, 8]
    assert sum((p["scores"] for p in parts), []) == full["scores"]  # exactly: no state crosses calls
    assert sum((p["predictions"] for p in parts), []) == full["predictions"]
    assert [len(shard(list(range(10)), i, 4)) for i in range(4)] == [3, 3, 2, 2]
    with pytest.raises(ValueError):
        shard(encoded, 3, 3)


def test_the_scoring_twin_reads_the_generation_graphs_weights(trained_bundle):
    bundle = Bundle.open(trained_bundle)
    for name in ("cpu-fp32", "cpu-int8", "cpu-int4"):
        graph = bundle.graph(name)
        assert graph["score"]["parity"]["passed"]
        twin, own = (external_data_locations(bundle.resolve(f)) for f in (graph["score"]["file"], graph["file"]))
        assert twin == own and graph["score"]["data"] == graph["data"]  # no second copy of the weights
        assert (trained_bundle / graph["score"]["file"]).stat().st_size < 100_000
    assert "score" not in bundle.graph("cuda-fp16")  # GPU graphs score step by step


def test_a_bundle_without_scoring_twins_scores_step_by_step(trained_bundle, tmp_path, tnews):
    old = tmp_path / "old"
    shutil.copytree(trained_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for g in manifest["graphs"].values():
        g.pop("score", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert open_scorer(old, "cpu-int8", threads=1).method == "step by step"
    data = write_labelled(tmp_path / "tnews", "tnews", n_dev=4)
    forced = CliRunner().invoke(eval_cli, [str(old), "-T", "tnews", "-d", str(data), "-g", "cpu-int8",
                                           "--scoring", "one-pass", "-q"])
    assert forced.exit_code == 1 and "has no scoring graph" in forced.output and "Traceback" not in forced.output
    report = tmp_path / "r.json"
    auto = CliRunner().invoke(eval_cli, [str(old), "-T", "tnews", "-d", str(data), "-g", "cpu-int8", "-q",
                                         "-o", str(report)])
    assert auto.exit_code == 0 and "re-export the bundle for one-pass scoring" in auto.output, auto.output
    assert json.loads(report.read_text())["graphs"]["cpu-int8"]["scoring"] == "step by step"


def test_a_tampered_scoring_twin_is_refused(trained_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(trained_bundle, bad)
    twin = bad / json.loads((bad / "manifest.json").read_text())["graphs"]["cpu-fp32"]["score"]["file"]
    data = bytearray(twin.read_bytes())
    data[-5] ^= 1
    twin.write_bytes(bytes(data))
    from cpm_deploy.runtime import BundleError

    with pytest.raises(BundleError, match="checksum mismatch"):
        open_scorer(bad, "cpu-fp32")


def test_perplexity_through_the_cli_in_one_pass(trained_bundle, tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(corpus_lines(10)), encoding="utf-8")
    report = tmp_path / "p.json"
    result = CliRunner().invoke(eval_cli, [str(trained_bundle), "-T", "perplexity", "-d", str(tmp_path / "t.txt"),
                                           "-g", "cpu-fp32", "-g", "cpu-int4", "-q", "-o", str(report)])
    assert result.exit_code == 0, result.output
    r = json.loads(report.read_text())["graphs"]
    assert r["cpu-fp32"]["scoring"] == r["cpu-int4"]["scoring"] == "one pass"
    assert 1 < r["cpu-fp32"]["perplexity"] < 30000 and r["cpu-int4"]["perplexity"] != r["cpu-fp32"]["perplexity"]


def test_a_manifest_naming_another_graph_as_the_twin_is_refused(trained_bundle, tmp_path):
    from cpm_deploy.runtime import BundleError

    bad = tmp_path / "bad"
    shutil.copytree(trained_bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    graph = manifest["graphs"]["cpu-fp32"]
    graph["score"] = {"file": graph["file"], "data": graph["data"]}  # the generation graph itself
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="is not a scoring graph"):
        open_scorer(bad, "cpu-fp32")
