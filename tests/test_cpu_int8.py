"""CPU INT8 engines: the int16 saturation probe (native and on an emulated AVX2 CPU), OpenVINO
behind the session interface, mixed-runtime benchmarks, and the INT8 command line's new options."""

import json

import numpy as np
import pytest

from lowbit_helpers.__main__ import main
from lowbit_helpers.errors import LowbitError
from lowbit_helpers.int8.kernel_check import CHANNELS, probe, probe_model
from lowbit_helpers.runtime import (
    ENGINES,
    INT8_ISA_FLAGS,
    bench_models,
    cpu_int8_isa,
    engine_session,
    int8_kernel_class,
    make_session,
)
from lowbit_helpers.runtime.emulate import EmulatedSession, emulated_probe, qemu_binary

from .conftest import VAL100
from .test_runtime_cli import _fails


def test_int8_kernel_class_from_isa():
    assert int8_kernel_class(["avx2", "fma"]) == "avx2"
    assert int8_kernel_class(["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"]) == "vnni"
    assert int8_kernel_class(["avx2", "avx_vnni"]) == "vnni"
    assert int8_kernel_class(["avx2", "avx512_vnni", "amx_int8"]) == "amx"
    assert int8_kernel_class([]) == "none"


def test_saturation_probe_on_this_cpu(tmp_path):
    """Kernel = exact for 7-bit weights on every x86 CPU. For full-range weights: kernel = exact
    with VNNI / AMX (int32 accumulation; the saturation half cannot happen there, so the emulated
    test below shows it), and the int16-saturated value without (vpmaddubsw)."""
    p = probe(tmp_path)
    assert p["full_range"]["fused"] == 1 and p["reduce_range"]["fused"] == 1  # ORT really ran QLinearConv
    assert p["full_range"]["exact"] == pytest.approx(CHANNELS) and p["reduce_range"]["exact"] == pytest.approx(CHANNELS)
    assert p["reduce_range_exact"] and p["reduce_range"]["max_abs_diff"] == 0.0
    if int8_kernel_class() in ("vnni", "amx"):
        assert not p["saturates"] and p["full_range"]["max_abs_diff"] == 0.0
    elif int8_kernel_class() == "avx2":
        assert p["saturates"]
        # each of the 32 pairs clipped to 32767 instead of 2 * 255 * 127 = 64770
        assert p["full_range"]["kernel"] == pytest.approx(CHANNELS * 32767 / 64770, abs=CHANNELS / 250)


def _qdq_probe_reference(x: np.ndarray, reduce_range: bool = False) -> np.ndarray:
    """The probe's Q/DQ graph computed as written, in float64 numpy: quantize x to u8, dequantize
    it and the int8 weights, a float 1x1 Conv, then quantize and dequantize the output."""
    q = 64 if reduce_range else 127
    xq = np.clip(np.round(x.astype(np.float64) * 255), 0, 255) / 255
    y = xq.sum(axis=1, keepdims=True).repeat(8, axis=1) * (q * (1 / q))  # every weight dequantizes to 1.0
    y_scale = CHANNELS / 250
    return np.clip(np.round(y / y_scale), 0, 255) * y_scale


def test_the_exact_engine_is_the_qdq_arithmetic_not_the_kernels(tmp_path):
    """``ort-exact`` on an INT8 model: the Q/DQ graph as written (a float reference of it, to float
    rounding), with ORT's graph optimizations off, while ``ort`` runs the fused QLinearConv; on a CPU
    whose kernel saturates (the probe says so) the two differ by far more than one output step."""
    import onnxruntime as ort

    from lowbit_helpers.runtime.inspect import ort_executed_ops

    m = probe_model(tmp_path / "p.onnx")
    step = CHANNELS / 250
    rng = np.random.default_rng(3)
    x = np.ones((1, CHANNELS, 4, 4), np.float32)  # the first two rows at 1.0: pair sums 64770, beyond int16
    x[:, :, 2:] = rng.random((1, CHANNELS, 2, 4), dtype=np.float32)
    exact_s, kern_s = engine_session(m, "ort-exact", threads=1), engine_session(m, "ort", threads=1)
    opt = ort.GraphOptimizationLevel
    assert exact_s.get_session_options().graph_optimization_level == opt.ORT_DISABLE_ALL
    assert kern_s.get_session_options().graph_optimization_level != opt.ORT_DISABLE_ALL
    assert ort_executed_ops(m, 1)["QLinearConv"] == 1  # what the kernels engine runs
    exact, kern = exact_s.run(None, {"x": x})[0], kern_s.run(None, {"x": x})[0]
    ref = _qdq_probe_reference(x)
    # outputs come in whole steps: float rounding order may move a value near a step's midpoint by one step, rarely
    assert np.abs(exact - ref).max() <= step + 1e-5
    assert np.mean(np.isclose(exact, ref, atol=1e-5)) > 0.95
    if probe(tmp_path)["saturates"]:  # this CPU's u8s8 kernel clips: the all-ones rows lose half their value
        assert np.abs(kern - exact).max() > 20 * step
    else:
        assert np.abs(kern - exact).max() <= step + 1e-6


def _qemu() -> str:
    q = qemu_binary()
    assert q, "qemu-x86_64-static not found: bash scripts/get_qemu.sh fetches it into .cache/qemu (scripts/test.sh does)"
    return q


def test_saturation_on_an_emulated_avx2_cpu():
    """Under QEMU's Haswell model the process sees AVX2 without VNNI; ORT takes its vpmaddubsw path
    and saturates, and 7-bit weights (reduce_range) are exact again."""
    p = emulated_probe(_qemu(), "Haswell")
    assert "avx2" in p["cpu_int8_isa"] and not {"avx512_vnni", "avx_vnni", "avx512f"} & set(p["cpu_int8_isa"])
    assert p["saturates"] and p["reduce_range_exact"]
    assert p["full_range"]["kernel"] == pytest.approx(CHANNELS * 32767 / 64770, abs=CHANNELS / 250)


def test_emulated_session_matches_its_own_kernel_and_fails_clearly(tmp_path):
    m = probe_model(tmp_path / "p.onnx")
    x = np.random.default_rng(0).random((1, CHANNELS, 4, 4), dtype=np.float32) * 0.5  # pair sums < 32767: no clipping
    with EmulatedSession(_qemu(), "Haswell", m, threads=1) as emu:
        assert emu.cpu_int8_isa == ["avx2", "fma"]
        y = emu.run(None, {"x": x})[0]
    exact = make_session(m, threads=1, arithmetic="exact").run(None, {"x": x})[0]
    assert np.abs(y - exact).max() <= CHANNELS / 250 + 1e-6  # at most one output step (float rounding order)
    with pytest.raises(LowbitError, match="under QEMU"):
        EmulatedSession(_qemu(), "NoSuchCpu", m, threads=1)


def test_openvino_session_runs_the_qdq_graph(tmp_path):
    m = probe_model(tmp_path / "p.onnx")
    # pair sums < 32767: no int16 saturation on a CPU without VNNI, where OpenVINO's u8s8 kernel
    # saturates as ORT's does (this test is about the session, not the kernel: see the probe tests)
    x = np.random.default_rng(1).random((1, CHANNELS, 4, 4), dtype=np.float32) * 0.5
    ov = make_session(m, threads=1, runtime="openvino")
    assert ov.get_inputs()[0].name == "x" and ov.get_inputs()[0].shape == [1, CHANNELS, 4, 4]
    assert ov.get_providers()[0].startswith("OpenVINO")
    y = ov.run(None, {"x": x})[0]
    exact = make_session(m, threads=1, arithmetic="exact").run(None, {"x": x})[0]
    assert y.shape == exact.shape
    # OpenVINO rounds its own way: within one output quantization step of the exact result
    assert np.abs(y - exact).max() <= CHANNELS / 250 + 1e-6
    with pytest.raises(LowbitError, match="unknown runtime"):
        make_session(m, runtime="tvm")
    with pytest.raises(LowbitError, match="unknown engine"):
        engine_session(m, "ort-fast")
    with pytest.raises(LowbitError, match="model not found"):
        make_session(tmp_path / "none.onnx", runtime="openvino")


def test_openvino_properties_reach_the_compiled_model(yolov10n_onnx):
    """An OpenVINO setting (int8.openvino_settings) is what the compiled model runs with: bf16 inference
    precision changes YOLOv10n's raw head where the CPU has bf16, unpinned threads do not; an engine spec
    with properties opens the same session; ORT takes no properties."""
    from lowbit_helpers.runtime import openvino_setting_unavailable, with_properties

    x = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    base = make_session(yolov10n_onnx, threads=2, runtime="openvino")
    ref = base.run(None, {"images": x})[0]
    assert base.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    assert base.compiled.get_property("CPU_DENORMALS_OPTIMIZATION") is False
    flushed = make_session(yolov10n_onnx, threads=2, runtime="openvino", properties={"CPU_DENORMALS_OPTIMIZATION": True})
    assert flushed.compiled.get_property("CPU_DENORMALS_OPTIMIZATION") is True
    unpinned = make_session(yolov10n_onnx, threads=2, runtime="openvino", properties={"ENABLE_CPU_PINNING": False})
    assert unpinned.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert np.array_equal(unpinned.run(None, {"images": x})[0], ref)
    spec = with_properties("openvino", {"INFERENCE_PRECISION_HINT": "bf16"})
    assert hash(spec) == hash(with_properties("openvino", {"INFERENCE_PRECISION_HINT": "bf16"}))
    if openvino_setting_unavailable(dict(spec[1])) is None:
        bf16 = engine_session(yolov10n_onnx, spec, threads=2)
        assert bf16.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
        assert not np.array_equal(bf16.run(None, {"images": x})[0], ref)
    else:
        assert openvino_setting_unavailable(dict(spec[1])).startswith("skipped: this CPU has no bf16")
    with pytest.raises(ValueError, match="not ORT's"):
        make_session(yolov10n_onnx, properties={"ENABLE_CPU_PINNING": False})


def test_an_openvino_refusal_is_its_own_message_in_one_line(tmp_path):
    """What a run records where OpenVINO will not compile a file with a setting: OpenVINO's words, without
    its source locations, the file name or the setting's dict (whose ': ' once cut the message short)."""
    from lowbit_helpers.runtime import openvino_refusal

    m = probe_model(tmp_path / "p.onnx")
    with pytest.raises(LowbitError) as e:
        make_session(m, threads=2, runtime="openvino", properties={"ENABLE_CPU_PINNING": "maybe"})
    assert "with {'ENABLE_CPU_PINNING': 'maybe'}" in e.value.cause
    why = openvino_refusal(e.value)
    assert why.startswith("Wrong value maybe") and "ENABLE_CPU_PINNING" in why and "\n" not in why
    assert "Exception from" not in why and "p.onnx" not in why and "{" not in why


def test_bench_mixes_runtimes_in_one_process(yolov10n_onnx, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(yolov10n_onnx), "--runtime", "ort", "openvino", "--threads", "1", "--warmup", "1",
                 "--runs", "2", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())
    assert [r["runtime"] for r in rows] == ["ort", "openvino"] and rows[0]["ratio_to_first"] == 1.0
    assert rows[1]["providers"][0].startswith("OpenVINO") and rows[1]["median_ms"] > 0
    assert set(rows[0]["environment"]["cpu_int8_isa"]) <= set(INT8_ISA_FLAGS)
    assert rows[0]["environment"]["int8_kernel_class"] == int8_kernel_class(cpu_int8_isa())
    with pytest.raises(ValueError, match="one runtime per model"):
        bench_models([yolov10n_onnx], runtimes=["ort", "openvino"])
    _fails(["bench", str(yolov10n_onnx), "--runtime", "openvino", "--profile", "1", "--out", str(tmp_path / "b.json")],
           capsys, "ORT's profiler")  # fmt: skip
    assert not (tmp_path / "b.json").exists()


def test_evaluate_under_openvino_and_exact(yolov10n_onnx, coco_root, tmp_path, capsys):
    """The FP32 model: OpenVINO f32 and ORT's exact mode land on ORT's mAP within float noise."""
    maps = {}
    for flags in ([], ["--runtime", "openvino"], ["--exact"]):
        out = tmp_path / f"m{len(maps)}.json"
        assert main(["evaluate", str(yolov10n_onnx), "--coco-root", str(coco_root), "--ann", VAL100, "--max-images", "4",
                     "--bootstrap", "0", "--out", str(out), "--quiet", *flags]) == 0  # fmt: skip
        r = json.loads(out.read_text())
        maps[r["engine"]] = r["mAP_50_95"]
    assert set(maps) == {"ort", "openvino", "ort-exact"} <= set(ENGINES)
    assert max(maps.values()) - min(maps.values()) < 0.005, maps
    _fails(["evaluate", str(yolov10n_onnx), "--coco-root", str(coco_root), "--ann", VAL100, "--runtime", "openvino",
            "--exact", "--out", str(tmp_path / "x.json")], capsys, "--exact")  # fmt: skip
    _fails(["evaluate", str(yolov10n_onnx), "--coco-root", str(coco_root), "--ann", VAL100, "--precision", "bf16",
            "--out", str(tmp_path / "x.json")], capsys, "--runtime openvino")  # fmt: skip
    assert not (tmp_path / "x.json").exists()


def test_quantize_int8_peer_options(yolov10n_onnx, tmp_path, capsys):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).random((2, 3, 640, 640), dtype=np.float32))
    _fails(["quantize-int8", str(yolov10n_onnx), "--backend", "nncf", "--reduce-range", "--calib-npy", str(calib),
            "--out", str(tmp_path / "q.onnx")], capsys, "--reduce-range")  # fmt: skip
    _fails(["quantize-int8", str(yolov10n_onnx), "--backend", "nncf", "--method", "minmax", "--calib-npy", str(calib),
            "--images", "2", "--out", str(tmp_path / "q.onnx")], capsys, "not available for backend nncf")  # fmt: skip
    _fails(["quantize-int8", str(yolov10n_onnx), "--backend", "ort", "--format", "openvino", "--calib-npy", str(calib),
            "--images", "2", "--out", str(tmp_path / "q.xml")], capsys, "--format is an option of NNCF")  # fmt: skip
    _fails(["quantize-int8", str(yolov10n_onnx), "--backend", "ort", "--bias-correction", "full", "--calib-npy", str(calib),
            "--images", "2", "--out", str(tmp_path / "q.onnx")], capsys, "use one of none, fast for ort")  # fmt: skip
    _fails(["quantize-int8", str(yolov10n_onnx), "--backend", "nncf", "--bias-correction", "none", "--calib-npy", str(calib),
            "--images", "2", "--out", str(tmp_path / "q.onnx")], capsys, "use one of full, fast for nncf")  # fmt: skip
    _fails(["quantize-int8", str(yolov10n_onnx), "--backend", "modelopt", "--placement", "conv-inputs", "--calib-npy",
            str(calib), "--images", "2", "--out", str(tmp_path / "q.onnx")], capsys, "--placement")  # fmt: skip
    _fails(["quantize-int8", str(yolov10n_onnx), "--backend", "nncf", "--format", "openvino", "--calib-npy", str(calib),
            "--images", "2", "--out", str(tmp_path / "q.onnx")], capsys, "writes a .xml file")  # fmt: skip
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "q.xml").exists()


def test_reduce_range_gives_seven_bit_weights(yolov10n_onnx, tmp_path):
    import onnx
    from onnx import numpy_helper

    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).random((2, 3, 640, 640), dtype=np.float32))
    out = tmp_path / "rr.onnx"
    assert main(["quantize-int8", str(yolov10n_onnx), "--backend", "ort", "--reduce-range", "--calib-npy", str(calib),
                 "--images", "2", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.with_suffix(".recipe.json").read_text())["reduce_range"] is True
    m = onnx.load(str(out))
    weights = [numpy_helper.to_array(i) for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.dims
               and len(i.dims) == 4]  # fmt: skip
    assert len(weights) >= 70
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64


def test_selection_and_confirmation_splits(coco_root, tmp_path):
    from lowbit_helpers.config import parse_config
    from lowbit_helpers.rundir import RunDir
    from lowbit_helpers.steps.splits import open_splits

    cfg = parse_config({"name": "s", "data": {"coco_root": str(coco_root), "annotations": VAL100},
                        "output": {"runs_dir": str(tmp_path / "runs")}})  # fmt: skip
    run = RunDir.create(cfg)
    sel, conf, whole = open_splits(run, "first:4", "first:10", "int8-coco/ids.txt", "int8")
    assert len(sel) == 4 and len(conf) == 6 and len(whole) == 10
    assert not set(sel.ids) & set(conf.ids) and set(sel.ids) | set(conf.ids) == set(whole.ids)
    assert conf.name == "first:10 minus first:4"
    with pytest.raises(LowbitError, match="has no images outside"):
        open_splits(run, "first:10", "first:10", "int8-coco/ids.txt", "int8")
    other = tmp_path / "other.txt"  # images 2..9: the selection's first two lie outside it
    other.write_text("\n".join(map(str, whole.ids[2:10])) + "\n")
    with pytest.raises(LowbitError, match="int8.select_subset has images outside"):
        open_splits(run, "first:4", str(other), "int8-coco/ids.txt", "int8")
    # choose on val500, confirm on the rest of val1300: the split is named by the subset it equals
    big = RunDir.create(parse_config({"name": "b", "data": {"coco_root": str(coco_root),
                                      "annotations": "annotations/instances_val2017_val1300.json"},
                                      "output": {"runs_dir": str(tmp_path / "runs")}}))  # fmt: skip
    sel, conf, whole = open_splits(big, "val500", "val1300", "int8-coco/ids.txt", "int8")
    assert conf.name == "extra800" and len(conf) == 800 and not set(sel.ids) & set(conf.ids) and len(whole) == 1300
    assert conf.ids == sorted(int(i) for i in (coco_root / "extra800_ids.txt").read_text().split())


def test_a_kept_float_conv_runs_in_float_under_ort(tmp_path):
    """ORT's WeightBiasQuantization would quantize a Conv the recipe kept in float (between DQ and Q)
    at load time; every session here turns it off for such files, so the Conv stays float."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lowbit_helpers.int8.ort import quantize_int8_ort
    from lowbit_helpers.runtime import float_convs_between_qdq, kept_float_rewrite
    from lowbit_helpers.runtime.inspect import ort_executed_ops

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, c, 3, 3)).astype(np.float32), f"w{i}")
             for i, c in ((1, 3), (2, 8), (3, 8))]  # fmt: skip
    nodes = [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1])
             for i, x in ((1, "images"), (2, "c1"), (3, "c2"))]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("c3", TensorProto.FLOAT, None)], inits)  # fmt: skip
    fp32, q = tmp_path / "fp32.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(fp32))
    quantize_int8_ort(fp32, q, rng.random((4, 3, 16, 16), dtype=np.float32), head_policy="none", exclude=["conv2"])
    assert float_convs_between_qdq(q) == ["conv2"] and kept_float_rewrite(q) == ["WeightBiasQuantization"]
    assert float_convs_between_qdq(fp32) == [] and kept_float_rewrite(fp32) == []
    ops = ort_executed_ops(q, threads=1)  # through make_session: conv2 stays a float Conv
    assert (ops["QLinearConv"], ops["float_Conv"]) == (2, 1), ops
    # what ORT does by default, for contrast: it quantizes conv2 and fuses all three
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "default.onnx")
    ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
    default_ops = [n.op_type for n in onnx.load(str(tmp_path / "default.onnx")).graph.node]
    assert default_ops.count("QLinearConv") == 3 and "Conv" not in default_ops, default_ops
