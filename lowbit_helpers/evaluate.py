"""COCO mAP through pycocotools, per-class AP, and bootstrap intervals over images.

Every model goes through :func:`predict_models` (same images, letterbox, decode, thresholds)
and :func:`coco_metrics`. The bootstrap reuses pycocotools' own per-image matching
(``COCOeval.evaluate``) and only re-runs the accumulation step with images resampled; with
every image counted once it reproduces pycocotools' mAP exactly (a unit test holds it to that).
Scoring uses pycocotools' default parameters (maxDets 100 per image for the AP), as
Ultralytics and the published YOLOv10 numbers do; decode may keep up to ``max_det`` boxes.
pycocotools has no resampling, so that accumulation is written here, following its
``accumulate`` line by line.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from .data import CocoSubset, preprocess
from .decode import decode
from .errors import LowbitError
from .runtime import engine_session, run_head
from .schema import DecodeCfg

METRIC_NAMES = ["mAP_50_95", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large",
                "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large"]  # fmt: skip


def predict_onnx(session, subset: CocoSubset, decode_cfg: DecodeCfg, progress: bool = False) -> list[dict]:
    """Detections for every image of ``subset`` in COCO results format (bbox xywh, original pixels)."""
    return predict_onnx_multi(session, subset, [decode_cfg], progress)[0]


def predict_onnx_multi(session, subset: CocoSubset, decode_cfgs: list[DecodeCfg], progress: bool = False) -> list[list[dict]]:
    """One forward pass per image, decoded once per config (e.g. NMS and top-k side by side)."""

    cats = subset.category_ids
    dets: list[list[dict]] = [[] for _ in decode_cfgs]
    for image_id in tqdm(subset.ids, desc="predict", disable=not progress, leave=False):
        tensor, lb = preprocess(subset.image_path(image_id))
        raw = run_head(session, tensor)
        for out, cfg in zip(dets, decode_cfgs):
            d = decode(raw, cfg)
            out.extend(to_coco(image_id, lb.to_original(d.boxes), d.scores, d.classes, cats))
    return dets


def predict_sessions(sessions: dict, subset: CocoSubset, decode_cfg: DecodeCfg) -> tuple[dict, dict]:
    """Detections of several sessions (e.g. one model under several engines) on ``subset``:
    each image is read and letterboxed once; returns ({key: detections}, {key: seconds spent
    in that session's forward pass and decode})."""

    per_image, seconds = _predict_items(sessions, [(i, subset.image_path(i)) for i in subset.ids], subset.category_ids,
                                        decode_cfg)  # fmt: skip
    return {k: [d for i in subset.ids for d in per_image[i][k]] for k in sessions}, seconds


def predict_models(models: dict, subset: CocoSubset, decode_cfg: DecodeCfg, providers: list[str] | None = None,
                   workers: int = 2, min_images: int = 16) -> tuple[dict, dict]:
    """:func:`predict_sessions` for model files: ``models`` maps a key to ``(path, engine)`` (an
    engine of :data:`.runtime.ENGINES`). ``workers`` processes with one inference thread each share
    the images (worker k takes every ``workers``-th image); the detections come back in image
    order, equal to one process's with one-thread sessions (a unit test holds them to that). A worker
    gets at least ``min_images`` images: below that, starting a process costs more than it saves, and
    the images are predicted here, with the same one-thread sessions.

    Evaluation is throughput, not latency: on two cores, two one-thread sessions predict about
    1.4× the images per second of one two-thread session (ORT's intra-op threads scale 1.5× on
    YOLOv10n's INT8 and 4-bit files). The latency bench keeps its ``runtime.threads`` sessions.
    """
    if not models:
        return {}, {}
    ids = list(subset.ids)
    items = [(i, str(subset.image_path(i))) for i in ids]
    cats = subset.category_ids
    models = {k: (str(p), e) for k, (p, e) in models.items()}
    n = max(1, min(workers, len(items) // max(1, min_images)))
    if n == 1:
        parts = [_predict_part(models, items, cats, decode_cfg, providers)]
    else:
        parts = in_workers(_predict_part, [(models, items[k::n], cats, decode_cfg, providers) for k in range(n)], n,
                           f"a prediction worker died on {subset.name}")  # fmt: skip
    per_image = {}
    for part_dets, _ in parts:
        per_image.update(part_dets)
    dets = {k: [d for i in ids for d in per_image[i][k]] for k in models}
    seconds = {k: sum(sec[k] for _, sec in parts) / n for k in models}  # each worker's own time, shared out
    return dets, seconds


_POOL: dict = {}  # workers -> a spawned pool kept for the process's life (its workers keep their sessions)
_SESSIONS: dict = {}  # in a worker: (path, engine, mtime, size, providers) -> a one-thread session


def in_workers(fn, jobs: list[tuple], workers: int, what: str = "a worker died") -> list:
    """``fn(*job)`` for each job in a pool of ``workers`` spawned processes, results in job order.

    One pool per size, kept for the process's life and shared by the predictions and the COCO
    scoring (starting a pool costs seconds, and a notebook scores many times); its workers keep
    their ORT sessions between calls (:func:`_worker_session`)."""
    if workers not in _POOL:
        _POOL[workers] = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    futures = [_POOL[workers].submit(fn, *job) for job in jobs]
    try:
        return [f.result() for f in futures]
    except BrokenProcessPool:
        _POOL.pop(workers, None)  # the next call starts a fresh pool
        raise LowbitError(f"{what} (killed, or out of memory)",
                          "rerun: finished stages are kept; lower runtime.threads if memory is short") from None  # fmt: skip
    finally:
        for f in futures:  # after a failure, nothing left queued ahead of the next call
            f.cancel()


def _worker_session(path: str, engine: str, providers):
    files = [Path(path)] + [p for p in [Path(path).with_suffix(".bin")] if p.is_file()]  # an OpenVINO IR's weights too
    key = (path, engine, tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files), tuple(providers or ()))
    if key not in _SESSIONS:
        while len(_SESSIONS) >= 4:  # bounds a worker's memory over a notebook's many models
            _SESSIONS.pop(next(iter(_SESSIONS)))
        _SESSIONS[key] = engine_session(path, engine, providers, threads=1)
    return _SESSIONS[key]


def _predict_part(models: dict, items: list, cats: list[int], decode_cfg: DecodeCfg, providers) -> tuple[dict, dict]:
    return _predict_items({k: _worker_session(p, e, providers) for k, (p, e) in models.items()}, items, cats, decode_cfg)


def _predict_items(sessions: dict, items: list, cats: list[int], decode_cfg: DecodeCfg) -> tuple[dict, dict]:
    """{image id: {key: detections}} of each session on (image id, path) items, each image read and
    letterboxed once, and the seconds each session's forward pass and decode took."""
    out: dict = {}
    seconds = {k: 0.0 for k in sessions}
    for image_id, path in items:
        tensor, lb = preprocess(path)
        out[image_id] = {}
        for k, session in sessions.items():
            t0 = time.perf_counter()
            d = decode(run_head(session, tensor), decode_cfg)
            out[image_id][k] = to_coco(image_id, lb.to_original(d.boxes), d.scores, d.classes, cats)
            seconds[k] += time.perf_counter() - t0
    return out, seconds


def to_coco(image_id: int, boxes_xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray, cats: list[int]) -> list[dict]:
    out = []
    for (x1, y1, x2, y2), s, c in zip(np.asarray(boxes_xyxy, float), scores, classes):
        out.append({
            "image_id": int(image_id),
            "category_id": int(cats[int(c)]),
            "bbox": [round(float(x1), 3), round(float(y1), 3), round(float(x2 - x1), 3), round(float(y2 - y1), 3)],
            "score": round(float(s), 5),
        })  # fmt: skip
    return out


@dataclass
class CocoEvaluation:
    """A finished pycocotools evaluation plus what the bootstrap needs."""

    metrics: dict
    per_class: dict
    _eval: object  # COCOeval after evaluate() and accumulate()

    def bootstrap_table(self) -> "_MatchTable":
        if self._eval is None:
            if self.metrics.get("num_detections"):  # scored in a worker: its resamples came back with it
                raise ValueError("this evaluation kept no pycocotools state to resample; use the samples computed with it")
            return _MatchTable([], self.metrics["num_images"], np.zeros(0))  # no detections: every resample scores 0
        return _MatchTable.from_cocoeval(self._eval)


AREA_METRICS = ("mAP_small", "mAP_medium", "mAP_large", "AR_small", "AR_medium", "AR_large")


def evaluate_coco(subset: CocoSubset, detections: list[dict], areas: bool = True) -> CocoEvaluation:
    """pycocotools' bbox evaluation of ``detections`` on ``subset``'s images.

    ``areas`` False evaluates the area range "all" only (pycocotools matches each area range on its
    own, so mAP50-95, mAP50, mAP75, AR, per-class AP and the bootstrap's matches are the same numbers):
    a third of the time, for the many scorings whose readers never show the small / medium / large
    split, which is then None."""
    coco = subset.coco
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    if not detections:
        metrics = {k: None if not areas and k in AREA_METRICS else 0.0 for k in METRIC_NAMES}
        metrics.update(num_images=len(subset), num_detections=0)
        return CocoEvaluation(metrics, {names[c]: 0.0 for c in sorted(names)}, None)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(detections)
        ev = COCOeval(coco, dt, "bbox")
        ev.params.imgIds = list(subset.ids)
        if not areas:
            ev.params.areaRng, ev.params.areaRngLbl = ev.params.areaRng[:1], ev.params.areaRngLbl[:1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = {k: None if not areas and k in AREA_METRICS else float(v) for k, v in zip(METRIC_NAMES, ev.stats)}
    metrics.update(num_images=len(subset), num_detections=len(detections), max_dets=ev.params.maxDets[-1])
    per_class = {}
    prec = ev.eval["precision"][:, :, :, 0, -1]  # T x R x K, area all, largest maxDets
    for k, cat_id in enumerate(ev.params.catIds):
        p = prec[:, :, k]
        per_class[names[cat_id]] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    return CocoEvaluation(metrics, per_class, ev)


class _MatchTable:
    """pycocotools' per-image matches (area 'all', largest maxDets), flattened per category."""

    def __init__(self, per_cat: list[tuple], num_images: int, rec_thrs: np.ndarray):
        self.per_cat = per_cat  # (image index per det, tps (T,D), fps (T,D), gt count per image)
        self.num_images = num_images
        self.rec_thrs = rec_thrs

    @classmethod
    def from_cocoeval(cls, ev) -> "_MatchTable":
        p = ev.params
        n_img, n_area = len(p.imgIds), len(p.areaRng)
        max_det = p.maxDets[-1]
        per_cat = []
        for k in range(len(p.catIds)):
            img_idx, scores, dtm, dtig = [], [], [], []
            gt_count = np.zeros(n_img)
            for i in range(n_img):
                e = ev.evalImgs[k * n_area * n_img + i]  # area index 0 = 'all'
                if e is None:
                    continue
                d = len(e["dtScores"][:max_det])
                img_idx.append(np.full(d, i))
                scores.append(np.asarray(e["dtScores"][:max_det]))
                dtm.append(e["dtMatches"][:, :max_det])
                dtig.append(e["dtIgnore"][:, :max_det])
                gt_count[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
            if not img_idx:
                per_cat.append(None)
                continue
            scores = np.concatenate(scores)
            order = np.argsort(-scores, kind="mergesort")  # pycocotools' order
            dtm = np.concatenate(dtm, 1)[:, order]
            dtig = np.concatenate(dtig, 1)[:, order].astype(bool)
            tps = np.logical_and(dtm, ~dtig)
            fps = np.logical_and(~dtm.astype(bool), ~dtig)
            per_cat.append((np.concatenate(img_idx)[order], tps, fps, gt_count))
        return cls(per_cat, n_img, np.asarray(p.recThrs))

    def map_50_95(self, weights: np.ndarray) -> float:
        """mAP50-95 with image i counted ``weights[i]`` times (all ones = pycocotools' value).

        pycocotools' accumulate (weighted TP / FP counts, the precision envelope, the precision
        at each recall threshold), computed on the true positives alone, all categories and IoU
        thresholds at once (pycocotools has no weighted form; a bootstrap calls this a thousand
        times per evaluation). Why that is exact:
        * recall rises only at a true positive of weight > 0, so the first detection whose recall
          reaches a threshold > 0 is one of them; for the threshold 0 it is the category's first;
        * precision rises only at those too, so the envelope (the best precision at or after a
          detection) at one of them is the best precision over them from there on;
        * at a true positive, cumulative FP weight = cumulative weight of the detections up to it
          - their ignored weight - cumulative TP weight, the same sums pycocotools forms.

        Weights are whole counts (a resample's), so the per-row sums taken as differences of one
        running sum are the integers pycocotools adds. The per-(threshold, category) running
        maximum is one ``maximum.accumulate`` over rows shifted apart by a constant, which rounds
        each precision by at most half an ulp of 2 x thresholds x categories (about 1e-13 for
        COCO's 10 x 80); the tests hold it to 1e-12 of the plain loop.
        """
        w = np.asarray(weights, np.float64)
        f = self._flat()
        if f is None:
            return 0.0
        t_n, s_n, r_n = f["T"], f["S"], len(self.rec_thrs)
        npig = f["gt"] @ w  # (S,) ground truths per category in this weighting
        wd = w[f["img"]]  # weight of each detection
        cumw = np.concatenate([[0.0], np.cumsum(wd)])  # cumw[i]: weight of detections [0, i)
        seg_cumw = cumw[1:] - cumw[f["seg_start"]][f["seg"]]  # up to and including each, within its category
        pos, row = f["tp_pos"], f["tp_row"]
        wt = wd[pos]
        keep = wt > 0
        pos, row, wt = pos[keep], row[keep], wt[keep]
        row_len = np.bincount(row, minlength=t_n * s_n)
        row_start = np.concatenate([[0], np.cumsum(row_len)[:-1]])
        cs = np.concatenate([[0.0], np.cumsum(wt)])
        tp = cs[1:] - cs[row_start][row]
        ig = self._ignored_weight(f, wd, pos, row)
        seg = f["seg"][pos]
        fp = seg_cumw[pos] - ig - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            rc = tp / npig[seg]
        pr = tp / (fp + tp + np.spacing(1))
        shift = 2.0 * (t_n * s_n - row)  # rows apart, later rows lower: a running maximum stays in its row
        env = np.maximum.accumulate((pr + shift)[::-1])[::-1] - shift
        bins = np.searchsorted(self.rec_thrs, rc, side="right")  # thresholds at or below each recall
        hist = np.bincount(row * (r_n + 1) + bins, minlength=t_n * s_n * (r_n + 1)).reshape(t_n * s_n, r_n + 1)
        before = np.cumsum(hist, axis=1)[:, :r_n]  # (rows, R): true positives with recall < threshold k
        before[:, 0] = 0  # threshold 0: the category's first detection (the best precision of all)
        valid = before < row_len[:, None]
        q = np.zeros(valid.shape)
        if env.size:
            q[valid] = env[(row_start[:, None] + before)[valid]]
        ap = q.reshape(t_n, s_n, r_n).mean(axis=(0, 2))  # per category
        counted = npig > 0  # pycocotools leaves a category without ground truth at -1 and out of the mean
        return float(ap[counted].mean()) if counted.any() else 0.0

    def _flat(self) -> dict | None:
        """The per-category tables concatenated once: detection image, category, true-positive
        and ignored positions per IoU threshold (row = threshold x categories + category)."""
        if getattr(self, "_flat_cache", None) is None:
            cats = [e for e in self.per_cat if e is not None]
            if not cats:
                return None
            lens = np.array([e[0].size for e in cats])
            t_n, s_n = cats[0][1].shape[0], len(cats)
            seg = np.repeat(np.arange(s_n), lens)
            tps = np.concatenate([e[1] for e in cats], axis=1)
            ign = ~np.concatenate([e[1] | e[2] for e in cats], axis=1)  # neither TP nor FP: ignored
            t_tp, p_tp = np.nonzero(tps)  # row-major: by threshold, then position
            t_ig, p_ig = np.nonzero(ign)
            self._flat_cache = {"T": t_n, "S": s_n, "img": np.concatenate([e[0] for e in cats]), "seg": seg,
                                "seg_start": np.concatenate([[0], np.cumsum(lens)[:-1]]),
                                "gt": np.stack([e[3] for e in cats]), "tp_pos": p_tp, "tp_row": t_tp * s_n + seg[p_tp],
                                "ig_pos": p_ig, "ig_row": t_ig * s_n + seg[p_ig]}  # fmt: skip
        return self._flat_cache

    @staticmethod
    def _ignored_weight(f: dict, wd: np.ndarray, pos: np.ndarray, row: np.ndarray) -> np.ndarray:
        """Ignored detections' weight at or before each true positive, in its row (none, usually)."""
        if not f["ig_pos"].size:
            return np.zeros(pos.size)
        key_ig = f["ig_row"] * (wd.size + 1) + f["ig_pos"]  # sorted: row-major
        cs = np.concatenate([[0.0], np.cumsum(wd[f["ig_pos"]])])
        first = np.searchsorted(key_ig, row * (wd.size + 1), side="left")
        upto = np.searchsorted(key_ig, row * (wd.size + 1) + pos, side="right")
        return cs[upto] - cs[first]


def bootstrap_map(ev: CocoEvaluation, n: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Interval for mAP50-95 over images resampled with replacement (see :func:`_basic_interval`)."""
    table = ev.bootstrap_table()
    rng = np.random.default_rng(seed)
    samples = np.array([table.map_50_95(_resample(rng, table.num_images)) for _ in range(n)])
    point = ev.metrics["mAP_50_95"]
    return {"mAP_50_95": point, **_basic_interval(point, samples, confidence)}


def bootstrap_difference(
    a: CocoEvaluation, b: CocoEvaluation, n: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """Interval for mAP50-95(a) - mAP50-95(b) on the same images, resampled in pairs."""
    return difference_interval(a, bootstrap_samples(a, n, seed), b, bootstrap_samples(b, n, seed), confidence)


def bootstrap_samples(ev: CocoEvaluation, n: int = 1000, seed: int = 0) -> np.ndarray:
    """mAP50-95 of ``ev`` on ``n`` resamples of its images, drawn from ``seed``.

    Every evaluation of the same images draws the same resamples for the same seed, so the
    samples of two models subtract into the paired difference; a reference (FP32) evaluated
    against many candidates can be resampled once.
    """
    table = ev.bootstrap_table()
    rng = np.random.default_rng(seed)
    return np.array([table.map_50_95(_resample(rng, table.num_images)) for _ in range(n)])


def difference_interval(a: CocoEvaluation, samples_a: np.ndarray, b: CocoEvaluation, samples_b: np.ndarray,
                        confidence: float = 0.95) -> dict:  # fmt: skip
    """The paired interval of mAP50-95(a) - mAP50-95(b) from their :func:`bootstrap_samples`."""
    if a.metrics["num_images"] != b.metrics["num_images"] or samples_a.shape != samples_b.shape:
        raise ValueError("both evaluations must cover the same images with the same resamples")
    delta = a.metrics["mAP_50_95"] - b.metrics["mAP_50_95"]
    out = {"delta": float(delta), **_basic_interval(delta, samples_a - samples_b, confidence)}
    out["significant"] = bool(out["lo"] > 0 or out["hi"] < 0)
    return out


def _basic_interval(point: float, samples: np.ndarray, confidence: float) -> dict:
    """The basic (reverse-percentile) bootstrap interval, [2*point - q_hi, 2*point - q_lo].

    Resampled mAP runs high: duplicated images sharpen the precision envelope, and on val500
    the resampled YOLOv10n mAP50-95 averages about one point above the estimate. Plain
    percentiles would inherit that shift; the basic interval reflects it back. ``bias`` and
    ``se`` of the resamples are reported beside it.
    """
    q_lo, q_hi = np.percentile(samples, [50 * (1 - confidence), 50 * (1 + confidence)])
    return {
        "lo": float(2 * point - q_hi),
        "hi": float(2 * point - q_lo),
        "se": float(samples.std(ddof=1)) if samples.size > 1 else 0.0,
        "bias": float(samples.mean() - point),
        "n": int(samples.size),
        "confidence": confidence,
        "method": "basic bootstrap over images",
    }


def _resample(rng: np.random.Generator, n_images: int) -> np.ndarray:
    return np.bincount(rng.integers(0, n_images, n_images), minlength=n_images).astype(np.float64)
