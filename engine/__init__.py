"""The continuous-batching engine that cpm-serve and offline jobs both stand on: requests and their
sequences, a scheduler (admission, chunked prefill, prefix reuse, decode timing), a model runner
over the runtime's slot decoder and KV pool, and a prefix cache. It knows nothing of HTTP or of
files; it imports the runtime only (never exporter, optimize or onnxruntime)."""

from .engine import Engine
from .requests import RequestError
from .sequence import EngineError, Event, QueueFull, Request, State

__all__ = ["Engine", "EngineError", "Event", "QueueFull", "Request", "RequestError", "State"]
