"""The engine as a Ray Serve application on a real two-node Ray cluster on this machine (loopback):
two replicas, one per node, requests landing on both, streaming through Ray's HTTP proxy."""

import re

from ray_helpers import two_node_cluster  # first: it keeps Ray on loopback

import httpx  # noqa: E402
import openai  # noqa: E402
import pytest  # noqa: E402

ray = pytest.importorskip("ray", reason="Ray Serve needs the [ray] extra")
from ray import serve  # noqa: E402

from conftest import ROOT  # noqa: E402
from serve_helpers import free_port  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster():
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
        serve.shutdown()


def readme_serve_config() -> dict:
    import yaml

    block = re.search(r"```yaml\n(applications:.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert block, "README lost its Serve config example"
    return yaml.safe_load(block.group(1))["applications"][0]


def test_two_replicas_serve_through_the_proxy(cluster, trained_bundle, trained_generator):
    from cpm_deploy.serve.ray_app import build_app

    # the arguments as `serve run ... bundle=DIR num_replicas=2` hands them over: strings
    args = {"bundle": str(trained_bundle), "graph": "cpu-fp32", "num_replicas": "2", "max_batch": "4"}
    serve.run(build_app(args), name="cpm", route_prefix="/")
    assert httpx.get(f"{cluster}/health", timeout=30).json()["status"] == "ready"

    replicas = set()
    for _ in range(20):
        r = httpx.post(f"{cluster}/v1/completions", json={"prompt": "清华大学", "max_tokens": 6, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200
        replicas.add(r.headers["x-cpm-replica"])
    assert len(replicas) == 2 and len({r.split(":")[0] for r in replicas}) == 2  # two replicas on two nodes
    want = trained_generator("清华大学", max_new_tokens=6)[0]["generated_text"][4:]
    assert r.json()["choices"][0]["text"] == want

    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0, timeout=60)
    chunks = list(client.completions.create(model="bundle", prompt="清华大学", max_tokens=6, temperature=0, stream=True))
    assert len(chunks) >= 2 and "".join(c.choices[0].text for c in chunks) == want
    bad = httpx.post(f"{cluster}/v1/completions", json={"prompt": "清华", "n": 0}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
    # scoring over the API: the tokenizer routes and an echo with logprobs, through Ray's proxy
    ids = httpx.post(f"{cluster}/tokenize", json={"prompt": "清华大学是中国"}, timeout=30).json()["tokens"]
    assert ids == trained_generator.tokenizer.encode("清华大学是中国")
    assert httpx.post(f"{cluster}/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"] == "清华大学是中国"
    echo = httpx.post(f"{cluster}/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2},
                      timeout=60).json()["choices"][0]["logprobs"]
    assert echo["token_logprobs"][0] is None and len(echo["token_logprobs"]) == len(ids) and len(echo["top_logprobs"][1]) == 2
    for body in ({"prompt": "清华", "logprobs": 6}, {"prompt": "清华", "max_tokens": 0}):
        assert httpx.post(f"{cluster}/v1/completions", json=body, timeout=30).status_code == 400
    page = httpx.get(f"{cluster}/", timeout=30)  # the playground, behind Ray's proxy too
    assert page.status_code == 200 and "CPM playground" in page.text
    chat = httpx.post(f"{cluster}/v1/chat/completions", json={"messages": []}, timeout=30)
    assert chat.status_code == 404 and "/v1/completions" in chat.json()["error"]["message"]
    serve.delete("cpm")


def test_the_readme_serve_config_deploys(cluster, trained_bundle):
    """What `serve deploy` does with the README's config: import the builder, call it with the args."""
    import importlib

    app = readme_serve_config()
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    args = {**app["args"], "bundle": str(trained_bundle), "max_replicas": 2}
    serve.run(builder(args), name=app["name"], route_prefix=app["route_prefix"])
    # greedy: at the API's default temperature (1) the trained model may sample <eod> within 3 tokens
    r = httpx.post(f"{cluster}/v1/completions", json={"prompt": "清华", "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    serve.delete(app["name"])
