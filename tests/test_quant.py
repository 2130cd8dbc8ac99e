"""INT8 quantization end to end on a real (small) model, the calibrators, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit_helpers.__main__ import build_parser, main
from lowbit_helpers.errors import LowbitError
from lowbit_helpers.int8.calibration import ArrayReader, activation_ranges, load_calibration
from lowbit_helpers.int8.policy import excluded_nodes
from lowbit_helpers.int8.tensorrt import tensorrt_violations
from lowbit_helpers.runtime.inspect import cosine, ort_executed_ops, qdq_counts, sqnr_db


@pytest.fixture(scope="module")
def calib(coco_root, tmp_path_factory):
    from lowbit_helpers.data import calibration_tensor, read_image_list

    arr = calibration_tensor(read_image_list(coco_root / "calib160.txt"), 4)
    path = tmp_path_factory.mktemp("calib") / "calib.npy"
    np.save(path, arr)
    return path


def test_head_policies(yolov10n_onnx):
    m = onnx.load(str(yolov10n_onnx))
    cons = excluded_nodes(m, "conservative")
    finals = [n for n in cons if n.endswith("/Conv")]
    assert len(finals) == 6 and all(".2/Conv" in n for n in finals)
    assert set(cons) > set(finals)  # and the reshape/concat after them
    head = excluded_nodes(m, "head")
    assert set(cons) < set(head) and all(n.startswith("/model.23/") or n in cons for n in head)
    assert excluded_nodes(m, "none") == []
    with pytest.raises(LowbitError, match="not in the graph"):
        excluded_nodes(m, "none", ["/model.99/Conv"])


@pytest.mark.parametrize("method", ["percentile", "avgminmax"])
def test_ort_int8_end_to_end(yolov10n_onnx, calib, tmp_path, method):
    out = tmp_path / "ort.onnx"
    assert main(["quantize-int8", str(yolov10n_onnx), "--backend", "ort", "--method", method,
                 "--calib-npy", str(calib), "--images", "4", "--out", str(out)]) == 0  # fmt: skip
    recipe = json.loads(out.with_suffix(".recipe.json").read_text())
    assert recipe["call"]["activation_type"] == "QUInt8" and recipe["call"]["per_channel"] and recipe["method"] == method
    assert recipe["call"]["ranges"]["method"] == method and recipe["call"]["ranges"]["images"] == 4
    assert "TensorQuantOverrides" in recipe["call"]["extra_options"] and "CalibMovingAverage" not in recipe["call"]["extra_options"]
    counts = qdq_counts(out)
    assert counts["Conv"] == 82 and counts["quantized_convs"] == 76 and counts["float_convs"] == 6
    assert len(counts["float_conv_names"]) == 6 and all(n.startswith("/model.23/") for n in counts["float_conv_names"])  # the head
    assert counts["QuantizeLinear"] > 100 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    executed = ort_executed_ops(out, threads=1)
    assert executed["QLinearConv"] == 76 and executed["float_Conv"] == 6  # every quantized Conv fused on CPU


def test_modelopt_int8_end_to_end(yolov10n_onnx, calib, tmp_path):
    # in its own process, as the pipeline runs it: ModelOpt patches ORT's calibrators process-wide
    out = tmp_path / "mo.onnx"
    proc = subprocess.run([sys.executable, "-m", "lowbit_helpers", "quantize-int8", str(yolov10n_onnx), "--backend",
                           "modelopt", "--method", "max", "--calib-npy", str(calib), "--images", "2", "--out", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    recipe = json.loads(out.with_suffix(".recipe.json").read_text())
    assert recipe["call"]["high_precision_dtype"] == "fp32" and recipe["call"]["calibration_eps"] == ["cpu"]
    assert out.with_suffix(".modelopt.log").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mo.modelopt.log", "mo.onnx", "mo.recipe.json"]  # no leftovers
    counts = qdq_counts(out)
    assert counts["quantized_convs"] == 76 and counts["float_convs"] == 6 and counts["QuantizeLinear"] > 0
    assert ort_executed_ops(out, threads=1)["QLinearConv"] < 10  # TensorRT placement: ORT CPU fuses almost none

    # our own TensorRT-ready recipe against ModelOpt's file, rule by rule (int8/tensorrt.py): both hold every
    # rule TensorRT sets a Q/DQ graph, quantize the same Convs, and leave the bias float; ORT's CPU recipe does not
    ours = tmp_path / "trt.onnx"
    assert main(["quantize-int8", str(yolov10n_onnx), "--backend", "ort", "--method", "avgminmax", "--placement",
                 "conv-inputs", "--activations", "int8-symmetric", "--bias-correction", "fast", "--bias-correction-images",
                 "2", "--calib-npy", str(calib), "--images", "2", "--out", str(ours)]) == 0  # fmt: skip
    cpu = tmp_path / "cpu.onnx"
    assert main(["quantize-int8", str(yolov10n_onnx), "--backend", "ort", "--method", "avgminmax", "--calib-npy", str(calib),
                 "--images", "2", "--out", str(cpu)]) == 0  # fmt: skip
    for f in (out, ours):
        assert {rule: v for rule, v in tensorrt_violations(onnx.load(str(f))).items() if v} == {}, f.name
        assert json.loads(f.with_suffix(".recipe.json").read_text())["tensorrt"] == {"ready": True, "violations": {}}
    mine, theirs = qdq_counts(ours), counts
    assert mine["quantized_convs"] == theirs["quantized_convs"] and mine["float_convs"] == theirs["float_convs"]
    for f in (out, ours):  # no integer bias: TensorRT dequantizes int8 only
        g = onnx.load(str(f)).graph
        conv_bias = {n.input[2] for n in g.node if n.op_type == "Conv" and len(n.input) > 2}
        assert not [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] in conv_bias], f.name
    recipe = json.loads(ours.with_suffix(".recipe.json").read_text())
    assert recipe["call"]["activation_type"] == "QInt8" and recipe["activations"] == "int8-symmetric"
    assert recipe["bias_correction"]["convs"] == 76
    broken = json.loads(cpu.with_suffix(".recipe.json").read_text())["tensorrt"]
    assert not broken["ready"] and {"int8", "symmetric"} <= set(broken["violations"])


def _one_conv_model(path):
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w],
    )  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def _range(r):
    return float(r[0]), float(r[1])


@pytest.mark.parametrize("method", ["minmax", "avgminmax", "percentile", "entropy"])
def test_activation_ranges_do_not_depend_on_image_order(method, tmp_path):
    model = _one_conv_model(tmp_path / "c.onnx")
    data = np.random.default_rng(1).normal(size=(6, 3, 8, 8)).astype(np.float32) * 3
    data[4] *= 5  # one outlier image: ORT's first-slice bin width and moving average would depend on where it falls
    a = activation_ranges(model, data, method)
    b = activation_ranges(model, data, method, order=[4, 2, 0, 5, 1, 3])
    assert set(a) == {"images", "y"} and all(_range(a[t]) == _range(b[t]) for t in a)


def test_activation_ranges_equal_their_definitions(tmp_path):
    import onnxruntime as ort

    model = _one_conv_model(tmp_path / "c.onnx")
    data = np.random.default_rng(1).normal(size=(6, 3, 8, 8)).astype(np.float32) * 3
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    y = np.stack([sess.run(None, {"images": data[i : i + 1]})[0] for i in range(6)])
    r = {m: activation_ranges(model, data, m)["y"] for m in ("minmax", "avgminmax", "percentile")}
    assert _range(r["minmax"]) == pytest.approx((y.min(), y.max()), rel=1e-6)
    per_image = y.reshape(6, -1)
    assert _range(r["avgminmax"]) == pytest.approx((per_image.min(1).mean(), per_image.max(1).mean()), rel=1e-6)
    # percentile: within one of its 2048 bins of numpy's percentiles over every value of every image
    lo, hi = np.percentile(y, [0.0005, 99.9995])
    bin_width = 2 * np.abs(y).max() / 2048
    assert abs(float(r["percentile"][0]) - lo) <= bin_width and abs(float(r["percentile"][1]) - hi) <= bin_width
    with pytest.raises(LowbitError, match="calibration method"):
        activation_ranges(model, data, "mse")


def test_ort_recipe_uses_these_ranges(tmp_path):
    """The Q/DQ ORT writes carry the ranges computed here (ORT's own calibrator decides nothing)."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    from lowbit_helpers.int8.ort import quantize_int8_ort

    model = _one_conv_model(tmp_path / "c.onnx")
    data = np.random.default_rng(1).normal(size=(6, 3, 8, 8)).astype(np.float32) * 3
    data[0] *= 10  # the first image alone would set very different ranges
    out = tmp_path / "q.onnx"
    quantize_int8_ort(model, out, data, method="avgminmax", head_policy="none")
    ranges = activation_ranges(model, data, "avgminmax")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    for tensor in ("images", "y"):
        zp, scale = compute_scale_zp(np.float32(ranges[tensor][0]), np.float32(ranges[tensor][1]), np.uint8(0), np.uint8(255), False)
        assert inits[f"{tensor}_scale"] == pytest.approx(float(scale), rel=1e-6), tensor
        assert int(inits[f"{tensor}_zero_point"]) == int(zp), tensor
    recipe = json.loads(out.with_suffix(".recipe.json").read_text())
    assert recipe["call"]["ranges"]["function"].endswith("activation_ranges") and recipe["call"]["ranges"]["images"] == 6


def test_reader_slices_and_helpers():
    data = np.zeros((5, 3, 2, 2), np.float32)
    r = ArrayReader(data)
    assert len(r) == 5 and sum(1 for _ in iter(r.get_next, None)) == 5
    r.set_range(1, 3)
    assert sum(1 for _ in iter(r.get_next, None)) == 2
    ref = np.random.default_rng(0).normal(size=1000)
    assert sqnr_db(ref, ref + 0.01 * ref) == pytest.approx(40.0, abs=1e-6)
    assert cosine(ref, 2 * ref) == pytest.approx(1.0)


def test_fidelity_does_not_depend_on_blas_threads():
    """The recorded cosine and SQNR are the same to the last bit with one BLAS thread or two (BLAS's
    dot splits its sum per thread, and ultralytics' import sets OMP_NUM_THREADS=1 in the test
    session's notebooks, not in a command-line run's: measured, the cosines' last digits moved)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    assert any(i["user_api"] == "blas" for i in threadpool_info()), "numpy's BLAS must be visible to threadpoolctl"
    assert (os.cpu_count() or 1) >= 2, "two threads must be possible for the comparison to mean anything"
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 144, 8400)).astype(np.float32)
    out = ref + 0.01 * rng.normal(size=ref.shape).astype(np.float32)
    values = []
    for threads in (1, 2):
        with threadpool_limits(threads):
            values.append((cosine(ref, out), sqnr_db(ref, out)))
    assert values[0] == values[1]


def test_bad_calibration_input(yolov10n_onnx, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "q.onnx"
    assert main(["quantize-int8", str(yolov10n_onnx), "--backend", "ort", "--calib", str(empty), "--out", str(out)]) == 2
    assert "is empty" in capsys.readouterr().err
    (tmp_path / "bad.jpg").write_bytes(b"\x89PNG broken")
    lst = tmp_path / "list.txt"
    lst.write_text("bad.jpg\n")
    assert main(["quantize-int8", str(yolov10n_onnx), "--backend", "ort", "--calib", str(lst), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot decode image" in err and "bad.jpg" in err
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 320, 320), np.float32))
    with pytest.raises(LowbitError, match="expected N x 3 x 640 x 640"):
        load_calibration(tmp_path / "wrong.npy")
    assert main(["quantize-int8", str(yolov10n_onnx), "--backend", "modelopt", "--method", "minmax",
                 "--calib-npy", str(tmp_path / "wrong.npy"), "--out", str(out)]) == 2  # fmt: skip
    assert not out.exists()


def test_profile_keys_kernels_by_their_onnx_conv(tmp_path):
    """ORT's profile of a float and an int8 model: per op type, per Conv, and the Conv ratio between them."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from lowbit_helpers.report.int8 import latency_breakdown
    from lowbit_helpers.runtime import compare_profiles, conv_key, profile_model
    from lowbit_helpers.steps.int8 import Int8Result

    aliases = {"/model.0/conv/Conv": "/model.0/conv/Conv", "/model.0/conv/Conv_output_0": "/model.0/conv/Conv"}
    assert conv_key("/model.0/conv/Conv_token_44", aliases) == "/model.0/conv/Conv"
    assert conv_key("/model.0/conv/Conv_output_0_nchwc", aliases) == "/model.0/conv/Conv"
    assert conv_key("other_nchwc", aliases) == "other"
    model = _one_conv_model(tmp_path / "c.onnx")
    data = np.random.default_rng(1).normal(size=(4, 3, 8, 8)).astype(np.float32)
    q = tmp_path / "q.onnx"
    quantize_static(str(model), str(q), ArrayReader(data), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)  # fmt: skip
    fp, iq = profile_model(model, threads=1, runs=3), profile_model(q, threads=1, runs=3)
    assert set(fp["by_conv"]) == set(iq["by_conv"]) == {"conv"}
    assert "QLinearConv" in iq["by_op_type"] and "QLinearConv" not in fp["by_op_type"]
    assert fp["kernel_ms"] == pytest.approx(sum(fp["by_op_type"].values())) and fp["runs"] == 3
    cmp = compare_profiles(fp, iq)
    assert cmp["convs_matched"] == 1
    assert cmp["conv_ratio"] == pytest.approx(iq["by_conv"]["conv"] / fp["by_conv"]["conv"])
    assert compare_profiles(fp, fp)["conv_ratio"] == 1.0 and compare_profiles(fp, fp)["slower_convs"] == []
    table = latency_breakdown(Int8Result({}, {}, [], {}, profiles={"fp32": fp, "int8": iq}))
    assert list(table.index) == ["fp32", "int8"] and table.loc["fp32", "Conv × FP32"] == 1.0


def test_quantize_command_passes_each_backend_only_its_options():
    from lowbit_helpers.config import load_config
    from lowbit_helpers.int8 import backend, checked
    from lowbit_helpers.steps.int8 import quantize_command

    # full.yaml: ORT recipes without the correction too, where ORT's default corrects
    variants = [(cfg, v) for cfg in map(load_config, ("params/default.yaml", "params/full.yaml")) for v in cfg.int8.variants]
    for cfg, v in variants:
        cmd = quantize_command(cfg, v, "m.onnx", "c.npy", "o.onnx")
        assert ("--calibration-eps" in cmd) == (v.backend == "modelopt"), v.name
        assert "--stride" not in cmd, v.name  # ranges no longer depend on slicing: the option is gone
        assert ("--percentile" in cmd) == (v.backend == "ort" and v.method == "percentile"), v.name
        assert ("--placement" in cmd) == (v.placement != "all"), v.name
        # the command rebuilds the recipe's correction: the flag, or the backend's default where it names none
        bc = cmd[cmd.index("--bias-correction") + 1] if "--bias-correction" in cmd else backend(v.backend).default_bias_correction
        assert bc == checked(v.backend, v.options()).bias_correction, v.name
        assert ("--bias-correction-images" in cmd) == (v.backend != "nncf" and bc == "fast"), v.name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize-int8", "m.onnx", "--calib-npy", "c.npy", "--out", "o.onnx", "--stride", "2"])


def test_ort_recipe_keeps_orts_softmax_range(tmp_path):
    """ORT's quantizer gives a Softmax output the range [0, 1] whatever the data; the computed
    ranges must not bypass that (YOLOv10's attention Softmax lost accuracy when they did)."""
    from lowbit_helpers.int8.ort import quantize_int8_ort

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["y"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Softmax", ["y"], ["p"], axis=1, name="softmax"),
         helper.make_node("Mul", ["p", "y"], ["z"], name="mul")], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8])], [w],
    )  # fmt: skip
    model, out = tmp_path / "s.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(model))
    data = np.random.default_rng(1).normal(size=(6, 3, 8, 8)).astype(np.float32)
    assert float(activation_ranges(model, data, "avgminmax")["p"][1]) < 1.0  # the data alone would say less than 1
    quantize_int8_ort(model, out, data, method="avgminmax", head_policy="none")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    assert float(inits["p_scale"]) == pytest.approx(1 / 255) and int(inits["p_zero_point"]) == 0


def test_entropy_ranges_search_inside_the_full_range(tmp_path):
    """On one fixed histogram ORT's default 128 bins leave its KL search a single candidate (the
    full range, i.e. minmax); the entropy ranges here must clip a heavy tail."""
    model = _one_conv_model(tmp_path / "c.onnx")
    data = np.random.default_rng(1).normal(size=(6, 3, 8, 8)).astype(np.float32)
    data[2, :, 0, 0] = 40.0  # a few outliers
    full, kl = activation_ranges(model, data, "minmax")["images"], activation_ranges(model, data, "entropy")["images"]
    assert float(kl[1]) < 0.5 * float(full[1]) and float(kl[1]) > float(np.percentile(data, 99))
