"""How much a perturbed raw head [144, 8400] differs from FP32, measured the way the decoder reads it.

Raw-head SQNR weighs every logit alike, and the raw head is dominated by the large negative
class logits of background anchors (down to about -90) that the sigmoid flattens to zero and
the decoder throws away. The detection-aware metrics below look at what the decoder keeps:
* ``raw_sqnr``: SQNR of the raw head (all 144 x 8400 values) - the old metric;
* ``score_sqnr``: SQNR of the sigmoid class scores (all anchors and classes): background
  logits saturate and stop counting;
* ``fg_score_sqnr``: the same, on *foreground* anchors only: those whose best FP32 class
  score is at least ``FG_SCORE``;
* ``fg_box_sqnr``: on the same anchors, SQNR of the box decoded to pixels (DFL integral times
  stride): signal the FP32 left / top / right / bottom distances, noise the squared
  coordinate error;
* ``det_sqnr``: class scores and boxes of the foreground anchors together,
  ``-10 log10(NSR_score + NSR_box)`` (each noise-to-signal ratio summed over images first).

Every value is in dB, higher is less sensitive, and is a ratio of sums over images (so one
image with a tiny signal does not dominate). :class:`Accumulator` keeps the sums.
A label-free mAP (the perturbed model's detections scored against FP32's own) is computed
by :mod:`.validation`, where its cost (decode, NMS and pycocotools per
perturbation) is affordable.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit

from ..decode import NUM_CLASSES, REG_MAX, anchors
from ..decode import dfl_distances as in_strides
from ..runtime.inspect import sqnr_from_sums as sqnr_db

FG_SCORE = 0.1  # FP32 best class score from which an anchor counts as foreground
METRICS = ("raw_sqnr", "score_sqnr", "fg_score_sqnr", "fg_box_sqnr", "det_sqnr")
_SUMS = ("raw", "score", "fg_score", "fg_box")  # (signal, noise) pairs behind the metrics


def read_back(obj):
    """A sensitivity, validation or proxy record read from JSON, with its numbers as computed: JSON
    has neither infinity nor NaN, so both were written as null (:func:`..artifacts.write_json`).
    An SQNR (a key of :data:`METRICS`, or ending in ``sqnr`` / ``sqnr_db``) is null only without
    noise (``inf``: the layer does not reach that output, e.g. a class-branch Conv and the boxes;
    ``-inf``, a zero signal, does not occur on a detector's head); another number is null where it
    was undefined (NaN: a label-free mAP without pseudo ground truth)."""
    if isinstance(obj, dict):
        return {k: (_undefined(k) if v is None else read_back(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [read_back(v) for v in obj]
    return obj


def _undefined(key: str) -> float | None:
    if key in METRICS or key.endswith(("sqnr", "sqnr_db")):
        return math.inf
    return math.nan if key in NUMERIC_KEYS else None


# keys of the records read_back restores whose null is a NaN (not a missing value)
NUMERIC_KEYS = ("label_free_map", "spearman")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return expit(x)


def dfl_distances(raw: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(4, K) left / top / right / bottom distances in input pixels of anchors ``idx`` (float64)."""

    _, stride = anchors(640)
    return in_strides(raw, idx, np.float64) * stride[idx]


class Reference:
    """The FP32 quantities of one image, computed once and compared with every perturbation."""

    def __init__(self, ref: np.ndarray):
        raw = np.asarray(ref, np.float64).reshape(4 * REG_MAX + NUM_CLASSES, -1)
        self.raw = raw
        self.scores = _sigmoid(raw[4 * REG_MAX :])
        self.fg = np.flatnonzero(self.scores.max(axis=0) >= FG_SCORE)
        self.dist = dfl_distances(raw, self.fg)
        self.signal = {
            "raw": float(np.sum(raw**2)),
            "score": float(np.sum(self.scores**2)),
            "fg_score": float(np.sum(self.scores[:, self.fg] ** 2)),
            "fg_box": float(np.sum(self.dist**2)),
        }

    def noise(self, out: np.ndarray) -> dict[str, float]:
        raw = np.asarray(out, np.float64).reshape(self.raw.shape)
        scores = _sigmoid(raw[4 * REG_MAX :])
        return {
            "raw": float(np.sum((raw - self.raw) ** 2)),
            "score": float(np.sum((scores - self.scores) ** 2)),
            "fg_score": float(np.sum((scores[:, self.fg] - self.scores[:, self.fg]) ** 2)),
            "fg_box": float(np.sum((dfl_distances(raw, self.fg) - self.dist) ** 2)),
        }


class Accumulator:
    """Signal and noise sums of every metric for one perturbation, over images."""

    def __init__(self):
        self.signal = dict.fromkeys(_SUMS, 0.0)
        self.noise = dict.fromkeys(_SUMS, 0.0)
        self.snapshots: dict[int, dict[str, float]] = {}  # image count -> metrics after that many images

    def add(self, ref: Reference, out: np.ndarray) -> None:
        for k, v in ref.noise(out).items():
            self.noise[k] += v
            self.signal[k] += ref.signal[k]

    def merge(self, other: "Accumulator") -> None:
        for k in _SUMS:
            self.signal[k] += other.signal[k]
            self.noise[k] += other.noise[k]
        self.snapshots.update(other.snapshots)

    def metrics(self) -> dict[str, float]:
        s, n = self.signal, self.noise
        nsr = [n[k] / s[k] if s[k] else 0.0 for k in ("fg_score", "fg_box")]
        det = float("inf") if sum(nsr) == 0 else float(-10 * math.log10(sum(nsr)))
        return {"raw_sqnr": sqnr_db(s["raw"], n["raw"]), "score_sqnr": sqnr_db(s["score"], n["score"]),
                "fg_score_sqnr": sqnr_db(s["fg_score"], n["fg_score"]),
                "fg_box_sqnr": sqnr_db(s["fg_box"], n["fg_box"]), "det_sqnr": det}  # fmt: skip
