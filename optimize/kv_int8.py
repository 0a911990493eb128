"""An int8 KV cache for a shared-KV graph: each GroupQueryAttention node stores and reads its keys
and values as int8 with static per-channel scales (onnxruntime's CPU kernel: ``k_quant_type`` /
``v_quant_type`` PER_CHANNEL, ``kv_cache_bit_width`` 8, ``k_scale`` / ``v_scale`` of kv_heads x
head_dim floats; a value is stored as round(x / scale), clamped).

Only the attention nodes and the cache's input/output types change; the scales are small
initializers stored in the graph file, so the rewritten graph still reads its variant's data file.
The scales come from calibration against the reference model (exporter/kv_calibration.py): a value
beyond its channel's range is clamped, so they must cover what real text produces.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .errors import OptimizeError

PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
K_SCALE_INPUT, V_SCALE_INPUT = 12, 13  # GroupQueryAttention's k_scale / v_scale inputs


class KVCacheError(OptimizeError, ValueError):
    """The graph is not a shared-KV graph this rewrite understands, or the scales do not fit it."""


def scale_name(layer: int, kind: str) -> str:
    return f"kv_scale.{layer}.{kind}"


def kv8_file(graph_file: str) -> str:
    return graph_file.removesuffix(".onnx") + "_kv8.onnx"


def to_int8_cache(model: onnx.ModelProto, scales: dict[str, np.ndarray]) -> int:
    """Rewrite ``model`` in place; ``scales`` maps ``kv_scale.{layer}.{key|value}`` to [heads * head_dim]
    float32. Returns how many attention nodes now keep an int8 cache."""
    g = model.graph
    present = {t.name for t in g.initializer}
    count = 0
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            continue
        match = PAST.match(node.input[3]) if len(node.input) > 4 else None
        if match is None:
            raise KVCacheError(f"attention node {node.name} does not read a past_key_values input")
        layer = int(match.group(1))
        names = [scale_name(layer, "key"), scale_name(layer, "value")]
        for name in names:
            if name not in scales:
                raise KVCacheError(f"no calibrated scale {name}")
            if name not in present:
                g.initializer.append(numpy_helper.from_array(np.asarray(scales[name], np.float32), name))
                present.add(name)
        inputs = list(node.input) + [""] * max(0, V_SCALE_INPUT + 1 - len(node.input))
        inputs[K_SCALE_INPUT], inputs[V_SCALE_INPUT] = names
        node.input[:] = inputs
        for attr in list(node.attribute):
            if attr.name in ("k_quant_type", "v_quant_type", "kv_cache_bit_width"):
                node.attribute.remove(attr)
        node.attribute.extend([onnx.helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("kv_cache_bit_width", 8)])
        count += 1
    if count == 0:
        raise KVCacheError("no GroupQueryAttention node: an int8 cache needs a shared-KV graph")
    caches = [v for v in [*g.input, *g.output] if PAST.match(v.name) or v.name.startswith("present.")]
    for v in caches:
        v.type.tensor_type.elem_type = TensorProto.INT8
    return count


def build(folder: Path, graph_file: str, scales: dict[str, np.ndarray]) -> str:
    """Write the int8-cache version of ``folder/graph_file`` beside it; returns its file name."""
    model = onnx.load(str(folder / graph_file), load_external_data=False)
    to_int8_cache(model, scales)
    name = kv8_file(graph_file)
    onnx.save(model, str(folder / name))
    return name
