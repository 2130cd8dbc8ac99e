"""Low-bit candidates: the reference weight quantizer, GPTQ and bias correction, materialised ONNX."""

import json

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit_helpers.__main__ import main
from lowbit_helpers.errors import LowbitError
from lowbit_helpers.formats import FORMATS, apply_format
from lowbit_helpers.lowbit import LADDER, METHODS, adaround, gptq, parse_method
from lowbit_helpers.lowbit.base import FourBitMethod
from lowbit_helpers.lowbit.bias_shift import expected_output_shift
from lowbit_helpers.lowbit.materialize import materialize
from lowbit_helpers.lowbit.stats import collect_stats
from lowbit_helpers.runtime import make_session
from lowbit_helpers.sensitivity.schemes import block_of, heuristic_scheme, random_scheme
from lowbit_helpers.sensitivity.sweep import activation_ranges, conv_nodes
from lowbit_helpers.weights import WeightSpec, compute_scale, dequantize, quantize_codes, quantize_weight


def _run(model: onnx.ModelProto, x: np.ndarray, arithmetic: str = "exact", tmp=None) -> np.ndarray:
    path = tmp / "m.onnx"
    onnx.save(model, str(path))
    s = make_session(path, threads=1, arithmetic=arithmetic)
    return np.concatenate([s.run(None, {s.get_inputs()[0].name: xi[None]})[0] for xi in x])


# ------------------------------------------------------------------ reference quantizer
@pytest.mark.parametrize("block", [None, 16, 32])
def test_int4_dequantize_linear_in_ort_equals_the_reference(block, tmp_path):
    """ORT's DequantizeLinear on packed INT4 codes (per channel or blocked, partial last block)
    returns exactly the reference quantizer's values."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 40, 3, 3)).astype(np.float32)
    spec = WeightSpec(4, block)
    codes, scale = quantize_weight(w, spec)
    assert codes.min() >= -7 and codes.max() <= 7
    attrs = {"axis": 0} if block is None else {"axis": 1, "block_size": block}
    inits = [numpy_helper.from_array(codes.astype(ml_dtypes.int4), "q"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(np.zeros(scale.shape, ml_dtypes.int4), "z")]  # fmt: skip
    assert inits[0].data_type == TensorProto.INT4 and len(inits[0].raw_data) == w.size // 2  # two codes per byte
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], **attrs)], "g", [],
                          [helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape))], inits)  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.array_equal(got, dequantize(codes, scale, block))
    # every weight within half a step of its group's scale
    s_full = dequantize(np.ones_like(codes), scale, block)
    assert np.all(np.abs(dequantize(codes, scale, block) - w) <= s_full / 2 + 1e-6)


def test_blocked_scales_cover_blocks_of_input_channels():
    w = np.zeros((2, 40, 1, 1), np.float32)
    w[0, 33, 0, 0] = 7.0  # only the third block of channel 0 sees this value
    w[0, 0, 0, 0] = 0.7
    _, scale = quantize_weight(w, WeightSpec(4, 16))
    assert scale.shape == (2, 3, 1, 1)
    assert np.isclose(scale[0, 2, 0, 0], 1.0) and np.isclose(scale[0, 0, 0, 0], 0.1)
    codes, _ = quantize_weight(w, WeightSpec(4, 16))
    assert codes[0, 0, 0, 0] == 7  # per channel it would round to 1 step of 1.0: 0.7 -> 1


def test_mse_clip_never_loses_to_max_abs():
    w = np.random.default_rng(1).standard_t(3, size=(16, 32, 3, 3)).astype(np.float32)  # heavy tails
    for block in (None, 32):
        errs = {}
        for clip in ("maxabs", "mse"):
            spec = WeightSpec(4, block, clip)
            s = compute_scale(w, spec)
            errs[clip] = float(((dequantize(quantize_codes(w, s, spec), s, block) - w) ** 2).sum())
        assert errs["mse"] < errs["maxabs"]


def test_method_names():
    m = parse_method("gptq-bc-b64")
    assert (m.rounding.name, m.rounding.clip, m.bias_correction, m.block) == ("gptq", "mse", True, 64)
    assert m.record() == {"name": "gptq-bc-b64", "clip": "mse", "gptq": True, "bias_correction": True, "block": 64}
    assert parse_method("rtn").spec(4) == WeightSpec(4, None, "maxabs")
    assert parse_method("gptq-b32").spec(8) == WeightSpec(8, None, "maxabs")  # 8-bit layers stay round-to-nearest
    for name in LADDER:
        assert parse_method(name).name == name
    for bad in ("gptq+bc", "brecq", "rtn-b1", "gptq-b32-bc", ""):
        with pytest.raises(LowbitError, match="unknown 4-bit method") as e:
            parse_method(bad)
        assert "rtn|mse|gptq" in e.value.fix  # the registered roundings


# ------------------------------------------------------------------ GPTQ and bias correction
def _conv_graph(w: np.ndarray, b: np.ndarray, group: int = 1) -> onnx.ModelProto:
    cin = w.shape[1] * group
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="/model.0/conv/Conv", pads=[1, 1, 1, 1], group=group)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[0], 12, 12])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    return m


def _correlated_inputs(rng, n: int, c: int) -> np.ndarray:
    """Correlated across channels and between neighbouring pixels (smooth), as feature maps are."""
    common = rng.normal(size=(n, 1, 6, 6))
    own = rng.normal(size=(n, c, 6, 6))
    smooth = np.repeat(np.repeat(0.8 * common + 0.6 * own, 2, axis=2), 2, axis=3)
    return (smooth + 0.1 * rng.normal(size=(n, c, 12, 12)) + rng.normal(size=(1, c, 1, 1))).astype(np.float32)


@pytest.mark.parametrize("group", [1, 8])
def test_gptq_and_bias_correction_reduce_output_error(group, tmp_path):
    """On correlated inputs GPTQ's output error is well below round-to-nearest's with the same
    scales (dense and depthwise Convs), and bias correction removes the mean output error."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 8 // group, 3, 3)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32)
    model = _conv_graph(w, b, group)
    x = _correlated_inputs(rng, 24, 8)
    stats = collect_stats(model, ["/model.0/conv/Conv"], x, threads=1)["/model.0/conv/Conv"]
    assert stats.count == 24 * 144 and stats.xxt.shape == (group, 72 // group, 72 // group)
    ref = _run(model, x, tmp=tmp_path)
    spec = WeightSpec(4, None, "maxabs")
    scale = compute_scale(w, spec)
    errors = {}
    for name, codes in (("rtn", quantize_codes(w, scale, spec)), ("gptq", gptq.gptq_codes(w, scale, spec, stats))):
        wq = dequantize(codes, scale, None)
        out = _run(_conv_graph(wq, b, group), x, tmp=tmp_path)
        errors[name] = float(((out - ref) ** 2).mean())
        before = np.abs((out - ref).mean(axis=(0, 2, 3))).max()
        assert before > 0.1, (name, before)  # uncorrected, the 4-bit layer shifts its mean output: there is a shift to remove
        shifted = _run(_conv_graph(wq, b - expected_output_shift(w, wq, stats), group), x, tmp=tmp_path)
        after = np.abs((shifted - ref).mean(axis=(0, 2, 3))).max()
        assert after < 1e-3 * before, (name, after, before)  # removed down to float noise
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


@pytest.mark.parametrize("group", [1, 8])
def test_adaround_learns_up_or_down_and_beats_rounding_to_nearest(group, tmp_path):
    """AdaRound's codes are each weight's floor or ceiling on the same scales; on correlated inputs
    its output error (measured through ORT on inputs it never saw) is well below round to nearest's."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(8, 16 // group, 3, 3)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32)
    model = _conv_graph(w, b, group)
    conv = "/model.0/conv/Conv"
    st = collect_stats(model, [conv], _correlated_inputs(rng, 24, 16), threads=1)[conv]
    held = _correlated_inputs(rng, 24, 16)
    spec = WeightSpec(4, None, "mse")
    scale = compute_scale(w, spec)
    ratio = w / scale[:, None, None, None]
    rtn, ada = quantize_codes(w, scale, spec), adaround.adaround_codes(w, scale, spec, st)
    assert np.all((ada == np.clip(np.floor(ratio), -7, 7)) | (ada == np.clip(np.ceil(ratio), -7, 7)))
    assert not np.array_equal(ada, rtn)  # it learned something other than the nearest level
    ref = _run(model, held, tmp=tmp_path)
    errors = {}
    for name, codes in (("rtn", rtn), ("adaround", ada)):
        out = _run(_conv_graph(dequantize(codes, scale, None), b, group), held, tmp=tmp_path)
        errors[name] = float(((out - ref) ** 2).mean())
    assert errors["adaround"] < 0.8 * errors["rtn"], errors


@pytest.mark.parametrize("group", [1, 8])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_file_holds_each_methods_own_codes(name, group, monkeypatch):
    """Every registered 4-bit method (GPTQ, AdaRound and any later one), plain, with bias correction
    and with blocked scales: the INT4 initializer and the scales read back from the written ONNX are
    exactly those the method computes from the same weight and statistics (GPTQ:
    ``gptq.gptq_codes``, AdaRound: ``adaround.adaround_codes``), and a method other than round to
    nearest is not max-abs round to nearest in disguise. (AdaRound with fewer Adam steps here: the
    file path is what is tested, its quality in the test below.)"""
    monkeypatch.setattr(adaround, "ITERATIONS", 60)
    rng = np.random.default_rng(7)
    w = rng.normal(size=(8, 16 // group, 3, 3)).astype(np.float32)
    model = _conv_graph(w, rng.normal(size=8).astype(np.float32), group)
    conv = "/model.0/conv/Conv"
    stats = collect_stats(model, [conv], _correlated_inputs(rng, 16, 16), threads=1)
    for variant in (name, f"{name}-bc", f"{name}-b8"):
        m = parse_method(variant)
        if group > 1 and m.block:  # a depthwise-like Conv has too few input channels per group to block
            continue
        q, _ = materialize(model, {conv: "w4a16"}, variant, stats=stats)
        inits = {i.name: i for i in q.graph.initializer}
        assert inits[f"{conv}::w4a16::wq"].data_type == TensorProto.INT4
        codes = numpy_helper.to_array(inits[f"{conv}::w4a16::wq"]).astype(np.int8)
        scale = numpy_helper.to_array(inits[f"{conv}::w4a16::ws"])
        spec, st = m.spec(4), stats[conv]
        assert np.array_equal(scale, m.rounding.scales(w, spec, st)), variant
        assert np.array_equal(codes, m.rounding.codes(w, scale, spec, st)), variant
        if m.rounding.name == "gptq":
            assert np.array_equal(codes, gptq.gptq_codes(w, scale, spec, st)), variant
        if m.rounding.name == "adaround":
            assert np.array_equal(codes, adaround.adaround_codes(w, scale, spec, st)), variant
        if type(m.rounding).codes is not FourBitMethod.codes:  # its own rounding: not round to nearest on its scales
            assert not np.array_equal(codes, quantize_codes(w, scale, spec)), variant
        if m.rounding.name != "rtn":  # neither its scales nor its codes are max-abs round to nearest's
            plain = compute_scale(w, WeightSpec(4, m.block, "maxabs"))
            assert not (np.array_equal(scale, plain) and np.array_equal(codes, quantize_codes(w, scale, spec))), variant


# ------------------------------------------------------------------ materialize
def _net() -> onnx.ModelProto:
    """Dense 3x3, depthwise 3x3 and 1x1 Convs with SiLU between them, 40 channels."""
    rng = np.random.default_rng(3)
    ws = [rng.normal(0, 0.3, (40, 3, 3, 3)), rng.normal(0, 0.3, (40, 1, 3, 3)), rng.normal(0, 0.2, (16, 40, 1, 1))]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="/model.0/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["a"], ["as"], name="/model.0/act/Sigmoid"),
        helper.make_node("Mul", ["a", "as"], ["a2"], name="/model.0/act/Mul"),
        helper.make_node("Conv", ["a2", "w1", "b1"], ["c"], name="/model.1/conv/Conv", pads=[1, 1, 1, 1], group=40),
        helper.make_node("Conv", ["c", "w2", "b2"], ["y"], name="/model.2/conv/Conv"),
    ]
    inits = [numpy_helper.from_array(w.astype(np.float32), f"w{i}") for i, w in enumerate(ws)]
    inits += [numpy_helper.from_array(rng.normal(0, 0.1, w.shape[0]).astype(np.float32), f"b{i}") for i, w in enumerate(ws)]
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])], inits)  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    return m


@pytest.mark.parametrize("fmt", ["w8a8", "w4a16", "w4a8", "fp8"])
def test_materialized_model_computes_what_the_sweep_scored(fmt, tmp_path):
    """Round-to-nearest materialisation equals the sweep's fake quantization bit for bit under
    exact Q/DQ arithmetic, and within float noise through ORT's optimized kernels (w4a16)."""
    model = _net()
    x = np.random.default_rng(4).normal(size=(6, 3, 16, 16)).astype(np.float32)
    convs = conv_nodes(model)
    ranges = activation_ranges(model, x[:3], threads=1)
    q, info = materialize(model, {c: fmt for c in convs}, "rtn", ranges=ranges)
    sweep = apply_format(model, convs, FORMATS[fmt], ranges)
    assert np.array_equal(_run(q, x, tmp=tmp_path), _run(sweep, x, tmp=tmp_path))
    if fmt == "w4a16":
        assert np.abs(_run(q, x, "kernels", tmp_path) - _run(sweep, x, "kernels", tmp_path)).max() < 1e-4
    assert info["precisions"] == {fmt: 3}
    types = {i.name.split("::")[-1]: i.data_type for i in q.graph.initializer if "::wq" in i.name}
    want = {"w8a8": TensorProto.INT8, "w4a16": TensorProto.INT4, "w4a8": TensorProto.INT4, "fp8": TensorProto.FLOAT8E4M3FN}
    assert set(types.values()) == {want[fmt]}
    if fmt.startswith("w4"):
        assert next(o.version for o in q.opset_import if o.domain == "") == 21
        assert info["four_bit_share"] == 1.0


def test_materialize_mixed_scheme_with_every_method(tmp_path):
    model = _net()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 3, 16, 16)).astype(np.float32)
    convs = conv_nodes(model)
    nodes = {convs[0]: "w8a8", convs[1]: "w4a8", convs[2]: "w4a16"}
    ranges = activation_ranges(model, x[:4], threads=1)
    stats = collect_stats(model, convs, x[:4], threads=1)
    ref = _run(model, x, tmp=tmp_path)
    errs = {}
    for method in ("rtn", "mse-bc", "gptq-bc", "gptq-bc-b16"):
        q, info = materialize(model, nodes, method, ranges=ranges, stats=stats)
        onnx.checker.check_model(q, full_check=True)
        errs[method] = float(((_run(q, x, tmp=tmp_path) - ref) ** 2).mean())
        assert info["layers"][convs[2]]["weights"].startswith("int4") and info["layers"][convs[0]]["weights"] == "int8, per-channel"
        assert 0 < info["four_bit_share"] < 1
    blocked = [i for i in q.graph.node if i.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in i.attribute)]
    assert len(blocked) == 2  # the two 4-bit layers
    assert errs["gptq-bc"] < errs["rtn"]


def test_materialize_refuses_bad_schemes():
    model = _net()
    convs = conv_nodes(model)
    with pytest.raises(LowbitError, match="not Conv nodes of this model"):
        materialize(model, {"/model.9/conv/Conv": "w4a16"}, "rtn")
    with pytest.raises(LowbitError, match="unknown precision"):
        materialize(model, {convs[0]: "w3a8"}, "rtn")
    with pytest.raises(LowbitError, match="activation ranges"):
        materialize(model, {convs[0]: "w8a8"}, "rtn")
    with pytest.raises(LowbitError, match="needs calibration statistics"):
        materialize(model, {convs[0]: "w4a16"}, "gptq")


def test_cli_materialize(tmp_path, capsys):
    model = _net()
    onnx.save(model, str(tmp_path / "net.onnx"))
    np.save(tmp_path / "calib.npy", np.random.default_rng(6).normal(size=(4, 3, 16, 16)).astype(np.float32))
    convs = conv_nodes(model)
    (tmp_path / "s.json").write_text(json.dumps({"name": "s", "nodes": {c: "w4a16" for c in convs}}))
    out = tmp_path / "out.onnx"
    args = ["materialize", str(tmp_path / "s.json"), str(tmp_path / "net.onnx"), "--calib-npy", str(tmp_path / "calib.npy"),
            "--range-images", "2", "--stats-images", "2", "--out", str(out)]  # fmt: skip
    rc = main(args)  # the CLI takes raw-head detectors only: this tiny net's output is refused
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "fix:" in err and not out.exists()
    (tmp_path / "bad.json").write_text(json.dumps({"nodes": {"/nope/Conv": "w4a16"}}))
    rc = main(["materialize", str(tmp_path / "bad.json"), str(tmp_path / "missing.onnx"), "--calib-npy", "x.npy", "--out", str(out)])
    assert rc == 2 and "model not found" in capsys.readouterr().err and not out.exists()


def test_cli_materialize_on_yolov10n(yolov10n_onnx, coco_root, tmp_path, capsys):
    """The real graph: a scheme naming another model's node is refused; a valid one is written,
    INT4 packed, and runs."""
    m = onnx.load(str(yolov10n_onnx))
    convs = conv_nodes(m)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nodes": {"/model.99/conv/Conv": "w4a16"}}))
    out = tmp_path / "q.onnx"
    base = [str(yolov10n_onnx), "--calib", str(coco_root / "calib160.txt"), "--range-images", "2", "--stats-images", "2"]
    assert main(["materialize", str(bad), *base, "--out", str(out)]) == 2
    assert "another model" in capsys.readouterr().err and not out.exists()
    for scheme, message in ((bad, "another model"),
                            ({"nodes": {convs[0]: "w3a8"}}, "unknown precision"),
                            ({"nodes": {convs[0]: "w4a16"}, "source": {"model_sha256": "0" * 64}}, "made for another model")):  # fmt: skip
        path = tmp_path / "s.json"
        path.write_text(json.dumps(scheme) if isinstance(scheme, dict) else bad.read_text())
        assert main(["materialize", str(path), *base, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "fix:" in err and not out.exists()
    short = tmp_path / "short.txt"
    short.write_text(str(coco_root / (coco_root / "calib160.txt").read_text().splitlines()[0]) + "\n")
    valid = tmp_path / "valid.json"
    valid.write_text(json.dumps({"nodes": {c: "w4a16" for c in convs}}))
    assert main(["materialize", str(valid), str(yolov10n_onnx), "--calib", str(short), "--out", str(out)]) == 2
    assert "need 32" in capsys.readouterr().err and not out.exists()
    assert main(["materialize", str(valid), str(yolov10n_onnx), "--out", str(out)]) == 2
    assert "no calibration images" in capsys.readouterr().err and not out.exists()
    assert main(["materialize", str(valid), str(yolov10n_onnx), "--run", str(tmp_path), "--out", str(out)]) == 2
    assert "not a run directory" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        main(["materialize", str(bad), str(yolov10n_onnx), "--calib", str(short), "--range-images", "0", "--out", str(out)])
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"nodes": {c: "w4a16" for c in convs}}))
    assert main(["materialize", str(good), *base, "--method", "rtn", "--out", str(out)]) == 0
    size = out.stat().st_size
    assert size < 0.2 * yolov10n_onnx.stat().st_size  # 4-bit weights: under a fifth of the FP32 file
    recipe = json.loads(out.with_suffix(".recipe.json").read_text())
    assert recipe["materialize"]["four_bit_share"] == 1.0
    s = make_session(out, threads=2)
    assert s.run(None, {"images": np.zeros((1, 3, 640, 640), np.float32)})[0].shape == (1, 144, 8400)


def test_weight_cache_returns_what_a_fresh_build_computes(tmp_path):
    model = _net()
    x = np.random.default_rng(7).normal(size=(4, 3, 16, 16)).astype(np.float32)
    convs = conv_nodes(model)
    stats = collect_stats(model, convs, x, threads=1)
    ranges = activation_ranges(model, x, threads=1)
    cache: dict = {}
    a, _ = materialize(model, {c: "w4a16" for c in convs}, "gptq-bc", ranges=ranges, stats=stats, cache=cache)
    assert len(cache) == 3
    b, _ = materialize(model, {convs[0]: "w4a8", convs[1]: "w4a16", convs[2]: "w4a16"}, "gptq-bc", ranges=ranges,
                       stats=stats, cache=cache)  # fmt: skip
    fresh, _ = materialize(model, {convs[0]: "w4a8", convs[1]: "w4a16", convs[2]: "w4a16"}, "gptq-bc", ranges=ranges, stats=stats)
    assert np.array_equal(_run(b, x, tmp=tmp_path), _run(fresh, x, tmp=tmp_path))
    other = collect_stats(model, convs, x[:2] * 3, threads=1)  # other statistics: not served from the cache
    c, _ = materialize(model, {c: "w4a16" for c in convs}, "gptq-bc", ranges=ranges, stats=other, cache=cache)
    assert not np.array_equal(_run(a, x, tmp=tmp_path), _run(c, x, tmp=tmp_path))


# ------------------------------------------------------------------ control schemes
def _sens(n=20):
    convs = [f"/model.{i}/conv/Conv" for i in range(n)]
    return {"convs": convs, "params": {c: (i + 1) * 100 for i, c in enumerate(convs)}}


def test_random_schemes_match_the_share_and_differ_by_seed():
    sens = _sens()
    a, b = random_scheme(sens, 75, 0), random_scheme(sens, 75, 1)
    total = sum(sens["params"].values())
    for s in (a, b):
        assert s["four_bit_fraction"] >= 0.75 and s["kind"] == "random"
        # minimal: no 4-bit layer can go back to 8 bits without breaking the share
        four = [n for n, p in s["nodes"].items() if p == "w4a8"]
        assert all(s["four_bit_params"] - sens["params"][n] < 0.75 * total for n in four)
        assert set(s["nodes"].values()) <= {"w4a8", "w8a8"}
    assert a["nodes"] != b["nodes"] and a == random_scheme(sens, 75, 0)


def test_heuristic_keeps_first_block_and_head():
    sens = _sens()
    s = heuristic_scheme(sens)
    assert s["nodes"]["/model.0/conv/Conv"] == "w8a8" and s["nodes"]["/model.19/conv/Conv"] == "w8a8"
    assert all(v == "w4a8" for k, v in s["nodes"].items() if block_of(k) not in ("model.0", "model.19"))


def test_a_new_4bit_method_is_one_class_and_one_registry_line(monkeypatch):
    """ARCHITECTURE.md's recipe: a rounding class and a line in lowbit.METHODS. The name grammar, the
    params and materialize then take it, and the deployed file holds exactly the class's codes."""
    from lowbit_helpers.config import parse_config
    from lowbit_helpers.lowbit import METHODS
    from lowbit_helpers.weights import expand_scale

    class RoundTowardZero(FourBitMethod):
        name, text = "trunc", "max-abs scale, round toward zero"

        def codes(self, w, scale, spec, stats):
            return np.clip(np.trunc(w / expand_scale(scale, w.shape, spec.block)), -spec.qmax, spec.qmax).astype(np.int8)

    with pytest.raises(LowbitError, match="unknown 4-bit method"):
        parse_method("trunc")
    monkeypatch.setitem(METHODS, "trunc", RoundTowardZero())  # the registry line
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 16, 3, 3)).astype(np.float32)
    model = _conv_graph(w, np.zeros(8, np.float32))
    assert parse_config({"name": "x", "candidates": {"method": "trunc-b8"}}).candidates.method == "trunc-b8"
    q, info = materialize(model, {"/model.0/conv/Conv": "w4a16"}, "trunc-b8")
    assert info["method_text"] == "max-abs scale, round toward zero, blocks of 8 input channels"
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    codes, scale = inits["/model.0/conv/Conv::w4a16::wq"].astype(np.int8), inits["/model.0/conv/Conv::w4a16::ws"]
    spec = parse_method("trunc-b8").spec(4)
    assert scale.shape == (8, 2, 3, 3)  # blocks of 8 of the 16 input channels: the -b8 modifier applied to it
    expected = RoundTowardZero().codes(w, scale, spec, None)
    assert np.array_equal(codes, expected)
    assert not np.array_equal(codes, quantize_codes(w, scale, spec))  # not round-to-nearest in disguise


@pytest.mark.parametrize(("cin", "group"), [(24, 1), (8, 8)])
def test_blocked_weights_come_in_whole_blocks_with_the_same_arithmetic(cin, group, tmp_path):
    """Blocks of 16 over 24 input channels (a partial last block) and over a depthwise Conv's one channel:
    the file holds whole blocks (padded codes sliced after DequantizeLinear; one block of the row's width),
    which OpenVINO's ONNX frontend requires, and computes exactly the float Conv of the method's
    dequantized weights; OpenVINO compiles it."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, cin // group, 3, 3)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32)
    model = _conv_graph(w, b, group)
    q, _ = materialize(model, {"/model.0/conv/Conv": "w4a16"}, "rtn-b16")
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear")
    block = next(a.i for a in dq.attribute if a.name == "block_size")
    codes = next(numpy_helper.to_array(i) for i in q.graph.initializer if i.name == dq.input[0])
    assert codes.shape[1] % block == 0
    assert (block, codes.shape[1], [n.op_type for n in q.graph.node].count("Slice")) == ((16, 32, 1) if cin == 24 else (1, 1, 0))
    spec = parse_method("rtn-b16").spec(4)
    want, scale = quantize_weight(w, spec)
    ref = _conv_graph(dequantize(want, scale, spec.block).astype(np.float32), b, group)
    x = rng.normal(size=(2, cin, 12, 12)).astype(np.float32)
    assert np.array_equal(_run(q, x, tmp=tmp_path), _run(ref, x, tmp=tmp_path))
    path = tmp_path / "q.onnx"
    onnx.save(q, str(path))
    make_session(path, threads=1, runtime="openvino")  # raises LowbitError where OpenVINO cannot compile it
