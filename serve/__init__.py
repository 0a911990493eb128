"""Serving on the torch-free runtime: a continuous-batching engine (``Engine``) and, over it, an
OpenAI-compatible HTTP app (``serve.app``, needs the ``[serve]`` extra) and a Ray Serve
deployment (``serve.ray_app``, ``[ray]``). Never imports exporter or optimize."""

from .engine import Engine, RequestError
from .sequence import EngineError, Event, QueueFull, Request, State

__all__ = ["Engine", "EngineError", "Event", "QueueFull", "Request", "RequestError", "State"]
