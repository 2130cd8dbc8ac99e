"""Notebooks 01 and 02's tables and figures (also shown by the summary), read from the run's recorded outputs."""

from __future__ import annotations

import pandas as pd

from ..rundir import RunDir
from ..schema import Skipped
from ..steps.baseline import FP32_LATENCY, FP32_METRICS, MODEL_INFO, PARITY
from .common import pct, shown_path


def model_table(info: dict) -> pd.DataFrame:
    rows = [
        ("model", info["label"]),
        ("source", f"{info['source_kind']}: {shown_path(info['source_path']) or info['source']}"),
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


def baseline_table(run: RunDir, bench_ms: float | None = None, latency: bool = True) -> pd.DataFrame:
    """FP32 accuracy and latency in one row (accuracy blank for structure-only models).

    ``bench_ms``: FP32's median from the report's one interleaved bench, shown instead of
    notebook 01's own timing, so that the report has one FP32 latency; ``latency=False``: no latency."""
    info = run.read(MODEL_INFO)
    metrics = run.read(FP32_METRICS)
    lat = run.read(FP32_LATENCY)
    row = {"model": info["label"], "precision": "FP32", "params (M)": round(info["parameters"] / 1e6, 2),
           "GMACs": round(info["macs"] / 1e9, 2), "size (MiB)": round(info["file_bytes"] / 2**20, 1)}  # fmt: skip
    if metrics.get("structure_only"):
        row.update({"subset": "—", "mAP50-95": "structure only", "95% interval": "—", "mAP50": "—", "mAP75": "—"})
    else:
        m, b = metrics["metrics"], metrics.get("bootstrap")
        row.update({
            "subset": f"{metrics['subset']} ({m['num_images']} img)",
            "mAP50-95": pct(m["mAP_50_95"]),
            "95% interval": f"[{pct(b['lo'])}, {pct(b['hi'])}]" if b else "—",
            "mAP50": pct(m["mAP_50"]), "mAP75": pct(m["mAP_75"]),
            "AP S/M/L": f"{pct(m['mAP_small'])} / {pct(m['mAP_medium'])} / {pct(m['mAP_large'])}",
        })  # fmt: skip
    row["decode"] = metrics.get("decode", {}).get("mode", "—")
    if latency and bench_ms:
        row[f"median ms ({lat['threads']} thr, the report's bench)"] = round(bench_ms, 1)
    elif latency:
        row.update({f"median ms ({lat['threads']} thr)": round(lat["median_ms"], 1), "p90 ms": round(lat["p90_ms"], 1),
                    "img/s": round(lat["throughput_fps"], 1)})  # fmt: skip
    return pd.DataFrame([row])


def parity_table(run: RunDir) -> pd.DataFrame | None:
    p = Skipped.read(run.read(PARITY))
    if isinstance(p, Skipped):
        return None
    df = pd.DataFrame(p["rows"])
    ref = df.set_index("variant").loc["ultralytics_onnx_e2e", "mAP_50_95"]
    df["Δ mAP50-95 vs Ultralytics ONNX e2e (points)"] = ((df["mAP_50_95"] - ref) * 100).round(3)
    for c in ("mAP_50_95", "mAP_50", "mAP_75"):
        df[c] = (df[c] * 100).round(2)
    df["seconds"] = df["seconds"].round(0)
    return df.set_index("variant")


def parity_verdict(run: RunDir) -> str:
    p = Skipped.read(run.read(PARITY))
    if isinstance(p, Skipped):
        return f"Parity check skipped: {p.why}."
    d = p["difference_topk_vs_e2e"]
    verdict = "PASS" if p["passed"] else "FAIL"
    return (f"{verdict}: top-k decode minus Ultralytics end-to-end ONNX on {p['subset']} ({p['num_images']} images) = "
            f"{d['delta']:+.5f} mAP50-95 (tolerance ±{p['tolerance']}), 95% interval [{d['lo']:+.5f}, {d['hi']:+.5f}].")  # fmt: skip


def per_class_frame(run: RunDir) -> pd.DataFrame | None:
    metrics = run.read(FP32_METRICS)
    if metrics.get("structure_only"):
        return None
    s = pd.Series(metrics["per_class_ap"], name="AP50-95").dropna().sort_values()
    return s.to_frame()


def per_class_figure(run: RunDir, n: int = 12):
    import matplotlib.pyplot as plt  # late: matplotlib only for figures

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
