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

from fastapi import FastAPI

from .config import ServerConfig
from ..engine import Engine
from .routes import build_router, openai_error_pages

log = logging.getLogger("cpm_deploy.serve")


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
                                    metrics_key=lambda: None if config.open_metrics else config.api_key,
                                    playground=lambda: config.playground))
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
