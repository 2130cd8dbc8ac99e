"""Fast bias correction of an INT8 Q/DQ ONNX: every quantized Conv's bias absorbs the mean shift
that quantizing its input and weights puts on its output.

For each Conv whose input and weights come through DequantizeLinear, on calibration images:
``shift[c] = mean_{n,h,w}( conv(x, W)[c] - conv(DQ(Q(x)), DQ(Q(W)))[c] )``, with ``x`` the FP32
model's input of that Conv and Q / DQ exactly as the file defines them (its scales, zero points,
int8 / uint8 limits); the bias becomes ``b + shift``. This is the per-layer ("fast") variant of
the bias correction NNCF applies inside its own pipeline (Nagel et al., 2019, empirical form);
neither ORT's ``quantize_static`` nor ModelOpt offers it for a finished Q/DQ file, so it is
written here. The Q/DQ placement is not touched: an int32 bias behind a DequantizeLinear (ORT)
is re-rounded on its own scale, a float bias (ModelOpt) is shifted in place.

Measured on YOLOv10n, 16 val100 images, exact Q/DQ arithmetic, raw-head SQNR (32 images of
statistics): ORT's full placement 26.0 -> 28.4 dB; Q/DQ on Conv inputs only 29.3 -> 34.6 dB
(NNCF MIXED with its full bias correction: 32.1 dB).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..artifacts import atomic_path, read_json, sha256_file, write_json
from ..errors import LowbitError
from ..graph import node_attr
from ..runtime import Activations

BC_IMAGES = 32  # calibration images [0, N) for the statistics (the same images as the ranges' first N)
BC_VERSION = 1  # part of the stage key of every recipe corrected here


def _zero_point(node, inits, arr) -> np.ndarray:
    """A Q / DQ node's zero point; absent, ONNX's default: uint8 0 (``output_dtype`` aside, unused here)."""
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in inits:
            raise LowbitError(f"{node.name}: its zero point is computed in the graph", "bias correction needs constant zero points")
        return arr(node.input[2])
    return np.zeros((), np.uint8)


def _quantized_convs(graph, fp32_weights: dict[str, np.ndarray]) -> tuple[list[dict], list[str]]:
    """Every Conv fed by DequantizeLinear on input and weights, with what correcting it needs;
    and the names of those left alone (no bias to shift)."""

    inits = {i.name: i for i in graph.initializer}
    prod = {o: n for n in graph.node for o in n.output}

    def arr(name):
        return numpy_helper.to_array(inits[name])

    def unsupported(n, what):
        return LowbitError(f"bias correction: Conv {n.name!r}: {what}",
                           "apply it to a Q/DQ ONNX written by quantize-int8 (ort or modelopt)")  # fmt: skip

    jobs, no_bias = [], []
    for n in graph.node:
        if n.op_type != "Conv":
            continue
        dq_x, dq_w = prod.get(n.input[0]), prod.get(n.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue  # a float Conv
        q_x = prod.get(dq_x.input[0])
        if q_x is None or q_x.op_type != "QuantizeLinear":
            continue  # a constant input: nothing to correct
        if len(n.input) < 3 or not n.input[2]:
            no_bias.append(n.name)
            continue
        if n.input[2] in inits:
            bias_dq = None  # a float bias (ModelOpt)
        else:
            bias_dq = prod.get(n.input[2])
            if bias_dq is None or bias_dq.op_type != "DequantizeLinear" or not all(i in inits for i in bias_dq.input[:2]):
                raise unsupported(n, "its bias is neither an initializer nor a DequantizeLinear of one")
        if node_attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise unsupported(n, f"auto_pad {node_attr(n, 'auto_pad', '')!r} (explicit pads only)")
        pads = node_attr(n, "pads", [0, 0, 0, 0])
        if len(pads) != 4 or pads[:2] != pads[2:]:
            raise unsupported(n, f"padding {pads} (2-D Convs with symmetric padding only)")
        x_zp = _zero_point(dq_x, inits, arr)
        if x_zp.size != 1:
            raise unsupported(n, "per-channel activation quantization")
        scale = arr(dq_w.input[1]).astype(np.float32)
        if scale.size > 1:
            if node_attr(dq_w, "axis", 1) != 0:
                raise unsupported(n, f"per-channel weight scales on axis {node_attr(dq_w, 'axis', 1)} (axis 0 expected)")
            scale = scale.reshape(-1, 1, 1, 1)
        if dq_w.input[0] in inits:  # stored integer weights (ORT, NNCF)
            w_zp, w_float = _zero_point(dq_w, inits, arr), None
        else:  # weights quantized in the graph (ModelOpt): QuantizeLinear on the float initializer
            q_w = prod.get(dq_w.input[0])
            if q_w is None or q_w.op_type != "QuantizeLinear" or q_w.input[0] not in inits:
                raise unsupported(n, "its weights are neither stored integers nor a QuantizeLinear of a float initializer")
            w_zp, w_float = _zero_point(q_w, inits, arr), arr(q_w.input[0])
            fp32_weights.setdefault(n.name, w_float)
        zp = w_zp.astype(np.float32).reshape(scale.shape if w_zp.size > 1 else ())
        if w_float is None:
            w_int = arr(dq_w.input[0]).astype(np.float32)
        else:
            lim = np.iinfo(w_zp.dtype)
            w_int = np.clip(np.rint(w_float / scale) + zp, lim.min, lim.max)
        if n.name not in fp32_weights:
            raise LowbitError(f"bias correction: the FP32 model has no Conv named {n.name!r}",
                              "pass the FP32 model this Q/DQ file was quantized from")  # fmt: skip
        info = np.iinfo(x_zp.dtype)
        jobs.append({
            "node": n.name, "x": q_x.input[0], "x_scale": float(arr(dq_x.input[1])), "x_zp": float(x_zp),
            "x_limits": (float(info.min), float(info.max)), "w_q": (w_int - zp) * scale,
            "bias": n.input[2], "bias_dq": bias_dq,
            "conv": {"stride": node_attr(n, "strides", [1, 1]), "padding": tuple(pads[:2]),
                     "dilation": node_attr(n, "dilations", [1, 1]), "groups": node_attr(n, "group", 1)},
        })  # fmt: skip
    return jobs, no_bias


def bias_shifts(qdq_model, fp32_path: str | Path, images: np.ndarray,
                threads: int = 2) -> tuple[list[dict], dict[str, np.ndarray], list[str]]:  # fmt: skip
    """Per quantized Conv of ``qdq_model`` (an onnx.ModelProto), the mean output shift over
    ``images``; and the quantized Convs without a bias (left alone)."""
    import torch  # late: torch costs seconds at import, kept off the command line's start-up

    fp32 = onnx.load(str(fp32_path))
    finit = {i.name: i for i in fp32.graph.initializer}
    fp32_weights = {n.name: numpy_helper.to_array(finit[n.input[1]]) for n in fp32.graph.node
                    if n.op_type == "Conv" and n.input[1] in finit}  # fmt: skip
    jobs, no_bias = _quantized_convs(qdq_model.graph, fp32_weights)
    if not jobs:
        raise LowbitError("bias correction: no Conv with Q/DQ on its input and weights in this model",
                          "apply it to an INT8 Q/DQ ONNX written by quantize-int8")  # fmt: skip
    names = sorted({j["x"] for j in jobs})
    tensors = {i.name for i in fp32.graph.input} | {o for n in fp32.graph.node for o in n.output}
    missing = [x for x in names if x not in tensors]
    if missing:
        raise LowbitError(f"bias correction: the FP32 model has no tensor named {missing[0]!r} (a quantized Conv input; "
                          f"{len(missing)} such)", "pass the FP32 model this Q/DQ file was quantized from")  # fmt: skip
    acts = Activations(fp32, names, threads)
    w_f = {j["node"]: torch.from_numpy(np.array(fp32_weights[j["node"]], np.float32)) for j in jobs}
    w_q = {j["node"]: torch.from_numpy(np.array(j["w_q"], np.float32)) for j in jobs}
    sums = {j["node"]: np.zeros(w_q[j["node"]].shape[0]) for j in jobs}
    conv2d = torch.nn.functional.conv2d
    with torch.inference_mode():
        for img in images:  # one image at a time: memory stays one forward pass of activations
            values = acts.of(img)
            for j in jobs:
                x = torch.from_numpy(values[j["x"]])
                lo, hi = j["x_limits"]
                xq = (torch.clamp(torch.round(x / j["x_scale"]) + j["x_zp"], lo, hi) - j["x_zp"]) * j["x_scale"]
                diff = conv2d(x, w_f[j["node"]], **j["conv"]) - conv2d(xq, w_q[j["node"]], **j["conv"])
                sums[j["node"]] += diff.mean(dim=(0, 2, 3)).double().numpy()
    shifts = {k: v / len(images) for k, v in sums.items()}
    bad = [k for k, v in shifts.items() if not np.all(np.isfinite(v))]
    if bad:
        raise LowbitError(f"bias correction: non-finite output shift at {bad[0]!r} ({len(bad)} Convs)",
                          "check the calibration images and the FP32 model for NaN / Inf activations")  # fmt: skip
    return jobs, shifts, no_bias


def correct_biases(qdq_path: str | Path, fp32_path: str | Path, images: np.ndarray, out: str | Path | None = None) -> dict:
    """Write ``qdq_path`` (or ``out``) with every quantized Conv's bias corrected; returns a summary."""

    if len(images) == 0:
        raise LowbitError("bias correction needs calibration images", "pass at least one calibration image")
    out = Path(out or qdq_path)
    model = onnx.load(str(qdq_path))
    jobs, shifts, no_bias = bias_shifts(model, fp32_path, images)
    inits = {i.name: i for i in model.graph.initializer}
    for j in jobs:
        shift = shifts[j["node"]]
        if j["bias_dq"] is None:  # a float bias
            b = numpy_helper.to_array(inits[j["bias"]])
            inits[j["bias"]].CopyFrom(numpy_helper.from_array((b + shift).astype(b.dtype), j["bias"]))
        else:  # an int32 bias behind DequantizeLinear: re-round on its own scale
            dq = j["bias_dq"]
            bq, bs = numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
            new = np.clip(np.rint(bq + shift / bs), np.iinfo(bq.dtype).min, np.iinfo(bq.dtype).max).astype(bq.dtype)
            inits[dq.input[0]].CopyFrom(numpy_helper.from_array(new, dq.input[0]))
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    rel = [float(np.abs(s).max()) for s in shifts.values()]
    return {"method": "fast", "images": int(len(images)), "convs": len(jobs), "convs_without_bias": no_bias,
            "max_abs_shift": max(rel), "median_max_abs_shift": float(np.median(rel))}


def correct_recipe_file(model_out: str | Path, fp32_path: str | Path, calib: np.ndarray, images: int = BC_IMAGES) -> dict:
    """Bias-correct a backend's output in place and record it in its ``.recipe.json``."""
    t0 = time.perf_counter()
    summary = correct_biases(model_out, fp32_path, calib[:images])
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    recipe_path = Path(model_out).with_suffix(".recipe.json")
    recipe = read_json(recipe_path)
    recipe.update(bias_correction=summary, output_sha256=sha256_file(model_out))
    write_json(recipe_path, recipe)
    return recipe
