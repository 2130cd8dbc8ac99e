"""Notebook 03: INT8 variants, each quantized in its own process and validated alike, under every engine.

For every variant of ``params.int8.variants`` (a backend of :data:`lowbit_helpers.int8.BACKENDS`:
ORT ``quantize_static``, ModelOpt for TensorRT, NNCF as the peer): the backend called through its
Python API in a fresh worker process (its log and peak RSS are kept beside the ONNX, with the
``python -m lowbit_helpers quantize-int8`` command that reproduces it), then ORT smoke, raw-head fidelity
against FP32 (SQNR, cosine), Q/DQ counts and the Convs ORT runs as QLinearConv, and COCO mAP
under each engine of ``int8.engines``:
* ``ort``: ORT's fused integer kernels, whose result depends on this CPU's int8 instructions
  (named with every number: ``cpu_int8_isa``, ``int8_kernel_class``);
* ``ort-exact``: the Q/DQ graph computed as written (ORT, optimizations off): what TensorRT and
  VNNI kernels aim at, the same on every machine;
* ``openvino``: OpenVINO's CPU plugin on the same file.

Each of a variant's engines (``engines`` of the variant, else ``int8.engines``) predicts the
selection split (val500, where recipes are chosen); those of ``int8.confirm_engines`` also the
confirmation split (val1300 minus val500: extra800). mAP and the paired-bootstrap
Δ to FP32 are read on each, with each engine's Δ to the exact arithmetic on the same images.
ORT's kernels on a CPU without VNNI are measured too, emulated by QEMU (``int8.emulate``).
Latency: FP32 and every variant under ORT and OpenVINO, interleaved in one process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from ..artifacts import read_json
from ..config import EMULATE_DEFAULT, Config, Int8Variant
from ..data import open_coco, preprocess
from ..errors import LowbitError
from ..evaluate import predict_models, predict_sessions
from ..int8 import backend, checked, command_args, quantize_int8
from ..int8.base import Int8Options
from ..int8.bias_correction import BC_VERSION
from ..int8.calibration import load_calibration
from ..int8.kernel_check import PROBE_VERSION, probe
from ..int8.tensorrt import RULES_VERSION as TRT_RULES_VERSION
from ..rundir import RunDir, Stage
from ..runtime import (
    BENCH_SETTINGS,
    RUNTIMES,
    bench_models,
    check_openvino_properties,
    engine_session,
    engine_unavailable,
    environment,
    kept_float_rewrite,
    make_session,
    openvino_setting_unavailable,
    profile_model,
    run_head,
    runtime_unavailable,
    try_openvino,
    with_properties,
)
from ..runtime.emulate import EmulatedSession, emulated_probe, qemu_binary
from ..runtime.inspect import head_fidelity, ort_executed_ops, qdq_counts
from ..schema import Skipped
from ..sensitivity.schemes import ranking
from . import baseline
from .sensitivity import onnx_sweep
from .splits import evaluations_and_references, fp32_reference, open_splits, score, score_evaluated

# artifacts, relative to the run directory ({name}: the variant's name, {subset}: an evaluation subset)
VARIANT_ONNX = "onnx/{name}.onnx"
VARIANT_IR = "onnx/{name}.xml"  # an OpenVINO IR (NNCF's format: openvino), weights in "onnx/{name}.bin"
VARIANT_IR_BIN = "onnx/{name}.bin"
VARIANT_RECIPE = "onnx/{name}.recipe.json"  # written by quantize-int8 beside the ONNX, completed here
VARIANT_LOG = "onnx/{name}.log"
VARIANT_EVAL = "int8-coco/{name}.json"
VARIANT_EMULATED = "int8-coco/{name}.emulated.json"  # ORT's kernels on an emulated CPU (int8.emulate)
FP32_ENGINES = "int8-coco/fp32_engines.json"  # FP32 under the other engines (OpenVINO f32 / bf16)
CONFIRM_IDS = "int8-coco/confirm_ids.txt"  # the confirmation split: confirm_subset minus select_subset
KERNEL_PROBE = "int8-coco/kernel_probe.json"  # the int16 saturation probe on this CPU (and emulated)
LATENCY = "int8-coco/latency.json"
OPENVINO_SETTINGS = "int8-coco/openvino_settings.json"  # int8.openvino_settings: outputs, compile time, mAP per setting


@dataclass
class Int8Result:
    """Notebook 03's result: per variant its recipe (``recipes``) and validation (``validations``,
    with each engine's scores), FP32 under the other engines, the emulated CPU's scores, the int16
    saturation probe, the interleaved bench's rows (``latency``) and profiles, and what it ran on."""

    recipes: dict[str, dict]
    validations: dict[str, dict]
    latency: list[dict]
    kernel_probe: dict
    fp32_engines: dict = field(default_factory=dict)
    emulated: dict[str, dict | Skipped] = field(default_factory=dict)  # Skipped where QEMU is missing
    profiles: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    structure_only: bool = False
    splits: dict = field(default_factory=dict)
    openvino_settings: dict | Skipped = field(default_factory=dict)  # the settings bench's checks and scores


def variant_model(v: Int8Variant) -> str:
    """The run-relative path of ``v``'s model: its Q/DQ ONNX, or its OpenVINO IR."""
    return (VARIANT_IR if is_ir(v) else VARIANT_ONNX).format(name=v.name)


def is_ir(v: Int8Variant) -> bool:
    return v.format == "openvino"


def check_variants(cfg: Config) -> None:
    """What one variant cannot say of itself (each backend's own rules are checked when the params
    load: config.Int8Variant): unique names, and emulated variants that exist."""
    seen = set()
    for v in cfg.int8.variants:
        if v.name in seen:
            raise LowbitError(f"int8.variants: the name {v.name!r} is used twice", "give each variant its own name")
        seen.add(v.name)
    unknown = [n for n in cfg.int8.emulate.variants if n not in seen]
    if cfg.int8.emulate.cpu and unknown and cfg.int8.emulate.variants != EMULATE_DEFAULT:
        raise LowbitError(f"int8.emulate.variants: {unknown} are not among int8.variants",
                          "name variants listed in int8.variants")  # fmt: skip


def backend_version(name: str) -> dict:
    """The quantizing library's version beyond :func:`baseline.versions` (part of the variant's key)."""
    dist = backend(name).library
    if dist is None:
        return {}
    try:
        return {dist: version(dist)}
    except PackageNotFoundError:
        return {dist: None}


def sensitive_convs(run: RunDir, n: int) -> list[str]:
    """The ``n`` Convs whose float precision buys the most in an all-INT8 graph (notebook 04's sweep,
    ``w8a8-ort``: the quantizers ORT deploys; ``w8a8`` when that format is not swept).

    They are excluded from quantization: ``quantize_static`` puts no Q/DQ on them. ORT (1.24)
    would re-quantize at load time the weights of an excluded Conv whose input and output are
    still Q/DQ (its WeightBiasQuantization rewrite) and fuse it into QLinearConv after all; every
    ORT session here turns that rewrite off for such files (``runtime.kept_float_rewrite``), so the
    excluded Convs run in float as the recipe says, and a deployment must turn it off too. The
    table's QLinearConv column counts what ORT really runs.
    """
    if n == 0:
        return []
    fmt = next((f for f in ("w8a8-ort", "w8a8") if f in run.cfg.sensitivity.formats), None)
    if fmt is None:
        raise LowbitError("an INT8 variant sets keep_sensitive, which ranks Convs by the w8a8-ort (or w8a8) sensitivity "
                          "sweep, but sensitivity.formats has neither", "add w8a8-ort to sensitivity.formats")  # fmt: skip

    order, _ = ranking(onnx_sweep(run), fmt)
    return order[:n]


def variant_options(cfg: Config, v: Int8Variant, sensitive: list[str] = ()) -> Int8Options:
    """``v``'s options with the int8 section's shared ones (those its backend takes) and its exclusions."""
    q = cfg.int8
    shared = {"percentile": q.percentile, "exclude_op_types": tuple(q.exclude_op_types),
              "calibration_eps": tuple(q.calibration_eps), "high_precision_dtype": q.high_precision_dtype}  # fmt: skip
    exclude = list(q.exclude_nodes) + [n for n in sensitive if n not in q.exclude_nodes]
    return checked(v.backend, replace(v.options(), exclude=tuple(exclude), bias_correction_images=q.bias_correction_images,
                                      **{k: x for k, x in shared.items() if k in backend(v.backend).options}), v.name)  # fmt: skip


def quantize_command(cfg: Config, v: Int8Variant, model: Path, calib: Path, out: Path,
                     sensitive: list[str] = ()) -> list[str]:  # fmt: skip
    """The ``quantize-int8`` command line that reproduces ``v`` (recorded in its recipe)."""
    images = cfg.int8.calib_images or cfg.data.calib_images
    return [sys.executable, "-m", "lowbit_helpers", *command_args(v.backend, model, calib, images, out,
                                                                  variant_options(cfg, v, sensitive))]  # fmt: skip


def _quantize_in_worker(conn, name: str, model: Path, calib: Path, images: int, out: Path, o: Int8Options,
                        log: Path) -> None:  # fmt: skip
    """Runs in a fresh process: the backend through the Python API, its output (and any traceback) into
    ``log``; sends back (True, the process's peak RSS in MB) or (False, the exception)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)  # the libraries' own output (C and Python) goes to the log too
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
    try:
        quantize_int8(name, model, out, load_calibration(calib, images), o)
        print(f"wrote {out}")
        peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
        conn.send((True, peak))
    except BaseException as exc:
        traceback.print_exc()  # the whole story in the log; the error itself goes back to the notebook
        try:
            conn.send((False, exc))
        except Exception:  # an exception that does not pickle: its text
            conn.send((False, RuntimeError(f"{type(exc).__name__}: {exc}")))


def run_backend(name: str, model: Path, calib: Path, images: int, out: Path, o: Int8Options, log: Path) -> dict:
    """Quantize in a fresh (non-daemon) worker process: ModelOpt patches ORT's calibrators process-wide,
    and each recipe's own peak memory is measured there. An error, or Ctrl-C, ends the worker."""
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    worker = ctx.Process(target=_quantize_in_worker, args=(send, name, model, calib, images, out, o, log))
    worker.start()
    send.close()
    try:
        ok, payload = receive.recv()
        worker.join()
    except EOFError:  # the worker died without a word (killed, crashed in native code)
        worker.join()
        payload = RuntimeError(f"the worker process ended with exit code {worker.exitcode}")
        ok = False
    except BaseException:
        worker.terminate()
        worker.join()
        raise
    if not ok:
        if isinstance(payload, LowbitError):
            raise payload
        tail = log.read_text()[-1500:] if log.is_file() else ""
        raise LowbitError(f"quantization failed ({type(payload).__name__}: {payload}) for {out.name}\n{tail}",
                          f"see the full log in {log}")  # fmt: skip
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": payload}


def build_params(run: RunDir, v: Int8Variant, cmd: list[str], options: Int8Options) -> dict:
    """What an INT8 build's stage key holds: its command with the run directory's paths relative to it
    (a run directory moved or copied elsewhere keeps its builds), the library and code versions."""
    b = backend(v.backend)
    # the code versions of what this project computes in the recipe (the ORT backend's ranges, the bias correction)
    own = {**b.code_versions(), **({"bias_correction": BC_VERSION} if b.corrects_file and options.bias_correction == "fast"
                                   else {}), "tensorrt_rules": TRT_RULES_VERSION}  # fmt: skip
    here = f"{run.path}/"
    return {"cmd": [str(a).removeprefix(here) for a in cmd[3:]],
            "versions": {**baseline.versions(), **backend_version(v.backend)}, **own}  # fmt: skip


def quantize_variant(run: RunDir, v: Int8Variant) -> dict:
    cfg = run.cfg
    model, calib = run.artifact(baseline.MODEL), run.artifact(baseline.CALIB)
    rel, recipe_rel, log_rel = variant_model(v), VARIANT_RECIPE.format(name=v.name), VARIANT_LOG.format(name=v.name)
    out = run.file(rel)
    sensitive = sensitive_convs(run, v.keep_sensitive)
    cmd = quantize_command(cfg, v, model, calib, out, sensitive)
    b, options = backend(v.backend), variant_options(cfg, v, sensitive)
    params = build_params(run, v, cmd, options)
    outputs = [recipe_rel, rel, log_rel] + ([VARIANT_IR_BIN.format(name=v.name)] if is_ir(v) else []) + [
        f"onnx/{v.name}{suffix}" for suffix in b.logs]  # fmt: skip

    def compute():
        images = cfg.int8.calib_images or cfg.data.calib_images
        measured = run_backend(v.backend, model, calib, images, out, options, run.file(log_rel))
        recipe = read_json(run.file(recipe_rel))
        # paths relative to the run directory (the command runs from there): no machine path in the recipe
        here = f"{run.path}/"
        recipe.update(command=shlex.join(["python", *(a.removeprefix(here) for a in cmd[1:])]), calibration=measured,
                      input=str(recipe["input"]).removeprefix(here), cwd="the run directory")  # fmt: skip
        return recipe

    st = Stage(f"int8:{v.name}", params, [baseline.MODEL, baseline.CALIB], outputs, record={"variant": v.model_dump()})
    return run.stage(st, compute)


def splits(run: RunDir):
    """(selection subset, confirmation split, whole confirmation subset) of ``int8``."""
    q = run.cfg.int8
    return open_splits(run, q.select_subset, q.confirm_subset, CONFIRM_IDS, "int8")


def engine_environment(engines: list[str]) -> dict:
    """What an engine's numbers depend on beyond the file: the CPU's int8 ISA, runtime versions."""

    env = environment()
    out = {"onnxruntime": env["onnxruntime"]}
    if any(e != "ort-exact" for e in engines):
        out.update(cpu_int8_isa=env["cpu_int8_isa"], int8_kernel_class=env["int8_kernel_class"])
    if any(e.startswith("openvino") for e in engines):
        out["openvino"] = env["openvino"]
    return out


def available_engines(engines: list[str]) -> tuple[list[str], dict[str, str]]:
    """The engines this machine can run, and why each other one is skipped."""

    skipped = {e: why for e in engines if (why := engine_unavailable(e))}
    return [e for e in engines if e not in skipped], skipped


def confirm_engines(cfg: Config, engines: list[str]) -> list[str]:
    """The engines (of ``engines``) whose detections are also taken on the confirmation split."""
    wanted = cfg.int8.confirm_engines
    return list(engines) if wanted is None else [e for e in engines if e in wanted]


def engine_scores(run: RunDir, model: Path, engines: list[str] | dict, confirming: list[str] | None = None) -> dict:
    """``model`` under each engine on the selection split, and under the confirmation engines
    (``int8.confirm_engines``) on the confirmation split: Δ to FP32, and Δ to the exact arithmetic
    when ``ort-exact`` is among the engines there. (No score of the two splits together: every
    figure the report quotes is either split's, and on 1,300 images it cost a minute of the default run.)

    ``engines`` may map labels to engine specs (an engine with OpenVINO properties: ``with_properties``);
    ``confirming``: the labels also run on the confirmation split (default: ``int8.confirm_engines``')."""

    cfg = run.cfg
    sel, conf, _ = splits(run)
    fp32_dets = fp32_reference(run, cfg.int8.confirm_subset)
    rt = cfg.runtime
    specs = engines if isinstance(engines, dict) else {e: e for e in engines}
    engines = list(specs)
    dets, seconds = predict_models({e: (model, specs[e]) for e in engines}, sel, cfg.decode, rt.providers, rt.threads)
    confirming = confirm_engines(cfg, engines) if confirming is None else confirming
    more, more_seconds = predict_models({e: (model, specs[e]) for e in confirming}, conf, cfg.decode, rt.providers, rt.threads)
    subsets = {"select": sel, "confirm": conf}
    by_split = {"select": dets, "confirm": more}
    pairs = [(e, k) for k in subsets for e in engines if e in by_split[k]]
    # each once, in parallel, with FP32's evaluations where this process has none yet
    evaluated = dict(zip(pairs, evaluations_and_references(run, [(by_split[k][e], subsets[k]) for e, k in pairs], fp32_dets)))
    out = {}
    for e in engines:
        out[e] = {"predict_seconds": round(seconds[e] + more_seconds.get(e, 0.0), 1)}
        for k, sub in subsets.items():
            if (e, k) not in evaluated:
                continue
            exact = evaluated.get(("ort-exact", k)) if e != "ort-exact" else None
            out[e][k] = score_evaluated(run, evaluated[(e, k)], sub, fp32_dets, {"ort-exact": exact} if exact else None)
    return out


def _eval_params(cfg: Config, engines: list[str]) -> dict:
    q = cfg.int8
    return {"select": q.select_subset, "confirm": q.confirm_subset, "scored": ["select", "confirm"], "engines": engines,
            **({"confirm_engines": q.confirm_engines} if q.confirm_engines is not None else {}), "decode": cfg.decode.model_dump(),
            "data": cfg.data.model_dump(), "evaluation": cfg.evaluation.model_dump(), "fidelity_images": q.fidelity_images,
            "environment": engine_environment(engines)}  # fmt: skip


def _rewrites(model: Path) -> dict:
    """Stage-key entry for the ORT load-time rewrites turned off for ``model`` (runtime.kept_float_rewrite);
    empty where there are none, so that the keys of every other file stay as they were."""

    off = kept_float_rewrite(model) if Path(model).suffix == ".onnx" else []
    return {"ort_disabled_optimizers": off} if off else {}


def validate_variant(run: RunDir, v: Int8Variant) -> dict:
    cfg = run.cfg
    q = run.artifact(variant_model(v))
    model = run.artifact(baseline.MODEL)
    rel = VARIANT_EVAL.format(name=v.name)
    engines, skipped = available_engines(v.engines or cfg.int8.engines)
    if is_ir(v):  # an OpenVINO IR: only OpenVINO reads it
        skipped.update({e: "skipped: an OpenVINO IR, which ONNX Runtime cannot read" for e in engines if e.startswith("ort")})
        engines = [e for e in engines if not e.startswith("ort")]
    params = {**_eval_params(cfg, engines), **_rewrites(q)}
    inputs = [baseline.MODEL, variant_model(v)] + ([VARIANT_IR_BIN.format(name=v.name)] if is_ir(v) else [])

    def compute():
        sel, _, _ = splits(run)
        images = [preprocess(sel.image_path(i))[0] for i in sel.ids[: cfg.int8.fidelity_images]]
        if is_ir(v):
            smoke, qdq, ort_cpu = None, None, None
        else:
            smoke, qdq, ort_cpu = baseline.ort_smoke(q, cfg), qdq_counts(q), ort_executed_ops(q, cfg.runtime.threads)
        # the raw head of what runs (OpenVINO for an IR, else ORT's kernels) against FP32
        session = engine_session(q, "openvino" if is_ir(v) else "ort", cfg.runtime.providers, cfg.runtime.threads)
        fidelity = head_fidelity(make_session(model, threads=cfg.runtime.threads), session, images)
        scores = engine_scores(run, q, engines)
        result = {"variant": v.model_dump(), "smoke": smoke, "fidelity": fidelity, "engines": scores,
                  "skipped_engines": skipped, "environment": params["environment"], "qdq": qdq, "ort_cpu": ort_cpu,
                  "ort_disabled_optimizers": params.get("ort_disabled_optimizers", []),
                  "size_bytes": sum(run.artifact(p).stat().st_size for p in inputs[1:])}  # fmt: skip
        if qdq:  # the float Convs' share of the Conv MACs: what a deployment still runs in float (TensorRT: FP16 / FP32)
            macs = run.read(baseline.MODEL_INFO)["conv_macs"]
            result["float_conv_macs_share"] = sum(macs.get(n, 0) for n in qdq["float_conv_names"]) / sum(macs.values())
        if "ort" in scores:  # the ORT-kernel result by subset name (what notebook 05 compares against)
            result["coco"] = {s["subset"]: s for k in ("select", "confirm") if (s := scores["ort"].get(k))}
        return result

    return run.stage(Stage(f"int8-eval:{v.name}", params, inputs, [rel]), compute)


def fp32_engines(run: RunDir) -> dict:
    """FP32 under ``int8.fp32_engines`` (OpenVINO f32 / bf16): the float reference each runtime gives."""
    cfg = run.cfg
    model = run.artifact(baseline.MODEL)
    engines, skipped = available_engines(cfg.int8.fp32_engines)
    params = _eval_params(cfg, engines)

    def compute():
        return {"engines": engine_scores(run, model, engines) if engines else {}, "skipped_engines": skipped,
                "environment": params["environment"]}  # fmt: skip

    return run.stage(Stage("int8-fp32-engines", params, [baseline.MODEL], [FP32_ENGINES]), compute)


def runnable_settings(cfg: Config) -> dict:
    """The ``int8.openvino_settings`` this machine can run (bf16 needs bf16 instructions)."""
    return {k: p for k, p in cfg.int8.openvino_settings.items() if not openvino_setting_unavailable(p)}


def openvino_settings(run: RunDir, validations: dict) -> dict | Skipped:
    """What each of ``int8.openvino_settings`` does to the variants OpenVINO scores (their latency is
    in :func:`latency`'s one interleaved bench): its raw head on the fidelity images against this
    project's own settings (``max_abs_diff``; 0: the same outputs, so the same detections and mAP),
    and where the outputs differ, its own mAP on both splits (``scores``); the compile time, and
    (``cache``) the compile from OpenVINO's model cache (``CACHE_DIR``) against a cold one."""

    cfg = run.cfg
    if not cfg.int8.openvino_settings:
        return Skipped("int8.openvino_settings is empty: OpenVINO ran with this project's settings only")
    if why := runtime_unavailable("openvino") or ("openvino" not in cfg.int8.latency_runtimes and "openvino is not "
                                                                                              "among int8.latency_runtimes"):
        return Skipped(why)
    settings = runnable_settings(cfg)
    unavailable = {k: why for k, p in cfg.int8.openvino_settings.items() if (why := openvino_setting_unavailable(p))}
    if not settings:
        return Skipped("no setting of int8.openvino_settings runs here: " + "; ".join(f"{k}: {w}" for k, w in unavailable.items()))
    names = [v.name for v in cfg.int8.variants if "openvino" in (validations[v.name].get("engines") or {})]
    if not names:
        return Skipped("no INT8 variant is scored under OpenVINO (int8.engines)")
    by_name = {v.name: v for v in cfg.int8.variants}
    inputs = [baseline.MODEL] + [p for n in names for p in [variant_model(by_name[n])]
                                 + ([VARIANT_IR_BIN.format(name=n)] if is_ir(by_name[n]) else [])]  # fmt: skip
    params = {**_eval_params(cfg, ["openvino"]), "settings": cfg.int8.openvino_settings, "unavailable": unavailable,
              "variants": names, "threads": cfg.runtime.threads}  # fmt: skip

    def compute():
        sel, _, _ = splits(run)
        images = [preprocess(sel.image_path(i))[0] for i in sel.ids[: cfg.int8.fidelity_images]]
        threads = cfg.runtime.threads
        out = {"settings": settings, "skipped": unavailable, "images": len(images), "variants": {}}
        for n in names:
            model = run.artifact(variant_model(by_name[n]))
            base = make_session(model, threads=threads, runtime="openvino")
            ref = [run_head(base, x) for x in images]
            rows = {"default": {"compile_s": round(base.compile_seconds, 3)}}
            for setting, props in settings.items():
                sess, refused = try_openvino(model, threads, props)
                if refused:  # OpenVINO will not compile this file so (bf16 refused NNCF's ONNX file in 2026.4)
                    rows[setting] = {"refused": refused}
                    continue
                diff = max(float(np.max(np.abs(run_head(sess, x) - r))) for x, r in zip(images, ref))
                rows[setting] = {"max_abs_diff": diff, "compile_s": round(sess.compile_seconds, 3)}
            differ = [st for st in settings if rows[st].get("max_abs_diff", 0.0) != 0.0]
            if differ:  # other outputs: the setting's own mAP, on both splits
                scores = engine_scores(run, model, {st: with_properties("openvino", settings[st]) for st in differ},
                                       confirming=differ)  # fmt: skip
                for st in differ:
                    rows[st]["scores"] = scores[st]
            with tempfile.TemporaryDirectory() as cache:  # the model cache: a cold compile fills it, the next reads it
                cold = make_session(model, threads=threads, runtime="openvino", properties={"CACHE_DIR": cache})
                warm = make_session(model, threads=threads, runtime="openvino", properties={"CACHE_DIR": cache})
                rows["default"]["cache"] = {"cold_s": round(cold.compile_seconds, 3), "warm_s": round(warm.compile_seconds, 3)}
            out["variants"][n] = rows
        return out

    return run.stage(Stage("int8-openvino-settings", params, inputs, [OPENVINO_SETTINGS]), compute)


def compiled_settings(run: RunDir) -> list:
    """[variant, setting] pairs OpenVINO compiles, for a structure-only model (no accuracy to check them
    on: :func:`openvino_settings` does that otherwise): its settings are timed, and only timed."""
    if runtime_unavailable("openvino") or "openvino" not in run.cfg.int8.latency_runtimes:
        return []
    pairs = []
    for v in run.cfg.int8.variants:
        for setting, props in runnable_settings(run.cfg).items():
            if not try_openvino(run.artifact(variant_model(v)), run.cfg.runtime.threads, props)[1]:
                pairs.append([v.name, setting])  # a setting OpenVINO refuses for this file is not timed
    return pairs


def emulated(run: RunDir, v: Int8Variant) -> dict | Skipped:
    """ORT's kernels for ``v`` on the CPU model ``int8.emulate.cpu`` (QEMU user mode), against the
    exact arithmetic on the same images: what the file loses on such a CPU."""

    cfg, em = run.cfg, run.cfg.int8.emulate
    q = run.artifact(variant_model(v))
    rel = VARIANT_EMULATED.format(name=v.name)
    qemu = qemu_binary()
    if qemu is None:
        return Skipped("qemu-x86_64-static not found: bash scripts/get_qemu.sh fetches it (Debian's qemu-user-static)")
    params = {"cpu": em.cpu, "subset": em.subset, "decode": cfg.decode.model_dump(), "data": cfg.data.model_dump(),
              "evaluation": cfg.evaluation.model_dump(), "onnxruntime": engine_environment(["ort-exact", "ort"]),
              **_rewrites(q)}  # fmt: skip

    def compute():
        sub = open_coco(cfg.data.coco_root, cfg.data.annotations, em.subset)
        with EmulatedSession(qemu, em.cpu, q, cfg.runtime.threads) as emu:
            if "avx2" not in emu.cpu_int8_isa:
                raise LowbitError(f"the emulated CPU {em.cpu} shows no AVX2 to ORT ({emu.cpu_int8_isa}): QEMU before 7.2 "
                                  "emulates no AVX2", "use Debian 12's qemu-user-static 7.2 (bash scripts/get_qemu.sh) "
                                  "or set int8.emulate.cpu: null")  # fmt: skip
            exact = make_session(q, threads=cfg.runtime.threads, arithmetic="exact")
            this = make_session(q, threads=cfg.runtime.threads)  # this CPU's kernels on the same images, beside them
            dets, seconds = predict_sessions({"emulated": emu, "ort-exact": exact, "ort": this}, sub, cfg.decode)
            isa = emu.cpu_int8_isa
        fp32 = fp32_reference(run, em.subset)
        return {"cpu": em.cpu, "cpu_int8_isa": isa, "seconds": round(seconds["emulated"], 1),
                "kernels": score(run, dets["emulated"], sub, fp32, {"ort-exact": dets["ort-exact"]}),
                "this_cpu": score(run, dets["ort"], sub, fp32, {"ort-exact": dets["ort-exact"]})}  # fmt: skip

    return run.stage(Stage(f"int8-emulated:{v.name}", params, [baseline.MODEL, variant_model(v)], [rel]), compute)


def kernel_probe(run: RunDir) -> dict:
    """The int16 saturation probe (:mod:`..int8.kernel_check`) on this CPU and on the emulated one."""

    em = run.cfg.int8.emulate
    qemu = qemu_binary()
    params = {"cpu": em.cpu, "environment": engine_environment(["ort"]), "qemu": qemu is not None, "probe": PROBE_VERSION}

    def compute():
        with tempfile.TemporaryDirectory() as tmp:
            out = {"this_cpu": probe(tmp)}
        if em.cpu:
            out["emulated"] = emulated_probe(qemu, em.cpu) if qemu else Skipped("qemu-x86_64-static not found").record()
        return out

    return run.stage(Stage("int8-kernel-probe", params, [], [KERNEL_PROBE], record=None), compute)


def latency(run: RunDir, with_settings: list | None = None) -> dict:
    """FP32 and every variant under each runtime of ``int8.latency_runtimes``, timed in one process.

    With ``latency.profile_runs`` each model also runs under ORT's profiler, which says where
    the time goes (per operator type, and Conv by Conv against FP32).
    """

    cfg = run.cfg
    # ORT first: its FP32 row is the reference of every ratio (the config requires ort among latency_runtimes)
    runtimes = sorted((r for r in cfg.int8.latency_runtimes if not runtime_unavailable(r)), key=RUNTIMES.index)
    names = ["fp32"] + [v.name for v in cfg.int8.variants]
    models = [run.artifact(baseline.MODEL)] + [run.artifact(variant_model(v)) for v in cfg.int8.variants]
    ir = {v.name for v in cfg.int8.variants if is_ir(v)}
    # [variant, setting] pairs also timed under OpenVINO with that setting: the ones openvino_settings compiled
    with_settings = sorted(with_settings or []) if "openvino" in runtimes else []
    settings = {st: p for st, p in cfg.int8.openvino_settings.items() if any(st == x for _, x in with_settings)}
    params = {"runtime": cfg.runtime.model_dump(), "latency": cfg.latency.model_dump(), "bench": BENCH_SETTINGS,
              "runtimes": runtimes,
              "fp32_engines": cfg.int8.fp32_engines,
              "environment": engine_environment([f"{r}" for r in runtimes]),
              **({"openvino_settings": settings, "with_settings": with_settings} if settings else {})}  # fmt: skip
    rewrites = {n: r for n, m in zip(names, models) if (r := _rewrites(m))}
    if rewrites:
        params["rewrites"] = rewrites

    def compute():
        lat = cfg.latency
        # ORT's FP32 first: every ratio is to it; an OpenVINO IR only under OpenVINO
        pairs = [(n, m, r) for r in runtimes for n, m in zip(names, models) if r == "openvino" or n not in ir]
        if "openvino" in runtimes and "openvino-bf16" in available_engines(cfg.int8.fp32_engines)[0]:
            pairs.append(("fp32", models[0], ("openvino", "bf16")))  # FP32 at OpenVINO's bf16 inference precision
        # every int8.openvino_settings on every variant OpenVINO runs, in the same interleaved bench
        tagged = [(n, m, r, None) for n, m, r in pairs] + [
            (n, m, ("openvino", "f32", props), setting) for setting, props in settings.items()
            for n, m in zip(names, models) if [n, setting] in with_settings]  # fmt: skip
        rows = bench_models([m for _, m, _, _ in tagged], cfg.runtime.threads, cfg.runtime.providers, lat.warmup, lat.runs,
                            runtimes=[r for _, _, r, _ in tagged])  # fmt: skip
        for r, (name, _, _, setting) in zip(rows, tagged):
            r["name"] = name
            if setting:
                r["setting"] = setting
        profiles = {}
        if lat.profile_runs:
            profiles = {name: profile_model(m, cfg.runtime.threads, cfg.runtime.providers, lat.profile_runs)
                        for name, m in zip(names, models) if name not in ir}  # fmt: skip
        return {"rows": rows, "profiles": profiles, "environment": environment()}

    inputs = [baseline.MODEL] + [variant_model(v) for v in cfg.int8.variants]
    return run.stage(Stage("int8-latency", params, inputs, [LATENCY]), compute)


def ort_cpu_pick(result: Int8Result) -> dict | None:
    """The ORT CPU recipe to ship, by one rule (notebook 03's conclusion and notebook 05's INT8 row):
    among the ``ort`` recipes scored through ORT's kernels and with exact arithmetic,

    * ``keep_sensitive`` recipes compete: their excluded Convs run in float because every ORT
      session here turns ORT's load-time WeightBiasQuantization off for them (``runtime.kept_float_rewrite``;
      the pick's ``ort_disabled_optimizers`` says what a deployment must turn off too);
    * no ``reduce_range`` recipe where this CPU's kernel provably does not saturate (the probe):
      7-bit weights then buy nothing and cost a bit of resolution (they are for CPUs without VNNI);
    * only recipes ORT runs faster than its FP32 (when any does): a recipe ORT runs in float is not
      an ORT deployment;

    the best Δ to FP32 on the selection split through ORT's kernels. None when nothing qualifies.
    """
    vals = result.validations
    fp32_ms = next((r["median_ms"] for r in result.latency
                    if r["name"] == "fp32" and r.get("runtime", "ort") == "ort"), None)  # fmt: skip
    ort_ms = {r["name"]: r["median_ms"] for r in result.latency
              if r.get("runtime", "ort") == "ort" and r.get("precision", "f32") == "f32"}  # fmt: skip

    def scored(n):
        return {"ort", "ort-exact"} <= set(vals[n].get("engines") or {})

    names = [n for n in vals if result.recipes[n]["backend"] == "ort" and scored(n)]
    probe = result.kernel_probe.get("this_cpu") or {}
    exact_kernels = probe.get("saturates") is False
    if exact_kernels and any(not vals[n]["variant"].get("reduce_range") for n in names):
        names = [n for n in names if not vals[n]["variant"].get("reduce_range")]
    fast = [n for n in names if fp32_ms and n in ort_ms and ort_ms[n] < fp32_ms]
    if not names:
        return None
    best = max(fast or names, key=lambda n: vals[n]["engines"]["ort"]["select"]["delta_vs_fp32"]["delta"])
    return {"name": best, "among_fast": bool(fast), "exact_kernels": exact_kernels, "considered": fast or names,
            "ort_disabled_optimizers": vals[best].get("ort_disabled_optimizers", [])}


def for_tensorrt(recipe: dict) -> bool:
    """Whether TensorRT takes the recipe's file: its recorded rule check (int8/tensorrt.py); a
    recipe written before the check was recorded counts when ModelOpt wrote it."""
    return recipe["tensorrt"]["ready"] if "tensorrt" in recipe else recipe["backend"] == "modelopt"


def tensorrt_pick(result: Int8Result) -> dict | None:
    """The TensorRT recipe to ship: among the recipes whose file TensorRT takes (:func:`for_tensorrt`:
    ModelOpt's, and ORT's with int8-symmetric activations), the best Δ to FP32 on the selection
    split under exact Q/DQ arithmetic (what TensorRT computes); None when none was scored so."""
    vals = result.validations
    names = [n for n in vals if for_tensorrt(result.recipes[n]) and "ort-exact" in (vals[n].get("engines") or {})]
    if not names:
        return None
    best = max(names, key=lambda n: vals[n]["engines"]["ort-exact"]["select"]["delta_vs_fp32"]["delta"])
    writers = {result.recipes[n]["backend"] for n in names}
    # how the report names the recipes it chose among: ModelOpt's alone, or TensorRT-ready ones of several backends
    kind = "ModelOpt" if writers == {"modelopt"} else "TensorRT-ready"
    return {"name": best, "considered": names, "kind": kind, "label": "ModelOpt Q/DQ" if kind == "ModelOpt" else "Q/DQ"}


def read_int8_result(run: RunDir) -> Int8Result | None:
    """What :func:`ort_cpu_pick` needs, read from notebook 03's artifacts only (nothing is computed):
    recipes, validations, the bench and the probe, not a whole result (the report reads
    :func:`run_int8`'s); None while any of them is missing (notebook 03 not run, or not finished)."""
    rels = {v.name: (VARIANT_RECIPE.format(name=v.name), VARIANT_EVAL.format(name=v.name)) for v in run.cfg.int8.variants}
    needed = [r for pair in rels.values() for r in pair] + [LATENCY, KERNEL_PROBE]
    if not all(run.has(r) for r in needed):
        return None
    return Int8Result(recipes={n: run.read(r) for n, (r, _) in rels.items()},
                      validations={n: run.read(e) for n, (_, e) in rels.items()},
                      latency=run.read(LATENCY)["rows"], kernel_probe=run.read(KERNEL_PROBE))


def run_int8(run: RunDir) -> Int8Result | Skipped:
    """Everything notebook 03 shows: per-variant recipes and validations, and the latency table."""
    cfg = run.cfg
    if not cfg.int8.enabled:
        return Skipped("int8.enabled is false in the params")
    check_variants(cfg)
    if cfg.int8.openvino_settings and "openvino" in cfg.int8.latency_runtimes and not runtime_unavailable("openvino"):
        check_openvino_properties(cfg.int8.openvino_settings)  # before anything is computed
    recipes = {v.name: quantize_variant(run, v) for v in cfg.int8.variants}
    info = run.read(baseline.MODEL_INFO)
    probe = kernel_probe(run)
    emulation = {}
    if info["structure_only"]:
        validations, fp32 = {}, {}
        settings = Skipped("a structure-only model has no accuracy to compare OpenVINO's settings on: they are timed only")
        for v in cfg.int8.variants:
            q = run.artifact(variant_model(v))
            onnx_facts = {} if is_ir(v) else {"smoke": baseline.ort_smoke(q, cfg), "qdq": qdq_counts(q),
                                               "ort_cpu": ort_executed_ops(q, cfg.runtime.threads)}  # fmt: skip
            size = q.stat().st_size + (run.artifact(VARIANT_IR_BIN.format(name=v.name)).stat().st_size if is_ir(v) else 0)
            validations[v.name] = {"variant": v.model_dump(), "structure_only": True, "qdq": None, "ort_cpu": None,
                                   **onnx_facts, "size_bytes": size}  # fmt: skip
    else:
        validations = {v.name: validate_variant(run, v) for v in cfg.int8.variants}
        fp32 = fp32_engines(run)
        settings = openvino_settings(run, validations)
        if cfg.int8.emulate.cpu:
            # the listed variants that this params file has (the default list names the default variants)
            emulation = {v.name: emulated(run, v) for v in cfg.int8.variants if v.name in cfg.int8.emulate.variants}
    if info["structure_only"]:
        compiled = compiled_settings(run)
    else:
        compiled = [[n, st] for n, rows in settings["variants"].items() for st, row in rows.items()
                    if st != "default" and "refused" not in row] if settings and not isinstance(settings, Skipped) else []  # fmt: skip
    lat = latency(run, compiled)
    return Int8Result(recipes=recipes, validations=validations, fp32_engines=fp32, emulated=emulation,
                      kernel_probe=probe, latency=lat["rows"], profiles=lat.get("profiles", {}),
                      environment=lat["environment"], structure_only=info["structure_only"],
                      splits={"select": cfg.int8.select_subset, "confirm": cfg.int8.confirm_subset},
                      openvino_settings=settings)  # fmt: skip
