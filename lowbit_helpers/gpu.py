"""GPU benchmark of a run's candidates: ORT's CUDA execution provider and TensorRT engines.

One command (``python -m lowbit_helpers gpu-bench RUN_DIR --out gpu.json``) that a short GPU
session runs as is (well under 10 minutes for the default run's winners on one GPU):
* ORT CUDA EP: every model in one process, interleaved, median / p90 and the ratio to FP32;
* TensorRT: each Q/DQ ONNX built *strongly typed* (precisions come from the graph's Q/DQ and
  initializer types, not from builder flags), timed through polygraphy's runner, and the
  precision of every engine layer read back from TensorRT's engine inspector.

Where a piece is missing (no GPU, no CUDA provider, no TensorRT, or TensorRT refusing a graph,
e.g. INT4 Conv weights) each model gets one ``skipped: …`` / ``failed: …`` line instead of
numbers: nothing is guessed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .artifacts import write_json
from .errors import LowbitError
from .rundir import RunDir
from .runtime import bench_models, latency_stats
from .steps.baseline import MODEL
from .steps.candidates import CANDIDATE_ONNX, CANDIDATES, best_int8


def gpu_models(run_dir: str | Path, which: str = "winners") -> dict[str, Path]:
    """FP32, notebook 03's best INT8 variant, and notebook 05's winners (or all candidates)."""

    run = Path(run_dir)
    if not (run / CANDIDATES).is_file():
        raise LowbitError(f"{run / CANDIDATES} not found", "run the pipeline (notebook 05) for this run directory first")
    recorded = RunDir.open(run)
    res = recorded.read(CANDIDATES)
    models = {"fp32": run / MODEL}
    int8 = best_int8(recorded)
    if int8:
        models[f"int8:{int8['name']}"] = run / int8["model"]
    names = list(res["recipes"]) if which == "all" else sorted({w["candidate"] for w in res["winners"].values()}
                                                              | {n for n in res["recipes"] if n.startswith(("w4a16-top0", "w4a8-top0"))})  # fmt: skip
    for n in names:
        models[n] = run / CANDIDATE_ONNX.format(name=n)
    return models


def bench_cuda_ep(models: dict[str, Path], warmup: int = 20, runs: int = 200) -> dict[str, dict]:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {n: {"skipped": f"no CUDAExecutionProvider in onnxruntime {ort.__version__} (install the gpu extra on a GPU machine)"}
                for n in models}  # fmt: skip

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    keys = ("median_ms", "p90_ms", "ratio_to_first", "providers")
    out = {}
    try:
        rows = bench_models(list(models.values()), 1, providers, warmup, runs)
        return {n: {k: r[k] for k in keys} for n, r in zip(models, rows)}
    except Exception:  # a model the CUDA EP cannot load: time each one against FP32 alone
        first = next(iter(models.values()))
        for n, p in models.items():
            try:
                out[n] = {k: bench_models([first, p], 1, providers, warmup, runs)[1][k] for k in keys}
            except Exception as exc:
                out[n] = {"failed": f"CUDA EP could not run {n}: {type(exc).__name__}: {str(exc)[:300]}"}
    return out


def bench_tensorrt(name: str, model: Path, warmup: int = 20, runs: int = 200) -> dict:
    try:
        import tensorrt as trt  # late: tensorrt only on a GPU machine (ImportError: skipped)
        from polygraphy.backend.trt import (  # late: polygraphy only on a GPU machine
            CreateConfig,
            EngineFromNetwork,
            NetworkFromOnnxPath,
            TrtRunner,
        )
    except Exception as exc:  # ImportError, or a CUDA library that is missing
        return {"skipped": f"no TensorRT here ({type(exc).__name__}: {exc})"}
    try:
        t0 = time.perf_counter()
        network = NetworkFromOnnxPath(str(model), strongly_typed=True)
        config = CreateConfig(profiling_verbosity=trt.ProfilingVerbosity.DETAILED)
        engine = EngineFromNetwork(network, config=config)()
        build_s = time.perf_counter() - t0
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        precisions = _layer_precisions(info)
        x = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
        times = []
        with TrtRunner(engine) as runner:
            feed = {next(iter(runner.get_input_metadata())): x}
            for _ in range(warmup):
                runner.infer(feed)
            for _ in range(runs):
                t = time.perf_counter()
                runner.infer(feed)
                times.append((time.perf_counter() - t) * 1000)
        return {"build_seconds": round(build_s, 1), **latency_stats(times), "layer_precisions": precisions}
    except Exception as exc:
        return {"failed": f"TensorRT could not build or run {name}: {type(exc).__name__}: {str(exc)[:400]}"}


def _layer_precisions(info_json: str) -> dict:
    """Counts of engine layers by the type of their outputs (from the inspector's JSON)."""

    layers = json.loads(info_json).get("Layers", [])
    types = Counter()
    for layer in layers:
        if isinstance(layer, dict):
            outs = layer.get("Outputs", [])
            fmt = outs[0].get("Format/Datatype", "?") if outs else "?"
            types[str(fmt).split(" ")[0]] += 1
    return dict(types)


def gpu_bench(run_dir: str | Path, out: str | Path, which: str = "winners", runs: int = 200) -> dict:
    models = gpu_models(run_dir, which)
    result = {"models": {n: str(p) for n, p in models.items()}, "cuda_ep": bench_cuda_ep(models, runs=runs), "tensorrt": {}}
    for n, p in models.items():
        result["tensorrt"][n] = bench_tensorrt(n, p, runs=runs)
    fp32 = result["tensorrt"].get("fp32", {}).get("median_ms")
    for r in result["tensorrt"].values():
        if fp32 and "median_ms" in r:
            r["ratio_to_fp32"] = r["median_ms"] / fp32
    write_json(out, result)
    return result


def describe(result: dict) -> list[str]:
    """One line per model: CUDA EP and TensorRT, or why not."""
    lines = []
    for n in result["models"]:
        c, t = result["cuda_ep"].get(n, {}), result["tensorrt"].get(n, {})
        cuda = (f"CUDA EP {c['median_ms']:.2f} ms (x{c['ratio_to_first']:.2f})" if "median_ms" in c
                else c.get("skipped") or c.get("failed", "not measured"))  # fmt: skip
        trt = (f"TensorRT {t['median_ms']:.2f} ms (x{t.get('ratio_to_fp32', float('nan')):.2f}), layers {t['layer_precisions']}"
               if "median_ms" in t else t.get("skipped") or t.get("failed"))  # fmt: skip
        lines.append(f"{n}: {cuda}; {trt}")
    return lines
