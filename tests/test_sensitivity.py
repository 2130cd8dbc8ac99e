"""Per-layer sensitivity: fake-quant formats, the cached sweep, the Torch proxy mapping, schemes."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit_helpers.__main__ import main
from lowbit_helpers.errors import LowbitError
from lowbit_helpers.formats import FORMATS, activation_qparams, apply_format, get_format, quantize_weight
from lowbit_helpers.sensitivity.metrics import METRICS, Accumulator, Reference, dfl_distances, sqnr_db
from lowbit_helpers.sensitivity.schemes import budget_scheme, make_schemes, top_k_scheme
from lowbit_helpers.sensitivity.sweep import activation_ranges, conv_nodes, naive, sim_session, sweep


# ------------------------------------------------------------------ formats
def test_weight_formats_round_to_their_grid():
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    for name, levels in (("w4a16", 15), ("w8a8", 255)):
        q = quantize_weight(w, FORMATS[name])
        for c in range(4):
            scale = np.abs(w[c]).max() / (levels // 2)
            steps = q[c] / scale
            assert np.allclose(steps, np.round(steps), atol=1e-4)  # on the channel's grid
            assert len(np.unique(np.round(steps))) <= levels
            assert np.isclose(np.abs(q[c]).max(), np.abs(w[c]).max(), rtol=1e-6)  # max|w| is exact
    err4 = np.abs(quantize_weight(w, FORMATS["w4a16"]) - w).max()
    err8 = np.abs(quantize_weight(w, FORMATS["w8a8"]) - w).max()
    assert err8 < err4 / 8
    import ml_dtypes

    q8 = quantize_weight(w, FORMATS["fp8"])
    scale = np.abs(w).reshape(4, -1).max(1)[:, None, None, None] / 448
    assert np.array_equal((q8 / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale, q8)


def test_activation_qparams_hold_zero_and_the_range():
    scale, zero = activation_qparams(-1.0, 3.0, FORMATS["w8a8"])
    assert zero.dtype == np.uint8 and np.isclose(scale * 255, 4.0) and int(zero) == round(1.0 / float(scale))
    scale, zero = activation_qparams(0.5, 2.0, FORMATS["w8a8"])  # 0 is always representable
    assert int(zero) == 0 and np.isclose(scale * 255, 2.0)
    with pytest.raises(LowbitError, match="unknown format"):
        get_format("w2a2")


def _tiny_net(path, fragile: bool):
    """A YOLO-shaped toy: raw head [1, 144, 8400] from three levels (80², 40², 20² anchors on an
    80x80 input), five Convs, a SiLU and a skip connection. With ``fragile`` the second Conv's
    input has one channel of a 100x larger range that the Conv ignores (zero weights):
    per-tensor 8-bit activations then crush every channel it does use."""
    rng = np.random.default_rng(1)
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    w3 = rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    h = [rng.normal(0, 0.3, (144, 8, 1, 1)).astype(np.float32) for _ in range(3)]
    hb = np.concatenate([rng.normal(0, 1, 64), rng.normal(-2.5, 1, 80)]).astype(np.float32)  # some foreground
    if fragile:
        w1[0] *= 100
        w2[:, 0] = 0
        h[0][:, 0] = 0
    n = helper.make_node
    nodes = [
        n("Conv", ["images", "w1"], ["a"], name="/model.0/conv/Conv", pads=[1, 1, 1, 1]),
        n("Sigmoid", ["a"], ["as"], name="/model.0/act/Sigmoid"),
        n("Mul", ["a", "as"], ["b"], name="/model.0/act/Mul"),
        n("Conv", ["b", "w2"], ["c"], name="/model.1/conv/Conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Conv", ["c", "w3"], ["d0"], name="/model.2/conv/Conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        n("MaxPool", ["c"], ["cp"], name="/model.2/MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
        n("Add", ["d0", "cp"], ["d"], name="/model.2/Add"),
    ]
    outs = []
    for i, src in enumerate(("b", "c", "d")):
        nodes += [n("Conv", [src, f"h{i}", "hb"], [f"y{i}"], name=f"/model.3/cv{i}/Conv"),
                  n("Reshape", [f"y{i}", "shape"], [f"r{i}"], name=f"/model.3/Reshape{i}")]  # fmt: skip
        outs.append(f"r{i}")
    nodes.append(n("Concat", outs, ["y"], name="/model.3/Concat", axis=2))
    inits = [numpy_helper.from_array(w, k) for w, k in ((w1, "w1"), (w2, "w2"), (w3, "w3"), (hb, "hb"))]
    inits += [numpy_helper.from_array(w, f"h{i}") for i, w in enumerate(h)]
    inits.append(numpy_helper.from_array(np.array([1, 144, -1], np.int64), "shape"))
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 80, 80])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 144, 8400])], inits)  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return model


def _images(n=4):
    return np.random.default_rng(2).random((n, 3, 80, 80), dtype=np.float32)


@pytest.mark.parametrize("fmt", ["w4a16", "w4a8", "w8a8", "fp8"])
def test_cached_sweep_equals_naive(tmp_path, fmt):
    model = _tiny_net(tmp_path / "t.onnx", fragile=False)
    images = _images(2)  # sums over more than one image; naive and cached alike
    ranges = activation_ranges(model, images)
    result = sweep(model, images, get_format(fmt), ranges, workers=1)
    assert result["metrics"] == list(METRICS)
    for conv in conv_nodes(model):
        for d in ("alone", "kept"):
            values, _ = naive(model, images, get_format(fmt), ranges, conv, d)
            for m in METRICS:
                assert result["records"][conv][d][m] == pytest.approx(values[m], abs=1e-6), (conv, d, m)
    # the whole network in the format is worse than any single layer alone
    assert result["all"]["raw_sqnr"] < min(r["alone"]["raw_sqnr"] for r in result["records"].values())


def test_workers_and_groups_do_not_change_the_result(tmp_path):
    model = _tiny_net(tmp_path / "t.onnx", fragile=True)
    images = _images(3)
    ranges = activation_ranges(model, images)
    one = sweep(model, images, get_format("w4a8"), ranges, workers=1, group=100)
    two = sweep(model, images, get_format("w4a8"), ranges, workers=2, group=2)
    assert one["groups"] == 3 and two["groups"] == 1 + 2 * 4  # the all-Convs group + ceil(6 / 2) per direction, rounded up to 2 workers
    assert two["workers"] == 2
    assert one["records"] == two["records"] and one["all"] == two["all"]


def test_fragile_layers_rank_first(tmp_path):
    fragile, plain = _tiny_net(tmp_path / "f.onnx", True), _tiny_net(tmp_path / "p.onnx", False)
    images = _images(2)
    wide_readers = {"/model.1/conv/Conv", "/model.3/cv0/Conv"}  # the Convs that read the wide-range tensor
    for model, expect in ((fragile, wide_readers), (plain, None)):
        r = sweep(model, images, get_format("w8a8"), activation_ranges(model, images), workers=1)
        recs = r["records"]
        for m in ("raw_sqnr", "det_sqnr"):
            by_alone = sorted(recs, key=lambda c: recs[c]["alone"][m])
            most_kept = max(recs, key=lambda c: recs[c]["kept"][m])
            if expect:
                assert set(by_alone[:2]) == expect and most_kept in expect
                assert recs[by_alone[1]]["alone"][m] < recs[by_alone[2]]["alone"][m] - 10  # by a wide margin
            else:
                assert min(recs[c]["alone"][m] for c in wide_readers) > 45  # the same layers without the wide channel


def test_apply_format_leaves_other_convs_and_names_alone(tmp_path):
    model = _tiny_net(tmp_path / "t.onnx", False)
    ranges = activation_ranges(model, _images())
    q = apply_format(model, {"/model.1/conv/Conv"}, get_format("w4a8"), ranges)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("Conv") == 6
    assert {o.name for o in q.graph.output} == {"y"} and "w1" in {i.name for i in q.graph.initializer}
    with pytest.raises(KeyError):
        apply_format(model, {"/nope/Conv"}, get_format("w8a8"), ranges)


# ------------------------------------------------------------------ detection-aware metrics
def _head(rng, fg_anchors=(5, 700, 8000)):
    """A raw head: background class logits far below zero, a few foreground anchors."""
    raw = np.concatenate([rng.normal(0, 1, (64, 8400)), np.clip(rng.normal(-60, 15, (80, 8400)), -90, -20)]).astype(np.float32)
    for a in fg_anchors:
        raw[64 + a % 80, a] = 2.0  # score 0.88
    return raw[None]


def test_metrics_ignore_what_the_decoder_discards():
    rng = np.random.default_rng(0)
    ref = _head(rng)
    ref_info = Reference(ref)
    assert list(ref_info.fg) == [5, 700, 8000]
    background = ref.copy()
    background[0, 64:, 1000:2000] -= 30  # large changes of logits the sigmoid already flattens
    fg_cls = ref.copy()
    fg_cls[0, 64 + 700 % 80, 700] = 0.0  # one foreground score 0.88 -> 0.5
    box = ref.copy()
    box[0, :16, 5] += rng.normal(0, 3, 16).astype(np.float32)  # one foreground box's left side moves
    got = {}
    for name, out in (("background", background), ("fg_cls", fg_cls), ("box", box)):
        acc = Accumulator()
        acc.add(ref_info, out)
        got[name] = acc.metrics()
    # raw-head SQNR calls the background change the worst; the decoder does not see it
    assert got["background"]["raw_sqnr"] < got["fg_cls"]["raw_sqnr"]
    assert got["background"]["det_sqnr"] > 60 and got["background"]["fg_box_sqnr"] == float("inf")
    assert got["fg_cls"]["fg_score_sqnr"] < 15 and got["fg_cls"]["fg_box_sqnr"] == float("inf")
    assert got["box"]["fg_score_sqnr"] == float("inf") and got["box"]["fg_box_sqnr"] < 40
    for g in got.values():  # det_sqnr adds the two noise-to-signal ratios
        assert g["det_sqnr"] <= min(g["fg_score_sqnr"], g["fg_box_sqnr"]) + 1e-9
    # sums over images, not a mean of per-image dB
    a, b = Accumulator(), Accumulator()
    a.add(ref_info, fg_cls)
    b.add(ref_info, ref)
    a.merge(b)
    assert a.metrics()["fg_score_sqnr"] == pytest.approx(got["fg_cls"]["fg_score_sqnr"] + 10 * np.log10(2))
    assert sqnr_db(1.0, 0.0) == float("inf") and sqnr_db(0.0, 1.0) == float("-inf") and sqnr_db(10.0, 1.0) == 10.0


def test_dfl_distances_are_pixels():
    raw = np.zeros((144, 8400), np.float32)
    raw[:64, :] = -50
    raw[3, 0] = raw[16 + 5, 0] = raw[32 + 0, 0] = raw[48 + 15, 0] = 50  # one-hot bins 3, 5, 0, 15 at stride 8
    raw[3, 8399] = 50  # last anchor: stride 32, left side bin 3
    d = dfl_distances(raw, np.array([0, 8399]))
    assert np.allclose(d[:, 0], [24, 40, 0, 120]) and np.isclose(d[0, 1], 96)


# ------------------------------------------------------------------ validation helpers
def test_spearman_with_an_interval_over_layers():
    from lowbit_helpers.sensitivity.validation import spearman

    x = np.arange(30, dtype=float)
    perfect = spearman(x, 2 * x + 1)
    assert perfect["rho"] == pytest.approx(1.0) and perfect["lo"] == pytest.approx(1.0) and perfect["n"] == 30
    noisy = spearman(x, x + np.random.default_rng(0).normal(0, 10, 30))
    assert 0.3 < noisy["rho"] < 0.95 and noisy["lo"] < noisy["rho"] < noisy["hi"] <= 1.0
    assert spearman([1, 2, np.nan, 4], [1, 2, 3, np.inf])["n"] == 2  # non-finite pairs are dropped
    assert np.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4])["rho"])  # a constant series ranks nothing


def test_choose_layers_takes_each_metrics_worst_and_a_spread():
    from lowbit_helpers.sensitivity.validation import choose_layers

    convs = [f"c{i}" for i in range(20)]
    a = {c: float(i) for i, c in enumerate(convs)}  # c0 most sensitive by a
    b = {c: float(-i) for i, c in enumerate(convs)}  # c19 most sensitive by b
    got = choose_layers({"a": a, "b": b}, 8, 2)
    assert {"c0", "c1", "c18", "c19"} <= set(got) and len(got) == 8
    assert got == sorted(got, key=convs.index)  # graph order
    assert len(choose_layers({"a": a}, 100, 1)) == 20


def test_label_free_map_scores_against_fp32_detections():
    from lowbit_helpers.decode import Detections
    from lowbit_helpers.sensitivity.validation import label_free_map

    boxes = np.array([[10, 10, 60, 80], [100, 100, 300, 200]], np.float32)
    classes = np.array([0, 3])
    same = Detections(boxes, np.array([0.9, 0.8], np.float32), classes)
    shifted = Detections(boxes + 12, np.array([0.9, 0.8], np.float32), classes)
    wrong = Detections(boxes, np.array([0.9, 0.8], np.float32), np.array([1, 2]))
    gt = (0, boxes, classes)
    assert label_free_map([(gt, same)]) == pytest.approx(1.0)
    assert 0 < label_free_map([(gt, shifted)]) < 1
    assert label_free_map([(gt, wrong)]) == 0.0
    assert np.isnan(label_free_map([((0, boxes[:0], classes[:0]), same)]))  # no pseudo ground truth
# ------------------------------------------------------------------ Torch proxy
@pytest.fixture(scope="module")
def torch_model(yolov10n):
    from lowbit_helpers.export import load_torch_model

    return load_torch_model(yolov10n)


def test_name_mapping_covers_every_conv(yolov10n_onnx, torch_model):
    from lowbit_helpers.sensitivity.torch_proxy import map_convs

    m = onnx.load(str(yolov10n_onnx))
    mapping = map_convs(m, torch_model)
    assert len(mapping["mapping"]) == len(conv_nodes(m)) == 82
    assert set(mapping["matched_by"].values()) == {"name"}  # every name translates, and its weights match
    assert mapping["unmapped_onnx"] == [] and mapping["unused_torch"] == ["model.23.dfl.conv"]
    assert len(set(mapping["mapping"].values())) == 82


def test_resumed_forward_and_proxy_agree_with_onnx(yolov10n_onnx, torch_model, coco_root):
    import torch

    from lowbit_helpers.data import calibration_tensor, read_image_list
    from lowbit_helpers.sensitivity.torch_proxy import forward_from, layer_outputs, torch_ranges, torch_sweep

    images = calibration_tensor(read_image_list(coco_root / "calib160.txt"), 2)
    x = torch.from_numpy(images[:1].copy())
    with torch.inference_mode():
        ys = layer_outputs(torch_model, x)
        assert torch.equal(ys[-1], torch_model(x))
        for start in (0, 5, 23):
            assert torch.equal(forward_from(torch_model, x, ys, start), ys[-1])
    model = onnx.load(str(yolov10n_onnx))
    nodes = ["/model.0/conv/Conv", "/model.10/attn/qkv/conv/Conv", "/model.23/one2one_cv2.0/one2one_cv2.0.2/Conv"]
    modules = ["model.0.conv", "model.10.attn.qkv.conv", "model.23.one2one_cv2.0.2"]
    fmt = get_format("w4a8")
    onnx_r = sweep(model, images, fmt, activation_ranges(model, images), directions=["alone"], convs=nodes, workers=1)
    torch_r = torch_sweep(torch_model, modules, images, fmt, torch_ranges(torch_model, modules, images))
    for n, m in zip(nodes, modules):  # same method, two runtimes: within a fraction of a dB
        assert torch_r["sqnr_db"][m] == pytest.approx(onnx_r["records"][n]["alone"]["raw_sqnr"], abs=0.3)


# ------------------------------------------------------------------ schemes
def _fake_sens(n=30, seed=0):
    rng = np.random.default_rng(seed)
    convs = [f"/model.{i}/conv/Conv" for i in range(n)]
    params = {c: int(rng.integers(100, 50_000)) for c in convs}
    fmts = {}
    for f, base in (("w8a8", 40.0), ("w4a8", 22.0)):
        recs = {c: {"alone": {"det_sqnr": float(base + rng.normal(0, 4))}, "kept": {"det_sqnr": float(base - 12 + rng.random())}}
                for c in convs}  # fmt: skip
        fmts[f] = {"records": recs, "all": {"det_sqnr": base - 12}}
    return {"convs": convs, "params": params, "formats": fmts, "metric": "det_sqnr", "calibration": {"images": 32}}


@pytest.mark.parametrize("percent", [25, 50, 75, 90, 100])
def test_budget_schemes_meet_their_budget_minimally(percent):
    sens = _fake_sens()
    s = budget_scheme(sens, percent)
    p = sens["params"]
    four = [c for c, prec in s["nodes"].items() if prec == "w4a8"]
    covered = sum(p[c] for c in four)
    total = sum(p.values())
    assert covered == s["four_bit_params"] and s["conv_params"] == total
    assert covered >= percent / 100 * total  # the budget is met ...
    for c in four:  # ... and no 4-bit layer could go back to 8-bit without breaking it
        assert covered - p[c] < percent / 100 * total
    assert set(s["nodes"].values()) <= {"w4a8", "w8a8"} and len(s["nodes"]) == len(sens["convs"])


def test_budget_prefers_cheap_layers_per_bit():
    sens = _fake_sens()
    c0, c1 = sens["convs"][:2]
    sens["params"][c0] = sens["params"][c1] = 40_000
    sens["formats"]["w4a8"]["records"][c0]["alone"]["det_sqnr"] = 80.0  # nearly free in 4-bit
    sens["formats"]["w4a8"]["records"][c1]["alone"]["det_sqnr"] = 5.0  # very costly
    s = budget_scheme(sens, 25)
    assert s["nodes"][c0] == "w4a8" and s["nodes"][c1] == "w8a8"


def test_top_k_keeps_the_largest_kept_gain():
    sens = _fake_sens()
    recs = sens["formats"]["w8a8"]["records"]
    by_gain = sorted(recs, key=lambda c: -recs[c]["kept"]["det_sqnr"])
    for k in (0, 5, 10, 20):
        s = top_k_scheme(sens, "w8a8", k)
        assert [c for c, prec in s["nodes"].items() if prec == "fp32"] == sorted(by_gain[:k], key=sens["convs"].index)
        assert s["kept"] == by_gain[:k]
    with pytest.raises(LowbitError, match="outside"):
        top_k_scheme(sens, "w8a8", 31)
    names = [s["name"] for s in make_schemes(sens, [0, 5], [50])]
    assert names == ["w8a8-top0", "w8a8-top5", "w4a8-top0", "w4a8-top5", "budget50-w4a8-w8a8"]


# ------------------------------------------------------------------ command line
def test_cli_sensitivity_and_schemes(tmp_path, coco_root, capsys):
    model = tmp_path / "t.onnx"
    _tiny_net(model, fragile=True)
    out = tmp_path / "sens.json"
    # a raw-head check guards the CLI: a non-YOLO graph is refused with a clear message
    assert main(["sensitivity", str(model), "--coco-root", str(coco_root), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()
    assert main(["sensitivity", str(tmp_path / "missing.onnx"), "--coco-root", str(coco_root), "--out", str(out)]) == 2
    assert "model not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert main(["schemes", str(bad), "--out-dir", str(tmp_path / "s")]) == 2
    assert "not a sensitivity file" in capsys.readouterr().err


def test_cli_sensitivity_on_yolov10n(yolov10n_onnx, coco_root, tmp_path, capsys):
    out = tmp_path / "sens.json"
    assert main(["sensitivity", str(yolov10n_onnx), "--format", "w4a16", "--coco-root", str(coco_root), "--images", "1",
                 "--range-images", "1", "--directions", "alone", "--naive-check", "1", "--out", str(out)]) == 0  # fmt: skip
    sens = json.loads(out.read_text())
    recs = sens["formats"]["w4a16"]["records"]
    assert list(recs) == sens["convs"] and len(recs) == 82 and all(set(r["alone"]) == set(METRICS) for r in recs.values())
    assert sens["formats"]["w4a16"]["naive"]["max_abs_difference_db"] < 1e-6 and sens["metric"] == "det_sqnr"
    assert main(["schemes", str(out), "--out-dir", str(tmp_path / "schemes"), "--low", "w4a16"]) == 0
    index = json.loads((tmp_path / "schemes" / "index.json").read_text())
    assert [e["name"] for e in index] == [f"w4a16-top{k}" for k in (0, 5, 10, 20)]  # no w8a8 sweep: no budgets
    assert main(["sensitivity", str(yolov10n_onnx), "--coco-root", str(coco_root), "--images", "200",
                 "--out", str(tmp_path / "x.json")]) == 2  # fmt: skip
    assert "lists 160 images" in capsys.readouterr().err


def test_keep_sensitive_needs_a_w8a8_sweep():
    from types import SimpleNamespace

    from lowbit_helpers.config import parse_config
    from lowbit_helpers.steps.int8 import quantize_command, sensitive_convs

    cfg = parse_config({"name": "x", "sensitivity": {"formats": ["w4a16"]},
                        "int8": {"variants": [{"name": "k", "backend": "ort", "method": "avgminmax", "keep_sensitive": 3}]}})  # fmt: skip
    run = SimpleNamespace(cfg=cfg)
    assert sensitive_convs(run, 0) == []
    with pytest.raises(LowbitError, match="has neither"):
        sensitive_convs(run, 3)
    cmd = quantize_command(cfg, cfg.int8.variants[0], "m.onnx", "c.npy", "o.onnx", ["/model.0/conv/Conv"])
    assert cmd[cmd.index("--exclude") + 1 :][:1] == ["/model.0/conv/Conv"]


# ------------------------------------------------------------------ w8a8-ort: the quantizers ORT deploys
def _exact(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _deployed(path, images, head_policy="none"):
    from lowbit_helpers.int8.ort import quantize_int8_ort
    from lowbit_helpers.sensitivity.deployed import DeployedQdq

    out = path.with_name(path.stem + ".qdq.onnx")
    quantize_int8_ort(path, out, images, "avgminmax", head_policy=head_policy)
    return DeployedQdq(onnx.load(str(path)), onnx.load(str(out))), onnx.load(str(out))


def test_w8a8_ort_all_convs_is_the_deployed_file(tmp_path):
    from lowbit_helpers.sensitivity.deployed import DeployedPerturber

    path = tmp_path / "t.onnx"
    model = _tiny_net(path, fragile=False)
    images = _images()
    dq, qdq = _deployed(path, images)
    convs = conv_nodes(model)
    # every quantizer of the file belongs to a Conv, and each Conv owns its input, weight and bias
    assert set().union(*dq.owned.values()) == dq.edges()
    for c in convs:
        assert {(c, 0), (c, 1), (c, 2)} <= dq.owned[c] or {(c, 0), (c, 1)} <= dq.owned[c]
    # the pre-activation output and the SiLU of the first Conv are its own, not the next Conv's
    assert {("/model.0/act/Sigmoid", 0), ("/model.0/act/Mul", 0)} <= dq.owned["/model.0/conv/Conv"]
    assert ("/model.0/act/Sigmoid", 0) not in dq.owned["/model.1/conv/Conv"]
    applied = dq.apply(model, convs)
    x = images[:1]
    want = _exact(qdq).run(None, {"images": x})[0]
    assert np.array_equal(_exact(applied).run(None, {"images": x})[0], want)  # bit for bit, exact Q/DQ arithmetic
    pert = DeployedPerturber(path, images)
    got = sim_session(applied, 1, pert.disabled_optimizers).run(None, {"images": x})[0]
    assert np.array_equal(got, want)  # and through the sweep's sessions
    # alone: fewer quantizers than all; an empty set leaves the graph alone
    alone = dq.apply(model, ["/model.1/conv/Conv"])
    n_q = lambda m: sum(n.op_type == "QuantizeLinear" for n in m.graph.node)  # noqa: E731
    assert 0 < n_q(alone) < n_q(applied) and n_q(dq.apply(model, [])) == 0
    assert np.array_equal(_exact(dq.apply(model, [])).run(None, {"images": x})[0], _exact(model).run(None, {"images": x})[0])


def test_w8a8_ort_sweep_equals_naive_and_ranks_the_wide_range(tmp_path):
    from lowbit_helpers.sensitivity.deployed import DeployedPerturber

    path = tmp_path / "f.onnx"
    model = _tiny_net(path, fragile=True)
    images = _images(2)
    pert = DeployedPerturber(path, images)
    r = sweep(model, images, pert, workers=1)
    assert r["format"] == "w8a8-ort"
    for conv in conv_nodes(model):
        for d in ("alone", "kept"):
            values, _ = naive(model, images, pert, None, conv, d)
            assert r["records"][conv][d]["det_sqnr"] == pytest.approx(values["det_sqnr"], abs=1e-6)
    # the wide-range tensor is quantized once in ORT's file (its producer's output): the Convs that read it
    # or make it are the sensitive ones
    recs = r["records"]
    worst = min(recs, key=lambda c: recs[c]["alone"]["raw_sqnr"])
    assert worst in {"/model.0/conv/Conv", "/model.1/conv/Conv", "/model.3/cv0/Conv"}
    with pytest.raises(ValueError, match="DeployedQdq"):
        apply_format(model, {"/model.1/conv/Conv"}, get_format("w8a8-ort"), {})


def test_deployed_file_of_another_model_is_refused(tmp_path):
    from lowbit_helpers.sensitivity.deployed import DeployedQdq

    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _tiny_net(a, False)
    model_b = _tiny_net(b, False)
    for n in model_b.graph.node:
        n.name = n.name + "_other"
    _, qdq = _deployed(a, _images(2))
    with pytest.raises(ValueError, match="not in the float graph"):
        DeployedQdq(model_b, qdq)


@pytest.mark.parametrize("head_policy", ["none", "conservative"])
def test_w8a8_ort_reproduces_the_ort_int8_model_on_yolov10n(yolov10n_onnx, coco_root, tmp_path, head_policy):
    """All Convs in w8a8-ort = the file quantize-int8 writes (notebook 03's ORT recipe with the same ranges)."""
    import shutil

    from lowbit_helpers.data import calibration_tensor, read_image_list

    path = tmp_path / "m.onnx"
    shutil.copyfile(yolov10n_onnx, path)
    images = calibration_tensor(read_image_list(coco_root / "calib160.txt"), 3)
    dq, qdq = _deployed(path, images[:2], head_policy)
    model = onnx.load(str(path))
    x = images[2:3]
    want = _exact(qdq).run(None, {"images": x})[0]
    got = _exact(dq.apply(model, conv_nodes(model))).run(None, {"images": x})[0]
    assert np.array_equal(got, want)
    fp32 = _exact(model).run(None, {"images": x})[0]
    assert np.abs(want - fp32).max() > 0.01  # the file is quantized: the equality is not trivial


def _fake_validation(rng, convs):
    studies = {}
    for fmt, direction in (("w4a16", "alone"), ("w4a8", "alone"), ("w4a16", "kept")):
        rows = []
        for i, c in enumerate(convs):
            truth = -0.01 * i  # later layers cost more here
            sign = 1 if direction == "alone" else -1
            rows.append({"conv": c, "delta_select": truth + rng.normal(0, 1e-4), "delta_confirm": truth, "delta_all": truth,
                         "metrics": {"det_sqnr": sign * (40 - i), "raw_sqnr": sign * float(rng.normal()),
                                     "label_free_map": sign * (50 - i)}})  # fmt: skip
        rows.append({"conv": "__all__", "delta_select": -0.3, "delta_confirm": -0.3, "delta_all": -0.3, "metrics": {"det_sqnr": 1, "raw_sqnr": 1, "label_free_map": 1}})
        studies[f"{fmt}-{direction}"] = {"format": fmt, "direction": direction, "rows": rows}
    return {"studies": studies, "select": "val100", "confirm": "val500 minus val100"}


def test_agreement_chooses_the_metric_that_ranks_like_map():
    from lowbit_helpers.report.sensitivity import validation_table
    from lowbit_helpers.steps.sensitivity import agreement

    rng = np.random.default_rng(0)
    convs = [f"c{i}" for i in range(12)]
    result = _fake_validation(rng, convs)
    # the default sweep swept w4a8 only; w4a16 takes its ranking (rank_as)
    sens = {"metrics": ["det_sqnr"], "formats": {"w4a8": {"records": {c: {"alone": {"det_sqnr": 30.0 - i}, "kept": {"det_sqnr": 5.0 + i}}
                                                                      for i, c in enumerate(convs)}}}}  # fmt: skip
    proxy = {"sweep": {"format": "w4a8"}, "rows": [{"node": c, "torch_sqnr_db": float(rng.normal())} for c in convs]}
    a = agreement(result, sens, proxy, {"w4a16": "w4a8"})
    assert a["chosen"] == a["best_on_select"] == "det_sqnr"  # label-free mAP ranks as well, but the sweep cannot compute it
    t = a["spearman"]
    assert t["w4a8-alone"]["det_sqnr"]["select"]["rho"] == pytest.approx(1.0)
    assert t["w4a16-kept"]["det_sqnr"]["confirm"]["rho"] == pytest.approx(1.0)  # kept: more gain = more sensitive
    assert t["w4a16-alone"]["sweep:det_sqnr"]["all"]["rho"] == pytest.approx(1.0)  # w4a8's sweep stands in for w4a16
    assert t["w4a16-kept"]["sweep:det_sqnr"]["all"]["rho"] == pytest.approx(1.0)
    assert "torch_proxy" in t["w4a8-alone"] and "torch_proxy" not in t["w4a16-alone"]  # the proxy's own format only
    assert abs(t["w4a8-alone"]["raw_sqnr"]["select"]["rho"]) < 0.8
    assert "sweep:det_sqnr" not in agreement(result, sens, None)["spearman"]["w4a16-alone"]  # without rank_as: no stand-in
    table = validation_table({**result, "agreement": a})
    assert table.loc["det_sqnr", "mean select (alone)"] == pytest.approx(1.0, abs=1e-3)
    assert table.loc["raw_sqnr", "mean select (alone)"] < 0.8
    # a selection split that ranks nothing (noise larger than the effects) makes no pick
    for st in result["studies"].values():
        for r in st["rows"]:
            r["delta_select"] = float(rng.normal())
    noisy = agreement(result, sens, proxy, {"w4a16": "w4a8"})
    assert noisy["chosen"] is None and noisy["best_on_select"] in noisy["mean_select_rho"]


def test_ground_truth_reliability_from_its_two_halves():
    from lowbit_helpers.report.sensitivity import reliability_table
    from lowbit_helpers.sensitivity.validation import reliability
    from lowbit_helpers.steps.sensitivity import agreement

    rng = np.random.default_rng(1)
    effect = -np.linspace(0, 0.01, 24)
    exact = reliability(effect, effect, 200, {"select": 100, "confirm": 400})
    assert exact["split_half"]["rho"] == pytest.approx(1.0)
    assert exact["splits"]["select"]["ceiling"] == pytest.approx(1.0) == exact["splits"]["confirm"]["ceiling"]
    # noise as large as the effects: the halves disagree, more images help, fewer hurt (Spearman-Brown)
    a, b = effect + rng.normal(0, 0.004, 24), effect + rng.normal(0, 0.004, 24)
    noisy = reliability(a, b, 200, {"select": 100, "confirm": 400})
    r = noisy["split_half"]["rho"]
    assert 0 < r < 0.95
    assert noisy["splits"]["confirm"]["reliability"] == pytest.approx(2 * r / (1 + r))
    assert noisy["splits"]["select"]["reliability"] == pytest.approx(0.5 * r / (1 - 0.5 * r))
    assert noisy["splits"]["select"]["ceiling"] < np.sqrt(r) < noisy["splits"]["confirm"]["ceiling"] < 1
    # halves that rank against each other: no reliability, no ceiling
    none = reliability(effect, -effect, 200, {"confirm": 400})
    assert none["split_half"]["rho"] == pytest.approx(-1.0) and np.isnan(none["splits"]["confirm"]["ceiling"])
    # agreement carries it per study, the report shows it
    result = _fake_validation(rng, [f"c{i}" for i in range(12)])
    result["images"] = {"select": 100, "confirm": 400, "all": 500, "confirm_a": 200, "confirm_b": 200}
    for st in result["studies"].values():
        for row in st["rows"]:
            row["delta_confirm_a"] = row["delta_confirm"] + float(rng.normal(0, 1e-4))
            row["delta_confirm_b"] = row["delta_confirm"] + float(rng.normal(0, 1e-4))
    a = agreement(result, None, None)
    rel = a["reliability"]
    assert set(rel) == set(result["studies"]) and rel["w4a8-alone"]["split_half"]["rho"] == pytest.approx(1.0)
    table = reliability_table({"agreement": a})
    assert table.loc["w4a8-alone", "confirm: ceiling on Spearman"] == pytest.approx(1.0)
    # the metric's Spearman over the ceiling (det_sqnr ranks exactly like the truth here)
    assert table.loc["w4a8-alone", "detection SQNR (foreground scores + boxes): confirm Spearman / ceiling"] == "+1.00 / 1.00 = 1.00"


def test_rank_as_lends_a_swept_ranking_to_a_format_not_swept():
    sens = _fake_sens()
    names = [s["name"] for s in make_schemes(sens, [0, 5], [], rank_as={"w4a16": "w4a8", "fp8": "w4a16"})]
    assert names == ["w8a8-top0", "w8a8-top5", "w4a8-top0", "w4a8-top5", "w4a16-top0", "w4a16-top5"]  # fp8: no swept source
    w4a16 = top_k_scheme(sens, "w4a16", 5, ranked_as="w4a8")
    w4a8 = top_k_scheme(sens, "w4a8", 5)
    assert w4a16["kept"] == w4a8["kept"] and w4a16["ranked_by"].startswith("w4a8 kept")
    assert set(w4a16["nodes"].values()) == {"w4a16", "fp32"}


def test_reports_of_a_w8a8_ort_only_sweep():
    """YOLOv10m's params sweep w8a8-ort alone: no scheme, and the tables still render."""
    from lowbit_helpers.report.sensitivity import cost_table, format_agreement, scheme_table, stability_table
    from lowbit_helpers.schema import Skipped
    from lowbit_helpers.steps.sensitivity import SensitivityResult

    recs = {c: {d: {"det_sqnr": 20.0 + i, "raw_sqnr": 30.0 + i} for d in ("alone", "kept")} for i, c in enumerate("abc")}
    sweep_ = {"records": recs, "all": {"det_sqnr": 10.0, "raw_sqnr": 20.0}, "directions": ["alone", "kept"], "images": 8,
              "workers": 2, "threads_per_worker": 1, "seconds": {"total": 5.0}, "peak_rss_gb": 1.0,
              "at_images": {"4": recs}}  # fmt: skip
    result = SensitivityResult(layers=[], sensitivity={"metric": "det_sqnr", "formats": {"w8a8-ort": sweep_}},
                               proxy=Skipped("off"), validation=Skipped("off"), schemes=[])  # fmt: skip
    assert scheme_table([], {"a": 1}).empty
    assert make_schemes({"convs": list("abc"), "params": dict.fromkeys("abc", 1), "metric": "det_sqnr",
                         "formats": result.sensitivity["formats"]}, [0, 1], []) == []  # fmt: skip
    assert stability_table(result).loc[("w8a8-ort", "alone"), "4 images"] == pytest.approx(1.0)
    assert format_agreement(result).empty and cost_table(result).loc["w8a8-ort", "peak memory GB"] == 1.0
