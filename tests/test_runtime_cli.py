"""The command line end to end on small inputs, and its bad-input paths."""

import json
import shutil
from pathlib import Path

import pytest

from lowbit_helpers.__main__ import main
from lowbit_helpers.errors import LowbitError
from lowbit_helpers.runtime import INT8_ISA_FLAGS, bench_models, make_session

from .conftest import VAL100


def test_unknown_provider_is_refused(yolov10n_onnx):
    with pytest.raises(LowbitError, match="TensorrtExecutionProvider not available"):
        make_session(yolov10n_onnx, ["TensorrtExecutionProvider"])


def test_bench_cli(yolov10n_onnx, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(yolov10n_onnx), str(yolov10n_onnx), "--threads", "1", "--warmup", "1", "--runs", "3",
                 "--profile", "1", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == [str(yolov10n_onnx)] * 2
    assert rows[0]["ratio_to_first"] == 1.0 and rows[1]["ratio_to_first"] > 0
    assert all(r["p90_ms"] >= r["median_ms"] > 0 and r["runs"] == 3 for r in rows)
    # the profile keys every one of the 82 Convs by its ONNX name, whatever ORT fused it into
    for r in rows:
        assert len(r["profile"]["by_conv"]) == 82 and r["profile_vs_first"]["convs_matched"] == 82
        assert r["profile"]["by_conv"]["/model.0/conv/Conv"] > 0
    assert "Conv kernels" in capsys.readouterr().out
    # the int8 instructions of the CPU decide the INT8 speed-up: recorded with every bench
    isa = rows[0]["environment"]["cpu_int8_isa"]
    assert isinstance(isa, list) and set(isa) <= set(INT8_ISA_FLAGS)


def test_bench_stats_fields(yolov10n_onnx):
    (row,) = bench_models([yolov10n_onnx], threads=1, warmup=0, runs=4)
    assert {"mean_ms", "median_ms", "p90_ms", "p95_ms", "throughput_fps", "ratio_to_first"} <= set(row)


def test_evaluate_cli(yolov10n_onnx, coco_root, tmp_path):
    out = tmp_path / "metrics.json"
    rc = main(["evaluate", str(yolov10n_onnx), "--coco-root", str(coco_root), "--ann", VAL100, "--max-images", "4",
               "--bootstrap", "20", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["num_images"] == 4 and 0.2 < m["mAP_50_95"] <= 1.0 and m["mAP_50"] >= m["mAP_50_95"]
    assert m["bootstrap"]["lo"] <= m["mAP_50_95"] <= m["bootstrap"]["hi"]


def test_export_cli(tmp_path):
    out = tmp_path / "n.onnx"
    assert main(["export", "--weights", "random:yolov10n", "--out", str(out)]) == 0
    assert out.is_file()


def _fails(argv, capsys, *needles):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "\n  fix: " in err and "Traceback" not in err
    for n in needles:
        assert n in err
    return err


def test_bad_inputs_exit_non_zero_with_one_message(yolov10n_onnx, coco_root, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    _fails(["evaluate", str(tmp_path / "none.onnx"), "--coco-root", str(coco_root), "--ann", VAL100, "--out", str(out)],
           capsys, "model not found")  # fmt: skip
    _fails(["evaluate", str(yolov10n_onnx), "--coco-root", str(tmp_path / "nococo"), "--ann", VAL100, "--out", str(out)],
           capsys, "COCO root not found")  # fmt: skip
    _fails(["evaluate", str(yolov10n_onnx), "--coco-root", str(coco_root), "--ann", VAL100, "--threads", "0",
            "--out", str(out)], capsys, "runtime.threads")  # fmt: skip
    _fails(["bench", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "b.json")], capsys, "model not found")
    _fails(["export", "--weights", "yolov10q", "--out", str(tmp_path / "x.onnx")], capsys, "unknown YOLOv10 size")
    assert not out.exists() and not (tmp_path / "b.json").exists() and not (tmp_path / "x.onnx").exists()


def test_corrupt_image_stops_evaluation_without_output(yolov10n_onnx, coco_root, tmp_path, capsys):
    root = tmp_path / "coco"
    (root / "images" / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    shutil.copy(coco_root / VAL100, root / VAL100)
    ids = json.loads((coco_root / VAL100).read_text())["images"][:3]
    for im in ids:
        shutil.copy(coco_root / "images" / "val2017" / im["file_name"], root / "images" / "val2017")
    (root / "images" / "val2017" / ids[1]["file_name"]).write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "metrics.json"
    _fails(["evaluate", str(yolov10n_onnx), "--coco-root", str(root), "--ann", VAL100, "--max-images", "3",
            "--out", str(out), "--quiet"], capsys, "cannot decode image", ids[1]["file_name"])  # fmt: skip
    assert not out.exists()


def test_run_with_bad_params_creates_nothing(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(f"name: bad\noutput: {{runs_dir: {tmp_path / 'runs'}}}\nlatency: {{runs: many}}\n")
    _fails(["run", str(p)], capsys, "latency.runs", "'many'")
    assert not (tmp_path / "runs").exists()
    p.write_text(f"name: bad\noutput: {{runs_dir: {tmp_path / 'runs'}, reports_dir: {tmp_path / 'rep'}}}\n"
                 f"data: {{coco_root: {tmp_path / 'missing'}}}\n")  # fmt: skip
    _fails(["run", str(p)], capsys, "COCO root not found")
    assert not (tmp_path / "rep").exists() and not (tmp_path / "runs").exists()


def test_load_memory_is_measured_in_a_fresh_process(yolov10n_onnx, tmp_path):
    """A model's load + first-run memory shows even when the calling process is large."""
    import numpy as np

    from lowbit_helpers.errors import LowbitError
    from lowbit_helpers.runtime import load_memory

    ballast = np.ones((300, 1024, 1024), np.uint8)  # 300 MB in this process must not hide the child's cost
    (mem,) = load_memory([yolov10n_onnx], threads=1)
    assert 10 < mem < ballast.nbytes / 2**20
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(LowbitError, match="fresh process"):
        load_memory([bad])


def _bad_run_inputs(tmp_path, coco_root):
    """(label, params override, expected words): each a bad input `run` must refuse up front."""
    import onnx

    from .test_assets import tiny_onnx

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(b"\x08\x07\x12\x04trunc")
    classifier = tiny_onnx(tmp_path / "resnet.onnx", [1, 3, 224, 224], [1, 1000])
    wrong_head = tiny_onnx(tmp_path / "e2e.onnx", [1, 3, 640, 640], [1, 300, 6])
    empty_calib = tmp_path / "empty_calib.txt"
    empty_calib.write_text("")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert onnx.load(str(classifier)).graph.output[0].name == "output0"
    import onnxruntime as ort

    # a GPU provider this onnxruntime lacks (CUDA here; on a GPU build, one it was not built with)
    gpu = next(p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider")
               if p not in ort.get_available_providers())  # fmt: skip
    return [
        ("missing model", {"model": {"weights": str(tmp_path / "none.onnx")}}, "model file not found"),
        ("truncated ONNX", {"model": {"weights": str(truncated)}}, "not a readable ONNX"),
        ("non-YOLO ONNX", {"model": {"weights": str(classifier)}}, "images [1, 3, 224, 224]"),
        ("wrong output shape", {"model": {"weights": str(wrong_head)}}, "output0 [1, 300, 6]"),
        ("missing dataset", {"data": {"coco_root": str(tmp_path / "no_coco")}}, "COCO root not found"),
        ("empty calibration list", {"data": {"coco_root": str(coco_root), "calib_list": str(empty_calib)}}, "is empty"),
        ("unknown key", {"decode": {"iou_thresh": 0.5}}, "decode.iou_thresh: unknown key"),
        ("wrong type", {"latency": {"runs": "many"}}, "latency.runs"),
        ("GPU provider without a GPU", {"runtime": {"providers": [gpu]}}, gpu),
        ("OpenVINO property the installed version lacks", {"int8": {"openvino_settings": {"fast": {"NO_SUCH_PROPERTY": 1}}}},
         "int8.openvino_settings.fast: OpenVINO"),
        ("OpenVINO property value it refuses", {"int8": {"openvino_settings": {"pin": {"ENABLE_CPU_PINNING": "maybe"}}}},
         "refuses {'ENABLE_CPU_PINNING': 'maybe'}"),
        ("unwritable runs directory", {"output": {"runs_dir": str(blocker / "runs"), "reports_dir": str(tmp_path / "rep")}},
         "cannot write the run directory"),
    ]


def test_bad_inputs_to_the_main_job_are_refused_before_anything_is_written(tmp_path, coco_root, capsys):
    """Each: one `error:` line naming the cause, a `fix:` line, exit code 2, no run directory, no report."""
    import yaml

    for label, override, words in _bad_run_inputs(tmp_path, coco_root):
        case = tmp_path / label.replace(" ", "_")
        params = {"name": "bad", "data": {"coco_root": str(coco_root)},
                  "output": {"runs_dir": str(case / "runs"), "reports_dir": str(case / "reports")}}  # fmt: skip
        for section, values in override.items():
            params.setdefault(section, {}).update(values)
        path = tmp_path / f"{case.name}.yaml"
        path.write_text(yaml.safe_dump(params))
        err = _fails(["run", str(path)], capsys, words)
        assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, (label, err)
        # the folders this case configured (not the defaults): nothing written there
        out = params["output"]
        assert not Path(out["runs_dir"]).exists() and not Path(out["reports_dir"]).exists(), label
    assert (tmp_path / "a_file").read_text() == "x"  # the blocking file is left as it was
