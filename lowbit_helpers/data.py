"""COCO subsets, image loading, the one letterbox, calibration batches.

Calibration and evaluation both go through :func:`preprocess`, so a quantized model sees
exactly the tensors it was calibrated on.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO

from .errors import LowbitError

PAD_VALUE = 114


# ---------------------------------------------------------------- images and letterbox
def load_image(path: str | Path) -> np.ndarray:
    """BGR uint8 HxWx3, or a LowbitError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"image not found: {path}", "check the COCO root / image list, or remove the entry")
    img = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise LowbitError(f"cannot decode image {path} (corrupt or not an image)", "replace the file or drop it from the list")
    return img


@dataclass(frozen=True)
class Letterbox:
    """How an image was mapped into the square input, and back."""

    orig_h: int
    orig_w: int
    gain_x: float
    gain_y: float
    pad_x: int
    pad_y: int

    def to_original(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Map boxes from network input pixels back to original image pixels (clipped)."""
        b = np.asarray(boxes_xyxy, dtype=np.float64).copy()
        b[:, [0, 2]] = ((b[:, [0, 2]] - self.pad_x) / self.gain_x).clip(0, self.orig_w)
        b[:, [1, 3]] = ((b[:, [1, 3]] - self.pad_y) / self.gain_y).clip(0, self.orig_h)
        return b

    def to_input(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Map boxes from original pixels to network input pixels (the forward direction)."""
        b = np.asarray(boxes_xyxy, dtype=np.float64).copy()
        b[:, [0, 2]] = b[:, [0, 2]] * self.gain_x + self.pad_x
        b[:, [1, 3]] = b[:, [1, 3]] * self.gain_y + self.pad_y
        return b


def letterbox(img_bgr: np.ndarray, size: int = 640) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio, pad to ``size`` x ``size`` with 114, centred.

    The arithmetic (rounding of the resized sides and of the split padding) is Ultralytics'
    ``LetterBox(auto=False, center=True)``, so results compare with ``yolo predict`` on a
    square input; a unit test holds the two to identical pixels.
    """
    h, w = img_bgr.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    if (new_w, new_h) != (w, h):
        img_bgr = cv2.resize(img_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    out = cv2.copyMakeBorder(img_bgr, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return out, Letterbox(h, w, new_w / w, new_h / h, left, top)


def to_tensor(img_bgr: np.ndarray) -> np.ndarray:
    """HxWx3 BGR uint8 -> 1x3xHxW float32 RGB in [0, 1]."""
    return np.ascontiguousarray(img_bgr[..., ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255.0


def preprocess(path: str | Path, size: int = 640) -> tuple[np.ndarray, Letterbox]:
    img, lb = letterbox(load_image(path), size)
    return to_tensor(img), lb


# ---------------------------------------------------------------- COCO subsets
@dataclass
class CocoSubset:
    """A COCO annotation file and the image ids to evaluate, with their files on disk."""

    root: Path
    ann_file: Path
    image_dir: Path
    ids: list[int]
    name: str

    @cached_property
    def coco(self):
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            return COCO(str(self.ann_file))

    @cached_property
    def category_ids(self) -> list[int]:
        """COCO category id of each of the model's 80 class indices (sorted category ids)."""
        ids = sorted(self.coco.getCatIds())
        if len(ids) != 80:
            raise LowbitError(
                f"{self.ann_file} has {len(ids)} categories; the model predicts the 80 COCO classes",
                "use a COCO instances annotation file with all 80 categories",
            )
        return ids

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def __len__(self) -> int:
        return len(self.ids)


def open_coco(root: str | Path, annotations: str, subset: str) -> CocoSubset:
    """``root`` in the standard layout; ``subset``: all | first:N | NAME (root/NAME_ids.txt) | ids.txt path."""

    root = Path(root)
    if not root.is_dir():
        raise LowbitError(
            f"COCO root not found: {root}",
            "set data.coco_root (or --coco-root) to a folder with annotations/ and images/val2017/ (or val2017/)",
        )
    ann = root / annotations if not Path(annotations).is_absolute() else Path(annotations)
    if not ann.is_file():
        found = sorted(p.name for p in (root / "annotations").glob("*.json")) if (root / "annotations").is_dir() else []
        raise LowbitError(
            f"annotation file not found: {ann} (present: {', '.join(found) or 'none'})",
            "set data.annotations (or --ann) to a COCO instances json, relative to the COCO root",
        )
    try:
        meta = json.loads(ann.read_text())
        images = {im["id"]: im["file_name"] for im in meta["images"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise LowbitError(f"{ann} is not a COCO instances json ({exc})", "point to a valid COCO annotation file") from None
    all_ids = sorted(images)
    ids = _select_ids(root, subset, all_ids)
    missing = [i for i in ids if i not in images]
    if missing:
        raise LowbitError(
            f"subset {subset!r}: {len(missing)} image ids are not in {ann.name} (e.g. {missing[:3]})",
            "use an annotation file that covers the subset (e.g. instances_val2017_val500.json)",
        )
    image_dir = _find_image_dir(root, ann, images[ids[0]] if ids else None)
    return CocoSubset(root=root, ann_file=ann, image_dir=image_dir, ids=ids, name=subset)


def _select_ids(root: Path, subset: str, all_ids: list[int]) -> list[int]:
    if subset == "all":
        ids = all_ids
    elif subset.startswith("first:"):
        try:
            n = int(subset.split(":", 1)[1])
        except ValueError:
            raise LowbitError(f"bad subset {subset!r}", "write first:N with an integer N, e.g. first:50") from None
        ids = all_ids[:n]
    else:
        path = root / f"{subset}_ids.txt"
        if not path.is_file():
            path = Path(subset)
        if not path.is_file():
            raise LowbitError(
                f"unknown subset {subset!r}: neither {root / (subset + '_ids.txt')} nor a file {subset} exists",
                "use all, first:N, a name with <coco_root>/<name>_ids.txt (val100, val500), or a path to an id list",
            )
        try:
            ids = [int(line) for line in path.read_text().split()]
        except ValueError:
            raise LowbitError(f"{path}: image id lists hold one integer id per line", "fix the id list") from None
    if not ids:
        raise LowbitError(f"subset {subset!r} selects no images", "choose a non-empty subset")
    return ids


def _find_image_dir(root: Path, ann: Path, first_file: str | None) -> Path:
    split = "val2017"
    for token in ann.stem.split("_"):
        if token.startswith(("val20", "train20", "test20")):
            split = token
    candidates = [root / "images" / split, root / split, root / "images", root]
    for c in candidates:
        if first_file and (c / first_file).is_file():
            return c
    raise LowbitError(
        f"images for {ann.name} not found under {root} (looked for {first_file} in "
        + ", ".join(str(c.relative_to(root.parent)) for c in candidates)
        + ")",
        "lay the COCO root out as images/val2017/*.jpg or val2017/*.jpg",
    )


# ---------------------------------------------------------------- calibration
def read_image_list(list_path: str | Path) -> list[Path]:
    """Image paths listed one per line, relative to the list's folder; every file must exist."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise LowbitError(f"calibration list not found: {list_path}", "set data.calib_list to a text file of image paths")
    lines = [ln.strip() for ln in list_path.read_text().splitlines()]
    paths = [list_path.parent / ln for ln in lines if ln and not ln.startswith("#")]
    if not paths:
        raise LowbitError(f"calibration list {list_path} is empty", "list at least one image path, one per line")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise LowbitError(
            f"{len(missing)} images in {list_path} do not exist (e.g. {missing[0]})",
            "paths in the list are relative to the list's folder; fix or remove them",
        )
    return paths


def calibration_tensor(paths: list[Path], count: int, size: int = 640) -> np.ndarray:
    """The first ``count`` listed images, letterboxed: (count, 3, size, size) float32."""
    if count > len(paths):
        raise LowbitError(
            f"{count} calibration images requested but the list has {len(paths)}",
            f"lower data.calib_images to at most {len(paths)} or list more images",
        )
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i, p in enumerate(paths[:count]):
        out[i] = preprocess(p, size)[0][0]
    return out
