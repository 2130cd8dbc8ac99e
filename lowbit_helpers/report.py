"""Tables, figures and the markdown summary, all read from a run's recorded outputs."""

from __future__ import annotations

import math

import pandas as pd

from .artifacts import read_json, write_json
from .rundir import RunDir
from . import stages


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def model_table(info: dict) -> pd.DataFrame:
    rows = [
        ("model", info["label"]),
        ("source", f"{info['source_kind']}: {info['source_path'] or info['source']}"),
        ("source SHA-256", info.get("source_sha256") or "—"),
        ("inputs", "; ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in info["inputs"])),
        ("outputs", "; ".join(f"{o['name']} {o['shape']} {o['dtype']}" for o in info["outputs"])),
        ("opset", info["opset"]),
        ("parameters", f"{info['parameters'] / 1e6:.2f} M"),
        ("MACs", f"{info['macs'] / 1e9:.2f} G ({2 * info['macs'] / 1e9:.1f} GFLOPs)"),
        ("Conv nodes", info["op_counts"].get("Conv", 0)),
        ("ONNX size", f"{info['file_bytes'] / 2**20:.1f} MiB"),
    ]
    if "torch_vs_onnx_max_abs" in info:
        d = info["torch_vs_onnx_max_abs"]
        rows.append(("ONNX vs torch, raw head", f"max abs Δ {d['max_abs']:.1e} (DFL {d['max_abs_dfl']:.1e}, class logits "
                     f"{d['max_abs_cls_logit']:.1e}, scores {d['max_abs_cls_score']:.1e}, relative {d['max_rel']:.1e}) "
                     f"on {d['image']}; torch float32 vs float64: {d['float32_floor']:.1e}"))
    return pd.DataFrame(rows, columns=["", "value"]).set_index("")


def baseline_table(run: RunDir) -> pd.DataFrame:
    """FP32 accuracy and latency in one row (accuracy blank for structure-only models)."""
    info = read_json(run.artifact(stages.MODEL_INFO))
    metrics = read_json(run.artifact(stages.FP32_METRICS))
    lat = read_json(run.artifact(stages.FP32_LATENCY))
    row = {"model": info["label"], "precision": "FP32", "params (M)": round(info["parameters"] / 1e6, 2),
           "GMACs": round(info["macs"] / 1e9, 2), "size (MiB)": round(info["file_bytes"] / 2**20, 1)}  # fmt: skip
    if metrics.get("structure_only"):
        row.update({"subset": "—", "mAP50-95": "structure only", "95% interval": "—", "mAP50": "—", "mAP75": "—"})
    else:
        m, b = metrics["metrics"], metrics.get("bootstrap")
        row.update({
            "subset": f"{metrics['subset']} ({m['num_images']} img)",
            "mAP50-95": _pct(m["mAP_50_95"]),
            "95% interval": f"[{_pct(b['lo'])}, {_pct(b['hi'])}]" if b else "—",
            "mAP50": _pct(m["mAP_50"]), "mAP75": _pct(m["mAP_75"]),
            "AP S/M/L": f"{_pct(m['mAP_small'])} / {_pct(m['mAP_medium'])} / {_pct(m['mAP_large'])}",
        })  # fmt: skip
    row.update({"decode": metrics.get("decode", {}).get("mode", "—"),
                f"median ms ({lat['threads']} thr)": round(lat["median_ms"], 1), "p90 ms": round(lat["p90_ms"], 1),
                "img/s": round(lat["throughput_fps"], 1)})  # fmt: skip
    return pd.DataFrame([row])


def parity_table(run: RunDir) -> pd.DataFrame | None:
    p = read_json(run.artifact(stages.PARITY))
    if "skipped" in p:
        return None
    df = pd.DataFrame(p["rows"])
    ref = df.set_index("variant").loc["ultralytics_onnx_e2e", "mAP_50_95"]
    df["Δ mAP50-95 vs Ultralytics ONNX e2e (points)"] = ((df["mAP_50_95"] - ref) * 100).round(3)
    for c in ("mAP_50_95", "mAP_50", "mAP_75"):
        df[c] = (df[c] * 100).round(2)
    df["seconds"] = df["seconds"].round(0)
    return df.set_index("variant")


def parity_verdict(run: RunDir) -> str:
    p = read_json(run.artifact(stages.PARITY))
    if "skipped" in p:
        return f"Parity check skipped: {p['skipped']}."
    d = p["difference_topk_vs_e2e"]
    verdict = "PASS" if p["passed"] else "FAIL"
    return (f"{verdict}: top-k decode minus Ultralytics end-to-end ONNX on {p['subset']} ({p['num_images']} images) = "
            f"{d['delta']:+.5f} mAP50-95 (tolerance ±{p['tolerance']}), 95% interval [{d['lo']:+.5f}, {d['hi']:+.5f}].")  # fmt: skip


def per_class_frame(run: RunDir) -> pd.DataFrame | None:
    metrics = read_json(run.artifact(stages.FP32_METRICS))
    if metrics.get("structure_only"):
        return None
    s = pd.Series(metrics["per_class_ap"], name="AP50-95").dropna().sort_values()
    return s.to_frame()


def per_class_figure(run: RunDir, n: int = 12):
    import matplotlib.pyplot as plt

    df = per_class_frame(run)
    if df is None or df.empty:
        return None
    s = df["AP50-95"]
    pick = pd.concat([s.head(n), s.tail(n)]) if len(s) > 2 * n else s
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(pick) + 1))
    colors = ["#c44e52" if i < min(n, len(pick) // 2) else "#4c72b0" for i in range(len(pick))]
    ax.barh(pick.index, pick.values * 100, color=colors)
    ax.set_xlabel("AP50-95 (%)")
    ax.set_title(f"FP32 per-class AP: {n} weakest (red) and strongest (blue) classes")
    fig.tight_layout()
    return fig


def provenance(run: RunDir) -> pd.DataFrame:
    m = run.manifest()
    rows = [{"artifact": k, "sha256": v["sha256"][:16] + "…", "bytes": v["bytes"], "stage": v["stage"]}
            for k, v in sorted(m["artifacts"].items())]  # fmt: skip
    return pd.DataFrame(rows)


def write_summary(run: RunDir, int8_result: dict | None = None, sensitivity_result: dict | None = None) -> str:
    """``summary.md`` in the run directory: the tables of this report as markdown."""
    parts = [f"# {run.cfg.name}: YOLOv10 low-bit report", "", run.cfg.description.strip(), ""]
    parts += ["## Model", "", model_table(read_json(run.artifact(stages.MODEL_INFO))).to_markdown(), ""]
    parts += ["## FP32 baseline", "", baseline_table(run).to_markdown(index=False), ""]
    pt = parity_table(run)
    parts += ["## Parity with Ultralytics", "", parity_verdict(run), ""]
    if pt is not None:
        parts += [pt.drop(columns=["what"]).to_markdown(), ""]
    if int8_result and "skipped" not in int8_result:
        parts += ["## INT8 baselines", "", int8_table(int8_result).to_markdown(), "", int8_conclusion(int8_result), ""]
        breakdown = latency_breakdown(int8_result)
        if breakdown is not None:
            parts += ["Where the time goes (ORT profiler, kernel time per run):", "", breakdown.to_markdown(), ""]
    if sensitivity_result and "skipped" not in sensitivity_result:
        from . import report_sensitivity as rs

        parts += ["## Per-layer sensitivity", "", rs.cost_table(sensitivity_result).to_markdown(), "",
                  rs.conclusion(sensitivity_result), "", "Schemes (JSON in `schemes/` beside this report):", "",
                  rs.scheme_table(sensitivity_result["schemes"], sensitivity_result["sensitivity"]["params"]).to_markdown(), ""]  # fmt: skip
    text = "\n".join(parts)
    from .artifacts import atomic_path

    with atomic_path(run.file("summary.md")) as tmp:
        tmp.write_text(text)
    write_json(run.file("results/summary.json"), {"baseline": baseline_table(run).to_dict(orient="records")})
    run.finish("summary", "always", ["summary.md", "results/summary.json"])
    return text


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(readme, summary_md, run_id: str) -> None:
    """Replace the README's results block with a run's ``summary.md`` (headings demoted)."""
    from pathlib import Path

    readme, text = Path(readme), Path(summary_md).read_text()
    body = "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines())
    block = f"{README_START}\n_From `reports/{run_id}/summary.md`, written by the run itself._\n\n{body.strip()}\n{README_END}"
    current = readme.read_text()
    if README_START not in current or README_END not in current:
        raise ValueError(f"{readme} has no {README_START} … {README_END} block")
    head, rest = current.split(README_START, 1)
    readme.write_text(head + block + rest.split(README_END, 1)[1])


# ------------------------------------------------------------------ notebook 03: INT8
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
            row[f"mAP50-95 {subset}"] = _pct(c["metrics"]["mAP_50_95"])
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
    return _tidy(pd.DataFrame(rows).set_index("variant"))


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Blank cells as '—', and whole numbers without a trailing .0 (pandas made them floats)."""

    def fmt(x):
        if isinstance(x, float) and math.isnan(x):
            return "—"
        if isinstance(x, float) and x.is_integer() and abs(x) >= 10:
            return str(int(x))
        return x

    return df.astype(object).apply(lambda col: col.map(fmt))


def latency_breakdown(result: dict) -> pd.DataFrame | None:
    """Where each model's time goes under ORT's profiler: Conv kernels against FP32's, and the rest.

    The INT8 speed-up is bounded by the Conv kernels' ratio, which depends on the CPU's int8
    instructions (``cpu_int8_isa``), and by what the Q/DQ graph adds outside the Convs
    (QLinearSigmoid + QLinearMul for SiLU instead of FP32's fused QuickGelu, for instance).
    """
    from .runtime import CONV_OPS, compare_profiles

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
    return _tidy(pd.DataFrame(rows).set_index("model"))


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
                from .runtime import compare_profiles

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
        met = "meets" if -d["delta"] * 100 <= target_points else "misses"
        lines.append(
            f"**CPU (ONNX Runtime):** ship `{best}`: mAP50-95 {100 * d['delta']:+.2f} points vs FP32 on {subset} "
            f"(95% interval [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]), {lat[best] / lat['fp32']:.2f}× FP32 latency, "
            f"{vals[best]['ort_cpu']['QLinearConv']} of {vals[best]['qdq']['Conv']} Convs as QLinearConv. "
            f"It {met} the {target_points}-point drop target."
        )  # fmt: skip
        profiles = result.get("profiles") or {}
        if "fp32" in profiles and best in profiles:
            from .runtime import compare_profiles

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
