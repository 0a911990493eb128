"""A server's settings, defined once: ``cpm-serve`` builds its options from these fields, the
uvicorn app and every Ray Serve replica load their engine from one, and ``Engine`` takes the
scheduling part (``SchedulerLimits``) with the same defaults."""

from __future__ import annotations

from dataclasses import field
from pathlib import Path

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from ..engine.engine import prefix_store_tokens
from ..engine.scheduler import SchedulerLimits

_LIMITS = SchedulerLimits()


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ServerConfig:
    bundle: Path
    graph: str | None = None  # a shared-KV graph of the bundle; None: its default
    threads: int | None = Field(None, ge=1)  # onnxruntime intra-op threads; None: all cores
    max_batch: int = Field(_LIMITS.max_batch, ge=1, le=256)
    max_queue: int = Field(_LIMITS.max_queue, ge=0)
    max_total: int | None = Field(None, ge=2)  # positions per sequence in the KV pool; None: the model's
    prefill_tokens: int = Field(_LIMITS.prefill_tokens, ge=1)  # the prefill chunk while streams decode
    prefix_cache_tokens: int | None = Field(None, ge=0)  # prompt positions kept for reuse; None: 2 x max_total; 0: none
    timeout_s: float | None = Field(300.0, gt=0)  # a request's time, queueing included
    drain_s: float = Field(10.0, ge=0)  # on shutdown: what open requests get to finish
    model_name: str | None = None  # the model id in the API; None: the bundle folder's name
    verify: bool = True  # the sha256 check of the graph's files
    warm_up: bool = True  # /health says ready once every batch shape has run once
    api_key: str | None = field(default=None, repr=False)  # never in a log line
    open_metrics: bool = False  # /metrics without the API key (a scraper inside the network)
    playground: bool = True  # GET / serves the playground page

    @property
    def name(self) -> str:
        return self.model_name or Path(self.bundle).name

    def limits(self) -> SchedulerLimits:
        return SchedulerLimits(max_batch=self.max_batch, max_queue=self.max_queue, prefill_tokens=self.prefill_tokens)

    def check_memory(self) -> None:
        """Refuse a pool that would not fit next to the weights (MemoryBudgetError names what fits)."""
        from ..runtime import Bundle
        from ..runtime.system.memory import serving_memory

        bundle = Bundle.open(self.bundle, verify=False)
        name = self.graph or bundle.default_graph
        capacity = min(self.max_total or bundle.config["n_positions"], bundle.config["n_positions"])
        serving_memory(bundle, name).check(self.max_batch, capacity, f"{self.name} ({name})",
                                           prefix_store_tokens(self.prefix_cache_tokens, capacity))

    def load(self):
        """Check the memory, load the bundle, warm the engine up and start it."""
        from ..engine.engine import Engine

        self.check_memory()
        return Engine.from_bundle(self.bundle, graph=self.graph, threads=self.threads, verify=self.verify,
                                  limits=self.limits(), max_total=self.max_total, warm_up=self.warm_up,
                                  prefix_cache_tokens=self.prefix_cache_tokens).start()



def default(name: str):
    """A field's default (command-line options show it)."""
    return ServerConfig.__pydantic_fields__[name].default
