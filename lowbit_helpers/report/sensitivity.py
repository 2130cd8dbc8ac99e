"""Notebook 04's tables and figures (also shown by the summary).

All read from :func:`lowbit_helpers.steps.sensitivity.run_sensitivity`'s result.
"""

from __future__ import annotations

import math

import pandas as pd

SECTION_COLORS = {"backbone": "#dbe9f6", "neck": "#fbe5d6", "head": "#e2f0d9", "?": "#eeeeee"}


def _gain(rec: dict, all_db: float) -> float:
    return rec["kept_sqnr_db"] - all_db if "kept_sqnr_db" in rec else math.nan


def layer_frame(result: dict) -> pd.DataFrame:
    """One row per Conv in network (layer) order, with every format's alone SQNR and kept gain (dB)."""
    rows = []
    sens = result["sensitivity"]
    for i, layer in enumerate(result["layers"]):
        row = {"#": i, "node": layer["node"], "layer": layer["layer"], "block": layer["block"], "section": layer["section"],
               "params": layer["params"]}  # fmt: skip
        for fmt, sweep in sens["formats"].items():
            rec = sweep["records"][layer["node"]]
            row[f"{fmt} alone dB"] = rec.get("alone_sqnr_db", math.nan)
            row[f"{fmt} kept gain dB"] = _gain(rec, sweep["all_sqnr_db"])
        rows.append(row)
    # network order = Ultralytics layer order (the ONNX graph interleaves the head's branches
    # with the neck's last layers); within a layer, graph order
    df = pd.DataFrame(rows).sort_values(["layer", "#"], kind="stable").reset_index(drop=True)
    df["#"] = range(len(df))
    return df


def cost_table(result: dict) -> pd.DataFrame:
    """Per format: the cached sweep's measured time against the naive cost, and the all-in-format SQNR."""
    sens = result["sensitivity"]
    rows = []
    for fmt, s in sens["formats"].items():
        naive = s.get("naive", {})
        est = naive.get("estimated_seconds", math.nan)
        rows.append({
            "format": fmt, "Convs": len(s["records"]), "directions": " + ".join(s["directions"]), "images": s["images"],
            "sweep s (measured)": round(s["seconds"]["total"], 1),
            "naive s (from measured perturbations)": round(est, 1),
            "speed-up": round(est / s["seconds"]["total"], 2) if naive else math.nan,
            "naive = cached (max |Δ| dB)": naive.get("max_abs_sqnr_difference_db", math.nan),
            "all Convs in format: SQNR dB": round(s["all_sqnr_db"], 2),
        })  # fmt: skip
    return pd.DataFrame(rows).set_index("format")


def sensitivity_figure(result: dict):
    """Alone SQNR (top) and kept gain (bottom) per Conv in network order, sections shaded, blocks labelled."""
    import matplotlib.pyplot as plt

    df = layer_frame(result)
    formats = list(result["sensitivity"]["formats"])
    has_kept = any(df[f"{f} kept gain dB"].notna().any() for f in formats)
    fig, axes = plt.subplots(2 if has_kept else 1, 1, figsize=(15, 8 if has_kept else 4.5), sharex=True, squeeze=False)
    x = df["#"].to_numpy()
    for ax, col, ylabel in zip(axes[:, 0], ["alone dB", "kept gain dB"],
                               ["SQNR, only this layer quantized (dB)\nlower = more sensitive",
                                "SQNR gain when only this layer\nstays float (dB); higher = more sensitive"]):  # fmt: skip
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


def top_table(result: dict, fmt: str | None = None, n: int = 15) -> pd.DataFrame:
    """The ``n`` most sensitive Convs by the kept gain (alone SQNR when there is no kept sweep) of ``fmt``."""
    df = layer_frame(result)
    fmt = fmt or next(iter(result["sensitivity"]["formats"]))
    key = f"{fmt} kept gain dB"
    if df[key].notna().all():
        df = df.sort_values(key, ascending=False)
    else:
        df = df.sort_values(f"{fmt} alone dB")
    return df.head(n).drop(columns=["#"]).round(2).set_index("node")


def scatter_figure(proxy: dict, check: dict):
    """Torch proxy vs ONNX SQNR, and the cheap metric vs mAP of the checked layers."""
    import matplotlib.pyplot as plt

    proxy = proxy if proxy.get("rows") else {"skipped": "no mapped layers"}
    check = check if check.get("rows") else {"skipped": "no layers checked"}
    panels = [p for p in (proxy, check) if "skipped" not in p]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    i = 0
    if "skipped" not in proxy:
        ax = axes[0, i]
        rows = proxy["rows"]
        ax.scatter([r["onnx_sqnr_db"] for r in rows], [r["torch_sqnr_db"] for r in rows], s=14)
        lo = min(min(r["onnx_sqnr_db"], r["torch_sqnr_db"]) for r in rows)
        hi = max(max(r["onnx_sqnr_db"], r["torch_sqnr_db"]) for r in rows)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(f"ONNX graph: SQNR, layer alone in {proxy['sweep']['format']} (dB)")
        ax.set_ylabel("Torch proxy: same (dB)")
        ax.set_title(f"Torch proxy vs ONNX: Spearman {proxy['spearman']:.3f} ({len(rows)} layers)")
        i += 1
    if "skipped" not in check:
        ax = axes[0, i]
        rows = check["rows"]
        ax.scatter([r["alone_sqnr_db"] for r in rows], [100 * r["delta"] for r in rows], s=18, color="C1")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"SQNR, layer alone in {check['format']} (dB)")
        ax.set_ylabel(f"Δ mAP50-95 vs FP32 (points, {check['subset']})")
        ax.set_title(f"cheap metric vs mAP: Spearman {check['spearman_sqnr_vs_map']:.3f} ({len(rows)} layers)")
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


def conclusion(result: dict) -> str:
    sens, proxy, check = result["sensitivity"], result["proxy"], result["map_check"]
    lines = []
    for fmt, s in sens["formats"].items():
        recs = s["records"]
        worst = min(recs, key=lambda c: recs[c]["alone_sqnr_db"])
        naive = s.get("naive")
        cost = (f"{s['seconds']['total']:.0f} s for {len(recs)} Convs × {len(s['directions'])} direction(s) on {s['images']} images"
                + (f" (naive: {naive['estimated_seconds']:.0f} s, ×{naive['estimated_seconds'] / s['seconds']['total']:.1f})" if naive else ""))  # fmt: skip
        lines.append(f"* **{fmt}**: all Convs in {fmt} give {s['all_sqnr_db']:.1f} dB; most sensitive alone: `{worst}` "
                     f"({recs[worst]['alone_sqnr_db']:.1f} dB). Sweep cost {cost}.")  # fmt: skip
    if "skipped" not in check:
        lines.append(f"* The cheap metric ranks the {len(check['rows'])} checked layers like mAP on {check['subset']} with "
                     f"Spearman {check['spearman_sqnr_vs_map']:.2f} ({check['format']}, layer alone).")  # fmt: skip
    if "skipped" not in proxy:
        lines.append(f"* Torch proxy vs ONNX graph ({proxy['sweep']['format']}, alone): Spearman {proxy['spearman']:.3f}; "
                     f"{proxy['top20_overlap']} of the top 20 agree; {len(proxy['unmapped_onnx'])} ONNX Convs unmapped; torch "
                     f"Convs outside the raw-head graph: {', '.join(proxy['unused_torch']) or 'none'}.")  # fmt: skip
        if proxy.get("spearman_vs_onnx_kept") is not None:
            lines.append(f"* The proxy's *alone* ranking against the ONNX *kept* ranking (what top-K schemes use): Spearman "
                         f"{proxy['spearman_vs_onnx_kept']:.3f}.")  # fmt: skip
    return "\n".join(lines)
