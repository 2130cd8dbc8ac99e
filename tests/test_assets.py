import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lowbit_helpers import assets
from lowbit_helpers.assets import resolve_model, validate_raw_onnx
from lowbit_helpers.errors import LowbitError


def tiny_onnx(path, in_shape, out_shape):
    """Identity-like graph with the given I/O shapes (Reshape of a Slice), for shape checks."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, out_shape)
    shape = helper.make_tensor("shape", TensorProto.INT64, [len(out_shape)], out_shape)
    n = int(np.prod(out_shape))
    flat = helper.make_tensor("flat", TensorProto.INT64, [1], [-1])
    start = helper.make_tensor("start", TensorProto.INT64, [1], [0])
    end = helper.make_tensor("end", TensorProto.INT64, [1], [n])
    nodes = [
        helper.make_node("Reshape", ["images", "flat"], ["f"]),
        helper.make_node("Slice", ["f", "start", "end"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["output0"]),
    ]
    g = helper.make_graph(nodes, "tiny", [x], [y], initializer=[shape, flat, start, end])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def test_yolov10n_is_verified_and_cached(yolov10n):
    assert yolov10n.sha256 == assets.YOLOV10N_SHA256
    assert yolov10n.path.is_file() and not yolov10n.structure_only
    assert assets.cache_dir() in yolov10n.path.parents


def test_checksum_mismatch_names_the_file_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    bad = tmp_path / "weights" / "yolov10n.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"tampered")
    with pytest.raises(LowbitError) as e:
        resolve_model("yolov10n")
    assert "checksum mismatch" in e.value.cause and str(bad) in e.value.fix


def test_checksum_mismatch_through_the_command_line(tmp_path, monkeypatch, capsys, coco_root):
    """The CLI contract: one `error:` line naming the cause, a `fix:` line naming the file, exit 2,
    nothing written (no ONNX, no run directory, no report), the tampered file left for the user."""
    import yaml

    from lowbit_helpers.__main__ import main

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "cache" / "weights" / "yolov10n.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"tampered")
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"name": "t", "model": {"weights": "yolov10n"}, "data": {"coco_root": str(coco_root)},
                                      "output": {"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "rep")}}))  # fmt: skip
    for argv in (["export", "--weights", "yolov10n", "--out", str(tmp_path / "m.onnx")], ["run", str(params)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert lines[0].startswith("error: ") and "checksum mismatch" in lines[0], err
        assert sum(x.startswith("error: ") for x in lines) == 1 and any(x.startswith("  fix: ") and str(bad) in x for x in lines)
        assert "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "runs").exists() and not (tmp_path / "rep").exists()
    assert bad.read_bytes() == b"tampered"


def test_official_weights_offline_names_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "RELEASE_URL", "http://127.0.0.1:9")  # closed port on this machine
    with pytest.raises(LowbitError) as e:
        resolve_model("yolov10m")
    assert "yolov10m.pt" in e.value.cause
    for alternative in ("/path/to/yolov10m.pt", "/path/to/yolov10m.onnx", "random:yolov10m", "yolov10n"):
        assert alternative in e.value.fix
    assert not list(tmp_path.rglob("*.pt"))  # nothing half-downloaded


def test_names_and_paths(tmp_path):
    src = resolve_model("random:yolov10m")
    assert src.structure_only and src.size == "m" and "structure only" in src.label
    for bad in ("yolov10q", "random:yolov10z", "resnet50"):
        with pytest.raises(LowbitError):
            resolve_model(bad)
    with pytest.raises(LowbitError, match="model file not found"):
        resolve_model(str(tmp_path / "missing.onnx"))


def test_onnx_with_wrong_output_is_refused_with_what_was_found(tmp_path):
    f = tiny_onnx(tmp_path / "e2e.onnx", [1, 3, 640, 640], [1, 300, 6])
    with pytest.raises(LowbitError) as e:
        resolve_model(str(f))
    assert "output0 [1, 300, 6]" in e.value.cause and "export" in e.value.fix
    with pytest.raises(LowbitError, match=r"images \[1, 3, 320, 320\]"):
        validate_raw_onnx(tiny_onnx(tmp_path / "small.onnx", [1, 3, 320, 320], [1, 144, 8400]))
    ok = tiny_onnx(tmp_path / "ok.onnx", [1, 3, 640, 640], [1, 144, 8400])
    assert resolve_model(str(ok)).kind == "onnx"
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(LowbitError, match="not a readable ONNX"):
        validate_raw_onnx(tmp_path / "junk.onnx")
