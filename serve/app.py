"""The OpenAI-compatible server as an ASGI app (FastAPI), run by uvicorn in ``cpm-serve``.

The port opens at once and ``/health`` says "loading" until the bundle is loaded in a background
thread; on shutdown (SIGTERM: uvicorn stops accepting and lets open requests finish within its
graceful timeout) the engine drains, then cancels what is left.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from .engine import Engine
from .routes import build_router, openai_error_pages

log = logging.getLogger("cpm_deploy.serve")


@dataclass(frozen=True)
class ServerConfig:
    bundle: Path
    graph: str | None = None
    threads: int | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_total: int | None = None
    prefill_tokens: int = 128
    timeout_s: float | None = 300.0
    drain_s: float = 10.0
    model_name: str | None = None
    verify: bool = True
    warm_up: bool = True  # /health says ready once every batch shape has run once
    api_key: str | None = field(default=None, repr=False)  # never in a log line
    open_metrics: bool = False  # /metrics without the API key (a scraper inside the network)

    @property
    def name(self) -> str:
        return self.model_name or Path(self.bundle).name

    def check_memory(self) -> None:
        """Refuse a pool that would not fit next to the weights (MemoryBudgetError names what fits)."""
        from ..runtime import Bundle
        from ..runtime.system.memory import serving_memory

        bundle = Bundle.open(self.bundle, verify=False)
        name = self.graph or bundle.default_graph
        capacity = min(self.max_total or bundle.config["n_positions"], bundle.config["n_positions"])
        kv_bytes = 2 if bundle.graph(name).get("precision") == "fp16" else 4
        serving_memory(bundle, name, kv_bytes).check(self.max_batch, capacity, f"{self.name} ({name})")

    def load(self) -> Engine:
        self.check_memory()
        return Engine.from_bundle(self.bundle, graph=self.graph, threads=self.threads, verify=self.verify,
                                  max_batch=self.max_batch, max_queue=self.max_queue, max_total=self.max_total,
                                  prefill_tokens=self.prefill_tokens, warm_up=self.warm_up).start()


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """An app serving ``config.bundle``; pass a started ``engine`` to serve one built elsewhere."""
    state = {"engine": engine, "error": None}

    def load():
        try:
            state["engine"] = config.load()
            engine = state["engine"]
            log.info("ready: %s (graph %s, max batch %d; warm-up %.1f s)", config.name, engine.generator.graph_name,
                     config.max_batch, engine.warm_up_s)
        except Exception as e:  # noqa: BLE001 - reported by /health and the log, the process stays up
            state["error"] = f"{type(e).__name__}: {e}"
            log.error("could not load %s: %s", config.bundle, state["error"])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if state["engine"] is None:
            threading.Thread(target=load, name="cpm-load", daemon=True).start()
        yield
        if state["engine"] is not None:
            state["engine"].shutdown(config.drain_s)

    app = openai_error_pages(FastAPI(title="cpm-serve", lifespan=lifespan, docs_url=None, redoc_url=None))
    app.include_router(build_router(lambda: state["engine"], config.name, config.timeout_s, lambda: state["error"],
                                    api_key=lambda: config.api_key,
                                    metrics_key=lambda: None if config.open_metrics else config.api_key))
    return app


def run(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain and return (the process exits 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after its shutdown (the process would die of SIGTERM);
            # a server told to stop that stopped cleanly exits 0
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    uv = uvicorn.Config(create_app(config), host=host, port=port, log_level="info" if verbose else "warning",
                        timeout_graceful_shutdown=config.drain_s, access_log=verbose)
    Server(uv).run()
