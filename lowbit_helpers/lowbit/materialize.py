"""Materialise a mixed-precision scheme into one deployable ONNX (``materialize``).

A scheme maps Conv node names to precisions (notebook 04 writes them). Per precision the
Conv's weight becomes a quantized initializer read through ``DequantizeLinear`` and, for
formats with 8-bit activations, its input goes through ``QuantizeLinear -> DequantizeLinear``:

=========  =====================================================  ============================
precision  weight                                                 input activation
=========  =====================================================  ============================
fp32       untouched                                              float
fp16       float16 initializer -> ``Cast`` to float               float
w8a8       INT8 codes, one scale per output channel               uint8 Q/DQ, per tensor
w4a16      INT4 codes (two per byte), per channel or blocked      float
w4a8       INT4 codes, per channel or blocked                     uint8 Q/DQ, per tensor
fp8        FLOAT8E4M3FN codes, one scale per output channel       float8 e4m3 Q/DQ, per tensor
=========  =====================================================  ============================

The arithmetic is the sweep's (:mod:`lowbit_helpers.formats`): the same reference quantizer
(:mod:`lowbit_helpers.weights`), the same activation ranges (mean of per-image min / max on calibration
images) and Q/DQ placement (each quantized Conv's input), so a scheme scored by the sweep and
the model deployed from it compute the same numbers (tested). 4-bit layers take the PTQ
method (:data:`lowbit_helpers.lowbit.METHODS`): its scales and codes, blocked scales, bias correction;
8-bit layers are rounded to nearest per channel, as in notebook 03.

Why not ORT's ``quantize_static`` with ``QInt4`` overrides: GPTQ's codes are the result of a
reconstruction, and ``quantize_static`` re-derives every weight from floats; a graph writer of
a few dozen lines keeps the codes that were optimised.
"""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from ..errors import LowbitError
from ..formats import FORMATS, act_qdq_nodes, replace_nodes
from ..weights import compute_scale, dequantize, quantize_codes
from . import Method, parse_method
from .bias_shift import expected_output_shift

# a scheme's precisions: float ones and every format a Conv can be deployed in (not ORT's own w8a8-ort file)
PRECISIONS = ("fp32", "fp16", *(name for name, f in FORMATS.items() if not f.ort_placement))
# Part of every candidate's cache key: bump it when the arithmetic of weights.py / a method's module /
# this module changes (clip grid, damping, act-order, statistics), so old builds are not reused.
QUANT_VERSION = 2  # 2: statistics and GPTQ under a fixed torch thread count (runtime.TORCH_THREADS)
# How the file is laid out, not what it computes (so not in the metric validation's made_by, which QUANT_VERSION is):
# 2: blocked INT4 DequantizeLinear in whole blocks, which OpenVINO's ONNX frontend requires
LAYOUT_VERSION = 2
INT4_OPSET = 21  # INT4 tensors and blocked DequantizeLinear


def check_scheme(model: onnx.ModelProto, nodes: dict[str, str]) -> dict[str, str]:
    """The scheme's node -> precision for this graph (Convs it omits stay fp32), or one clear error."""
    if not isinstance(nodes, dict) or not nodes:
        raise LowbitError("the scheme has no 'nodes' mapping", "give a scheme JSON as notebook 04 / `schemes` writes")
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    unknown = [n for n in nodes if n not in set(convs)]
    if unknown:
        raise LowbitError(
            f"the scheme names {len(unknown)} node(s) that are not Conv nodes of this model, e.g. {unknown[:3]}",
            "use a scheme made from this model's sensitivity file (a scheme for another model does not apply)",
        )
    bad = sorted({str(p) for p in nodes.values() if not isinstance(p, str) or p not in PRECISIONS})
    if bad:
        raise LowbitError(f"unknown precision(s) {bad} in the scheme", f"use one of {list(PRECISIONS)}")
    return {c: nodes.get(c, "fp32") for c in convs}


def stats_convs(nodes: dict[str, str], method: Method) -> list[str]:
    """The Convs whose calibration statistics ``method`` needs (the 4-bit ones)."""
    if not method.needs_stats:
        return []
    return [n for n, p in nodes.items() if p in FORMATS and FORMATS[p].weight_bits == 4]


def layer_codes(name: str, w: np.ndarray, bits: int, method: Method, stats: dict | None,
                cache: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:  # fmt: skip
    """Conv ``name``'s weight ``w`` at ``bits``: (scales, integer codes, bias shift or None).

    4-bit layers take the method's own scales and codes (``lowbit/<rounding>.py``) and its ``-bc``
    shift; 8-bit layers are rounded to nearest per channel. ``cache``: see :func:`materialize`."""
    spec = method.spec(bits)
    st = stats.get(name) if (stats is not None and bits == 4) else None
    ckey = (name, bits, method.name, id(st))  # the caller's cache holds one model; id: these stats
    if cache is not None and ckey in cache:
        return cache[ckey]
    if bits == 4:
        scale = method.rounding.scales(w, spec, st)
        codes = method.rounding.codes(w, scale, spec, st)
    else:
        scale = compute_scale(w, spec)
        codes = quantize_codes(w, scale, spec)
    shift = None
    if bits == 4 and method.bias_correction:
        shift = expected_output_shift(w, dequantize(codes, scale, spec.block), st)
    if cache is not None:
        cache[ckey] = (scale, codes, shift)
    return scale, codes, shift


def _init(g: onnx.GraphProto, array: np.ndarray, name: str) -> str:
    """Add ``array`` as an initializer (ml_dtypes int4 / float8 arrays are packed by onnx)."""
    g.initializer.append(numpy_helper.from_array(array, name))
    return name


def materialize(model: onnx.ModelProto, nodes: dict[str, str], method: str | Method, *,
                ranges: dict | None = None, stats: dict | None = None,
                cache: dict | None = None) -> tuple[onnx.ModelProto, dict]:  # fmt: skip
    """The deployable ONNX of scheme ``nodes`` and a record of what was done.

    ``ranges``: calibrated (min, max) of each Conv input (needed by a8 layers; see
    :func:`lowbit_helpers.sensitivity.sweep.activation_ranges`); ``stats``: :class:`.stats.ConvStats` of the
    4-bit Convs (needed by methods other than ``rtn``; see :func:`.stats.collect_stats`). ``cache``: a
    dict kept by the caller for one model and one set of statistics; a layer's codes depend only
    on its weight, its statistics and the method, so schemes that share a 4-bit layer compute it
    once.
    """
    method = parse_method(method) if isinstance(method, str) else method
    nodes = check_scheme(model, nodes)
    need_ranges = [c for c, p in nodes.items() if p in FORMATS and FORMATS[p].act_bits is not None]
    by_name = {n.name: n for n in model.graph.node}
    if need_ranges and (ranges is None or any(by_name[c].input[0] not in ranges for c in need_ranges)):
        raise LowbitError("activation ranges are missing for the scheme's a8 layers",
                          "pass ranges from activation_ranges() on calibration images")  # fmt: skip
    missing = [c for c in stats_convs(nodes, method) if stats is None or c not in stats]
    if missing:
        raise LowbitError(f"method {method.name} needs calibration statistics of {len(missing)} Conv(s)",
                          "pass stats from lowbit.stats.collect_stats() on calibration images")  # fmt: skip
    t0 = time.perf_counter()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if any(p in ("w4a16", "w4a8") for p in nodes.values()):
        out = with_opset(out, INT4_OPSET)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes, layers = [], {}
    for node in g.node:
        prec = nodes.get(node.name, "fp32") if node.op_type == "Conv" else "fp32"
        if prec == "fp32":
            new_nodes.append(node)
            continue
        w_name = node.input[1]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        base = f"{node.name}::{prec}"
        rec = {"precision": prec, "params": int(w.size)}
        if prec == "fp16":
            _init(g, w.astype(np.float16), f"{base}::w16")
            new_nodes.append(helper.make_node("Cast", [f"{base}::w16"], [f"{base}::w"], name=f"{base}::cast", to=TensorProto.FLOAT))
        else:
            fmt = FORMATS[prec]
            if fmt.fp8:
                amax = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
                scale = (np.where(amax == 0, 1.0, amax) / 448.0).astype(np.float32)
                codes = (w / scale[:, None, None, None]).astype(ml_dtypes.float8_e4m3fn)
                zero = np.zeros(scale.shape, ml_dtypes.float8_e4m3fn)
                dq_attrs, rec["weights"] = {"axis": 0}, "float8 e4m3, per output channel"
            else:
                bits = fmt.weight_bits
                spec = method.spec(bits)
                scale, codes, shift = layer_codes(node.name, w, bits, method, stats, cache)
                if shift is not None:
                    _correct_bias(g, node, inits, shift, base)
                    rec["bias_shift_max"] = float(np.abs(shift).max())
                np_type = ml_dtypes.int4 if bits == 4 else np.int8
                codes, zero = codes.astype(np_type), np.zeros(scale.shape, np_type)
                dq_attrs = {"axis": 0} if spec.block is None else {"axis": 1, "block_size": spec.block}
                rec["weights"] = f"int{bits}, {spec.granularity}" + ("" if bits == 8 else f", {method.name}")
                # numpy's own sums, not BLAS's (whose thread split follows OMP_NUM_THREADS: runtime/threads.py)
                err = (dequantize(codes.astype(np.int8), scale, spec.block) - w).astype(np.float64)
                w64 = w.astype(np.float64)
                rec["weight_rel_error"] = float(np.sqrt(np.sum(err * err)) / max(np.sqrt(np.sum(w64 * w64)), 1e-12))
                # whole blocks, as OpenVINO's ONNX frontend requires (ONNX allows a partial last block): a row
                # narrower than a block is one block of its width; a partial last block is padded with zero codes
                # and the padding sliced off after DequantizeLinear. The same arithmetic either way (tested).
                width = codes.shape[1]
                if spec.block is not None and width < spec.block:
                    dq_attrs["block_size"] = width
                elif spec.block is not None and width % spec.block:
                    codes = np.concatenate([codes, np.zeros((codes.shape[0], -width % spec.block) + codes.shape[2:], np_type)], 1)
            _init(g, codes, f"{base}::wq")
            _init(g, scale, f"{base}::ws")
            _init(g, zero, f"{base}::wz")
            padded = codes.shape[1] != w.shape[1]
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}::wq", f"{base}::ws", f"{base}::wz"],
                                              [f"{base}::w" + ("::padded" if padded else "")], name=f"{base}::wdq", **dq_attrs))  # fmt: skip
            if padded:
                for k, v in (("starts", 0), ("ends", w.shape[1]), ("axes", 1)):
                    _init(g, np.array([v], np.int64), f"{base}::{k}")
                new_nodes.append(helper.make_node("Slice", [f"{base}::w::padded", f"{base}::starts", f"{base}::ends", f"{base}::axes"],
                                                  [f"{base}::w"], name=f"{base}::slice"))  # fmt: skip
            if fmt.act_bits is not None:
                qdq, inits_new, dq_out = act_qdq_nodes(node, fmt, ranges[node.input[0]])
                g.initializer.extend(inits_new)
                new_nodes.extend(qdq)
                node.input[0] = dq_out
        node.input[1] = f"{base}::w"
        layers[node.name] = rec
        new_nodes.append(node)
    replace_nodes(g, new_nodes)
    onnx.checker.check_model(out)
    counts: dict[str, int] = {}
    for p in nodes.values():
        counts[p] = counts.get(p, 0) + 1
    total = sum(r["params"] for r in layers.values()) + sum(
        int(np.prod(inits[by_name[c].input[1]].dims)) for c, p in nodes.items() if p == "fp32"
    )  # fmt: skip
    four = sum(r["params"] for r in layers.values() if r["precision"] in ("w4a16", "w4a8"))
    info = {"method": method.record(), "method_text": method.describe, "precisions": counts,
            "conv_params": total, "four_bit_params": four, "four_bit_share": four / total if total else 0.0,
            "opset": next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")),
            "seconds": round(time.perf_counter() - t0, 2), "layers": layers}  # fmt: skip
    return out, info


def _correct_bias(g, node, inits, shift: np.ndarray, base: str) -> None:
    """Subtract ``shift`` from the Conv's bias (adding a bias input when it has none)."""
    if len(node.input) > 2 and node.input[2]:
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
    else:
        b = np.zeros(shift.shape, np.float32)
    name = f"{base}::bias"
    g.initializer.append(numpy_helper.from_array((b - shift).astype(np.float32), name))
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)


def with_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= version:
        return model
    return version_converter.convert_version(model, version)
