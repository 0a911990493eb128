"""cpm-serve as a real process on loopback, driven by the official openai client and by httpx."""

import json
import signal
import threading
import time

import httpx
import openai
import pytest

from conftest import corpus_lines
from serve_helpers import metric, serve_in_thread, serve_process

PROMPTS = [line[:5] for line in corpus_lines(60)[40:56]]


@pytest.fixture(scope="module")
def trained_server(trained_bundle):
    with serve_process(trained_bundle, "-g", "cpu-fp32", "-t", "1", "--max-batch", "4") as (_, base):
        yield base


@pytest.fixture(scope="module")
def client(trained_server):
    return openai.OpenAI(base_url=f"{trained_server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def busy_server(tiny_bundle):
    """Random weights (sequences rarely end early: 1000 tokens take 0.3-1 s), one slot, one queue place."""
    with serve_process(tiny_bundle, "-g", "cpu-fp32", "-t", "1", "--max-batch", "1", "--max-queue", "1") as (_, base):
        yield base


# Holds a slot for 0.3-1 s (1000 tokens; a warmed-up server is at the short end). Greedy: sampled at the API's default
# temperature, the random model drew <eod> within 0.3 s in ~1 of 20 requests; greedy, the seeded
# weights fix whether it ends early (it does not).
LONG_GREEDY = {"prompt": "清华", "max_tokens": 1000, "temperature": 0}


def alone(gen, prompt, n, **sampling):
    return gen(prompt, max_new_tokens=n, **sampling)[0]["generated_text"][len(prompt):]


def test_routes_answer_like_openai(trained_server, client):
    assert httpx.get(f"{trained_server}/health").json()["status"] == "ready"
    assert [m.id for m in client.models.list().data] == ["bundle"]
    text = httpx.get(f"{trained_server}/metrics").text
    for name in ("cpm_queue_depth", "cpm_running_sequences", "cpm_generated_tokens_total",
                 "cpm_time_to_first_token_seconds_bucket", "cpm_inter_token_latency_seconds_bucket"):
        assert name in text


def test_openai_client_greedy_equals_the_runtime_alone(client, trained_generator):
    for prompt in PROMPTS[:3]:
        r = client.completions.create(model="bundle", prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == alone(trained_generator, prompt, 12)
        assert r.usage.prompt_tokens == len(trained_generator.tokenizer.encode(prompt))
        assert r.choices[0].finish_reason in ("stop", "length")


def test_a_shared_prefix_is_reused_and_reported_in_usage_and_metrics(trained_server, client, trained_generator):
    template = "，".join(corpus_lines(60)[40:43]) + "。\n"
    hits_before = metric(trained_server, "cpm_prefix_cache_hits_total")
    first = client.completions.create(model="bundle", prompt=template + PROMPTS[0], max_tokens=4, temperature=0)
    second = client.completions.create(model="bundle", prompt=template + PROMPTS[1], max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 40 < cached < second.usage.prompt_tokens
    assert second.choices[0].text == alone(trained_generator, template + PROMPTS[1], 4)
    assert metric(trained_server, "cpm_prefix_cache_hits_total") - hits_before == cached
    assert metric(trained_server, "cpm_prefix_cache_queries_total") >= first.usage.prompt_tokens + second.usage.prompt_tokens
    stream = client.completions.create(model="bundle", prompt=template + PROMPTS[2], max_tokens=4, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage][0]
    assert usage.prompt_tokens_details.cached_tokens > 40


def test_openai_client_streams_the_same_text_with_usage_last(client):
    plain = client.completions.create(model="bundle", prompt=PROMPTS[3], max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="bundle", prompt=PROMPTS[3], max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_greedy_under_concurrent_load_equals_alone(client, trained_generator):
    want = {p: alone(trained_generator, p, 8) for p in PROMPTS}
    got = {}

    def call(p):
        got[p] = client.completions.create(model="bundle", prompt=p, max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=call, args=(p,)) for p in PROMPTS]  # 16 clients, 4 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_prompt_lists_n_seed_stop_and_extra_fields_over_httpx(trained_server):
    body = {"prompt": PROMPTS[:2], "max_tokens": 8, "n": 2, "temperature": 0.9, "seed": 5, "top_k": 20,
            "repetition_penalty": 1.2}
    a = httpx.post(f"{trained_server}/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2, 3]
    assert a == {**httpx.post(f"{trained_server}/v1/completions", json=body, timeout=60).json(), "id": a["id"],
                 "created": a["created"]}  # seeded: the same choices again
    full = httpx.post(f"{trained_server}/v1/completions", json={"prompt": PROMPTS[4], "max_tokens": 12, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    if len(text) >= 4:
        cut = httpx.post(f"{trained_server}/v1/completions", json={"prompt": PROMPTS[4], "max_tokens": 12, "temperature": 0,
                                                                    "stop": [text[2:4]]}).json()["choices"][0]
        assert (cut["text"], cut["finish_reason"]) == (text[:text.index(text[2:4])], "stop")


@pytest.mark.parametrize("body, param", [
    ({"prompt": "清华", "n": 0}, "n"),
    ({"prompt": "清华", "max_tokens": 2000}, None),
    ({"prompt": "清华" * 400, "max_tokens": 4}, None),
    ({"prompt": "清华", "top_p": 1.5}, "top_p"),
    ({"prompt": "清华", "max_tokens": "x"}, "max_tokens"),
    ({"prompt": "清华", "temperature": "hot"}, "temperature"),
    ({"prompt": []}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "清华", "logprobs": 9}, "logprobs"),
    ({"prompt": [5, 99999999], "max_tokens": 2}, None),
    ({"prompt": ["清华", ""], "max_tokens": 2}, None),
    ({"prompt": [[5, 6], []]}, "prompt"),
    ({"prompt": [[5, 6], "清华"]}, "prompt"),
    ({"prompt": "清华", "stop": ["", "x"]}, "stop"),
    ({"prompt": "清华", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "清华", "frequency_penalty": "high"}, "frequency_penalty"),
    ({"prompt": "清华", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "清华", "logit_bias": {"x5": 1}}, "logit_bias"),
    ({"prompt": "清华", "logit_bias": {"99999999": 1}}, None),
    ({"prompt": "清华", "seed": -1}, None),
    ({"prompt": "清华", "logit_bias": {str(i): 1 for i in range(2000)}}, "logit_bias"),
])
def test_bad_requests_get_openai_shaped_400s_and_disturb_nothing(trained_server, client, body, param):
    stream = client.completions.create(model="bundle", prompt=PROMPTS[5], max_tokens=10, temperature=0, stream=True)
    r = httpx.post(f"{trained_server}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and (param is None or err["param"] == param)
    assert "".join(c.choices[0].text for c in stream if c.choices) == client.completions.create(
        model="bundle", prompt=PROMPTS[5], max_tokens=10, temperature=0).choices[0].text
    assert httpx.post(f"{trained_server}/v1/completions", content=b"{not json").status_code == 400


def test_token_id_prompts_penalties_and_logit_bias_through_the_openai_client(client, trained_generator):
    ids = [trained_generator.tokenizer.encode(p) for p in PROMPTS[:2]]
    r = client.completions.create(model="bundle", prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == [alone(trained_generator, p, 6) for p in PROMPTS[:2]]
    assert r.usage.prompt_tokens == sum(map(len, ids))

    penalised = {"presence_penalty": 1.5, "frequency_penalty": 1.0}
    r = client.completions.create(model="bundle", prompt=PROMPTS[1], max_tokens=12, seed=4, **penalised)
    assert r.choices[0].text == alone(trained_generator, PROMPTS[1], 12, do_sample=True, seed=4, **penalised)
    forced = trained_generator.tokenizer.encode("股")[-1]
    r = client.completions.create(model="bundle", prompt=PROMPTS[1], max_tokens=3, logit_bias={str(forced): 100})
    assert r.choices[0].text == trained_generator.tokenizer.decode([forced] * 3)


def test_unknown_routes_and_bodies_that_are_no_object_get_openai_shaped_errors(trained_server):
    for body in (b"[1, 2]", b"{not json"):
        err = httpx.post(f"{trained_server}/v1/completions", content=body).json()["error"]
        assert err["message"].startswith("the request body: ") and err["param"] is None
    r = httpx.post(f"{trained_server}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]


def test_oversized_bodies_and_prompt_lists_are_refused(trained_server):
    huge = httpx.post(f"{trained_server}/v1/completions", content=b'{"prompt": "' + b"x" * (5 << 20) + b'"}',
                      headers={"content-type": "application/json"}, timeout=30)
    assert huge.status_code == 413 and huge.json()["error"]["message"]
    many = httpx.post(f"{trained_server}/v1/completions", json={"prompt": ["清华"] * 100, "n": 2}, timeout=30)
    assert many.status_code == 400 and many.json()["error"]["param"] == "prompt"


def test_a_full_queue_answers_429_at_once(busy_server):
    with httpx.Client(base_url=busy_server, timeout=30) as http, \
            http.stream("POST", "/v1/completions", json=LONG_GREEDY | {"stream": True}) as running:
        lines = running.iter_lines()  # held: a dropped iterator closes the connection
        next(lines)  # decoding: the only slot is taken
        waiting = threading.Thread(target=lambda: httpx.post(f"{busy_server}/v1/completions",
                                                             json={"prompt": "清华", "max_tokens": 5}, timeout=30))
        waiting.start()
        deadline = time.time() + 5  # queued: the only queue place is taken (polled: a warm server decodes
        while metric(busy_server, "cpm_queue_depth") < 1 and time.time() < deadline:  # the 1000 tokens in ~0.3 s)
            time.sleep(0.005)
        t0 = time.perf_counter()
        r = http.post("/v1/completions", json={"prompt": "清华", "max_tokens": 5})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1" and time.perf_counter() - t0 < 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    waiting.join(30)


def test_a_request_past_its_timeout_gets_504(tiny_bundle):
    long = LONG_GREEDY
    # 1000 greedy tokens of the tiny model take about 0.3 s on an idle machine: the timeout is well under it
    with serve_process(tiny_bundle, "-g", "cpu-fp32", "-t", "1", "--timeout", "0.1") as (_, base):
        t0 = time.perf_counter()
        r = httpx.post(f"{base}/v1/completions", json=long, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout" and time.perf_counter() - t0 < 1
        s = httpx.post(f"{base}/v1/completions", json=long | {"stream": True}, timeout=30)
        assert "timed out" in json.loads(s.text.strip().rsplit("data: ", 1)[1])["error"]["message"]
        assert metric(base, "cpm_running_sequences") == 0


def test_a_disconnected_client_frees_its_slot(busy_server):
    before = metric(busy_server, "cpm_requests_total", 'outcome="cancelled"')
    with httpx.stream("POST", f"{busy_server}/v1/completions", json=LONG_GREEDY | {"stream": True}, timeout=30) as s:
        lines = s.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 1.0  # well before the 1000 tokens could finish
    while metric(busy_server, "cpm_requests_total", 'outcome="cancelled"') == before and time.time() < deadline:
        time.sleep(0.02)
    assert metric(busy_server, "cpm_requests_total", 'outcome="cancelled"') == before + 1
    assert metric(busy_server, "cpm_running_sequences") == 0
    ok = httpx.post(f"{busy_server}/v1/completions", json={"prompt": "清华", "max_tokens": 3, "temperature": 0},
                    timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_an_internal_error_fails_its_request_with_500_and_serving_goes_on(trained_bundle, trained_generator):
    from cpm_deploy.serve.app import ServerConfig, create_app
    from cpm_deploy.engine.engine import Engine

    engine = Engine.from_bundle(trained_bundle, graph="cpu-fp32", threads=1, max_batch=4).start()
    poison = trained_generator.tokenizer.encode("股市")[0]
    real = engine.decoder.run_prefill
    engine.decoder.run_prefill = lambda rows, past, pad=0, cached=None: (
        (_ for _ in ()).throw(RuntimeError("injected")) if any(poison in r for r in rows)
        else real(rows, past, pad, cached))
    with serve_in_thread(create_app(ServerConfig(trained_bundle, model_name="m"), engine)) as base:
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "股市", "max_tokens": 3}, timeout=30)
        assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
        s = httpx.post(f"{base}/v1/completions", json={"prompt": "股市", "max_tokens": 3, "stream": True}, timeout=30)
        assert s.status_code == 200 and "injected" in json.loads(s.text.split("data: ", 1)[1])["error"]["message"]
        ok = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200


def test_health_says_loading_until_the_bundle_is_loaded(trained_bundle, monkeypatch):
    from cpm_deploy.serve.app import ServerConfig, create_app

    gate = threading.Event()
    real = ServerConfig.load
    monkeypatch.setattr(ServerConfig, "load", lambda self: (gate.wait(30), real(self))[1])
    with serve_in_thread(create_app(ServerConfig(trained_bundle, graph="cpu-fp32")), ready=False) as base:
        h = httpx.get(f"{base}/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "清华", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["Retry-After"]
        gate.set()
        deadline = time.time() + 30
        while httpx.get(f"{base}/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "清华", "max_tokens": 2}).status_code == 200


def test_sigterm_finishes_open_streams_and_exits_0(tiny_bundle):
    with serve_process(tiny_bundle, "-g", "cpu-fp32", "-t", "1", "--drain", "20") as (proc, base):
        with httpx.stream("POST", f"{base}/v1/completions", json=LONG_GREEDY | {"max_tokens": 300, "stream": True},
                          timeout=60) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health", timeout=2)


def test_cpm_serve_refuses_mistakes_in_one_line_before_listening(tmp_path, trained_bundle):
    from click.testing import CliRunner

    from cpm_deploy.cli.serve import main as serve_cli

    for args, text in [([str(tmp_path / "nope")], "no such directory"),
                       ([str(trained_bundle), "-g", "decoder_last"], "shared-KV graph (cpu-fp32, cpu-int8, cpu-int4"),
                       ([str(trained_bundle), "-g", "nope"], "has no graph 'nope'")]:
        result = CliRunner().invoke(serve_cli, args)
        assert result.exit_code == 1 and text in result.output and "Traceback" not in result.output, result.output
    assert "Examples" in CliRunner().invoke(serve_cli, ["--help"]).output
