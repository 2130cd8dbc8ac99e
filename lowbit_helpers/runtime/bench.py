"""Latency and memory measurement: interleaved benches, ORT's profiler, load memory.

Every model is opened through :func:`.sessions.make_session`; ratios are to the first model.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from ..errors import LowbitError
from .sessions import make_session, run_head

BENCH_SETTINGS = {"ort_spinning": False}  # how bench_models times (part of every latency stage's key)

_LOAD_PROBE = """
import sys
import numpy as np
from lowbit_helpers.runtime import make_session
if len(sys.argv) > 1:
    s = make_session(sys.argv[1], threads=int(sys.argv[2]))
    shape = [d if isinstance(d, int) else 1 for d in s.get_inputs()[0].shape]
    s.run(None, {s.get_inputs()[0].name: np.zeros(shape, np.float32)})
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def _peak_rss_mb(args: list[str]) -> float:
    # The child reports its own high-water mark (VmHWM): getrusage's ru_maxrss of a child starts
    # at the parent's peak on Linux, which hides a small model behind a large parent.
    proc = subprocess.run([sys.executable, "-c", _LOAD_PROBE, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        what = args[0] if args else "onnxruntime"
        raise LowbitError(f"could not load and run {what} in a fresh process: {proc.stderr.strip()[-300:]}",
                          "check the model with `bench`")  # fmt: skip
    return int(proc.stdout.split()[-1]) / 1024


def load_memory(models: list[str | Path], threads: int = 2) -> list[float]:
    """Memory each model costs at load and first run on ORT CPU: the peak RSS of a fresh process
    that opens it and runs it once, minus that of the same process without a model (Python,
    numpy, ORT). Measured in separate processes: inside one, freed memory is reused and a
    session's cost does not show."""
    base = _peak_rss_mb([])
    return [round(_peak_rss_mb([str(m), str(threads)]) - base, 1) for m in models]


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
    runtimes: list[str | tuple[str, str]] | None = None,
) -> list[dict]:
    """Time every model in this process with the same session options and the same input.

    Runs are interleaved (one run of each model per round) so that drift in machine load
    affects all models alike; ratios are to the first model. ORT's threads do not spin between
    runs (see :func:`make_session`). ``runtimes`` gives each model's
    runtime (``ort``, ``openvino``, a ``(runtime, precision)`` pair, or ``(runtime, precision,
    properties)`` with the runtime's own settings: OpenVINO CPU properties); default ORT for all.
    """
    engines = [(r, "f32", None) if isinstance(r, str) else (*r, None)[:3] for r in (runtimes or ["ort"] * len(models))]
    if len(engines) != len(models):
        raise ValueError("one runtime per model")
    sessions = [make_session(m, providers, threads, runtime=r, precision=p, spinning=False, properties=props)
                for m, (r, p, props) in zip(models, engines)]  # fmt: skip
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
    for m, (r, p, props), s, t in zip(models, engines, sessions, times):
        p = str((props or {}).get("INFERENCE_PRECISION_HINT", p))  # a setting's precision hint is the row's precision
        rows.append({"model": str(m), "runtime": r, "precision": p, "providers": s.get_providers(), "threads": threads,
                     "ort_spinning": False, "warmup": warmup, **({"properties": props} if props else {}),
                     **latency_stats(t)})  # fmt: skip
    first = rows[0]["median_ms"]
    for r in rows:
        r["ratio_to_first"] = r["median_ms"] / first
    return rows


# ORT kernels that run an ONNX Conv, float or quantized
CONV_OPS = ("Conv", "FusedConv", "QLinearConv", "ConvInteger")


def profile_model(model: str | Path, threads: int = 2, providers: list[str] | None = None, runs: int = 5,
                  warmup: int = 2, seed: int = 0) -> dict:  # fmt: skip
    """Where one inference spends its time: ORT's own profiler, summed per operator type and per Conv.

    Kernel times (ms per run) come from the nodes of the graph ORT actually runs, after its
    fusions. ORT renames fused nodes (``/model.0/conv/Conv_token_44``, ``..._output_0_nchwc``),
    so each Conv-like kernel is keyed by the ONNX Conv it came from (:func:`conv_key`).
    """
    with tempfile.TemporaryDirectory() as tmp:
        session = make_session(model, providers, threads, profile_prefix=Path(tmp) / "profile")
        shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
        x = np.random.default_rng(seed).random(shape, dtype=np.float32)
        for _ in range(warmup + runs):
            run_head(session, x)
        events = json.loads(Path(session.end_profiling()).read_text())
    # ORT's profiler records every run, warm-up included: count only the kernels of the timed runs.
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    if len(starts) != warmup + runs:
        raise LowbitError(f"ORT's profile of {model} holds {len(starts)} runs, expected {warmup + runs}",
                          "report this with the onnxruntime version")  # fmt: skip
    cut_us = starts[warmup]
    aliases = _conv_aliases(model)
    by_op: dict[str, float] = {}
    by_conv: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < cut_us:
            continue
        op, ms = e["args"]["op_name"], e["dur"] / 1000.0 / runs
        by_op[op] = by_op.get(op, 0.0) + ms
        if op in CONV_OPS:
            key = conv_key(e["name"][: -len("_kernel_time")], aliases)
            by_conv[key] = by_conv.get(key, 0.0) + ms
    return {"model": str(model), "runs": runs, "threads": threads, "kernel_ms": sum(by_op.values()),
            "by_op_type": dict(sorted(by_op.items(), key=lambda kv: -kv[1])), "by_conv": by_conv}  # fmt: skip


def conv_key(kernel_name: str, aliases: dict[str, str] | None = None) -> str:
    """The ONNX Conv behind a kernel of ORT's optimized graph.

    ORT names a QDQ-fused node ``<node>_token_<n>`` and an NCHWc-converted one
    ``<output tensor>_nchwc``; ``aliases`` maps node and output names to the node's name.
    """
    base = re.sub(r"(_token_\d+|_nchwc)+$", "", kernel_name)
    return (aliases or {}).get(base, base)


def _conv_aliases(model: str | Path) -> dict[str, str]:
    graph = onnx.load(str(model), load_external_data=False).graph
    aliases = {}
    for n in graph.node:
        if n.op_type == "Conv" and n.name:
            aliases.update({n.name: n.name, n.output[0]: n.name})
    return aliases


def compare_profiles(reference: dict, other: dict) -> dict:
    """Per-Conv and whole-graph time of ``other`` against ``reference`` (e.g. INT8 against FP32)."""
    common = sorted(set(reference["by_conv"]) & set(other["by_conv"]))
    ref_conv = sum(reference["by_conv"][k] for k in common)
    oth_conv = sum(other["by_conv"][k] for k in common)
    slower = sorted(((k, reference["by_conv"][k], other["by_conv"][k]) for k in common
                     if other["by_conv"][k] > reference["by_conv"][k]), key=lambda r: r[1] - r[2])  # fmt: skip
    return {
        "convs_matched": len(common),
        "conv_ms": [ref_conv, oth_conv],
        "conv_ratio": oth_conv / ref_conv if ref_conv else float("nan"),
        "other_ms": [reference["kernel_ms"] - ref_conv, other["kernel_ms"] - oth_conv],
        "kernel_ratio": other["kernel_ms"] / reference["kernel_ms"],
        "slower_convs": [{"conv": k, "reference_ms": a, "ms": b} for k, a, b in slower],
    }
