"""A scheme's 4-bit codes in an ORT INT8 recipe's file: the form ORT runs on integer kernels.

:mod:`.materialize` writes a scheme as the sweep scored it: Q/DQ on the a8 Convs' inputs only, so
ORT computes every Conv in float from dequantized weights (4-bit buys disk, not speed). Here the
scheme's weights go into the file of an INT8 recipe with ORT's ``all`` placement (Q/DQ on every
Conv's input and output, on SiLU and the adds: :mod:`lowbit_helpers.int8.ort`), whose Convs ORT
fuses into ``QLinearConv``:

* a Conv the scheme puts in 4 bits (w4a16 or w4a8) gets the method's per-channel INT4 codes and
  scales in place of the recipe's INT8 ones, and its int32 bias re-quantized on the new scales
  (``round((b - shift) / (s_x s_w))``, with the method's ``-bc`` shift); its activations are the
  recipe's uint8 ones, so a w4a16 layer runs as W4A8 here;
* a Conv the recipe left in float (its head policy) and the scheme puts in 4 bits gets the INT4
  codes through ``DequantizeLinear`` and stays a float Conv, as in :mod:`.materialize`;
* every other Conv keeps the recipe's arithmetic (INT8 codes, or float where the recipe left it).

The INT4 codes stay INT4 on disk (half the bytes). ORT's CPU has no INT4 ``QLinearConv``:
:func:`lowbit_helpers.runtime.sessions.widened_int4` turns each per-channel INT4 weight into the
INT8 initializer of the same integers when the session is opened (the file asks for it in its
metadata, ``lowbit.load: widen-int4``, which ``make_session`` follows), so the arithmetic is
unchanged and the Conv fuses. Blocked scales
(``-b<B>``) cannot fuse into ``QLinearConv`` (one scale per output channel) and are refused.

Our own code: no library writes a method's own INT4 codes into another recipe's Q/DQ graph (ORT's
``quantize_static`` re-derives every weight from floats).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import LowbitError
from ..formats import FORMATS, replace_nodes
from ..runtime.sessions import LOAD_KEY, WIDEN_INT4
from ..weights import dequantize
from . import Method, parse_method
from .materialize import INT4_OPSET, check_scheme, layer_codes, with_opset

INT32 = np.iinfo(np.int32)


def integer_form(int8_model: onnx.ModelProto, float_model: onnx.ModelProto, nodes: dict[str, str],
                 method: str | Method, *, stats: dict | None = None, cache: dict | None = None,
                 codes: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, dict]:  # fmt: skip
    """Scheme ``nodes`` (Conv -> precision of ``float_model``) with ``method``'s codes, written into
    ``int8_model`` (an ORT ``all``-placement recipe of ``float_model``), and a record per Conv of what
    it deploys as. ``stats`` and ``cache``: as for :func:`.materialize.materialize`. ``codes``: INT4
    codes that replace the method's for those Convs (block reconstruction's, :mod:`.reconstruct`), on
    the method's scales and with the bias of the method's own codes (their ``-bc`` shift), which is the
    bias the reconstruction learned them against."""
    method = parse_method(method) if isinstance(method, str) else method
    if method.block is not None:
        raise LowbitError(f"method {method.name} has blocked scales, which QLinearConv cannot run (one scale per output channel)",
                          f"use a per-channel method for the integer form, e.g. {method.per_channel}")  # fmt: skip
    nodes = check_scheme(float_model, nodes)
    four = [c for c, p in nodes.items() if p in FORMATS and FORMATS[p].weight_bits == 4]
    missing = [c for c in four if method.needs_stats and (stats is None or c not in stats)]
    if missing:
        raise LowbitError(f"method {method.name} needs calibration statistics of {len(missing)} Conv(s)",
                          "pass stats from lowbit.stats.collect_stats() on calibration images")  # fmt: skip
    f_inits = {i.name: i for i in float_model.graph.initializer}
    f_convs = {n.name: n for n in float_model.graph.node if n.op_type == "Conv"}
    out = onnx.ModelProto()
    out.CopyFrom(int8_model)
    out = with_opset(out, INT4_OPSET)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    convs = {n.name: n for n in g.node if n.op_type == "Conv"}
    if set(convs) != set(f_convs):
        raise LowbitError("the INT8 file's Conv nodes are not the float model's",
                          "give the INT8 recipe (ORT, placement all) made from this float model")  # fmt: skip
    layers, extra_nodes, drop = {}, [], set()
    for name, prec in nodes.items():
        node, f_node = convs[name], f_convs[name]
        w = numpy_helper.to_array(f_inits[f_node.input[1]]).astype(np.float32)
        w_dq = producer.get(node.input[1])
        x_dq = producer.get(node.input[0])
        integer = w_dq is not None and w_dq.op_type == "DequantizeLinear" and x_dq is not None and x_dq.op_type == "DequantizeLinear"
        rec = {"scheme": prec, "params": int(w.size)}
        if name not in four:
            rec["deployed"] = "int8" if integer else "float"
            layers[name] = rec
            continue
        scale, q_codes, shift = layer_codes(name, w, 4, method, stats, cache)
        if codes is not None and name in codes:
            if codes[name].shape != q_codes.shape or np.abs(codes[name].astype(np.int32)).max() > method.spec(4).qmax:
                raise LowbitError(f"the codes given for Conv {name} do not fit its weight (shape {q_codes.shape}, "
                                  f"|code| <= {method.spec(4).qmax})", "give codes learned on a file of this scheme and method")  # fmt: skip
            q_codes = codes[name].astype(np.int8)  # the bias keeps the method's -bc shift: what they were learned with
            rec["learned_codes"] = True
        scale = scale.astype(np.float32)
        b = numpy_helper.to_array(f_inits[f_node.input[2]]).astype(np.float32) if len(f_node.input) > 2 and f_node.input[2] else np.zeros(w.shape[0], np.float32)
        if shift is not None:
            b = b - shift
            rec["bias_shift_max"] = float(np.abs(shift).max())
        q, s = q_codes.astype(ml_dtypes.int4), scale
        if integer:  # swap the recipe's INT8 codes and scales for the method's INT4 ones
            _set(g, inits, w_dq.input[0], q)
            _set(g, inits, w_dq.input[1], s)
            _set(g, inits, w_dq.input[2], np.zeros(s.shape, ml_dtypes.int4))
            b_dq = producer.get(node.input[2]) if len(node.input) > 2 else None
            if b_dq is None or b_dq.op_type != "DequantizeLinear":
                raise LowbitError(f"Conv {name} of the INT8 file has no int32 bias through DequantizeLinear",
                                  "give a recipe written by ORT's quantize_static (QDQ, per channel)")  # fmt: skip
            x_scale = float(numpy_helper.to_array(inits[x_dq.input[1]]))
            b_scale = (x_scale * s.astype(np.float64)).astype(np.float32)
            b_exact = np.round(b.astype(np.float64) / b_scale)
            if (clipped := int(np.sum((b_exact < INT32.min) | (b_exact > INT32.max)))) > 0:
                rec["bias_clipped_channels"] = clipped  # int32 cannot hold them on these scales
            b_q = np.clip(b_exact, INT32.min, INT32.max).astype(np.int32)
            _set(g, inits, b_dq.input[0], b_q)
            _set(g, inits, b_dq.input[1], b_scale)
            rec["deployed"] = "int4"
        else:  # the recipe keeps this Conv in float: 4-bit weights through DequantizeLinear (w4a16)
            base = f"{name}::int4"
            g.initializer.extend([numpy_helper.from_array(q, f"{base}::wq"), numpy_helper.from_array(s, f"{base}::ws"),
                                  numpy_helper.from_array(np.zeros(s.shape, ml_dtypes.int4), f"{base}::wz"),
                                  numpy_helper.from_array(b, f"{base}::bias")])  # fmt: skip
            extra_nodes.append((name, helper.make_node("DequantizeLinear", [f"{base}::wq", f"{base}::ws", f"{base}::wz"],
                                                       [f"{base}::w"], name=f"{base}::wdq", axis=0)))  # fmt: skip
            if w_dq is not None:
                drop.add(w_dq.name)
            node.input[1] = f"{base}::w"
            if len(node.input) > 2:
                node.input[2] = f"{base}::bias"
            else:
                node.input.append(f"{base}::bias")
            rec["deployed"] = "int4 weights, float Conv"
        err = (dequantize(q_codes.astype(np.int8), scale, None) - w).astype(np.float64)
        rec["weight_rel_error"] = float(np.sqrt(np.sum(err * err)) / max(np.sqrt(np.sum(w.astype(np.float64) ** 2)), 1e-12))
        layers[name] = rec
    before = dict(extra_nodes)
    new_nodes = []
    for n in g.node:
        if n.name in drop:
            continue
        if n.name in before:
            new_nodes.append(before[n.name])
        new_nodes.append(n)
    replace_nodes(g, new_nodes)
    _drop_unused(g)
    onnx.helper.set_model_props(out, {**{p.key: p.value for p in out.metadata_props}, LOAD_KEY: WIDEN_INT4})
    onnx.checker.check_model(out)
    total = sum(r["params"] for r in layers.values())
    four_params = sum(r["params"] for r in layers.values() if r["deployed"].startswith("int4"))
    counts: dict[str, int] = {}
    for r in layers.values():
        counts[r["deployed"]] = counts.get(r["deployed"], 0) + 1
    precisions: dict[str, int] = {}
    for p in nodes.values():
        precisions[p] = precisions.get(p, 0) + 1
    info = {"form": "integer", "method": method.record(), "method_text": method.describe, "precisions": precisions,
            "deployed": counts,
            "conv_params": total, "four_bit_params": four_params, "four_bit_share": four_params / total if total else 0.0,
            "opset": next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), "layers": layers}  # fmt: skip
    return out, info


def _set(g: onnx.GraphProto, inits: dict, name: str, array: np.ndarray) -> None:
    """Replace initializer ``name`` by ``array`` (same name; every reader of it sees the new values)."""
    new = numpy_helper.from_array(array, name)
    inits[name].CopyFrom(new)


def _drop_unused(g: onnx.GraphProto) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
