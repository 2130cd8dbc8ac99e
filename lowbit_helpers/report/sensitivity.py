"""Notebook 04's tables and figures (also shown by the summary).

All read from :func:`lowbit_helpers.steps.sensitivity.run_sensitivity`'s result.
"""

from __future__ import annotations

import math

import pandas as pd

from ..schema import Skipped
from ..sensitivity.validation import rho
from ..steps.sensitivity import SensitivityResult

SECTION_COLORS = {"backbone": "#dbe9f6", "neck": "#fbe5d6", "head": "#e2f0d9", "?": "#eeeeee"}


def _gain(rec: dict, all_values: dict, metric: str) -> float:
    return rec["kept"][metric] - all_values[metric] if "kept" in rec else math.nan


def layer_frame(result: SensitivityResult) -> pd.DataFrame:
    """One row per Conv in network (layer) order, with every format's alone value and kept gain of the
    ranking metric (dB)."""
    rows = []
    sens = result.sensitivity
    metric = sens["metric"]
    for i, layer in enumerate(result.layers):
        row = {"#": i, "node": layer["node"], "layer": layer["layer"], "block": layer["block"], "section": layer["section"],
               "params": layer["params"]}  # fmt: skip
        for fmt, sweep in sens["formats"].items():
            rec = sweep["records"][layer["node"]]
            row[f"{fmt} alone dB"] = rec["alone"][metric] if "alone" in rec else math.nan
            row[f"{fmt} kept gain dB"] = _gain(rec, sweep["all"], metric)
        rows.append(row)
    # network order = Ultralytics layer order (the ONNX graph interleaves the head's branches
    # with the neck's last layers); within a layer, graph order
    df = pd.DataFrame(rows).sort_values(["layer", "#"], kind="stable").reset_index(drop=True)
    df["#"] = range(len(df))
    return df


def cost_table(result: SensitivityResult) -> pd.DataFrame:
    """Per format: the sweep's measured time and memory against the naive cost, and the all-in-format metrics."""
    sens = result.sensitivity
    metric = sens["metric"]
    rows = []
    for fmt, s in sens["formats"].items():
        naive = s.get("naive", {})
        est = naive.get("estimated_seconds", math.nan)
        rows.append({
            "format": fmt, "Convs": len(s["records"]), "directions": " + ".join(s["directions"]), "images": s["images"],
            "workers × threads": f"{s['workers']} × {s['threads_per_worker']}",
            "sweep s (measured)": round(s["seconds"]["total"], 1),
            "peak memory GB": round(s.get("peak_rss_gb", math.nan), 2),
            "naive s (from measured perturbations)": round(est, 1),
            "speed-up": round(est / s["seconds"]["total"], 2) if naive else math.nan,
            "naive = cached (max |Δ| dB)": naive.get("max_abs_difference_db", math.nan),
            f"all Convs in format: {metric} dB": round(s["all"][metric], 2),
            "all Convs in format: raw-head SQNR dB": round(s["all"]["raw_sqnr"], 2),
        })  # fmt: skip
    return pd.DataFrame(rows).set_index("format")


def _spearman(a, b) -> float:
    return rho(a, b)


def stability_table(result: SensitivityResult) -> pd.DataFrame:
    """How the ranking settles with the image count: Spearman of the ranking metric after N sweep
    images against all of them, per format and direction."""
    sens = result.sensitivity
    metric = sens["metric"]
    rows = []
    for fmt, s in sens["formats"].items():
        full = s["records"]
        for d in s["directions"]:
            row = {"format": fmt, "direction": d}
            for n, recs in sorted(s.get("at_images", {}).items(), key=lambda kv: int(kv[0])):
                convs = list(full)
                row[f"{n} images"] = round(_spearman([recs[c][d][metric] for c in convs], [full[c][d][metric] for c in convs]), 3)
            row[f"{s['images']} images"] = 1.0
            rows.append(row)
    return pd.DataFrame(rows).set_index(["format", "direction"])


def format_agreement(result: SensitivityResult) -> pd.DataFrame:
    """Spearman between the formats' rankings (ranking metric), per direction: formats that rank
    alike need not both be swept."""
    sens = result.sensitivity
    metric = sens["metric"]
    fmts = list(sens["formats"])
    rows = []
    for i, a in enumerate(fmts):
        for b in fmts[i + 1 :]:
            ra, rb = sens["formats"][a]["records"], sens["formats"][b]["records"]
            for d in set(sens["formats"][a]["directions"]) & set(sens["formats"][b]["directions"]):
                convs = list(ra)
                rows.append({"formats": f"{a} vs {b}", "direction": d,
                             "Spearman": round(_spearman([ra[c][d][metric] for c in convs], [rb[c][d][metric] for c in convs]), 3),
                             "top-10 overlap": len(set(sorted(convs, key=lambda c: ra[c][d][metric] * (1 if d == "alone" else -1))[:10])
                                                   & set(sorted(convs, key=lambda c: rb[c][d][metric] * (1 if d == "alone" else -1))[:10]))})  # fmt: skip
    return pd.DataFrame(rows).set_index(["formats", "direction"]) if rows else pd.DataFrame()


def sensitivity_figure(result: SensitivityResult):
    """The ranking metric alone (top) and its kept gain (bottom) per Conv in network order, sections shaded, blocks labelled."""
    import matplotlib.pyplot as plt  # late: matplotlib only for figures

    df = layer_frame(result)
    metric = result.sensitivity["metric"]
    formats = list(result.sensitivity["formats"])
    has_kept = any(df[f"{f} kept gain dB"].notna().any() for f in formats)
    fig, axes = plt.subplots(2 if has_kept else 1, 1, figsize=(15, 8 if has_kept else 4.5), sharex=True, squeeze=False)
    x = df["#"].to_numpy()
    for ax, col, ylabel in zip(axes[:, 0], ["alone dB", "kept gain dB"],
                               [f"{metric}, only this layer quantized (dB)\nlower = more sensitive",
                                f"{metric} gain when only this layer\nstays float (dB); higher = more sensitive"]):  # fmt: skip
        for fmt in formats:
            ax.plot(x, df[f"{fmt} {col}"], marker="o", ms=3, lw=1, label=fmt)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        _shade_blocks(ax, df)
    axes[0, 0].legend(loc="upper left", ncol=len(formats))
    axes[-1, 0].set_xlabel("Conv node, network order (labels: layer index · block)")
    fig.tight_layout()
    return fig


def _shade_blocks(ax, df: pd.DataFrame) -> None:
    starts = df.index[df["layer"].ne(df["layer"].shift())].tolist() + [len(df)]
    top = ax.get_ylim()[1]
    for a, b in zip(starts[:-1], starts[1:]):
        row = df.iloc[a]
        ax.axvspan(a - 0.5, b - 0.5, color=SECTION_COLORS.get(row["section"], "#eeeeee"), alpha=0.6, lw=0, zorder=0)
        if row["block"] not in ("Conv", "?") or b - a > 2:
            ax.text((a + b - 1) / 2, top, f"{row['layer']}·{row['block']}", rotation=90, va="top", ha="center", fontsize=7)


def top_table(result: SensitivityResult, fmt: str | None = None, n: int = 15) -> pd.DataFrame:
    """The ``n`` most sensitive Convs by the kept gain (alone SQNR when there is no kept sweep) of ``fmt``."""
    df = layer_frame(result)
    fmt = fmt or next(iter(result.sensitivity["formats"]))
    key = f"{fmt} kept gain dB"
    if df[key].notna().all():
        df = df.sort_values(key, ascending=False)
    else:
        df = df.sort_values(f"{fmt} alone dB")
    return df.head(n).drop(columns=["#"]).round(2).set_index("node")


def scatter_figure(proxy: dict):
    """Torch proxy vs ONNX graph: raw-head SQNR of each layer alone."""
    import matplotlib.pyplot as plt  # late: matplotlib only for figures

    if not proxy.get("rows"):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 5))
    rows = proxy["rows"]
    ax.scatter([r["onnx_sqnr_db"] for r in rows], [r["torch_sqnr_db"] for r in rows], s=14)
    lo = min(min(r["onnx_sqnr_db"], r["torch_sqnr_db"]) for r in rows)
    hi = max(max(r["onnx_sqnr_db"], r["torch_sqnr_db"]) for r in rows)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"ONNX graph: raw-head SQNR, layer alone in {proxy['sweep']['format']} (dB)")
    ax.set_ylabel("Torch proxy: same (dB)")
    ax.set_title(f"Torch proxy vs ONNX: Spearman {proxy['spearman']:.3f} ({len(rows)} layers)")
    fig.tight_layout()
    return fig


METRIC_LABELS = {
    "raw_sqnr": "raw-head SQNR", "score_sqnr": "class-score SQNR", "fg_score_sqnr": "foreground class-score SQNR",
    "fg_box_sqnr": "foreground box SQNR (pixels)", "det_sqnr": "detection SQNR (foreground scores + boxes)",
    "label_free_map": "label-free mAP (vs FP32 detections)", "torch_proxy": "Torch proxy (raw-head SQNR, RTN weights)",
}  # fmt: skip


def _label(metric: str) -> str:
    if metric.startswith("sweep:"):
        return f"{METRIC_LABELS.get(metric[6:], metric[6:])}, default sweep (RTN weights)"
    return METRIC_LABELS.get(metric, metric)


def committed_label(validation: dict) -> str:
    """Where a validation shown but not rerun comes from: the committed file, its date and commit."""
    made = validation.get("made_on") or {}
    calib = validation.get("made_by", {}).get("calibration", {}).get("images", "?")
    return (f"committed result `reports/{validation['committed']}`, made on {made.get('date', '?')} at commit "
            f"{made.get('commit', '?')} from the same model, COCO images and boxes, first {calib} calibration images, "
            "decoder, 4-bit method and metric code as this run (with its own study settings)")  # fmt: skip


def validation_table(validation: dict) -> pd.DataFrame:
    """Spearman of every metric with the true mAP delta: per study, on the selection split (where the
    metric is chosen) and on the rest (where it is confirmed, with the bootstrap interval over layers)."""
    table = validation["agreement"]["spearman"]
    rows = {}
    for study, metrics in table.items():
        n = next(iter(metrics.values()))["all"]["n"]
        for m, t in metrics.items():
            c = t["confirm"]
            row = rows.setdefault(m, {"metric": _label(m)})
            row[f"{study} ({n} layers): select"] = round(t["select"]["rho"], 2)
            row[f"{study}: confirm [95% CI]"] = f"{c['rho']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]"
    df = pd.DataFrame(list(rows.values()), index=list(rows))
    mean = validation["agreement"]["mean_select_rho"]
    df["mean select (alone)"] = [round(mean[m], 3) if m in mean else math.nan for m in df.index]
    return df.sort_values("mean select (alone)", ascending=False)


def reliability_table(validation: dict, metrics: tuple[str, ...] = ("det_sqnr", "score_sqnr")) -> pd.DataFrame:
    """How well the ground truth agrees with itself: per study, the Spearman of the layers' mAP
    deltas on the two halves of the confirmation split, and what it implies for each split (the
    reliability stepped up to the split's image count, and the ceiling a perfect metric could
    reach against it); for ``metrics``, the confirmation Spearman over that ceiling (the usual
    correction for attenuation: an estimate of its agreement with the noise-free ranking)."""
    rel = validation["agreement"].get("reliability") or {}
    table = validation["agreement"]["spearman"]
    rows = []
    for study, r in rel.items():
        h = r["split_half"]
        row = {"study": study, f"split-half Spearman ({r['half_images']} vs {r['half_images']} images) [95% CI]":
               f"{h['rho']:+.2f} [{h['lo']:+.2f}, {h['hi']:+.2f}]"}  # fmt: skip
        for part in ("select", "confirm"):
            p = r["splits"][part]
            row[f"{part} ({p['images']} images): reliability"] = round(p["reliability"], 2)
            row[f"{part}: ceiling on Spearman"] = round(p["ceiling"], 2)
        for m in metrics:
            if m in table.get(study, {}):
                rho = table[study][m]["confirm"]["rho"]
                row[f"{_label(m)}: confirm Spearman / ceiling"] = f"{rho:+.2f} / {r['splits']['confirm']['ceiling']:.2f} = {rho / r['splits']['confirm']['ceiling']:.2f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("study") if rows else pd.DataFrame()


def validation_figure(validation: dict, metrics: tuple[str, ...] = ("raw_sqnr",)):
    """Per study: the chosen metric (and raw-head SQNR) against the true mAP delta on the confirmation split."""
    import matplotlib.pyplot as plt  # late: matplotlib only for figures

    chosen = validation["agreement"]["chosen"]
    shown = [chosen] + [m for m in metrics if m != chosen]
    studies = validation["studies"]
    fig, axes = plt.subplots(len(shown), len(studies), figsize=(5.2 * len(studies), 4.2 * len(shown)), squeeze=False)
    for j, (name, st) in enumerate(studies.items()):
        rows = [r for r in st["rows"] if r["conv"] != "__all__"]
        for i, m in enumerate(shown):
            ax = axes[i, j]
            if m not in rows[0]["metrics"]:
                ax.set_visible(False)
                continue
            rho = validation["agreement"]["spearman"][name][m]["confirm"]
            ax.scatter([r["metrics"][m] for r in rows], [100 * r["delta_confirm"] for r in rows], s=16, color=f"C{i}")
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel(f"{_label(m)} (dB)" if m != "label_free_map" else _label(m))
            ax.set_ylabel(f"Δ mAP50-95 (points, {validation['confirm']})")
            ax.set_title(f"{name}: Spearman {rho['rho']:+.2f} [{rho['lo']:+.2f}, {rho['hi']:+.2f}]", fontsize=10)
    fig.tight_layout()
    return fig


def proxy_tables(proxy: dict, n: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(top-20 side by side, the ``n`` layers whose rank moves most between Torch and ONNX)."""
    top = pd.DataFrame({"ONNX graph": proxy["top20_onnx"], "Torch proxy": proxy["top20_torch"]})
    top.index = top.index + 1
    moves = sorted(proxy["rows"], key=lambda r: -abs(r["rank_shift"]))[:n]
    dis = pd.DataFrame(moves)[["node", "onnx_rank", "torch_rank", "rank_shift", "onnx_sqnr_db", "torch_sqnr_db"]]
    return top, dis.round(2).set_index("node")


def scheme_table(schemes: list[dict], params: dict) -> pd.DataFrame:
    if not schemes:  # e.g. only w8a8-ort swept: ORT's own file, no scheme
        return pd.DataFrame({"scheme": [], "note": []}).set_index("scheme")
    total = sum(params.values())
    rows = []
    for s in schemes:
        nodes = s["nodes"]
        counts = pd.Series(list(nodes.values())).value_counts().to_dict()
        four = sum(params[n] for n, p in nodes.items() if p.startswith("w4"))
        rows.append({"scheme": s["name"], "kind": s["kind"],
                     "layers per precision": ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                     "4-bit weight share %": round(100 * four / total, 2),
                     "rule": f"keep top {s['k']} by {s['ranked_by']} in fp32" if s["kind"] == "top-k" else s["rule"]})  # fmt: skip
    return pd.DataFrame(rows).set_index("scheme")


def conclusion(result: SensitivityResult) -> str:
    sens, proxy, val = result.sensitivity, result.proxy, result.validation
    metric = sens["metric"]
    lines = []
    for fmt, s in sens["formats"].items():
        recs = s["records"]
        worst = min(recs, key=lambda c: recs[c]["alone"][metric]) if all("alone" in r for r in recs.values()) else None
        naive = s.get("naive")
        cost = (f"{s['seconds']['total']:.0f} s for {len(recs)} Convs × {len(s['directions'])} direction(s) on {s['images']} images "
                f"({s['workers']} workers), peak {s.get('peak_rss_gb', math.nan):.1f} GB"
                + (f" (naive: {naive['estimated_seconds']:.0f} s, ×{naive['estimated_seconds'] / s['seconds']['total']:.1f})" if naive else ""))  # fmt: skip
        worst_text = f"; most sensitive alone: `{worst}` ({recs[worst]['alone'][metric]:.1f} dB)" if worst else ""
        lines.append(f"* **{fmt}**: all Convs in {fmt} give {metric} {s['all'][metric]:.1f} dB (raw-head SQNR "
                     f"{s['all']['raw_sqnr']:.1f} dB){worst_text}. Sweep cost {cost}.")  # fmt: skip
    if not isinstance(val, Skipped):
        a = val["agreement"]
        src = f" ({committed_label(val)}; rerun: `python -m lowbit_helpers validate-sensitivity PARAMS`)" if val.get("committed") else ""

        def spear(m: str) -> str:
            parts = []
            for name, table in a["spearman"].items():
                t = table.get(m)
                if t:
                    c = t["confirm"]
                    parts.append(f"{name} {t['select']['rho']:+.2f} on {val['select']}, {c['rho']:+.2f} "
                                 f"[{c['lo']:+.2f}, {c['hi']:+.2f}] on {val['confirm']}")  # fmt: skip
            return "; ".join(parts)

        if a["chosen"]:
            pick = f"**{_label(a['chosen'])}** is chosen ({a['rule']}): Spearman {spear(a['chosen'])}."
        else:
            pick = (f"no metric is chosen: on {val['select']} none ranks the layers (best there: `{a['best_on_select']}`, "
                    f"{spear(a['best_on_select'])}), so the rule ({a['rule']}) makes no pick.")  # fmt: skip
        lines.append(f"* Metric validation{src}: {pick} The sweep ranks by **`{metric}`**: {spear(metric)}; raw-head "
                     f"SQNR: {spear('raw_sqnr')}.")  # fmt: skip
    else:
        lines.append(f"* Metric validation: {val.why}.")
    if not isinstance(proxy, Skipped):
        lines.append(f"* Torch proxy vs ONNX graph ({proxy['sweep']['format']}, alone, raw-head SQNR): Spearman {proxy['spearman']:.3f}; "
                     f"{proxy['top20_overlap']} of the top 20 agree; {len(proxy['unmapped_onnx'])} ONNX Convs unmapped; torch "
                     f"Convs outside the raw-head graph: {', '.join(proxy['unused_torch']) or 'none'}.")  # fmt: skip
        if proxy.get("spearman_vs_onnx_kept") is not None:
            lines.append(f"* The proxy's *alone* ranking against the ONNX *kept* ranking (what top-K schemes use): Spearman "
                         f"{proxy['spearman_vs_onnx_kept']:.3f}.")  # fmt: skip
    return "\n".join(lines)
