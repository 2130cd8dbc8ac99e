"""Numeric formats of the sensitivity sweep and the mixed schemes, as fake quantization.

A format is a weight precision plus an activation precision for a Conv:
* ``w8a8``: int8 weights (per output channel, symmetric) and uint8 input activations
  (per tensor, asymmetric, range from calibration) - the placement of notebook 05's
  candidates, NNCF and TensorRT;
* ``w8a8-ort``: what ORT's ``quantize_static`` deploys (notebook 03's ORT recipes): the same
  weights, and Q/DQ also on Conv outputs, SiLU, Concat, Add, ... (:mod:`lowbit_helpers.sensitivity.deployed`; the
  sweep's only format that is not a per-Conv rewrite here);
* ``w4a16``: int4 weights (per output channel, symmetric), float activations;
* ``w4a8``: int4 weights and uint8 input activations;
* ``fp8``: float8 e4m3 weights (per output channel scale) and float8 e4m3 input
  activations (per tensor scale), through ONNX QuantizeLinear / DequantizeLinear, which
  ONNX Runtime runs on CPU.

Weights are rounded in numpy (the float Conv then sees exactly the dequantized values) and
activations go through a QuantizeLinear -> DequantizeLinear pair inserted in front of the
Conv, so ORT computes the same numbers a real low-bit kernel would, in float. No installed
library fake-quantizes individual nodes of an ONNX graph (ORT and ModelOpt quantize whole
graphs into deployable Q/DQ), hence this small module.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import LowbitError
from .weights import WeightSpec, dequantize
from .weights import quantize_weight as codes_and_scale

FP8_MAX = 448.0  # largest finite float8 e4m3fn


@dataclass(frozen=True)
class Format:
    name: str
    weight_bits: int  # 4 or 8
    act_bits: int | None  # 8, or None for float activations
    fp8: bool = False
    ort_placement: bool = False  # Q/DQ where ORT's quantize_static puts them (sensitivity/deployed.py), not only Conv inputs

    @property
    def bits_saved(self) -> int:
        """Bits per weight saved against 8-bit weights (what a budget of 4-bit weights buys)."""
        return 8 - self.weight_bits


FORMATS = {
    "w8a8": Format("w8a8", 8, 8),
    "w4a16": Format("w4a16", 4, None),
    "w4a8": Format("w4a8", 4, 8),
    "fp8": Format("fp8", 8, 8, fp8=True),
    "w8a8-ort": Format("w8a8-ort", 8, 8, ort_placement=True),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise LowbitError(f"unknown format {name!r}", f"use one of {sorted(FORMATS)}")
    return FORMATS[name]


def quantize_weight(w: np.ndarray, fmt: Format) -> np.ndarray:
    """Fake-quantized copy of a Conv weight [Cout, Cin/g, kh, kw], one scale per output channel.

    Integer formats use the reference quantizer of :mod:`.weights` (symmetric, narrow range:
    int8 -127..127, int4 -7..7, scale max|w| / qmax of the channel); fp8 scales the channel's
    max to 448 and rounds to e4m3.
    """
    w = np.asarray(w, dtype=np.float32)
    if fmt.fp8:
        amax = np.abs(w).reshape(w.shape[0], -1).max(axis=1).reshape(-1, *([1] * (w.ndim - 1)))
        scale = np.where(amax == 0, 1.0, amax).astype(np.float32) / FP8_MAX
        return ((w / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale).astype(np.float32)

    codes, scale = codes_and_scale(w, WeightSpec(fmt.weight_bits))
    return dequantize(codes, scale, None)


def activation_qparams(lo: float, hi: float, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (ONNX tensors' values) of one activation tensor with range [lo, hi]."""
    if fmt.fp8:
        amax = max(abs(lo), abs(hi), 1e-8)
        return np.array(amax / FP8_MAX, np.float32), np.array(0, np.float32)
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the range must hold 0 exactly (padding, ReLU zeros)
    qmax = 2**fmt.act_bits - 1
    scale = max(hi - lo, 1e-8) / qmax
    zero = int(np.clip(np.round(-lo / scale), 0, qmax))
    return np.array(scale, np.float32), np.array(zero, np.uint8)


def act_qdq_nodes(node: onnx.NodeProto, fmt: Format, lo_hi: tuple[float, float]):
    """QuantizeLinear -> DequantizeLinear for a Conv's input: (nodes, initializers, output name)."""
    scale, zero = activation_qparams(*lo_hi, fmt)
    s_name, z_name, q_name, dq_name = (f"{node.name}::{fmt.name}::{k}" for k in ("scale", "zero", "q", "dq"))
    if fmt.fp8:
        z = helper.make_tensor(z_name, onnx.TensorProto.FLOAT8E4M3FN, [], [0.0])
    else:
        z = numpy_helper.from_array(zero, z_name)
    nodes = [helper.make_node("QuantizeLinear", [node.input[0], s_name, z_name], [q_name], name=q_name),
             helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_name], name=dq_name)]  # fmt: skip
    return nodes, [numpy_helper.from_array(scale, s_name), z], dq_name


def apply_format(model: onnx.ModelProto, convs: set[str] | list[str], fmt: Format, ranges: dict) -> onnx.ModelProto:
    """Copy of ``model`` in which the named Conv nodes compute in ``fmt`` (fake-quantized).

    ``ranges`` maps each Conv's input tensor name to its calibrated (min, max); it is only
    read for formats with quantized activations. Names of existing tensors do not change,
    so a sub-graph and the full graph can be perturbed alike.
    """
    if fmt.ort_placement:
        raise ValueError(f"{fmt.name} perturbs the quantizers of an ORT file: use sensitivity.deployed.DeployedQdq")
    convs = set(convs)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes = []
    done = set()
    for node in g.node:
        if node.op_type == "Conv" and node.name in convs:
            done.add(node.name)
            w_name = node.input[1]
            wq = numpy_helper.from_array(quantize_weight(numpy_helper.to_array(inits[w_name]), fmt), f"{w_name}::{fmt.name}")
            g.initializer.append(wq)
            node.input[1] = wq.name
            if fmt.act_bits is not None:
                x = node.input[0]
                if x not in ranges:
                    raise KeyError(f"no calibrated range for {x} (input of {node.name})")
                qdq, qdq_inits, dq_out = act_qdq_nodes(node, fmt, ranges[x])
                g.initializer.extend(qdq_inits)
                new_nodes.extend(qdq)
                node.input[0] = dq_out
        new_nodes.append(node)
    missing = convs - done
    if missing:
        raise KeyError(f"Conv node(s) not in the graph: {sorted(missing)[:5]}")
    replace_nodes(g, new_nodes)
    return out


def replace_nodes(g: onnx.GraphProto, nodes: list) -> None:
    """Give ``g`` these nodes and drop the initializers no node reads any more (the float weights
    a quantized copy replaced: keeps perturbed and materialised models small)."""
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
