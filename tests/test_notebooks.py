"""Smoke runs of the whole main job: six notebooks via papermill, HTML via nbconvert."""

import json
import shutil

import nbformat
import pytest

from lowbit_helpers.artifacts import read_json
from lowbit_helpers.errors import LowbitError
from lowbit_helpers.pipeline import NOTEBOOK_DIR, run_pipeline
from lowbit_helpers.report.sections import SECTIONS
from lowbit_helpers.schema import Skipped
from tests.smoke import SMOKE_ID, smoke_params

SECTION_ORDER = [s.title for s in SECTIONS]


def test_notebooks_are_committed_without_outputs():
    for nb in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        book = nbformat.read(str(nb), as_version=4)
        assert any("parameters" in c.metadata.get("tags", []) for c in book.cells), nb.name
        for c in book.cells:
            assert c.cell_type != "code" or (not c.outputs and c.execution_count is None), nb.name
        ids = [c.get("id") for c in json.loads(nb.read_text())["cells"]]  # nbformat 4.5: every cell has its own id
        assert None not in ids and len(set(ids)) == len(ids), nb.name


@pytest.mark.slow
def test_smoke_run_of_all_notebooks(smoke_run):
    from lowbit_helpers.rundir import RunDir
    from lowbit_helpers.runtime.sessions import _openvino_has_bf16

    report, run, root = smoke_run.report, smoke_run.run, smoke_run.root
    assert report.is_file()
    html = report.read_text()
    assert "FP32 baseline" in html and "PASS: top-k decode" in html and "Traceback" not in html
    assert "def " not in html  # code hidden
    manifest = read_json(run / "manifest.json")
    assert set(manifest["stages"]) >= {"baseline_onnx", "calibration", "fp32_evaluation", "fp32_latency", "parity", "summary",
                                       "int8:ort-percentile", "int8:modelopt-max", "int8-eval:ort-percentile", "int8-latency",
                                       "int8:nncf-mixed", "int8-eval:nncf-mixed", "int8-fp32-engines", "int8-kernel-probe",
                                       "int8:nncf-ov", "int8-eval:nncf-ov",
                                       "int8-emulated:ort-percentile"}  # fmt: skip
    nb03 = (run / "html" / "03_int8_ptq.html").read_text()
    assert "INT8 baselines" in html and "ORT CPU (" in html and "quantize-int8" in nb03 and "Traceback" not in nb03
    # every variant under every engine (ORT kernels, exact Q/DQ, OpenVINO), the peer's row, the emulated AVX2 CPU
    assert "exact Q/DQ" in nb03 and "OpenVINO f32" in nb03 and "nncf-mixed" in nb03 and "Best NNCF row" in nb03
    assert "Haswell (avx2, fma)" in nb03 and "saturated" in nb03
    # our TensorRT-ready recipe holds TensorRT's rules and competes with ModelOpt's in the TensorRT row
    assert read_json(run / "onnx" / "ort-trt-bc.recipe.json")["tensorrt"] == {"ready": True, "violations": {}}
    assert not read_json(run / "onnx" / "ort-percentile.recipe.json")["tensorrt"]["ready"]
    assert "TensorRT INT8 (Q/DQ)" in (run / "summary.md").read_text()
    ev = read_json(run / "int8-coco" / "ort-percentile.json")
    assert set(ev["engines"]) == {"ort", "ort-exact", "openvino"}
    assert ev["engines"]["ort"]["confirm"]["delta_vs"]["ort-exact"]["n"] == 50
    assert {r["runtime"] for r in read_json(run / "int8-coco" / "latency.json")["rows"]} == {"ort", "openvino"}
    # OpenVINO's settings (smoke: bf16 and unpinned) on every variant OpenVINO scores, timed in the same bench: bf16's
    # raw head differs on this CPU, so it is scored itself; unpinned's is the default's, so it takes the default's mAP
    ov = RunDir.open(run).read("int8-coco/openvino_settings.json")  # with its measured costs (compile times) merged back
    scored_ov = {n for n in ("ort-percentile", "nncf-mixed", "nncf-ov", "ort-trt-bc") if "openvino" in read_json(
        run / "int8-coco" / f"{n}.json")["engines"]}  # fmt: skip
    assert scored_ov <= set(ov["variants"]) and "nncf-ov" in ov["variants"]
    bf16 = "bf16" not in ov["skipped"]  # a CPU without bf16 instructions skips that setting, with its reason
    assert bf16 == _openvino_has_bf16() and (bf16 or ov["skipped"]["bf16"].startswith("skipped: this CPU has no bf16"))
    for n, rows in ov["variants"].items():
        assert rows["unpinned"]["max_abs_diff"] == 0.0 and "scores" not in rows["unpinned"], n
        if bf16 and "refused" not in rows["bf16"]:  # OpenVINO 2026.4 refuses bf16 for NNCF's file: recorded, not run
            assert rows["bf16"]["max_abs_diff"] > 0 and rows["bf16"]["scores"]["confirm"]["delta_vs_fp32"]["n"] == 50, n
        assert rows["default"]["cache"]["warm_s"] < rows["default"]["cache"]["cold_s"], n
    assert not bf16 or any("scores" in rows["bf16"] for rows in ov["variants"].values())
    timed = {(r["name"], r.get("setting")) for r in read_json(run / "int8-coco" / "latency.json")["rows"] if r["runtime"] == "openvino"}
    compiled = {(n, s) for n, rows in ov["variants"].items() for s, row in rows.items() if s != "default" and "refused" not in row}
    assert compiled == {(n, s) for n, s in timed if s} and len(compiled) >= len(ov["variants"])
    assert "× default setting" in nb03 and "(same outputs)" in nb03 and "s from the cache" in nb03
    # notebook 05's bench: every file under ORT, and under OpenVINO each one it compiles (the others with why)
    lat5 = read_json(run / "results" / "latency.json")
    assert {r["runtime"] for r in lat5["rows"]} == {"ort"} and {r["runtime"] for r in lat5["openvino_rows"]} == {"openvino"}
    assert {r["name"] for r in lat5["openvino_rows"]} | set(lat5["openvino_skipped"]) == {r["name"] for r in lat5["rows"]}
    assert any(r["name"].endswith(".int") for r in lat5["openvino_rows"])  # the integer-kernel forms run under OpenVINO
    # the NNCF OpenVINO IR: scored and timed by OpenVINO alone
    ir = read_json(run / "int8-coco" / "nncf-ov.json")
    assert set(ir["engines"]) == {"openvino"} and "ort" in ir["skipped_engines"] and (run / "onnx" / "nncf-ov.bin").is_file()
    # each model also ran under ORT's profiler: the Conv kernels against FP32's, in the table and the conclusion
    assert "Conv kernels take" in html and "Conv × FP32" in (run / "html" / "03_int8_ptq.html").read_text()
    assert "Where the time goes" in (run / "summary.md").read_text()
    # notebook 04: the params enable the metric validation and the Torch proxy; both ran (not skipped)
    assert {"sensitivity", "sensitivity-validation", "sensitivity-proxy", "schemes"} <= set(manifest["stages"])
    proxy = read_json(run / "sensitivity" / "torch_proxy.json")
    assert proxy["mapping"] and len(proxy["rows"]) == len(proxy["mapping"]) and -1 <= proxy["spearman"] <= 1
    validation = read_json(run / "sensitivity" / "validation.json")
    assert validation["studies"] and all(st["rows"] for st in validation["studies"].values())
    nb04 = (run / "html" / "04_layer_sensitivity.html").read_text()
    assert "Traceback" not in nb04 and "Metric validation: skipped" not in nb04 and "Torch proxy: skipped" not in nb04
    # notebook 05: the ladder, every candidate materialised and scored, the guided-vs-random controls
    nb05 = (run / "html" / "05_lowbit_candidates.html").read_text()
    assert "The 4-bit method ladder" in nb05 and "Traceback" not in nb05 and "Method for every candidate" in nb05
    assert {"candidate:w4a8-top0.rtn", "candidate:w4a8-top0.gptq-bc-b64", "candidate:w8a8-top5", "candidate:fp8-all",
            "candidates-latency"} <= set(manifest["stages"])  # fmt: skip
    cands = read_json(run / "results" / "candidates.json")
    assert cands["guided"] and len(cands["controls"]) == 2 and cands["winners"]
    assert all("confirm" in cands["evaluations"][n] for n in cands["controls"])
    assert "Low-bit candidates" in html and "Low-bit candidates" in (run / "summary.md").read_text()
    assert all(v["status"] == "ok" for v in manifest["notebooks"].values()) and len(manifest["notebooks"]) == 6
    for rel in ("baseline-onnx/model.onnx", "calib/calib.npy", "baseline-coco/metrics.json", "baseline-coco/parity.json"):
        assert rel in manifest["artifacts"] and (run / rel).is_file()
    assert read_json(run / "calib/calib.json")["shape"] == [4, 3, 640, 640]
    assert (run / "summary.md").read_text() == (root / "reports" / SMOKE_ID / "summary.md").read_text()

    # the answer first: the headline table and its sentences open the report, then every section
    summary = (run / "summary.md").read_text()
    assert summary.index("## The answer") < summary.index("## FP32 baseline") and "**CPU:** ship `" in summary
    # one section order (report/sections.py), read by the notebook and the summary alike
    md_heads = [line.split(" ", 1)[1] for line in summary.splitlines() if line.startswith(("## ", "### "))]
    assert md_heads == [t for t in SECTION_ORDER if t in md_heads] and len(md_heads) >= 6, md_heads
    assert str(root) not in html and str(root) not in summary  # no absolute path of the machine


@pytest.mark.slow
def test_the_integer_form_and_the_answer_as_data(smoke_run):
    """Notebook 05 builds the integer-kernel form of the params' integer scheme in notebook 03's best
    ORT recipe (every Conv of that recipe a QLinearConv under ORT, scored with exact Q/DQ too and
    confirmed); ``answer.json`` beside ``summary.md`` holds one record per row of the answer table,
    FP32 first, each naming a file of the run and the Δ its evaluation recorded."""
    run, root = smoke_run.run, smoke_run.root
    from lowbit_helpers.lowbit import parse_method

    cands = read_json(run / "results" / "candidates.json")
    method = parse_method(cands["method"]).per_channel  # the ladder's method, one scale per output channel
    name, learned = f"budget50-w4a8-w8a8.{method}.int", f"budget50-w4a8-w8a8.{method}.br2.int"
    assert cands["integer"]["candidates"] == sorted([name, learned]) and cands["integer"]["skipped"] is None
    recipe = read_json(run / "candidates" / f"{name}.recipe.json")
    assert recipe["form"] == "integer" and recipe["method"] == method and recipe["materialize"]["deployed"]["int4"] > 0
    # the same scheme with its codes learned by block reconstruction (params: two steps per block, 4 images)
    br = read_json(run / "candidates" / f"{learned}.recipe.json")["reconstruction"]
    assert br["settings"]["iterations"] == 2 and br["settings"]["images"] == 4 and br["blocks"] and br["convs"] > 0
    assert "seconds" not in br and "peak_rss_mb" not in br  # costs live in the manifest: the file is the same bytes every run
    cost = read_json(run / "manifest.json")["artifacts"][f"candidates/{learned}.recipe.json"]["measured"]["reconstruction"]
    assert cost["seconds"] > 0 and cost["peak_rss_mb"] > 0
    ev = cands["evaluations"][name]
    recipe_ev = read_json(run / "int8-coco" / f"{recipe['int8_recipe']}.json")
    assert ev["ort_cpu"]["QLinearConv"] == recipe_ev["ort_cpu"]["QLinearConv"] > 0  # the same Convs as the INT8 recipe
    assert "confirm" in ev and ev["confirm_exact"]["subset"] == ev["confirm"]["subset"]  # exact Q/DQ on the same images
    assert "budget_percent" in next(iter(cands["integer"]["winners"].values()))

    answer = json.loads((root / "reports" / SMOKE_ID / "answer.json").read_text(), parse_constant=_no_constant)
    assert answer == read_json(run / "answer.json")
    keys = {"role", "model", "file", "select_split", "confirm_split", "map_confirm", "delta_confirm", "engine", "size_mib",
            "latency_ratio", "runtime", "rule"}  # fmt: skip
    assert all(set(r) == keys for r in answer) and answer[0]["model"] == "fp32" and answer[0]["delta_confirm"] == [0, 0, 0]
    assert len(answer) >= 4 and any(r["role"].startswith("low-bit on integer kernels") for r in answer)
    for r in answer[1:]:
        assert (run / r["file"]).is_file(), r["file"]
        point, lo, hi = r["delta_confirm"]
        assert lo <= hi and r["select_split"] != r["confirm_split"]
        assert abs(r["map_confirm"] - point - answer[0]["map_confirm"]) < 0.011  # the same images' FP32
    low = next(r for r in answer if r["role"].startswith("low-bit on integer kernels"))
    confirm = cands["evaluations"][low["model"]]["confirm"]
    assert low["delta_confirm"][0] == round(100 * confirm["delta_vs_fp32"]["delta"], 2)
    assert low["latency_ratio"] > 0 and "ORT CPU" in low["runtime"]
    # the 50 % pick (candidates.openvino_budgets) also under OpenVINO: its own Δ on the same images, its own latency
    ov = next((r for r in answer if r["role"].startswith("low-bit under OpenVINO")), None)
    assert ov, f"no OpenVINO row: {read_json(run / 'results' / 'candidates.json')['evaluations']}"
    pick = next(r for r in answer if r["role"] == ov["role"].replace("low-bit under OpenVINO", "low-bit"))
    scored = read_json(run / "results" / f"{ov['model']}.openvino.json")["confirm_openvino"]
    assert ov["model"] == pick["model"] and ov["engine"] == "OpenVINO CPU" and ov["runtime"].startswith("OpenVINO CPU")
    assert ov["delta_confirm"][0] == round(100 * scored["delta_vs_fp32"]["delta"], 2) and ov["confirm_split"] == pick["confirm_split"]
    lat = read_json(run / "results" / "latency.json")
    fp32_ms = next(r["median_ms"] for r in lat["rows"] if r["name"] == "fp32")
    ov_ms = next(r["median_ms"] for r in lat["openvino_rows"] if r["name"] == ov["model"])
    assert ov["latency_ratio"] == round(ov_ms / fp32_ms, 3)  # OpenVINO's row of notebook 05's bench, to ORT's FP32


def _no_constant(token: str):
    raise ValueError(f"non-strict JSON token {token}")



@pytest.mark.slow
def test_a_committed_validation_is_shown_only_where_everything_that_made_it_matches(smoke_run, tmp_path, monkeypatch):
    """With the validation off, a run shows the committed result (labelled with its date and commit)
    only where the model, the images and boxes, the calibration images, the method and the metrics'
    code that made it equal the run's own; otherwise it says which of them differs."""
    import json

    from lowbit_helpers.report.sensitivity import committed_label
    from lowbit_helpers.rundir import RunDir
    from lowbit_helpers.sensitivity.metrics import read_back
    from lowbit_helpers.steps import sensitivity as step

    run = RunDir.open(smoke_run.run)
    s = run.cfg.sensitivity
    off = run.cfg.model_copy(update={
        "output": run.cfg.output.model_copy(update={"reports_dir": str(tmp_path)}),
        "sensitivity": s.model_copy(update={"validation": s.validation.model_copy(update={"enabled": False})})})  # fmt: skip
    view = RunDir(run.path, off)  # the smoke run's inputs, the validation not rerun
    made = read_json(run.path / step.VALIDATION)
    assert set(made["made_by"]) == {"model_sha256", "evaluation", "calibration", "decode", "code"}
    committed = tmp_path / step.FULL_RUN / step.VALIDATION_REPORT
    committed.parent.mkdir()
    sens = read_back(read_json(run.path / step.SENS))

    def shown(record):
        committed.write_text(json.dumps({**record, "made_on": {"date": "2026-12-05", "commit": "abc1234"}}))
        return step.validation(view, sens)

    ok = shown(made)
    assert ok["committed"] == f"{step.FULL_RUN}/{step.VALIDATION_REPORT}" and ok["agreement"]["spearman"]
    label = committed_label(ok)
    assert "2026-12-05" in label and "abc1234" in label
    for key, value, named in (("calibration", {**made["made_by"]["calibration"], "sha256": "0" * 64}, "calibration"),
                              ("evaluation", {**made["made_by"]["evaluation"], "sha256": "0" * 64}, "evaluation"),
                              ("model_sha256", "0" * 64, "model_sha256")):  # fmt: skip
        why = shown({**made, "made_by": {**made["made_by"], key: value}})
        assert isinstance(why, Skipped) and f"another {named}" in why.why, getattr(why, "why", "shown although it differs")
    why = shown({**made, "method": "rtn" if made["method"] != "rtn" else "gptq"})
    assert isinstance(why, Skipped) and "method (" in why.why
    why = shown({**made, "made_by": {**made["made_by"], "evaluation": {**made["made_by"]["evaluation"], "subset": "val1300"}}})
    assert isinstance(why, Skipped) and "images this run cannot open" in why.why  # not in the smoke's annotation file
    why = shown({k: v for k, v in made.items() if k != "made_by"})
    assert isinstance(why, Skipped) and "does not record what made it" in why.why
    monkeypatch.setattr(step, "SWEEP_VERSION", step.SWEEP_VERSION + 1)  # the metrics' code changed since
    why = shown(made)
    assert isinstance(why, Skipped) and "another code" in why.why

def _refuse(token):
    raise ValueError(f"{token} is not JSON")


@pytest.mark.slow
def test_every_json_the_smoke_run_writes_is_strict_json(smoke_run):
    """jq and JavaScript read every JSON of a run: no NaN or Infinity token (write_json writes null)."""
    import json

    files = sorted(smoke_run.root.rglob("*.json"))
    assert len(files) > 50 and any(f.name == "sensitivity.json" for f in files) and any(f.name == "metrics.json" for f in files)
    for f in files:
        try:
            json.loads(f.read_text(), parse_constant=_refuse)
        except ValueError as exc:
            raise AssertionError(f"{f.relative_to(smoke_run.root)}: {exc}") from None

@pytest.mark.slow
def test_the_report_as_a_browser_shows_it(smoke_run):
    """Headless Chromium's DOM and screenshot of the smoke report: every section in order, the answer's
    table filled, and each figure a PNG that decodes to a non-blank image of a readable size."""
    from lowbit_helpers.report.browser import render

    page = render(smoke_run.report)
    assert page["headings"][:2] == ["YOLOv10 low-bit quantization report", "The answer"]
    assert [h for h in page["headings"] if h in SECTION_ORDER] == SECTION_ORDER  # every section, in that order
    answer = next(t for t in page["tables"] if t["after"] == "The answer")
    assert answer["rows"] >= 4 and any(x.startswith("ort-") for x in answer["text"]) and "fp32" in answer["text"]
    figures = {i["after"] for i in page["images"] if i["png"] and i["width"] >= 300 and i["height"] >= 200
               and i["pixel_std"] > 0.02}  # fmt: skip
    assert {"What the picks see", "Per-class accuracy", "Per-layer sensitivity", "Low-bit candidates"} <= figures, page["images"]
    assert all(i["png"] for i in page["images"]), page["images"]  # no figure that does not decode
    assert page["screenshot_std"] > 0.02  # the first screen is not blank


@pytest.mark.slow
def test_gpu_bench_on_a_machine_without_a_gpu(smoke_run, tmp_path):
    """The GPU benchmark runs as is where there is no GPU: for every model one line per engine that
    says why it did not run (never a failure, never an empty result, nothing guessed); on a GPU
    machine every model has its numbers."""
    import importlib.util

    import onnxruntime as ort

    from lowbit_helpers.__main__ import main

    assert main(["gpu-bench", str(smoke_run.run), "--runs", "2", "--out", str(tmp_path / "gpu.json")]) == 0
    gpu = read_json(tmp_path / "gpu.json")
    models = set(gpu["models"])
    assert "fp32" in models and any(m.startswith("int8:") for m in models) and len(models) >= 3
    assert set(gpu["cuda_ep"]) == models and set(gpu["tensorrt"]) == models
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert all("median_ms" in r for r in gpu["cuda_ep"].values()), gpu["cuda_ep"]
    else:
        assert all(set(r) == {"skipped"} and "CUDAExecutionProvider" in r["skipped"] for r in gpu["cuda_ep"].values())
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("polygraphy") is None:
        assert all(set(r) == {"skipped"} and "no TensorRT" in r["skipped"] for r in gpu["tensorrt"].values()), gpu["tensorrt"]
    else:  # the INT4 candidates may be refused by TensorRT; FP32 and INT8 build
        assert "median_ms" in gpu["tensorrt"]["fp32"] and all("failed" not in gpu["tensorrt"][m] for m in models if m.startswith("int8:"))


@pytest.mark.slow
def test_the_cli_pointed_at_the_run_writes_its_candidate(smoke_run, tmp_path, capsys):
    """`materialize SCHEME MODEL --run RUN` takes the run's chosen method, calibration and image
    counts: the file is the run's own candidate, byte for byte, whatever torch's thread count in
    the calling process (GPTQ's float sums are split per thread: runtime/threads.py TORCH_THREADS);
    with ``--integer-form`` and the run's INT8 recipe, the run's integer-kernel form (a missing
    recipe file or a blocked method: one error with its fix, nothing written)."""
    import torch

    from lowbit_helpers.__main__ import main

    run = smoke_run.run
    method = read_json(run / "results" / "candidates.json")["method"]
    assert method.startswith("gptq")  # the statistics and GPTQ path, not round to nearest
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before != 1 else 2)  # another one: the codes must not depend on it
    try:
        out = tmp_path / "w4a8-top0.onnx"
        assert main(["materialize", str(run / "schemes" / "w4a8-top0.json"), str(run / "baseline-onnx" / "model.onnx"),
                     "--run", str(run), "--out", str(out)]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert out.read_bytes() == (run / "candidates" / f"w4a8-top0.{method}.onnx").read_bytes()
    assert read_json(out.with_suffix(".recipe.json"))["method"] == method

    # the integer-kernel form: --integer-form with the run's INT8 recipe, the method per output channel by default
    from lowbit_helpers.lowbit import parse_method

    name = read_json(run / "results" / "candidates.json")["integer"]["candidates"][0]
    recipe = read_json(run / "candidates" / f"{name}.recipe.json")
    int8 = run / "onnx" / f"{recipe['int8_recipe']}.onnx"
    args = ["materialize", str(run / "schemes" / "budget50-w4a8-w8a8.json"), str(run / "baseline-onnx" / "model.onnx"),
            "--run", str(run)]  # fmt: skip
    out = tmp_path / "int.onnx"
    assert main([*args, "--integer-form", str(tmp_path / "missing.onnx"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: INT8 recipe not found" in err and "fix:" in err and not out.exists()
    assert main([*args, "--integer-form", str(int8), "--method", method, "--out", str(out)]) == 2  # blocked scales
    assert "blocked scales" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--integer-form", str(int8), "--out", str(out)]) == 0
    assert out.read_bytes() == (run / "candidates" / f"{name}.onnx").read_bytes()
    assert read_json(out.with_suffix(".recipe.json"))["method"] == recipe["method"] == parse_method(method).per_channel
    # --reconstruct N: the run's reconstructed form, byte for byte (the torch model from the run's model.weights)
    learned = next(n for n in read_json(run / "results" / "candidates.json")["integer"]["candidates"] if ".br" in n)
    out = tmp_path / "int-br.onnx"
    assert main([*args, "--integer-form", str(int8), "--reconstruct", "2", "--out", str(out)]) == 0
    assert out.read_bytes() == (run / "candidates" / f"{learned}.onnx").read_bytes()

@pytest.mark.slow
def test_a_rerun_reuses_every_stage_and_recomputes_the_same_bytes(smoke_run):
    """The same command once more on the finished smoke run, with OMP_NUM_THREADS=1 and some
    outputs of every notebook deleted (tests/smoke.py: RECOMPUTED): the stages that
    wrote them compute again, in a new process, the same bytes, so every stage that reads them, and
    every other stage, is reused (the summaries that only read cached stages, keyed "always" /
    "derived", are rewritten each time and are not compared). Every output the params determine
    (all but rundir.MEASUREMENTS: the benches, the logs, the manifest) is byte for byte what it was."""
    from tests.smoke import RECOMPUTED

    h, run = smoke_run.history, smoke_run.run
    manifest = read_json(run / "manifest.json")
    recomputed = {manifest["artifacts"][rel]["stage"] for rel in RECOMPUTED}
    assert len(recomputed) == len(RECOMPUTED) and set(h["digests"]) >= set(RECOMPUTED)
    assert {s for s in h["after"] if h["again"][s] != h["after"][s]} == recomputed
    assert set(h["again"]) == set(h["after"])
    differ = [f for f in h["digests"] if h["digests_again"].get(f) != h["digests"][f]]
    assert differ == [] and h["digests_again"].keys() == h["digests"].keys(), differ


@pytest.mark.slow
def test_structure_only_model_shows_no_accuracy(beside):
    from tests.smoke import STRUCTURE_TEST

    root = beside[STRUCTURE_TEST].result()
    html = (root / "reports" / "random" / "report.html").read_text()
    assert "structure only" in html and "Parity check skipped" in html and "Structure-only model: no accuracy" in html
    assert "Fastest ORT variant" in html and "its Conv kernels take" in html
    # OpenVINO's settings are timed there too (no accuracy to check them on), each in the one bench
    timed = {r.get("setting") for r in read_json(root / "runs" / "random" / "int8-coco" / "latency.json")["rows"]}
    assert "unpinned" in timed  # (and bf16 where the CPU has it)
    metrics = read_json(root / "runs" / "random" / "baseline-coco" / "metrics.json")
    assert metrics == {"structure_only": True, "reason": metrics["reason"]} and "no accuracy" in metrics["reason"]


@pytest.mark.slow
def test_failing_notebook_is_named_and_leaves_no_report(tmp_path, coco_root):
    books = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, books)
    nb = nbformat.read(str(books / "01_bootstrap_baseline.ipynb"), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("raise RuntimeError('deliberate failure')"))
    nbformat.write(nb, str(books / "01_bootstrap_baseline.ipynb"))
    params = smoke_params(tmp_path, coco_root)
    with pytest.raises(LowbitError) as e:
        run_pipeline(params, run_id="broken", progress=False, notebook_dir=books)
    assert "01_bootstrap_baseline.ipynb failed in cell" in e.value.cause and "deliberate failure" in e.value.cause
    assert not (tmp_path / "reports" / "broken" / "report.html").exists()
    assert read_json(tmp_path / "runs" / "broken" / "manifest.json")["notebooks"]["01_bootstrap_baseline"]["status"] == "failed"


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped(smoke_run):
    """SIGKILL during notebook 03, then during notebook 05 (the smoke run, tests/smoke.py): each
    rerun keeps every finished stage, redoes only what was unfinished, and no report exists until
    the run completes; what the run records depends on the params, not on the machine's folder."""
    from lowbit_helpers.rundir import reproducible_outputs

    h, run = smoke_run.history, smoke_run.run
    before, middle, after = h["before"], h["middle"], h["after"]
    assert h["early"] == [False, False]  # no report (nor notebook 05) before the run completes
    assert {k: middle[k] for k in before} == before  # nothing finished before the first kill was redone
    assert len(middle) > len(before)
    assert h["report"] and {k: after[k] for k in middle} == middle and len(after) > len(middle)
    assert len(h["notebooks"]) == 6 and set(h["notebooks"].values()) == {"ok"}  # the resumed run itself
    files = reproducible_outputs(run)
    assert {"baseline-onnx/model.onnx", "baseline-coco/metrics.json", "int8-coco/ort-percentile.json", "onnx/nncf-mixed.onnx",
            "sensitivity/sensitivity.json", "schemes/w4a8-top0.json", "candidates/w4a8-top0.gptq-bc-b64.onnx",
            "results/w4a8-top0.gptq-bc-b64.confirm.json", "results/candidates.json"} <= set(files)  # fmt: skip
    assert "seconds" not in (run / "onnx" / "ort-percentile.recipe.json").read_text()  # costs are in the manifest
    assert str(smoke_run.root) not in "".join((run / f).read_text() for f in files if f.endswith(".json") and "detections" not in f)


@pytest.mark.slow
def test_a_run_directory_copied_elsewhere_keeps_its_int8_builds(smoke_run, tmp_path):
    """An INT8 build's stage key names the run directory's files relative to it: the smoke run copied to
    another path gives every variant the key its manifest recorded, so nothing is rebuilt there."""
    from lowbit_helpers.rundir import RunDir, stage_key
    from lowbit_helpers.steps import baseline
    from lowbit_helpers.steps import int8 as step

    run = RunDir.open(smoke_run.run)
    copy = RunDir(shutil.copytree(run.path, tmp_path / "elsewhere" / run.path.name), run.cfg)
    recorded = copy.manifest()["stages"]
    for v in run.cfg.int8.variants:
        keys = []
        for r in (run, copy):
            sensitive = step.sensitive_convs(r, v.keep_sensitive)
            cmd = step.quantize_command(r.cfg, v, r.artifact(baseline.MODEL), r.artifact(baseline.CALIB),
                                        r.file(step.variant_model(v)), sensitive)  # fmt: skip
            params = step.build_params(r, v, cmd, step.variant_options(r.cfg, v, sensitive))
            assert str(r.path) not in json.dumps(params), params["cmd"]
            keys.append(stage_key(params, [r.artifact(baseline.MODEL), r.artifact(baseline.CALIB)]))
        assert keys[0] == keys[1] == recorded[f"int8:{v.name}"]["key"], v.name
