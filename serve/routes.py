"""OpenAI-compatible HTTP routes: a thin shell over an Engine (which knows nothing of HTTP).

The same router serves under uvicorn (``serve.app``) and inside Ray Serve replicas
(``serve.ray_app``); it finds its engine through ``get_engine`` (None while loading).
"""

# No `from __future__ import annotations`: FastAPI reads these signatures, and in a Ray replica the
# route functions arrive pickled by value, without the module globals a string annotation needs.
import asyncio
import functools
import hmac
import json
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import completions, tokenization
from ..api.openai_protocol import CompletionIds, CompletionRequest, error_body, models_list, validation_error_body
from ..engine import Engine, EngineError, QueueFull, RequestError
from ..engine.errors import ServeError

PLAYGROUND = Path(__file__).with_name("playground.html")
RETRY_AFTER_S = 1
INLINE_PROMPT_CHARS = 512  # tokenized on the event loop up to this size (well under a millisecond)
MAX_BODY_BYTES = 4 * 1024 * 1024  # 1024 positions of text fit many times over; more is not a prompt


async def _read_body(http: Request) -> bytes | None:
    """The request body, or None once it passes MAX_BODY_BYTES (never read whole into memory)."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           headers: dict | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class Unauthorized(ServeError):
    """A request without the server's API key."""


def openai_error_pages(app: FastAPI) -> FastAPI:
    """Unknown routes and methods answer in OpenAI's error shape (the openai client reads
    error.message), naming the routes this server has; so does a missing or wrong API key (401)."""

    async def not_here(http: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (f"{http.method} {http.url.path}: {exc.detail}; this server answers POST /v1/completions, "
                   "GET /v1/models, POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /health and GET /metrics")
        return _error(exc.status_code, message, "invalid_request_error", headers=getattr(exc, "headers", None))

    async def unauthorized(http: Request, exc: Unauthorized) -> JSONResponse:
        return _error(401, str(exc), "invalid_request_error", code="invalid_api_key",
                      headers={"WWW-Authenticate": "Bearer"})

    app.add_exception_handler(StarletteHTTPException, not_here)
    app.add_exception_handler(Unauthorized, unauthorized)
    _document_request_body(app)
    return app


BODIES = (CompletionRequest, tokenization.TokenizeRequest, tokenization.DetokenizeRequest)


def _body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _document_request_body(app: FastAPI) -> None:
    """/openapi.json describes the request bodies. The routes read their bodies themselves (size
    limit, OpenAI-shaped errors), so FastAPI does not see the models: their schemas are added here."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODIES:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
        return app.openapi_schema

    app.openapi = openapi


def key_check(key_of: Callable[[], "str | None"]) -> Callable:
    """A dependency that lets a request through when the server has no key, or when it sends
    ``Authorization: Bearer <key>`` (compared in constant time)."""

    async def check(http: Request):
        key = key_of()
        if key is None:
            return
        scheme, _, given = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise Unauthorized("this server needs its API key: send Authorization: Bearer <key> "
                               "(the openai client's api_key)")

    return check


def build_router(get_engine: Callable[[], "Engine | None"], model_name: "str | Callable[[], str]",
                 timeout_s: "float | None | Callable[[], float | None]" = None,
                 load_error: Callable[[], str | None] = lambda: None,
                 api_key: Callable[[], "str | None"] = lambda: None,
                 metrics_key: "Callable[[], str | None] | None" = None,
                 playground: Callable[[], bool] = lambda: True) -> APIRouter:
    """``model_name``, ``timeout_s`` and the keys may be callables: a Ray replica learns them only when
    it starts. ``api_key`` guards every route but /health and the playground page (which asks for
    the key and sends it with its API calls); ``metrics_key`` guards /metrics (default: the API key)."""
    name_of = model_name if callable(model_name) else (lambda: model_name)
    timeout_of = timeout_s if callable(timeout_s) else (lambda: timeout_s)
    guarded = [Depends(key_check(api_key))]
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def playground_page():
        """The playground: one static page that talks to /v1/completions like any client."""
        if not playground():
            raise StarletteHTTPException(404, "the playground is off (--no-playground)")
        return HTMLResponse(_playground_page(),
                            headers={"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                     "script-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:"})

    @router.get("/health")
    async def health():
        if get_engine() is not None:
            return {"status": "ready", "model": name_of()}
        failed = load_error()
        return JSONResponse({"status": "failed" if failed else "loading", "error": failed}, status_code=503)

    @router.get("/metrics", dependencies=[Depends(key_check(metrics_key or api_key))])
    async def metrics():
        engine = get_engine()
        return Response(engine.metrics.exposition() if engine else b"", media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models", dependencies=guarded)
    async def models():
        return models_list(name_of())

    @router.post("/tokenize", dependencies=guarded, openapi_extra=_body(tokenization.TokenizeRequest))
    async def tokenize(http: Request):
        """Text to CPM's token ids, as the server tokenizes (vLLM's shape)."""
        return await _tokens(http, get_engine(), tokenization.TokenizeRequest, tokenization.tokenize)

    @router.post("/detokenize", dependencies=guarded, openapi_extra=_body(tokenization.DetokenizeRequest))
    async def detokenize(http: Request):
        """Token ids to text."""
        return await _tokens(http, get_engine(), tokenization.DetokenizeRequest, tokenization.detokenize)

    @router.get("/tokenizer_info", dependencies=guarded)
    async def tokenizer_info():
        """The tokenizer's special tokens and limits."""
        engine = get_engine()
        if engine is None:
            return _loading()
        return tokenization.tokenizer_info(engine)

    @router.post("/v1/completions", dependencies=guarded, openapi_extra=_body(CompletionRequest))
    async def create_completion(http: Request):
        engine = get_engine()
        if engine is None:
            return _loading()
        raw = await _read_body(http)
        if raw is None:
            return _error(413, f"the request body is over {MAX_BODY_BYTES >> 20} MB")
        model_name = name_of()
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        scored = loop.create_future()

        def sink_for(k):
            return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (k, ev))

        def score_sink(result):
            loop.call_soon_threadsafe(lambda: scored.done() or scored.set_result(result))

        try:
            body = completions.parse(raw, engine, model_name)
            # short prompts inline (a thread hop costs more than jieba on them), long ones off the loop
            def make():
                return (completions.make_requests(engine, body, timeout_of(), sink_for),
                        completions.score_request(engine, body, score_sink))
            short = sum(len(p) for p in body.prompts()) <= INLINE_PROMPT_CHARS
            requests, score = make() if short else await run_in_threadpool(make)
        except completions.BodyError as e:
            return JSONResponse(e.body, status_code=e.status)
        try:
            if score is not None:
                engine.submit_scoring(score)
            for r in requests:
                engine.submit(r)
        except EngineError as e:  # QueueFull is one: a partly submitted call is withdrawn whole
            for r in requests:
                r.cancel()
            if isinstance(e, QueueFull):
                return _error(429, f"server busy: {e}", "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
            return _error(503, str(e), "server_error")
        call = _Call(requests, events, completions.Choices(engine, body, requests, score))
        try:
            echoed = call.choices.echoed(completions.scored(await scored) if score is not None else None)
        except completions.BodyError as e:  # scoring failed: so does the call
            call.cancel()
            return JSONResponse(e.body, status_code=e.status)
        except asyncio.CancelledError:
            call.cancel()
            raise
        ids = CompletionIds(model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(call, ids, include_usage, echoed), media_type="text/event-stream")
        return await _collect(call, ids, http)

    return router


@functools.cache
def _playground_page() -> str:
    return PLAYGROUND.read_text(encoding="utf-8")


def _loading() -> JSONResponse:
    return _error(503, "the model is still loading; retry shortly", "server_error",
                  headers={"Retry-After": str(RETRY_AFTER_S)})


async def _tokens(http: Request, engine, model, answer) -> JSONResponse | dict:
    """A tokenizer route: the body checked against ``model``, then ``answer(engine, body)`` off the
    event loop (jieba on a long text takes a while)."""
    if engine is None:
        return _loading()
    raw = await _read_body(http)
    if raw is None:
        return _error(413, f"the request body is over {MAX_BODY_BYTES >> 20} MB")
    try:
        body = model.model_validate_json(raw)
        return await run_in_threadpool(answer, engine, body)
    except ValidationError as e:
        return JSONResponse(validation_error_body(e, prompt_shapes="a string"), status_code=400)
    except RequestError as e:
        return _error(400, str(e), param=e.param)


class _Call:
    """The engine requests of one HTTP call (one per prompt), their events, and the choices they build."""

    def __init__(self, requests, events: asyncio.Queue, choices: "completions.Choices"):
        self.requests, self.events, self.choices = requests, events, choices
        self.open = len(requests) * choices.n

    async def next(self, timeout: float | None = None):
        k, ev = await asyncio.wait_for(self.events.get(), timeout)
        if ev.kind == "finish":
            self.open -= 1
        return k * self.choices.n + ev.index, ev

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()


async def _collect(call: _Call, ids: CompletionIds, http: Request) -> JSONResponse:
    try:
        while call.open:
            try:
                index, ev = await call.next(timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    call.cancel()
                    return JSONResponse({}, status_code=499)
                continue
            if failed := completions.failure(ev):
                return JSONResponse(failed.body, status_code=failed.status)
            call.choices.take(index, ev)
    finally:
        call.cancel()  # no-op for finished requests; frees slots of the rest
    if not call.requests:
        call.choices.finish_echo_only()
    return JSONResponse(call.choices.completion(ids))


async def _stream(call: _Call, ids: CompletionIds, include_usage: bool, echoed: list[dict]):
    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        for c in echoed:
            yield sse(ids.chunk([c]))
        while call.open:
            index, ev = await call.next()
            if failed := completions.failure(ev):
                yield sse(failed.body)
                return
            yield sse(ids.chunk([call.choices.take(index, ev)]))
        if not call.requests:
            for c in call.choices.finish_echo_only():
                yield sse(ids.chunk([c]))
        if include_usage:
            yield sse(ids.chunk([], call.choices.usage()))
        yield "data: [DONE]\n\n"
    finally:  # a client that went away: its sequences leave the batch at the next step
        call.cancel()
