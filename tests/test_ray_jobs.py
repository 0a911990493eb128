"""Offline jobs and cpm-eval on a real two-node Ray cluster on this machine (loopback): records and
predictions equal a local run's, and a worker that dies mid-job neither loses nor repeats a line.
Both nodes share this machine's cores: these runs show correctness, not speed."""

import json

from ray_helpers import two_node_cluster  # first: it keeps Ray on loopback

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

ray = pytest.importorskip("ray", reason="Ray jobs need the [ray] extra")

from cpm_deploy.cli.eval import main as eval_cli  # noqa: E402
from cpm_deploy.cli.run import main as run_cli  # noqa: E402
from test_eval_method import write_labelled  # noqa: E402
from test_offline import PROMPTS  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster() as address:
        yield address


def test_a_prompt_file_on_two_nodes_equals_the_local_run(cluster, trained_bundle, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    common = [str(trained_bundle), "-f", str(tmp_path / "p.txt"), "-g", "cpu-fp32", "-n", "8", "-s", "--seed", "5", "-q"]
    local = CliRunner().invoke(run_cli, [*common, "-o", str(tmp_path / "local.jsonl")])
    remote = CliRunner().invoke(run_cli, [*common, "-o", str(tmp_path / "ray.jsonl"), "--ray", cluster,
                                          "--workers", "2"])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    got = (tmp_path / "ray.jsonl").read_text(encoding="utf-8")
    assert got == (tmp_path / "local.jsonl").read_text(encoding="utf-8") and got.count("\n") == len(PROMPTS)


def test_a_worker_that_dies_mid_job_is_retried_without_losing_or_repeating_lines(cluster, trained_bundle):
    from cpm_deploy.jobs import ray_job
    from cpm_deploy.jobs.offline_formats import parse

    lines = [parse(n, p, "text", {"max_new_tokens": 6}) for n, p in enumerate(PROMPTS, 1)]
    worker = ray_job.GenerationWorker.options(num_cpus=1)
    pool = [worker.remote(str(trained_bundle), "cpu-fp32", 1, 4, False, "m") for _ in range(2)]
    want = [r for part in ray_job.ordered(pool, ray_job.chunked(lines, 4), lambda w, c: w.run.remote(c)) for r in part]
    victim = pool[1]
    before = ray.get(victim.pid.remote())
    got, killed = [], False

    def submit(w, chunk):
        nonlocal killed
        ref = w.run.remote(chunk)
        if w is victim and not killed:  # dies with this chunk (and maybe the next) in flight
            ray.kill(victim, no_restart=False)
            killed = True
        return ref

    for part in ray_job.ordered(pool, ray_job.chunked(lines, 4), submit):
        got += part
    assert killed and ray.get(victim.pid.remote()) != before  # restarted: a new process
    assert got == want and [r["prompt"] for r in got] == PROMPTS


def test_cpm_eval_shards_on_ray_give_the_local_report(cluster, trained_bundle, tmp_path):
    data = write_labelled(tmp_path / "tnews", "tnews", n_dev=40)
    args = [str(trained_bundle), "-T", "tnews", "-d", str(data), "-g", "cpu-int8", "-q"]
    local = CliRunner().invoke(eval_cli, [*args, "-o", str(tmp_path / "local.json")])
    remote = CliRunner().invoke(eval_cli, [*args, "-o", str(tmp_path / "ray.json"), "--ray", cluster])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    a, b = (json.loads((tmp_path / f).read_text())["graphs"]["cpu-int8"] for f in ("local.json", "ray.json"))
    assert b["scores"] == a["scores"] and b["predictions"] == a["predictions"]  # int8 included: whole calls
    assert b["accuracy"] == a["accuracy"] and b["scoring"] == "one pass, on Ray" and b["ray_workers"] == 2
