import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit_helpers.graph import graph_info


def test_macs_hand_computed(tmp_path):
    # Conv 3->8, 3x3, stride 2 on 16x16 -> 8x8x8 outputs, each 3*3*3 MACs; depthwise 8->8 3x3 -> 8*8*8*9;
    # MatMul [1, 64, 8] x [8, 4] -> 64*4 outputs, each 8 MACs
    w1 = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w1")
    w2 = numpy_helper.from_array(np.zeros((8, 1, 3, 3), np.float32), "w2")
    w3 = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w3")
    shape = numpy_helper.from_array(np.array([1, 8, 64], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Reshape", ["c2", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "w3"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 4])], [w1, w2, w3, shape])  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(tmp_path / "g.onnx"))
    info = graph_info(tmp_path / "g.onnx")
    assert info["macs_by_op"]["Conv"] == 8 * 8 * 8 * 27 + 8 * 8 * 8 * 9
    assert info["macs_by_op"]["MatMul"] == 64 * 4 * 8
    assert info["parameters"] == 8 * 27 + 8 * 9 + 32  # float initializers only
    assert info["op_counts"]["Conv"] == 2
