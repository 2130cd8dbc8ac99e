"""What a quantized graph holds and what ORT makes of it; fidelity of its raw head to FP32."""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from .sessions import make_session, run_head


def qdq_counts(model_path: str | Path) -> dict:
    """Q/DQ nodes, and Convs whose weight comes through a DequantizeLinear (i.e. quantized Convs); the
    names of the others (float Convs)."""
    g = onnx.load(str(model_path), load_external_data=False).graph
    ops = Counter(n.op_type for n in g.node)
    producer = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type == "Conv"]
    def weight_op(name: str) -> str:  # through a Slice (a padded blocked INT4 weight: lowbit/materialize.py)
        p = producer.get(name)
        return weight_op(p.input[0]) if p is not None and p.op_type == "Slice" else getattr(p, "op_type", "")

    quantized = [n.name for n in convs if len(n.input) > 1 and weight_op(n.input[1]) == "DequantizeLinear"]
    return {"QuantizeLinear": ops.get("QuantizeLinear", 0), "DequantizeLinear": ops.get("DequantizeLinear", 0),
            "Conv": len(convs), "quantized_convs": len(quantized), "float_convs": len(convs) - len(quantized),
            "float_conv_names": sorted(n.name for n in convs if n.name not in set(quantized))}  # fmt: skip


def ort_executed_ops(model_path: str | Path, threads: int = 2) -> dict:
    """Operator counts of the graph ORT actually runs on CPU (after its Q/DQ fusions)."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        make_session(model_path, ["CPUExecutionProvider"], threads, optimized_path=opt)
        ops = Counter(n.op_type for n in onnx.load(str(opt), load_external_data=False).graph.node)
    float_conv = ops.get("Conv", 0) + ops.get("FusedConv", 0)
    return {"QLinearConv": ops.get("QLinearConv", 0), "float_Conv": float_conv,
            "QuantizeLinear": ops.get("QuantizeLinear", 0), "DequantizeLinear": ops.get("DequantizeLinear", 0),
            "ops": dict(ops.most_common())}  # fmt: skip


def sqnr_from_sums(signal: float, noise: float) -> float:
    """10 log10(signal / noise): the project's one SQNR (``inf`` without noise)."""
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10 * math.log10(signal / noise))


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(signal power / error power) over all elements."""
    ref = reference.astype(np.float64)
    return sqnr_from_sums(float(np.sum(ref**2)), float(np.sum((ref - test.astype(np.float64)) ** 2)))


def cosine(reference: np.ndarray, test: np.ndarray) -> float:
    # numpy's own (pairwise, one-thread) sums, not BLAS's dot: BLAS splits the sum per thread, and
    # its thread count follows OMP_NUM_THREADS (runtime/threads.py), so the last digits would too
    a, b = reference.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def head_fidelity(fp32_session, test_session, images: list[np.ndarray]) -> dict:
    """SQNR and cosine of the raw head against FP32, over ``images`` (1x3x640x640 tensors).

    Reported for the whole output and for its two parts: DFL box logits (0-63) and class
    logits (64-143).
    """
    return fidelity(raw_heads(fp32_session, images), raw_heads(test_session, images))


def raw_heads(session, images: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([run_head(session, x) for x in images])


def fidelity(ref: np.ndarray, out: np.ndarray) -> dict:
    """SQNR and cosine of raw heads ``out`` against ``ref`` (whole output, DFL part, class part)."""
    images = ref.shape[0]
    return {
        "images": images,
        "sqnr_db": sqnr_db(ref, out), "cosine": cosine(ref, out),
        "sqnr_db_dfl": sqnr_db(ref[:, :64], out[:, :64]), "sqnr_db_cls": sqnr_db(ref[:, 64:], out[:, 64:]),
    }  # fmt: skip
