"""The shared-KV interface that the GroupQueryAttention graph runs with.

Replaces attention_mask by per-row lengths: seqlens_k [B] (total tokens after this step - 1),
total_sequence_length [] (the largest of those totals) and query_seqlens [B] (valid rows of a
right-padded chunk). past and present are one buffer of max_sequence_length per layer, written in
place by onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

MAX_DIM = "max_sequence_length"


@dataclass
class SharedKVInputs:
    seqlens_k: ir.Value
    total_sequence_length: ir.Value
    query_seqlens: ir.Value


def add_inputs(model: ir.Model) -> SharedKVInputs:
    batch = ir.SymbolicDim("batch_size")
    values = SharedKVInputs(
        ir.Value(name="seqlens_k", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([batch])),
        ir.Value(name="total_sequence_length", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([])),
        ir.Value(name="query_seqlens", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([batch])),
    )
    model.graph.inputs.extend([values.seqlens_k, values.total_sequence_length, values.query_seqlens])
    return values


def finish(model: ir.Model) -> None:
    """Drop attention_mask once nothing reads it; declare past/present as max-length buffers."""
    graph = model.graph
    for value in list(graph.inputs):
        if value.name == "attention_mask":
            if value.uses():
                raise ValueError("attention_mask is still used after attention fusion")
            graph.inputs.remove(value)
    for value in [*graph.inputs, *graph.outputs]:
        if value.name.startswith(("past_key_values.", "present.")):
            dims = list(value.shape)
            value.shape = ir.Shape([dims[0], dims[1], ir.SymbolicDim(MAX_DIM), dims[3]])
