"""The scheduler alone: admission, when a decode step is due, compaction. No model, no onnxruntime."""

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from cpm_deploy.runtime.generation.sampling import SamplingConfig
from cpm_deploy.engine.scheduler import Scheduler, SchedulerLimits
from cpm_deploy.engine.sequence import QueueFull, Request, State


def request(prompt_len: int, n: int = 1) -> Request:
    return Request(list(range(1, prompt_len + 1)), 4, SamplingConfig(), n)


def row(state=State.RUNNING, cached=3, last_token_at=None):
    return SimpleNamespace(state=state, cached=cached, last_token_at=last_token_at,
                           request=SimpleNamespace(cancelled=SimpleNamespace(is_set=lambda: False),
                                                   expired=lambda now: False))


def test_a_burst_is_admitted_before_decoding_but_running_rows_wait_at_most_the_delay():
    sched = Scheduler(SchedulerLimits(max_batch=4))
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


def test_admission_takes_the_queue_in_order_within_slots_and_the_prompt_budget():
    sched = Scheduler(SchedulerLimits(max_batch=4, max_queue=8, prefill_tokens=12))
    for length, n in [(30, 1), (4, 1)]:
        sched.enqueue(request(length, n))
    first = sched.admit()
    assert [len(r.prompt) for r in first] == [30]  # over the budget, yet the first always goes
    sched.rows = [row()]
    for length, n in [(4, 2), (1, 1)]:
        sched.enqueue(request(length, n))
    second = sched.admit()
    assert [(len(r.prompt), r.n) for r in second] == [(4, 1), (4, 2)]  # 4 + 8 tokens: the whole budget
    sched.rows += [row(), row(), row()]
    assert sched.free_slots == 0 and sched.admit() == []  # no slot: they wait
    sched.limits = SchedulerLimits(max_batch=4, max_queue=1)
    with pytest.raises(QueueFull, match="--max-queue 1"):
        sched.enqueue(request(1))


def test_a_burst_sends_at_least_half_of_the_queue_into_the_first_prefill():
    sched = Scheduler(SchedulerLimits(max_batch=16, max_queue=64, prefill_tokens=8))
    for _ in range(15):
        sched.enqueue(request(6))
    assert len(sched.admit()) == 8  # the budget alone would take 2 (12 tokens); the median goes first
    sched.rows = [row()] * 8
    assert len(sched.admit()) == 4  # then half of what is left


def test_compaction_keeps_running_rows_a_dense_prefix():
    sched = Scheduler(SchedulerLimits(max_batch=5))
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
