"""Raw YOLOv10 head [144, 8400] -> detections in network-input pixels.

Channels 0-63: DFL logits, 4 sides (left, top, right, bottom) x 16 bins; 64-143: class
logits. The expected distance per side is the softmax-weighted bin index (the DFL
integral), in units of the level's stride, measured from the anchor at the cell centre.

Two selections:
* ``nms``: every (anchor, class) pair above ``conf`` (``multi_label``; else the best class
  per anchor), at most ``pre_nms_topk`` by score, class-aware NMS at ``iou``, ``max_det`` kept.
* ``topk``: YOLOv10's NMS-free one-to-one selection as its end-to-end export does it: the
  ``max_det`` anchors with the highest class score, then the ``max_det`` best (anchor, class)
  pairs among them, then ``conf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.special import expit

from .schema import DecodeCfg

REG_MAX = 16
NUM_CLASSES = 80
STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # (K, 4) xyxy, network-input pixels
    scores: np.ndarray  # (K,)
    classes: np.ndarray  # (K,) class index 0..79

    def __len__(self) -> int:
        return len(self.scores)


@lru_cache(maxsize=4)
def anchors(size: int = 640, strides: tuple[int, ...] = STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """Anchor centres (N, 2) in grid units of their level, and each anchor's stride (N,)."""
    points, stride_of = [], []
    for s in strides:
        n = size // s
        ys, xs = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32), indexing="ij")
        points.append(np.stack([xs.ravel(), ys.ravel()], 1) + 0.5)
        stride_of.append(np.full(n * n, s, dtype=np.float32))
    return np.concatenate(points), np.concatenate(stride_of)


def dfl_boxes(raw: np.ndarray, size: int = 640, idx: np.ndarray | None = None) -> np.ndarray:
    """(144, N) raw head -> (N, 4) xyxy boxes in input pixels via the DFL integral.

    With ``idx``, only those anchors are decoded (rows in ``idx`` order).
    """
    n = raw.shape[1]
    pts, stride = anchors(size)
    if len(pts) != n:
        raise ValueError(f"raw head has {n} anchors; {size}x{size} with strides {STRIDES} gives {len(pts)}")
    if idx is None:
        idx = np.arange(n)
    dist = dfl_distances(raw, idx)  # (4, K): l, t, r, b
    x1y1 = pts[idx] - dist[:2].T
    x2y2 = pts[idx] + dist[2:].T
    return np.concatenate([x1y1, x2y2], 1) * stride[idx, None]


def dfl_distances(raw: np.ndarray, idx: np.ndarray, dtype=np.float32) -> np.ndarray:
    """(4, K) left / top / right / bottom distances of anchors ``idx`` in units of their stride:
    the DFL integral (softmax-weighted bin index), computed in ``dtype``."""
    logits = raw[: 4 * REG_MAX, idx].reshape(4, REG_MAX, len(idx)).astype(dtype)
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return np.einsum("sbn,b->sn", p, np.arange(REG_MAX, dtype=dtype))


def class_logits(raw: np.ndarray) -> np.ndarray:
    """(144, N) raw head -> (N, 80) class logits (sigmoid is monotonic: select on logits)."""
    return raw[4 * REG_MAX : 4 * REG_MAX + NUM_CLASSES].T


def class_scores(raw: np.ndarray) -> np.ndarray:
    """(144, N) raw head -> (N, 80) sigmoid class scores."""
    return expit(class_logits(raw).astype(np.float32))


def decode(raw: np.ndarray, cfg: DecodeCfg, size: int = 640) -> Detections:
    """One image's raw head output (144, N) or (1, 144, N) -> detections.

    Scores and boxes are computed only for the anchors that can survive ``conf`` (or the
    top-k), which is what keeps decoding at a few milliseconds an image.
    """
    raw = raw[0] if raw.ndim == 3 else raw
    if cfg.mode == "topk":
        return _topk(raw, cfg, size)
    return _nms(raw, cfg, size)


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, in descending order (stable for ties)."""
    if k < len(values):
        part = np.argpartition(-values, k - 1)[:k]
        return part[np.argsort(-values[part], kind="stable")]
    return np.argsort(-values, kind="stable")


def _logit(p: float) -> float:
    return float("-inf") if p <= 0 else float("inf") if p >= 1 else float(np.log(p / (1 - p)))


def _empty() -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def _topk(raw: np.ndarray, cfg: DecodeCfg, size: int) -> Detections:
    logits = class_logits(raw)
    k = min(cfg.max_det, len(logits))
    best_anchor = _top(logits.max(1), k)
    sub = logits[best_anchor]  # (k, 80)
    flat = _top(sub.ravel(), k)
    anchor = best_anchor[flat // NUM_CLASSES]
    cls = flat % NUM_CLASSES
    conf = expit(sub.ravel()[flat].astype(np.float32))
    keep = conf > cfg.conf
    return Detections(dfl_boxes(raw, size, anchor[keep]), conf[keep], cls[keep])


def _nms(raw: np.ndarray, cfg: DecodeCfg, size: int) -> Detections:
    import torch  # late: torch costs seconds at import
    from torchvision.ops import batched_nms  # late: with torch

    logits = class_logits(raw)
    threshold = _logit(cfg.conf)
    if cfg.multi_label:
        anchor, cls = np.nonzero(logits > threshold)
    else:
        best = logits.argmax(1)
        anchor = np.nonzero(logits[np.arange(len(logits)), best] > threshold)[0]
        cls = best[anchor]
    conf = expit(logits[anchor, cls].astype(np.float32))
    keep = conf > cfg.conf  # exact comparison on the score itself
    anchor, cls, conf = anchor[keep], cls[keep], conf[keep]
    if len(conf) > cfg.pre_nms_topk:
        top = _top(conf, cfg.pre_nms_topk)
        anchor, cls, conf = anchor[top], cls[top], conf[top]
    if len(conf) == 0:
        return _empty()
    boxes = dfl_boxes(raw, size, anchor)
    keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(conf), torch.from_numpy(cls.astype(np.int64)), cfg.iou)
    keep = keep[: cfg.max_det].numpy()
    return Detections(boxes[keep], conf[keep], cls[keep])
