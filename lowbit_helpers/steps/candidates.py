"""Notebook 05: low-bit candidates, each a deployable ONNX, evaluated alike, chosen honestly.

1. The 4-bit method ladder (``candidates.ladder``): each method materialises each scheme of
   ``candidates.ladder_schemes`` (the 75 % budget by default; full.yaml: uniform W4A16 too); mAP on the
   selection split; the best method (mean mAP over those schemes) is the candidates' method
   unless ``candidates.method`` names one.
2. Candidates: every scheme notebook 04 wrote (top-K per format, budgets), all Convs in fp8,
   and the controls of the guided budget: random schemes with the same 4-bit share (fixed
   seeds) and the "all but the first block and the head" heuristic. Each is materialised
   (:func:`..lowbit.materialize.materialize`), checked, and scored on the selection split.
3. Honest selection: winners (the method, the best candidate per 4-bit budget) are chosen on
   the selection split (val500) and confirmed on the *other* images of the confirmation subset
   (val1300 minus val500: extra800), with paired-bootstrap intervals of the difference to FP32;
   confirmed candidates that ORT runs through integer kernels (QLinearConv in its optimized
   graph) also with exact Q/DQ arithmetic, since those kernels' results depend on the CPU.
   Predictions run in ``runtime.threads`` one-thread worker processes (:func:`..evaluate.predict_models`).
4. Integer-kernel forms (``candidates.integer_schemes``): the scheme's 4-bit codes (the method
   per output channel) in notebook 03's best ORT recipe with placement all (:func:`integer_recipe`),
   whose Convs ORT runs as QLinearConv
   (:mod:`..lowbit.integer_form`); scored and confirmed like the others, with their own winner
   per budget.
5. Latency of FP32, the best INT8 variant of notebook 03 and every candidate in one process.
"""

from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import onnx

from ..artifacts import atomic_path, sha256_file
from ..data import preprocess
from ..errors import LowbitError
from ..evaluate import predict_models
from ..export import load_torch_model
from ..formats import FORMATS, apply_format
from ..lowbit import parse_method
from ..lowbit.integer_form import integer_form
from ..lowbit.materialize import LAYOUT_VERSION, QUANT_VERSION, materialize
from ..lowbit.reconstruct import RECONSTRUCT_VERSION, ReconstructionSettings, reconstructed_integer_form
from ..lowbit.stats import collect_stats
from ..rundir import RunDir, Stage
from ..runtime import (
    BENCH_SETTINGS,
    bench_models,
    environment,
    load_memory,
    make_session,
    runtime_unavailable,
    try_openvino,
)
from ..runtime.inspect import fidelity, ort_executed_ops, qdq_counts, raw_heads
from ..schema import Skipped
from ..sensitivity.metrics import read_back
from ..sensitivity.schemes import heuristic_scheme, random_scheme
from ..sensitivity.sweep import activation_ranges, conv_nodes
from ..sensitivity.torch_proxy import map_convs
from . import baseline
from .int8 import VARIANT_EVAL, engine_environment, ort_cpu_pick, read_int8_result, variant_model
from .sensitivity import SCHEMES_DIR, SCHEMES_INDEX, SENS
from .splits import fp32_reference, open_splits, score

# artifacts, relative to the run directory ({name}: a candidate)
CANDIDATE_ONNX = "candidates/{name}.onnx"
CANDIDATE_RECIPE = "candidates/{name}.recipe.json"  # the scheme, the method and what materialize did
CANDIDATE_EVAL = "results/{name}.json"  # selection split, fidelity, graph facts
CANDIDATE_EXACT = "results/{name}.exact.json"  # confirmation split with exact Q/DQ arithmetic (integer-kernel candidates)
CANDIDATE_CONFIRM = "results/{name}.confirm.json"  # the confirmation split
CANDIDATE_OPENVINO = "results/{name}.openvino.json"  # the confirmation split under OpenVINO (candidates.openvino_budgets)
CONFIRM_IDS = "results/confirm_ids.txt"  # the confirmation split: confirm_subset minus select_subset
LADDER = "results/ladder.json"
LATENCY = "results/latency.json"
CANDIDATES = "results/candidates.json"  # notebook 05's results, less what depends on a bench
SWEEP_MATCH = "results/sweep_match.json"  # materialised model vs the sweep's fake quantization
CONTROL_KINDS = ("random", "heuristic")  # schemes that test the guidance, never shipped


@dataclass
class CandidatesResult:
    """Notebook 05's result: the 4-bit method ladder and the method it chose, the materialised
    model against the sweep, per candidate its recipe and evaluations, the winner per budget, the
    guided scheme and its controls, the integer-kernel forms and their winner per budget, notebook
    03's INT8 pick (``best_int8``) and the bench."""

    method: str
    ladder: dict
    sweep_match: dict
    recipes: dict[str, dict]
    evaluations: dict[str, dict]
    winners: dict[str, dict]
    guided: str | None
    controls: list[str]
    integer: dict  # the integer-kernel forms: their names, the best per budget, or why there are none
    best_int8: dict | None
    latency: dict | None
    fp32_size_bytes: int
    seconds: float

    def record(self) -> dict:
        """What the params determine (``results/candidates.json``): not the bench (a measurement),
        nor notebook 03's ORT pick, which keeps the variants that bench found faster than FP32."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("latency", "best_int8")}


# ------------------------------------------------------------------ inputs shared by every build
@functools.lru_cache(maxsize=2)
def _calibration(calib_path: str, calib_sha: str, model_path: str, model_sha: str, range_images: int,
                 stats_images: int) -> tuple[dict, dict, dict]:  # fmt: skip
    """Activation ranges (the sweep's: calibration images [0, R)), GPTQ statistics of every Conv,
    and the per-layer weight cache that :func:`materialize` fills (one per model and statistics)."""

    model = onnx.load(model_path)
    calib = np.load(calib_path, mmap_mode="r")
    if len(calib) < max(range_images, stats_images):
        raise LowbitError(f"the calibration tensor has {len(calib)} images; candidates need {max(range_images, stats_images)}",
                          "raise data.calib_images or lower candidates.stats_images / sensitivity.range_images")  # fmt: skip
    ranges = activation_ranges(model, np.asarray(calib[:range_images]))
    stats = collect_stats(model, conv_nodes(model), np.asarray(calib[:stats_images]))
    return ranges, stats, {}


@functools.lru_cache(maxsize=8)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def inputs(run: RunDir) -> tuple[Path, Path, str, str]:
    """The FP32 model and the calibration tensor with their SHA-256, hashed once per file version
    (the tensor is ~630 MB: hashing it for each of ~50 stages would cost minutes)."""
    out = []
    for rel in (baseline.MODEL, baseline.CALIB):
        p = run.path / rel
        if not run.has(rel):
            run.artifact(rel)  # raises the clear "stage has not run" error
        st = p.stat()
        digest = _digest(str(p), st.st_mtime_ns, st.st_size)
        if digest != run.manifest()["artifacts"][rel]["sha256"]:
            raise LowbitError(f"{p} changed after it was recorded", "rerun the stage that writes it")
        out.append((p, digest))
    (model, model_sha), (calib, calib_sha) = out
    return model, calib, model_sha, calib_sha


def calibration(run: RunDir) -> tuple[dict, dict, dict]:
    model, calib, model_sha, calib_sha = inputs(run)
    cfg = run.cfg
    return _calibration(str(calib), calib_sha, str(model), model_sha, cfg.sensitivity.range_images,
                        cfg.candidates.stats_images)  # fmt: skip


# ------------------------------------------------------------------ schemes
def notebook04_schemes(run: RunDir) -> dict[str, dict]:
    index = run.read(SCHEMES_INDEX)
    return {e["name"]: run.read(f"{SCHEMES_DIR}/{e['file']}") for e in index}


def all_schemes(run: RunDir) -> dict[str, dict]:
    """Notebook 04's schemes (or ``candidates.schemes``), fp8, and the random / heuristic controls."""

    cfg, c = run.cfg, run.cfg.candidates
    sens = read_back(run.read(SENS))
    nb04 = notebook04_schemes(run)
    wanted = list(nb04) if c.schemes is None else c.schemes
    unknown = [n for n in wanted + c.ladder_schemes if n not in nb04]
    if unknown:
        raise LowbitError(f"candidates: scheme(s) {unknown} are not among notebook 04's ({sorted(nb04)})",
                          "name schemes that notebook 04 wrote (see sensitivity.top_k / budgets)")  # fmt: skip
    out = {n: nb04[n] for n in wanted}
    if c.fp8:
        out["fp8-all"] = {"kind": "uniform", "name": "fp8-all", "format": "fp8", "nodes": {n: "fp8" for n in sens["convs"]}}
    low, high = cfg.sensitivity.budget_low, cfg.sensitivity.budget_high
    for seed in range(c.random_schemes):
        s = random_scheme(sens, c.random_budget, seed, low, high)
        out[s["name"]] = s
    if c.heuristic:
        s = heuristic_scheme(sens, low, high)
        out[s["name"]] = s
    return out


def has_four_bit(scheme: dict) -> bool:
    return any(p in ("w4a16", "w4a8") for p in scheme["nodes"].values())


def has_a8(scheme: dict) -> bool:
    return any(p in ("w8a8", "w4a8", "fp8") for p in scheme["nodes"].values())


def candidate_name(scheme: dict, method: str) -> str:
    """``<scheme>.<method>`` when the method matters (4-bit layers), else the scheme's name."""
    return f"{scheme['name']}.{method}" if has_four_bit(scheme) else scheme["name"]


# ------------------------------------------------------------------ build
def build(run: RunDir, scheme: dict, method: str) -> dict:
    """Materialise ``scheme`` with ``method`` into ``candidates/<name>.onnx`` (cached); its recipe."""

    cfg = run.cfg

    name = candidate_name(scheme, method)
    model, _, model_sha, calib_sha = inputs(run)
    rel, recipe_rel = CANDIDATE_ONNX.format(name=name), CANDIDATE_RECIPE.format(name=name)
    params = {"nodes": scheme["nodes"], "method": method if has_four_bit(scheme) else None,
              "range_images": cfg.sensitivity.range_images, "stats_images": cfg.candidates.stats_images,
              "quant_version": QUANT_VERSION, "layout_version": LAYOUT_VERSION, "versions": baseline.versions(), "model": model_sha,
              "calib": calib_sha}  # fmt: skip
    if has_four_bit(scheme) and (settings := parse_method(method).rounding.settings()):
        params["method_settings"] = settings  # only where a method has any: the other keys stay as they were

    def compute():
        t0 = time.perf_counter()
        ranges, stats, cache = calibration(run)
        q, info = materialize(onnx.load(str(model)), scheme["nodes"], method, ranges=ranges, stats=stats, cache=cache)
        with atomic_path(run.file(rel)) as tmp:
            onnx.save(q, str(tmp))
        recipe = {"name": name, "scheme": {k: v for k, v in scheme.items() if k != "nodes"}, "nodes": scheme["nodes"],
                  "method": method, "materialize": info, "seconds": round(time.perf_counter() - t0, 1),
                  "command": f"python -m lowbit_helpers materialize SCHEME.json {Path(model).name} "
                             f"--calib-npy calib.npy --method {method} --out {name}.onnx"}  # fmt: skip
        return recipe

    # model and calibration enter the key by their digests (params): hashing the ~630 MB tensor per stage would cost minutes
    st = Stage(f"candidate:{name}", params, [], [recipe_rel, rel], record={"scheme": scheme["name"], "method": method})
    return run.stage(st, compute)


def integer_name(scheme: dict, method: str, iterations: int = 0) -> str:
    """``<scheme>.<method>.int``, or ``<scheme>.<method>.br<N>.int`` with N steps of block reconstruction per block."""
    return f"{scheme['name']}.{method}{f'.br{iterations}' if iterations else ''}.int"


def _reconstruct_args(run: RunDir, iterations: int) -> str:
    """The command line's reconstruction options of a reconstructed form (the weights by their file name)."""
    if not iterations:
        return ""
    r = run.cfg.candidates.reconstruction
    return (f" --reconstruct {iterations} --reconstruct-images {r.images} --reconstruct-batch {r.batch} "
            f"--weights {Path(run.cfg.model.weights).name}")


def reconstruction_settings(run: RunDir, iterations: int) -> ReconstructionSettings:
    r = run.cfg.candidates.reconstruction
    return ReconstructionSettings(iterations=iterations, images=r.images, batch=r.batch)


def torch_model(run: RunDir):
    """The Ultralytics model the run's ONNX was exported from, and its Conv mapping (verified by weights)."""
    source = baseline.model_source(run.cfg)
    if source.kind == "onnx":
        raise LowbitError(f"block reconstruction needs the torch model; model.weights is an ONNX file ({source.path})",
                          "give model.weights as a checkpoint or a name, or set candidates.reconstruction.iterations: [0]")  # fmt: skip
    model, _, model_sha, _ = inputs(run)
    return _torch_model(source, str(model), model_sha)


@functools.lru_cache(maxsize=1)
def _torch_model(source, model_path: str, model_sha: str):
    tm = load_torch_model(source)
    return tm, map_convs(onnx.load(model_path), tm)["mapping"]


def build_integer(run: RunDir, scheme: dict, method: str, int8: dict, iterations: int = 0) -> dict:
    """``scheme``'s integer-kernel form (:mod:`..lowbit.integer_form`): its 4-bit codes with ``method``
    (per output channel) in the INT8 recipe ``int8`` (:func:`integer_recipe`), ``candidates/<name>.onnx``
    (:func:`integer_name`). With ``iterations`` > 0 the codes are learned by block reconstruction
    (:mod:`..lowbit.reconstruct`) on the quantizers of the form without it, which is built first."""

    cfg = run.cfg
    name = integer_name(scheme, method, iterations)
    model, calib, model_sha, calib_sha = inputs(run)
    rel, recipe_rel = CANDIDATE_ONNX.format(name=name), CANDIDATE_RECIPE.format(name=name)
    params = {"nodes": scheme["nodes"], "method": method, "form": "integer", "int8": int8["model"],
              "stats_images": cfg.candidates.stats_images, "quant_version": QUANT_VERSION,
              "versions": baseline.versions(), "model": model_sha, "calib": calib_sha}  # fmt: skip
    if settings := parse_method(method).rounding.settings():
        params["method_settings"] = settings
    if iterations:
        params["reconstruction"] = {**reconstruction_settings(run, iterations).record(), "version": RECONSTRUCT_VERSION}

    def compute():
        t0 = time.perf_counter()
        _, stats, cache = calibration(run)
        int8_model, float_model = onnx.load(str(run.artifact(int8["model"]))), onnx.load(str(model))
        rec = None
        if iterations:
            tm, mapping = torch_model(run)
            q, info, rec = reconstructed_integer_form(int8_model, float_model, scheme["nodes"], parse_method(method), tm, mapping,
                                                      np.load(calib, mmap_mode="r"), reconstruction_settings(run, iterations),
                                                      stats=stats, cache=cache)  # fmt: skip
        else:
            q, info = integer_form(int8_model, float_model, scheme["nodes"], method, stats=stats, cache=cache)
        with atomic_path(run.file(rel)) as tmp:
            onnx.save(q, str(tmp))
        out = {"name": name, "scheme": {k: v for k, v in scheme.items() if k != "nodes"}, "nodes": scheme["nodes"],
               "method": method, "form": "integer", "int8_recipe": int8["name"], "materialize": info,
               "seconds": round(time.perf_counter() - t0, 1),
               "command": f"python -m lowbit_helpers materialize SCHEME.json {Path(model).name} --calib-npy calib.npy "
                          f"--method {method} --integer-form {Path(int8['model']).name}"
                          f"{_reconstruct_args(run, iterations)} --out {name}.onnx"}  # fmt: skip
        return out | ({"reconstruction": rec} if rec else {})

    st = Stage(f"candidate:{name}", params, [int8["model"]], [recipe_rel, rel],
               record={"scheme": scheme["name"], "method": method, "form": "integer"})  # fmt: skip
    return run.stage(st, compute)


def integer_recipe(run: RunDir) -> dict | None:
    """The INT8 recipe whose file carries the integer-kernel forms: among notebook 03's ORT recipes
    with placement ``all`` (every Conv a QLinearConv), the best selection-split Δ to FP32 with exact
    Q/DQ arithmetic (ORT's kernels where exact was not scored). Not notebook 03's CPU pick, which also
    asks its bench (a measurement) for a speed-up, nor the kernels' Δ, which depends on the CPU's int8
    instructions: the forms' files follow from the params and the data alone. None when INT8 is off or
    no recipe qualifies."""
    if not run.cfg.int8.enabled:
        return None
    done = read_int8_result(run)
    if not done:
        return None
    best = None
    for v in run.cfg.int8.variants:
        engines = (done.validations.get(v.name) or {}).get("engines") or {}
        scored = engines.get("ort-exact") or engines.get("ort")
        if v.backend == "ort" and v.placement == "all" and scored:
            d = scored["select"]["delta_vs_fp32"]["delta"]
            if best is None or d > best[0]:
                best = (d, v)
    return {"name": best[1].name, "model": variant_model(best[1])} if best else None


def integer_forms(run: RunDir, schemes: dict[str, dict], method: str) -> tuple[dict, str | None]:
    """The integer-kernel form of each of ``candidates.integer_schemes`` ({name: recipe}), or why none."""
    names = run.cfg.candidates.integer_schemes
    if not names:
        return {}, "candidates.integer_schemes is empty"
    unknown = [n for n in names if n not in schemes]
    if unknown:
        raise LowbitError(f"candidates.integer_schemes: {unknown} are not among the candidates' schemes ({sorted(schemes)})",
                          "name schemes listed in candidates.schemes")  # fmt: skip
    int8 = integer_recipe(run)
    if int8 is None:
        return {}, "notebook 03 scored no ORT recipe with placement all (QLinearConv) to carry the 4-bit codes"
    per_channel = parse_method(method).per_channel
    out = {}
    for n in names:
        for iterations in run.cfg.candidates.reconstruction.iterations:
            r = build_integer(run, schemes[n], per_channel, int8, iterations)
            out[r["name"]] = r
    return out, None


# ------------------------------------------------------------------ evaluation
def splits(run: RunDir):
    """(selection subset, confirmation subset = confirm_subset minus selection, the union subset)."""
    c = run.cfg.candidates
    return open_splits(run, c.select_subset, c.confirm_subset, CONFIRM_IDS, "candidates")


def _eval_params(run: RunDir, **extra) -> dict:
    cfg, c = run.cfg, run.cfg.candidates
    return {"select": c.select_subset, "confirm_subset": c.confirm_subset, "decode": cfg.decode.model_dump(),
            "data": cfg.data.model_dump(), "evaluation": cfg.evaluation.model_dump(), **extra}  # fmt: skip


def _fp32_detections(run: RunDir) -> list[dict]:
    """FP32 detections on the whole confirmation subset (computed once, shared with notebook 03)."""
    return fp32_reference(run, run.cfg.candidates.confirm_subset)


@functools.lru_cache(maxsize=2)
def _fp32_heads(model: str, model_sha: str, paths: tuple, threads: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The fidelity images and FP32's raw head on them (the same for every candidate)."""

    images = [preprocess(p)[0] for p in paths]
    return images, raw_heads(make_session(model, threads=threads), images)


def _predict(run: RunDir, model: Path, engine: str, subset) -> list[dict]:
    """Detections of one candidate file on ``subset`` (runtime.threads one-thread workers)."""
    rt = run.cfg.runtime
    return predict_models({"m": (model, engine)}, subset, run.cfg.decode, rt.providers, rt.threads)[0]["m"]


def evaluate(run: RunDir, name: str) -> dict:
    """Selection-split mAP with Δ to FP32, raw-head fidelity, Q/DQ counts, what ORT runs, file size."""

    cfg = run.cfg
    q = run.artifact(CANDIDATE_ONNX.format(name=name))
    model = inputs(run)[0]
    rel = CANDIDATE_EVAL.format(name=name)
    params = _eval_params(run, fidelity_images=cfg.int8.fidelity_images)

    def compute():
        sel, _, _ = splits(run)
        fp32_dets = _fp32_detections(run)
        t0 = time.perf_counter()
        dets = _predict(run, q, "ort", sel)
        session = make_session(q, cfg.runtime.providers, cfg.runtime.threads)
        out = {"name": name, "predict_seconds": round(time.perf_counter() - t0, 1), "arithmetic": "kernels",
               "select": score(run, dets, sel, fp32_dets)}  # fmt: skip
        images, ref = _fp32_heads(str(model), inputs(run)[2], tuple(sel.image_path(i) for i in sel.ids[: cfg.int8.fidelity_images]),
                                  cfg.runtime.threads)  # fmt: skip
        out["fidelity"] = fidelity(ref, raw_heads(session, images))
        out.update(qdq=qdq_counts(q), ort_cpu=ort_executed_ops(q, cfg.runtime.threads), size_bytes=q.stat().st_size)
        return out

    return run.stage(Stage(f"candidate-eval:{name}", params, [model, CANDIDATE_ONNX.format(name=name)], [rel]), compute)


def exact(run: RunDir, name: str) -> dict:
    """The confirmation split once more with exact Q/DQ arithmetic (ORT's graph optimizations off):
    the machine-independent reference beside this CPU's integer kernels."""

    q = run.artifact(CANDIDATE_ONNX.format(name=name))
    rel = CANDIDATE_EXACT.format(name=name)
    params = _eval_params(run, split="confirm")  # (it scored the selection split before)

    def compute():
        _, conf, _ = splits(run)
        return {"confirm_exact": score(run, _predict(run, q, "ort-exact", conf), conf, _fp32_detections(run))}

    return run.stage(Stage(f"candidate-exact:{name}", params, [inputs(run)[0], CANDIDATE_ONNX.format(name=name)], [rel]),
                     compute)  # fmt: skip


def under_openvino(run: RunDir, name: str) -> dict:
    """The confirmation split under OpenVINO's CPU plugin (``confirm_openvino``): the accuracy of the file
    where notebook 05's bench runs it fastest. ``openvino_refused``: OpenVINO's reason in one line where it
    cannot compile the file (e.g. W4A16's blocked weights); nothing where OpenVINO is not installed."""

    if runtime_unavailable("openvino"):
        return {}
    q = run.artifact(CANDIDATE_ONNX.format(name=name))
    rel = CANDIDATE_OPENVINO.format(name=name)
    params = _eval_params(run, split="confirm", engine="openvino", environment=engine_environment(["openvino"]))

    def compute():
        if refused := _openvino_refusal(run, q):
            return {"openvino_refused": refused}
        _, conf, _ = splits(run)
        return {"confirm_openvino": score(run, _predict(run, q, "openvino", conf), conf, _fp32_detections(run))}

    return run.stage(Stage(f"candidate-openvino:{name}", params, [inputs(run)[0], CANDIDATE_ONNX.format(name=name)], [rel]),
                     compute)  # fmt: skip


def confirm(run: RunDir, name: str) -> dict:
    """The confirmation split (confirm_subset minus the selection split: images nobody chose on),
    with Δ to FP32 and its paired-bootstrap interval."""

    q = run.artifact(CANDIDATE_ONNX.format(name=name))
    model = inputs(run)[0]
    rel = CANDIDATE_CONFIRM.format(name=name)
    params = _eval_params(run)

    def compute():
        _, conf, _ = splits(run)
        t0 = time.perf_counter()
        dets = _predict(run, q, "ort", conf)
        seconds = round(time.perf_counter() - t0, 1)
        return {"confirm_predict_seconds": seconds, "confirm": score(run, dets, conf, _fp32_detections(run))}

    return run.stage(Stage(f"candidate-confirm:{name}", params, [model, CANDIDATE_ONNX.format(name=name)], [rel]), compute)


def sweep_match(run: RunDir, images: int = 2) -> dict:
    """Per swept format, the materialised all-Conv model (round to nearest) against the sweep's
    fake quantization of the same graph: max |difference| of the raw head under exact Q/DQ
    arithmetic on calibration images the sweep scored (0.0: the same numbers)."""

    cfg = run.cfg
    model_path, calib_path, model_sha, calib_sha = inputs(run)
    params = {"formats": cfg.sensitivity.formats, "images": images, "range_images": cfg.sensitivity.range_images,
              "model": model_sha, "calib": calib_sha}  # fmt: skip

    def compute():
        model = onnx.load(str(model_path))
        convs = conv_nodes(model)
        ranges, _, _ = calibration(run)
        r0 = cfg.sensitivity.range_images
        x = np.asarray(np.load(calib_path, mmap_mode="r")[r0 : r0 + images])
        out = {}
        # w8a8-ort is ORT's own file, not a materialised scheme (tests hold it to that file bit for bit)
        for fmt in [f for f in cfg.sensitivity.formats if not FORMATS[f].ort_placement]:
            q, _ = materialize(model, {c: fmt for c in convs}, "rtn", ranges=ranges)
            ref = apply_format(model, convs, FORMATS[fmt], ranges)
            heads = []
            for m in (q, ref):
                with tempfile.TemporaryDirectory() as tmp:
                    onnx.save(m, f"{tmp}/m.onnx")
                    s = make_session(f"{tmp}/m.onnx", threads=cfg.runtime.threads, arithmetic="exact")
                heads.append(np.concatenate([s.run(None, {s.get_inputs()[0].name: xi[None]})[0] for xi in x]))
            out[fmt] = {"max_abs_diff": float(np.abs(heads[0] - heads[1]).max()), "images": images,
                        "head_max_abs": float(np.abs(heads[1]).max())}  # fmt: skip
        return out

    return run.stage(Stage("candidates-sweep-match", params, [], [SWEEP_MATCH]), compute)


# ------------------------------------------------------------------ the ladder and the candidates
def select_map(result: dict) -> float:
    return result["select"]["metrics"]["mAP_50_95"]


def run_ladder(run: RunDir, schemes: dict[str, dict]) -> dict:
    c = run.cfg.candidates
    for m in c.ladder:
        parse_method(m)
    rows = []
    for s_name in c.ladder_schemes:
        for m in c.ladder:
            recipe = build(run, schemes[s_name], m)
            res = evaluate(run, recipe["name"])
            row = {"scheme": s_name, "method": m, "candidate": recipe["name"], "select_mAP": select_map(res),
                   "select_subset": res["select"]["subset"], "delta": res["select"]["delta_vs_fp32"],
                   "sqnr_db": res["fidelity"]["sqnr_db"], "size_bytes": res["size_bytes"],
                   "build_seconds": recipe["seconds"], "describe": recipe["materialize"]["method_text"]}  # fmt: skip
            if c.ladder_confirm:  # every rung also on the confirmation split (measurement only; the pick stays on select)
                conf = confirm(run, recipe["name"])
                row.update(confirm_subset=conf["confirm"]["subset"], confirm_mAP=conf["confirm"]["metrics"]["mAP_50_95"],
                           confirm_delta=conf["confirm"]["delta_vs_fp32"])  # fmt: skip
            rows.append(row)
    mean = {m: float(np.mean([r["select_mAP"] for r in rows if r["method"] == m])) for m in c.ladder}
    best = max(c.ladder, key=lambda m: (mean[m], -c.ladder.index(m)))
    chosen = best if c.method == "auto" else parse_method(c.method).name
    result = {"rows": rows, "mean_select_mAP": mean, "best": best, "method": chosen,
              "rule": f"highest mean mAP50-95 on {c.select_subset} over {', '.join(c.ladder_schemes)}"
                      if c.method == "auto" else "candidates.method in the params"}  # fmt: skip
    # a summary of cached stages, rewritten each time
    run.stage(Stage("candidates-ladder", None, [], [LADDER], fixed_key="derived"), lambda: result, read=None)
    return result


def best_int8(run: RunDir) -> dict | None:
    """Notebook 03's ORT CPU pick (one rule: :func:`.int8.ort_cpu_pick`), the INT8 reference row;
    None when INT8 is off, notebook 03 has not finished (its artifacts are read, nothing is
    computed here), or nothing qualifies."""
    if not run.cfg.int8.enabled:
        return None
    done = read_int8_result(run)
    pick = ort_cpu_pick(done) if done else None
    if pick is None:
        return None
    v = next(v for v in run.cfg.int8.variants if v.name == pick["name"])
    evaluated = run.read(VARIANT_EVAL.format(name=v.name))
    return {"name": v.name, "select_mAP": evaluated["engines"]["ort"]["select"]["metrics"]["mAP_50_95"],
            "model": variant_model(v), "coco": evaluated.get("coco", {}), "size_bytes": evaluated["size_bytes"],
            "rule": "notebook 03's ORT CPU pick"}  # fmt: skip


def winners(run: RunDir, cands: dict[str, dict], evals: dict[str, dict]) -> dict[str, dict]:
    """Per budget P (notebook 04's budgets), the candidate with >= P % of conv weights in 4-bit
    that scores best on the selection split (the random and heuristic controls are not candidates)."""
    out = {}
    for p in run.cfg.sensitivity.budgets:
        eligible = [n for n, r in cands.items() if r["materialize"]["four_bit_share"] * 100 >= p - 1e-9
                    and r["scheme"].get("kind") not in CONTROL_KINDS]  # fmt: skip
        if eligible:
            best = max(eligible, key=lambda n: select_map(evals[n]))
            out[f"{p:g}"] = {"budget_percent": p, "candidate": best, "eligible": len(eligible)}
    return out


def _openvino_refusal(run: RunDir, model: Path) -> str | None:
    """OpenVINO's reason in one line where it cannot compile ``model``, else None (the session is dropped)."""
    return try_openvino(model, run.cfg.runtime.threads)[1]


def latency(run: RunDir, names: list[str], int8: dict | None) -> dict:
    """FP32, notebook 03's INT8 pick and every candidate under ORT (``rows``) and, where
    ``int8.latency_runtimes`` names it, each file OpenVINO compiles under OpenVINO (``openvino_rows``;
    ``openvino_skipped``: the files it refuses, e.g. blocked INT4 ``DequantizeLinear``, and why), all
    interleaved in one process; every ratio is to ORT's FP32 row."""
    cfg = run.cfg
    models = [run.artifact(baseline.MODEL)] + ([run.artifact(int8["model"])] if int8 else [])
    labels = ["fp32"] + ([f"int8:{int8['name']}"] if int8 else [])
    models += [run.artifact(CANDIDATE_ONNX.format(name=n)) for n in names]
    labels += names
    openvino = "openvino" in cfg.int8.latency_runtimes and not runtime_unavailable("openvino")
    params = {"runtime": cfg.runtime.model_dump(), "latency": cfg.latency.model_dump(), "bench": BENCH_SETTINGS,
              "labels": labels, "load_memory": "fresh-process VmHWM", "openvino": openvino}  # fmt: skip

    def compute():
        refused = {}
        if openvino:  # (the bench opens its own sessions)
            refused = {label: why for label, m in zip(labels, models) if (why := _openvino_refusal(run, m))}
        pairs = [(label, m, "ort") for label, m in zip(labels, models)]
        pairs += [(label, m, "openvino") for label, m in zip(labels, models) if openvino and label not in refused]
        rows = bench_models([m for _, m, _ in pairs], cfg.runtime.threads, cfg.runtime.providers, cfg.latency.warmup,
                            cfg.latency.runs, runtimes=[r for _, _, r in pairs])  # fmt: skip
        memory = load_memory(models, cfg.runtime.threads)
        for r, (label, m, _) in zip(rows, pairs):
            r.update(name=label, model=Path(m).name, size_bytes=Path(m).stat().st_size)
        for r, mem in zip(rows, memory):  # the first len(models) rows are ORT's, in the models' order
            r["load_mb"] = mem
        out = {"rows": rows[: len(models)], "environment": environment()}
        return out | ({"openvino_rows": rows[len(models):], "openvino_skipped": refused} if openvino else {})

    inputs_ = [baseline.MODEL] + ([int8["model"]] if int8 else []) + [CANDIDATE_ONNX.format(name=n) for n in names]
    return run.stage(Stage("candidates-latency", params, inputs_, [LATENCY]), compute)


def run_candidates(run: RunDir) -> CandidatesResult | Skipped:
    """Everything notebook 05 shows (written to ``results/candidates.json`` less the bench and the INT8 pick)."""
    cfg, c = run.cfg, run.cfg.candidates
    if not c.enabled:
        return Skipped("candidates.enabled is false in the params")
    info = run.read(baseline.MODEL_INFO)
    if info["structure_only"]:
        return Skipped(f"{info['label']}: structure only (random weights), no accuracy to choose candidates by")
    if not cfg.sensitivity.enabled:
        return Skipped("sensitivity.enabled is false: notebook 04 wrote no schemes to materialise")
    t0 = time.perf_counter()
    match = sweep_match(run)
    schemes = all_schemes(run)
    ladder = run_ladder(run, schemes)
    method = ladder["method"]
    recipes = {}
    for s in schemes.values():
        r = build(run, s, method)
        recipes[r["name"]] = r
    integer, integer_why = integer_forms(run, schemes, method)
    recipes.update(integer)
    evals = {n: evaluate(run, n) for n in recipes}
    win = winners(run, {n: r for n, r in recipes.items() if n not in integer}, evals)
    integer_win = winners(run, integer, evals)
    low, high = cfg.sensitivity.budget_low, cfg.sensitivity.budget_high
    guided = f"budget{int(c.random_budget)}-{low}-{high}"
    controls = [n for n, r in recipes.items() if r["scheme"].get("kind") in CONTROL_KINDS]
    if c.confirm == "all":
        confirmed = set(recipes)
    else:
        # the answer's rows (winners of both forms, uniform W4A16) and, where there are controls, the guided scheme beside them
        confirmed = {w["candidate"] for w in [*win.values(), *integer_win.values()]} | set(controls)
        confirmed |= {n for n, r in recipes.items() if n not in integer and r["scheme"]["name"] in
                      ("w4a16-top0", "w4a8-top0", *([guided] if controls else []))}  # fmt: skip
    for n in sorted(confirmed):
        evals[n] = {**evals[n], **confirm(run, n)}
        if c.exact and evals[n]["ort_cpu"]["QLinearConv"] > 0:  # beside this CPU's integer kernels (they depend on its int8 ISA)
            evals[n] = {**evals[n], **exact(run, n)}
    for w in win.values():
        if w["budget_percent"] in c.openvino_budgets and "confirm" in evals[w["candidate"]]:
            evals[w["candidate"]] = {**evals[w["candidate"]], **under_openvino(run, w["candidate"])}
    int8 = best_int8(run)
    lat = latency(run, list(recipes), int8) if c.latency else None
    result = CandidatesResult(
        method=method, ladder=ladder, sweep_match=match, recipes=recipes, evaluations=evals, winners=win,
        guided=next((n for n, r in recipes.items() if r["scheme"]["name"] == guided), None), controls=controls,
        integer={"candidates": sorted(integer), "winners": integer_win, "skipped": integer_why}, best_int8=int8, latency=lat, fp32_size_bytes=run.artifact(baseline.MODEL).stat().st_size,
        seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
    run.stage(Stage("candidates", None, [], [CANDIDATES], fixed_key="derived"), result.record, read=None)
    return result
