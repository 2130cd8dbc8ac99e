"""Ultralytics' own predictions on the same images, for the parity check.

Three references, all scored by the same pycocotools call as this project's decode:
* ``onnx_e2e``: Ultralytics predicting with the NMS-free end-to-end ONNX it exported itself
  (square 640 letterbox, one-to-one top-300): what the ``topk`` decode must match;
* ``pt``: Ultralytics predicting from the ``.pt`` as ``yolo predict`` does by default
  (rectangular letterbox to a multiple of 32; one-to-many head + NMS at IoU 0.7);
* ``pt_one2one``: the ``.pt`` with ``nms=False`` (rectangular letterbox, one-to-one head),
  which separates the letterbox's effect from the head's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from .assets import ModelSource
from .data import CocoSubset
from .evaluate import to_coco

os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_OFFLINE", "1")


def export_ultralytics_e2e(source: ModelSource, out_dir: str | Path, opset: int = 19) -> Path:
    """Ultralytics' own NMS-free end-to-end ONNX export (output [1, 300, 6])."""

    from ultralytics import YOLO  # late: ultralytics (and torch) cost seconds at import

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pt = Path(tmp) / f"{source.name}.pt"
        shutil.copy(source.path, pt)  # Ultralytics writes the export beside the checkpoint
        exported = Path(YOLO(str(pt)).export(format="onnx", imgsz=640, nms=False, opset=opset, verbose=False))
        target = out_dir / f"{source.name}_ultralytics_e2e.onnx"
        shutil.move(str(exported), target)
    return target


def ultralytics_predictions(model_file: str | Path, subset: CocoSubset, conf: float = 0.001, max_det: int = 300,
                            progress: bool = False, **predict_args) -> list[dict]:  # fmt: skip
    """Detections of ``YOLO(model_file).predict`` on every subset image, in COCO results format."""
    from ultralytics import YOLO  # late: ultralytics (and torch) cost seconds at import

    model = YOLO(str(model_file), task="detect")
    cats = subset.category_ids
    dets: list[dict] = []
    for image_id in tqdm(subset.ids, desc=f"ultralytics {Path(model_file).name}", disable=not progress, leave=False):
        r = model.predict(str(subset.image_path(image_id)), imgsz=640, conf=conf, max_det=max_det, device="cpu",
                          verbose=False, **predict_args)[0]  # fmt: skip
        b = r.boxes
        dets.extend(to_coco(image_id, b.xyxy.numpy(), b.conf.numpy(), b.cls.numpy().astype(int), cats))
    return dets
