"""The scheduler alone: admission, prompt chunks, prefix reuse and holds, when a decode step is due,
compaction. No model, no onnxruntime."""

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from cpm_deploy.runtime.generation.sampling import SamplingConfig
from cpm_deploy.engine.scheduler import Scheduler, SchedulerLimits
from cpm_deploy.engine.prefix_cache import PrefixCache
from cpm_deploy.engine.sequence import QueueFull, Request, Sequence, State


def request(prompt_len: int, n: int = 1) -> Request:
    return Request(list(range(1, prompt_len + 1)), 4, SamplingConfig(), n)


def row(state=State.RUNNING, cached=3, last_token_at=None):
    return SimpleNamespace(state=state, cached=cached, last_token_at=last_token_at,
                           request=SimpleNamespace(cancelled=SimpleNamespace(is_set=lambda: False),
                                                   expired=lambda now: False))


def test_a_burst_is_admitted_before_decoding_but_running_rows_wait_at_most_the_delay():
    sched = scheduler(max_batch=4)
    now = time.perf_counter()
    sched.rows = [row(last_token_at=now - 0.01)]
    sched.waiting.append(object())
    assert not sched.decode_due(admitted=[object()], now=now)  # more to admit: prefill first
    sched.rows[0].last_token_at = now - 2 * sched.limits.max_decode_delay_s
    assert sched.decode_due(admitted=[object()], now=now)  # but never starve a running row
    assert sched.decode_due(admitted=[], now=now)  # nothing admitted this pass: decode
    sched.waiting.clear()
    sched.rows[0].last_token_at = now
    assert sched.decode_due(admitted=[object()], now=now)  # burst fully admitted: decode
    sched.rows = []
    assert not sched.decode_due(admitted=[])  # nothing runs: no step


def sequences(r: Request) -> list[Sequence]:
    r.sequences = [Sequence(r, j, SimpleNamespace(generated=[])) for j in range(r.n)]
    return r.sequences


def scheduler(prefix_blocks: int = 0, **limits) -> Scheduler:
    return Scheduler(SchedulerLimits(**limits), sequences, PrefixCache(prefix_blocks, 4) if prefix_blocks else None)


def chunks(plan) -> list[tuple[int, int]]:
    return [(s.request.id, n) for s, n in plan.chunks]


def test_admission_takes_the_queue_in_order_within_slots_and_the_prompt_budget():
    sched = scheduler(max_batch=4, max_queue=8, prefill_tokens=12)
    a, b, c, d = request(30), request(20), request(4, n=2), request(1)
    sched.enqueue(a)
    sched.enqueue(b)
    first = sched.plan()
    # nothing decodes: the first prompt goes in whole, and the budget is spent
    assert first.admitted == [a] and chunks(first) == [(a.id, 30)]
    sched.rows[0].start()
    second = sched.plan()  # a stream decodes now: b gets one chunk of the budget
    assert second.admitted == [b] and chunks(second) == [(b.id, 12)]
    b.sequences[0].computed += 12
    sched.enqueue(c)
    sched.enqueue(d)
    third = sched.plan()  # b's rest first; c is short, and so one of more than half the queue: it goes whole
    assert third.admitted == [c] and chunks(third) == [(b.id, 8), (c.id, 4), (c.id, 4)]
    assert sched.free_slots == 0 and sched.plan().admitted == []  # no slot for d: it waits
    sched.limits = SchedulerLimits(max_batch=4, max_queue=1)
    with pytest.raises(QueueFull, match="--max-queue 1"):
        sched.enqueue(request(1))


def test_a_burst_sends_more_than_half_of_the_queue_into_the_first_prefill():
    sched = scheduler(max_batch=16, max_queue=64, prefill_tokens=8)
    for _ in range(15):
        sched.enqueue(request(6))
    assert len(sched.plan().admitted) == 8  # the budget alone would take 2 (12 tokens); the median goes first
    for s in sched.rows:
        s.start()
    assert len(sched.plan().admitted) == 4  # then more than half of what is left


def test_a_long_prompt_goes_in_by_chunks_while_streams_decode():
    sched = scheduler(max_batch=4, prefill_tokens=16)
    sched.enqueue(request(3))
    sched.plan()
    sched.rows[0].start()  # a stream decoding
    long = request(40)
    sched.enqueue(long)
    taken = []
    while not taken or sched.rows[1].state is State.PREFILLING:
        plan = sched.plan()
        assert sum(n for _, n in plan.chunks) <= 16 and sched.decode_due(plan.admitted)
        for s, n in plan.chunks:
            s.computed += n
            taken.append(n)
            if s.computed == len(s.request.prompt):
                s.start()
    assert taken == [16, 16, 8] and sched.rows[1].cached == 40
    assert sched.rows[1].state is State.RUNNING


def test_a_prefix_in_the_cache_is_reused_and_one_being_prefilled_is_waited_for():
    sched = scheduler(prefix_blocks=64, max_batch=8, prefill_tokens=64)
    template = list(range(1000, 1030))  # 30 tokens: 7 blocks of 4, and 2 more
    burst = [Request(template + [t, t + 1, t + 2], 4, SamplingConfig()) for t in (1, 2, 3)]
    for r in burst:
        sched.enqueue(r)
    first = sched.plan()
    assert first.admitted == burst[:1]  # the others' next block is in flight
    for s, n in first.chunks:
        s.computed += n
        assert sched.remember(s) == [(i, i) for i in range(8)]  # 33 tokens: 8 whole blocks into the store
        s.start()
    second = sched.plan()
    assert second.admitted == burst[1:] and [r.cached_tokens for r in burst[1:]] == [28, 28]
    assert [len(blocks) for _, blocks in second.reused] == [7, 7] and [n for _, n in second.chunks] == [5, 5]
    again = Request(list(template[:28]), 4, SamplingConfig())  # all of it cached: one token is still prefilled
    sched.enqueue(again)
    sched.plan()
    assert again.cached_tokens == 24


def test_compaction_keeps_running_rows_a_dense_prefix():
    sched = scheduler(max_batch=5)
    a, b, c, d, e = (row(cached=i) for i in range(5))
    b.state = d.state = State.FINISHED
    sched.rows = [a, b, c, d, e]
    moves = []
    sched.compact(lambda src, dst, length: moves.append((src, dst, length)))
    assert sched.rows == [a, e, c] and moves == [(4, 1, 4)]  # e into b's slot; d's slot was last, nothing to move
    sched.rows[1].state = State.FINISHED
    sched.compact(lambda *m: moves.append(m))
    assert sched.rows == [a, c] and moves[-1] == (2, 1, 2)


def test_the_scheduler_needs_no_onnxruntime():
    code = ("import sys; import cpm_deploy.engine.scheduler; "
            "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
