"""Does this CPU's INT8 Conv kernel compute what the Q/DQ graph says? The saturation probe.

ORT's x86 u8s8 GEMM multiplies through ``vpmaddubsw`` on CPUs without VNNI: each pair of
u8 x s8 products is summed into int16 with saturation, so a pair sum beyond 32767 is clipped
before the int32 accumulation. With VNNI (``vpdpbusd``) or AMX the pairs accumulate straight
into int32 and nothing clips. ORT's remedy is ``reduce_range``: 7-bit weights
([-64, 64]), so that 2 x 255 x 64 = 32640 always fits.

:func:`probe_model` builds a one-Conv Q/DQ model whose pair sums exceed int16 (activations at
255, weights at +127, or +64 for the reduce-range twin); :func:`probe` runs it through ORT's
fused kernels and with exact Q/DQ arithmetic (graph optimizations off) and compares. Written
here because no library ships such a probe; the model is built with ``onnx.helper``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime import cpu_int8_isa, make_session
from ..runtime.inspect import ort_executed_ops

CHANNELS = 64  # input channels of the 1x1 probe Conv: 32 u8 x s8 pairs per output
PROBE_VERSION = 2  # part of the cached probe's key: bump when the probe changes


def probe_model(path: str | Path, reduce_range: bool = False, out_channels: int = 8) -> Path:
    """A Q/DQ Conv (uint8 activations, int8 per-channel weights) as ORT fuses it into QLinearConv.

    Input x in [0, 1] quantizes with scale 1/255 to u8 up to 255. The weights are +127 (or +64,
    the largest ``reduce_range`` weight) at scale 1/127 (1/64), i.e. 1.0 in float, so the exact output at x = 1
    is ``CHANNELS``; the output is quantized with a range that holds it.
    """

    q = 64 if reduce_range else 127
    w = np.full((out_channels, CHANNELS, 1, 1), q, dtype=np.int8)
    inits = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zp"),
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(np.full(out_channels, 1 / q, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(out_channels, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(CHANNELS / 250, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_DQ"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_DQ", axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["y"], name="probe_Conv"),
        helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zp"], ["y_q"], name="y_Q"),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["out"], name="y_DQ"),
    ]
    graph = helper.make_graph(
        nodes, "saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, out_channels, 4, 4])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def probe(folder: str | Path, threads: int = 1) -> dict:
    """The probe at full and reduced weight range: ORT's fused kernel against exact Q/DQ arithmetic.

    ``saturates`` is True when the 8-bit weights' kernel result falls short of the exact one
    (the vpmaddubsw int16 clip); ``reduce_range_exact`` when the 7-bit twin matches exactly.
    """

    folder = Path(folder)
    x = np.ones((1, CHANNELS, 4, 4), np.float32)
    out = {"cpu_int8_isa": cpu_int8_isa()}
    for rr in (False, True):
        m = probe_model(folder / f"probe_{'rr' if rr else 'full'}.onnx", reduce_range=rr)
        kern = make_session(m, threads=threads).run(None, {"x": x})[0]
        exact = make_session(m, threads=threads, arithmetic="exact").run(None, {"x": x})[0]
        tag = "reduce_range" if rr else "full_range"
        wq = 64 if rr else 127
        out[tag] = {"weight_q": wq, "pair_sum": 2 * 255 * wq, "exact": float(exact.mean()), "kernel": float(kern.mean()),
                    "max_abs_diff": float(np.abs(kern - exact).max()), "fused": ort_executed_ops(m, threads)["QLinearConv"]}  # fmt: skip
    y_scale = CHANNELS / 250
    out["saturates"] = out["full_range"]["max_abs_diff"] > y_scale
    out["reduce_range_exact"] = out["reduce_range"]["max_abs_diff"] <= y_scale
    return out


if __name__ == "__main__":  # python -m lowbit_helpers.int8.kernel_check: the probe on this CPU, as JSON
    with tempfile.TemporaryDirectory() as tmp:
        json.dump(probe(tmp), sys.stdout, indent=1)
    print()
