"""The line formats of offline jobs: what a line asks for, and the record written for it.

- ``text``: one prompt per line -> ``{"prompt", "generated_text": [prompt + continuation, ...]}``
  (cpm-run's output since its first version).
- ``jsonl``: ``{"prompt": ..., <overrides>}`` with cpm-run's option names as keys (``max_new_tokens``,
  ``temperature``, ``seed``, ...) -> the same record as ``text``.
- ``openai-batch``: OpenAI's Batch API lines, ``{"custom_id", "method": "POST", "url":
  "/v1/completions", "body"}`` -> ``{"id", "custom_id", "response": {"status_code", "request_id",
  "body"}, "error"}``, the body being exactly what cpm-serve answers (serve/completions.py).

A line that cannot be served becomes a record naming the problem; it never stops the job.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ..engine.errors import ServeError

FORMATS = ("text", "jsonl", "openai-batch")
# per-line keys of the jsonl format: cpm-run's options, as the runtime names them, and their JSON types
_INT, _NUMBER, _BOOL = ("a whole number", (int,)), ("a number", (int, float)), ("true or false", (bool,))
OVERRIDES = {"max_new_tokens": _INT, "max_length": _INT, "num_return_sequences": _INT, "truncate_prompt": _BOOL,
             "do_sample": _BOOL, "temperature": _NUMBER, "top_k": _INT, "top_p": _NUMBER,
             "repetition_penalty": _NUMBER, "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER, "seed": _INT,
             "stop": ("a string or a list of strings", (str, list))}
LENGTH_KEYS = ("max_new_tokens", "max_length", "num_return_sequences", "truncate_prompt")  # the rest is sampling


class LineError(ServeError, ValueError):
    """A line the job cannot serve; its record says why."""


@dataclass
class Line:
    number: int  # 1-based line number in the input file
    fmt: str
    key: str | None = None  # openai-batch: custom_id
    prompt: str | None = None  # text / jsonl
    options: dict = field(default_factory=dict)  # text / jsonl: generation keywords for this line
    body: dict | None = None  # openai-batch: the request body
    error: str | None = None  # set when the line itself is malformed


def detect(first_line: str) -> str:
    """The format of a file from its first non-empty line."""
    try:
        obj = json.loads(first_line)
    except json.JSONDecodeError:
        return "text"
    if isinstance(obj, dict) and "custom_id" in obj:
        return "openai-batch"
    return "jsonl" if isinstance(obj, dict) else "text"


def parse(number: int, text: str, fmt: str, defaults: dict) -> Line:
    if fmt == "text":
        return Line(number, fmt, prompt=text, options=dict(defaults))
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Line(number, fmt, error=f"line {number} is not JSON: {e}")
    if not isinstance(obj, dict):
        return Line(number, fmt, error=f"line {number} is not a JSON object")
    if fmt == "jsonl":
        return _jsonl(number, obj, defaults)
    return _batch(number, obj)


def _jsonl(number: int, obj: dict, defaults: dict) -> Line:
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        return Line(number, "jsonl", error=f"line {number}: 'prompt' must be a string")
    unknown = sorted(set(obj) - {"prompt", *OVERRIDES})
    if unknown:
        return Line(number, "jsonl", prompt=prompt,
                    error=f"line {number}: unknown key(s) {', '.join(unknown)}; per-line keys are {', '.join(OVERRIDES)}")
    for key, (what, types) in OVERRIDES.items():
        value = obj.get(key)
        bad = (value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types))
               or key == "stop" and isinstance(value, list) and not all(isinstance(x, str) for x in value))
        if bad:
            return Line(number, "jsonl", prompt=prompt, error=f"line {number}: {key} must be {what}, not {value!r:.40}")
    options = dict(defaults)
    if {"max_length", "max_new_tokens"} & set(obj):  # a line's own length replaces the job's, either form
        options.pop("max_length", None)
        options.pop("max_new_tokens", None)
    return Line(number, "jsonl", prompt=prompt, options=options | {k: obj[k] for k in OVERRIDES if k in obj})


def _batch(number: int, obj: dict) -> Line:
    key = obj.get("custom_id")
    if not isinstance(key, str) or not key:
        return Line(number, "openai-batch", error=f"line {number}: 'custom_id' must be a non-empty string")
    line = Line(number, "openai-batch", key=key)
    if obj.get("method") != "POST" or obj.get("url") != "/v1/completions":
        line.error = f"line {number}: only POST /v1/completions is served (got {obj.get('method')} {obj.get('url')})"
    elif not isinstance(obj.get("body"), dict):
        line.error = f"line {number}: 'body' must be a JSON object"
    else:
        line.body = obj["body"]
    return line


def generation_record(line: Line, texts: list[str] | None, error: str | None = None) -> dict:
    """text / jsonl: what the line produced, or its error."""
    record = {"prompt": line.prompt}
    if error is not None:
        return record | {"line": line.number, "error": error}
    return record | {"generated_text": [line.prompt + t for t in texts]}


def batch_record(line: Line, status: int | None, body: dict | None, error: str | None = None) -> dict:
    """openai-batch: the response (any status, as the server would answer), or a line-level error."""
    response = None if status is None else {"status_code": status, "request_id": f"req-{uuid.uuid4().hex}",
                                            "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.key, "response": response,
            "error": None if error is None else {"code": "invalid_request", "message": error}}


def record_key(record: dict, fmt: str):
    """What identifies a written record against its input line when a job resumes."""
    return record.get("custom_id") if fmt == "openai-batch" else record.get("prompt")


def line_key(line: Line):
    return line.key if line.fmt == "openai-batch" else line.prompt
