"""Prometheus metrics of one engine (its own registry: several engines in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("cpm_queue_depth", "Requests waiting for a KV slot", registry=r)
        self.running = Gauge("cpm_running_sequences", "Sequences decoding in the running batch", registry=r)
        self.kv_slots = Gauge("cpm_kv_slots", "KV slots in the pool (max batch)", registry=r)
        self.tokens = Counter("cpm_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("cpm_prompt_tokens", "Prompt tokens prefilled", registry=r)
        # in tokens, as vLLM counts them: hits / queries is the share of prompt tokens not prefilled
        self.prefix_queries = Counter("cpm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("cpm_prefix_cache_hits", "Prompt tokens found in the prefix cache (reused, "
                                   "not prefilled)", registry=r)
        self.prefix_cached = Gauge("cpm_prefix_cache_tokens", "Prompt positions the prefix cache holds", registry=r)
        self.requests = Counter("cpm_requests", "Requests by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("cpm_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("cpm_inter_token_latency_seconds", "Time between tokens of one sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("cpm_engine_step_seconds", "One decode step of the running batch", buckets=LATENCY_BUCKETS,
                              registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
