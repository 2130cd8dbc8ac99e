"""Notebook 06: what the report shows beyond the four steps' results, computed and cached here so
that the report layer only draws: the shipped models' detections on a few images, and FP32's
per-class AP on the confirmation subset (the picks' own per-class AP is in their evaluations).
"""

from __future__ import annotations

import numpy as np

from ..data import preprocess
from ..decode import decode
from ..evaluate import evaluate_coco
from ..rundir import RunDir, Stage
from ..runtime import make_session
from ..schema import Skipped
from . import baseline, splits
from .candidates import CANDIDATE_ONNX, CandidatesResult
from .int8 import Int8Result, ort_cpu_pick, tensorrt_pick, variant_model
from .int8 import splits as int8_splits

Int8Step = Int8Result | Skipped  # notebook 03's result, or why it did not run
CandidatesStep = CandidatesResult | Skipped  # notebook 05's, likewise

ANSWER = "answer.json"  # the answer table as data, one record per row (copied beside summary.md in reports/)
DETECTIONS = "summary/detections.json"  # the shipped models' boxes on the first images of the confirmation split
FP32_PER_CLASS = "summary/fp32_per_class.json"  # FP32's AP per class on the confirmation split, box counts
SHOW_SCORE = 0.35  # boxes below this score are not drawn (the evaluation keeps them all)
SHOW_IMAGES = 4


def picks(int8_result: Int8Step, cand_result: CandidatesStep) -> list[dict]:
    """What to ship, one row per target: {kind, role, model, confirmation-split score, engine, size,
    bench label, the rule that chose it} (the report's answer draws them)."""

    rows = []
    if isinstance(int8_result, Int8Result) and not int8_result.structure_only:
        vals = int8_result.validations
        env = int8_result.environment
        cpu = ort_cpu_pick(int8_result)
        if cpu:
            n = cpu["name"]
            rows.append({"kind": "cpu", "role": f"CPU INT8 (ORT, {env.get('int8_kernel_class', '?').upper()} CPU)", "model": n,
                         "score": vals[n]["engines"]["ort"]["confirm"], "engine": "ORT kernels",
                         "size_bytes": vals[n]["size_bytes"], "bench": f"int8:{n}",
                         "rule": f"best {vals[n]['engines']['ort']['select']['subset']} Δ through ORT's kernels of the "
                                 f"{len(cpu['considered'])} ORT recipe(s) here faster than FP32"})  # fmt: skip
        trt = tensorrt_pick(int8_result)
        if trt:
            n = trt["name"]
            rows.append({"kind": "tensorrt", "role": f"TensorRT INT8 ({trt['label']})", "model": n, "score": vals[n]["engines"]["ort-exact"]["confirm"],
                         "engine": "exact Q/DQ (what TensorRT computes)", "size_bytes": vals[n]["size_bytes"], "bench": None,
                         "rule": f"best {vals[n]['engines']['ort-exact']['select']['subset']} Δ with exact Q/DQ arithmetic of the "
                                 f"{len(trt['considered'])} {trt['kind']} recipe(s) here"})  # fmt: skip
    if isinstance(cand_result, CandidatesResult):
        ev, rec = cand_result.evaluations, cand_result.recipes
        for w, also in _by_model(cand_result.winners):
            n = w["candidate"]
            if "confirm" not in ev[n]:
                continue
            rows.append({"kind": "lowbit", "role": f"low-bit, ≥ {w['budget_percent']:g} % of weights in 4-bit", "model": n, "score": ev[n]["confirm"],
                         "engine": "ORT kernels", "size_bytes": ev[n]["size_bytes"], "bench": n,
                         "rule": f"best {ev[n]['select']['subset']} mAP of the {w['eligible']} guided candidates at that budget{also}"})  # fmt: skip
            if "confirm_openvino" in ev[n]:  # the same file where notebook 05's bench runs it fastest (candidates.openvino_budgets)
                rows.append({"kind": "lowbit-openvino", "role": f"low-bit under OpenVINO, ≥ {w['budget_percent']:g} % of weights in 4-bit",
                             "model": n, "score": ev[n]["confirm_openvino"], "engine": "OpenVINO CPU", "size_bytes": ev[n]["size_bytes"],
                             "bench": f"{OPENVINO_BENCH}{n}", "rule": f"the ≥ {w['budget_percent']:g} % low-bit pick (chosen on {ev[n]['select']['subset']} through ORT's "
                                                                      "kernels), run by OpenVINO's CPU plugin"})  # fmt: skip
        for w, also in _by_model(cand_result.integer.get("winners", {})):
            n = w["candidate"]
            if "confirm" not in ev[n]:
                continue
            rows.append({"kind": "lowbit-int", "role": f"low-bit on integer kernels, ≥ {w['budget_percent']:g} % of weights in 4-bit",
                         "model": n, "score": ev[n]["confirm"], "engine": "ORT kernels", "size_bytes": ev[n]["size_bytes"],
                         "bench": n, "rule": f"best {ev[n]['select']['subset']} mAP of the {w['eligible']} integer-kernel forms "
                                             f"at that budget (4-bit codes in {rec[n]['int8_recipe']}){also}"})  # fmt: skip
        w16 = next((n for n, r in rec.items() if r["scheme"].get("name") == "w4a16-top0" and r.get("form") != "integer"), None)
        if w16 and "confirm" in ev[w16]:
            rows.append({"kind": "w4a16", "role": "uniform W4A16", "model": w16, "score": ev[w16]["confirm"], "engine": "ORT kernels",
                         "size_bytes": ev[w16]["size_bytes"], "bench": w16,
                         "rule": f"every Conv W4A16; 4-bit method {cand_result.method} chosen on "
                                 f"{ev[w16]['select']['subset']} (the ladder)"})  # fmt: skip
    return rows


def _by_model(winners: dict) -> list[tuple[dict, str]]:
    """Budget winners, one per model, in budget order: a model that wins several budgets is one row, at
    the largest budget it wins, with the smaller ones named (``also``)."""
    out: dict[str, list[dict]] = {}
    for w in sorted(winners.values(), key=lambda w: w["budget_percent"]):
        out.setdefault(w["candidate"], []).append(w)
    rows = [(ws[-1], "".join(f"; also the best at ≥ {w['budget_percent']:g} %" for w in ws[:-1])) for ws in out.values()]
    return sorted(rows, key=lambda r: r[0]["budget_percent"])


OPENVINO_BENCH = "openvino:"  # bench labels of notebook 05's OpenVINO rows: the prefix and the candidate


def bench(int8_result: Int8Step, cand_result: CandidatesStep) -> tuple[dict, str, dict]:
    """(label -> median ms, which measurement, its environment) from the one bench every latency
    ratio of the answer comes from: notebook 05's, which times FP32, the INT8 pick and every
    candidate in one process, under ORT and (labels ``openvino:<candidate>``) OpenVINO (notebook
    03's when 05 did not run). Every ratio is to ORT's FP32."""
    if isinstance(cand_result, CandidatesResult) and (cand_result.latency or {}).get("rows"):
        lat = cand_result.latency
        ms = {r["name"]: r["median_ms"] for r in lat["rows"]}
        ms.update({f"{OPENVINO_BENCH}{r['name']}": r["median_ms"] for r in lat.get("openvino_rows") or []})
        return ms, "notebook 05's interleaved bench", lat.get("environment", {})
    if isinstance(int8_result, Int8Result) and int8_result.latency:
        rows = [r for r in int8_result.latency if r.get("runtime", "ort") == "ort" and r.get("precision", "f32") == "f32"]
        return ({("fp32" if r["name"] == "fp32" else f"int8:{r['name']}"): r["median_ms"] for r in rows},
                "notebook 03's interleaved bench", int8_result.environment)  # fmt: skip
    return {}, "no latency measured", {}


def model_file(run: RunDir, row: dict) -> str:
    """The run-relative ONNX of an answer row."""
    if row["kind"] in ("cpu", "tensorrt"):
        return variant_model(next(v for v in run.cfg.int8.variants if v.name == row["model"]))
    return CANDIDATE_ONNX.format(name=row["model"])


def answer(run: RunDir, int8_result: Int8Step, cand_result: CandidatesStep) -> list[dict]:
    """The answer table as data (``answer.json``): FP32 and every pick of :func:`picks`, each with the
    run-relative file a deployment reads, where it was chosen and confirmed, its confirmation mAP and
    Δ to FP32 with the 95 % interval (mAP50-95 points), the engine of that Δ, size, latency × FP32 and
    the runtime of that ratio, and the rule that chose it; [] without a pick."""
    rows = picks(int8_result, cand_result)
    if not rows:
        return []
    ms, where, env = bench(int8_result, cand_result)
    threads = run.cfg.runtime.threads
    cpu = f"{threads} threads, {env.get('int8_kernel_class', '?')} CPU ({where}, ratio to ORT's FP32)"
    runtime = f"ORT CPU, {cpu}" if ms else None
    fp32_ms = ms.get("fp32")
    ref = rows[0]["score"]
    fp32_map = ref["metrics"]["mAP_50_95"] - ref["delta_vs_fp32"]["delta"]

    def points(x: float) -> float:
        return round(100 * x, 2)

    out = [{"role": "FP32 reference", "model": "fp32", "file": baseline.MODEL, "select_split": None,
            "confirm_split": ref["subset"], "map_confirm": points(fp32_map), "delta_confirm": [0.0, 0.0, 0.0],
            "engine": "ORT (float)", "size_mib": round(run.artifact(baseline.MODEL).stat().st_size / 2**20, 3),
            "latency_ratio": 1.0 if fp32_ms else None, "runtime": runtime, "rule": "the reference"}]  # fmt: skip
    for r in rows:
        d, sel = r["score"]["delta_vs_fp32"], _select_subset(r, int8_result, cand_result)
        r_ms = ms.get(r["bench"]) if r["bench"] else None
        out.append({"role": r["role"], "model": r["model"], "file": model_file(run, r), "select_split": sel,
                    "confirm_split": r["score"]["subset"], "map_confirm": points(r["score"]["metrics"]["mAP_50_95"]),
                    "delta_confirm": [points(d["delta"]), points(d["lo"]), points(d["hi"])], "engine": r["engine"],
                    "size_mib": round(r["size_bytes"] / 2**20, 3),
                    "latency_ratio": round(r_ms / fp32_ms, 3) if r_ms and fp32_ms else None,
                    "runtime": (f"OpenVINO CPU, {cpu}" if r["bench"].startswith(OPENVINO_BENCH) else runtime) if r_ms and fp32_ms else None,
                    "rule": r["rule"]})  # fmt: skip
    return out


def _select_subset(row: dict, int8_result: Int8Step, cand_result: CandidatesStep) -> str:
    if row["kind"] in ("cpu", "tensorrt"):
        engine = "ort" if row["kind"] == "cpu" else "ort-exact"
        return int8_result.validations[row["model"]]["engines"][engine]["select"]["subset"]
    return cand_result.evaluations[row["model"]]["select"]["subset"]


def write_answer(run: RunDir, int8_result: Int8Step, cand_result: CandidatesStep) -> list[dict]:
    """``answer.json`` in the run directory (the pipeline copies it beside ``summary.md``)."""
    rows = answer(run, int8_result, cand_result)
    run.stage(Stage("answer", None, [], [ANSWER], fixed_key="always"), lambda: rows, read=None)
    return rows


def first(rows: list[dict], kind: str) -> dict | None:
    return next((r for r in rows if r["kind"] == kind), None)


def top_budget(rows: list[dict]) -> dict | None:
    """The low-bit pick at the highest 4-bit budget (rows come in budget order)."""
    low = [r for r in rows if r["kind"] == "lowbit"]
    return low[-1] if low else None


def shipped_models(run: RunDir, int8_result: Int8Step, cand_result: CandidatesStep) -> dict[str, str]:
    """Label -> run-relative ONNX: FP32, the CPU INT8 pick and the low-bit pick at the highest budget."""
    rows = picks(int8_result, cand_result)
    cpu, low = first(rows, "cpu"), top_budget(rows)
    models = {"FP32": baseline.MODEL}
    if cpu:
        models[f"INT8 {cpu['model']}"] = variant_model(next(v for v in run.cfg.int8.variants if v.name == cpu["model"]))
    if low:
        models[f"low-bit {low['model']}"] = CANDIDATE_ONNX.format(name=low["model"])
    return models


def pick_detections(run: RunDir, int8_result: Int8Step, cand_result: CandidatesStep) -> dict | None:
    """Each shipped model's decoded boxes (score >= SHOW_SCORE, original image pixels) on the first
    images of the confirmation split; None when there is no pick to show beside FP32."""
    models = shipped_models(run, int8_result, cand_result)
    if len(models) < 2:
        return None
    cfg = run.cfg
    _, confirm_split, _ = int8_splits(run)
    ids = [int(i) for i in confirm_split.ids[:SHOW_IMAGES]]
    params = {"images": ids, "labels": list(models), "decode": cfg.decode.model_dump(), "data": cfg.data.model_dump(),
              "show_score": SHOW_SCORE}  # fmt: skip

    def compute():
        sessions = {label: make_session(run.artifact(rel), threads=cfg.runtime.threads) for label, rel in models.items()}
        boxes: dict[str, dict[str, list]] = {label: {} for label in models}
        for image_id in ids:
            tensor, lb = preprocess(confirm_split.image_path(image_id))
            for label, sess in sessions.items():
                d = decode(sess.run(None, {sess.get_inputs()[0].name: tensor})[0], cfg.decode)
                keep = d.scores >= SHOW_SCORE
                boxes[label][str(image_id)] = [[*map(float, b), float(s), int(c)] for b, s, c in
                                               zip(lb.to_original(d.boxes[keep]), d.scores[keep], d.classes[keep])]  # fmt: skip
        cats = sorted(confirm_split.coco.loadCats(confirm_split.coco.getCatIds()), key=lambda c: c["id"])
        return {"images": ids, "split": confirm_split.name, "show_score": SHOW_SCORE, "boxes": boxes,
                "class_names": [c["name"] for c in cats]}  # fmt: skip

    return run.stage(Stage("summary-detections", params, list(models.values()), [DETECTIONS]), compute)


def fp32_per_class(run: RunDir, int8_result: Int8Step, cand_result: CandidatesStep) -> dict | None:
    """FP32's AP50-95 per class on the confirmation split (images nobody chose on) and each class's
    box count there, to compare the picks' with; None when neither the CPU INT8 pick nor the
    low-bit pick was scored there."""
    rows = picks(int8_result, cand_result)
    cpu, low = first(rows, "cpu"), top_budget(rows)
    scored = [int8_result.validations[cpu["model"]]["engines"]["ort"].get("confirm") if cpu else None,
              cand_result.evaluations[low["model"]].get("confirm") if low else None]  # fmt: skip
    if not any(scored):
        return None
    cfg = run.cfg
    params = {"subset": cfg.int8.confirm_subset, "select": cfg.int8.select_subset, "data": cfg.data.model_dump(),
              "decode": cfg.decode.model_dump(), "split": "confirm"}  # fmt: skip

    def compute():
        _, conf, _ = int8_splits(run)
        ap = evaluate_coco(conf, splits.only(splits.fp32_reference(run, cfg.int8.confirm_subset), conf.ids), areas=False).per_class
        coco = conf.coco
        count = {coco.cats[c]["name"]: len(coco.getAnnIds(imgIds=conf.ids, catIds=[c])) for c in coco.getCatIds()}
        # a class without boxes here has no AP: null, not NaN (strict JSON)
        return {"subset": conf.name, "ap": {c: (v if np.isfinite(v) else None) for c, v in ap.items()}, "count": count}

    return run.stage(Stage("summary-fp32-per-class", params, [baseline.MODEL], [FP32_PER_CLASS]), compute)
