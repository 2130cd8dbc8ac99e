"""Notebook 03's tables and conclusion (also shown by the summary).

All read from :func:`lowbit_helpers.steps.int8.run_int8`'s result.
"""

from __future__ import annotations

import math

import pandas as pd

from ..runtime import CONV_OPS, compare_profiles, int8_kernel_class
from ..schema import Skipped
from ..steps.int8 import Int8Result, ort_cpu_pick, tensorrt_pick
from .common import fmt_delta, pct, tidy

ENGINE_LABELS = {"ort": "ORT kernels", "ort-exact": "exact Q/DQ (ORT, no optimizations)", "openvino": "OpenVINO f32",
                 "openvino-bf16": "OpenVINO bf16"}  # fmt: skip
RUNTIME_NAMES = {"ort": "ORT", "openvino": "OpenVINO", "openvino-bf16": "OpenVINO bf16"}  # latency rows' runtimes
TIE_LATENCY = 0.03  # latencies this close to the fastest are one class when choosing a deployment
# the INT8 targets (points of mAP50-95 below FP32; the fastest deployment's latency × ORT FP32), also the headline's
CPU_TARGET, TENSORRT_TARGET = 0.15, 0.3
FASTEST_TARGET = {"ratio": 0.30, "aim": 0.25, "points": 0.3}


def engine_label(engine: str, result: Int8Result) -> str:
    """An engine's name with what its numbers hold for (ORT's kernels: this CPU's int8 class)."""
    env = result.environment
    if engine == "ort":
        return f"ORT kernels, {env.get('int8_kernel_class', '?').upper()} CPU"
    return ENGINE_LABELS.get(engine, engine)


def _latency(result: Int8Result) -> dict:
    """(name, engine) -> latency row (engine: ort, openvino, openvino-bf16); the first row is ORT
    FP32, the reference of every ratio."""
    out = {}
    for r in result.latency:
        if r.get("setting"):  # int8.openvino_settings' rows: openvino_setting_rows
            continue
        rt, prec = r.get("runtime", "ort"), r.get("precision", "f32")
        out[(r["name"], rt if prec == "f32" else f"{rt}-{prec}")] = r
    return out


def setting_label(name: str, setting: str, properties: dict) -> str:
    """A deployment under OpenVINO with one of ``int8.openvino_settings``, as the report names it."""
    return f"`{name}` under OpenVINO with `{setting}` (" + ", ".join(f"{k}={v}" for k, v in properties.items()) + ")"


def openvino_setting_rows(result: Int8Result) -> list[dict]:
    """Each variant OpenVINO scores under this project's settings (``setting`` "default") and under
    each of ``int8.openvino_settings``, from the one interleaved bench: its latency, its outputs
    against the default's, and its Δ to FP32 on each split (``select``, ``confirm``; None where not
    scored): a setting's own scores where its outputs differ, else the default's, which it equals."""
    ov = result.openvino_settings
    if not ov or isinstance(ov, Skipped):
        return []
    fp32_ms = _latency(result)[("fp32", "ort")]["median_ms"]
    ms = {(r["name"], r.get("setting", "default")): r["median_ms"] for r in result.latency if r.get("runtime") == "openvino"
          and (r.get("setting") or r.get("precision", "f32") == "f32")}  # fmt: skip
    rows = []
    for name, settings in ov["variants"].items():
        base = result.validations[name]["engines"]["openvino"]
        for setting, check in settings.items():
            if "refused" in check:  # OpenVINO would not compile the file with it: no latency, no mAP
                rows.append({"name": name, "setting": setting, "properties": ov["settings"].get(setting, {}),
                             "refused": check["refused"]})  # fmt: skip
                continue
            if (name, setting) not in ms:
                continue
            own = check.get("scores")
            scored = own or base
            rows.append({"name": name, "setting": setting, "properties": ov["settings"].get(setting, {}),
                         "ms": ms[(name, setting)], "ratio": ms[(name, setting)] / fp32_ms,
                         "ratio_to_default": ms[(name, setting)] / ms[(name, "default")],
                         "max_abs_diff": check.get("max_abs_diff", 0.0), "compile_s": check["compile_s"],
                         "own_scores": own is not None,
                         "subsets": {k: x["subset"] for k in ("select", "confirm") if (x := scored.get(k))},
                         **{k: (scored.get(k) or {}).get("delta_vs_fp32") for k in ("select", "confirm")}})  # fmt: skip
    return rows


def openvino_settings_table(result: Int8Result) -> pd.DataFrame | None:
    """Notebook 03's settings bench: each variant OpenVINO scores, under this project's settings and
    each of ``int8.openvino_settings``, timed in one interleaved bench, with its mAP."""
    rows = openvino_setting_rows(result)
    if not rows:
        return None
    names = {k: n for r in rows for k, n in r.get("subsets", {}).items()}
    out = []
    for r in rows:
        props = ", ".join(f"{k}={v}" for k, v in r["properties"].items()) or "LATENCY hint, 1 stream, f32 (this project's)"
        if "refused" in r:
            out.append({"variant": r["name"], "setting": r["setting"], "properties": props,
                        "mAP": f"OpenVINO refuses to compile the file with it: {r['refused']}"})  # fmt: skip
            continue
        out.append({"variant": r["name"], "setting": r["setting"], "properties": props,
                    "OpenVINO ms": round(r["ms"], 1), "× ORT FP32": round(r["ratio"], 3),
                    "× default setting": round(r["ratio_to_default"], 3),
                    "raw head max |Δ| to default": f"{r['max_abs_diff']:.3g}",
                    f"Δ {names.get('select', 'selection')} [95%] (chosen on)": fmt_delta(r["select"]) if r["select"] else "—",
                    f"Δ {names.get('confirm', 'confirmation')} [95%]": fmt_delta(r["confirm"]) if r["confirm"] else "—",
                    "mAP": "its own" if r["own_scores"] else "the default's (same outputs)",
                    "compile s": r["compile_s"]})  # fmt: skip
    return pd.DataFrame(out).set_index(["variant", "setting"])


def openvino_settings_text(result: Int8Result) -> str:
    """Under the settings table: the settings this machine cannot run, and OpenVINO's model cache (the
    compile from ``CACHE_DIR`` against a cold one, per variant)."""
    ov = result.openvino_settings
    if not ov or isinstance(ov, Skipped):
        return ""
    lines = []
    if ov.get("skipped"):
        lines.append("Not run here: " + "; ".join(f"`{k}` ({why})" for k, why in ov["skipped"].items()) + ".")
    parts = [f"`{n}` {c['cold_s']:.2f} s cold, {c['warm_s']:.2f} s from the cache"
             for n, s in ov["variants"].items() if (c := s["default"].get("cache"))]  # fmt: skip
    if parts:
        lines.append("**OpenVINO's model cache** (`CACHE_DIR`) shortens the compile, not the inference: " + "; ".join(parts) + ".")
    return "\n\n".join(lines)


def recipe_label(v: dict, method: str) -> str:
    """A variant's calibration ``method`` and options in a few words (``v``: its params entry)."""
    parts = [method]
    if v.get("reduce_range"):
        parts.append("7-bit w")
    if v.get("placement", "all") != "all":
        parts.append("Q/DQ on Conv inputs")
    if v.get("activations", "uint8") != "uint8":
        parts.append("int8 symmetric activations")
    if v["backend"] == "nncf":
        parts.append(f"{v.get('bias_correction') or 'full'} BC")
    elif v.get("bias_correction") == "fast":  # an old run's ORT / ModelOpt entries say "full": NNCF's default then
        parts.append("fast BC")
    if v.get("format") == "openvino":
        parts.append("(IR)")
    return " ".join(parts)


def int8_table(result: Int8Result) -> pd.DataFrame:
    """One row per INT8 variant (and FP32): recipe, fidelity, size, what ORT fuses, latency under each runtime."""
    lat = _latency(result)
    fp32 = lat[("fp32", "ort")]
    runtimes = sorted({rt for _, rt in lat}, key=list(RUNTIME_NAMES).index)
    thr = fp32["threads"]

    def timing(name):
        out = {}
        for rt in runtimes:
            r = lat.get((name, rt))
            label = RUNTIME_NAMES[rt]
            out[f"{label} ms ({thr} thr)"] = round(r["median_ms"], 1) if r else math.nan
            out[f"{label} × ORT FP32"] = round(r["median_ms"] / fp32["median_ms"], 3) if r else math.nan
        return out

    rows = [{"variant": "fp32", "backend": "—", "calibration": "—", "head policy": "—", **timing("fp32")}]
    for name, val in result.validations.items():
        rec = result.recipes[name]
        v = val["variant"]
        row = {"variant": name, "backend": rec["backend"], "calibration": recipe_label(v, rec["method"]), "head policy": rec["head_policy"]}
        if "fidelity" in val:
            row["SQNR dB"] = round(val["fidelity"]["sqnr_db"], 1)
        qdq, ort_cpu = val.get("qdq"), val.get("ort_cpu")  # None for an OpenVINO IR
        row.update({
            **timing(name),
            "size (MiB)": round(val["size_bytes"] / 2**20, 1),
            "Q/DQ nodes": qdq["QuantizeLinear"] + qdq["DequantizeLinear"] if qdq else "— (OpenVINO IR)",
            "QLinearConv / Conv (ORT CPU)": f"{ort_cpu['QLinearConv']} / {qdq['Conv']}" if qdq and ort_cpu else "—",
            "calib s": round(rec["calibration"]["seconds"]),
            "calib peak RSS (MiB)": round(rec["calibration"]["peak_rss_mb"]),
        })  # fmt: skip
        rows.append(row)
    return tidy(pd.DataFrame(rows).set_index("variant"))


def accuracy_table(result: Int8Result) -> pd.DataFrame | None:
    """Every variant under every engine: mAP50-95 and Δ to FP32 (ORT) on the selection split and
    the confirmation split (engines of ``int8.confirm_engines``), and Δ to the same file's exact
    arithmetic."""
    if result.structure_only:
        return None
    rows = []
    fp32_eng = result.fp32_engines.get("engines", {})
    for name, engines in [("fp32", fp32_eng)] + [(n, v["engines"]) for n, v in result.validations.items()]:
        for engine, e in engines.items():
            sel = e["select"]
            row = {"variant": name, "engine": engine_label(engine, result),
                   f"mAP50-95 {sel['subset']}": pct(sel["metrics"]["mAP_50_95"]),
                   f"Δ {sel['subset']} [95%] (chosen on)": fmt_delta(sel["delta_vs_fp32"])}  # fmt: skip
            if e.get("confirm"):  # an engine outside int8.confirm_engines has the selection split only
                conf = e["confirm"]
                row[f"Δ {conf['subset']} [95%] (confirmed on)"] = fmt_delta(conf["delta_vs_fp32"])
                ex = conf.get("delta_vs", {}).get("ort-exact")
                row[f"− exact, {conf['subset']} [95%]"] = fmt_delta(ex) if ex else "—"
            rows.append(row)
    return pd.DataFrame(rows).set_index(["variant", "engine"]) if rows else None


def skipped_engines_text(result: Int8Result) -> str:
    """Engines that could not run a model here, and why (so that a missing row is explained)."""
    by: dict[tuple[str, str], list[str]] = {}
    items = list(result.validations.items()) + [("fp32", result.fp32_engines)]
    for name, v in items:
        for e, why in (v.get("skipped_engines") or {}).items():
            by.setdefault((ENGINE_LABELS.get(e, e), why), []).append(name)
    return "; ".join(f"{label} for {', '.join(f'`{n}`' for n in names)} ({why})" for (label, why), names in by.items())


def emulation_table(result: Int8Result) -> pd.DataFrame | None:
    """ORT's kernels on the emulated CPU (no VNNI) against the same file's exact arithmetic, beside
    this CPU's kernels on the same images."""
    rows = []
    for name, em in result.emulated.items():
        if isinstance(em, Skipped):
            rows.append({"variant": name, "emulated CPU": em.why})
            continue
        k = em["kernels"]
        this = em.get("this_cpu") or result.validations[name]["engines"].get("ort", {}).get("select")  # older runs: no this_cpu
        this_gap = this.get("delta_vs", {}).get("ort-exact") if this and this["subset"] == k["subset"] else None
        rows.append({"variant": name, "emulated CPU": f"{em['cpu']} ({', '.join(em['cpu_int8_isa'])})",
                     f"Δ {k['subset']} [95%] (emulated kernels)": fmt_delta(k["delta_vs_fp32"]),
                     "emulated kernels − exact [95%]": fmt_delta(k["delta_vs"]["ort-exact"]),
                     "this CPU's kernels − exact [95%]": fmt_delta(this_gap) if this_gap else "—",
                     "emulation s": em["seconds"]})  # fmt: skip
    return tidy(pd.DataFrame(rows).set_index("variant")) if rows else None


def drop_decomposition(result: Int8Result) -> pd.DataFrame | None:
    """Where each ORT variant's INT8 drop goes: the quantization itself (exact arithmetic against
    FP32), this CPU's integer kernels against the exact arithmetic, and the emulated CPU's."""

    if result.structure_only:
        return None
    env = result.environment
    rows = []
    for name, val in result.validations.items():
        eng = val.get("engines", {})
        if result.recipes[name]["backend"] != "ort" or "ort-exact" not in eng or "ort" not in eng:
            continue
        split = "confirm" if eng["ort-exact"].get("confirm") and eng["ort"].get("confirm") else "select"
        ex, k = eng["ort-exact"][split], eng["ort"][split]
        row = {"variant": name, f"quantization: exact − FP32, {ex['subset']}": fmt_delta(ex["delta_vs_fp32"]),
               f"kernels − exact, {env.get('int8_kernel_class', '?').upper()} (this CPU), {k['subset']}":
                   fmt_delta(k["delta_vs"]["ort-exact"])}  # fmt: skip
        em = result.emulated.get(name)
        if em and not isinstance(em, Skipped):
            k = em["kernels"]
            cls = int8_kernel_class(em["cpu_int8_isa"]).upper()
            row[f"kernels − exact, {cls} (emulated {em['cpu']}), {k['subset']}"] = fmt_delta(k["delta_vs"]["ort-exact"])
        rows.append(row)
    return tidy(pd.DataFrame(rows).set_index("variant")) if rows else None


def kernel_probe_text(result: Int8Result) -> str:
    """The saturation probe's verdict on this CPU and on the emulated one."""
    probe = result.kernel_probe
    lines = []
    for where, p in (("this CPU", probe.get("this_cpu")), ("emulated CPU", probe.get("emulated"))):
        if not p:
            continue
        p = Skipped.read(p)  # the probe's record says {"skipped": why} where QEMU is missing
        if isinstance(p, Skipped):
            lines.append(f"- {where}: {p.why}")
            continue
        f, r = p["full_range"], p["reduce_range"]
        lines.append(
            f"- {where} ({', '.join(p['cpu_int8_isa']) or 'no int8 ISA'}): one Conv whose u8×s8 pair sums reach "
            f"{f['pair_sum']} (> 32767) gives {f['kernel']:.2f} through ORT's fused kernel against {f['exact']:.2f} exact"
            f" ({'saturated' if p['saturates'] else 'no saturation'}); with 7-bit weights (pair sums {r['pair_sum']}) "
            f"{r['kernel']:.2f} against {r['exact']:.2f} ({'exact' if p['reduce_range_exact'] else 'still off'})."
        )  # fmt: skip
    return "\n".join(lines)


def latency_breakdown(result: Int8Result) -> pd.DataFrame | None:
    """Where each model's time goes under ORT's profiler: Conv kernels against FP32's, and the rest.

    The INT8 speed-up is bounded by the Conv kernels' ratio, which depends on the CPU's int8
    instructions (``cpu_int8_isa``), and by what the Q/DQ graph adds outside the Convs
    (QLinearSigmoid + QLinearMul for SiLU instead of FP32's fused QuickGelu, for instance).
    """

    profiles = result.profiles
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


def _isa_sentence(result: Int8Result) -> str:
    isa = result.environment.get("cpu_int8_isa")
    if isa is None:
        return ""
    vnni = [f for f in isa if "vnni" in f or "amx" in f]
    return (f" This CPU's int8 instructions: {', '.join(isa) or 'none detected'}"
            + ("." if vnni else " (no VNNI: ORT's u8s8 kernels multiply through vpmaddubsw, far slower than vpdpbusd)."))  # fmt: skip


def diverging(result: Int8Result, limit_points: float = 5.0) -> list[tuple[str, str, dict]]:
    """(variant, engine, Δ to exact) where an engine's result is more than ``limit_points`` away from
    the same file's exact arithmetic on the confirmation split (the selection split for an engine not
    confirmed): that engine computes the graph wrongly."""
    out = []
    for name, val in result.validations.items():
        for engine, e in (val.get("engines") or {}).items():
            gap = (e.get("confirm") or e["select"]).get("delta_vs", {}).get("ort-exact")
            if gap and abs(100 * gap["delta"]) > limit_points:
                out.append((name, engine, gap))
    return out


def _verdict(d: dict, limit_points: float) -> str:
    """'meets' when the whole interval is within ``limit_points`` of zero from below, 'is compatible
    with' when only the point estimate is, else 'misses'."""
    if -100 * d["lo"] <= limit_points:
        return "meets"
    return "is compatible with" if -100 * d["delta"] <= limit_points else "misses"


def _gap_verdict(d: dict, limit_points: float) -> str:
    """For a kernel − exact difference: 'meets' when the whole interval lies within ±limit."""
    if max(abs(100 * d["lo"]), abs(100 * d["hi"])) <= limit_points:
        return "meets"
    return "is compatible with" if abs(100 * d["delta"]) <= limit_points else "misses"


def _structure_only_conclusion(result: Int8Result) -> str:
    lat = _latency(result)
    fp32 = lat[("fp32", "ort")]["median_ms"]
    text = "Structure-only model: no accuracy, so no recommendation; latency and fusion above are real."
    ort = [n for n in result.validations if result.recipes[n]["backend"] == "ort" and (n, "ort") in lat]
    if ort:
        fastest = min(ort, key=lambda n: lat[(n, "ort")]["median_ms"])
        text += f" Fastest ORT variant: `{fastest}` at {lat[(fastest, 'ort')]['median_ms'] / fp32:.3f}× FP32 latency."
        text += _profile_sentence(result, fastest)
    timed = [(f"`{n}` under {RUNTIME_NAMES[rt]}", r["median_ms"]) for (n, rt), r in lat.items() if n != "fp32"]
    timed += [(setting_label(r["name"], r["setting"], r["properties"]), r["median_ms"])
              for r in result.latency if r.get("setting")]  # int8.openvino_settings, timed only
    if timed:
        label, ms = min(timed, key=lambda kv: kv[1])
        text += f" Fastest INT8 deployment of all: {label} at {ms / fp32:.3f}× ORT FP32 latency."
    ov = lat.get(("fp32", "openvino"))
    if ov:
        text += f" OpenVINO runs FP32 at {ov['median_ms'] / fp32:.3f}× ORT FP32."
    return text + _isa_sentence(result)


def _profile_sentence(result: Int8Result, name: str) -> str:
    """What ORT's profiler says of ``name`` against FP32: Conv kernels vs everything else."""
    profiles = result.profiles
    if "fp32" not in profiles or name not in profiles:
        return ""

    cmp = compare_profiles(profiles["fp32"], profiles[name])
    other = cmp["other_ms"][1] / cmp["other_ms"][0] if cmp["other_ms"][0] else math.nan
    return (f" Under ORT's profiler its Conv kernels take {cmp['conv_ratio']:.2f}× the time of FP32's and everything else "
            f"{other:.2f}×, so the Conv kernels bound the speed-up.")  # fmt: skip


def int8_conclusion(result: Int8Result, target_points: float = 0.5) -> str:
    """What to ship for each CPU class and for TensorRT, chosen on the selection split and
    confirmed on the confirmation split, every target stated as met or not with its number."""
    if result.structure_only:
        return _structure_only_conclusion(result)
    vals, recipes = result.validations, result.recipes
    lat = _latency(result)
    fp32_ms = lat[("fp32", "ort")]["median_ms"]
    env = result.environment
    isa = f"{env.get('int8_kernel_class', '?').upper()} CPU: {', '.join(env.get('cpu_int8_isa') or []) or 'no int8 ISA'}"
    scored = [v["engines"] for v in vals.values() if v.get("engines")]
    if not scored:
        return "No engine could score the INT8 variants here: " + "; ".join(
            f"{e}: {why}" for v in vals.values() for e, why in (v.get("skipped_engines") or {}).items()) + "."  # fmt: skip
    sel_name = next(iter(scored[0].values()))["select"]["subset"]
    conf_name = next((e["confirm"]["subset"] for v in scored for e in v.values() if e.get("confirm")), "no confirmation split")

    def d(name, engine, split="confirm"):
        """Δ to FP32 (None: that engine did not run on the confirmation split, int8.confirm_engines)."""
        scored = vals[name]["engines"][engine].get(split)
        return scored["delta_vs_fp32"] if scored else None

    def has(name, engine):
        return engine in vals[name].get("engines", {})

    def ratio(name, rt="ort"):
        r = lat.get((name, rt))
        return r["median_ms"] / fp32_ms if r else math.nan

    lines = [f"Every recipe below is chosen on {sel_name} and its Δ quoted on {conf_name}, in mAP50-95 points "
             f"against FP32 (ORT), with the paired 95 % interval. Kernel numbers hold for this machine's {isa}."]  # fmt: skip

    wrong = diverging(result)
    if wrong:
        lines.append("**Engines that compute a file wrongly** (more than 5 points from its exact arithmetic, so those rows "
                     "measure the engine, not the recipe): " + "; ".join(
                         f"`{n}` under {engine_label(e, result)} ({fmt_delta(g)})" for n, e, g in wrong) + ".")  # fmt: skip

    pick = ort_cpu_pick(result)
    if pick:
        best, exact_kernels = pick["name"], pick["exact_kernels"]
        gap = vals[best]["engines"]["ort"]["confirm"]["delta_vs"]["ort-exact"]
        ex, k = d(best, "ort-exact"), d(best, "ort")
        among = "that run faster than FP32" if pick["among_fast"] else "(none runs faster than FP32 here)"
        lines.append(
            f"**ORT CPU ({env.get('int8_kernel_class', '?').upper()}):** ship `{best}` (best {sel_name} Δ through ORT's kernels "
            f"among the ORT recipes {among}"
            + ("; `reduce_range` ones are left out, since this CPU's kernel is exact with full-range weights (the probe below)"
               if exact_kernels else "") + f"): {fmt_delta(k)} on {conf_name} through this CPU's kernels, "
            f"{fmt_delta(ex)} with exact arithmetic (kernels − exact {fmt_delta(gap)}), {ratio(best):.2f}× ORT FP32 latency, "
            f"{vals[best]['ort_cpu']['QLinearConv']} of {vals[best]['qdq']['Conv']} Convs as QLinearConv. "
            f"Against the {CPU_TARGET}-point target it {_verdict(k, CPU_TARGET)} (kernels) and {_verdict(ex, CPU_TARGET)} (exact); "
            f"against the {target_points}-point one it {_verdict(k, target_points)}."
            + (f" Its kept-float Convs stay float only with ORT's {', '.join(pick['ort_disabled_optimizers'])} rewrite "
               f"turned off: deploy it with `InferenceSession(..., disabled_optimizers={pick['ort_disabled_optimizers']})`, "
               "as every ORT session here does." if pick["ort_disabled_optimizers"] else "")
            + _profile_sentence(result, best) + _isa_sentence(result)
        )  # fmt: skip
        # the peer measured the same way: under ORT's kernels and exact Q/DQ where it was scored so (full.yaml), and
        # under OpenVINO, the runtime its file is made for, beside our file under OpenVINO (the default)
        peers = [n for n in vals if recipes[n]["backend"] == "nncf"]
        shipped_peer = False
        for engine in ("ort", "ort-exact", "openvino"):
            peers_e = [n for n in peers if has(n, engine) and d(n, engine) and d(n, engine, "select")]
            if peers_e and has(best, engine) and d(best, engine):
                p = max(peers_e, key=lambda n: d(n, engine, "select")["delta"])
                diff = 100 * (d(best, engine)["delta"] - d(p, engine)["delta"])
                lines[-1] += (f" Best NNCF row under {engine_label(engine, result)}: `{p}` {fmt_delta(d(p, engine))}; "
                              f"ours {'there ' if engine == 'openvino' else ''}{fmt_delta(d(best, engine)) + ', ' if engine == 'openvino' else ''}"
                              f"is {'at or ahead of' if diff >= 0 else 'behind'} it by {diff:+.2f} points (point estimates).")  # fmt: skip
                # OpenVINO's speed only where OpenVINO computes that file right
                ov_right = (p, "openvino") in lat and not any(n == p and e == "openvino" for n, e, _ in wrong)
                if diff < 0 and engine == "ort":
                    ov = f" and {ratio(p, 'openvino'):.2f}× under OpenVINO" if ov_right else ""
                    lines[-1] += (f" Where those points matter more than ORT's speed, ship `{p}` instead: it runs at "
                                  f"{ratio(p):.2f}× ORT FP32 under ORT{ov}.")  # fmt: skip
                    shipped_peer = True
                elif diff < 0 and engine == "openvino" and ov_right and not shipped_peer:
                    lines[-1] += (f" Where OpenVINO is the runtime, ship `{p}` instead: {ratio(p, 'openvino'):.2f}× ORT FP32 "
                                  f"there, against {ratio(best, 'openvino'):.2f}× for ours.")  # fmt: skip
    # AVX2-only CPUs (emulated)
    emu = {n: e for n, e in result.emulated.items() if not isinstance(e, Skipped)}
    if emu:
        gaps = "; ".join(f"`{n}` {fmt_delta(x['kernels']['delta_vs']['ort-exact'])}" for n, x in emu.items())
        pick = max(emu, key=lambda n: emu[n]["kernels"]["delta_vs_fp32"]["delta"])
        e = emu[pick]["kernels"]
        cls = int8_kernel_class(emu[pick]["cpu_int8_isa"]).upper()
        lines.append(
            f"**ORT CPU, {cls} class (no VNNI), measured on an emulated {emu[pick]['cpu']} CPU, {e['subset']}:** ship `{pick}`: "
            f"{fmt_delta(e['delta_vs_fp32'])} vs FP32 through those kernels; kernels − exact {fmt_delta(e['delta_vs']['ort-exact'])}, "
            f"which {_gap_verdict(e['delta_vs']['ort-exact'], 0.1)} the 0.1-point target. Kernels − exact per variant there: {gaps}. "
            f"Chosen and shown on {e['subset']} only (emulation runs about 100× slower than native)."
        )  # fmt: skip
    # fastest CPU deployment with accuracy within target_points on the selection split under its own runtime,
    # and faster than FP32 itself (ORT's or OpenVINO f32's, whichever is faster): a slower INT8 is no speed pick
    fp32_floor = min(lat[("fp32", rt)]["median_ms"] for rt in ("ort", "openvino") if ("fp32", rt) in lat)
    # every deployment: (ms, label, Δ select, Δ confirm); OpenVINO's settings beside its default (same bench)
    deployments = [(r["median_ms"], f"`{name}` under {RUNTIME_NAMES[rt]}", d(name, rt, "select"), d(name, rt))
                   for (name, rt), r in lat.items() if name != "fp32" and name in vals and has(name, rt)]  # fmt: skip
    deployments += [(r["ms"], setting_label(r["name"], r["setting"], r["properties"]), r["select"], r["confirm"])
                    for r in openvino_setting_rows(result) if r["setting"] != "default" and r.get("select")]
    fastest, slower = [], []
    for dep in deployments:
        if -100 * dep[2]["delta"] <= target_points:
            (fastest if dep[0] < fp32_floor else slower).append(dep)
    if not fastest:
        text = f"**Fastest CPU deployment** within {target_points} points on {sel_name}: none. "
        if slower:
            listed = ", ".join(f"{label} ({ms:.1f} ms)" for ms, label, _, _ in sorted(slower, key=lambda t: t[0]))
            text += f"The {len(slower)} deployment(s) within those points run slower than FP32's fastest ({fp32_floor:.1f} ms): {listed}."
        else:
            text += "No deployment is within those points."
        lines.append(text)
    else:
        # latencies within TIE_LATENCY of the fastest are one class (a bench's run-to-run spread is a
        # few %): among them, the best selection-split Δ
        floor = min(t[0] for t in fastest)
        tied = [t for t in fastest if t[0] <= floor * (1 + TIE_LATENCY)]
        ms, label, sel_d, k = max(tied, key=lambda t: t[2]["delta"])
        others = ", ".join(f"{lb} ({fmt_delta(c or s_)})" for _, lb, s_, c in sorted(tied, key=lambda t: t[0]) if lb != label)
        confirmed = (f"{fmt_delta(k)} on {conf_name} from its own outputs. " if k else
                     f"{fmt_delta(sel_d)} on {sel_name} (not run on {conf_name} under that runtime: "
                     "int8.confirm_engines). ")  # fmt: skip
        r_ = ms / fp32_ms
        lines.append(
            f"**Fastest CPU deployment** within {target_points} points on {sel_name} (latencies within "
            f"{TIE_LATENCY:.0%} of the fastest count as tied; the best {sel_name} Δ among them): {label} "
            f"at {r_:.2f}× ORT FP32 latency ({ms:.1f} ms), " + confirmed
            + f"Against the ≤ {FASTEST_TARGET['ratio']:.2f}× target (aim {FASTEST_TARGET['aim']:.2f}×) its latency is "
            f"{'met' if r_ <= FASTEST_TARGET['ratio'] else 'not met'} here ({r_:.3f}×); its accuracy "
            f"{_verdict(k or sel_d, FASTEST_TARGET['points'])} the {FASTEST_TARGET['points']}-point target"
            + ("" if k else f" on {sel_name}") + "."
            + (f" Tied on speed: {others}." if others else "")
        )  # fmt: skip
        fp32_eng = result.fp32_engines.get("engines", {})
        for eng in ("openvino", "openvino-bf16"):
            r = lat.get(("fp32", eng))
            if r:
                acc = fp32_eng.get(eng, {}).get("confirm")
                lines[-1] += (f" {ENGINE_LABELS[eng]} runs the FP32 model itself at {r['median_ms'] / fp32_ms:.2f}× ORT FP32"
                              + (f" ({fmt_delta(acc['delta_vs_fp32'])} on {conf_name})." if acc else "."))  # fmt: skip

    trt = tensorrt_pick(result)
    if trt:
        best = trt["name"]
        ex = d(best, "ort-exact")
        lines.append(
            f"**TensorRT ({trt['label']}):** ship `{best}` (best {sel_name} Δ "
            f"with exact arithmetic{'' if trt['kind'] == 'ModelOpt' else ' of the TensorRT-ready recipes'}, which is what TensorRT "
            f"computes): {fmt_delta(ex)} on {conf_name}. It {_verdict(ex, TENSORRT_TARGET)} the {TENSORRT_TARGET}-point target."
            + (f" {vals[best]['qdq']['float_convs']} of its {vals[best]['qdq']['Conv']} Convs stay float "
               f"({100 * vals[best]['float_conv_macs_share']:.1f} % of the Conv MACs), which TensorRT runs in FP16 / FP32."
               if "float_conv_macs_share" in vals[best] else "")
            + " ORT fuses only "
            f"{vals[best]['ort_cpu']['QLinearConv']} of its Convs, so its CPU latency ({ratio(best):.2f}× FP32) says nothing "
            "about TensorRT's."
        )  # fmt: skip
        others = [n for n in vals if has(n, "ort-exact") and n not in trt["considered"]]
        b = max(others, key=lambda n: d(n, "ort-exact", "select")["delta"]) if others else None
        # only where a file TensorRT does not take computes better, chosen on the selection split as the pick was
        if b and d(b, "ort-exact", "select")["delta"] > d(best, "ort-exact", "select")["delta"]:
            conf = d(b, "ort-exact")
            lines[-1] += (f" A file TensorRT does not take computes better on {sel_name} with exact arithmetic: `{b}`, "
                          f"{fmt_delta(d(b, 'ort-exact', 'select'))}" + (f" ({fmt_delta(conf)} on {conf_name})" if conf else "")
                          + ": its ranges and float ops are what the TensorRT recipe should learn from.")  # fmt: skip
    return "\n\n".join(lines)
