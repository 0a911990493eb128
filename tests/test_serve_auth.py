"""An API key, the way OpenAI-compatible servers take one: the official openai client's api_key works,
anything else is a 401 in OpenAI's error shape, /health stays open, /metrics is guarded unless asked."""

import httpx
import openai
import pytest
from click.testing import CliRunner

from serve_helpers import serve_in_thread

KEY = "sk-test-0123456789"


@pytest.fixture
def engine(trained_bundle):
    """A started engine; the app that serves it shuts it down when its server stops."""
    from cpm_deploy.engine.engine import Engine

    return Engine.from_bundle(trained_bundle, graph="cpu-fp32", threads=1, max_batch=4).start()


@pytest.mark.parametrize("open_metrics", [False, True])
def test_the_key_guards_every_route_but_health(trained_bundle, engine, open_metrics):
    from cpm_deploy.serve.app import ServerConfig, create_app

    config = ServerConfig(trained_bundle, model_name="m", api_key=KEY, open_metrics=open_metrics)
    assert KEY not in repr(config)
    with serve_in_thread(create_app(config, engine)) as base:
        good = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=30)
        done = good.completions.create(model="m", prompt="清华", max_tokens=3, temperature=0)
        assert done.usage.completion_tokens >= 1 and [m.id for m in good.models.list()] == ["m"]
        bad = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model="m", prompt="清华", max_tokens=3)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"}):
            r = httpx.post(f"{base}/v1/completions", json={"prompt": "清华"}, headers=headers, timeout=30)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"], headers
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        metrics = httpx.get(f"{base}/metrics", timeout=30)
        assert metrics.status_code == (200 if open_metrics else 401)
        keyed = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert keyed.status_code == 200 and b"cpm_generated_tokens_total" in keyed.content


def test_without_a_key_nothing_is_asked(trained_bundle, engine):
    from cpm_deploy.serve.app import ServerConfig, create_app

    with serve_in_thread(create_app(ServerConfig(trained_bundle, model_name="m"), engine)) as base:
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "清华", "max_tokens": 2, "temperature": 0}, timeout=30)
        assert r.status_code == 200


def test_the_cli_takes_the_key_from_the_environment_and_refuses_an_empty_one(trained_bundle, monkeypatch):
    from cpm_deploy.cli import serve as serve_cli

    seen = {}
    monkeypatch.setattr("cpm_deploy.serve.app.run", lambda config, host, port, verbose: seen.update(config=config))
    r = CliRunner().invoke(serve_cli.main, [str(trained_bundle), "-g", "cpu-fp32"], env={"CPM_SERVE_API_KEY": KEY})
    assert r.exit_code == 0, r.output
    assert seen["config"].api_key == KEY and KEY not in r.output
    empty = CliRunner().invoke(serve_cli.main, [str(trained_bundle), "--api-key", " "])
    assert empty.exit_code == 2 and "--api-key is empty" in empty.output
    exposed = CliRunner().invoke(serve_cli.main, [str(trained_bundle), "-g", "cpu-fp32", "-H", "0.0.0.0"],
                                 env={"CPM_SERVE_API_KEY": ""})
    assert "without an API key" in exposed.output


def test_ray_replicas_read_the_key_from_their_environment(monkeypatch):
    pytest.importorskip("ray", reason="Ray Serve needs the [ray] extra")
    from cpm_deploy.serve.ray_app import RayServeArgs

    monkeypatch.setenv("CPM_SERVE_API_KEY", KEY)
    assert RayServeArgs(bundle="b").server_config().api_key == KEY
    monkeypatch.setenv("OTHER_KEY", "k2")
    assert RayServeArgs(bundle="b", api_key_env="OTHER_KEY", open_metrics=True).server_config().api_key == "k2"
    monkeypatch.delenv("CPM_SERVE_API_KEY")
    assert RayServeArgs(bundle="b").server_config().api_key is None


def test_openapi_documents_the_completions_body_and_errors_keep_openais_shape(trained_bundle, engine):
    from cpm_deploy.serve.app import ServerConfig, create_app

    with serve_in_thread(create_app(ServerConfig(trained_bundle, model_name="m"), engine)) as base:
        doc = httpx.get(f"{base}/openapi.json", timeout=30).json()
        body = doc["paths"]["/v1/completions"]["post"]["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
        schema = doc["components"]["schemas"]["CompletionRequest"]
        assert {"prompt", "max_tokens", "temperature", "stream_options", "logit_bias"} <= set(schema["properties"])
        assert "prompt" in schema["required"] and "StreamOptions" in doc["components"]["schemas"]
        bad = httpx.post(f"{base}/v1/completions", json={"prompt": "清华", "max_tokens": 0}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
