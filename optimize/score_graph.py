"""A scoring graph beside each shared-KV generation graph: every position's log-probability of a given
next token, in one pass (cpm-eval's candidates, perplexity).

The generation graph reads the head at each row's last valid position only (last_valid_logits.py).
Its scoring twin is the same graph with that pick removed, so the head runs at every position, and a
tail that turns the logits into log-probabilities of ``target_ids`` [B, S]:

    LogSoftmax(logits) -> GatherElements(target_ids) -> token_logprobs [B, S] (float32)
                       -> TopK(5)                    -> top_logprobs [B, S, 5], top_ids [B, S, 5]

(the top five: what an echoed prompt's ``top_logprobs`` report over the API; onnxruntime runs the
TopK only when a caller asks for those outputs).

Only nodes change: the initializers keep their external-data references, so the twin reads the very
weights (same data file, same offsets) the generation graph reads and adds no bytes beyond its
graph file. Inputs and presents are those of the generation graph plus ``target_ids``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.eval.scoring import MAX_TOP as TOP_K, SCORE_OUTPUT, TARGETS_INPUT, TOP_OUTPUTS
from .errors import OptimizeError


class ScoreGraphError(OptimizeError, ValueError):
    """The generation graph does not have the head this rewrite expects."""


def score_file(graph_file: str) -> str:
    return graph_file.removesuffix(".onnx") + "_score.onnx"


def build(folder: Path, graph_file: str) -> str:
    """Write the scoring twin of ``folder/graph_file``; returns its file name."""
    model = onnx.load(str(folder / graph_file), load_external_data=False)
    to_scoring(model)
    name = score_file(graph_file)
    onnx.save(model, str(folder / name))
    return name


def to_scoring(model: onnx.ModelProto) -> None:
    """Rewrite a last-valid-position generation graph, in place, into its scoring twin."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    pick = [n for n in g.node if n.op_type == "GatherND" and _int_attr(n, "batch_dims") == 1]
    if len(pick) != 1:
        raise ScoreGraphError(f"expected one last-valid-position GatherND, found {len(pick)}")
    hidden = pick[0].input[0]  # [B, S, H]
    last = [n for n in g.node if n.op_type == "Unsqueeze" and n.input[0] == pick[0].output[0]]
    if len(last) != 1:
        raise ScoreGraphError("the last-position pick is not followed by one Unsqueeze")
    for n in g.node:  # the head now reads every position
        n.input[:] = [hidden if i == last[0].output[0] else i for i in n.input]

    logits = producers.get("logits")
    if logits is None or logits.op_type != "Reshape":
        raise ScoreGraphError("the graph's logits do not come from a Reshape of the head")
    g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "score/vocab_dim"))
    g.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "score/axis2"))
    g.initializer.append(numpy_helper.from_array(np.array([TOP_K], np.int64), "score/top_k"))
    logits_type = next(o.type.tensor_type.elem_type for o in g.output if o.name == "logits")
    logits.output[0] = "score/logits"
    shape = helper.make_node("Shape", ["input_ids"], ["score/batch_seq"], name="/score/batch_seq")
    full = helper.make_node("Concat", ["score/batch_seq", "score/vocab_dim"], ["score/logits_shape"],
                            name="/score/logits_shape", axis=0)
    logits.input[1] = "score/logits_shape"  # [B*S, V] -> [B, S, V]
    at = list(g.node).index(logits)
    g.node.insert(at, full)
    g.node.insert(at, shape)
    tail = []
    x = "score/logits"
    if logits_type != TensorProto.FLOAT:  # fp16 graphs: the softmax over 30000 entries in fp32
        tail.append(helper.make_node("Cast", [x], ["score/logits_f32"], name="/score/to_fp32", to=TensorProto.FLOAT))
        x = "score/logits_f32"
    tail += [
        helper.make_node("LogSoftmax", [x], ["score/logprobs"], name="/score/log_softmax", axis=-1),
        helper.make_node("Unsqueeze", [TARGETS_INPUT, "score/axis2"], ["score/targets"], name="/score/targets"),
        helper.make_node("GatherElements", ["score/logprobs", "score/targets"], ["score/picked"],
                         name="/score/pick", axis=2),
        helper.make_node("Squeeze", ["score/picked", "score/axis2"], [SCORE_OUTPUT], name="/score/token_logprobs"),
        helper.make_node("TopK", ["score/logprobs", "score/top_k"], list(TOP_OUTPUTS), name="/score/top", axis=-1),
    ]
    g.node.extend(tail)

    ids = next(i for i in g.input if i.name == "input_ids")
    dims = [d.dim_param or d.dim_value for d in ids.type.tensor_type.shape.dim]
    g.input.append(helper.make_tensor_value_info(TARGETS_INPUT, TensorProto.INT64, dims))
    outputs = [o for o in g.output if o.name != "logits"]
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, dims),
                     helper.make_tensor_value_info(TOP_OUTPUTS[0], TensorProto.FLOAT, [*dims, TOP_K]),
                     helper.make_tensor_value_info(TOP_OUTPUTS[1], TensorProto.INT64, [*dims, TOP_K]), *outputs])
    _drop_dead_nodes(g)


def _int_attr(node: onnx.NodeProto, name: str) -> int | None:
    return next((a.i for a in node.attribute if a.name == name), None)


def _drop_dead_nodes(g: onnx.GraphProto) -> None:
    """The last-position pick (and its index arithmetic and constants) no longer feed any output."""
    needed = {o.name for o in g.output}
    live = []
    for n in reversed(g.node):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(live))
    kept = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(kept)
