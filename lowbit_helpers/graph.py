"""What an ONNX graph holds: I/O, parameter count, MACs, operator counts.

MACs are counted from the graph itself (shape inference, then per Conv / MatMul / Gemm), so
they describe exactly what deploys, whatever produced the file. No installed library counts
MACs of an ONNX graph (thop and Ultralytics count torch modules), hence this small counter.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx


def _shape(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def _dtype(vi) -> str:
    return onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()


def graph_info(path: str | Path) -> dict:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    shapes = {vi.name: _shape(vi) for vi in list(g.value_info) + list(g.input) + list(g.output)}
    for name, init in inits.items():
        shapes[name] = list(init.dims)

    macs_by_op: Counter = Counter()
    conv_macs = {}
    for node in g.node:
        if node.op_type == "Conv":
            w = shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if w and out and all(isinstance(d, int) for d in out):
                # w: [Cout, Cin/group, kh, kw]; every output element costs Cin/group * kh * kw MACs
                m = int(np.prod(out)) * int(np.prod(w[1:]))
                conv_macs[node.name] = m
                macs_by_op["Conv"] += m
        elif node.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if a and b and out and all(isinstance(d, int) for d in out):
                k = a[-1] if not (node.op_type == "Gemm" and node_attr(node, "transA", 0)) else a[-2]
                macs_by_op[node.op_type] += int(np.prod(out)) * int(k)

    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    params = sum(int(np.prod(i.dims)) for i in g.initializer if i.data_type in float_types)
    return {
        "inputs": [{"name": i.name, "shape": _shape(i), "dtype": _dtype(i)} for i in g.input if i.name not in inits],
        "outputs": [{"name": o.name, "shape": _shape(o), "dtype": _dtype(o)} for o in g.output],
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "parameters": params,
        "macs": int(sum(macs_by_op.values())),
        "macs_by_op": dict(macs_by_op),
        "conv_macs": conv_macs,
        "op_counts": dict(Counter(n.op_type for n in g.node).most_common()),
        "file_bytes": Path(path).stat().st_size,
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


def node_attr(node: onnx.NodeProto, name: str, default=None):
    """The value of a node's attribute ``name`` (any type), or ``default`` where the node has none."""
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
