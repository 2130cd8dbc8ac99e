import onnx
import pytest

from lowbit_helpers.assets import resolve_model, validate_raw_onnx
from lowbit_helpers.graph import graph_info
from lowbit_helpers.steps.baseline import torch_onnx_difference


def test_raw_head_export(yolov10n_onnx):
    validate_raw_onnx(yolov10n_onnx)
    m = onnx.load(str(yolov10n_onnx))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 19
    convs = [n.name for n in m.graph.node if n.op_type == "Conv"]
    assert len(convs) == 82  # BN folded, RepVGGDW fused, one-to-one head only
    assert convs[0] == "/model.0/conv/Conv" and all("one2one" in c for c in convs if c.startswith("/model.23/"))
    assert {p.key: p.value for p in m.metadata_props}["source"] == "yolov10n"


def test_onnx_matches_torch_on_a_real_image(yolov10n, yolov10n_onnx, coco_root):
    d = torch_onnx_difference(yolov10n, yolov10n_onnx, coco_root / "images" / "val2017" / "000000000139.jpg")
    assert d["max_abs_dfl"] <= 1e-4  # box logits (|logit| < 20)
    assert d["max_abs_cls_score"] <= 1e-4  # class scores after sigmoid
    assert d["max_rel"] <= 1e-4  # every logit, relative to max(1, |logit|)
    # class logits reach -90 on background anchors; there float32 itself moves them by ~1e-4:
    # the export is held to within 3x of torch's own float32-vs-float64 error
    assert d["max_abs"] <= 3 * d["float32_floor"]


def test_graph_facts(yolov10n_onnx):
    info = graph_info(yolov10n_onnx)
    assert info["inputs"] == [{"name": "images", "shape": [1, 3, 640, 640], "dtype": "float"}]
    assert info["outputs"][0]["shape"] == [1, 144, 8400]
    assert 2.28e6 < info["parameters"] < 2.31e6  # Ultralytics: 2,299,264 fused
    assert info["macs"] == pytest.approx(3.378e9, rel=2e-3)  # 6.8 GFLOPs as Ultralytics reports
    assert len(info["conv_macs"]) == 82


@pytest.mark.slow  # a full-size (15M-parameter) export: seconds, not a unit test on a tiny input
def test_random_yolov10m_graph(tmp_path):
    from lowbit_helpers.export import export_raw_onnx

    out = export_raw_onnx(resolve_model("random:yolov10m"), tmp_path / "m.onnx")
    info = graph_info(out)
    assert info["op_counts"]["Conv"] == 117
    assert info["parameters"] == pytest.approx(15.36e6, rel=3e-3)
    assert info["metadata"]["structure_only"] == "true"
