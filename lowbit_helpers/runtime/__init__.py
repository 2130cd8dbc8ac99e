"""The runtime layer: how models are run, timed and inspected.

* :mod:`.sessions`: the one session factory (ORT or OpenVINO; a file or an in-memory model;
  threads, arithmetic = graph optimisation level, providers) and the accuracy engines;
* :mod:`.activations`: ``with_outputs`` and the one collector of intermediate tensors behind every
  activation statistic (INT8 ranges, sweep ranges, GPTQ statistics, bias correction);
* :mod:`.bench`: interleaved latency benches, ORT's profiler, load memory;
* :mod:`.machine`: the CPU's int8 instructions and the runtimes' versions;
* :mod:`.inspect`: what a Q/DQ file holds and what ORT runs of it, raw-head fidelity;
* :mod:`.emulate`: ORT's kernels on another x86 CPU model under QEMU;
* :mod:`.threads`: fixed thread counts for float arithmetic whose results are recorded.
"""

from .activations import Activations, activations, with_outputs
from .bench import (
    BENCH_SETTINGS,
    CONV_OPS,
    bench_models,
    compare_profiles,
    conv_key,
    latency_stats,
    load_memory,
    profile_model,
)
from .machine import INT8_ISA_FLAGS, cpu_int8_isa, environment, int8_kernel_class
from .sessions import (
    ARITHMETICS,
    ENGINES,
    RUNTIMES,
    check_openvino_properties,
    check_providers,
    engine_session,
    engine_unavailable,
    float_convs_between_qdq,
    kept_float_rewrite,
    make_session,
    openvino_refusal,
    openvino_setting_unavailable,
    run_head,
    runtime_unavailable,
    try_openvino,
    with_properties,
)
from .threads import TORCH_THREADS, fixed_torch_threads

__all__ = [
    "ARITHMETICS", "BENCH_SETTINGS", "CONV_OPS", "ENGINES", "INT8_ISA_FLAGS", "RUNTIMES", "TORCH_THREADS", "Activations", "activations",
    "bench_models", "check_openvino_properties", "check_providers", "compare_profiles", "conv_key", "cpu_int8_isa", "engine_session",
    "engine_unavailable", "environment", "fixed_torch_threads", "float_convs_between_qdq", "int8_kernel_class", "kept_float_rewrite",
    "latency_stats", "load_memory", "make_session", "openvino_refusal", "openvino_setting_unavailable", "profile_model", "run_head", "runtime_unavailable", "try_openvino", "with_outputs", "with_properties",
]  # fmt: skip
