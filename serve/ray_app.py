"""cpm-serve's engine and routes as a Ray Serve application: replicas across a Ray cluster, the
same OpenAI routes through Ray's HTTP proxy, autoscaling on ongoing requests.

    serve run cpm_deploy.serve.ray_app:build_app bundle=/data/cpm-bundle graph=cpu-int8 num_replicas=2
    serve deploy serve_config.yaml      # import_path: cpm_deploy.serve.ray_app:build_app

Each replica loads the bundle itself (every node needs it at the same path, or on shared storage)
and runs one continuous-batching engine; Ray's router spreads requests over replicas. Arguments
(all strings on the command line) are validated by ``RayServeArgs``.
"""

from __future__ import annotations

import os
import socket

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
import ray
from ray import serve

from .config import ServerConfig
from .routes import build_router, openai_error_pages

_replica: dict = {}  # this process's engine and settings (each replica is its own process)


# Named module-level functions, not lambdas: Ray pickles the app by value, and only functions it can
# import by name keep pointing at this module's _replica inside a replica.
def _engine():
    return _replica.get("engine")


def _name() -> str:
    return _replica.get("name", "cpm")


def _timeout():
    return _replica.get("timeout_s")


def _api_key():
    return _replica.get("api_key")


def _metrics_key():
    return _replica.get("metrics_key")


def _playground() -> bool:
    return _replica.get("playground", True)


def _start(args: "RayServeArgs") -> None:
    config = args.server_config()
    _replica.update(engine=config.load(), name=config.name, timeout_s=config.timeout_s, api_key=config.api_key,
                    metrics_key=None if config.open_metrics else config.api_key, drain_s=config.drain_s,
                    playground=config.playground)


def _stop() -> None:
    if (engine := _replica.pop("engine", None)) is not None:
        engine.shutdown(_replica["drain_s"])


api = openai_error_pages(FastAPI(title="cpm-serve on Ray", docs_url=None, redoc_url=None))
api.include_router(build_router(_engine, _name, _timeout, api_key=_api_key, metrics_key=_metrics_key,
                                playground=_playground))


@api.middleware("http")
async def replica_header(request: Request, call_next):
    """Which replica answered (Ray node, host, pid): shows the spread across replicas and nodes."""
    response = await call_next(request)
    node = ray.get_runtime_context().get_node_id()[:12]
    response.headers["x-cpm-replica"] = f"{node}:{socket.gethostname()}:{os.getpid()}"
    return response


class RayServeArgs(BaseModel):
    """A Serve application's arguments: any ServerConfig field but the API key (``bundle``,
    ``max_batch``, ...; checked there), and the deployment's own."""

    model_config = ConfigDict(extra="allow")
    num_replicas: int | None = Field(None, ge=1)
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    # the key: the replica's environment variable, so it stays out of Serve configs and `serve run` lines
    api_key_env: str | None = "CPM_SERVE_API_KEY"

    @model_validator(mode="after")
    def _server_fields(self) -> "RayServeArgs":
        if "api_key" in (self.model_extra or {}):
            raise ValueError("api_key: give the replicas an environment variable instead (api_key_env)")
        self.server_config()  # a wrong server field fails here, before any replica starts
        return self

    def server_config(self) -> ServerConfig:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        fields = {"threads": max(1, int(self.num_cpus)), **(self.model_extra or {})}
        return ServerConfig(**fields, api_key=key or None)


@serve.deployment(name="cpm", health_check_period_s=5, graceful_shutdown_timeout_s=20)
@serve.ingress(api)
class CPMServer:
    # the class travels to replicas pickled by value: it reaches the module state only through
    # the module's named functions
    def __init__(self, args: RayServeArgs):
        _start(args)

    def check_health(self) -> None:
        engine = _engine()
        if engine is None or not engine.running:
            raise RuntimeError("the engine is not running")

    def __del__(self):
        _stop()


def build_app(args: dict) -> serve.Application:
    """Application builder for ``serve run`` / a Serve config file's ``import_path``."""
    a = RayServeArgs.model_validate(args)
    config = a.server_config()
    options = {"ray_actor_options": {"num_cpus": a.num_cpus},
               # a replica takes its batch plus its queue; Ray holds the rest back
               "max_ongoing_requests": config.max_batch + config.max_queue}
    if a.min_replicas is not None or a.max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": a.min_replicas or 1, "max_replicas": a.max_replicas or 1,
                                         "target_ongoing_requests": config.max_batch}
    else:
        options["num_replicas"] = a.num_replicas or 1
    return CPMServer.options(**options).bind(a)
