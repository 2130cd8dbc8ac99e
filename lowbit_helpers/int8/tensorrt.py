"""What TensorRT requires of an explicitly quantized (Q/DQ) ONNX, checked rule by rule on a file.

TensorRT's explicit quantization (its developer guide, "Working with Quantized Types") builds INT8
layers from QuantizeLinear / DequantizeLinear pairs and takes only:

* ``int8``: every quantizer is signed 8-bit (no uint8, no int32 bias behind DequantizeLinear);
* ``symmetric``: every zero point is 0;
* ``per-tensor activations``: an activation's scale is one number;
* ``per-channel weights on axis 0``: a Conv weight's scale has one value per output channel, on
  axis 0 (or is one number);
* ``opset``: 13 or more (per-channel DequantizeLinear needs the ``axis`` attribute);
* ``quantized convs``: at least one Conv reads both its input and its weights through
  DequantizeLinear (else nothing runs in INT8).

ModelOpt writes such files (weights as a QuantizeLinear of the float initializer); the ORT recipe
with ``activations: int8-symmetric`` writes them too (stored int8 weights). Our own code: neither
TensorRT (no GPU here) nor ONNX's checker states these rules for a file; tests/test_quant.py holds
both recipes' files on YOLOv10n to them, tests/test_bias_correction.py breaks each rule once.
Tensors are matched by name (node names may be empty), constants read from initializers or
``Constant`` nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..graph import node_attr

RULES = ("int8", "symmetric", "per-tensor activations", "per-channel weights on axis 0", "opset", "quantized convs")
RULES_VERSION = 1  # part of every INT8 recipe's stage key: a rule changed, the recorded verdicts are recomputed
MIN_OPSET = 13
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # ops whose input 1 is a weight (per-channel allowed)


def tensorrt_violations(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Per rule of :data:`RULES`, the quantizers (by output tensor) or facts of ``model`` that break it
    (empty: the rule holds)."""
    g = model.graph
    consts = {i.name: i for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    producer = {o: n for n in g.node for o in n.output}
    out: dict[str, list[str]] = {r: [] for r in RULES}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        out["opset"].append(f"opset {opset} < {MIN_OPSET}")

    # the tensors the Q/DQ of a weight (input 1 of WEIGHT_OPS) or of a Conv bias (input 2) produce
    weight_q, bias_q = set(), set()
    quantized = 0
    for n in g.node:
        if n.op_type not in WEIGHT_OPS or len(n.input) < 2:
            continue
        w = producer.get(n.input[1])
        if w is not None and w.op_type == "DequantizeLinear":
            weight_q.add(w.output[0])
            q = producer.get(w.input[0])
            if q is not None and q.op_type == "QuantizeLinear":  # weights quantized in the graph (ModelOpt)
                weight_q.add(q.output[0])
            if n.op_type == "Conv":
                scale = numpy_helper.to_array(consts[w.input[1]]) if w.input[1] in consts else None
                cout = _out_channels(n, consts, producer)
                if scale is not None and scale.size > 1 and (node_attr(w, "axis", 1) != 0 or (cout is not None and scale.size != cout)):
                    out["per-channel weights on axis 0"].append(w.output[0])
        if len(n.input) > 2 and (b := producer.get(n.input[2])) is not None and b.op_type == "DequantizeLinear":
            bias_q.add(b.output[0])
        x = producer.get(n.input[0])
        if n.op_type == "Conv" and x is not None and x.op_type == "DequantizeLinear" and w is not None and w.op_type == "DequantizeLinear":
            quantized += 1
    if quantized == 0:
        out["quantized convs"].append("no Conv reads both its input and its weights through DequantizeLinear")

    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        tensor = n.output[0]
        zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if zp_name is None:  # ONNX's default zero point is 0 of uint8, unless the integer type says otherwise
            if n.op_type == "QuantizeLinear":
                signed = node_attr(n, "output_dtype", 0) == TensorProto.INT8
            else:
                src = consts.get(n.input[0])
                signed = src is not None and src.data_type == TensorProto.INT8
            if not signed:
                out["int8"].append(tensor)
        elif (zp := consts.get(zp_name)) is None:
            out["symmetric"].append(f"{tensor} (zero point computed in the graph)")
        else:
            if zp.data_type != TensorProto.INT8:
                out["int8"].append(tensor)
            if np.any(numpy_helper.to_array(zp) != 0):
                out["symmetric"].append(tensor)
        if tensor in weight_q or tensor in bias_q:
            continue
        scale = consts.get(n.input[1])
        if scale is not None and numpy_helper.to_array(scale).size != 1:
            out["per-tensor activations"].append(tensor)
    return out


def tensorrt_ready(model: onnx.ModelProto) -> tuple[bool, dict[str, list[str]]]:
    """Whether TensorRT takes ``model`` (every rule holds), and the violations per rule."""
    violations = tensorrt_violations(model)
    return not any(violations.values()), violations


def _out_channels(conv, consts, producer) -> int | None:
    """A Conv's output channels from its weight: an initializer behind DequantizeLinear, or behind
    QuantizeLinear -> DequantizeLinear as ModelOpt writes it."""
    name = conv.input[1]
    for _ in range(3):
        if name in consts:
            return int(consts[name].dims[0])
        node = producer.get(name)
        if node is None:
            return None
        name = node.input[0]
    return None
