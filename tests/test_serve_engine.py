"""The continuous-batching engine on the briefly trained tiny model: batching never changes results,
requests join and leave the running batch, and faults stay with the request that caused them."""

import queue
import threading
import time

import numpy as np
import pytest

from conftest import corpus_lines
from cpm_deploy.runtime import CPMGenerator
from cpm_deploy.engine import Engine, EngineError, QueueFull, RequestError

PROMPTS = [line[:5] for line in corpus_lines(40)[20:36]]  # headline starts: the model continues them


@pytest.fixture(scope="module")
def engine(trained_bundle):
    with Engine.from_bundle(trained_bundle, graph="cpu-fp32", threads=1, max_batch=8, max_queue=64) as e:
        yield e


@pytest.fixture(scope="module")
def endless(trained_bundle):
    """An engine whose sequences never end at <eod>: they run to max_tokens unless stopped."""
    with Engine.from_bundle(trained_bundle, graph="cpu-fp32", threads=1, max_batch=4) as e:
        e.generator.eod_id = -1
        yield e


def alone(gen, prompt, n_new, **sampling):
    return gen(prompt, max_new_tokens=n_new, **sampling)[0]["generated_text"][len(prompt):]


def run_concurrently(engine, calls):
    """Each call (prompt, max_new, sampling) from its own thread at once; results in call order."""
    out = [None] * len(calls)

    def work(i, prompt, n_new, sampling):
        out[i] = engine.complete(prompt, n_new, **sampling)[0]["text"]

    threads = [threading.Thread(target=work, args=(i, *c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_greedy_under_load_equals_alone(engine, trained_generator):
    calls = [(p, 6 + 3 * (i % 5), {}) for i, p in enumerate(PROMPTS)]  # 16 requests for 8 slots, mixed lengths
    want = [alone(trained_generator, p, n) for p, n, _ in calls]
    assert run_concurrently(engine, calls) == want
    assert engine.metrics.running._value.get() == 0 and not engine.scheduler.rows
    # the batch narrowed as requests finished: one step binding per width, all writing their
    # logits into rows of one buffer
    assert len(engine.runner.steps) > 1
    assert all(np.shares_memory(b.logits, engine.runner.logits) for b in engine.runner.steps.values())


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(engine, trained_generator):
    sampled = {"do_sample": True, "top_p": 0.9, "temperature": 0.8, "seed": 7}
    target = (PROMPTS[0], 12, sampled)
    noise = [(p, 5 + i, {"do_sample": True}) for i, p in enumerate(PROMPTS[1:7])]  # unseeded neighbours
    first = run_concurrently(engine, [target] + noise)[0]
    second = run_concurrently(engine, noise[:3] + [target])[3]
    assert first == second == alone(trained_generator, PROMPTS[0], 12, **sampled)


def test_openai_penalties_and_logit_bias_take_effect_as_in_the_generator(engine, trained_generator):
    # greedy with <eod> banned for 40 tokens: the tiny model repeats itself, which the penalties
    # must curb (they touch only tokens already generated, so short outputs would not show them)
    endless = {"logit_bias": ((trained_generator.eod_id, -100.0),)}
    penalised = {**endless, "presence_penalty": 2.0, "frequency_penalty": 2.0}
    plain_ids = trained_generator.generate_ids([PROMPTS[1]], max_new_tokens=40, **endless)[0]
    penalised_ids = trained_generator.generate_ids([PROMPTS[1]], max_new_tokens=40, **penalised)[0]
    assert max(np.bincount(penalised_ids)) < max(np.bincount(plain_ids))
    got = run_concurrently(engine, [(PROMPTS[1], 40, penalised), (PROMPTS[2], 9, {"do_sample": True})])[0]
    assert got == alone(trained_generator, PROMPTS[1], 40, **penalised) != alone(trained_generator, PROMPTS[1], 40,
                                                                                   **endless)

    forced = trained_generator.tokenizer.encode("股")[-1]
    text = engine.complete(PROMPTS[1], 4, do_sample=True, logit_bias=((forced, 100.0),))[0]["text"]
    assert text == trained_generator.tokenizer.decode([forced] * 4)
    greedy = trained_generator.generate_ids([PROMPTS[1]], max_new_tokens=1)[0][0]
    banned = {greedy: -100.0}
    assert trained_generator.generate_ids([PROMPTS[1]], max_new_tokens=1, logit_bias=banned)[0][0] != greedy
    assert engine.complete(PROMPTS[1], 3, logit_bias=tuple(banned.items()))[0]["text"] == \
        alone(trained_generator, PROMPTS[1], 3, logit_bias=banned)
    with pytest.raises(RequestError, match="logit_bias token ids"):
        engine.make_request(PROMPTS[1], 2, logit_bias=((10**6, 1.0),))


def test_n_choices_differ_and_repeat_with_the_seed(engine):
    prompt = [100, 2000, 5000]  # token ids the model never saw together: its next-token choice is open
    a = engine.complete(prompt, 10, n=3, do_sample=True, temperature=1.5, seed=3)
    assert a == engine.complete(prompt, 10, n=3, do_sample=True, temperature=1.5, seed=3)
    assert len({c["text"] for c in a}) > 1


def test_every_choice_of_a_seeded_request_equals_the_generator_s(engine, trained_generator):
    """The engine and the generator decode through one per-sequence step (runtime/generation/step.py):
    n seeded choices on the server are the generator's num_return_sequences, whatever else runs."""
    cfg = {"do_sample": True, "temperature": 1.3, "top_k": 40, "repetition_penalty": 1.2, "frequency_penalty": 0.5,
           "seed": 11}
    want = [c["generated_text"][len(PROMPTS[3]):] for c in
            trained_generator(PROMPTS[3], max_new_tokens=10, num_return_sequences=3, **cfg)]
    assert len(set(want)) > 1
    noise = threading.Thread(target=run_concurrently, args=(engine, [(PROMPTS[4], 7, {"do_sample": True})] * 3))
    noise.start()
    got = [c["text"] for c in engine.complete(PROMPTS[3], 10, n=3, **cfg)]
    noise.join(60)
    assert got == want


def test_stop_strings_and_finish_reasons(engine, trained_generator):
    full = alone(trained_generator, PROMPTS[2], 12)
    stop = full[3:5]
    out = engine.complete(PROMPTS[2], 12, stop=[stop])[0]
    assert out == {**out, "text": full[:full.index(stop)], "finish_reason": "stop"}
    assert engine.complete(PROMPTS[2], 3)[0]["finish_reason"] == "length"


def test_a_request_joins_a_running_batch_without_waiting(endless):
    events = queue.Queue()
    long = endless.submit(endless.make_request(PROMPTS[3], 120, sink=events.put))
    while events.get(timeout=10).kind != "token":
        pass
    short = endless.complete(PROMPTS[4], 2)  # joins at the next step, leaves two steps later
    assert short[0]["tokens"] == 2 and not long.finished
    while not long.finished:
        time.sleep(0.01)
    assert len(long.sequences[0].generated) == 120


def test_cancelled_and_timed_out_requests_free_their_slots(endless):
    engine = endless
    events = queue.Queue()
    r = engine.submit(engine.make_request(PROMPTS[5], 100, sink=events.put))
    events.get(timeout=10)
    r.cancel()
    while (ev := events.get(timeout=10)).kind != "finish":
        pass
    assert ev.reason == "cancelled"
    slow = engine.submit(engine.make_request(PROMPTS[6], 100, timeout_s=1e-4, sink=events.put))
    while (ev := events.get(timeout=10)).kind != "finish":
        pass
    assert ev.reason == "timeout" and slow.finished
    deadline = time.time() + 5
    while engine.scheduler.rows and time.time() < deadline:
        time.sleep(0.01)
    assert not engine.scheduler.rows


def test_bad_requests_are_refused_before_they_queue(engine):
    for kwargs, match in [({"max_new_tokens": 0}, "max_tokens"), ({"max_new_tokens": 500}, "positions"),
                          ({"max_new_tokens": 4, "n": 9}, "n must be"), ({"max_new_tokens": 4, "top_p": 2.0}, "top_p")]:
        with pytest.raises(RequestError, match=match):
            engine.make_request(PROMPTS[0], **kwargs)
    with pytest.raises(RequestError, match="surrogate"):
        engine.make_request("\ud800", 4)
    for ids in ([5, -1], [5, 10**6]):  # token-id prompts are checked against the vocabulary
        with pytest.raises(RequestError, match="token ids"):
            engine.make_request(ids, 4)
    assert 1 <= engine.complete([30, 40, 50], 3)[0]["tokens"] <= 3


def test_a_failing_step_fails_only_its_requests(trained_bundle, trained_generator):
    poison = trained_generator.tokenizer.encode("股市")[0]
    with Engine.from_bundle(trained_bundle, graph="cpu-fp32", threads=1, max_batch=4) as e:
        e.generator.eod_id = -1  # the bystander runs its full length
        real = e.decoder.run_prefill

        def run_prefill(rows, past, pad_id=0, cached=None):
            if any(poison in r for r in rows):
                raise RuntimeError("injected failure")
            return real(rows, past, pad_id, cached)

        e.decoder.run_prefill = run_prefill
        events = queue.Queue()
        ok = e.submit(e.make_request(PROMPTS[7], 30, sink=events.put))
        events.get(timeout=10)
        with pytest.raises(EngineError, match="injected failure"):
            e.complete("股市", 4)
        while not ok.finished:
            time.sleep(0.01)
        assert ok.sequences[0].finish_reason == "length" and len(ok.sequences[0].generated) == 30
        assert e.complete(PROMPTS[8], 3)[0]["tokens"] == 3


def test_a_request_whose_setup_fails_is_answered_not_stranded(trained_bundle, monkeypatch):
    import cpm_deploy.engine.engine as engine_module

    real = engine_module.make_sequences

    def make_sequences(request, *args):
        if request.max_new_tokens == 5:
            raise RuntimeError("injected setup failure")
        return real(request, *args)

    monkeypatch.setattr(engine_module, "make_sequences", make_sequences)
    with Engine.from_bundle(trained_bundle, graph="cpu-fp32", threads=1, max_batch=4) as e:
        events = queue.Queue()
        e.submit(e.make_request(PROMPTS[0], 5, sink=events.put))  # admitted, then its setup fails
        ev = events.get(timeout=10)
        assert ev.kind == "error" and "injected setup failure" in ev.text
        assert e.complete(PROMPTS[1], 3)[0]["tokens"] == 3


def test_a_full_queue_refuses_at_once(trained_bundle):
    e = Engine.from_bundle(trained_bundle, graph="cpu-fp32", threads=1, max_batch=1, max_queue=2)  # not started
    for _ in range(2):
        e.submit(e.make_request(PROMPTS[0], 4))
    with pytest.raises(QueueFull):
        e.submit(e.make_request(PROMPTS[0], 4))
    e.start()
    e.shutdown(drain_s=10)
    assert not e.scheduler.waiting and not e.scheduler.rows
    with pytest.raises(EngineError, match="shutting down"):
        e.submit(e.make_request(PROMPTS[0], 4))


def test_the_concatenating_graph_is_refused(trained_bundle):
    with pytest.raises(EngineError, match="shared-KV graph"):
        Engine(CPMGenerator.from_bundle(trained_bundle, variant="decoder_last"))


def test_int4_engine_runs_prompts_on_the_int8_graph(trained_bundle):
    """cpu-int4 brings a second session for prompts; the engine's pool serves both. One request at a
    time equals the generator alone (int8 prompts share one activation scale per call, so batched
    prefills may differ slightly: that is not asserted)."""
    gen = CPMGenerator.from_bundle(trained_bundle, variant="cpu-int4", threads=1)
    with Engine.from_bundle(trained_bundle, graph="cpu-int4", threads=1, max_batch=4) as e:
        assert e.decoder.prefill_session is not e.decoder.session
        for prompt in PROMPTS[:3]:
            assert e.complete(prompt, 8)[0]["text"] == alone(gen, prompt, 8)
        assert len(run_concurrently(e, [(p, 5, {}) for p in PROMPTS[:6]])) == 6 and not e.scheduler.rows


def test_ready_means_warm_every_batch_width_has_run_before_the_first_request(trained_bundle, trained_generator):
    cold = Engine.from_bundle(trained_bundle, graph="cpu-fp32", threads=1, max_batch=5, warm_up=False).start()
    warm = Engine.from_bundle(trained_bundle, graph="cpu-fp32", threads=1, max_batch=5).start()
    try:
        assert not cold.runner.steps and sorted(warm.runner.steps) == [1, 2, 3, 4, 5] and warm.warm_up_s > 0
        # what warm-up wrote into the KV pool is never read: a burst right after ready equals the runtime alone
        prompts = corpus_lines(40)[20:25]
        events = {i: queue.Queue() for i in range(5)}
        requests = [warm.submit(warm.make_request(p, 6, sink=events[i].put, do_sample=False))
                    for i, p in enumerate(prompts)]
        assert len(requests) == 5
        for i, p in enumerate(prompts):
            text = ""
            while (ev := events[i].get(timeout=60)).kind != "finish":
                text += ev.text
            assert text == alone(trained_generator, p, 6)
    finally:
        cold.shutdown()
        warm.shutdown()
