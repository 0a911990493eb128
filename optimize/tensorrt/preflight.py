"""GPU-free checks that the TensorRT ONNX parser will accept a graph, before any build is tried."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ...runtime.backends.tensorrt_versions import max_opset

TABLE = Path(__file__).with_name("onnx_trt_ops.json")
# TensorRT's tensor types (the parser rejects the rest: strings, doubles beyond a down-cast, uint64 ...)
TRT_TYPES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
             onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL",
             onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8"}


@dataclass
class Preflight:
    graph: str
    tensorrt: str
    problems: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"graph": self.graph, "tensorrt": self.tensorrt, "ok": self.ok, "problems": self.problems,
                "ops": self.ops, "table": json.loads(TABLE.read_text())["source"]}


def load_table() -> dict:
    return json.loads(TABLE.read_text())["ops"]


def preflight(path: Path, tensorrt_version: str = "10.4.0", dynamic_dims=("batch_size",)) -> Preflight:
    path = Path(path)
    report = Preflight(path.name, tensorrt_version)
    model = onnx.load(str(path), load_external_data=False)
    table = load_table()
    _check_opset(model, tensorrt_version, report)
    for node in model.graph.node:
        report.ops[node.op_type] = report.ops.get(node.op_type, 0) + 1
    for op, count in sorted(report.ops.items()):
        entry = table.get(op)
        domain = next(n.domain for n in model.graph.node if n.op_type == op)
        if domain not in ("", "ai.onnx"):
            report.problems.append(f"{op} ({count}x) is a {domain} op; TensorRT's parser takes standard ONNX ops only")
        elif entry is None or not entry["supported"]:
            report.problems.append(f"{op} ({count}x) is not supported by the TensorRT ONNX parser")
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            report.problems.append(f"{node.name}: LayerNormalization may use only its first output")
    _check_io(model, dynamic_dims, report)
    _check_types(model, report)
    _check_external_data(model, path.parent, report)
    return report


def _check_opset(model, version, report):
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        report.problems.append("the graph imports no standard ONNX opset")
    elif opset > max_opset(version):
        report.problems.append(f"opset {opset} is newer than TensorRT {version} parses (up to {max_opset(version)}); "
                               "export with --opset 17")


def _check_io(model, dynamic_dims, report):
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not value.type.tensor_type.HasField("shape"):
            report.problems.append(f"{value.name} has no declared shape")
            continue
        for i, d in enumerate(dims):
            if not d.dim_param and not d.HasField("dim_value"):
                report.problems.append(f"{value.name} dimension {i} is neither named nor fixed")
        if dims and dims[0].dim_param not in dynamic_dims:
            report.problems.append(f"{value.name}: the batch dimension is not dynamic ({dims[0].dim_param or dims[0].dim_value})")


def _check_types(model, report):
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.tensor_type.elem_type not in TRT_TYPES:
            report.problems.append(f"{value.name} has type {onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)}, "
                                   "which TensorRT does not take")
    for t in model.graph.initializer:
        if t.data_type not in TRT_TYPES:
            report.problems.append(f"initializer {t.name} has type {onnx.TensorProto.DataType.Name(t.data_type)}")


def _check_external_data(model, folder: Path, report):
    sizes: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        sizes[info["location"]] = max(sizes.get(info["location"], 0), end)
    for location, end in sizes.items():
        f = folder / location
        if not f.is_file():
            report.problems.append(f"external data file {location} is missing beside the graph")
        elif f.stat().st_size < end:
            report.problems.append(f"external data file {location} is truncated ({f.stat().st_size} < {end} bytes)")
