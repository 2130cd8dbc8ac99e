import contextlib
import io
import json

import numpy as np
import pytest

from lowbit_helpers.data import open_coco
from lowbit_helpers.evaluate import (
    _resample,
    bootstrap_difference,
    bootstrap_map,
    evaluate_coco,
)  # fmt: skip

from .conftest import VAL100


def gt_as_detections(subset, score=1.0, jitter=0.0, seed=0):
    rng = np.random.default_rng(seed)
    dets = []
    for ann in subset.coco.loadAnns(subset.coco.getAnnIds(imgIds=subset.ids)):
        x, y, w, h = ann["bbox"]
        dx = rng.normal(0, jitter * max(w, 1), 2) if jitter else (0, 0)
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                     "bbox": [x + dx[0], y + dx[1], w, h], "score": score if not jitter else float(rng.random())})  # fmt: skip
    return dets


@pytest.fixture(scope="module")
def val100(coco_root):
    return open_coco(coco_root, VAL100, "val100")


def test_ground_truth_scores_perfectly(val100):
    ev = evaluate_coco(val100, gt_as_detections(val100))
    assert ev.metrics["mAP_50_95"] == pytest.approx(1.0)
    assert ev.metrics["mAP_50"] == pytest.approx(1.0)
    assert ev.metrics["num_images"] == 100
    present = {val100.coco.cats[a["category_id"]]["name"] for a in val100.coco.loadAnns(val100.coco.getAnnIds())}
    assert all(ev.per_class[n] == pytest.approx(1.0) for n in present)


def test_no_detections_is_zero(val100):
    ev = evaluate_coco(val100, [])
    assert ev.metrics["mAP_50_95"] == 0.0 and ev.metrics["num_detections"] == 0


def test_bootstrap_accumulation_reproduces_pycocotools(val100):
    ev = evaluate_coco(val100, gt_as_detections(val100, jitter=0.08))
    table = ev.bootstrap_table()
    assert 0.2 < ev.metrics["mAP_50_95"] < 0.95
    assert table.map_50_95(np.ones(100)) == pytest.approx(ev.metrics["mAP_50_95"], abs=1e-12)


def test_weighted_resample_equals_literal_duplication(val100):
    """Counting an image twice must equal pycocotools on a dataset where it appears twice."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = gt_as_detections(val100, jitter=0.08)
    table = evaluate_coco(val100, dets).bootstrap_table()
    w = _resample(np.random.default_rng(3), 100)
    gt = json.loads(val100.ann_file.read_text())
    new = {"images": [], "annotations": [], "categories": gt["categories"]}
    new_dets, next_id, ann_id = [], 1, 1
    images = {im["id"]: im for im in gt["images"]}
    for i, img_id in enumerate(val100.ids):
        for _ in range(int(w[i])):
            new["images"].append({**images[img_id], "id": next_id})
            for a in val100.coco.imgToAnns[img_id]:
                new["annotations"].append({**a, "id": ann_id, "image_id": next_id})
                ann_id += 1
            new_dets += [{**d, "image_id": next_id} for d in dets if d["image_id"] == img_id]
            next_id += 1
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = new
        coco.createIndex()
        e = COCOeval(coco, coco.loadRes(new_dets), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    assert table.map_50_95(w) == pytest.approx(e.stats[0], abs=1e-6)


def test_intervals(val100):
    a = evaluate_coco(val100, gt_as_detections(val100, jitter=0.08, seed=0))
    b = evaluate_coco(val100, gt_as_detections(val100, jitter=0.12, seed=1))
    ci = bootstrap_map(a, n=100, seed=0)
    assert ci["lo"] < a.metrics["mAP_50_95"] < ci["hi"] and ci["se"] > 0
    same = bootstrap_difference(a, a, n=50)
    assert same["delta"] == 0 and same["lo"] == 0 and same["hi"] == 0 and not same["significant"]
    diff = bootstrap_difference(a, b, n=100)
    assert diff["delta"] > 0 and diff["lo"] < diff["delta"] < diff["hi"]
    assert bootstrap_map(a, n=100, seed=0) == ci  # seeded: reproducible


def test_parallel_evaluations_equal_one_process(val100):
    """The scoring pool (runtime.threads spawned processes) returns what one process computes."""
    from types import SimpleNamespace

    from lowbit_helpers.steps.splits import evaluation, evaluations

    run = SimpleNamespace(cfg=SimpleNamespace(evaluation=SimpleNamespace(bootstrap=50, seed=3), runtime=SimpleNamespace(threads=2)))
    jobs = [(gt_as_detections(val100, jitter=j, seed=i), val100) for i, j in enumerate((0.05, 0.1, 0.2))]
    got = evaluations(run, jobs)
    for (dets, sub), (ev, samples) in zip(jobs, got):
        want_ev, want_samples = evaluation(run, dets, sub)
        assert json.dumps([ev.metrics, ev.per_class]) == json.dumps([want_ev.metrics, want_ev.per_class])  # NaN: classes absent
        assert np.array_equal(samples, want_samples)
    assert len({ev.metrics["mAP_50_95"] for ev, _ in got}) == 3  # three different inputs, in order


def _reference_map(table, weights):
    """pycocotools' accumulate for one weighting, category by category as pycocotools writes it
    (the oracle of the vectorised form in evaluate._MatchTable)."""
    values = []
    for img_idx, tps, fps, gt_count in (e for e in table.per_cat if e is not None):
        npig = float(weights @ gt_count)
        if npig == 0:
            continue
        w = weights[img_idx]
        keep = w > 0
        tp, fp = np.cumsum(tps[:, keep] * w[keep], axis=1), np.cumsum(fps[:, keep] * w[keep], axis=1)
        q = np.zeros((tp.shape[0], len(table.rec_thrs)))
        if tp.shape[1]:
            rc, pr = tp / npig, tp / (fp + tp + np.spacing(1))
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
            for t in range(tp.shape[0]):
                inds = np.searchsorted(rc[t], table.rec_thrs, side="left")
                q[t, inds < pr.shape[1]] = pr[t, inds[inds < pr.shape[1]]]
        values.append(q.ravel())
    return float(np.mean(np.concatenate(values))) if values else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_accumulate_equals_pycocotools_loop(seed):
    """Random match tables (ignored detections, categories without detections or ground truth,
    images dropped and repeated by the resampling): the same mAP as the plain loop."""
    from lowbit_helpers.evaluate import _MatchTable

    rng = np.random.default_rng(seed)
    n_img, per_cat = 25, []
    for k in range(81 if seed == 2 else 9):  # COCO's 80 categories: the largest row shift
        d = int(rng.integers(0, 80)) if k != 3 else 0
        matched = rng.random((10, d)) < np.linspace(0.7, 0.1, 10)[:, None]
        ignored = rng.random((10, d)) < (0.05 if k % 2 else 0.0)
        gt = rng.integers(0, 3, n_img).astype(float) if k != 5 else np.zeros(n_img)
        per_cat.append((rng.integers(0, n_img, d), matched & ~ignored, ~matched & ~ignored, gt) if k else None)
    table = _MatchTable(per_cat, n_img, np.linspace(0, 1, 101))
    rows = [_resample(rng, n_img) for _ in range(30)] + [np.ones(n_img), np.zeros(n_img)]
    got = np.array([table.map_50_95(w) for w in rows])
    want = np.array([_reference_map(table, w) for w in rows])
    assert np.abs(got - want).max() < 1e-12
    assert len(set(np.round(want, 6))) > 10  # the weightings differ: the equality is not trivial


def test_the_all_area_evaluation_scores_the_same(val100):
    """Scoring evaluates the area range "all" only: mAP50-95, mAP50, mAP75, AR, per-class AP and the
    bootstrap's resamples are pycocotools' full evaluation's, and the small / medium / large split is None."""
    from lowbit_helpers.evaluate import AREA_METRICS, bootstrap_samples

    dets = gt_as_detections(val100, jitter=0.08)
    full, fast = evaluate_coco(val100, dets), evaluate_coco(val100, dets, areas=False)
    assert len(fast._eval.params.areaRng) == 1
    for k, v in full.metrics.items():
        assert fast.metrics[k] is None if k in AREA_METRICS else fast.metrics[k] == v, k
    assert 0 < full.metrics["mAP_small"] < 1 and 0 < full.metrics["mAP_50_95"] < 0.95  # the full one has the split
    assert json.dumps(fast.per_class) == json.dumps(full.per_class)  # NaN where a class is absent
    assert np.array_equal(bootstrap_samples(fast, 50, 1), bootstrap_samples(full, 50, 1))
    assert evaluate_coco(val100, [], areas=False).metrics["mAP_small"] is None
