"""Throughput of one generation: prompt tokens/s, time to first token, decode tokens/s, peak RSS."""

from __future__ import annotations

import resource
import time

from .generator import CPMGenerator
from .sampling import SamplingConfig


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(gen: CPMGenerator, prompt_ids: list[int], new_tokens: int,
            cfg: SamplingConfig | None = None, batch: int = 1) -> dict:
    """Generates exactly ``new_tokens`` (no early stop at <eod>) and times prefill and decode apart."""
    cfg = cfg or SamplingConfig()
    eod = gen.eod_id
    gen.eod_id = -1  # never finish early: a benchmark must decode the number of tokens asked for
    try:
        t0 = time.perf_counter()
        stamps = []
        for _ in gen.iter_ids([prompt_ids] * batch, new_tokens, 1, cfg):
            stamps.append(time.perf_counter())
    finally:
        gen.eod_id = eod
    ttft = stamps[0] - t0
    decode_s = stamps[-1] - stamps[0]
    return {
        "batch": batch, "prompt_tokens": len(prompt_ids), "new_tokens": len(stamps),
        "time_to_first_token_s": ttft,
        "prompt_tokens_per_s": batch * len(prompt_ids) / ttft,
        "decode_tokens_per_s": batch * (len(stamps) - 1) / decode_s if len(stamps) > 1 else float("nan"),
        "peak_rss_mb": peak_rss_mb(),
    }
