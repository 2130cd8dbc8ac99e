"""Inference sessions for ONNX Runtime and OpenVINO (one factory), latency measurement, and
what the machine is (its CPU's int8 instructions).

Every session answers ``get_inputs()`` and ``run(None, {name: tensor})`` the way an ORT
``InferenceSession`` does, so evaluation and benchmarks treat both runtimes alike.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

import numpy as np

from .errors import LowbitError


ARITHMETICS = ("kernels", "exact")
BENCH_SETTINGS = {"ort_spinning": False}  # how bench_models times (part of every latency stage's key)
RUNTIMES = ("ort", "openvino")
OPENVINO_PRECISIONS = ("f32", "bf16")  # OpenVINO's CPU inference precision hint


def check_providers(providers: list[str] | None) -> list[str]:
    """``providers`` (default: CPU) if this onnxruntime has them all, else one clear error."""
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
    return providers


def make_session(model: str | Path, providers: list[str] | None = None, threads: int = 2,
                 optimized_path: str | Path | None = None, profile_prefix: str | Path | None = None,
                 arithmetic: str = "kernels", runtime: str = "ort", precision: str = "f32", spinning: bool = True):  # fmt: skip
    """A session with fixed, documented options (the same for every variant).

    ``spinning`` False stops ORT's intra-op threads from spin-waiting between runs: the setting
    of every latency benchmark here, where sessions (and OpenVINO's threads) are interleaved in
    one process on few cores and spinning threads of one steal the cores of the next (measured:
    ORT FP32 ran 1.8x slower beside a spinning INT8 session on 2 cores).

    ``runtime``: ``ort`` (ONNX Runtime, ``providers``) or ``openvino`` (OpenVINO's CPU plugin,
    reading the ONNX directly; ``precision`` f32 or bf16 is its inference precision hint, and
    ``arithmetic`` does not apply: OpenVINO always runs its own fused kernels).

    ``threads`` is the intra-op pool size; inter-op is 1 and execution sequential, so two
    sessions compare fairly on the same cores. ``optimized_path`` saves the graph ORT runs;
    ``profile_prefix`` turns on ORT's profiler, writing there.

    ``arithmetic``: ``kernels`` is what ORT deploys (all graph optimizations: Q/DQ fused into
    integer kernels, whose results depend on the CPU's int8 instructions); ``exact`` runs the
    graph as written (optimizations and weight pre-packing off): every Q/DQ computed as the
    ONNX spec defines it, the machine-independent reference that TensorRT and VNNI kernels aim
    at. A graph with float8 Q/DQ runs with ORT's Q/DQ fusion off under ``kernels`` too: ORT's
    CPU has no float8 kernels and refuses the fused node.
    """
    if runtime not in RUNTIMES:
        raise LowbitError(f"unknown runtime {runtime!r}", f"use one of {', '.join(RUNTIMES)}")
    if runtime == "openvino":
        return OpenVINOSession(model, threads, precision)
    import onnxruntime as ort

    providers = check_providers(providers)
    model = Path(model)
    if not model.is_file():
        raise LowbitError(f"model not found: {model}", "give an existing .onnx file")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, not {arithmetic!r}")
    exact = arithmetic == "exact"
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, "ORT_DISABLE_ALL" if exact else "ORT_ENABLE_ALL")
    if exact:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    try:
        disabled = (["QDQSelectorActionTransformer"] if has_float8(model) else []) + kept_float_rewrite(model)
        return ort.InferenceSession(str(model), sess_options=so, providers=providers, disabled_optimizers=disabled or None)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise LowbitError(f"onnxruntime cannot load {model}: {exc}", "check that the file is a complete ONNX model") from None


# Engines: a runtime with its arithmetic, the unit every accuracy row is measured under.
#   ort: ORT's fused integer kernels (this CPU's int8 ISA decides their result);
#   ort-exact: ORT with graph optimizations off, the Q/DQ graph computed as the ONNX spec says;
#   openvino / openvino-bf16: OpenVINO's CPU plugin at f32 / bf16 inference precision.
ENGINES = {"ort": ("ort", "kernels", "f32"), "ort-exact": ("ort", "exact", "f32"),
           "openvino": ("openvino", "kernels", "f32"), "openvino-bf16": ("openvino", "kernels", "bf16")}  # fmt: skip


def engine_unavailable(engine: str) -> str | None:
    """Why ``engine`` cannot run on this machine (a "skipped: ..." line), or None when it can."""
    if ENGINES[engine][0] != "openvino":
        return None
    if _openvino_version() is None:
        return "skipped: openvino is not installed (pip install the pinned environment)"
    if ENGINES[engine][2] == "bf16" and not _openvino_has_bf16():
        return "skipped: this CPU has no bf16 instructions"
    return None


def _openvino_has_bf16(core=None) -> bool:
    """Whether OpenVINO's CPU plugin offers bf16 inference on this CPU."""
    if core is None:
        import openvino as ov

        core = ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def engine_session(model: str | Path, engine: str, providers: list[str] | None = None, threads: int = 2):
    """:func:`make_session` for one of ``ENGINES``."""
    if engine not in ENGINES:
        raise LowbitError(f"unknown engine {engine!r}", f"use one of {', '.join(ENGINES)}")
    runtime, arithmetic, precision = ENGINES[engine]
    return make_session(model, providers, threads, arithmetic=arithmetic, runtime=runtime, precision=precision)


class OpenVINOSession:
    """An OpenVINO CPU compiled model behind ORT's session interface (inputs, ``run``).

    Latency hint, one stream, ``threads`` inference threads: the same footing as the ORT
    sessions it is timed beside. The output is copied out of OpenVINO's buffer, which the next
    inference overwrites.
    """

    def __init__(self, model: str | Path, threads: int = 2, precision: str = "f32"):
        if precision not in OPENVINO_PRECISIONS:
            raise LowbitError(f"unknown OpenVINO precision {precision!r}", f"use one of {', '.join(OPENVINO_PRECISIONS)}")
        try:
            import openvino as ov
        except ImportError:
            raise LowbitError("the openvino package is not installed",
                              "install the pinned environment (bash scripts/test.sh creates it) or pip install openvino") from None  # fmt: skip
        model = Path(model)
        if not model.is_file():
            raise LowbitError(f"model not found: {model}", "give an existing .onnx file")
        core = ov.Core()
        if precision == "bf16" and not _openvino_has_bf16(core):
            raise LowbitError("this CPU has no bf16 support in OpenVINO", "use precision f32 here")
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": 1}  # fmt: skip
        try:
            self.compiled = core.compile_model(str(model), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with its own message
            raise LowbitError(f"OpenVINO cannot compile {model}: {str(exc)[:300]}",
                              "check the file with onnx.checker, or run it with --runtime ort") from None  # fmt: skip
        self.request = self.compiled.create_infer_request()
        self.precision = precision
        self.version = ov.__version__
        port = self.compiled.input(0)
        shape = [d.get_length() if d.is_static else "batch" for d in port.get_partial_shape()]
        self._inputs = [_Input(port.get_any_name(), shape)]

    def get_inputs(self):
        return self._inputs

    def get_providers(self) -> list[str]:
        return [f"OpenVINO {self.version} CPU ({self.precision})"]

    def run(self, output_names, feeds: dict) -> list[np.ndarray]:
        (tensor,) = feeds.values()
        result = self.request.infer({0: tensor})
        return [np.array(result[self.compiled.output(0)], copy=True)]


class _Input:
    def __init__(self, name: str, shape: list):
        self.name, self.shape = name, shape


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
    import subprocess
    import sys

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


def has_float8(model: str | Path) -> bool:
    """Whether the ONNX file holds float8 tensors (read without loading external data)."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    f8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
          onnx.TensorProto.FLOAT8E5M2FNUZ}  # fmt: skip
    return any(i.data_type in f8 for i in m.graph.initializer)


def float_convs_between_qdq(model: str | Path) -> list[str]:
    """Convs a recipe kept in float (float weights) that sit between a DequantizeLinear and a
    QuantizeLinear: the ones ORT's WeightBiasQuantization rewrite would quantize at load time."""
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return [n.name for n in g.node if n.op_type == "Conv" and n.input[1] in inits
            and getattr(producer.get(n.input[0]), "op_type", None) == "DequantizeLinear"
            and any(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], []))]  # fmt: skip


def kept_float_rewrite(model: str | Path) -> list[str]:
    """The ORT optimizers turned off for ``model`` so that a Conv the recipe kept in float runs in float.

    ORT's WeightBiasQuantization (1.2x) quantizes the weights of a float Conv between DQ and Q at
    load time so that its QDQ fusion can make it a QLinearConv: what runs is then neither the float
    layer the recipe asked for nor the graph's exact arithmetic, and its error moves with the images
    (measured: ort-avgminmax-keep6 on YOLOv10n, raw-head SQNR of ORT's kernels against the exact
    arithmetic 25.5 dB with the rewrite, 34.5 dB without, the level of every other recipe). Every
    ORT session here turns it off for such files, and so should a deployment of them.
    """
    return ["WeightBiasQuantization"] if float_convs_between_qdq(model) else []


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
    runtimes: list[str | tuple[str, str]] | None = None,
) -> list[dict]:
    """Time every model in this process with the same session options and the same input.

    Runs are interleaved (one run of each model per round) so that drift in machine load
    affects all models alike; ratios are to the first model. ORT's threads do not spin between
    runs (see :func:`make_session`). ``runtimes`` gives each model's
    runtime (``ort``, ``openvino``, or a ``(runtime, precision)`` pair); default ORT for all.
    """
    engines = [(r, "f32") if isinstance(r, str) else tuple(r) for r in (runtimes or ["ort"] * len(models))]
    if len(engines) != len(models):
        raise ValueError("one runtime per model")
    sessions = [make_session(m, providers, threads, runtime=r, precision=p, spinning=False)
                for m, (r, p) in zip(models, engines)]  # fmt: skip
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
    for m, (r, p), s, t in zip(models, engines, sessions, times):
        rows.append({"model": str(m), "runtime": r, "precision": p, "providers": s.get_providers(), "threads": threads,
                     "ort_spinning": False, "warmup": warmup, **latency_stats(t)})  # fmt: skip
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
    import json
    import tempfile

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
    import onnx

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


# ISA extensions that decide how fast, and how exactly, ORT's int8 kernels run on x86: without
# VNNI, u8s8 GEMMs go through vpmaddubsw, whose int16 pair sums saturate (see
# quant/kernel_check.py), and gain far less over FP32 FMA than with vpdpbusd.
INT8_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
# numpy's CPUID-based names for the same extensions (numpy has no AVX-VNNI / AMX entry)
_NUMPY_FEATURES = {"avx2": "AVX2", "fma": "FMA3", "avx512f": "AVX512F", "avx512bw": "AVX512BW",
                   "avx512_vnni": "AVX512VNNI"}  # fmt: skip


def environment() -> dict:
    """What the numbers were measured on."""
    import onnxruntime as ort

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_int8_isa": cpu_int8_isa(),
        "int8_kernel_class": int8_kernel_class(),
        "onnxruntime": ort.__version__,
        "openvino": _openvino_version(),
        "providers_available": ort.get_available_providers(),
    }


def cpu_int8_isa() -> list[str]:
    """The int8-relevant extensions this process's CPU reports (``INT8_ISA_FLAGS`` names).

    Read from CPUID through numpy's runtime dispatch table, which is what the process itself
    sees (an emulated CPU included); /proc/cpuinfo, which shows the host, adds only what numpy
    does not track (AVX-VNNI, AMX), only when the two agree on AVX2 and AVX-512, and never in a
    process that :mod:`.emulate` started (``LOWBIT_EMULATED=1``).
    """
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        return _cpu_flags(INT8_ISA_FLAGS)
    have = [f for f, n in _NUMPY_FEATURES.items() if feats.get(n)]
    host = _cpu_flags(INT8_ISA_FLAGS)
    emulated = os.environ.get("LOWBIT_EMULATED") == "1"  # set by .emulate: /proc/cpuinfo is the host's there
    if not emulated and ("avx512f" in host) == ("avx512f" in have) and ("avx2" in host) == ("avx2" in have):
        have += [f for f in ("avx_vnni", "amx_int8") if f in host]
    return [f for f in INT8_ISA_FLAGS if f in have]


def int8_kernel_class(isa: list[str] | None = None) -> str:
    """How ORT's x86 u8s8 kernels multiply here: ``amx``, ``vnni`` (exact int32 accumulation) or
    ``avx2`` (vpmaddubsw: int16 pair sums that can saturate); ``none`` without AVX2."""
    isa = cpu_int8_isa() if isa is None else isa
    if "amx_int8" in isa:
        return "amx"
    if "avx512_vnni" in isa or "avx_vnni" in isa:
        return "vnni"
    return "avx2" if "avx2" in isa else "none"


def _openvino_version() -> str | None:
    try:
        import openvino

        return openvino.__version__
    except ImportError:
        return None


def _cpu_flags(wanted: tuple[str, ...]) -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
