"""Long prompts in the engine, on the briefly trained tiny model (cpu-fp32, where greedy tokens must
not change): a prefix computed once and reused across requests and slots, prompts prefilled in
chunks with the running streams decoded between them, and the faults around both."""

import time

import numpy as np
import pytest

from conftest import corpus_lines
from cpm_deploy.engine import Engine
from cpm_deploy.engine.engine import PREFIX_BLOCK

HEADLINES = corpus_lines(80)[60:76]
TEMPLATE = "，".join(corpus_lines(60)[40:43]) + "。\n"  # a few-shot block of some 60 tokens (of 128 positions)


def engine(bundle, start: bool = True, **options) -> Engine:
    options = {"graph": "cpu-fp32", "threads": 1, "max_batch": 8, "max_queue": 64, "warm_up": False, **options}
    e = Engine.from_bundle(bundle, **options)
    return e.start() if start else e


def submit(e: Engine, prompts, n_new: int = 6, **kwargs):
    return [e.submit(e.make_request(p, n_new, **kwargs)) for p in prompts]


def wait(requests, timeout: float = 60):
    end = time.time() + timeout
    while not all(r.finished for r in requests):
        assert time.time() < end, "requests did not finish"
        time.sleep(0.005)
    return [r.sequences[0].generated for r in requests]


def wait_running(r):
    while not r.sequences or r.sequences[0].state.value != "running":
        time.sleep(0.002)


def alone(gen, prompts, n_new: int = 6, **sampling):
    """Each prompt (text or ids) through the generator on its own."""
    ids = [gen.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    return [list(gen.iter_ids([p], n_new, 1, gen.sampling(**sampling)))[-1][0] for p in ids]


def common_blocks(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n // PREFIX_BLOCK * PREFIX_BLOCK


def test_a_burst_with_one_template_computes_it_once(trained_bundle, trained_generator):
    """All arrive before the first pass: the first prompt is prefilled, the others wait for its
    blocks and then prefill only what follows them."""
    e = engine(trained_bundle, start=False)
    prompts = [TEMPLATE + h for h in HEADLINES[:6]]
    reqs = submit(e, prompts)
    with e:
        got = wait(reqs)
    assert got == alone(trained_generator, prompts)
    ids = [r.prompt for r in reqs]
    assert reqs[0].cached_tokens == 0
    assert [r.cached_tokens for r in reqs[1:]] == [common_blocks(ids[0], p) for p in ids[1:]]
    assert min(r.cached_tokens for r in reqs[1:]) > 40
    prefilled = e.metrics.prompt_tokens._value.get()
    assert prefilled == sum(len(p) for p in ids) - sum(r.cached_tokens for r in reqs)
    assert e.metrics.prefix_hits._value.get() == sum(r.cached_tokens for r in reqs)
    assert e.metrics.prefix_queries._value.get() == sum(len(p) for p in ids)


def test_reuse_across_slots_and_after_a_request_finished(trained_bundle, trained_generator):
    with engine(trained_bundle, max_batch=4) as e:
        first = submit(e, [TEMPLATE + HEADLINES[0]], 30, logit_bias=((7, -100.0),))  # keeps its slot a while
        wait_running(first[0])
        beside = submit(e, [TEMPLATE + HEADLINES[1]])  # the template sits in a running slot
        assert wait(beside) == alone(trained_generator, [TEMPLATE + HEADLINES[1]])
        assert beside[0].cached_tokens > 40 and not first[0].finished
        wait(first)
        later = submit(e, [TEMPLATE + HEADLINES[2]])  # its owner has finished and left its slot
        assert wait(later) == alone(trained_generator, [TEMPLATE + HEADLINES[2]])
        assert later[0].cached_tokens == beside[0].cached_tokens


def test_a_prefix_of_a_cached_prompt_and_one_that_diverges_inside_a_block(trained_bundle, trained_generator):
    ids = trained_generator.tokenizer.encode(TEMPLATE + HEADLINES[3])
    cut = 5 * PREFIX_BLOCK
    shorter = ids[:cut]  # wholly cached: its last token is still prefilled, for its logits
    diverging = ids[:cut + 3] + [trained_generator.tokenizer.encode("股市")[0]] + ids[cut + 4:cut + 9]
    with engine(trained_bundle) as e:
        wait(submit(e, [ids]))
        reqs = submit(e, [shorter, diverging])
        assert wait(reqs) == alone(trained_generator, [shorter, diverging])
    assert [r.cached_tokens for r in reqs] == [cut - PREFIX_BLOCK, cut]


def test_eviction_keeps_the_store_within_its_budget(trained_bundle, trained_generator):
    budget = 4 * PREFIX_BLOCK
    prompts = [h * 3 for h in HEADLINES[:6]]  # each longer than the whole store
    with engine(trained_bundle, prefix_cache_tokens=budget) as e:
        for p in prompts:
            assert wait(submit(e, [p])) == alone(trained_generator, [p])
            assert e.prefix.cached_tokens <= budget
        again = submit(e, [prompts[-1]])  # the latest prefix is the one kept
        wait(again)
        stale = submit(e, [prompts[0]])
        wait(stale)
    assert again[0].cached_tokens == budget and stale[0].cached_tokens == 0
    assert e.metrics.prefix_cached._value.get() == budget


def test_no_prefix_cache_prefills_every_prompt_whole(trained_bundle, trained_generator):
    prompts = [TEMPLATE + h for h in HEADLINES[:3]]
    with engine(trained_bundle, prefix_cache_tokens=0) as e:
        assert wait(submit(e, prompts)) == alone(trained_generator, prompts)
    assert e.prefix is None and all(r == 0 for r in [e.metrics.prefix_hits._value.get()])
    assert e.metrics.prompt_tokens._value.get() == sum(len(trained_generator.tokenizer.encode(p)) for p in prompts)


def _holder_and_followers(e: Engine):
    """A running stream (so prompts go in by chunks), then one template prompt being prefilled and
    three more with the same template waiting for it."""
    stream = submit(e, [HEADLINES[10]], 60, logit_bias=((7, -100.0),))
    wait_running(stream[0])
    holder = submit(e, [TEMPLATE + HEADLINES[4]], 6, timeout_s=30)[0]
    followers = submit(e, [TEMPLATE + h for h in HEADLINES[5:8]])
    while not holder.sequences or holder.sequences[0].computed < 2 * PREFIX_BLOCK:
        time.sleep(0.001)
    return holder, followers


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_request_holding_a_prefix_others_wait_for_can_go(trained_bundle, trained_generator, how):
    with engine(trained_bundle, prefill_tokens=8) as e:
        holder, followers = _holder_and_followers(e)
        assert all(not r.sequences for r in followers)  # waiting for the holder's blocks
        if how == "cancel":
            holder.cancel()
        else:
            holder.timeout_s = 0.0
        assert wait(followers) == alone(trained_generator, [TEMPLATE + h for h in HEADLINES[5:8]])
        wait([holder])
    assert holder.sequences[0].finish_reason == ("cancelled" if how == "cancel" else "timeout")
    assert all(r.cached_tokens >= 2 * PREFIX_BLOCK for r in followers)  # what it had prefilled was kept


def test_a_long_prompt_goes_in_by_chunks_between_decode_steps(trained_bundle, trained_generator):
    long_prompt = TEMPLATE + HEADLINES[9]
    n_prompt = len(trained_generator.tokenizer.encode(long_prompt))
    with engine(trained_bundle, prefill_tokens=16, prefix_cache_tokens=0) as e:
        chunks, steps_beside = [], []
        prefill, decode = e.runner.prefill, e.runner.decode
        e.runner.prefill = lambda prompts, start, cached=None: chunks.append([len(p) for p in prompts]) or \
            prefill(prompts, start, cached)
        e.runner.decode = lambda tokens, cached, idle=None: steps_beside.append(idle is not None) or \
            decode(tokens, cached, idle)
        stream = submit(e, [HEADLINES[11]], 60, logit_bias=((7, -100.0),))
        wait_running(stream[0])
        long = submit(e, [long_prompt], 4)
        got = wait(stream + long)
    assert chunks[1:] == [[16]] * (n_prompt // 16) + ([[n_prompt % 16]] if n_prompt % 16 else [])
    assert sum(steps_beside) >= len(chunks) - 2  # the stream decoded between chunks, the long prompt idle
    assert got == alone(trained_generator, [HEADLINES[11]], 60, logit_bias=((7, -100.0),)) + \
        alone(trained_generator, [long_prompt], 4)
