"""Split ``decoder.onnx`` in two at load time, so that the pipelined player keeps both cores equally busy.

The pipelined player (``components.play.server``) predicts frame t+1 on one core while frame t is decoded on the other,
so a frame costs max(world model, decoder). When the decoder is the slower of the two, its first layers (the
cheap low-resolution ones) can run on the world model's core instead, right after the prediction: the decoder
graph is cut at a tensor that alone carries everything from the first part to the second (a block boundary),
into a *head* and a *tail*. Nothing is changed or approximated: the two parts hold the same nodes and weights as
the whole graph, and ``OnnxModels`` checks on load that head then tail gives the whole decoder's output.

The browser bundle (``components/play/web_bundle.py``) splits the same way and goes one step further:
``with_head`` joins the world model and the head into one graph, so that each of the page's two Web Workers still
runs one session.

This module needs the ``onnx`` package (already a dependency of the export); without it the player simply does
not split. The export and its contract are untouched: the split lives in memory (the player) or in the bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import compose, numpy_helper, shape_inference
from onnx.utils import Extractor

COST_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def load_graph(path: str | Path) -> Any:
    """The ONNX model at ``path`` (an ``onnx.ModelProto``); ImportError without the onnx package."""

    return onnx.load(str(path))


def single_tensor_cuts(model: onnx.ModelProto) -> list[tuple[int, str]]:
    """(number of nodes before the cut, the one tensor crossing it) for every place where the graph, in its
    stored (topological) order, can be cut with exactly one intermediate tensor going from the first part to
    the second, and the graph inputs are used by the first part only."""
    graph = model.graph
    nodes = list(graph.node)
    inputs = {i.name for i in graph.input} - {init.name for init in graph.initializer}
    produced_at = {out: index for index, node in enumerate(nodes) for out in node.output if out}
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = index
    outputs = {o.name for o in graph.output}
    cuts = []
    for k in range(1, len(nodes)):
        if any(last_use.get(name, -1) >= k for name in inputs):
            continue
        crossing = [t for t, made in produced_at.items() if made < k and (last_use.get(t, -1) >= k or t in outputs)]
        if len(crossing) == 1 and crossing[0] not in outputs:
            cuts.append((k, crossing[0]))
    return cuts


def node_costs(model: onnx.ModelProto) -> list[float]:
    """Multiply-adds of each node at batch 1 (convolutions and matrix products; other nodes count 0), from
    ONNX shape inference."""

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    inferred = shape_inference.infer_shapes(model, data_prop=True).graph
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim]
    for init in inferred.initializer:
        shapes[init.name] = list(numpy_helper.to_array(init).shape) if init.dims else []

    def size(name: str) -> int:
        total = 1
        for d in shapes.get(name, [0]):
            total *= d
        return total

    costs = []
    for node in inferred.node:
        cost = 0.0
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            weight = shapes.get(node.input[1], [])
            per_output = size(node.input[1]) // weight[0] if weight and weight[0] else 0
            cost = float(size(node.output[0]) * per_output)
        elif node.op_type in ("MatMul", "Gemm"):
            a = shapes.get(node.input[0], [])
            cost = float(size(node.output[0]) * (a[-1] if a else 0))
        costs.append(cost)
    return costs


def ranked_cuts(model: onnx.ModelProto, head_share: float) -> list[tuple[str, float]]:
    """(tensor, head share) of every cut whose head holds some work and at most half of it, the share nearest
    ``head_share`` (0 to 0.5) first; empty when ``head_share`` is 0 or the graph has no work to share."""
    costs = node_costs(model)
    total = sum(costs)
    if total <= 0 or head_share <= 0:
        return []
    shares = [(tensor, sum(costs[:k]) / total) for k, tensor in single_tensor_cuts(model)]
    return sorted([cut for cut in shares if 0 < cut[1] <= 0.5], key=lambda cut: abs(cut[1] - head_share))


def choose_cut(model: onnx.ModelProto, head_share: float) -> tuple[str, float] | None:
    """The cut whose head holds the share of the graph's multiply-adds closest to ``head_share`` (0 to 0.5),
    and that share; None when no cut has a head with any work in it."""
    cuts = ranked_cuts(model, head_share)
    return cuts[0] if cuts else None


def quantized_tensor(model: onnx.ModelProto, tensor: str) -> str:
    """Where to cut a QDQ (int8) graph for the float graph's ``tensor``: the output of the ``QuantizeLinear`` that
    is its only consumer, so that ONNX Runtime fuses the head's last node with that quantization exactly as it does
    in the whole graph (cutting before it gave frames 0.027 apart); ``tensor`` itself in any other graph."""
    consumers = [node for node in model.graph.node if tensor in node.input]
    if len(consumers) == 1 and consumers[0].op_type == "QuantizeLinear":
        return str(consumers[0].output[0])
    return tensor


def split(model: onnx.ModelProto, tensor: str) -> tuple[bytes, bytes]:
    """(head, tail) as serialized ONNX models: graph inputs -> ``tensor``, and ``tensor`` -> graph outputs."""

    model = shape_inference.infer_shapes(model)  # the extractor needs the cut tensor's type
    extractor = Extractor(model)
    weights = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in weights]
    outputs = [o.name for o in model.graph.output]
    head = extractor.extract_model(inputs, [tensor])
    tail = extractor.extract_model([tensor], outputs)
    return head.SerializeToString(), tail.SerializeToString()


HEAD_PREFIX = "decoder_head/"
SPLIT_TOLERANCE = 1e-4  # the largest difference a split may make to a latent or a frame ([0, 1]); else no split


def with_head(world_model: onnx.ModelProto, decoder: onnx.ModelProto, tensor: str,
              latent: str = "next_latent") -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The decoder cut at ``tensor``, for two workers: (one graph that runs ``world_model`` and then the decoder's
    head on its output ``latent``, the decoder's tail). The joined graph outputs ``latent`` and the head's output,
    renamed ``HEAD_PREFIX`` + ``tensor`` (the head's names are prefixed so none clashes); the tail takes that name."""
    head_bytes, tail_bytes = split(decoder, tensor)
    head = compose.add_prefix(onnx.load_from_string(head_bytes), HEAD_PREFIX)
    (head_input,) = [i.name for i in head.graph.input if i.name not in {t.name for t in head.graph.initializer}]
    joined = compose.merge_models(world_model, head, io_map=[(latent, head_input)],
                                  outputs=[latent, *(o.name for o in head.graph.output)])
    tail = onnx.load_from_string(tail_bytes)
    for value in [*tail.graph.input, *tail.graph.value_info]:
        if value.name == tensor:
            value.name = HEAD_PREFIX + tensor
    for node in tail.graph.node:
        node.input[:] = [HEAD_PREFIX + tensor if name == tensor else name for name in node.input]
    return joined, tail
