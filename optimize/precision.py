"""fp16 graphs with fp32 islands, and the fp16 range report that justifies (or extends) them."""

from __future__ import annotations

import numpy as np
import onnx

FP16_MAX = 65504.0
# Kept in fp32: LayerNorm statistics and softmax are where fp16 loses (mean/variance of large
# activations, exp of large scores). onnxruntime's converter wraps them in Casts.
FP32_OPS = ("LayerNormalization", "Softmax", "SkipLayerNormalization")


def to_fp16(model: onnx.ModelProto, keep_fp32_ops=FP32_OPS, keep_fp32_nodes=()) -> onnx.ModelProto:
    """onnxruntime's converter, with Casts around the fp32 islands.

    It needs every intermediate type to place those Casts. Types are inferred on a weightless copy
    of the graph (initializer dims are enough), so a model past protobuf's 2 GB limit works too.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    typed = onnx.shape_inference.infer_shapes(_weightless(model))
    known = {v.name for v in model.graph.value_info}
    model.graph.value_info.extend(v for v in typed.graph.value_info if v.name not in known)
    return convert_float_to_float16(model, keep_io_types=False, op_block_list=list(keep_fp32_ops),
                                    node_block_list=list(keep_fp32_nodes), disable_shape_infer=True)


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with each initializer reduced to its name, type and dims."""
    copy = onnx.ModelProto()
    copy.ir_version, copy.producer_name = model.ir_version, model.producer_name
    copy.opset_import.extend(model.opset_import)
    graph = copy.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    for t in model.graph.initializer:
        graph.initializer.append(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims,
                                                  data_location=onnx.TensorProto.EXTERNAL,
                                                  external_data=[onnx.StringStringEntryProto(key="location", value="-")]))
    return copy


def range_report(model_path, feeds_list: list[dict], threshold: float = 0.1, top: int = 20,
                 mask_fill: float = -1e4) -> dict:
    """Run the fp32 graph on sample inputs and list tensors whose magnitude comes near fp16's limit.

    Every node output is exposed as a graph output for this run (a scratch copy, never written).
    ``threshold`` is the fraction of 65504 from which a tensor is flagged.
    """
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    declared = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in declared:
                model.graph.output.append(onnx.ValueInfoProto(name=out))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # names must survive
    opts.log_severity_level = 3
    # the scratch graph references the data file by a relative path: load it from the bundle folder
    scratch = model_path.parent / f".{model_path.stem}.ranges.onnx"
    onnx.save(model, scratch)
    try:
        session = ort.InferenceSession(str(scratch), opts, providers=["CPUExecutionProvider"])
    finally:
        scratch.unlink()
    names = [o.name for o in session.get_outputs()]
    peak: dict[str, float] = {}
    for feeds in feeds_list:
        for name, value in zip(names, session.run(names, feeds)):
            if value.dtype.kind == "f" and value.size:
                value = value[value != mask_fill]  # masked scores hold the fill value by design
                peak[name] = max(peak.get(name, 0.0), float(np.abs(value).max(initial=0.0)))
    producer = {out: node for node in model.graph.node for out in node.output}
    flagged = sorted(((v, k) for k, v in peak.items() if v >= threshold * FP16_MAX), reverse=True)
    rows = [{"tensor": k, "max_abs": v, "fraction_of_fp16_max": v / FP16_MAX, "op": producer[k].op_type if k in producer else "output",
             "layer": _layer(producer[k].name) if k in producer else None, "node": producer[k].name if k in producer else None}
            for v, k in flagged[:top]]
    overall = sorted(peak.items(), key=lambda kv: -kv[1])[:5]
    return {"threshold_fraction": threshold, "samples": len(feeds_list), "flagged": rows,
            "largest": [{"tensor": k, "max_abs": v} for k, v in overall]}


def _layer(node_name: str) -> int | None:
    part = node_name.split("/")[1] if node_name.startswith("/") else ""
    return int(part[2:]) if part.startswith("h.") else None
