"""The report's first section: what to ship, in one table and three computed sentences.

Read from notebook 03's result (:func:`..steps.int8.run_int8`) and notebook 05's
(:func:`..steps.candidates.run_candidates`). Every row was chosen on the selection split by the
rule it names and is quoted on the confirmation split (the images that chose nothing), with the
paired 95 % interval. Latency ratios all come from one interleaved measurement: notebook 05's,
which times FP32, the INT8 pick and every candidate in one process (notebook 03's when 05 is off).
"""

from __future__ import annotations

import pandas as pd

from ..steps.summary import OPENVINO_BENCH, CandidatesStep, Int8Step, bench, first, picks, top_budget
from .common import fmt_delta, pct
from .int8 import CPU_TARGET, TENSORRT_TARGET, _verdict

# the INT8 drops the targets accept (points): ORT CPU 0.15 and TensorRT 0.3 (report/int8.py, notebook 03 alike)


def _bench(int8_result: Int8Step, cand_result: CandidatesStep) -> tuple[dict, str]:
    """(label -> median ms, which measurement) from the one bench the headline quotes."""
    ms, where, _ = bench(int8_result, cand_result)
    return ms, where


def fp32_ms(int8_result: Int8Step, cand_result: CandidatesStep) -> float | None:
    """FP32's median latency in the bench every ratio of the report comes from."""
    return _bench(int8_result, cand_result)[0].get("fp32")


def headline_table(int8_result: Int8Step, cand_result: CandidatesStep, fp32_size_bytes: int) -> pd.DataFrame | None:
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


def headline_sentences(int8_result: Int8Step, cand_result: CandidatesStep, fp32_size_bytes: int) -> list[str]:
    """Three sentences: the CPU INT8 to ship, the TensorRT INT8 to ship, the low-bit answer."""
    rows = picks(int8_result, cand_result)
    bench, where = _bench(int8_result, cand_result)
    fp32_ms = bench.get("fp32")
    out = []

    def lat(r):
        ms = bench.get(r["bench"]) if r["bench"] else None
        return f"{ms / fp32_ms:.2f}× FP32 latency" if ms and fp32_ms else "latency not measured here"

    def under_openvino(r) -> str:  # notebook 05's bench: the same file under OpenVINO, against ORT's FP32
        ms = bench.get(f"{OPENVINO_BENCH}{r['bench']}") if r["bench"] else None
        if not (ms and fp32_ms):
            return ""
        ov = next((o for o in rows if o["kind"] == "lowbit-openvino" and o["model"] == r["model"]), None)
        acc = (f"{fmt_delta(ov['score']['delta_vs_fp32'])} points on {ov['score']['subset']} there" if ov
               else "its accuracy not scored under OpenVINO; the Δ is ORT's")  # fmt: skip
        return f" (OpenVINO runs the same file at {ms / fp32_ms:.2f}× ORT's FP32 in the same bench: {acc})"

    cpu = first(rows, "cpu")
    if cpu:
        d = cpu["score"]["delta_vs_fp32"]
        out.append(f"**CPU:** ship `{cpu['model']}` for {cpu['role'][len('CPU INT8 ('):-1]}: {fmt_delta(d)} points on "
                   f"{cpu['score']['subset']} through ORT's kernels, which {_verdict(d, CPU_TARGET)} the {CPU_TARGET}-point "
                   f"target, at {lat(cpu)}.")  # fmt: skip
    trt = first(rows, "tensorrt")
    if trt:
        d = trt["score"]["delta_vs_fp32"]
        out.append(f"**TensorRT:** ship `{trt['model']}`: {fmt_delta(d)} points on {trt['score']['subset']} with exact Q/DQ "
                   f"arithmetic (what TensorRT computes), which {_verdict(d, TENSORRT_TARGET)} the {TENSORRT_TARGET}-point target; "
                   "its TensorRT latency needs a GPU.")  # fmt: skip
    best = top_budget(rows)
    if best:
        d = best["score"]["delta_vs_fp32"]
        text = (f"**Low-bit:** at {best['role'][len('low-bit, '):]}, ship `{best['model']}`: {fmt_delta(d)} points on "
                f"{best['score']['subset']}, {best['size_bytes'] / fp32_size_bytes:.0%} of FP32's file, {lat(best)}"
                f"{under_openvino(best)}.")  # fmt: skip
        w16 = first(rows, "w4a16")
        if w16:
            text += f" Uniform W4A16 (`{w16['model']}`) costs {fmt_delta(w16['score']['delta_vs_fp32'])}."
        out.append(text)
    fast = [r for r in rows if r["kind"] == "lowbit-int"]
    if fast:
        f = fast[-1]
        out.append(f"**Low-bit on integer kernels:** at {f['role'][len('low-bit on integer kernels, '):]}, `{f['model']}` "
                   f"(the 4-bit codes in an ORT INT8 recipe, every quantized Conv a QLinearConv): "
                   f"{fmt_delta(f['score']['delta_vs_fp32'])} points on {f['score']['subset']}, "
                   f"{f['size_bytes'] / fp32_size_bytes:.0%} of FP32's file, {lat(f)}{under_openvino(f)}.")  # fmt: skip
    if out:
        out.append(f"Latency ratios: {where}, ORT CPU unless a row says OpenVINO, each to ORT's FP32.")
    return out


def per_class_delta(fp32: dict | None, int8_result: Int8Step, cand_result: CandidatesStep, min_instances: int = 25):
    """AP50-95 Δ to FP32 per class, in points, for the CPU INT8 pick and the low-bit pick at the
    highest budget, on the confirmation split (``fp32``: :func:`..steps.summary.fp32_per_class`),
    for classes with at least ``min_instances`` ground-truth boxes there. None when neither pick has
    that subset scored."""
    if fp32 is None:
        return None
    rows = picks(int8_result, cand_result)
    cpu, low = first(rows, "cpu"), top_budget(rows)
    columns = {}
    if cpu:
        columns[f"INT8 {cpu['model']}"] = int8_result.validations[cpu["model"]]["engines"]["ort"].get("confirm")
    if low:
        columns[f"low-bit {low['model']}"] = cand_result.evaluations[low["model"]].get("confirm")
    columns = {k: v for k, v in columns.items() if v}
    if not columns or any(v["subset"] != fp32["subset"] for v in columns.values()):
        return None
    ap, count = fp32["ap"], fp32["count"]
    classes = [c for c in ap if count.get(c, 0) >= min_instances and ap[c] is not None]
    table = pd.DataFrame({label: [100 * (v["per_class_ap"][c] - ap[c]) for c in classes] for label, v in columns.items()},
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
