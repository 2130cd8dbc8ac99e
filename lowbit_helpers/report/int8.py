"""Notebook 03's tables and conclusion (also shown by the summary).

All read from :func:`lowbit_helpers.steps.int8.run_int8`'s result.
"""

from __future__ import annotations

import math

import pandas as pd

from .common import pct, tidy


def int8_table(result: dict) -> pd.DataFrame:
    """One row per INT8 variant (and FP32): accuracy with Δ and interval, fidelity, size, latency, fusion."""
    lat = {r["name"]: r for r in result["latency"]}
    fp32 = lat["fp32"]
    rows = [{"variant": "fp32", "backend": "—", "calibration": "—", "head policy": "—",
             f"median ms ({fp32['threads']} thr)": round(fp32["median_ms"], 1), "× FP32": 1.0}]  # fmt: skip
    for name, val in result["validations"].items():
        rec = result["recipes"][name]
        row = {"variant": name, "backend": rec["backend"], "calibration": rec["method"], "head policy": rec["head_policy"]}
        for subset, c in val.get("coco", {}).items():
            d = c["delta_vs_fp32"]
            row[f"mAP50-95 {subset}"] = pct(c["metrics"]["mAP_50_95"])
            row[f"Δ {subset} [95%]"] = f"{100 * d['delta']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"
        if "fidelity" in val:
            row["SQNR dB"] = round(val["fidelity"]["sqnr_db"], 1)
            row["cosine"] = round(val["fidelity"]["cosine"], 4)
        row.update({
            f"median ms ({fp32['threads']} thr)": round(lat[name]["median_ms"], 1),
            "× FP32": round(lat[name]["median_ms"] / fp32["median_ms"], 3),
            "size (MiB)": round(val["size_bytes"] / 2**20, 1),
            "Q/DQ nodes": val["qdq"]["QuantizeLinear"] + val["qdq"]["DequantizeLinear"],
            "QLinearConv / Conv (ORT CPU)": f"{val['ort_cpu']['QLinearConv']} / {val['qdq']['Conv']}",
            "calib s": round(rec["calibration"]["seconds"]),
            "calib peak RSS (MiB)": round(rec["calibration"]["peak_rss_mb"]),
        })  # fmt: skip
        rows.append(row)
    return tidy(pd.DataFrame(rows).set_index("variant"))


def latency_breakdown(result: dict) -> pd.DataFrame | None:
    """Where each model's time goes under ORT's profiler: Conv kernels against FP32's, and the rest.

    The INT8 speed-up is bounded by the Conv kernels' ratio, which depends on the CPU's int8
    instructions (``cpu_int8_isa``), and by what the Q/DQ graph adds outside the Convs
    (QLinearSigmoid + QLinearMul for SiLU instead of FP32's fused QuickGelu, for instance).
    """
    from ..runtime import CONV_OPS, compare_profiles

    profiles = result.get("profiles") or {}
    if "fp32" not in profiles:
        return None
    fp32 = profiles["fp32"]
    rows = []
    for name, prof in profiles.items():
        cmp = compare_profiles(fp32, prof)
        others = [(op, ms) for op, ms in prof["by_op_type"].items() if op not in CONV_OPS]
        rows.append({
            "model": name,
            "kernel ms": round(prof["kernel_ms"], 1),
            "× FP32": round(cmp["kernel_ratio"], 3),
            "Conv ms": round(cmp["conv_ms"][1], 1),
            "Conv × FP32": round(cmp["conv_ratio"], 3),
            "other ms": round(cmp["other_ms"][1], 1),
            "other × FP32": round(cmp["other_ms"][1] / cmp["other_ms"][0], 3) if cmp["other_ms"][0] else math.nan,
            "largest other kernels (ms)": ", ".join(f"{op} {ms:.1f}" for op, ms in others[:3]),
            "Convs slower than FP32": len(cmp["slower_convs"]),
        })  # fmt: skip
    return tidy(pd.DataFrame(rows).set_index("model"))


def _isa_sentence(result: dict) -> str:
    isa = (result.get("environment") or {}).get("cpu_int8_isa")
    if isa is None:
        return ""
    vnni = [f for f in isa if "vnni" in f or "amx" in f]
    return (f" This CPU's int8 instructions: {', '.join(isa) or 'none detected'}"
            + ("." if vnni else " (no VNNI: ORT's u8s8 kernels multiply through vpmaddubsw, far slower than vpdpbusd)."))  # fmt: skip


def int8_conclusion(result: dict, target_points: float = 0.5) -> str:
    """Which variant to ship for CPU and for TensorRT, computed from the measurements."""
    lat = {r["name"]: r["median_ms"] for r in result["latency"]}
    if result.get("structure_only"):
        text = "Structure-only model: no accuracy, so no recommendation; latency and fusion above are real."
        ort = [n for n in result["validations"] if result["recipes"][n]["backend"] == "ort"]
        if ort:
            fastest = min(ort, key=lat.get)
            text += f" Fastest ORT variant: `{fastest}` at {lat[fastest] / lat['fp32']:.3f}× FP32 latency."
            profiles = result.get("profiles") or {}
            if "fp32" in profiles and fastest in profiles:
                from ..runtime import compare_profiles

                cmp = compare_profiles(profiles["fp32"], profiles[fastest])
                text += f" Its Conv kernels take {cmp['conv_ratio']:.2f}× the time of FP32's." + _isa_sentence(result)
        return text
    vals = result["validations"]
    subset = list(next(iter(vals.values()))["coco"])[-1]  # the last (largest) evaluation subset

    def delta(name):
        return vals[name]["coco"][subset]["delta_vs_fp32"]

    lines = []
    cpu = [n for n, v in vals.items() if result["recipes"][n]["backend"] == "ort" and lat[n] < lat["fp32"]]
    if cpu:
        best = max(cpu, key=lambda n: delta(n)["delta"])
        d = delta(best)
        # "meets" only when the whole interval is within the target; the point estimate alone is "compatible with"
        met = ("meets" if -d["lo"] * 100 <= target_points
               else "is compatible with" if -d["delta"] * 100 <= target_points else "misses")  # fmt: skip
        lines.append(
            f"**CPU (ONNX Runtime):** ship `{best}`: mAP50-95 {100 * d['delta']:+.2f} points vs FP32 on {subset} "
            f"(95% interval [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]), {lat[best] / lat['fp32']:.2f}× FP32 latency, "
            f"{vals[best]['ort_cpu']['QLinearConv']} of {vals[best]['qdq']['Conv']} Convs as QLinearConv. "
            f"It {met} the {target_points}-point drop target."
        )  # fmt: skip
        profiles = result.get("profiles") or {}
        if "fp32" in profiles and best in profiles:
            from ..runtime import compare_profiles

            cmp = compare_profiles(profiles["fp32"], profiles[best])
            lines[-1] += (
                f" Under ORT's profiler its Conv kernels take {cmp['conv_ratio']:.2f}× the time of FP32's and everything "
                f"else {cmp['other_ms'][1] / cmp['other_ms'][0]:.2f}×, so the Conv kernels bound the speed-up."
                + _isa_sentence(result)
            )  # fmt: skip
    trt = [n for n in vals if result["recipes"][n]["backend"] == "modelopt"]
    if trt:
        best = max(trt, key=lambda n: delta(n)["delta"])
        d = delta(best)
        lines.append(
            f"**TensorRT (ModelOpt Q/DQ):** ship `{best}`: {100 * d['delta']:+.2f} points on {subset} "
            f"([{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]). On ORT CPU it runs at {lat[best] / lat['fp32']:.2f}× FP32 "
            f"latency, since ORT fuses only {vals[best]['ort_cpu']['QLinearConv']} of its Convs: its placement is for "
            "TensorRT, whose speed this CPU machine cannot measure."
        )  # fmt: skip
    return "\n\n".join(lines)
