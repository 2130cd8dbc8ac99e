"""Which sensitivity metric predicts mAP: candidate metrics against the true COCO mAP of
single-layer perturbations.

Ground truth: the COCO mAP50-95 of the model with one Conv quantized (*alone*), or all Convs
but one (*kept*), with the 4-bit weights notebook 05 deploys (GPTQ, MSE clipping, blocks,
bias correction: :class:`.sweep.MethodPerturber`). It runs through the same cached
sub-graph machinery as the sweep (:func:`.sweep.run_perturbations`) on COCO images, each
output decoded and scored by pycocotools exactly as notebook 02 scores a whole model.

Candidates: every metric of :mod:`.metrics` on the sweep's calibration images, plus a
*label-free mAP*: each perturbed model's detections scored by pycocotools against FP32's own
detections (score >= ``PSEUDO_GT_SCORE``) as ground truth, on the same calibration images.
Agreement is Spearman's rank correlation over layers, with a percentile bootstrap interval
over layers (scipy has the statistic; the resampling is a few lines here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..data import preprocess
from ..decode import decode
from ..evaluate import to_coco
from .metrics import Accumulator, Reference

PSEUDO_GT_SCORE = 0.25  # FP32 detections at or above this score are the label-free ground truth
LABEL_FREE = "label_free_map"


class CocoImages:
    """COCO images as the sweep reads them: (letterboxed tensor [1, 3, 640, 640], (image id, letterbox))."""

    def __init__(self, subset):
        self.subset = subset

    def __len__(self) -> int:
        return len(self.subset.ids)

    def __getitem__(self, i: int):
        image_id = self.subset.ids[i]
        tensor, lb = preprocess(self.subset.image_path(image_id))
        return tensor, (image_id, lb)


class DetectionScorer:
    """Collects each perturbation's COCO detections (the ground truth's input)."""

    def __init__(self, subset, decode_cfg):
        self.cats, self.decode_cfg = subset.category_ids, decode_cfg

    def reference(self, ref, meta):
        return None

    def new(self) -> list:
        return []

    def add(self, state: list, ref, out: np.ndarray, meta) -> None:
        image_id, lb = meta
        d = decode(out, self.decode_cfg)
        state.extend(to_coco(image_id, lb.to_original(d.boxes), d.scores, d.classes, self.cats))

    def merge(self, a: list, b: list) -> list:
        return a + b


class CandidateScorer:
    """Every :mod:`.metrics` metric and the label-free detections of each perturbation."""

    def __init__(self, decode_cfg):
        self.decode_cfg = decode_cfg

    def reference(self, ref: np.ndarray, meta):
        d = decode(ref, self.decode_cfg)
        keep = d.scores >= PSEUDO_GT_SCORE
        return Reference(ref), (meta, d.boxes[keep], d.classes[keep])

    def new(self) -> dict:
        return {"acc": Accumulator(), "pairs": []}

    def add(self, state: dict, ref, out: np.ndarray, meta) -> None:
        state["acc"].add(ref[0], out)
        state["pairs"].append((ref[1], decode(out, self.decode_cfg)))

    def merge(self, a: dict, b: dict) -> dict:
        a["acc"].merge(b["acc"])
        a["pairs"] += b["pairs"]
        return a

    @staticmethod
    def result(state: dict) -> dict:
        return {**state["acc"].metrics(), LABEL_FREE: label_free_map(state["pairs"])}


def label_free_map(pairs: list) -> float:
    """mAP50-95 (pycocotools) of detections against pseudo ground truth.

    ``pairs``: per image ((index, gt boxes xyxy, gt classes), :class:`..decode.Detections`).
    """

    images, anns, dets = [], [], []
    for (idx, boxes, classes), d in pairs:
        images.append({"id": int(idx) + 1, "width": 640, "height": 640})
        for b, c in zip(boxes, classes):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": int(idx) + 1, "category_id": int(c) + 1,
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
        for b, s, c in zip(d.boxes, d.scores, d.classes):
            dets.append({"image_id": int(idx) + 1, "category_id": int(c) + 1, "score": float(s),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})  # fmt: skip
    if not anns:
        return float("nan")
    if not dets:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k + 1} for k in range(80)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata  # late: scipy.stats costs a second at import, only the statistics need it

    return rankdata(a, axis=-1)  # average ranks for ties, as Spearman's rho takes them


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=-1) / den, np.nan)


def rho(a, b) -> float:
    """Spearman's rho (scipy), NaN for fewer than three pairs."""

    from scipy.stats import spearmanr  # late: see _ranks

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def spearman(x, y, n: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Spearman's rho of paired values (scipy's statistic) with a percentile bootstrap interval
    over the pairs (all resamples ranked at once: the Pearson correlation of their ranks)."""

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": int(len(x))}
    from scipy.stats import spearmanr  # late: see _ranks

    rho = float(spearmanr(x, y).statistic)
    idx = np.random.default_rng(seed).integers(0, len(x), (n, len(x)))
    samples = _pearson_rows(_ranks(x[idx]), _ranks(y[idx]))
    samples = samples[np.isfinite(samples)]  # resamples with a constant series rank nothing
    if not samples.size:
        return {"rho": rho, "lo": float("nan"), "hi": float("nan"), "n": int(len(x))}
    lo, hi = np.percentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)])
    return {"rho": rho, "lo": float(lo), "hi": float(hi), "n": int(len(x)), "method": "percentile bootstrap over layers"}


def halves(subset, name: str) -> dict:
    """``subset`` in two halves of alternate ids, named ``{name}_a`` and ``{name}_b``."""

    return {f"{name}_{h}": dataclasses.replace(subset, ids=subset.ids[i::2], name=f"{subset.name}, half {h}")
            for i, h in enumerate("ab")}  # fmt: skip


def reliability(delta_a, delta_b, half_images: int, images: dict[str, int]) -> dict:
    """How far a ground truth of N images can rank layers at all, from its two halves.

    The split-half Spearman of the per-layer mAP deltas measured on two disjoint halves, stepped
    up to N images with the Spearman-Brown formula (``r_N = k r / (1 + (k - 1) r)``, ``k = N /
    half_images``), and the *ceiling* ``sqrt(r_N)``: the Spearman that even a metric ranking the
    layers exactly as their true effect would reach against that noisy ground truth (the
    attenuation bound). Spearman-Brown is derived for Pearson's reliability; on ranks it is an
    approximation, which is why the split-half interval is given with it.
    """
    half = spearman(delta_a, delta_b)
    r = half["rho"]
    splits = {}
    for part, n in images.items():
        k = n / half_images
        r_n = k * r / (1 + (k - 1) * r) if np.isfinite(r) and r > 0 else float("nan")
        splits[part] = {"images": int(n), "reliability": r_n, "ceiling": float(np.sqrt(r_n)) if r_n > 0 else float("nan")}
    return {"split_half": half, "half_images": int(half_images), "splits": splits}


def choose_layers(values: dict[str, dict[str, float]], total: int, top: int) -> list[str]:
    """The ``top`` most sensitive layers by each metric, then layers spread evenly over the first
    metric's ranking until ``total`` (at least the tops), in graph order.

    ``values``: {metric: {conv: value}}, higher = less sensitive for every metric.
    """
    metrics = list(values)
    convs = list(values[metrics[0]])
    chosen: set[str] = set()
    for m in metrics:
        chosen.update(sorted(convs, key=lambda c: values[m][c])[:top])
    rest = [c for c in sorted(convs, key=lambda c: values[metrics[0]][c]) if c not in chosen]
    need = min(max(0, total - len(chosen)), len(rest))
    if need:
        chosen.update(rest[int(i)] for i in np.linspace(0, len(rest) - 1, need).round())
    return [c for c in convs if c in chosen]
