"""ONNX Runtime sessions (providers, threads) and latency measurement."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from .errors import LowbitError


def make_session(model: str | Path, providers: list[str] | None = None, threads: int = 2, optimized_path: str | Path | None = None):
    """An InferenceSession with fixed, documented options (the same for every variant).

    ``threads`` is the intra-op pool size; inter-op is 1 and execution sequential, so two
    sessions compare fairly on the same cores. ``optimized_path`` saves the graph ORT runs.
    """
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise LowbitError(
            f"execution provider(s) {', '.join(unknown)} not available in onnxruntime {ort.__version__} "
            f"(available: {', '.join(available)})",
            "use runtime.providers: [CPUExecutionProvider] here, or install the gpu environment on a GPU machine",
        )
    model = Path(model)
    if not model.is_file():
        raise LowbitError(f"model not found: {model}", "give an existing .onnx file")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(model), sess_options=so, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise LowbitError(f"onnxruntime cannot load {model}: {exc}", "check that the file is a complete ONNX model") from None


def run_head(session, tensor: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return session.run(None, {name: tensor})[0]


def latency_stats(times_ms: list[float] | np.ndarray) -> dict:
    t = np.asarray(times_ms, dtype=np.float64)
    return {
        "runs": int(t.size),
        "mean_ms": float(t.mean()),
        "median_ms": float(np.median(t)),
        "p90_ms": float(np.percentile(t, 90)),
        "p95_ms": float(np.percentile(t, 95)),
        "min_ms": float(t.min()),
        "std_ms": float(t.std()),
        "throughput_fps": float(1000.0 / np.median(t)),
    }


def bench_models(
    models: list[str | Path],
    threads: int = 2,
    providers: list[str] | None = None,
    warmup: int = 10,
    runs: int = 50,
    seed: int = 0,
) -> list[dict]:
    """Time every model in this process with the same session options and the same input.

    Runs are interleaved (one run of each model per round) so that drift in machine load
    affects all models alike; ratios are to the first model.
    """
    sessions = [make_session(m, providers, threads) for m in models]
    shape = [d if isinstance(d, int) else 1 for d in sessions[0].get_inputs()[0].shape]
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)
    for s in sessions:
        for _ in range(warmup):
            run_head(s, x)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            run_head(s, x)
            times[i].append((time.perf_counter() - t0) * 1000.0)
    rows = []
    for m, s, t in zip(models, sessions, times):
        rows.append({"model": str(m), "providers": s.get_providers(), "threads": threads, "warmup": warmup, **latency_stats(t)})
    first = rows[0]["median_ms"]
    for r in rows:
        r["ratio_to_first"] = r["median_ms"] / first
    return rows


def environment() -> dict:
    """What the numbers were measured on."""
    import os

    import onnxruntime as ort

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_count": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "providers_available": ort.get_available_providers(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
