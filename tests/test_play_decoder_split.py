"""components/runtime/decoder_split.py on small hand-built ONNX graphs, run by the real ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from components.runtime.decoder_split import (
    choose_cut,
    node_costs,
    quantized_tensor,
    ranked_cuts,
    single_tensor_cuts,
    split,
)


def conv_graph() -> onnx.ModelProto:
    """latents [B,2,8,8] -> conv a (2->4) -> relu b -> conv c (4->4) -> add d = b + c (a skip) -> conv frames (4->3).

    Cuts with one tensor crossing: after a, after b (b is then the only live tensor, used twice), after d.
    """
    rng = np.random.default_rng(0)
    weights = {name: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (4, 2, 3, 3)), ("w2", (4, 4, 3, 3)), ("w3", (3, 4, 1, 1)))}
    nodes = [
        helper.make_node("Conv", ["latents", "w1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "c"], ["d"]),
        helper.make_node("Conv", ["d", "w3"], ["frames"]),
    ]
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("latents", TensorProto.FLOAT, ["batch", 2, 8, 8])],
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        list(weights.values()),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def run(model: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_cuts_cross_exactly_one_tensor() -> None:
    assert single_tensor_cuts(conv_graph()) == [(1, "a"), (2, "b"), (4, "d")]


def test_costs_count_multiply_adds_of_convolutions() -> None:
    # a: 4x8x8 outputs x 2x3x3 taps; c: 4x8x8 x 4x3x3; frames: 3x8x8 x 4x1x1; relu and add: 0.
    assert node_costs(conv_graph()) == [256 * 18, 0, 256 * 36, 0, 192 * 4]


def test_the_cut_nearest_the_share_asked_for_is_chosen() -> None:
    total = 256 * 18 + 256 * 36 + 192 * 4
    head_share = 256 * 18 / total  # the head up to a (or b: same work) holds this share
    assert choose_cut(conv_graph(), 0.2) == ("a", head_share)
    assert choose_cut(conv_graph(), 0.0) is None
    # Cutting after d would leave the head with more than half of the work: never chosen.
    assert choose_cut(conv_graph(), 0.5)[0] == "a"
    assert [tensor for tensor, _ in ranked_cuts(conv_graph(), 0.2)] == ["a", "b"]  # equal shares, graph order


def test_an_int8_graph_is_cut_after_the_quantization_of_the_cut_tensor() -> None:
    """In a QDQ graph the float tensor's only consumer is its QuantizeLinear: the cut moves to that node's output."""
    scale, zero = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(128), "z")
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["a_q"]),
             helper.make_node("DequantizeLinear", ["a_q", "s", "z"], ["a_dq"]),
             helper.make_node("Relu", ["a_dq"], ["b"]),
             helper.make_node("Add", ["b", "a_dq"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert quantized_tensor(model, "a") == "a_q"
    assert quantized_tensor(model, "a_dq") == "a_dq"  # used by two nodes, none a quantization: stays
    assert quantized_tensor(conv_graph(), "a") == "a"  # a float graph: stays


def test_head_then_tail_is_the_whole_graph() -> None:
    model = conv_graph()
    latents = np.random.default_rng(1).standard_normal((3, 2, 8, 8)).astype(np.float32)
    whole = run(model.SerializeToString(), {"latents": latents})
    for tensor in ("a", "b", "d"):
        head, tail = split(model, tensor)
        hidden = run(head, {"latents": latents})
        assert hidden.shape[0] == 3  # the batch stays dynamic
        np.testing.assert_allclose(run(tail, {tensor: hidden}), whole, rtol=0, atol=1e-5)
