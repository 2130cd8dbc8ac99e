"""The report's first section: what to ship, in one table and three computed sentences.

Read from notebook 03's result (:func:`..steps.int8.run_int8`) and notebook 05's
(:func:`..steps.candidates.run_candidates`). Every row was chosen on the selection split by the
rule it names and is quoted on the confirmation split (the images that chose nothing), with the
paired 95 % interval. Latency ratios all come from one interleaved measurement: notebook 05's,
which times FP32, the INT8 pick and every candidate in one process (notebook 03's when 05 is off).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..evaluate import evaluate_coco
from ..steps import baseline, splits
from ..steps.candidates import CANDIDATE_ONNX
from ..steps.int8 import ort_cpu_pick, tensorrt_pick, variant_model
from ..steps.int8 import splits as int8_splits
from .common import fmt_delta, pct
from .int8 import _verdict

INT8_TARGET = 0.5  # points: the INT8 drop the plan accepts


def _bench(int8_result: dict | None, cand_result: dict | None) -> tuple[dict, str]:
    """(label -> median ms, which measurement) from the one bench the headline quotes."""
    if cand_result and (cand_result.get("latency") or {}).get("rows"):
        return {r["name"]: r["median_ms"] for r in cand_result["latency"]["rows"]}, "notebook 05's interleaved bench (ORT CPU)"
    if int8_result and int8_result.get("latency"):
        rows = [r for r in int8_result["latency"] if r.get("runtime", "ort") == "ort" and r.get("precision", "f32") == "f32"]
        return {("fp32" if r["name"] == "fp32" else f"int8:{r['name']}"): r["median_ms"] for r in rows}, "notebook 03's interleaved bench (ORT CPU)"
    return {}, "no latency measured"


def fp32_ms(int8_result: dict | None, cand_result: dict | None) -> float | None:
    """FP32's median latency in the bench every ratio of the report comes from."""
    return _bench(int8_result, cand_result)[0].get("fp32")


def picks(int8_result: dict | None, cand_result: dict | None) -> list[dict]:
    """The rows of the headline, each {role, model, split score, size, latency label, rule}."""

    rows = []
    ok8 = int8_result and "skipped" not in int8_result and not int8_result.get("structure_only")
    okc = cand_result and "skipped" not in cand_result
    if ok8:
        vals = int8_result["validations"]
        env = int8_result.get("environment") or {}
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
            rows.append({"kind": "tensorrt", "role": "TensorRT INT8 (ModelOpt Q/DQ)", "model": n, "score": vals[n]["engines"]["ort-exact"]["confirm"],
                         "engine": "exact Q/DQ (what TensorRT computes)", "size_bytes": vals[n]["size_bytes"], "bench": None,
                         "rule": f"best {vals[n]['engines']['ort-exact']['select']['subset']} Δ with exact Q/DQ arithmetic of the "
                                 f"{len(trt['considered'])} ModelOpt recipe(s) here"})  # fmt: skip
    if okc:
        ev, rec = cand_result["evaluations"], cand_result["recipes"]
        for w in sorted(cand_result["winners"].values(), key=lambda w: w["budget_percent"]):
            n = w["candidate"]
            if "confirm" not in ev[n]:
                continue
            rows.append({"kind": "lowbit", "role": f"low-bit, ≥ {w['budget_percent']:g} % of weights in 4-bit", "model": n, "score": ev[n]["confirm"],
                         "engine": "ORT kernels", "size_bytes": ev[n]["size_bytes"], "bench": n,
                         "rule": f"best {ev[n]['select']['subset']} mAP of the {w['eligible']} guided candidates at that budget"})  # fmt: skip
        w16 = next((n for n, r in rec.items() if r["scheme"].get("name") == "w4a16-top0"), None)
        if w16 and "confirm" in ev[w16]:
            rows.append({"kind": "w4a16", "role": "uniform W4A16", "model": w16, "score": ev[w16]["confirm"], "engine": "ORT kernels",
                         "size_bytes": ev[w16]["size_bytes"], "bench": w16,
                         "rule": f"every Conv W4A16; 4-bit method {cand_result['method']} chosen on "
                                 f"{ev[w16]['select']['subset']} (the ladder)"})  # fmt: skip
    return rows


def _first(rows: list[dict], kind: str) -> dict | None:
    return next((r for r in rows if r["kind"] == kind), None)


def _top_budget(rows: list[dict]) -> dict | None:
    """The low-bit pick at the highest 4-bit budget (rows come in budget order)."""
    low = [r for r in rows if r["kind"] == "lowbit"]
    return low[-1] if low else None


def headline_table(int8_result: dict | None, cand_result: dict | None, fp32_size_bytes: int) -> pd.DataFrame | None:
    """FP32 and every pick: mAP50-95 and Δ [95 %] on the confirmation split, size, latency × FP32, the rule."""
    rows = picks(int8_result, cand_result)
    if not rows:
        return None
    bench, _ = _bench(int8_result, cand_result)
    fp32_ms = bench.get("fp32")
    first = rows[0]["score"]
    split = first["subset"]
    fp32_map = first["metrics"]["mAP_50_95"] - first["delta_vs_fp32"]["delta"]  # the same images' FP32 (ORT)
    out = [{"role": "FP32 reference", "model": "fp32", f"mAP50-95 {split}": pct(fp32_map),
            f"Δ {split} [95%]": "—", "size (MiB)": round(fp32_size_bytes / 2**20, 2),
            "latency × FP32": 1.0 if fp32_ms else "—", "chosen by": "—"}]  # fmt: skip
    for r in rows:
        ms = bench.get(r["bench"]) if r["bench"] else None
        out.append({"role": r["role"], "model": r["model"], f"mAP50-95 {split}": pct(r["score"]["metrics"]["mAP_50_95"]),
                    f"Δ {split} [95%]": f"{fmt_delta(r['score']['delta_vs_fp32'])} ({r['engine']}"
                                        + (f", on {r['score']['subset']})" if r["score"]["subset"] != split else ")"),
                    "size (MiB)": round(r["size_bytes"] / 2**20, 2),
                    "latency × FP32": round(ms / fp32_ms, 3) if ms and fp32_ms else "— (GPU only)" if not r["bench"] else "—",
                    "chosen by": r["rule"]})  # fmt: skip
    return pd.DataFrame(out).set_index("role")


def headline_sentences(int8_result: dict | None, cand_result: dict | None, fp32_size_bytes: int) -> list[str]:
    """Three sentences: the CPU INT8 to ship, the TensorRT INT8 to ship, the low-bit answer."""
    rows = picks(int8_result, cand_result)
    bench, where = _bench(int8_result, cand_result)
    fp32_ms = bench.get("fp32")
    out = []

    def lat(r):
        ms = bench.get(r["bench"]) if r["bench"] else None
        return f"{ms / fp32_ms:.2f}× FP32 latency" if ms and fp32_ms else "latency not measured here"

    cpu = _first(rows, "cpu")
    if cpu:
        d = cpu["score"]["delta_vs_fp32"]
        out.append(f"**CPU:** ship `{cpu['model']}` for {cpu['role'][len('CPU INT8 ('):-1]}: {fmt_delta(d)} points on "
                   f"{cpu['score']['subset']} through ORT's kernels, which {_verdict(d, INT8_TARGET)} the {INT8_TARGET}-point "
                   f"target, at {lat(cpu)}.")  # fmt: skip
    trt = _first(rows, "tensorrt")
    if trt:
        d = trt["score"]["delta_vs_fp32"]
        out.append(f"**TensorRT:** ship `{trt['model']}`: {fmt_delta(d)} points on {trt['score']['subset']} with exact Q/DQ "
                   f"arithmetic (what TensorRT computes), which {_verdict(d, INT8_TARGET)} the {INT8_TARGET}-point target; "
                   "its TensorRT latency needs a GPU.")  # fmt: skip
    best = _top_budget(rows)
    if best:
        d = best["score"]["delta_vs_fp32"]
        text = (f"**Low-bit:** at {best['role'][len('low-bit, '):]}, ship `{best['model']}`: {fmt_delta(d)} points on "
                f"{best['score']['subset']}, {best['size_bytes'] / fp32_size_bytes:.0%} of FP32's file, {lat(best)}.")  # fmt: skip
        w16 = _first(rows, "w4a16")
        if w16:
            text += f" Uniform W4A16 (`{w16['model']}`) costs {fmt_delta(w16['score']['delta_vs_fp32'])}."
        out.append(text)
    if out:
        out.append(f"Latency ratios: {where}.")
    return out


def shipped_models(run, int8_result: dict | None, cand_result: dict | None) -> dict:
    """Label -> ONNX path: FP32, the CPU INT8 pick and the low-bit pick at the highest budget."""

    models = {"FP32": run.artifact(baseline.MODEL)}
    rows = picks(int8_result, cand_result)
    cpu, low = _first(rows, "cpu"), _top_budget(rows)
    if cpu:
        v = next(v for v in run.cfg.int8.variants if v.name == cpu["model"])
        models[f"INT8 {cpu['model']}"] = run.artifact(variant_model(v))
    if low:
        models[f"low-bit {low['model']}"] = run.artifact(CANDIDATE_ONNX.format(name=low["model"]))
    return models


def per_class_delta(run, int8_result: dict | None, cand_result: dict | None, min_instances: int = 25):
    """AP50-95 Δ to FP32 per class, in points, for the CPU INT8 pick and the low-bit pick at the
    highest budget, on the whole confirmation subset (val500), for classes with at least
    ``min_instances`` ground-truth boxes there. None when neither pick has that subset scored."""

    rows = picks(int8_result, cand_result)
    cpu, low = _first(rows, "cpu"), _top_budget(rows)
    columns = {}
    if cpu:
        columns[f"INT8 {cpu['model']}"] = int8_result["validations"][cpu["model"]]["engines"]["ort"].get("whole")
    if low:
        columns[f"low-bit {low['model']}"] = cand_result["evaluations"][low["model"]].get("whole")
    columns = {k: v for k, v in columns.items() if v}
    if not columns:
        return None
    _, _, union = int8_splits(run)
    if any(v["subset"] != union.name for v in columns.values()):
        return None
    fp32 = evaluate_coco(union, splits.only(splits.fp32_reference(run, run.cfg.int8.confirm_subset), union.ids)).per_class
    coco = union.coco
    count = {coco.cats[c]["name"]: len(coco.getAnnIds(imgIds=union.ids, catIds=[c])) for c in coco.getCatIds()}
    classes = [c for c in fp32 if count.get(c, 0) >= min_instances and np.isfinite(fp32[c])]
    table = pd.DataFrame({label: [100 * (v["per_class_ap"][c] - fp32[c]) for c in classes] for label, v in columns.items()},
                         index=[f"{c} ({count[c]})" for c in classes])  # fmt: skip
    return table.sort_values(table.columns[-1])


def per_class_figure(table: pd.DataFrame, subset_name: str):
    """The per-class Δ table as a heatmap (red: lower AP than FP32, blue: higher)."""
    import matplotlib.pyplot as plt  # late: matplotlib only for figures
    import seaborn as sns  # late: seaborn only for figures

    lim = max(1.0, float(table.abs().to_numpy().max()))
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * table.shape[1], 0.26 * len(table) + 1.2))
    sns.heatmap(table, cmap="RdBu", center=0, vmin=-lim, vmax=lim, annot=True, fmt=".1f", annot_kws={"fontsize": 7},
                cbar_kws={"label": "Δ AP50-95 vs FP32 (points)"}, ax=ax)  # fmt: skip
    ax.set_title(f"Per-class AP Δ on {subset_name} (classes with their box count)", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig
