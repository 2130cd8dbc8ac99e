"""Fast bias correction of finished Q/DQ files (int8/bias_correction.py), on tiny graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit_helpers.errors import LowbitError
from lowbit_helpers.int8.bias_correction import correct_biases
from lowbit_helpers.int8.ort import quantize_int8_ort


def _conv_silu_conv(path, seed=0):
    """x -> Conv(3->8) -> SiLU -> Conv(8->4); the first Conv's output is a graph output too."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b2")]  # fmt: skip
    nodes = [helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["s1"], name="sig1"),
             helper.make_node("Mul", ["c1", "s1"], ["a1"], name="mul1"),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("c1", TensorProto.FLOAT, None)], inits)  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))


def _images(n=24, seed=1):
    """Skewed inputs whose per-image ranges differ (a few outliers): averaged ranges clip them, so
    quantization shifts the Conv outputs' means and there is a bias to correct."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 0.3, (n, 3, 16, 16)).astype(np.float32)
    x[::6, :, 0, 0] = 12.0
    return x


def _outputs(path, images):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the Q/DQ arithmetic as written
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [np.concatenate(z) for z in zip(*(s.run(["c1", "y"], {"images": img[None]}) for img in images))]


def _mean_shift(ref, out):
    """Largest per-channel mean error over images and positions."""
    return float(np.abs((ref - out).mean(axis=(0, 2, 3))).max())


@pytest.mark.parametrize("placement", ["all", "conv-inputs"])
def test_fast_bias_correction_removes_the_mean_shift(placement, tmp_path):
    fp32, q, fixed = tmp_path / "fp32.onnx", tmp_path / "q.onnx", tmp_path / "q_bc.onnx"
    _conv_silu_conv(fp32)
    images = _images()
    quantize_int8_ort(fp32, q, images, method="avgminmax", head_policy="none", placement=placement)
    summary = correct_biases(q, fp32, images, fixed)
    assert summary["convs"] == 2 and summary["images"] == len(images)
    ref_c1, ref_y = _outputs(fp32, images)
    before_c1, before_y = _outputs(q, images)
    after_c1, after_y = _outputs(fixed, images)
    assert _mean_shift(ref_c1, before_c1) > 1e-3  # there was a shift to remove
    if placement == "conv-inputs":
        # conv1's output is float here: on the statistics' images its mean error is gone (int32 bias rounding aside)
        assert _mean_shift(ref_c1, after_c1) < 0.02 * _mean_shift(ref_c1, before_c1)
    else:  # conv1's output is quantized after the corrected bias: what is left is that rounding's own mean
        assert _mean_shift(ref_c1, after_c1) < 0.5 * _mean_shift(ref_c1, before_c1)
    assert np.mean((ref_y - after_y) ** 2) < np.mean((ref_y - before_y) ** 2)
    # only the biases changed: same nodes, same Q/DQ, same weights
    a, b = onnx.load(str(q)), onnx.load(str(fixed))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    changed = {i.name for i, j in zip(a.graph.initializer, b.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(i), numpy_helper.to_array(j))}  # fmt: skip
    assert changed and all("b1" in n or "b2" in n for n in changed), changed


def test_conv_inputs_placement_quantizes_only_conv_inputs(tmp_path):
    fp32, q = tmp_path / "fp32.onnx", tmp_path / "q.onnx"
    _conv_silu_conv(fp32)
    quantize_int8_ort(fp32, q, _images(), head_policy="none", placement="conv-inputs")
    m = onnx.load(str(q))
    quantized = [n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(quantized) == ["a1", "images"]  # the two Conv inputs; no Q on Conv outputs, Sigmoid or Mul
    with pytest.raises(LowbitError, match="placement"):
        quantize_int8_ort(fp32, tmp_path / "bad.onnx", _images(), head_policy="none", placement="everything")
    assert not (tmp_path / "bad.onnx").exists()


def _modelopt_style(path, fp32_path):
    """TensorRT's placement as ModelOpt writes it: int8 activations (zero point 0), weights quantized
    in the graph by QuantizeLinear on the float initializer, float bias."""
    fp = onnx.load(str(fp32_path))
    init = {i.name: numpy_helper.to_array(i) for i in fp.graph.initializer}
    w = init["w1"]
    w_scale = (np.abs(w).reshape(8, -1).max(axis=1) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(init["b1"], "b1"),
             numpy_helper.from_array(w_scale, "w1_scale"), numpy_helper.from_array(np.zeros(8, np.int8), "w1_zp"),
             numpy_helper.from_array(np.array(2.0 / 127, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zp")]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["images", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w1", "w1_scale", "w1_zp"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "w1_scale", "w1_zp"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("c1", TensorProto.FLOAT, None)], inits)  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))


def test_bias_correction_of_a_tensorrt_style_file(tmp_path):
    import onnxruntime as ort

    fp32, q = tmp_path / "fp32.onnx", tmp_path / "trt.onnx"
    _conv_silu_conv(fp32)
    _modelopt_style(q, fp32)
    images = _images()  # ranges up to 12 against a 2.0 clip: a large systematic shift
    correct_biases(q, fp32, images, tmp_path / "trt_bc.onnx")

    def c1(path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(["c1"], {"images": img[None]})[0] for img in images])

    ref = c1(fp32)
    before, after = _mean_shift(ref, c1(q)), _mean_shift(ref, c1(tmp_path / "trt_bc.onnx"))
    assert before > 1e-3 and after < 0.02 * before
    b = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "trt_bc.onnx")).graph.initializer}
    assert b["b1"].dtype == np.float32 and b["w1"].dtype == np.float32  # float bias shifted, weights untouched


def test_bias_correction_refuses_what_it_cannot_correct(tmp_path):
    fp32 = tmp_path / "fp32.onnx"
    _conv_silu_conv(fp32)
    with pytest.raises(LowbitError, match="no Conv with Q/DQ") as e:
        correct_biases(fp32, fp32, _images(), tmp_path / "out.onnx")
    assert "quantize-int8" in e.value.fix
    with pytest.raises(LowbitError, match="calibration images"):
        correct_biases(fp32, fp32, _images()[:0], tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_depthwise_and_bias_less_convs(tmp_path):
    """A depthwise Conv is corrected per channel; a quantized Conv without a bias is reported and left alone."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32), "wd"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "bd")]  # fmt: skip
    nodes = [helper.make_node("Conv", ["images", "w1"], ["c1"], name="conv_nobias", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "wd", "bd"], ["dw"], name="conv_dw", pads=[1, 1, 1, 1], group=8)]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("dw", TensorProto.FLOAT, None)], inits)  # fmt: skip
    fp32, q, fixed = tmp_path / "fp32.onnx", tmp_path / "q.onnx", tmp_path / "bc.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(fp32))
    images = _images()
    quantize_int8_ort(fp32, q, images, head_policy="none", placement="conv-inputs")
    summary = correct_biases(q, fp32, images, fixed)
    assert summary["convs"] == 1 and summary["convs_without_bias"] == ["conv_nobias"]

    def out(path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(["dw"], {"images": img[None]})[0] for img in images])

    ref = out(fp32)
    before, after = _mean_shift(ref, out(q)), _mean_shift(ref, out(fixed))
    # the bias-less Conv's own shift reaches the depthwise Conv's input, which fast correction
    # (FP32 inputs) does not see; the depthwise Conv's own quantization shift is removed
    assert after < before, (before, after)


def test_tensorrt_rules_hold_for_the_int8_symmetric_recipe_and_name_each_break(tmp_path):
    """ORT with int8-symmetric activations on Conv inputs writes what TensorRT takes, as a ModelOpt-style
    file does; ORT's CPU recipe (uint8, asymmetric) breaks two rules; each other rule, broken on a copy
    of the good file, is named (int8/tensorrt.py)."""
    from lowbit_helpers.int8.tensorrt import RULES, tensorrt_violations

    fp32, trt, cpu, mo = (tmp_path / f"{n}.onnx" for n in ("fp32", "trt", "cpu", "mo"))
    _conv_silu_conv(fp32)
    quantize_int8_ort(fp32, trt, _images(), head_policy="none", placement="conv-inputs", activations="int8-symmetric")
    quantize_int8_ort(fp32, cpu, _images(), head_policy="none")
    _modelopt_style(mo, fp32)
    good = onnx.load(str(trt))
    inits = {i.name: i for i in good.graph.initializer}
    zps = [inits[n.input[2]] for n in good.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zps and all(z.data_type == TensorProto.INT8 and not numpy_helper.to_array(z).any() for z in zps)
    for path in (trt, mo):
        assert tensorrt_violations(onnx.load(str(path))) == {r: [] for r in RULES}, path.name
    # ORT's CPU recipe: uint8 asymmetric activations and an int32 bias behind DequantizeLinear; nothing else
    broken = tensorrt_violations(onnx.load(str(cpu)))
    assert {r for r, v in broken.items() if v} == {"int8", "symmetric"}
    assert {"b1", "b2"} <= set(broken["int8"])  # the int32 biases (DequantizeLinear outputs b1, b2) count against int8

    def doctored(change) -> set[str]:
        m = onnx.load(str(trt))
        change(m)
        return {r for r, v in tensorrt_violations(m).items() if v}

    def old_opset(m):
        m.opset_import[0].version = 12

    def weight_axis_1(m):
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and "w1" in n.input[0])
        dq.attribute[0].i = 1

    def activation_scale_per_channel(m):
        i = next(i for i in m.graph.initializer if i.name == "images_scale")
        i.CopyFrom(numpy_helper.from_array(np.full(3, numpy_helper.to_array(i), np.float32), i.name))

    def no_input_dq(m):
        for n in m.graph.node:
            if n.op_type == "Conv":
                n.input[0] = "images"

    assert doctored(old_opset) == {"opset"}
    assert doctored(weight_axis_1) == {"per-channel weights on axis 0"}
    assert doctored(activation_scale_per_channel) == {"per-tensor activations"}
    assert doctored(no_input_dq) == {"quantized convs"}
    with pytest.raises(LowbitError, match="activation type"):
        quantize_int8_ort(fp32, tmp_path / "bad.onnx", _images(), head_policy="none", activations="int4")
    assert not (tmp_path / "bad.onnx").exists()
