"""Scoring over the API: ``logprobs`` and ``echo`` on /v1/completions against the reference model,
the tokenizer routes, and the Hugging Face tokenizer files in the bundle."""

import json

import httpx
import numpy as np
import openai
import pytest
import torch

from conftest import corpus_lines
from cpm_deploy.exporter.quality import SCORE_GATES
from serve_helpers import serve_process

PROMPTS = [line[:12] for line in corpus_lines(60)[40:46]]


@pytest.fixture(scope="module")
def servers(trained_bundle):
    with serve_process(trained_bundle, "-g", "cpu-fp32", "-t", "1", "--max-batch", "4") as (_, fp32), \
            serve_process(trained_bundle, "-g", "cpu-int8", "-t", "1", "--max-batch", "4") as (_, int8):
        yield {"cpu-fp32": fp32, "cpu-int8": int8}


@pytest.fixture(scope="module")
def reference(trained_hf):
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(trained_hf).eval()


def ref_logprobs(model, ids: list[int]) -> np.ndarray:
    """log p(ids[i+1] | ids[:i+1]) and the argmax at each position, by the reference model."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1).numpy()
    return lp


def post(base, body):
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    return r.status_code, r.json()


@pytest.mark.parametrize("graph", ["cpu-fp32", "cpu-int8"])
def test_echoed_logprobs_are_the_reference_model_s(servers, reference, trained_generator, graph):
    ids = [trained_generator.tokenizer.encode(p) for p in PROMPTS[:3]]
    status, body = post(servers[graph], {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 0
    gaps = []
    for row, choice in zip(ids, body["choices"]):
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and choice["finish_reason"] == "length"
        want = ref_logprobs(reference, row)
        got = np.array(lp["token_logprobs"][1:])
        gaps += list(np.abs(got - want[np.arange(len(row) - 1), row[1:]]))
        for i, top in enumerate(lp["top_logprobs"][1:]):
            assert len(top) <= 3 and list(top.values()) == sorted(top.values(), reverse=True)
            if graph == "cpu-fp32":  # the best alternative is the reference's greedy token
                best = trained_generator.tokenizer.decode([int(want[i].argmax())])
                assert next(iter(top)) == best and abs(top[best] - want[i].max()) < 1e-4
        assert "".join(lp["tokens"]) == choice["text"] and lp["text_offset"][0] == 0
    if graph == "cpu-fp32":
        assert max(gaps) <= 1e-4
    else:
        assert np.mean(gaps) <= SCORE_GATES["int8"]["mean_abs_diff"]


def test_generated_tokens_are_the_best_alternative_and_stream_the_same(servers, trained_generator):
    base = servers["cpu-fp32"]
    body = {"prompt": PROMPTS[3], "max_tokens": 8, "temperature": 0, "logprobs": 5}
    status, whole = post(base, body)
    assert status == 200
    lp = whole["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == whole["choices"][0]["text"]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 5 and next(iter(top)) == token and top[token] == logprob  # greedy: the argmax
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    chunks = list(client.completions.create(model="bundle", prompt=PROMPTS[3], max_tokens=8, temperature=0,
                                            logprobs=5, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert streamed == lp["tokens"] and offsets == lp["text_offset"]
    # sampling settings do not change the numbers reported (the raw distribution)
    status, hot = post(base, body | {"temperature": 1.5, "seed": 3})
    first = hot["choices"][0]["logprobs"]
    assert first["top_logprobs"][0] == lp["top_logprobs"][0]


def test_an_echo_of_one_greedy_token_is_the_echo_and_generation_of_it(servers, trained_generator):
    """What lm-eval sends (echo, logprobs 1, max_tokens 1): answered from the scoring pass alone,
    the same as an echo whose token is decoded (a penalty of 0.01 forces the decoding path)."""
    base = servers["cpu-fp32"]
    body = {"prompt": PROMPTS[4], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    _, fast = post(base, body)
    _, decoded = post(base, body | {"presence_penalty": 0.01})
    a, b = fast["choices"][0], decoded["choices"][0]
    assert a["text"] == b["text"] and a["text"].startswith(PROMPTS[4]) and fast["usage"] == decoded["usage"]
    assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
    np.testing.assert_allclose(a["logprobs"]["token_logprobs"][1:], b["logprobs"]["token_logprobs"][1:], atol=1e-4)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "清华", "logprobs": 6}, "logprobs"),
    ({"prompt": "清华", "logprobs": -1}, "logprobs"),
    ({"prompt": "清华", "echo": True, "n": 2}, "n"),
    ({"prompt": "清华", "max_tokens": 0}, "max_tokens"),
    ({"prompt": [5] * 200, "max_tokens": 0, "echo": True, "logprobs": 1}, "prompt"),  # 128 positions
    ({"prompt": [5] * 200, "max_tokens": 2}, None),
    ({"prompt": [10 ** 6], "max_tokens": 0, "echo": True}, None),  # an echo alone still checks its ids
])
def test_bad_scoring_requests_get_openai_shaped_400s(servers, body, param):
    status, answer = post(servers["cpu-fp32"], body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert param is None or answer["error"]["param"] == param


def test_tokenize_routes_round_trip_and_refuse_what_is_not_text(servers, trained_generator):
    base = servers["cpu-int8"]
    text = "清华大学是中国著名的高等学府<eod>"
    tok = httpx.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30).json()
    assert tok["tokens"] == trained_generator.tokenizer.encode(text[:-5]) + [7]  # <eod> read as the token
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 128
    assert httpx.post(f"{base}/detokenize", json={"tokens": tok["tokens"]}, timeout=30).json()["prompt"] == text
    info = httpx.get(f"{base}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "<eod>" and info["pad_token"] == "<pad>" and info["bos_token"] is None
    for route, body in (("tokenize", {"prompt": 5}), ("tokenize", {"prompt": ["a"]}), ("detokenize", {"tokens": "x"}),
                        ("detokenize", {"tokens": [10 ** 6]}), ("tokenize", "not json")):
        r = httpx.post(f"{base}/{route}", content=json.dumps(body) if isinstance(body, dict) else body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (route, body)
    schemas = httpx.get(f"{base}/openapi.json", timeout=30).json()
    assert {"TokenizeRequest", "DetokenizeRequest", "CompletionRequest"} <= set(schemas["components"]["schemas"])
    assert "/tokenize" in schemas["paths"] and "/tokenizer_info" in schemas["paths"]


def test_the_bundle_s_hugging_face_tokenizer_encodes_as_the_runtime(trained_bundle, trained_generator):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(trained_bundle, trust_remote_code=True)
    ours = trained_generator.tokenizer
    texts = corpus_lines(2000) + ["  两个空格  ", "ｆｕｌｌ　全角，句号。", "换行\n再换行\n\n", "Café naïve", "<eod>结束"]
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == [ours.encode_with_special(t) for t in texts]
    assert hf.encode("清华大学") == ours.encode("清华大学")  # nothing added around a text
    assert hf.decode(ours.encode("换行\n再 换行")) == "换行\n再 换行"
    assert (hf.eos_token_id, hf.pad_token_id, hf.model_max_length) == (7, ours.pad_id, 128)


FIELDS = {"prompt": ["", "清华", [], [5], [[]], [[5, 6], [7]], [10 ** 6], ["a", ""], 3, None, [5] * 130, "x" * 300],
          "max_tokens": [0, 1, 2, -1, None, "3", 200], "echo": [True, False, None, "yes"],
          "logprobs": [0, 1, 5, 6, -1, None, True, 2.5], "n": [1, 2, 0, None], "stream": [True, False],
          "temperature": [0, 1, None], "stop": ["", "，", None, ["a"]], "presence_penalty": [0, 0.5]}


def test_random_combinations_of_the_scoring_fields_never_get_a_500(servers):
    """A bounded, seeded fuzz over the fields this issue added and their neighbours."""
    import random

    rng, failures = random.Random(0), []
    for _ in range(150):
        body = {k: rng.choice(v) for k, v in FIELDS.items() if rng.random() < 0.6}
        body.setdefault("prompt", "清华")
        r = httpx.post(f"{servers['cpu-fp32']}/v1/completions", json=body, timeout=60)
        if r.status_code >= 500 or (r.status_code == 200 and "server_error" in r.text):
            failures.append((body, r.status_code, r.text[:200]))
    assert failures == []
