"""What TensorRT requires of an explicitly quantized (Q/DQ) ONNX, checked rule by rule on a file.

TensorRT's explicit quantization (its developer guide, "Working with Quantized Types") builds INT8
layers from QuantizeLinear / DequantizeLinear pairs and takes only:

* ``int8``: every quantizer is signed 8-bit (no uint8);
* ``symmetric``: every zero point is 0;
* ``per-tensor activations``: an activation's scale is one number;
* ``per-channel weights on axis 0``: a Conv weight's scale has one value per output channel, on
  axis 0 (or is one number);
* ``opset``: 13 or more (per-channel DequantizeLinear needs the ``axis`` attribute);
* ``quantized convs``: at least one Conv reads both its input and its weights through
  DequantizeLinear (else nothing runs in INT8).

ModelOpt writes such files (weights as a QuantizeLinear of the float initializer); the ORT recipe
with ``activations: int8-symmetric`` writes them too (stored int8 weights). Our own code: neither
TensorRT (no GPU here) nor ONNX's checker states these rules for a file; ``tests/test_cpu_int8.py``
holds both recipes' files to them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

RULES = ("int8", "symmetric", "per-tensor activations", "per-channel weights on axis 0", "opset", "quantized convs")
MIN_OPSET = 13


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def tensorrt_violations(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Per rule of :data:`RULES`, the nodes (or facts) of ``model`` that break it (empty: the rule holds)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out: dict[str, list[str]] = {r: [] for r in RULES}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        out["opset"].append(f"opset {opset} < {MIN_OPSET}")

    weight_dq = set()
    quantized = 0
    for n in g.node:
        if n.op_type != "Conv":
            continue
        x, w = producer.get(n.input[0]), producer.get(n.input[1])
        if w is not None and w.op_type == "DequantizeLinear":
            weight_dq.add(w.name)
            scale = numpy_helper.to_array(inits[w.input[1]]) if w.input[1] in inits else None
            cout = _conv_out_channels(n, inits, producer)
            if scale is not None and scale.size > 1 and (_attr(w, "axis", 1) != 0 or scale.size != cout):
                out["per-channel weights on axis 0"].append(n.name)
        if x is not None and x.op_type == "DequantizeLinear" and w is not None and w.op_type == "DequantizeLinear":
            quantized += 1
    if quantized == 0:
        out["quantized convs"].append("no Conv reads both its input and its weights through DequantizeLinear")

    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if zp_name is None:  # ONNX's default zero point: uint8 0 (unless output_dtype says otherwise)
            if _attr(n, "output_dtype", 0) not in (TensorProto.INT8,) and n.op_type == "QuantizeLinear":
                out["int8"].append(n.name)
            continue
        zp = inits.get(zp_name)
        if zp is None:
            out["symmetric"].append(f"{n.name} (zero point computed in the graph)")
            continue
        if zp.data_type != TensorProto.INT8:
            out["int8"].append(n.name)
        if np.any(numpy_helper.to_array(zp) != 0):
            out["symmetric"].append(n.name)
        is_weight = n.name in weight_dq or (n.op_type == "QuantizeLinear" and any(
            c.name in weight_dq for c in g.node if n.output[0] in c.input))  # fmt: skip
        if not is_weight and n.input[1] in inits and numpy_helper.to_array(inits[n.input[1]]).size != 1:
            out["per-tensor activations"].append(n.name)
    return out


def tensorrt_ready(model: onnx.ModelProto) -> bool:
    return not any(tensorrt_violations(model).values())


def _conv_out_channels(conv, inits, producer) -> int | None:
    """A Conv's output channels from its weight (an initializer behind DequantizeLinear, or behind
    QuantizeLinear -> DequantizeLinear as ModelOpt writes it)."""
    name = conv.input[1]
    for _ in range(3):
        if name in inits:
            return int(inits[name].dims[0])
        node = producer.get(name)
        if node is None:
            return None
        name = node.input[0]
    return None
