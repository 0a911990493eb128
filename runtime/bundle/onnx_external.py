"""The external-data file names an ONNX graph refers to, read without the onnx package.

The runtime must check where a graph's weights come from before onnxruntime opens it, and it
stays free of onnx (and protobuf schemas): this walks the protobuf wire format over exactly the
messages that can hold a tensor. Field numbers are onnx.proto3's; tests compare the result with
the onnx package's own walk.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CPMError


class OnnxFormatError(CPMError, ValueError):
    pass


# message -> {field number: message kind} for the length-delimited fields that lead to tensors
_MODEL = {7: "graph", 25: "function"}
_SCHEMA = {
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_EXTERNAL_DATA = 13  # repeated StringStringEntryProto {key = 1, value = 2}
_MAX_DEPTH = 64  # subgraphs nest; a hostile file must not exhaust the stack


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise OnnxFormatError("truncated or invalid varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview):
    """(field number, bytes) of every length-delimited field; other wire types are skipped."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > len(buf):
                raise OnnxFormatError("a field runs past the end of the file")
            yield key >> 3, buf[i:i + size]
            i += size
        else:
            raise OnnxFormatError(f"unsupported protobuf wire type {wire}")
    if i != len(buf):
        raise OnnxFormatError("truncated field")


def _walk(buf: memoryview, kind: str, depth: int, out: set[str]) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxFormatError(f"graphs nested deeper than {_MAX_DEPTH} levels")
    if kind == "tensor":
        for field, entry in _fields(buf):
            if field == _TENSOR_EXTERNAL_DATA:
                kv = {f: bytes(v).decode("utf-8", "replace") for f, v in _fields(entry)}
                if kv.get(1) == "location":
                    out.add(kv.get(2, ""))
        return
    schema = _MODEL if kind == "model" else _SCHEMA[kind]
    for field, sub in _fields(buf):
        if field in schema:
            _walk(sub, schema[field], depth + 1, out)


def external_data_locations(path: str | Path) -> set[str]:
    """Every ``location`` named by a tensor of the model (initializers, Constant nodes, subgraphs)."""
    out: set[str] = set()
    _walk(memoryview(Path(path).read_bytes()), "model", 0, out)
    return out
