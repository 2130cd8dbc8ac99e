"""What the machine is: its CPU's int8 instructions, the runtimes' versions (named beside every INT8 number)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import onnxruntime as ort

# ISA extensions that decide how fast, and how exactly, ORT's int8 kernels run on x86: without
# VNNI, u8s8 GEMMs go through vpmaddubsw, whose int16 pair sums saturate (see
# int8/kernel_check.py), and gain far less over FP32 FMA than with vpdpbusd.
INT8_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
# numpy's CPUID-based names for the same extensions (numpy has no AVX-VNNI / AMX entry)
_NUMPY_FEATURES = {"avx2": "AVX2", "fma": "FMA3", "avx512f": "AVX512F", "avx512bw": "AVX512BW",
                   "avx512_vnni": "AVX512VNNI"}  # fmt: skip


def environment() -> dict:
    """What the numbers were measured on."""
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
        from numpy._core._multiarray_umath import __cpu_features__ as feats  # late: numpy 2 only (ImportError below)
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
        import openvino  # late: openvino is optional (None when absent)

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
