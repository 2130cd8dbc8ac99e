"""Per-layer sensitivity: fake-quant formats, the cached sweep, the Torch proxy mapping, schemes."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit_helpers.__main__ import main
from lowbit_helpers.errors import LowbitError
from lowbit_helpers.quant.formats import FORMATS, activation_qparams, apply_format, get_format, quantize_weight
from lowbit_helpers.quant.schemes import budget_scheme, make_schemes, top_k_scheme
from lowbit_helpers.quant.sensitivity import activation_ranges, conv_nodes, fp32_outputs, naive_sqnr, sweep


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
    """Three Convs and a skip connection. With ``fragile`` the middle Conv's input has one
    channel of a 100x larger range that the Conv ignores (zero weights): per-tensor 8-bit
    activations then crush every channel it does use."""
    rng = np.random.default_rng(1)
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)
    w3 = rng.normal(0, 0.3, (6, 8, 1, 1)).astype(np.float32)
    if fragile:
        w1[0] *= 100
        w2[:, 0] = 0
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="/model.0/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["a"], ["as"], name="/model.0/act/Sigmoid"),
        helper.make_node("Mul", ["a", "as"], ["b"], name="/model.0/act/Mul"),
        helper.make_node("Conv", ["b", "w2"], ["c"], name="/model.1/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "as"], ["d"], name="/model.1/Add"),
        helper.make_node("Conv", ["d", "w3"], ["y"], name="/model.2/Conv"),
    ]
    g = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 16, 16])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return model


def _images(n=4):
    return np.random.default_rng(2).random((n, 3, 16, 16), dtype=np.float32)


@pytest.mark.parametrize("fmt", ["w4a16", "w4a8", "w8a8", "fp8"])
def test_cached_sweep_equals_naive(tmp_path, fmt):
    model = _tiny_net(tmp_path / "t.onnx", fragile=False)
    images = _images()
    ranges = activation_ranges(model, images)
    result = sweep(model, images, get_format(fmt), ranges)
    refs = fp32_outputs(model, images)
    for conv in conv_nodes(model):
        for d in ("alone", "kept"):
            naive, _ = naive_sqnr(model, images, refs, get_format(fmt), ranges, conv, d)
            assert result["records"][conv][f"{d}_sqnr_db"] == pytest.approx(naive, abs=1e-6)
    # the whole network in the format is worse than any single layer alone
    assert result["all_sqnr_db"] < min(r["alone_sqnr_db"] for r in result["records"].values())


def test_fragile_layer_ranks_first(tmp_path):
    fragile, plain = _tiny_net(tmp_path / "f.onnx", True), _tiny_net(tmp_path / "p.onnx", False)
    images = _images()
    for model, expect_first in ((fragile, "/model.1/conv/Conv"), (plain, None)):
        r = sweep(model, images, get_format("w8a8"), activation_ranges(model, images))
        recs = r["records"]
        most_alone = min(recs, key=lambda c: recs[c]["alone_sqnr_db"])
        most_kept = max(recs, key=lambda c: recs[c]["kept_sqnr_db"])
        if expect_first:
            assert most_alone == most_kept == expect_first
            others = [recs[c]["alone_sqnr_db"] for c in recs if c != expect_first]
            assert recs[expect_first]["alone_sqnr_db"] < min(others) - 10  # by a wide margin
        else:
            assert recs["/model.1/conv/Conv"]["alone_sqnr_db"] > 25  # the same layer without the wide channel


def test_apply_format_leaves_other_convs_and_names_alone(tmp_path):
    model = _tiny_net(tmp_path / "t.onnx", False)
    ranges = activation_ranges(model, _images())
    q = apply_format(model, {"/model.1/conv/Conv"}, get_format("w4a8"), ranges)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("Conv") == 3
    assert {o.name for o in q.graph.output} == {"y"} and "w1" in {i.name for i in q.graph.initializer}
    with pytest.raises(KeyError):
        apply_format(model, {"/nope/Conv"}, get_format("w8a8"), ranges)


# ------------------------------------------------------------------ Torch proxy
@pytest.fixture(scope="module")
def torch_model(yolov10n):
    from lowbit_helpers.export import load_torch_model

    return load_torch_model(yolov10n)


def test_name_mapping_covers_every_conv(yolov10n_onnx, torch_model):
    from lowbit_helpers.quant.torch_proxy import map_convs

    m = onnx.load(str(yolov10n_onnx))
    mapping = map_convs(m, torch_model)
    assert len(mapping["mapping"]) == len(conv_nodes(m)) == 82
    assert set(mapping["matched_by"].values()) == {"name"}  # every name translates, and its weights match
    assert mapping["unmapped_onnx"] == [] and mapping["unused_torch"] == ["model.23.dfl.conv"]
    assert len(set(mapping["mapping"].values())) == 82


def test_resumed_forward_and_proxy_agree_with_onnx(yolov10n_onnx, torch_model, coco_root):
    import torch

    from lowbit_helpers.data import calibration_tensor, read_image_list
    from lowbit_helpers.quant.torch_proxy import forward_from, layer_outputs, torch_ranges, torch_sweep

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
    onnx_r = sweep(model, images, fmt, activation_ranges(model, images), directions=["alone"], convs=nodes)
    torch_r = torch_sweep(torch_model, modules, images, fmt, torch_ranges(torch_model, modules, images))
    for n, m in zip(nodes, modules):  # same method, two runtimes: within a fraction of a dB
        assert torch_r["sqnr_db"][m] == pytest.approx(onnx_r["records"][n]["alone_sqnr_db"], abs=0.3)


# ------------------------------------------------------------------ schemes
def _fake_sens(n=30, seed=0):
    rng = np.random.default_rng(seed)
    convs = [f"/model.{i}/conv/Conv" for i in range(n)]
    params = {c: int(rng.integers(100, 50_000)) for c in convs}
    fmts = {}
    for f, base in (("w8a8", 40.0), ("w4a8", 22.0)):
        recs = {c: {"alone_sqnr_db": float(base + rng.normal(0, 4)), "kept_sqnr_db": float(base - 12 + rng.random())}
                for c in convs}  # fmt: skip
        fmts[f] = {"records": recs, "all_sqnr_db": base - 12}
    return {"convs": convs, "params": params, "formats": fmts, "calibration": {"images": 32}}


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
    sens["formats"]["w4a8"]["records"][c0]["alone_sqnr_db"] = 80.0  # nearly free in 4-bit
    sens["formats"]["w4a8"]["records"][c1]["alone_sqnr_db"] = 5.0  # very costly
    s = budget_scheme(sens, 25)
    assert s["nodes"][c0] == "w4a8" and s["nodes"][c1] == "w8a8"


def test_top_k_keeps_the_largest_kept_gain():
    sens = _fake_sens()
    recs = sens["formats"]["w8a8"]["records"]
    by_gain = sorted(recs, key=lambda c: -recs[c]["kept_sqnr_db"])
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
    assert list(recs) == sens["convs"] and len(recs) == 82 and all("alone_sqnr_db" in r for r in recs.values())
    assert sens["formats"]["w4a16"]["naive"]["max_abs_sqnr_difference_db"] < 1e-6
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
    with pytest.raises(LowbitError, match="no w8a8"):
        sensitive_convs(run, 3)
    cmd = quantize_command(cfg, cfg.int8.variants[0], "m.onnx", "c.npy", "o.onnx", ["/model.0/conv/Conv"])
    assert cmd[cmd.index("--exclude") + 1 :][:1] == ["/model.0/conv/Conv"]
