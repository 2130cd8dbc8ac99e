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

from .config import DecodeCfg

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


def dfl_boxes(raw: np.ndarray, size: int = 640) -> np.ndarray:
    """(144, N) raw head -> (N, 4) xyxy boxes in input pixels via the DFL integral."""
    n = raw.shape[1]
    logits = raw[: 4 * REG_MAX].reshape(4, REG_MAX, n).astype(np.float32)
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    dist = np.einsum("sbn,b->sn", p, np.arange(REG_MAX, dtype=np.float32))  # (4, N): l, t, r, b
    pts, stride = anchors(size)
    if len(pts) != n:
        raise ValueError(f"raw head has {n} anchors; {size}x{size} with strides {STRIDES} gives {len(pts)}")
    x1y1 = pts - dist[:2].T
    x2y2 = pts + dist[2:].T
    return np.concatenate([x1y1, x2y2], 1) * stride[:, None]


def class_scores(raw: np.ndarray) -> np.ndarray:
    """(144, N) raw head -> (N, 80) sigmoid class scores."""
    logits = raw[4 * REG_MAX : 4 * REG_MAX + NUM_CLASSES].T.astype(np.float32)
    return expit(logits)


def decode(raw: np.ndarray, cfg: DecodeCfg, size: int = 640) -> Detections:
    """One image's raw head output (144, N) or (1, 144, N) -> detections."""
    raw = raw[0] if raw.ndim == 3 else raw
    scores = class_scores(raw)
    boxes = dfl_boxes(raw, size)
    if cfg.mode == "topk":
        return _topk(boxes, scores, cfg)
    return _nms(boxes, scores, cfg)


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, in descending order (stable for ties)."""
    if k < len(values):
        part = np.argpartition(-values, k - 1)[:k]
        return part[np.argsort(-values[part], kind="stable")]
    return np.argsort(-values, kind="stable")


def _topk(boxes: np.ndarray, scores: np.ndarray, cfg: DecodeCfg) -> Detections:
    k = min(cfg.max_det, len(scores))
    best_anchor = _top(scores.max(1), k)
    sub = scores[best_anchor]  # (k, 80)
    flat = _top(sub.ravel(), k)
    anchor = best_anchor[flat // NUM_CLASSES]
    cls = flat % NUM_CLASSES
    conf = sub.ravel()[flat]
    keep = conf > cfg.conf
    return Detections(boxes[anchor[keep]], conf[keep], cls[keep])


def _nms(boxes: np.ndarray, scores: np.ndarray, cfg: DecodeCfg) -> Detections:
    import torch
    from torchvision.ops import batched_nms

    if cfg.multi_label:
        anchor, cls = np.nonzero(scores > cfg.conf)
        conf = scores[anchor, cls]
    else:
        cls = scores.argmax(1)
        conf = scores[np.arange(len(scores)), cls]
        anchor = np.nonzero(conf > cfg.conf)[0]
        cls, conf = cls[anchor], conf[anchor]
    if len(conf) > cfg.pre_nms_topk:
        top = _top(conf, cfg.pre_nms_topk)
        anchor, cls, conf = anchor[top], cls[top], conf[top]
    if len(conf) == 0:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    b = torch.from_numpy(np.ascontiguousarray(boxes[anchor]))
    keep = batched_nms(b, torch.from_numpy(conf), torch.from_numpy(cls.astype(np.int64)), cfg.iou)
    keep = keep[: cfg.max_det].numpy()
    return Detections(boxes[anchor[keep]], conf[keep], cls[keep])
