"""Ultralytics YOLOv10 -> ONNX with the raw one-to-one head [1, 144, 8400].

The exported graph stops before any decode: channels 0-63 are the DFL logits (4 sides x 16
bins), 64-143 the class logits before sigmoid, over the 80x80, 40x40 and 20x20 anchors of
strides 8, 16 and 32. Quantization then acts on exactly the convolutions that deploy, and one
decoder (:mod:`lowbit_helpers.decode`) serves every variant.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import onnx

from .artifacts import atomic_path
from .assets import ModelSource, validate_raw_onnx
from .errors import LowbitError

os.environ.setdefault("YOLO_AUTOINSTALL", "false")  # never let Ultralytics pip-install behind our back
os.environ.setdefault("YOLO_OFFLINE", "1")


def coco_names() -> dict[int, str]:
    from ultralytics.utils import ROOT, YAML  # late: ultralytics (and torch) cost seconds at import

    return dict(YAML.load(ROOT / "cfg/datasets/coco.yaml")["names"])


def _raw_one2one_forward(self, x):
    """Replacement for the v10Detect forward: one-to-one branch, raw logits, no decode."""
    import torch  # late: torch costs seconds at import

    out = self.forward_head(x, **self.one2one)
    return torch.cat([out["boxes"], out["scores"]], 1)


def load_torch_model(source: ModelSource, fuse: bool = True, seed: int = 0):
    """The Ultralytics DetectionModel in eval mode, its head returning the raw one-to-one output.

    The official YOLOv10n checkpoint carries no class names; COCO's are set when it has 80 classes.
    """
    import torch  # late: torch costs seconds at import
    from ultralytics import YOLO  # late: ultralytics (and torch) cost seconds at import

    if source.kind == "onnx":
        raise LowbitError(f"{source.path} is already ONNX; there is no torch model to load", "pass a .pt or a name")
    if source.kind == "random":
        torch.manual_seed(seed)
        model = YOLO(f"yolov10{source.size}.yaml").model
    else:
        try:
            model = YOLO(str(source.path)).model
        except Exception as exc:
            raise LowbitError(
                f"Ultralytics cannot load {source.path}: {type(exc).__name__}: {exc}",
                "give an Ultralytics YOLOv10 detection checkpoint (.pt)",
            ) from None
    head = model.model[-1]
    if type(head).__name__ != "v10Detect" or getattr(head, "one2one_cv2", None) is None:
        raise LowbitError(
            f"{source.name}: the detection head is {type(head).__name__} without a one-to-one branch",
            "use a YOLOv10 checkpoint (its v10Detect head has the one-to-one branch this tool exports)",
        )
    if head.nc != 80:
        raise LowbitError(f"{source.name} has {head.nc} classes; the raw head must have 80 (COCO)", "use a COCO model")
    names = getattr(model, "names", None) or {}
    if not names or all(str(v) == str(k) for k, v in dict(names).items()):
        model.names = coco_names()
    model = model.float().eval()
    # Checkpoints pickled by older Ultralytics restore `end2end` into __dict__, where the
    # property ignores it: set it through the property so fuse() keeps the one-to-one branch.
    head.end2end = True
    if fuse:
        model = model.fuse(verbose=False)
    head.forward = types.MethodType(_raw_one2one_forward, head)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def export_raw_onnx(source: ModelSource, out: str | Path, opset: int = 19) -> Path:
    """Export ``source`` to ``out`` (atomically) and validate the result's I/O."""
    import torch  # late: torch costs seconds at import

    out = Path(out)
    if source.kind == "onnx":
        raise LowbitError(f"{source.path} is already an ONNX model", "use it directly as model.weights")
    if opset < 19:
        raise LowbitError(f"opset {opset} is too old: ModelOpt INT8/FP8 Q/DQ needs opset >= 19", "use --opset 19")
    model = load_torch_model(source)
    dummy = torch.zeros(1, 3, 640, 640)
    with atomic_path(out) as part:
        torch.onnx.export(
            model,
            dummy,
            str(part),
            opset_version=opset,
            input_names=["images"],
            output_names=["output0"],
            dynamo=False,  # the TorchScript exporter keeps module-path node names (/model.2/cv1/conv/Conv)
        )
        # onnxslim folds the shape arithmetic the tracer leaves behind (as Ultralytics' own export
        # does) and keeps the node names, which the sensitivity and scheme files are keyed by.
        import onnxslim  # late: onnxslim imports sympy (a second), only exports need it

        proto = onnxslim.slim(onnx.load(str(part)))
        meta = {"source": source.name, "raw_head": "[1,144,8400] 64 DFL + 80 class logits", "opset": str(opset)}
        if source.structure_only:
            meta["structure_only"] = "true"
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.checker.check_model(proto)
        onnx.save(proto, str(part))
        validate_raw_onnx(part)
    return out
