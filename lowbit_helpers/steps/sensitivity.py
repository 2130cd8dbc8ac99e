"""Notebook 04: per-layer sensitivity on the ONNX graph, the metric validation, the Torch proxy, schemes.

Stages (each cached in the run's manifest like the others):
* ``onnx_sweep``: every Conv x every format of ``params.sensitivity.formats`` x {alone, kept},
  every metric of :mod:`lowbit_helpers.sensitivity.metrics` on calibration images disjoint from
  evaluation (:mod:`lowbit_helpers.sensitivity.sweep`);
* ``validation``: the true COCO mAP of single-layer perturbations against each candidate
  metric (:mod:`lowbit_helpers.sensitivity.validation`), off by default (its committed
  result is shown instead; ``validate-sensitivity`` reruns it);
* ``torch_proxy``: the plan's Torch sweep (:mod:`lowbit_helpers.sensitivity.torch_proxy`), the verified name
  mapping, and the Spearman correlation with the ONNX ranking;
* ``schemes``: top-K and budgeted schemes (:mod:`lowbit_helpers.sensitivity.schemes`) in ``schemes/``,
  ranked by ``params.sensitivity.metric``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..artifacts import read_json, sha256_file
from ..data import open_coco
from ..errors import LowbitError
from ..evaluate import evaluate_coco
from ..export import load_torch_model
from ..formats import get_format
from ..graph import graph_info
from ..int8.calibration import load_calibration
from ..lowbit import parse_method
from ..lowbit.materialize import QUANT_VERSION
from ..lowbit.stats import collect_stats
from ..rundir import RunDir, Stage
from ..schema import Skipped
from ..sensitivity import validation as sv
from ..sensitivity.metrics import METRICS, read_back
from ..sensitivity.schemes import write_schemes
from ..sensitivity.sweep import (
    ALL,
    ArrayImages,
    MethodPerturber,
    activation_ranges,
    conv_nodes,
    conv_params,
    measure,
    run_perturbations,
)
from ..sensitivity.torch_proxy import map_convs, onnx_to_torch_name, torch_ranges, torch_sweep
from ..sensitivity.validation import rho, spearman
from . import baseline, splits

SENS = "sensitivity/sensitivity.json"
LAYERS = "sensitivity/layers.json"
VALIDATION = "sensitivity/validation.json"
VALIDATION_REPORT = "sensitivity_validation.json"  # the committed copy beside the report
FULL_RUN = "full"  # params/full.yaml's run id: the exhaustive study whose committed validation other runs show
VALIDATION_IDS = "sensitivity/validation_confirm_ids.txt"
VALIDATION_VERSION = 2  # 2: the confirmation split's two halves scored (ground-truth reliability)
SWEEP_VERSION = 2  # 2: detection-aware metrics, groups of sessions over worker processes
PROXY = "sensitivity/torch_proxy.json"
SCHEMES_DIR = "schemes"
SCHEMES_INDEX = f"{SCHEMES_DIR}/index.json"  # written by sensitivity.schemes.write_schemes


@dataclass
class SensitivityResult:
    """Notebook 04's result: the Conv table, the ONNX sweep (``sensitivity``: per format, each
    Conv alone and kept), the Torch proxy and the metric validation (each a :class:`Skipped`
    where it did not run), and the mixed schemes derived from the sweep."""

    layers: list[dict]
    sensitivity: dict
    proxy: dict | Skipped
    validation: dict | Skipped
    schemes: list[dict]


def _images(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    """(range images, sweep images): calibration images [0, R) and [R, R+N)."""

    s = run.cfg.sensitivity
    calib = load_calibration(run.artifact(baseline.CALIB))
    need = s.range_images + s.images
    if len(calib) < need:
        raise LowbitError(
            f"sensitivity needs {s.range_images} + {s.images} = {need} calibration images; the run has {len(calib)}",
            "raise data.calib_images (at most the list's length) or lower sensitivity.range_images / images",
        )
    return np.ascontiguousarray(calib[: s.range_images]), np.ascontiguousarray(calib[s.range_images : need])


def layer_table(run: RunDir) -> list[dict]:
    """One row per Conv in graph order: layer index, block type, section, torch module, params, MACs."""

    model_path = run.artifact(baseline.MODEL)

    def compute():
        model = onnx.load(str(model_path))
        params = conv_params(model)
        macs = graph_info(model_path)["conv_macs"]
        types, n_backbone, n_layers = {}, None, None
        if baseline.model_source(run.cfg).kind != "onnx":
            tm = load_torch_model(baseline.model_source(run.cfg))
            types = {i: type(m).__name__ for i, m in enumerate(tm.model)}
            n_backbone, n_layers = len(tm.yaml["backbone"]), len(tm.model)
        rows = []
        for name in params:
            module = onnx_to_torch_name(name)
            idx = int(module.split(".")[1]) if module.startswith("model.") else -1
            section = "?" if n_backbone is None else "backbone" if idx < n_backbone else "head" if idx == n_layers - 1 else "neck"
            rows.append({"node": name, "module": module, "layer": idx, "block": types.get(idx, "?"), "section": section,
                         "params": params[name], "macs": macs.get(name, 0)})  # fmt: skip
        return rows

    return run.stage(Stage("sensitivity-layers", {"versions": baseline.versions()}, [baseline.MODEL], [LAYERS], record=None),
                     compute)  # fmt: skip


def onnx_sweep(run: RunDir) -> dict:
    s = run.cfg.sensitivity
    model = run.artifact(baseline.MODEL)
    # the ranking metric is not part of the key: every metric is measured, sensitivity.metric only picks one
    params = {k: getattr(s, k) for k in ("formats", "directions", "range_images", "images", "workers", "group",
                                         "naive_check")}  # fmt: skip
    params["threads"] = run.cfg.runtime.threads

    def compute():
        ranges, images = _images(run)
        sens = measure(model, images, ranges, [get_format(f) for f in s.formats], s.directions, s.metric, s.workers,
                       s.group, run.cfg.runtime.threads, s.naive_check)  # fmt: skip
        sens["model"] = baseline.MODEL
        sens["calibration"].update(list=f"<data.coco_root>/{run.cfg.data.calib_list}",  # no machine path in schemes
                                   range_images=[0, s.range_images], sweep_images=[s.range_images, s.range_images + s.images])  # fmt: skip
        return sens

    keyed = {**params, "versions": baseline.versions(), "sweep_version": SWEEP_VERSION}
    st = Stage("sensitivity", keyed, [baseline.MODEL, baseline.CALIB], [SENS], record=params)
    return {**read_back(run.stage(st, compute)), "metric": s.metric}


def _spearman(a, b) -> float:
    return rho(a, b)


def validation_reason(run: RunDir) -> str | None:
    """Why the metric validation does not run here (None: it runs)."""
    v = run.cfg.sensitivity.validation
    if not v.enabled:
        return "sensitivity.validation.enabled is false (run it with `python -m lowbit_helpers validate-sensitivity PARAMS`)"
    if run.read(baseline.MODEL_INFO)["structure_only"]:
        return "random weights: no accuracy to predict"
    return None


def made_by(run: RunDir, calib_images: int, subset: str, select: str) -> dict:
    """What a metric validation's result depends on, measured on this run's inputs: the model, the
    COCO images and boxes of its ground truth (``subset``, split by ``select``), the calibration
    images [0, ``calib_images``) of its ranges, statistics and sweep, the decoder and the code of
    its metrics and quantizers. A committed result carries it; another run shows that result only
    where its own record for the same study is equal (:func:`committed_validation`)."""
    cfg = run.cfg
    calib = load_calibration(run.artifact(baseline.CALIB))
    if len(calib) < calib_images:
        calib_sha = f"the run has {len(calib)} calibration images"
    else:
        calib_sha = hashlib.sha256(np.ascontiguousarray(calib[:calib_images]).tobytes()).hexdigest()
    union = open_coco(cfg.data.coco_root, cfg.data.annotations, subset)
    sel = open_coco(cfg.data.coco_root, cfg.data.annotations, select)
    coco = union.coco
    boxes = sorted((a["image_id"], a["category_id"], *a["bbox"]) for a in coco.loadAnns(coco.getAnnIds(imgIds=union.ids)))
    truth = json.dumps({"ids": union.ids, "select": sel.ids, "boxes": boxes})
    return {"model_sha256": sha256_file(run.artifact(baseline.MODEL)),
            "evaluation": {"subset": subset, "select": select, "images": len(union.ids), "boxes": len(boxes),
                           "sha256": hashlib.sha256(truth.encode()).hexdigest()},
            "calibration": {"images": calib_images, "sha256": calib_sha},
            "decode": cfg.decode.model_dump(),
            "code": {"validation": VALIDATION_VERSION, "sweep": SWEEP_VERSION, "quant": QUANT_VERSION, "metrics": list(METRICS)}}  # fmt: skip


def committed_validation(run: RunDir, path: Path, why: str) -> dict | Skipped:
    """A committed validation result, if everything that made it equals this run's (the model, the
    images and boxes, the calibration images, the decoder, the metrics' code) and it validated the
    4-bit method this run's params name; else a :class:`Skipped` that says what differs."""
    shown = path.relative_to(Path(run.cfg.output.reports_dir)).as_posix()
    result = read_back(read_json(path))
    recorded = result.get("made_by")
    if not recorded:
        return Skipped(f"{why}; the committed result reports/{shown} does not record what made it "
                       "(rerun `python -m lowbit_helpers validate-sensitivity PARAMS`)")  # fmt: skip
    try:
        ours = made_by(run, recorded["calibration"]["images"], recorded["evaluation"]["subset"], recorded["evaluation"]["select"])
    except LowbitError as exc:  # e.g. its images are not in this run's annotation file
        return Skipped(f"{why}; the committed result reports/{shown} was made on images this run cannot open ({exc.cause})")
    differ = [k for k in ours if ours[k] != recorded.get(k)]
    if result.get("method") != run.cfg.sensitivity.validation.method:
        differ.append(f"method ({result.get('method')}, not {run.cfg.sensitivity.validation.method})")
    if differ:
        return Skipped(f"{why}; the committed result reports/{shown} was made with another "
                       f"{', '.join(differ)} than this run's")  # fmt: skip
    return {**result, "committed": shown, "not_rerun": why}


def validation(run: RunDir, sens: dict | None, proxy: dict | None = None, progress=None) -> dict | Skipped:
    """Which metric predicts mAP: candidate metrics (and the default sweep's, and the Torch proxy)
    against the true COCO mAP of single-layer perturbations (:mod:`..sensitivity.validation`).

    Per format of ``validation.formats``: every Conv swept alone (and kept, in ``kept_format``)
    with the deployed 4-bit method on the sweep images, scored by every candidate metric; the
    layers chosen from those rankings evaluated on COCO ``subset``; Spearman of each metric
    against the mAP delta on the selection part (where the metric is chosen) and the rest
    (where it is confirmed).
    """
    why = validation_reason(run)
    if why:
        reports = Path(run.cfg.output.reports_dir)
        # this run's committed result, else the exhaustive study's (params/full.yaml, same model and images)
        committed = next((p for p in (reports / run.run_id / VALIDATION_REPORT, reports / FULL_RUN / VALIDATION_REPORT)
                          if p.is_file()), None)  # fmt: skip
        if committed is None or run.read(baseline.MODEL_INFO)["structure_only"]:
            return Skipped(why)
        result = committed_validation(run, committed, why)
        if not isinstance(result, Skipped):  # against this run's sweep and proxy
            result["agreement"] = agreement(result, sens, proxy, run.cfg.sensitivity.rank_as)
        return result
    cfg, s = run.cfg, run.cfg.sensitivity
    v = s.validation
    model_path = run.artifact(baseline.MODEL)
    params = {**v.model_dump(), "range_images": s.range_images, "images": s.images, "stats_images": cfg.candidates.stats_images,
              "decode": cfg.decode.model_dump(), "data": cfg.data.model_dump(), "versions": baseline.versions(),
              "validation_version": VALIDATION_VERSION, "quant_version": QUANT_VERSION}  # fmt: skip

    def compute():
        t0 = time.perf_counter()
        parse_method(v.method)
        model = onnx.load(str(model_path))
        convs = conv_nodes(model)
        range_imgs, images = _images(run)
        calib = load_calibration(run.artifact(baseline.CALIB))
        ranges = activation_ranges(model, range_imgs, cfg.runtime.threads)
        stats = collect_stats(model, convs, np.asarray(calib[: cfg.candidates.stats_images]), cfg.runtime.threads)
        sel, rest, union = splits.open_splits(run, v.select_subset, v.subset, VALIDATION_IDS, "sensitivity.validation")
        # the confirmation split in two halves (alternate ids): how well the ground truth agrees with itself
        parts = {"select": sel, "confirm": rest, "all": union, **sv.halves(rest, "confirm")}
        fp32_dets = splits.fp32_reference(run, v.subset)
        fp32 = {name: evaluate_coco(sub, splits.only(fp32_dets, sub.ids), areas=False).metrics["mAP_50_95"] for name, sub in parts.items()}
        candidates = sv.CandidateScorer(cfg.decode)
        truth = sv.DetectionScorer(union, cfg.decode)
        cocos = sv.CocoImages(union)
        kw = {"workers": s.workers, "group": s.group, "progress": progress}
        studies, cost = {}, {}
        jobs = [(f, "alone") for f in v.formats] + ([(v.kept_format, "kept")] if v.kept_format and v.kept_layers else [])
        for fmt, direction in jobs:
            name = f"{fmt}-{direction}"
            pert = MethodPerturber(fmt, v.method, ranges, stats)
            t1 = time.perf_counter()
            states, _ = run_perturbations(model, ArrayImages(images), pert, convs, [direction], candidates, **kw)
            cand = {c: candidates.result(states[c, direction]) for c in convs}
            cand_all = candidates.result(states[ALL, "all"])
            metric_names = [*METRICS, sv.LABEL_FREE]
            # higher = less sensitive for every metric; kept: the more keeping L buys, the more sensitive L
            sign = 1 if direction == "alone" else -1
            values = {m: {c: sign * cand[c][m] for c in convs} for m in metric_names}
            layers = sv.choose_layers(values, v.layers, v.top) if direction == "alone" else sv.choose_layers(values, v.kept_layers, 1)
            t2 = time.perf_counter()
            states, _ = run_perturbations(model, cocos, pert, layers, [direction], truth, **kw)
            rows = []
            for c in layers + [ALL]:
                dets = states[c, direction if c != ALL else "all"]
                maps = {part: evaluate_coco(sub, splits.only(dets, sub.ids), areas=False).metrics["mAP_50_95"] for part, sub in parts.items()}
                rows.append({"conv": c, **{f"delta_{p}": maps[p] - fp32[p] for p in maps},
                             "metrics": cand[c] if c != ALL else cand_all})  # fmt: skip
            studies[name] = {"format": fmt, "direction": direction, "method": v.method, "layers": layers,
                             "rows": rows, "candidates": cand, "all": cand_all}  # fmt: skip
            cost[name] = {"candidates_seconds": t2 - t1, "truth_seconds": time.perf_counter() - t2,
                          "truth_evaluations": len(layers) + 1, "images": len(union)}  # fmt: skip
        result = {"method": v.method, "made_by": made_by(run, max(s.range_images + s.images, cfg.candidates.stats_images),
                                                         v.subset, v.select_subset),
                  "model_sha256": sha256_file(model_path), "subset": v.subset, "select": sel.name,
                  "confirm": rest.name, "fp32_mAP_50_95": fp32,
                  "images": {part: len(sub.ids) for part, sub in parts.items()},
                  "studies": studies, "cost": cost, "total_seconds": time.perf_counter() - t0}  # fmt: skip
        return result

    result = read_back(run.stage(Stage("sensitivity-validation", params, [baseline.MODEL, baseline.CALIB],
                                       [VALIDATION, VALIDATION_IDS]), compute))  # fmt: skip
    # against this run's sweep and proxy, whenever they change (the ground truth does not depend on them)
    result["agreement"] = agreement(result, sens, proxy, run.cfg.sensitivity.rank_as)
    return result


def agreement(result: dict, sens: dict | None, proxy: dict | None, rank_as: dict | None = None) -> dict:
    """Spearman of every metric with the mAP delta per study and split, and the chosen metric.

    Series: each candidate metric with the validated method's perturbations; the default
    sweep's metrics (round-to-nearest weights, ``sweep:<metric>``; for a format not swept, the
    format of ``rank_as`` that stands in for it); the Torch proxy
    (``torch_proxy``, in its format). The metric is chosen by the mean Spearman on the selection
    split over the *alone* studies and confirmed on the rest.
    """

    table, reliability = {}, {}
    for name, st in result["studies"].items():
        rows = [r for r in st["rows"] if r["conv"] != "__all__"]
        sign = 1 if st["direction"] == "alone" else -1
        series = {m: [sign * r["metrics"][m] for r in rows] for m in rows[0]["metrics"]}
        formats = (sens or {}).get("formats", {})
        swept = st["format"] if st["format"] in formats else (rank_as or {}).get(st["format"])
        if swept in formats:  # a format not swept takes the ranking it is ranked as
            recs = sens["formats"][swept]["records"]
            for m in sens.get("metrics", []):
                if all(st["direction"] in recs.get(r["conv"], {}) for r in rows):
                    series[f"sweep:{m}"] = [sign * recs[r["conv"]][st["direction"]][m] for r in rows]
        if proxy and st["direction"] == "alone" and proxy["sweep"]["format"] == st["format"]:
            by_node = {r["node"]: r["torch_sqnr_db"] for r in proxy.get("rows", [])}
            if all(r["conv"] in by_node for r in rows):
                series["torch_proxy"] = [by_node[r["conv"]] for r in rows]
        table[name] = {m: {p: spearman(x, [r[f"delta_{p}"] for r in rows]) for p in ("select", "confirm", "all")}
                       for m, x in series.items()}  # fmt: skip
        if "images" in result and all("delta_confirm_a" in r for r in rows):
            reliability[name] = sv.reliability([r["delta_confirm_a"] for r in rows], [r["delta_confirm_b"] for r in rows],
                                               result["images"]["confirm_a"], result["images"])  # fmt: skip

    alone = [n for n, st in result["studies"].items() if st["direction"] == "alone"]
    names = set.intersection(*(set(table[n]) for n in alone)) if alone else set()
    mean_select = {m: float(np.mean([table[n][m]["select"]["rho"] for n in alone])) for m in names}
    # the sweep can compute these (label-free mAP and the proxy are shown for comparison)
    eligible = {m: v for m, v in mean_select.items() if m in METRICS and np.isfinite(v)}
    best = max(sorted(eligible), key=lambda m: eligible[m]) if eligible else None
    # a pick needs a selection split that ranks at all: the winner's interval above 0 in every alone study
    decided = best is not None and all(table[n][best]["select"]["lo"] > 0 for n in alone)
    return {"spearman": table, "reliability": reliability, "mean_select_rho": mean_select, "best_on_select": best, "chosen": best if decided else None,
            "rule": "of the metrics the sweep computes, the highest mean Spearman over the alone studies on the selection "
                    "split, if its interval there is above 0 in every alone study (else no pick: the split cannot rank)"}  # fmt: skip


def torch_proxy(run: RunDir, sens: dict) -> dict | Skipped:
    """The plan's Torch proxy on the same images and format, and its agreement with the ONNX sweep."""
    cfg, s = run.cfg, run.cfg.sensitivity
    source = baseline.model_source(cfg)
    if not s.proxy or source.kind == "onnx" or s.proxy_format not in sens["formats"]:
        why = ("disabled in params" if not s.proxy else "the model is an ONNX file: no torch model"
               if source.kind == "onnx" else f"proxy_format {s.proxy_format} is not among the swept formats")  # fmt: skip
        return Skipped(why)
    model_path = run.artifact(baseline.MODEL)
    params = {"format": s.proxy_format, "range_images": s.range_images, "images": s.images, "chunk": s.chunk,
              "source": source.sha256, "versions": baseline.versions()}  # fmt: skip

    def compute():
        import torch  # late: torch costs seconds at import

        torch.set_num_threads(cfg.runtime.threads)
        tm = load_torch_model(source)
        mapping = map_convs(onnx.load(str(model_path)), tm)
        modules = list(mapping["mapping"].values())
        range_imgs, images = _images(run)
        t0 = time.perf_counter()
        ranges = torch_ranges(tm, modules, range_imgs)
        result = torch_sweep(tm, modules, images, get_format(s.proxy_format), ranges, s.chunk)
        result["seconds_with_ranges"] = time.perf_counter() - t0
        # the proxy measures raw-head SQNR: it is compared with the ONNX sweep's raw-head SQNR
        onnx_recs = {n: r["alone"]["raw_sqnr"] for n, r in sens["formats"][s.proxy_format]["records"].items()}
        pairs = list(mapping["mapping"].items())
        onnx_vals = [onnx_recs[n] for n, _ in pairs]
        torch_vals = [result["sqnr_db"][m] for _, m in pairs]
        onnx_rank = {n: r for r, n in enumerate(sorted(onnx_recs, key=onnx_recs.get), 1)}
        by_torch = sorted(pairs, key=lambda p: result["sqnr_db"][p[1]])
        torch_rank = {n: r for r, (n, _) in enumerate(by_torch, 1)}
        rows = [{"node": n, "module": m, "onnx_sqnr_db": onnx_recs[n], "torch_sqnr_db": result["sqnr_db"][m],
                 "onnx_rank": onnx_rank[n], "torch_rank": torch_rank[n], "rank_shift": torch_rank[n] - onnx_rank[n]}
                for n, m in pairs]  # fmt: skip
        fmt_sweep = sens["formats"][s.proxy_format]
        recs = fmt_sweep["records"]
        kept_gain = ([fmt_sweep["all"]["raw_sqnr"] - recs[n]["kept"]["raw_sqnr"] for n, _ in pairs]
                     if all("kept" in recs[n] for n, _ in pairs) else None)  # fmt: skip
        out = {**mapping, "sweep": result, "rows": rows, "spearman": _spearman(onnx_vals, torch_vals),
               # the proxy ranks by "alone"; top-K schemes keep what buys most when everything else is low-bit.
               # Both series are "higher = less sensitive" (all - kept = minus the kept gain), so agreement is > 0.
               "spearman_vs_onnx_kept": _spearman(kept_gain, torch_vals) if kept_gain else None,
               "top20_onnx": [n for n in sorted(onnx_rank, key=onnx_rank.get)[:20]],
               "top20_torch": [n for n, _ in by_torch[:20]],
               "top20_overlap": len(set(sorted(onnx_rank, key=onnx_rank.get)[:20]) & {n for n, _ in by_torch[:20]})}  # fmt: skip
        return out

    return read_back(run.stage(Stage("sensitivity-proxy", params, [baseline.MODEL, baseline.CALIB, SENS], [PROXY]), compute))


def scheme_files(run: RunDir) -> list[dict]:
    s = run.cfg.sensitivity
    sens_path = run.artifact(SENS)
    params = {"top_k": s.top_k, "budgets": s.budgets, "low": s.budget_low, "high": s.budget_high, "metric": s.metric,
              "rank_as": s.rank_as}  # fmt: skip
    st = Stage("schemes", params, [SENS], [])

    def compute():
        out_dir = run.path / SCHEMES_DIR
        for old in out_dir.glob("*.json"):  # a scheme list from other params must not linger
            old.unlink()
        paths = write_schemes(sens_path, out_dir, s.top_k, s.budgets, s.budget_low, s.budget_high, s.metric, s.rank_as)
        st.outputs += [str(p.relative_to(run.path)) for p in paths] + [SCHEMES_INDEX]  # known once written

    index = run.stage(st, compute, read=SCHEMES_INDEX)
    return [run.read(f"{SCHEMES_DIR}/{e['file']}") for e in index]


def run_sensitivity(run: RunDir) -> SensitivityResult | Skipped:
    """Everything notebook 04 shows."""
    if not run.cfg.sensitivity.enabled:
        return Skipped("sensitivity.enabled is false in the params")
    s = run.cfg.sensitivity
    if s.budgets and not all(0 < b <= 100 for b in s.budgets):
        raise LowbitError(f"sensitivity.budgets must be percentages in (0, 100], got {s.budgets}", "use e.g. [25, 50, 75, 90]")
    sens = onnx_sweep(run)
    proxy = torch_proxy(run, sens)
    val = validation(run, sens, None if isinstance(proxy, Skipped) else proxy)
    return SensitivityResult(layer_table(run), sens, proxy, val, scheme_files(run))
