"""ORT's deployed INT8 placement as per-Conv fake quantization (the sweep's ``w8a8-ort`` format).

``quantize_static`` (QDQ, every op it knows) puts far more quantizers in the graph than each
Conv's input and weights: every Conv output (before SiLU), the Sigmoid and Mul of SiLU, Concat,
Add, Resize, MaxPool, Split, the attention's MatMul / Softmax, constants and the graph output.
A per-layer sensitivity that ranks ORT recipes must perturb with *those* quantizers.

:class:`DeployedQdq` reads a file ``quantize_static`` wrote (:func:`lowbit_helpers.int8.ort.quantize_int8_ort`,
same ranges) and lists its quantized *edges*, each (consumer node, input index) of the float
graph that reads a dequantized value: an activation (QuantizeLinear -> DequantizeLinear on the
tensor, with the file's scale and zero point) or a constant (weights, bias, other constants:
replaced by their dequantized values, which is what the DequantizeLinear computes). Each Conv
*owns* the edges into it (input, weight, bias) and the edges in its output region (the
non-Conv nodes its output reaches before the next Conv: pre-activation output, Sigmoid, Mul,
Concat, ...). Quantizing a set of Convs applies every edge one of them owns, so

* all Convs = the deployed file itself (the test holds the raw head to it within float noise);
* *alone* L = L's input, weights, bias and its output region;
* *kept* L = every edge another Conv owns: L and its activation run in float between a
  quantized input and the next block's quantized input.

No library maps a finished Q/DQ file back onto per-node perturbations of its float graph, hence
this module.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..formats import replace_nodes
from ..int8.ort import quantize_int8_ort

OUTPUT = "__graph_output__"  # consumer name of an edge into the graph's output


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    """DequantizeLinear in float32, as ORT computes it: (q - zero) * scale, per ``axis`` when scale is a vector."""
    shape = [1] * q.ndim
    if scale.ndim:
        shape[axis] = -1
    z = zero.astype(np.int64).reshape(shape) if zero is not None else 0
    return ((q.astype(np.int64) - z).astype(np.float32) * scale.astype(np.float32).reshape(shape)).astype(np.float32)


class DeployedQdq:
    """The quantized edges of an ORT QDQ file and the Convs that own them."""

    def __init__(self, fp32: onnx.ModelProto, qdq: onnx.ModelProto):
        g = qdq.graph
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        producer = {o: n for n in g.node for o in n.output}
        self.act: dict[tuple[str, int], tuple[str, np.ndarray, np.ndarray]] = {}  # edge -> (tensor, scale, zero)
        self.const: dict[tuple[str, int], np.ndarray] = {}  # edge -> dequantized value

        def read(dq: onnx.NodeProto, edge: tuple[str, int]) -> None:
            src = dq.input[0]
            scale = inits[dq.input[1]]
            zero = inits[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else None
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            if src in inits:
                self.const[edge] = _dequantize(inits[src], scale, zero, axis)
                return
            q = producer[src]
            if q.op_type != "QuantizeLinear":
                raise ValueError(f"{dq.name} dequantizes {src}, which no QuantizeLinear produces")
            tensor = q.input[0].removesuffix("_QuantizeLinear_Input")
            self.act[edge] = (tensor, np.asarray(inits[q.input[1]]), np.asarray(inits[q.input[2]]))

        originals = {n.name for n in fp32.graph.node}
        for n in g.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            if n.name not in originals:
                raise ValueError(f"node {n.name!r} of the Q/DQ file is not in the float graph: not a file of this model")
            for i, x in enumerate(n.input):
                d = producer.get(x)
                if d is not None and d.op_type == "DequantizeLinear":
                    read(d, (n.name, i))
        for i, o in enumerate(g.output):
            d = producer.get(o.name)
            if d is not None and d.op_type == "DequantizeLinear":
                read(d, (OUTPUT, i))
        self.owned = self._owners(fp32)

    def edges(self) -> set[tuple[str, int]]:
        return set(self.act) | set(self.const)

    def _owners(self, fp32: onnx.ModelProto) -> dict[str, set[tuple[str, int]]]:
        g = fp32.graph
        by_name = {n.name: n for n in g.node}
        producer = {o: n.name for n in g.node for o in n.output}
        consumers: dict[str, list[str]] = {}
        for n in g.node:
            for x in n.input:
                consumers.setdefault(x, []).append(n.name)
        convs = [n.name for n in g.node if n.op_type == "Conv"]
        region_of: dict[str, set[str]] = {}  # non-Conv node -> Convs whose output region holds it
        for c in convs:
            stack, seen = [c], {c}
            while stack:
                for o in by_name[stack.pop()].output:
                    for m in consumers.get(o, []):
                        if m not in seen and by_name[m].op_type != "Conv":
                            seen.add(m)
                            region_of.setdefault(m, set()).add(c)
                            stack.append(m)
        outputs = [o.name for o in g.output]
        owned: dict[str, set[tuple[str, int]]] = {c: set() for c in convs}
        unowned = []
        for edge in sorted(self.edges()):
            node, i = edge
            owners = set()
            if node != OUTPUT and by_name[node].op_type == "Conv":
                owners.add(node)
            if edge in self.act:
                src = producer.get(self.act[edge][0])
            else:
                src = node if node != OUTPUT else None
            if node == OUTPUT:
                src = producer.get(outputs[i])
            if src is not None:
                owners |= {src} if by_name[src].op_type == "Conv" and edge in self.act else region_of.get(src, set())
            if not owners:
                unowned.append(edge)
            for c in owners:
                owned[c].add(edge)
        if unowned and convs:  # quantizers upstream of every Conv (none in YOLOv10): the first Conv's
            owned[convs[0]].update(unowned)
        return owned

    def apply(self, model: onnx.ModelProto, convs) -> onnx.ModelProto:
        """Copy of ``model`` (the float graph or a sub-graph of it) with every edge the named Convs
        own quantized as in the deployed file; names absent from ``model`` are ignored."""
        edges = set().union(*(self.owned.get(c, set()) for c in convs)) if convs else set()
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        present = {n.name for n in g.node}
        edges = {e for e in edges if e[0] in present or e[0] == OUTPUT}
        new_nodes: list = []
        made: dict[tuple, str] = {}  # (tensor, scale, zero) -> dequantized tensor name (one Q/DQ per tensor, as ORT)

        def qdq(tensor: str, scale: np.ndarray, zero: np.ndarray) -> str:
            key = (tensor, scale.tobytes(), zero.tobytes())
            if key not in made:
                base = f"{tensor}::ort"
                g.initializer.extend([numpy_helper.from_array(scale, f"{base}::s"), numpy_helper.from_array(zero, f"{base}::z")])
                new_nodes.append(helper.make_node("QuantizeLinear", [tensor, f"{base}::s", f"{base}::z"], [f"{base}::q"], name=f"{base}::Q"))
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}::q", f"{base}::s", f"{base}::z"], [f"{base}::dq"],
                                                  name=f"{base}::DQ"))  # fmt: skip
                made[key] = f"{base}::dq"
            return made[key]

        for n in g.node:
            for i in range(len(n.input)):
                edge = (n.name, i)
                if edge not in edges:
                    continue
                if edge in self.const:
                    name = f"{n.name}::ort::in{i}"
                    g.initializer.append(numpy_helper.from_array(self.const[edge], name))
                    n.input[i] = name
                else:
                    n.input[i] = qdq(*self.act[edge])
            new_nodes.append(n)
        for i, o in enumerate(g.output):
            if (OUTPUT, i) in edges:
                tensor, scale, zero = self.act[OUTPUT, i]
                pre = f"{o.name}::ort::pre"
                for n in new_nodes:
                    n.output[:] = [pre if x == o.name else x for x in n.output]
                    n.input[:] = [pre if x == o.name else x for x in n.input]
                dq = qdq(pre, scale, zero)
                new_nodes.append(helper.make_node("Identity", [dq], [o.name], name=f"{o.name}::ort::out"))

        replace_nodes(g, new_nodes)
        return out


class DeployedPerturber:
    """The sweep's perturber for ``w8a8-ort``: :class:`DeployedQdq` of the file ORT writes for this
    model with ``ranges_images`` (avgminmax ranges, every Conv quantized: head policy ``none``)."""

    name = "w8a8-ort"
    # ORT's blocked-layout float Conv (NCHWc) sums in another order than the plain Conv of the
    # Q/DQ file: a last-bit difference flips requantized values downstream. Without it the
    # all-Convs perturbation equals the deployed file's exact Q/DQ arithmetic bit for bit.
    disabled_optimizers = ("NchwcTransformer",)

    def __init__(self, model_path, range_images: np.ndarray):
        with tempfile.TemporaryDirectory(prefix="lowbit.w8a8-ort.") as tmp:
            out = Path(tmp) / "qdq.onnx"
            self.recipe = quantize_int8_ort(model_path, out, range_images, "avgminmax", head_policy="none")
            self.qdq = DeployedQdq(onnx.load(str(model_path)), onnx.load(str(out)))

    def __call__(self, model: onnx.ModelProto, convs) -> onnx.ModelProto:
        return self.qdq.apply(model, convs)
