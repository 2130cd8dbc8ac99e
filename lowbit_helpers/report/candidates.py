"""Notebook 05's tables, plots and verdicts (also shown by the summary).

All read from :func:`lowbit_helpers.steps.candidates.run_candidates`'s result. Targets are the
issue's, on YOLOv10n: "meets" means the whole 95 % interval satisfies the target, "compatible
with" that only the point estimate does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..steps.candidates import CONTROL_KINDS, CandidatesResult
from .common import fmt_delta, pct, tidy

# the low-bit targets (issue 22: "low-bit worth shipping")
W4A16_TARGET = 0.95  # uniform W4A16 keeps at least this share of FP32 mAP50-95
DROP_TARGET = 1.0  # points: a >= 75 % 4-bit candidate within this of FP32
SIZE_TARGET = 0.25  # that candidate's file at most this share of FP32's
LATENCY_TARGET = 0.65  # and its ORT CPU latency at most this share of FP32's


def _delta(s: dict) -> str:
    return fmt_delta(s["delta_vs_fp32"])


def _latency(result: CandidatesResult) -> dict:
    lat = result.latency or {}
    return {r["name"]: r for r in lat.get("rows", [])}


def _openvino(result: CandidatesResult) -> tuple[dict, dict]:
    """The same bench's OpenVINO rows ({label: row}) and the files OpenVINO refused ({label: why})."""
    lat = result.latency or {}
    return {r["name"]: r for r in lat.get("openvino_rows", [])}, lat.get("openvino_skipped", {})


def _openvino_ratio(result: CandidatesResult, label: str) -> float | str | None:
    """OpenVINO's median over ORT's FP32 median (one bench), "refused" where OpenVINO could not compile
    the file, None where OpenVINO was not timed."""
    ov, refused = _openvino(result)
    fp32 = _latency(result).get("fp32")
    if label in ov and fp32:
        return ov[label]["median_ms"] / fp32["median_ms"]
    return "refused" if label in refused else None


def ladder_table(result: CandidatesResult) -> pd.DataFrame:
    """The 4-bit method ladder: each method on each ladder scheme, on the selection split."""
    rows = []
    for r in result.ladder["rows"]:
        sub = r.get("select_subset", "selection")
        row = {"scheme": r["scheme"], "method": r["method"], "what it does": r["describe"],
               f"mAP50-95 {sub}": pct(r["select_mAP"]), f"Δ {sub} [95%]": _delta({"delta_vs_fp32": r["delta"]})}  # fmt: skip
        if "confirm_mAP" in r:
            row.update({f"mAP50-95 {r['confirm_subset']}": pct(r["confirm_mAP"]),
                        f"Δ {r['confirm_subset']} [95%]": _delta({"delta_vs_fp32": r["confirm_delta"]})})  # fmt: skip
        row.update({"raw-head SQNR dB": round(r["sqnr_db"], 1), "size (MiB)": round(r["size_bytes"] / 2**20, 2),
                    "build s": r["build_seconds"]})  # fmt: skip
        rows.append(row)
    return tidy(pd.DataFrame(rows).set_index(["scheme", "method"]))


def candidate_rows(result: CandidatesResult) -> list[dict]:
    """One record per candidate (plain numbers, for tables and plots)."""
    lat = _latency(result)
    fp32_ms = lat.get("fp32", {}).get("median_ms")
    out = []
    for name, rec in result.recipes.items():
        ev = result.evaluations[name]
        info = rec["materialize"]
        row = {"candidate": name, "kind": rec["scheme"].get("kind", ""), "form": rec.get("form", "scheme"),
               "precisions": info.get("deployed", info["precisions"]),
               "four_bit_share": info["four_bit_share"], "size_mib": ev["size_bytes"] / 2**20,
               "size_ratio": ev["size_bytes"] / result.fp32_size_bytes, "select": ev["select"],
               "confirm": ev.get("confirm"), "confirm_exact": ev.get("confirm_exact"),
               "confirm_openvino": ev.get("confirm_openvino"),
               "sqnr_db": ev["fidelity"]["sqnr_db"], "qdq": ev["qdq"], "ort_cpu": ev["ort_cpu"]}  # fmt: skip
        if name in lat and fp32_ms:
            row.update(median_ms=lat[name]["median_ms"], p90_ms=lat[name]["p90_ms"], latency_ratio=lat[name]["median_ms"] / fp32_ms,
                       load_mb=lat[name].get("load_mb"), openvino_ratio=_openvino_ratio(result, name))  # fmt: skip
        out.append(row)
    return out


def _reference_rows(result: CandidatesResult) -> list[dict]:
    """FP32 and notebook 03's best INT8 variant, from the same latency run as the candidates."""
    lat = _latency(result)
    fp32 = lat.get("fp32")
    rows = [{"candidate": "fp32", "precisions": "fp32 (all)", "size (MiB)": round(result.fp32_size_bytes / 2**20, 2),
             "× FP32 size": 1.0}]  # fmt: skip
    best = result.best_int8
    if best:
        for subset, c in best["coco"].items():
            if subset == result.evaluations[next(iter(result.evaluations))]["select"]["subset"]:
                d = c["delta_vs_fp32"]
                rows.append({"candidate": f"int8:{best['name']} (notebook 03)", "precisions": "ORT quantize_static",
                             f"mAP50-95 {subset}": pct(c["metrics"]["mAP_50_95"]),
                             f"Δ {subset} [95%]": fmt_delta(d)})  # fmt: skip
    for row in rows:
        key = "fp32" if row["candidate"] == "fp32" else f"int8:{best['name']}"
        if key in lat and fp32:
            r = lat[key]
            row.update({"median ms": round(r["median_ms"], 1), "p90 ms": round(r["p90_ms"], 1),
                        "× FP32": round(r["median_ms"] / fp32["median_ms"], 3), "load MiB": r.get("load_mb")})  # fmt: skip
            if (ov := _openvino_ratio(result, key)) is not None:
                row["OpenVINO × ORT FP32"] = round(ov, 3) if isinstance(ov, float) else ov
            if "size_bytes" in r:
                row.update({"size (MiB)": round(r["size_bytes"] / 2**20, 2), "× FP32 size": round(r["size_bytes"] / result.fp32_size_bytes, 3)})
    return rows


def candidate_table(result: CandidatesResult) -> pd.DataFrame:
    """Every candidate (with FP32 and the best INT8 variant above them): accuracy on both splits,
    fidelity, size, what ORT runs, latency and load memory."""
    rows = _reference_rows(result)
    cands = candidate_rows(result)
    confirmed = next((r for r in cands if r["confirm"]), None)
    for r in cands:
        s, m = r["select"], r["select"]["metrics"]
        row = {"candidate": r["candidate"],
               "precisions": ", ".join(f"{k} {v}" for k, v in sorted(r["precisions"].items())),
               "4-bit share %": round(100 * r["four_bit_share"], 1),
               f"mAP50-95 {s['subset']}": pct(m["mAP_50_95"]), f"Δ {s['subset']} [95%]": _delta(s)}  # fmt: skip
        if confirmed:  # the same columns for every row ("—" where a candidate was not confirmed)
            c = confirmed["confirm"]["subset"]
            row[f"mAP50-95 {c}"] = pct(r["confirm"]["metrics"]["mAP_50_95"]) if r["confirm"] else None
            row[f"Δ {c} [95%]"] = _delta(r["confirm"]) if r["confirm"] else None
            if any(x["confirm_exact"] for x in cands):
                row[f"Δ {c} exact Q/DQ"] = _delta(r["confirm_exact"]) if r["confirm_exact"] else None
            if any(x["confirm_openvino"] for x in cands):
                row[f"Δ {c} OpenVINO"] = _delta(r["confirm_openvino"]) if r["confirm_openvino"] else None
        row.update({"mAP50 / 75": f"{pct(m['mAP_50'])} / {pct(m['mAP_75'])}",
                    "raw-head SQNR dB": round(r["sqnr_db"], 1), "size (MiB)": round(r["size_mib"], 2),
                    "× FP32 size": round(r["size_ratio"], 3),
                    "Q/DQ nodes": r["qdq"]["QuantizeLinear"] + r["qdq"]["DequantizeLinear"],
                    "ORT runs": f"{r['ort_cpu']['QLinearConv']} QLinearConv, {r['ort_cpu']['float_Conv']} float Conv, "
                                f"{r['ort_cpu']['DequantizeLinear']} DQ"})  # fmt: skip
        if "median_ms" in r:
            row.update({"median ms": round(r["median_ms"], 1), "p90 ms": round(r["p90_ms"], 1),
                        "× FP32": round(r["latency_ratio"], 3), "load MiB": r.get("load_mb")})  # fmt: skip
            if (ov := r.get("openvino_ratio")) is not None:
                row["OpenVINO × ORT FP32"] = round(ov, 3) if isinstance(ov, float) else ov
        rows.append(row)
    columns = list(dict.fromkeys([k for row in rows[-1:] for k in row] + [k for row in rows for k in row]))
    return tidy(pd.DataFrame(rows, columns=columns).set_index("candidate"))


def guided_vs_random(result: CandidatesResult) -> pd.DataFrame | None:
    """The guided budget scheme against its random and heuristic controls, both splits."""
    names = ([result.guided] if result.guided else []) + list(result.controls)
    if len(names) < 2:
        return None
    rows = []
    for n in names:
        ev, rec = result.evaluations[n], result.recipes[n]
        row = {"scheme": n, "rule": rec["scheme"].get("rule", ""),
               "4-bit share %": round(100 * rec["materialize"]["four_bit_share"], 1),
               f"mAP50-95 {ev['select']['subset']}": pct(ev["select"]["metrics"]["mAP_50_95"]),
               f"Δ {ev['select']['subset']} [95%]": _delta(ev["select"])}  # fmt: skip
        if "confirm" in ev:
            row[f"mAP50-95 {ev['confirm']['subset']}"] = pct(ev["confirm"]["metrics"]["mAP_50_95"])
            row[f"Δ {ev['confirm']['subset']} [95%]"] = _delta(ev["confirm"])
        rows.append(row)
    return tidy(pd.DataFrame(rows).set_index("scheme"))


def guided_verdict(result: CandidatesResult) -> str:
    g = result.guided
    randoms = [n for n in result.controls if result.recipes[n]["scheme"].get("kind") == "random"]
    if not g or not randoms or "confirm" not in result.evaluations[g]:
        return "No guided-vs-random comparison in this run."
    ev = result.evaluations

    def conf(n):
        return ev[n]["confirm"]["metrics"]["mAP_50_95"]

    med = float(np.median([conf(n) for n in randoms]))
    sub = ev[g]["confirm"]["subset"]
    best_r = max(randoms, key=conf)
    gap = conf(g) - med
    lo_gap = (conf(g) - conf(best_r))
    if gap > 0:
        s = (f"**Sensitivity guidance earns its keep here**: on {sub} the guided scheme `{g}` scores {pct(conf(g))} "
             f"against a median of {pct(med)} for {len(randoms)} random schemes of the same 4-bit share "
             f"({100 * gap:+.2f} points; {100 * lo_gap:+.2f} against the best random draw).")  # fmt: skip
    else:
        s = (f"**Sensitivity guidance does not beat chance here**: on {sub} the guided scheme `{g}` scores {pct(conf(g))}, "
             f"the median of {len(randoms)} random schemes of the same 4-bit share {pct(med)} ({100 * gap:+.2f} points).")  # fmt: skip
    intervals = [ev[n]["confirm"]["delta_vs_fp32"] for n in [g, *randoms]]
    s += (" Each Δ to FP32 has its paired-bootstrap interval in the table; with "
          f"{ev[g]['confirm']['num_images']} images an interval is about "
          f"±{50 * np.mean([i['hi'] - i['lo'] for i in intervals]):.1f} points wide, so read gaps smaller than that as not shown.")
    return s


def target_lines(result: CandidatesResult) -> list[str]:
    """Each issue target: met / compatible / not met, with the measured numbers."""
    ev, rec = result.evaluations, result.recipes
    lines = []
    w16 = next((n for n in rec if rec[n]["scheme"].get("name") == "w4a16-top0" and rec[n].get("form") != "integer"), None)
    if w16 and "confirm" in ev[w16]:
        w = ev[w16]["confirm"]  # the confirmation split: the selection split chose the method on this very scheme
        keep = w["metrics"]["mAP_50_95"] / w["fp32_mAP_50_95"]
        d = w["delta_vs_fp32"]
        lo_keep = (w["fp32_mAP_50_95"] + d["lo"]) / w["fp32_mAP_50_95"]
        state = "met" if lo_keep >= W4A16_TARGET else ("compatible with the target" if keep >= W4A16_TARGET else "not met")
        lines.append(f"Uniform W4A16 (`{w16}`) keeps {100 * keep:.1f} % of FP32 mAP50-95 on {w['subset']} "
                     f"({pct(w['metrics']['mAP_50_95'])} vs {pct(w['fp32_mAP_50_95'])}; interval {100 * lo_keep:.1f}–"
                     f"{100 * (w['fp32_mAP_50_95'] + d['hi']) / w['fp32_mAP_50_95']:.1f} %): target ≥ {100 * W4A16_TARGET:.0f} % **{state}**.")  # fmt: skip
    lat = _latency(result)
    for integer in (False, True):
        best = None
        for n, r in rec.items():
            if ((r.get("form") == "integer") == integer and r["materialize"]["four_bit_share"] >= 0.75 and "confirm" in ev[n]
                    and r["scheme"].get("kind") not in CONTROL_KINDS):  # fmt: skip
                if best is None or ev[n]["select"]["metrics"]["mAP_50_95"] > ev[best]["select"]["metrics"]["mAP_50_95"]:
                    best = n
        if not best:
            continue
        c = ev[best]["confirm"]
        d = c["delta_vs_fp32"]
        state = "met" if d["lo"] >= -DROP_TARGET / 100 else ("compatible with the target" if d["delta"] >= -DROP_TARGET / 100 else "not met")
        size = ev[best]["size_bytes"] / result.fp32_size_bytes
        what = "integer-kernel form" if integer else "candidate"
        ex = ev[best].get("confirm_exact")
        exact = f" (exact Q/DQ arithmetic on the same images: {_delta(ex)})" if ex else ""
        text = (f"Best {what} with ≥ 75 % of conv weights in 4-bit, chosen on {ev[best]['select']['subset']}: `{best}` "
                f"({100 * rec[best]['materialize']['four_bit_share']:.1f} % 4-bit), Δ on {c['subset']} {_delta(c)}{exact}: "
                f"within {DROP_TARGET} points **{state}**; file {size:.2f}× FP32: ≤ {SIZE_TARGET}× "
                f"**{'met' if size <= SIZE_TARGET else 'not met'}**")  # fmt: skip
        if best in lat and "fp32" in lat:
            ratio = lat[best]["median_ms"] / lat["fp32"]["median_ms"]
            text += f"; ORT CPU latency {ratio:.2f}× FP32: ≤ {LATENCY_TARGET}× **{'met' if ratio <= LATENCY_TARGET else 'not met'}**"
            ov = _openvino_ratio(result, best)
            if isinstance(ov, float):
                acc = ev[best].get("confirm_openvino")
                text += (f" (under OpenVINO, same bench: {ov:.2f}× ORT's FP32"
                         + (f", Δ on {acc['subset']} {_delta(acc)} there)" if acc else ")"))  # fmt: skip
            elif ov == "refused":
                text += f" (OpenVINO cannot compile it: {_openvino(result)[1][best]})"
        lines.append(text + ".")
    return lines


def verdicts(result: CandidatesResult) -> pd.DataFrame | None:
    """Per budget: the candidate chosen on the selection split and its confirmation."""
    ev, rec = result.evaluations, result.recipes
    rows = []
    forms = [("scheme's arithmetic", w) for w in result.winners.values()]
    forms += [("integer kernels", w) for w in result.integer.get("winners", {}).values()]
    for form, w in forms:
        n = w["candidate"]
        row = {"budget (≥ % 4-bit)": w["budget_percent"], "form": form, "ship": n, "candidates eligible": w["eligible"],
               "4-bit share %": round(100 * rec[n]["materialize"]["four_bit_share"], 1),
               f"Δ {ev[n]['select']['subset']} (chosen on)": _delta(ev[n]["select"])}  # fmt: skip
        if "confirm" in ev[n]:
            row[f"Δ {ev[n]['confirm']['subset']} (confirmed on)"] = _delta(ev[n]["confirm"])
        row["× FP32 size"] = round(ev[n]["size_bytes"] / result.fp32_size_bytes, 3)
        lat = _latency(result)
        if n in lat and "fp32" in lat:
            row["× FP32 latency"] = round(lat[n]["median_ms"] / lat["fp32"]["median_ms"], 3)
        rows.append(row)
    return tidy(pd.DataFrame(rows).set_index("budget (≥ % 4-bit)")) if rows else None


def pareto_front(points: list[tuple[float, float]], lower_x_better: bool = True) -> list[int]:
    """Indices of the points no other point beats in both x (smaller) and y (larger)."""
    idx = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            idx.append(i)
    return idx


def pareto_figure(result: CandidatesResult):
    """mAP (selection split) against file size, ORT latency and 4-bit share; frontier marked, with
    notebook 03's INT8 pick (a star) from the same bench and split."""
    import matplotlib.pyplot as plt  # late: matplotlib only for figures

    rows = candidate_rows(result)
    lat = _latency(result)
    fp32_map = rows[0]["select"]["fp32_mAP_50_95"] if rows else None
    panels = [("size_ratio", "file size (× FP32)"), ("latency_ratio", "ORT CPU latency (× FP32)"),
              ("four_bit_share", "share of conv weights in 4-bit")]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (key, label) in zip(axes, panels):
        pts = [(r[key], 100 * r["select"]["metrics"]["mAP_50_95"], r["candidate"]) for r in rows
               if r.get(key) is not None and r["kind"] not in CONTROL_KINDS]  # fmt: skip
        ctrl = [(r[key], 100 * r["select"]["metrics"]["mAP_50_95"]) for r in rows if r.get(key) is not None and r["kind"] in CONTROL_KINDS]
        if not pts:
            ax.set_visible(False)
            continue
        xs, ys, names = zip(*pts)
        ax.scatter(xs, ys, s=18, color="tab:blue", alpha=0.7, label="candidates")
        if ctrl:
            ax.scatter(*zip(*ctrl), s=22, marker="x", color="gray", label="random / heuristic controls")
        front = pareto_front([(-x, y) for x, y in zip(xs, ys)] if key == "four_bit_share" else list(zip(xs, ys)))
        fx = sorted(front, key=lambda i: xs[i])
        ax.plot([xs[i] for i in fx], [ys[i] for i in fx], "-o", color="tab:red", ms=5, label="frontier")
        for i in front:
            ax.annotate(names[i], (xs[i], ys[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        int8 = result.best_int8 or {}
        fp32_ms, int8_ms = lat.get("fp32", {}).get("median_ms"), lat.get(f"int8:{int8.get('name')}", {}).get("median_ms")
        int8_x = {"size_ratio": int8["size_bytes"] / result.fp32_size_bytes if int8.get("size_bytes") else None,
                  "latency_ratio": int8_ms / fp32_ms if int8_ms and fp32_ms else None,
                  "four_bit_share": 0.0}.get(key)  # fmt: skip
        if int8 and int8_x is not None:  # notebook 03's pick, on the same split
            ax.scatter([int8_x], [100 * int8["select_mAP"]], marker="*", s=120, color="tab:green", zorder=3,
                       label=f"INT8 pick ({int8['name']})")  # fmt: skip
        if fp32_map is not None:
            ax.axhline(100 * fp32_map, color="gray", ls="--", lw=1, label="FP32")
        ax.set_xlabel(label)
        ax.set_ylabel(f"mAP50-95, {rows[0]['select']['subset']}")
        ax.legend(fontsize=8)
    if not lat:
        axes[1].set_title("no latency measured")
    fig.tight_layout()
    return fig


def sweep_match_line(result: CandidatesResult) -> str:
    m = result.sweep_match or {}
    if not m:
        return ""
    parts = [f"{fmt} {r['max_abs_diff']:.1e}" for fmt, r in m.items()]
    same = all(r["max_abs_diff"] == 0.0 for r in m.values())
    return (f"Deployed = ranked: every Conv materialised in each swept format against the sweep's fake quantization, "
            f"max |Δ| of the raw head with exact Q/DQ arithmetic on {next(iter(m.values()))['images']} calibration images: "
            f"{', '.join(parts)}" + (" (identical)." if same else "."))  # fmt: skip


def method_verdict(result: CandidatesResult) -> str:
    lad = result.ladder
    mean = lad["mean_select_mAP"]
    first = next(iter(mean))
    if len(mean) == 1:  # a one-rung ladder: the params chose the method (the default keeps full.yaml's choice)
        return (f"Method for every candidate: **{result.method}**, the only rung of `candidates.ladder` here (params/full.yaml "
                f"measures the whole ladder): mean selection-split mAP50-95 {pct(mean[first])}.")  # fmt: skip
    return (f"Method for every candidate: **{result.method}** ({lad['rule']}): mean selection-split mAP50-95 "
            f"{pct(mean[lad['best']])} against {pct(mean[first])} for `{first}`.")  # fmt: skip


def int4_runtime_note(result: CandidatesResult) -> str:
    """What ORT CPU does with INT4 weights, read from its optimized graph."""
    for name, ev in result.evaluations.items():
        if result.recipes[name]["materialize"]["four_bit_share"] > 0:
            ops = ev["ort_cpu"]
            return (f"ORT CPU keeps INT4 weights as INT4 initializers and runs `DequantizeLinear` each inference "
                    f"(`{name}`: {ops['DequantizeLinear']} DequantizeLinear and {ops['float_Conv']} float Conv in ORT's optimized "
                    f"graph, {ops['QLinearConv']} QLinearConv): ORT has no int4 Conv kernel, so 4-bit buys file size and load "
                    f"memory on CPU, not speed. Weights of 8-bit layers in these schemes are Q/DQ without an output "
                    f"QuantizeLinear (the sweep's arithmetic), so ORT does not fuse them into QLinearConv either."
                    + _integer_note(result))  # fmt: skip
    return ""


def reconstruction_table(result: CandidatesResult) -> pd.DataFrame | None:
    """The integer-kernel forms with and without block reconstruction: mAP against its cost (iterations,
    images, seconds, peak memory), so a user sees what more compute buys. None without a reconstructed form."""
    names = result.integer.get("candidates", [])
    if not any("reconstruction" in result.recipes[n] for n in names):
        return None
    rows = []
    for n in names:
        rec, ev = result.recipes[n], result.evaluations[n]
        r = rec.get("reconstruction")
        sub = ev["select"]["subset"]
        row = {"scheme": rec["scheme"]["name"], "iterations per block": r["settings"]["iterations"] if r else 0,
               "images": r["settings"]["images"] if r else "—", "seconds": r["seconds"] if r else 0.0,
               "peak RSS (MB)": r["peak_rss_mb"] if r else "—",
               "codes changed": pct(r["changed_codes"] / r["weights"]) + " %" if r else "—",
               "blocks kept": f"{sum(b['kept'] for b in r['blocks'])} / {len(r['blocks'])}" if r else "—",
               f"mAP50-95 {sub}": pct(ev["select"]["metrics"]["mAP_50_95"]), f"Δ {sub} [95%]": _delta(ev["select"])}  # fmt: skip
        if ev.get("confirm"):
            row[f"Δ {ev['confirm']['subset']} [95%]"] = _delta(ev["confirm"])
        rows.append(row)
    return tidy(pd.DataFrame(rows).sort_values(["scheme", "iterations per block"]).set_index(["scheme", "iterations per block"]))


def _integer_note(result: CandidatesResult) -> str:
    names = result.integer.get("candidates", [])
    if not names:
        why = result.integer.get("skipped")
        return f" No integer-kernel form here: {why}." if why else ""
    ops = result.evaluations[names[0]]["ort_cpu"]
    return (f" The integer-kernel forms ({', '.join(f'`{n}`' for n in names)}) carry the same 4-bit codes (per output "
            f"channel) in notebook 03's best ORT recipe with placement all (`{result.recipes[names[0]]['int8_recipe']}`), Q/DQ on every Conv's input and output: the file keeps INT4, asks "
            f"the loader to widen it to INT8 (the same integers), and ORT runs {ops['QLinearConv']} QLinearConv and "
            f"{ops['float_Conv']} float Conv (`{names[0]}`).")  # fmt: skip
