"""Notebook 03: INT8 variants, each quantized in its own process and validated alike.

For every variant of ``params.int8.variants``: ``python -m lowbit_helpers quantize-int8`` in a
subprocess (the exact command, its log and its peak RSS are kept beside the ONNX), then ORT
smoke, raw-head fidelity against FP32 (SQNR, cosine), COCO mAP on each evaluation subset with
the paired-bootstrap interval of the difference to FP32, Q/DQ counts and the Convs ORT runs as
QLinearConv. Latency of FP32 and every variant is measured together in one process.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..artifacts import read_json, write_json
from ..config import Config, Int8Variant
from ..errors import LowbitError
from ..quant.modelopt_int8 import MODELOPT_METHODS
from ..quant.ort_int8 import ORT_METHODS
from ..rundir import RunDir, stage_key
from . import baseline

# artifacts, relative to the run directory ({name}: the variant's name, {subset}: an evaluation subset)
VARIANT_ONNX = "onnx/{name}.onnx"
VARIANT_RECIPE = "onnx/{name}.recipe.json"  # written by quantize-int8 beside the ONNX, completed here
VARIANT_LOG = "onnx/{name}.log"
VARIANT_MODELOPT_LOG = "onnx/{name}.modelopt.log"  # written by the ModelOpt backend beside the ONNX
VARIANT_EVAL = "int8-coco/{name}.json"
FP32_SUBSET_DETECTIONS = "int8-coco/fp32_{subset}.detections.json"
LATENCY = "int8-coco/latency.json"

# the methods each backend offers (kept here, beside the variant checks, without importing the backends)


def check_variants(cfg: Config) -> None:
    seen = set()
    for v in cfg.int8.variants:
        allowed = ORT_METHODS if v.backend == "ort" else MODELOPT_METHODS
        if v.method not in allowed:
            raise LowbitError(f"int8.variants: {v.name}: method {v.method!r} is not available for backend {v.backend}",
                              f"use one of {sorted(allowed)} for {v.backend}")  # fmt: skip
        if v.name in seen:
            raise LowbitError(f"int8.variants: the name {v.name!r} is used twice", "give each variant its own name")
        seen.add(v.name)


def sensitive_convs(run: RunDir, n: int) -> list[str]:
    """The ``n`` Convs whose float precision buys the most in an all-w8a8 graph (notebook 04's sweep).

    They are excluded from quantization: ``quantize_static`` puts no Q/DQ on them. ORT (1.24)
    then re-quantizes at load time the weights of an excluded Conv whose input and output are
    still Q/DQ (its WeightBiasQuantization transformer) and fuses it into QLinearConv after all;
    what stays float is the activation quantization around the excluded nodes. The table's
    QLinearConv column counts what ORT really runs, and accuracy and latency are measured on it.
    """
    if n == 0:
        return []
    if "w8a8" not in run.cfg.sensitivity.formats:
        raise LowbitError("an INT8 variant sets keep_sensitive, which ranks Convs by the w8a8 sensitivity sweep, "
                          "but sensitivity.formats has no w8a8", "add w8a8 to sensitivity.formats")  # fmt: skip
    from ..quant.schemes import ranking
    from .sensitivity import onnx_sweep

    order, _ = ranking(onnx_sweep(run), "w8a8")
    return order[:n]


def quantize_command(cfg: Config, v: Int8Variant, model: Path, calib: Path, out: Path,
                     sensitive: list[str] = ()) -> list[str]:  # fmt: skip
    q = cfg.int8
    cmd = [sys.executable, "-m", "lowbit_helpers", "quantize-int8", str(model), "--backend", v.backend,
           "--method", v.method, "--calib-npy", str(calib), "--images", str(q.calib_images or cfg.data.calib_images),
           "--head-policy", v.head_policy, "--out", str(out)]  # fmt: skip
    exclude = list(q.exclude_nodes) + [n for n in sensitive if n not in q.exclude_nodes]
    if exclude:
        cmd += ["--exclude", *exclude]
    if v.backend == "ort":
        if v.method == "percentile":
            cmd += ["--percentile", str(q.percentile)]
        if v.method in ("percentile", "entropy"):  # only histograms need slices to bound memory
            cmd += ["--stride", str(q.calib_stride)]
    else:
        cmd += ["--calibration-eps", *q.calibration_eps, "--high-precision-dtype", q.high_precision_dtype]
        if q.exclude_op_types:
            cmd += ["--exclude-op-type", *q.exclude_op_types]
    return cmd


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` to completion, output into ``log``; wall time and the child's peak RSS."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = log.read_text()[-1500:]
        raise LowbitError(f"quantization failed (exit {rc}): {shlex.join(cmd)}\n{tail}", f"see the full log in {log}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024}


def quantize_variant(run: RunDir, v: Int8Variant) -> dict:
    cfg = run.cfg
    model, calib = run.artifact(baseline.MODEL), run.artifact(baseline.CALIB)
    rel, recipe_rel, log_rel = (p.format(name=v.name) for p in (VARIANT_ONNX, VARIANT_RECIPE, VARIANT_LOG))
    out = run.file(rel)
    cmd = quantize_command(cfg, v, model, calib, out, sensitive_convs(run, v.keep_sensitive))
    key = stage_key({"cmd": cmd[3:], "versions": baseline.versions()}, [model, calib])
    outputs = [rel, recipe_rel, log_rel]
    if not run.is_fresh(f"int8:{v.name}", key):
        measured = run_measured(cmd, run.file(log_rel))
        recipe = read_json(run.file(recipe_rel))
        recipe.update(command=shlex.join(["python", *cmd[1:]]), calibration=measured)
        write_json(run.file(recipe_rel), recipe)
        if v.backend == "modelopt":
            outputs.append(VARIANT_MODELOPT_LOG.format(name=v.name))
        run.finish(f"int8:{v.name}", key, outputs, {"variant": v.model_dump()})
    return read_json(run.artifact(recipe_rel))


def fp32_detections(run: RunDir, subset: str) -> Path:
    """FP32 detections on ``subset``, computed when missing or stale; the file's path."""
    cfg = run.cfg
    rel = FP32_SUBSET_DETECTIONS.format(subset=subset)
    model = run.artifact(baseline.MODEL)
    key = stage_key({"subset": subset, "data": cfg.data.model_dump(), "decode": cfg.decode.model_dump()}, [model])
    if not run.is_fresh(f"fp32:{subset}", key):
        no_bootstrap = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"bootstrap": 0})})
        _, dets = baseline.evaluate_model(model, no_bootstrap, subset, progress=False)
        write_json(run.file(rel), dets)
        run.finish(f"fp32:{subset}", key, [rel])
    return run.path / rel


def fp32_on(run: RunDir, subset: str):
    """FP32 detections on ``subset`` and their evaluation."""
    from ..data import open_coco
    from ..evaluate import evaluate_coco

    path = fp32_detections(run, subset)
    sub = open_coco(run.cfg.data.coco_root, run.cfg.data.annotations, subset)
    return sub, evaluate_coco(sub, read_json(path))


def validate_variant(run: RunDir, v: Int8Variant) -> dict:
    from ..data import open_coco, preprocess
    from ..evaluate import bootstrap_difference, evaluate_coco, predict_onnx
    from ..quant.inspect import head_fidelity, ort_executed_ops, qdq_counts
    from ..runtime import make_session

    cfg = run.cfg
    q = run.artifact(VARIANT_ONNX.format(name=v.name))
    model = run.artifact(baseline.MODEL)
    rel = VARIANT_EVAL.format(name=v.name)
    params = {"subsets": cfg.int8.eval_subsets, "decode": cfg.decode.model_dump(), "data": cfg.data.model_dump(),
              "evaluation": cfg.evaluation.model_dump(), "fidelity_images": cfg.int8.fidelity_images}  # fmt: skip
    key = stage_key(params, [model, q])
    if not run.is_fresh(f"int8-eval:{v.name}", key):
        smoke = baseline.ort_smoke(q, cfg)
        session = make_session(q, cfg.runtime.providers, cfg.runtime.threads)
        fid_subset = open_coco(cfg.data.coco_root, cfg.data.annotations, cfg.data.subset)
        images = [preprocess(fid_subset.image_path(i))[0] for i in fid_subset.ids[: cfg.int8.fidelity_images]]
        fidelity = head_fidelity(make_session(model, threads=cfg.runtime.threads), session, images)
        e = cfg.evaluation
        coco = {}
        for subset in cfg.int8.eval_subsets:
            sub, fp32 = fp32_on(run, subset)
            ev = evaluate_coco(sub, predict_onnx(session, sub, cfg.decode))
            diff = bootstrap_difference(ev, fp32, e.bootstrap or 200, e.confidence, e.seed)
            coco[subset] = {"num_images": len(sub), "metrics": ev.metrics, "fp32_mAP_50_95": fp32.metrics["mAP_50_95"],
                            "delta_vs_fp32": diff}  # fmt: skip
        result = {"variant": v.model_dump(), "smoke": smoke, "fidelity": fidelity, "coco": coco,
                  "qdq": qdq_counts(q), "ort_cpu": ort_executed_ops(q, cfg.runtime.threads),
                  "size_bytes": q.stat().st_size}  # fmt: skip
        write_json(run.file(rel), result)
        run.finish(f"int8-eval:{v.name}", key, [rel], params)
    return read_json(run.artifact(rel))


def latency(run: RunDir) -> dict:
    """FP32 and every variant, timed in one process with the same session options.

    With ``latency.profile_runs`` each model also runs under ORT's profiler, which says where
    the time goes (per operator type, and Conv by Conv against FP32).
    """
    from ..runtime import bench_models, environment, profile_model

    cfg = run.cfg
    names = ["fp32"] + [v.name for v in cfg.int8.variants]
    models = [run.artifact(baseline.MODEL)]
    models += [run.artifact(VARIANT_ONNX.format(name=v.name)) for v in cfg.int8.variants]
    params = {"runtime": cfg.runtime.model_dump(), "latency": cfg.latency.model_dump()}
    key = stage_key(params, models)
    rel = LATENCY
    if not run.is_fresh("int8-latency", key):
        lat = cfg.latency
        rows = bench_models(models, cfg.runtime.threads, cfg.runtime.providers, lat.warmup, lat.runs)
        for r, name in zip(rows, names):
            r["name"] = name
        profiles = {}
        if lat.profile_runs:
            profiles = {name: profile_model(m, cfg.runtime.threads, cfg.runtime.providers, lat.profile_runs)
                        for name, m in zip(names, models)}  # fmt: skip
        write_json(run.file(rel), {"rows": rows, "profiles": profiles, "environment": environment()})
        run.finish("int8-latency", key, [rel], params)
    return read_json(run.artifact(rel))


def run_int8(run: RunDir) -> dict:
    """Everything notebook 03 shows: per-variant recipes and validations, and the latency table."""
    cfg = run.cfg
    if not cfg.int8.enabled:
        return {"skipped": "int8.enabled is false in the params"}
    check_variants(cfg)
    recipes = {v.name: quantize_variant(run, v) for v in cfg.int8.variants}
    info = read_json(run.artifact(baseline.MODEL_INFO))
    if info["structure_only"]:
        from ..quant.inspect import ort_executed_ops, qdq_counts

        validations = {}
        for v in cfg.int8.variants:
            q = run.artifact(VARIANT_ONNX.format(name=v.name))
            validations[v.name] = {"variant": v.model_dump(), "structure_only": True, "smoke": baseline.ort_smoke(q, cfg),
                                   "qdq": qdq_counts(q), "ort_cpu": ort_executed_ops(q, cfg.runtime.threads),
                                   "size_bytes": q.stat().st_size}  # fmt: skip
    else:
        validations = {v.name: validate_variant(run, v) for v in cfg.int8.variants}
    lat = latency(run)
    return {"recipes": recipes, "validations": validations, "latency": lat["rows"], "profiles": lat.get("profiles", {}),
            "environment": lat["environment"], "structure_only": info["structure_only"]}  # fmt: skip
