import re
from pathlib import Path

import pandas as pd
import pytest

from lowbit_helpers.report.summary import README_END, README_START, update_readme
from lowbit_helpers.schema import Skipped
from lowbit_helpers.steps.candidates import CandidatesResult
from lowbit_helpers.steps.int8 import Int8Result

REPO = Path(__file__).resolve().parent.parent


def test_update_readme_replaces_only_the_results_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# T\nintro\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    summary = tmp_path / "summary.md"
    summary.write_text("# run: FP32\n\n## Model\n| a |\n")
    update_readme(readme, summary, "default")
    text = readme.read_text()
    assert text.startswith("# T\nintro\n<!-- results:start -->") and text.endswith("<!-- results:end -->\ntail\n")
    assert "old" not in text and "### run: FP32" in text and "#### Model" in text and "reports/default/summary.md" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="results:start"):
        update_readme(readme, summary, "default")



# a measurement typed into prose: a number with a unit of time, memory or signal, a ratio, or a
# correlation (parameters such as "95 %" or "4 × 16 bins" are not measurements)
TYPED_MEASUREMENT = re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s|seconds?|min|minutes?|hours?|GB|GiB|MB|MiB|dB)(?![\w-])"
                               r"|\b\d+(?:\.\d+)?\s?×(?!\s?\d)|(?<![\w\d]\s)(?<![\w\d])×\s?\d|\b\d+\.\d+\s?x(?![\w-])"  # a ratio, not N × M
                               r"|(?:Spearman|SQNR|mAP)[^.\n]{0,12}?[-+]?\d\.\d")


def test_the_readme_types_no_measurement_outside_its_generated_block():
    """Numbers that a run measures live only in the block `update_readme` writes from summary.md."""
    text = (REPO / "README.md").read_text()
    start, end = text.index(README_START), text.index(README_END)
    prose = text[:start] + text[end:]
    for typed in ("the sweep took 787 s", "787 seconds", "4.7 GB", "Spearman 0.85", "1.30× FP32", "×2.6", "2× faster"):
        assert TYPED_MEASUREMENT.search(typed), typed
    for shape in ("N×3×640×640", "(4 × 16 bins)", "95 % basic bootstrap"):
        assert not TYPED_MEASUREMENT.search(shape), shape
    found = [m.group(0) for m in TYPED_MEASUREMENT.finditer(prose)]
    assert not found, f"typed measurements outside the generated block: {found}"

def test_int8_verdicts_need_the_whole_interval():
    from lowbit_helpers.report.int8 import _gap_verdict, _verdict, fmt_delta

    d = {"delta": -0.001, "lo": -0.009, "hi": 0.007}
    assert _verdict(d, 0.15) == "is compatible with" and _verdict(d, 1.0) == "meets"
    assert _verdict({"delta": -0.004, "lo": -0.01, "hi": 0.0}, 0.15) == "misses"
    assert _gap_verdict({"delta": 0.0005, "lo": -0.0009, "hi": 0.0008}, 0.1) == "meets"
    assert _gap_verdict({"delta": 0.0005, "lo": -0.002, "hi": 0.0008}, 0.1) == "is compatible with"
    assert _gap_verdict({"delta": -0.0015, "lo": -0.002, "hi": 0.0}, 0.1) == "misses"
    assert fmt_delta(d) == "-0.10 [-0.90, +0.70]"


def _synthetic_int8_result(openvino: bool = True, structure_only: bool = False) -> Int8Result:
    """A notebook-03 result shaped as steps.int8.run_int8 writes it (numbers made up, structure real)."""

    def d(x, w=0.008):
        return {"delta": x, "lo": x - w, "hi": x + w, "n": 50}

    def split(name, x, gap=None):
        out = {"subset": name, "metrics": {"mAP_50_95": 0.4 + x}, "delta_vs_fp32": d(x)}
        if gap is not None:
            out["delta_vs"] = {"ort-exact": d(gap, 0.003)}
        return out

    def engines(x, gap):
        e = {"ort": {k: split(n, x + gap, gap) for k, n in (("select", "val100"), ("confirm", "val500 minus val100"))},
             "ort-exact": {k: split(n, x) for k, n in (("select", "val100"), ("confirm", "val500 minus val100"))}}  # fmt: skip
        if openvino:
            e["openvino"] = {k: split(n, x, 0.0) for k, n in (("select", "val100"), ("confirm", "val500 minus val100"))}
        return e

    variants = {"ort-a": ("ort", -0.004, -0.001, 0, 0.6), "ort-keep": ("ort", -0.001, 0.0, 2, 0.6),
                "nncf-m": ("nncf", -0.002, 0.0, 0, 1.2), "modelopt-e": ("modelopt", -0.012, 0.0, 0, 1.3)}  # fmt: skip
    vals, recipes, lat = {}, {}, [{"name": "fp32", "runtime": "ort", "precision": "f32", "median_ms": 40.0, "threads": 2}]
    for n, (backend, x, gap, keep, r) in variants.items():
        v = {"name": n, "backend": backend, "keep_sensitive": keep, "reduce_range": False, "bias_correction": "full"}
        vals[n] = {"variant": v, "qdq": {"QuantizeLinear": 5, "DequantizeLinear": 9, "Conv": 82, "float_convs": 6}, "ort_cpu": {"QLinearConv": 76},
                   "ort_disabled_optimizers": ["WeightBiasQuantization"] if keep else [],
                   "size_bytes": 3 << 20, "fidelity": {"sqnr_db": 26.0}, "skipped_engines": {} if openvino else {"openvino": "skipped: x"}}  # fmt: skip
        if not structure_only:
            vals[n]["engines"] = engines(x, gap)
        recipes[n] = {"backend": backend, "method": "m", "head_policy": "conservative", "calibration": {"seconds": 3, "peak_rss_mb": 900}}
        lat.append({"name": n, "runtime": "ort", "precision": "f32", "median_ms": 40.0 * r, "threads": 2})
        if openvino:
            lat.append({"name": n, "runtime": "openvino", "precision": "f32", "median_ms": 40.0 * r / 3, "threads": 2})
    if openvino:
        lat.append({"name": "fp32", "runtime": "openvino", "precision": "f32", "median_ms": 20.0, "threads": 2})
        lat.append({"name": "fp32", "runtime": "openvino", "precision": "bf16", "median_ms": 14.0, "threads": 2})
    emulated = {} if structure_only else {"ort-a": {"cpu": "Haswell", "cpu_int8_isa": ["avx2", "fma"], "seconds": 200,
                                                    "kernels": split("val100", -0.02, -0.016)}}  # fmt: skip
    return Int8Result(validations=vals, recipes=recipes, latency=lat, emulated=emulated, structure_only=structure_only,
                      fp32_engines={"engines": {}, "skipped_engines": {}}, profiles={},
                      environment={"cpu_int8_isa": ["avx2", "avx512_vnni"], "int8_kernel_class": "vnni"},
                      kernel_probe={"this_cpu": {"cpu_int8_isa": ["avx2"], "saturates": False, "reduce_range_exact": True,
                                                 "full_range": {"pair_sum": 64770, "kernel": 64.0, "exact": 64.0},
                                                 "reduce_range": {"pair_sum": 32640, "kernel": 64.0, "exact": 64.0}}})  # fmt: skip


def _without(res: Int8Result, name: str) -> Int8Result:
    res.validations.pop(name), res.recipes.pop(name)
    res.latency = [r for r in res.latency if r["name"] != name]
    return res


def test_int8_report_reads_every_engine_and_names_what_it_ships():
    from lowbit_helpers.report import int8 as r

    res = _synthetic_int8_result()
    table = r.int8_table(res)
    assert {"ORT × ORT FP32", "OpenVINO × ORT FP32", "OpenVINO bf16 × ORT FP32"} <= set(table.columns)
    assert table.loc["ort-a", "OpenVINO × ORT FP32"] == 0.2 and table.loc["fp32", "OpenVINO bf16 × ORT FP32"] == 0.35
    acc = r.accuracy_table(res)
    assert ("ort-a", "ORT kernels, VNNI CPU") in acc.index and ("nncf-m", "OpenVINO f32") in acc.index
    assert acc.loc[("ort-a", "ORT kernels, VNNI CPU"), "− exact, val500 minus val100 [95%]"] == "-0.10 [-0.40, +0.20]"
    assert "-1.60" in r.emulation_table(res).iloc[0]["emulated kernels − exact [95%]"]
    assert "kernels − exact, AVX2 (emulated Haswell), val100" in r.drop_decomposition(res).columns
    dec = r.drop_decomposition(res)  # the quantization and the kernels on the confirmation split, where both engines ran
    assert dec.loc["ort-a", "quantization: exact − FP32, val500 minus val100"] == "-0.40 [-1.20, +0.40]"
    assert dec.loc["ort-a", "kernels − exact, VNNI (this CPU), val500 minus val100"] == "-0.10 [-0.40, +0.20]"
    # on a CPU whose kernel does not saturate, 7-bit-weight recipes are not the ORT pick even when they score best
    rr = _synthetic_int8_result()
    rr.validations["ort-keep"]["variant"].update(keep_sensitive=0, reduce_range=True)
    assert "ship `ort-a`" in r.int8_conclusion(rr) and "`reduce_range` ones are left out" in r.int8_conclusion(rr)
    rr.kernel_probe["this_cpu"]["saturates"] = True
    assert "ship `ort-keep`" in r.int8_conclusion(rr)
    # a keep_sensitive recipe competes (its kept-float Convs run in float with ORT's load-time rewrite
    # off), and the conclusion says how to deploy it so
    keep = r.int8_conclusion(res)
    assert "ship `ort-keep`" in keep and "disabled_optimizers=['WeightBiasQuantization']" in keep
    # equal latencies (within 3 %) are one class: the more accurate of the two is the fastest deployment
    assert "deployment** within 0.5 points on val100 (latencies within 3% of the fastest" in keep
    assert "`ort-keep` under OpenVINO at 0.20×" in keep and "Tied on speed: `ort-a` under OpenVINO" in keep
    text = r.int8_conclusion(_without(_synthetic_int8_result(), "ort-keep"))
    assert "ship `ort-a`" in text and "disabled_optimizers" not in text
    assert "Best NNCF row under ORT kernels, VNNI CPU: `nncf-m`" in text and "behind it by -0.30" in text
    assert "ship `nncf-m` instead" in text and "0.40× under OpenVINO" in text
    # the peer under OpenVINO beside our file under OpenVINO, the same way
    assert "Best NNCF row under OpenVINO f32: `nncf-m` -0.20 [-1.00, +0.60]; ours there -0.40 [-1.20, +0.40], is behind" in text
    # scored under OpenVINO only (the default): the OpenVINO comparison says what to ship where OpenVINO runs
    ov_only = _without(_synthetic_int8_result(), "ort-keep")
    for e in ("ort", "ort-exact"):
        ov_only.validations["nncf-m"]["engines"].pop(e)
    text = r.int8_conclusion(ov_only)
    assert "Best NNCF row under ORT kernels" not in text and "ship `nncf-m` instead: it runs" not in text
    assert "Where OpenVINO is the runtime, ship `nncf-m` instead: 0.40× ORT FP32 there, against 0.20× for ours." in text
    # a file OpenVINO computes wrongly is not recommended for OpenVINO's speed
    wrong = _without(_synthetic_int8_result(), "ort-keep")
    for k in ("select", "confirm"):
        wrong.validations["nncf-m"]["engines"]["openvino"][k]["delta_vs"]["ort-exact"]["delta"] = -0.38
    assert "ship `nncf-m` instead" in r.int8_conclusion(wrong) and "under OpenVINO." not in r.int8_conclusion(wrong)
    assert "`nncf-m` under OpenVINO f32" in r.int8_conclusion(wrong)
    assert "**ORT CPU, AVX2 class (no VNNI)" in text and "misses the 0.1-point target" in text
    assert "**Fastest CPU deployment**" in text and "`ort-a` under OpenVINO at 0.20×" in text and "its latency is met here (0.200×)" in text
    assert "**TensorRT (ModelOpt Q/DQ):** ship `modelopt-e`" in text and "misses the 0.3-point target" in text
    assert "Convs stay float" not in text  # a run that did not measure the float Convs' MACs says nothing of them
    # a file TensorRT does not take that computes better on the selection split is named, with its confirmation
    assert ("A file TensorRT does not take computes better on val100 with exact arithmetic: `ort-a`, -0.40 [-1.20, +0.40] "
            "(-0.40 [-1.20, +0.40] on val500 minus val100)") in text  # nncf-m is scored under OpenVINO alone here
    better = _without(_synthetic_int8_result(), "ort-keep")
    for k in ("select", "confirm"):
        better.validations["modelopt-e"]["engines"]["ort-exact"][k]["delta_vs_fp32"]["delta"] = 0.001
    assert "A file TensorRT does not take" not in r.int8_conclusion(better)  # the pick itself computes best
    shares = _without(_synthetic_int8_result(), "ort-keep")
    shares.validations["modelopt-e"]["float_conv_macs_share"] = 0.0412
    assert "6 of its 82 Convs stay float (4.1 % of the Conv MACs), which TensorRT runs in FP16 / FP32." in r.int8_conclusion(shares)
    assert "OpenVINO bf16 runs the FP32 model itself at 0.35×" in text
    assert "kernel_probe" not in r.kernel_probe_text(res) and "no saturation" in r.kernel_probe_text(res)


def test_the_tensorrt_row_takes_the_best_file_tensorrt_takes():
    """The TensorRT pick is chosen among the recipes whose recorded rule check (int8/tensorrt.py) says
    TensorRT takes the file, ModelOpt's or ours, by exact Q/DQ on the selection split: a better exact
    Δ of a file TensorRT refuses (uint8) does not count."""
    from lowbit_helpers.report import int8 as r
    from lowbit_helpers.steps.int8 import tensorrt_pick

    res = _synthetic_int8_result()
    assert tensorrt_pick(res) == {"name": "modelopt-e", "considered": ["modelopt-e"], "kind": "ModelOpt", "label": "ModelOpt Q/DQ"}
    res.recipes["ort-a"]["tensorrt"] = {"ready": False, "violations": {"int8": {"count": 9, "first": []}}}
    res.recipes["ort-keep"]["tensorrt"] = {"ready": True, "violations": {}}  # exact Δ -0.001: better than ModelOpt's
    res.recipes["modelopt-e"]["tensorrt"] = {"ready": True, "violations": {}}
    pick = tensorrt_pick(res)
    assert pick == {"name": "ort-keep", "considered": ["ort-keep", "modelopt-e"], "kind": "TensorRT-ready", "label": "Q/DQ"}
    text = r.int8_conclusion(res)
    assert "**TensorRT (Q/DQ):** ship `ort-keep` (best val100 Δ with exact arithmetic of the TensorRT-ready recipes" in text
    res.recipes["ort-keep"]["tensorrt"]["ready"] = False  # a file TensorRT refuses: ModelOpt's again
    assert tensorrt_pick(res)["name"] == "modelopt-e"


def test_int8_report_where_qemu_is_missing():
    """Without QEMU the emulated CPU's entry is a Skipped: the table says why, nothing else reads it."""
    from lowbit_helpers.report import int8 as r

    res = _synthetic_int8_result()
    res.emulated["ort-a"] = Skipped("qemu-x86_64-static not found")
    assert r.emulation_table(res).loc["ort-a", "emulated CPU"] == "qemu-x86_64-static not found"
    assert not any("emulated" in c for c in r.drop_decomposition(res).columns)
    assert "ship `ort-keep`" in r.int8_conclusion(res) and "emulated" not in r.int8_conclusion(res)


def test_decode_image_without_a_browser():
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowbit_helpers.report.browser import decode_image

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    ok = decode_image("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    assert ok["png"] and (ok["width"], ok["height"]) == (200, 100) and ok["pixel_std"] > 0.01
    for bad in ("", "data:image/png;base64,", "data:image/png;base64,@@@", "data:image/jpeg;base64,AAAA",
                "data:image/png;base64," + base64.b64encode(b"not a png" * 100).decode()):
        assert not decode_image(bad)["png"], bad


def test_int8_report_with_openvino_on_the_selection_split_only():
    """int8.confirm_engines leaves OpenVINO out of the confirmation split: its rows show the selection
    split, the fastest deployment under it says it was not confirmed, and nothing is read that was not run."""
    from lowbit_helpers.report import int8 as r

    res = _without(_synthetic_int8_result(), "ort-keep")
    for v in res.validations.values():
        v["engines"]["openvino"].pop("confirm", None)
    fp32_ov = {"subset": "val100", "metrics": {"mAP_50_95": 0.399}, "delta_vs_fp32": {"delta": -0.001, "lo": -0.003, "hi": 0.001}}
    res.fp32_engines = {"engines": {"openvino": {"select": fp32_ov}}, "skipped_engines": {}}
    acc = r.accuracy_table(res)
    assert acc.loc[("fp32", "OpenVINO f32"), "Δ val100 [95%] (chosen on)"] == "-0.10 [-0.30, +0.10]"
    assert pd.isna(acc.loc[("fp32", "OpenVINO f32"), "Δ val500 minus val100 [95%] (confirmed on)"])
    assert r.drop_decomposition(res) is not None and r.emulation_table(res) is not None
    assert pd.isna(acc.loc[("ort-a", "OpenVINO f32"), "Δ val500 minus val100 [95%] (confirmed on)"])
    assert acc.loc[("ort-a", "OpenVINO f32"), "Δ val100 [95%] (chosen on)"] == "-0.40 [-1.20, +0.40]"
    assert acc.loc[("ort-a", "ORT kernels, VNNI CPU"), "Δ val500 minus val100 [95%] (confirmed on)"] == "-0.50 [-1.30, +0.30]"
    text = r.int8_conclusion(res)
    assert "`ort-a` under OpenVINO at 0.20×" in text and "not run on val500 minus val100 under that runtime" in text
    assert "ship `ort-a`" in text and "-0.50 [-1.30, +0.30] on val500 minus val100 through this CPU's kernels" in text
    assert "OpenVINO f32 runs the FP32 model itself at 0.50× ORT FP32." in text  # no confirmation-split Δ to quote


def test_int8_report_without_openvino_and_structure_only():
    from lowbit_helpers.report import int8 as r

    res = _synthetic_int8_result(openvino=False)
    assert "OpenVINO × ORT FP32" not in r.int8_table(res).columns
    text = r.int8_conclusion(res)
    assert "ship `ort-a`" in text and "nan" not in text and "under OpenVINO" not in text
    assert r.skipped_engines_text(res) == "OpenVINO f32 for `ort-a`, `ort-keep`, `nncf-m`, `modelopt-e` (skipped: x)"
    so = _synthetic_int8_result(structure_only=True)
    assert r.accuracy_table(so) is None and r.drop_decomposition(so) is None and r.emulation_table(so) is None
    text = r.int8_conclusion(so)
    assert text.startswith("Structure-only model") and "Fastest ORT variant: `ort-a`" in text
    assert "Fastest INT8 deployment of all: `ort-a` under OpenVINO at 0.200×" in text
    # a structure-only run times OpenVINO's settings too (no accuracy to check them on): the fastest may be one
    so.latency.append({"name": "ort-a", "runtime": "openvino", "precision": "bf16", "median_ms": 4.0, "threads": 2,
                       "setting": "bf16", "properties": {"INFERENCE_PRECISION_HINT": "bf16"}})  # fmt: skip
    assert "Fastest INT8 deployment of all: `ort-a` under OpenVINO with `bf16` (INFERENCE_PRECISION_HINT=bf16) at 0.100×" in (
        r.int8_conclusion(so))


def _with_openvino_settings(res: Int8Result, bf16_ms: float, bf16_select: float) -> Int8Result:
    """``res`` with a settings bench on ``ort-a``: ``unpinned`` (the same outputs as the default, a bit
    slower) and ``bf16`` (other outputs, so scored itself) at ``bf16_ms``, Δ ``bf16_select`` on val100."""

    def split(name, x):
        return {"subset": name, "metrics": {"mAP_50_95": 0.4 + x}, "delta_vs_fp32": {"delta": x, "lo": x - 0.008, "hi": x + 0.008}}

    res.openvino_settings = {
        "settings": {"bf16": {"INFERENCE_PRECISION_HINT": "bf16"}, "unpinned": {"ENABLE_CPU_PINNING": False}}, "skipped": {},
        "variants": {"ort-a": {"default": {"compile_s": 1.5, "cache": {"cold_s": 1.5, "warm_s": 0.4}},
                               "bf16": {"max_abs_diff": 0.25, "compile_s": 1.4,
                                        "scores": {"select": split("val100", bf16_select), "confirm": split("val500 minus val100", -0.005)}},
                               "unpinned": {"max_abs_diff": 0.0, "compile_s": 1.4}}}}  # fmt: skip
    ms = {"bf16": bf16_ms, "unpinned": 8.4}
    res.latency += [{"name": "ort-a", "runtime": "openvino", "precision": "f32", "median_ms": m, "threads": 2, "setting": s,
                     "properties": res.openvino_settings["settings"][s]} for s, m in ms.items()]  # fmt: skip
    return res


def test_openvino_settings_are_tabled_with_their_map_and_compete_for_the_fastest_deployment():
    from lowbit_helpers.report import int8 as r

    res = _with_openvino_settings(_synthetic_int8_result(), bf16_ms=5.0, bf16_select=-0.003)
    table = r.openvino_settings_table(res)
    assert list(table.index) == [("ort-a", "default"), ("ort-a", "bf16"), ("ort-a", "unpinned")]
    assert table.loc[("ort-a", "bf16"), "× ORT FP32"] == 0.125 and table.loc[("ort-a", "bf16"), "× default setting"] == 0.625
    assert table.loc[("ort-a", "bf16"), "mAP"] == "its own"
    assert table.loc[("ort-a", "unpinned"), "mAP"] == "the default's (same outputs)"
    # the same outputs: the default's scores, which are ort-a's under OpenVINO
    assert table.loc[("ort-a", "unpinned"), "Δ val100 [95%] (chosen on)"] == table.loc[("ort-a", "default"), "Δ val100 [95%] (chosen on)"]
    assert table.loc[("ort-a", "bf16"), "Δ val100 [95%] (chosen on)"] == "-0.30 [-1.10, +0.50]"
    assert "1.50 s cold, 0.40 s from the cache" in r.openvino_settings_text(res)
    res.openvino_settings["skipped"] = {"bf16x": "skipped: this CPU has no bf16 instructions"}
    assert "Not run here: `bf16x` (skipped: this CPU has no bf16 instructions)" in r.openvino_settings_text(res)
    assert r.int8_table(res).loc["ort-a", "OpenVINO ms (2 thr)"] == 8.0  # the default setting's row, not a setting's
    # a setting OpenVINO refuses for a file: its row says so, and it is no deployment
    refused = _with_openvino_settings(_synthetic_int8_result(), bf16_ms=5.0, bf16_select=-0.003)
    refused.openvino_settings["variants"]["ort-a"]["bf16"] = {"refused": "No suitable implementations."}
    refused.latency = [x for x in refused.latency if x.get("setting") != "bf16"]
    assert r.openvino_settings_table(refused).loc[("ort-a", "bf16"), "mAP"].endswith("with it: No suitable implementations.")
    assert "with `bf16`" not in r.int8_conclusion(refused)
    text = r.int8_conclusion(res)
    line = text[text.index("**Fastest CPU deployment**"):].split("\n")[0]
    assert "`ort-a` under OpenVINO with `bf16` (INFERENCE_PRECISION_HINT=bf16) at 0.12× ORT FP32" in line
    assert "-0.50 [-1.30, +0.30] on val500 minus val100 from its own outputs" in line
    # a faster setting that costs more than the target's points on the selection split is no pick
    slow_acc = _with_openvino_settings(_synthetic_int8_result(), bf16_ms=5.0, bf16_select=-0.006)
    text = r.int8_conclusion(slow_acc)
    line = text[text.index("**Fastest CPU deployment**"):].split("\n")[0]
    assert "with `bf16`" not in line and "`ort-keep` under OpenVINO at 0.20×" in line


def test_latency_ties_and_recipe_labels():
    from lowbit_helpers.report import int8 as r

    def fastest(slower_by):
        res = _synthetic_int8_result()  # ort-a (select -0.40) and ort-keep (-0.10) both at 8.0 ms under OpenVINO
        for row in res.latency:
            if row["name"] == "ort-keep" and row["runtime"] == "openvino":
                row["median_ms"] *= 1 + slower_by
        text = r.int8_conclusion(res)
        return text[text.index("**Fastest CPU deployment**"):].split("\n")[0]

    assert "`ort-keep` under OpenVINO" in fastest(0.02).split(":")[1]  # within 3 %: the more accurate one
    assert "`ort-a` under OpenVINO at 0.20×" in fastest(0.04)  # 4 % slower: not tied
    assert "Tied on speed" not in fastest(0.04)
    # an INT8 deployment slower than FP32's fastest is no speed pick: the rule says none, and why
    slow = _synthetic_int8_result()
    for row in slow.latency:
        row["median_ms"] = 45.0 if row["name"] != "fp32" else row["median_ms"]
    line = r.int8_conclusion(slow)
    line = line[line.index("**Fastest CPU deployment**"):].split("\n")[0]
    assert line.startswith("**Fastest CPU deployment** within 0.5 points on val100: none.")
    assert "slower than FP32's fastest (20.0 ms)" in line and "`ort-keep` under OpenVINO (45.0 ms)" in line
    assert r.recipe_label({"backend": "ort", "reduce_range": True}, "avgminmax") == "avgminmax 7-bit w"
    assert r.recipe_label({"backend": "ort", "placement": "conv-inputs", "bias_correction": "fast"}, "avgminmax") == (
        "avgminmax Q/DQ on Conv inputs fast BC")
    assert r.recipe_label({"backend": "nncf", "bias_correction": None, "format": "openvino"}, "mixed") == "mixed full BC (IR)"
    # an old run's ORT entry says "full" (NNCF's default then): no BC is shown for it
    assert r.recipe_label({"backend": "ort", "bias_correction": "full"}, "minmax") == "minmax"


def _synthetic_candidates(fp32_ms: float = 50.0) -> CandidatesResult:
    """A notebook-05 result shaped as steps.candidates.run_candidates writes it (numbers made up)."""

    def split(x, name="val500 minus val100"):
        return {"subset": name, "metrics": {"mAP_50_95": 0.38 + x}, "fp32_mAP_50_95": 0.38,
                "delta_vs_fp32": {"delta": x, "lo": x - 0.008, "hi": x + 0.008}}

    cands = {"w4a16-top0.g": ("w4a16-top0", -0.034, 1.7), "w4a16-top10.g": ("w4a16-top10", -0.022, 2.7),
             "budget75-w4a8-w8a8.g": ("budget75-w4a8-w8a8", -0.013, 2.5),
             "budget75-w4a8-w8a8.g.int": ("budget75-w4a8-w8a8", -0.017, 2.0)}  # fmt: skip
    recipes = {n: {"scheme": {"name": s, "kind": "budget" if s.startswith("budget") else "top_k"}} for n, (s, _, _) in cands.items()}
    recipes["budget75-w4a8-w8a8.g.int"].update(form="integer", int8_recipe="ort-keep")
    evals = {n: {"select": split(x + 0.01, "val100"), "confirm": split(x), "size_bytes": int(mib * 2**20)} for n, (_, x, mib) in cands.items()}
    rows = [{"name": "fp32", "median_ms": fp32_ms}, {"name": "int8:ort-keep", "median_ms": 0.55 * fp32_ms}]
    rows += [{"name": n, "median_ms": (0.6 if n.endswith(".int") else 1.2) * fp32_ms} for n in cands]
    evals["budget75-w4a8-w8a8.g"]["confirm_openvino"] = split(-0.015)  # the 75 % pick under OpenVINO (openvino_budgets)
    openvino_rows = [{"name": "budget75-w4a8-w8a8.g", "median_ms": 0.62 * fp32_ms},
                     {"name": "budget75-w4a8-w8a8.g.int", "median_ms": 0.7 * fp32_ms}]  # timed, not scored, under OpenVINO
    winners = {"50": {"budget_percent": 50.0, "candidate": "w4a16-top10.g", "eligible": 2},
               "75": {"budget_percent": 75.0, "candidate": "budget75-w4a8-w8a8.g", "eligible": 1}}  # fmt: skip
    integer = {"candidates": ["budget75-w4a8-w8a8.g.int"], "skipped": None,
               "winners": {"50": {"budget_percent": 50.0, "candidate": "budget75-w4a8-w8a8.g.int", "eligible": 1},
                           "75": {"budget_percent": 75.0, "candidate": "budget75-w4a8-w8a8.g.int", "eligible": 1}}}  # fmt: skip
    return CandidatesResult(method="g", ladder={}, sweep_match={}, recipes=recipes, evaluations=evals, winners=winners,
                            guided=None, controls=[], integer=integer, best_int8=None, latency={"rows": rows, "openvino_rows": openvino_rows},
                            fp32_size_bytes=9 << 20, seconds=0.0)  # fmt: skip


def test_headline_answers_first_from_one_bench():
    from lowbit_helpers.report.headline import headline_sentences, headline_table

    fp32_size = 9 << 20
    int8, cand = _synthetic_int8_result(), _synthetic_candidates()
    table = headline_table(int8, cand, fp32_size)
    assert list(table.index) == ["FP32 reference", "CPU INT8 (ORT, VNNI CPU)", "TensorRT INT8 (ModelOpt Q/DQ)",
                                 "low-bit, ≥ 50 % of weights in 4-bit", "low-bit, ≥ 75 % of weights in 4-bit",
                                 "low-bit under OpenVINO, ≥ 75 % of weights in 4-bit",
                                 "low-bit on integer kernels, ≥ 75 % of weights in 4-bit", "uniform W4A16"]  # fmt: skip
    ov = table.loc["low-bit under OpenVINO, ≥ 75 % of weights in 4-bit"]
    assert ov["model"] == "budget75-w4a8-w8a8.g" and ov["latency × FP32"] == 0.62  # OpenVINO's row of the same bench
    assert ov["Δ val500 minus val100 [95%]"].startswith("-1.50 [-2.30, -0.70] (OpenVINO CPU")
    assert table.loc["low-bit on integer kernels, ≥ 75 % of weights in 4-bit", "latency × FP32"] == 0.6
    # the integer form that wins both budgets is one row, at the larger, naming the other
    assert table.loc["low-bit on integer kernels, ≥ 75 % of weights in 4-bit", "chosen by"].endswith("also the best at ≥ 50 %")
    assert table.loc["CPU INT8 (ORT, VNNI CPU)", "model"] == "ort-keep"  # notebook 03's rule, not a second one
    assert table.loc["TensorRT INT8 (ModelOpt Q/DQ)", "model"] == "modelopt-e"
    # every ratio from notebook 05's bench: the INT8 pick's 0.55 there, not notebook 03's 0.6
    assert table.loc["CPU INT8 (ORT, VNNI CPU)", "latency × FP32"] == 0.55
    assert table.loc["uniform W4A16", "latency × FP32"] == 1.2 and table.loc["FP32 reference", "latency × FP32"] == 1.0
    assert table.loc["TensorRT INT8 (ModelOpt Q/DQ)", "latency × FP32"] == "— (GPU only)"
    assert table.loc["low-bit, ≥ 75 % of weights in 4-bit", "Δ val500 minus val100 [95%]"].startswith("-1.30 [-2.10, -0.50]")
    text = headline_sentences(int8, cand, fp32_size)
    assert text[0].startswith("**CPU:** ship `ort-keep` for ORT, VNNI CPU: -0.10 [-0.90, +0.70]") and "0.55× FP32 latency" in text[0]
    assert "is compatible with the 0.15-point target" in text[0]  # its point estimate is within, its interval reaches -0.90
    assert "**TensorRT:** ship `modelopt-e`: -1.20 [-2.00, -0.40]" in text[1] and "misses" in text[1]
    assert text[2].startswith("**Low-bit:** at ≥ 75 % of weights in 4-bit, ship `budget75-w4a8-w8a8.g`") and "28% of FP32's file" in text[2]
    assert "Uniform W4A16 (`w4a16-top0.g`) costs -3.40" in text[2]
    assert "OpenVINO runs the same file at 0.62× ORT's FP32 in the same bench: -1.50 [-2.30, -0.70] points on val500 minus val100 there" in text[2]
    assert text[3].startswith("**Low-bit on integer kernels:** at ≥ 75 % of weights in 4-bit, `budget75-w4a8-w8a8.g.int`")
    assert "-1.70 [-2.50, -0.90] points" in text[3] and "0.60× FP32 latency" in text[3] and "22% of FP32's file" in text[3]
    assert "0.70× ORT's FP32 in the same bench: its accuracy not scored under OpenVINO; the Δ is ORT's" in text[3]
    assert text[4].startswith("Latency ratios: notebook 05's")
    # without notebook 05, notebook 03's bench gives the ratios; nothing at all: no table
    only8 = headline_table(int8, Skipped("off"), fp32_size)
    assert only8.loc["CPU INT8 (ORT, VNNI CPU)", "latency × FP32"] == 0.6 and len(only8) == 3
    assert headline_table(Skipped("x"), Skipped("y"), fp32_size) is None


@pytest.mark.slow
def test_the_browser_check_sees_what_a_reader_sees(tmp_path):
    """A blank page and an empty figure fail the check the smoke run applies to the real report."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowbit_helpers.report.browser import render

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1, 2], [1, 3, 2])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    png = base64.b64encode(buf.getvalue()).decode()
    page = tmp_path / "p.html"
    # a real figure; an empty one; bytes that are long enough but no PNG; a PNG of one blank colour
    fig2 = plt.figure(figsize=(4, 3))
    blank_png = io.BytesIO()
    fig2.savefig(blank_png, format="png")
    plt.close(fig2)
    garbage = base64.b64encode(b"\x89PNG not really" * 2000).decode()
    blank_b64 = base64.b64encode(blank_png.getvalue()).decode()
    page.write_text(f"<html><body><h1>Report</h1><h2>The answer</h2><table><tr><th>role</th></tr><tr><td>fp32</td></tr></table>"
                    f"<h2>Plot</h2><img src='data:image/png;base64,{png}'><img src='data:image/png;base64,'>"
                    f"<img src='data:image/png;base64,{garbage}'><img src='data:image/png;base64,{blank_b64}'></body></html>")  # fmt: skip
    r = render(page)
    assert r["headings"] == ["Report", "The answer", "Plot"]
    assert r["tables"][0]["after"] == "The answer" and r["tables"][0]["text"] == ["role", "fp32"]
    real, empty, broken, blank_fig = r["images"]
    assert real["png"] and (real["width"], real["height"]) == (400, 300) and real["pixel_std"] > 0.01
    assert not empty["png"] and not broken["png"]  # the empty and the undecodable figure are seen as such
    assert blank_fig["png"] and blank_fig["pixel_std"] == 0.0  # decodes, but shows nothing
    assert r["screenshot_std"] > 0.02
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    assert render(blank)["screenshot_std"] == 0.0


def test_per_class_change_draws_what_the_steps_recorded():
    """The report's per-class table is arithmetic on recorded results: the picks' per-class AP (their
    evaluations) against FP32's (steps.summary.fp32_per_class); thin classes and classes FP32 has no
    AP for (null) are left out, and nothing is drawn without FP32's record."""
    from lowbit_helpers.report.headline import per_class_delta

    int8, cand = _synthetic_int8_result(), _synthetic_candidates()
    split = "val500 minus val100"  # the confirmation split: per-class on images nobody chose on
    int8.validations["ort-keep"]["engines"]["ort"]["confirm"]["per_class_ap"] = {"cat": 0.40, "dog": 0.50, "yak": 0.3}
    cand.evaluations["budget75-w4a8-w8a8.g"]["confirm"] = {**cand.evaluations["budget75-w4a8-w8a8.g"]["confirm"],
                                                           "subset": split, "per_class_ap": {"cat": 0.35, "dog": 0.52, "yak": 0.1}}
    fp32 = {"subset": split, "ap": {"cat": 0.42, "dog": 0.50, "yak": None}, "count": {"cat": 40, "dog": 30, "yak": 90}}
    table = per_class_delta(fp32, int8, cand)
    assert list(table.columns) == ["INT8 ort-keep", "low-bit budget75-w4a8-w8a8.g"]
    assert list(table.index) == ["cat (40)", "dog (30)"]  # sorted by the low-bit pick's change; yak has no FP32 AP
    assert table.loc["cat (40)", "low-bit budget75-w4a8-w8a8.g"] == pytest.approx(-7.0)
    assert table.loc["cat (40)", "INT8 ort-keep"] == pytest.approx(-2.0)
    assert list(per_class_delta(fp32, int8, cand, min_instances=35).index) == ["cat (40)"]
    assert per_class_delta(None, int8, cand) is None
    assert per_class_delta({**fp32, "subset": "val100"}, int8, cand) is None  # another subset: nothing to compare


def test_target_lines_state_each_target_with_its_numbers():
    """Notebook 05's target lines: met / not met from the confirmation split, the best ≥ 75 % candidate of each
    form chosen on the selection split, and an integer form's exact Q/DQ Δ beside its kernels' Δ."""
    from lowbit_helpers.report.candidates import target_lines

    cand = _synthetic_candidates()
    share = {"w4a16-top0.g": 1.0, "w4a16-top10.g": 0.86, "budget75-w4a8-w8a8.g": 0.75, "budget75-w4a8-w8a8.g.int": 0.75}
    for n, r in cand.recipes.items():
        r["materialize"] = {"four_bit_share": share[n]}
    ex = {"subset": "val500 minus val100", "delta_vs_fp32": {"delta": -0.015, "lo": -0.025, "hi": -0.005}}
    cand.evaluations["budget75-w4a8-w8a8.g.int"]["confirm_exact"] = ex
    w16, flt, integer = target_lines(cand)
    assert "keeps 91.1 % of FP32 mAP50-95 on val500 minus val100" in w16 and "**not met**" in w16
    assert "chosen on val100: `budget75-w4a8-w8a8.g`" in flt and "within 1.0 points **not met**" in flt
    assert "file 0.28× FP32: ≤ 0.25× **not met**" in flt and "latency 1.20× FP32: ≤ 0.65× **not met**" in flt
    assert "exact" not in flt
    assert ("`budget75-w4a8-w8a8.g.int` (75.0 % 4-bit), Δ on val500 minus val100 -1.70 [-2.50, -0.90] "
            "(exact Q/DQ arithmetic on the same images: -1.50 [-2.50, -0.50]): within 1.0 points **not met**") in integer
    assert "file 0.22× FP32: ≤ 0.25× **met**" in integer and "latency 0.60× FP32: ≤ 0.65× **met**" in integer


def test_the_reconstruction_table_puts_each_forms_cost_beside_its_map():
    """Notebook 05's "what more compute buys": one row per integer form, 0 iterations for the method's own
    codes, the reconstruction's cost beside its mAP; no table without a reconstructed form."""
    from lowbit_helpers.report.candidates import reconstruction_table

    cand = _synthetic_candidates()
    assert reconstruction_table(cand) is None
    name = "budget75-w4a8-w8a8.g.br300.int"
    cand.recipes[name] = {**cand.recipes["budget75-w4a8-w8a8.g.int"], "reconstruction": {
        "settings": {"iterations": 300, "images": 32}, "seconds": 181.0, "peak_rss_mb": 3100, "changed_codes": 30,
        "weights": 1000, "blocks": [{"kept": True}, {"kept": False}]}}  # fmt: skip
    cand.evaluations[name] = {**cand.evaluations["budget75-w4a8-w8a8.g.int"]}
    cand.evaluations[name]["select"] = {**cand.evaluations[name]["select"], "metrics": {"mAP_50_95": 0.371},
                                        "delta_vs_fp32": {"delta": -0.009, "lo": -0.015, "hi": -0.001}}  # fmt: skip
    cand.integer["candidates"] = ["budget75-w4a8-w8a8.g.int", name]
    table = reconstruction_table(cand)
    rows = table.reset_index().set_index("iterations per block")
    assert list(rows.index) == [0, 300]
    assert rows.loc[300, "seconds"] == "181" and rows.loc[0, "seconds"] == 0.0 and rows.loc[300, "codes changed"] == "3.0 %"
    assert rows.loc[300, "blocks kept"] == "1 / 2" and rows.loc[300, "mAP50-95 val100"] == "37.1"
    assert rows.loc[300, "Δ val100 [95%]"].startswith("-0.90 [-1.50, -0.10]")


def test_openvino_latency_sits_beside_each_candidates_ort_latency():
    """Notebook 05's bench also times each file OpenVINO compiles: its ratio to ORT's FP32 in the candidate
    table and beside the ≥ 75 % candidates' latency target, "refused" (with OpenVINO's reason) where it
    cannot compile the file."""
    from lowbit_helpers.report.candidates import candidate_table, target_lines

    cand = _synthetic_candidates(fp32_ms=50.0)
    for n, r in cand.recipes.items():
        r["materialize"] = {"four_bit_share": 0.75 if "budget75" in n else 1.0, "precisions": {}}
    for n, ev in cand.evaluations.items():
        ev["select"]["metrics"].update(mAP_50=0.5, mAP_75=0.4)
        ev.update(fidelity={"sqnr_db": 20.0}, qdq={"QuantizeLinear": 1, "DequantizeLinear": 1},
                  ort_cpu={"QLinearConv": 1, "float_Conv": 0, "DequantizeLinear": 0})  # fmt: skip
    for r in cand.latency["rows"]:
        r["p90_ms"] = r["median_ms"]
    cand.latency["openvino_rows"] = [{"name": "fp32", "median_ms": 40.0}, {"name": "budget75-w4a8-w8a8.g.int", "median_ms": 20.0}]
    cand.latency["openvino_skipped"] = {"budget75-w4a8-w8a8.g": "OpenVINO cannot compile b75.onnx: FrontEnd API failed"}
    table = candidate_table(cand)
    assert table.loc["fp32", "OpenVINO × ORT FP32"] == 0.8 and table.loc["budget75-w4a8-w8a8.g.int", "OpenVINO × ORT FP32"] == 0.4
    assert table.loc["budget75-w4a8-w8a8.g", "OpenVINO × ORT FP32"] == "refused" and table.loc["w4a16-top0.g", "OpenVINO × ORT FP32"] == "—"
    from lowbit_helpers.report.headline import headline_sentences

    text = headline_sentences(_synthetic_int8_result(), cand, 9 << 20)
    assert any(x.startswith("**Low-bit on integer kernels:**") and "OpenVINO runs the same file at 0.40× ORT's FP32" in x for x in text)
    assert any(x.startswith("**Low-bit:**") and "OpenVINO" not in x for x in text)  # refused there: nothing said
    lines = target_lines(cand)
    assert any("`budget75-w4a8-w8a8.g.int`" in x and "(under OpenVINO, same bench: 0.40× ORT's FP32)" in x for x in lines)
    assert any("`budget75-w4a8-w8a8.g`" in x and "(OpenVINO cannot compile it: OpenVINO cannot compile b75.onnx" in x for x in lines)


def test_a_model_that_wins_several_budgets_is_one_answer_row():
    from lowbit_helpers.steps.summary import _by_model

    w = {"25": {"budget_percent": 25.0, "candidate": "a"}, "50": {"budget_percent": 50.0, "candidate": "a"},
         "75": {"budget_percent": 75.0, "candidate": "b"}}  # fmt: skip
    assert _by_model(w) == [(w["50"], "; also the best at ≥ 25 %"), (w["75"], "")]
