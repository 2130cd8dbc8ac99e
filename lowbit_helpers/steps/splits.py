"""Choose on one split, confirm on another: the evaluation splits and scoring notebooks 03 and 05 share.

A selection subset (val500) picks winners; the confirmation split is a larger subset minus the
selection images (val1300 minus val500: extra800, the 800 images nobody chose on). Each model is
predicted on the selection split; the ones a step confirms, on the confirmation split too; every
score carries the paired-bootstrap interval of its difference to FP32 on the same images.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from ..artifacts import atomic_path, read_json
from ..data import open_coco
from ..errors import LowbitError
from ..evaluate import CocoEvaluation, bootstrap_samples, difference_interval, evaluate_coco, in_workers
from ..rundir import RunDir, Stage
from . import baseline

FP32_SUBSET_DETECTIONS = "int8-coco/fp32_{subset}.detections.json"  # FP32 (ORT) detections, shared by 03 and 05


def open_splits(run: RunDir, select: str, confirm: str, ids_rel: str, section: str):
    """(selection subset, confirmation split = ``confirm`` minus ``select``, the whole ``confirm`` subset).

    The confirmation split's ids are written to ``ids_rel`` (a run-relative path) so that it
    opens like any subset; ``section`` names the params section in messages.
    """

    cfg = run.cfg
    sel = open_coco(cfg.data.coco_root, cfg.data.annotations, select)
    union = open_coco(cfg.data.coco_root, cfg.data.annotations, confirm)
    rest = [i for i in union.ids if i not in set(sel.ids)]
    if not rest:
        raise LowbitError(f"{section}.confirm_subset {confirm} has no images outside {select}",
                          "use a confirmation subset larger than the selection subset (e.g. val500 vs val100)")  # fmt: skip
    if any(i not in set(union.ids) for i in sel.ids):
        raise LowbitError(f"{section}.select_subset has images outside confirm_subset {confirm}",
                          "choose a selection subset inside the confirmation subset")  # fmt: skip
    ids_path = run.file(ids_rel)
    text = "\n".join(map(str, rest)) + "\n"
    if not ids_path.is_file() or ids_path.read_text() != text:
        with atomic_path(ids_path) as tmp:
            tmp.write_text(text)
    conf = open_coco(cfg.data.coco_root, cfg.data.annotations, str(ids_path))
    conf.name = named_subset(cfg.data.coco_root, rest) or f"{confirm} minus {select}"
    return sel, conf, union


def named_subset(coco_root, ids: list[int]) -> str | None:
    """The name of the COCO root's subset (``<name>_ids.txt``) with exactly these ids, if one has:
    val1300 minus val500 is ``extra800``."""
    want = sorted(ids)
    for path in sorted(Path(coco_root).glob("*_ids.txt")):
        try:
            if sorted(int(x) for x in path.read_text().split()) == want:
                return path.name.removesuffix("_ids.txt")
        except ValueError:
            continue
    return None


def only(dets: list[dict], ids) -> list[dict]:
    keep = set(ids)
    return [d for d in dets if d["image_id"] in keep]


def fp32_detections(run: RunDir, subset: str):
    """FP32 (ORT) detections on ``subset``, computed when missing or stale; the file's path."""
    cfg = run.cfg
    rel = FP32_SUBSET_DETECTIONS.format(subset=subset)
    params = {"subset": subset, "data": cfg.data.model_dump(), "decode": cfg.decode.model_dump()}

    def compute():
        no_bootstrap = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"bootstrap": 0})})
        return baseline.evaluate_model(run.artifact(baseline.MODEL), no_bootstrap, subset, progress=False)[1]

    run.stage(Stage(f"fp32:{subset}", params, [baseline.MODEL], [rel], record=None), compute, read=None)
    return run.path / rel


def fp32_reference(run: RunDir, subset: str) -> list[dict]:
    """FP32's detections on ``subset``, read once per process and file version."""
    p = fp32_detections(run, subset)
    st = p.stat()
    return _read_detections(str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read_detections(path: str, mtime_ns: int, size: int) -> list[dict]:
    return read_json(path)


_REFERENCE_CACHE: dict = {}  # (detections list, image ids, n, seed) -> the reference's evaluation and resamples


def _resampling(run: RunDir) -> tuple[int, int]:
    """(bootstrap resamples, seed) of every evaluation here (200 when the params say 0: the paired
    intervals still need resamples)."""
    e = run.cfg.evaluation
    return e.bootstrap or 200, e.seed


def evaluation(run: RunDir, dets: list[dict], subset):
    """A :class:`..evaluate.CocoEvaluation` of ``dets`` restricted to ``subset`` and its bootstrap resamples."""

    ev = evaluate_coco(subset, only(dets, subset.ids), areas=False)  # scoring reads no small / medium / large split
    return ev, bootstrap_samples(ev, *_resampling(run))


def _evaluate_job(subset, dets: list[dict], n: int, seed: int):
    """One :func:`evaluation` in a worker process: the evaluation without pycocotools' state (what
    scoring reads: metrics, per-class AP) and its resamples."""

    ev = evaluate_coco(subset, only(dets, subset.ids), areas=False)
    return CocoEvaluation(ev.metrics, ev.per_class, None), bootstrap_samples(ev, n, seed)


def evaluations(run: RunDir, jobs: list[tuple[list[dict], object]]) -> list[tuple]:
    """:func:`evaluation` of each (detections, subset), in ``runtime.threads`` spawned processes.

    pycocotools and the bootstrap are single-threaded: on two cores, two evaluations at a time
    halve notebook 03's and 05's scoring. The results equal :func:`evaluation`'s (same code, same
    seeds); only the pycocotools state that nothing downstream reads stays in the worker.
    """

    workers = max(1, run.cfg.runtime.threads)
    if min(len(jobs), workers) <= 1:
        return [evaluation(run, dets, sub) for dets, sub in jobs]
    args = [(replace(sub), dets, *_resampling(run)) for dets, sub in jobs]  # a copy without the loaded COCO
    return in_workers(_evaluate_job, args, workers, "a COCO scoring worker died")  # the predictions' pool


def _reference_key(run: RunDir, ref_dets: list[dict], subset) -> tuple:
    return (id(ref_dets), tuple(subset.ids), *_resampling(run))


def _reference(run: RunDir, ref_dets: list[dict], subset):
    key = _reference_key(run, ref_dets, subset)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = (ref_dets, *evaluation(run, ref_dets, subset))  # holding the list keeps its id unique
    return _REFERENCE_CACHE[key][1:]


def evaluations_and_references(run: RunDir, jobs: list[tuple[list[dict], object]], ref_dets: list[dict]) -> list[tuple]:
    """:func:`evaluations` of ``jobs``, with the reference's (FP32's) evaluation of each of their
    subsets not yet cached computed in the same pool and cached for :func:`score_evaluated`."""
    missing = {}
    for _, sub in jobs:
        key = _reference_key(run, ref_dets, sub)
        if key not in _REFERENCE_CACHE:
            missing.setdefault(key, sub)
    done = evaluations(run, [(ref_dets, sub) for sub in missing.values()] + list(jobs))
    for key, ev in zip(missing, done):
        _REFERENCE_CACHE[key] = (ref_dets, *ev)
    return done[len(missing):]


def score(run: RunDir, dets: list[dict], subset, fp32_dets: list[dict], against: dict | None = None) -> dict:
    """mAP of ``dets`` on ``subset`` with the paired-bootstrap difference to FP32 on the same images.

    FP32's evaluation and resamples are the same for every model (same images, same seed):
    computed once per process. The interval is exactly :func:`..evaluate.bootstrap_difference`'s.
    ``against`` ({label: detections}) adds the paired difference to each of those too (e.g. a
    model's kernel result against its exact arithmetic) as ``delta_vs[label]``.
    """
    labels = list(against or {})
    done = evaluations_and_references(run, [(dets, subset)] + [(against[k], subset) for k in labels], fp32_dets)
    return score_evaluated(run, done[0], subset, fp32_dets, dict(zip(labels, done[1:])) or None)


def score_evaluated(run: RunDir, evaluated: tuple, subset, fp32_dets: list[dict], against: dict | None = None) -> dict:
    """:func:`score` from evaluations already made (``(evaluation, resamples)`` pairs from :func:`evaluation`)."""

    conf = run.cfg.evaluation.confidence
    ref, ref_samples = _reference(run, fp32_dets, subset)
    ev, samples = evaluated
    out = {"subset": subset.name, "num_images": len(subset), "metrics": ev.metrics, "per_class_ap": ev.per_class,
           "fp32_mAP_50_95": ref.metrics["mAP_50_95"],
           "delta_vs_fp32": difference_interval(ev, samples, ref, ref_samples, conf)}  # fmt: skip
    if against:
        out["delta_vs"] = {label: difference_interval(ev, samples, o, o_samples, conf) for label, (o, o_samples) in against.items()}
    return out
