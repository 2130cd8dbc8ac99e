"""GPTQ rounding of Conv weights (Frantar et al., 2022), written against the deployed ONNX graph.

GPTQ quantizes the columns of ``W_j`` one at a time and moves each column's rounding error onto
the columns not yet quantized, weighted by the inverse of ``H_j`` (:mod:`.stats`), which
minimises ``||W_j X_j - Q_j X_j||^2`` far better than rounding to nearest. Scales are fixed
before rounding (MSE-clipped, :mod:`.mse`), so per-channel and blocked scales are handled alike
and act-order (largest ``diag(H)`` first) is free to permute columns.

Why our own code: the libraries that implement GPTQ / AdaRound (Brevitas, AIMET, AutoGPTQ,
llm-compressor) work on torch ``nn.Linear`` modules or on their own graph formats, not on an
ONNX Conv graph whose deployed form is ``DequantizeLinear`` with int4 codes; and their codes
cannot be handed to ORT's ``quantize_static``, which re-derives weights from floats. The
algorithm is short; here it is written against the ONNX graph that is deployed.
"""

from __future__ import annotations

import numpy as np

from ..runtime import fixed_torch_threads
from ..weights import WeightSpec, expand_scale
from .base import FourBitMethod
from .stats import ConvStats, _rows


def gptq_codes(w: np.ndarray, scale: np.ndarray, spec: WeightSpec, stats: ConvStats, damp: float = 0.01,
               act_order: bool = True, block_cols: int = 128) -> np.ndarray:  # fmt: skip
    """GPTQ integer codes of ``w`` for fixed scales (ONNX layout), same shape as ``w``.

    All groups of a grouped (e.g. depthwise) Conv are solved at once as a batch.
    """
    with fixed_torch_threads():  # the codes must not depend on torch's thread count (runtime/threads.py)
        return _gptq_codes(w, scale, spec, stats, damp, act_order, block_cols)


def _gptq_codes(w, scale, spec, stats, damp, act_order, block_cols) -> np.ndarray:
    import torch  # late: torch costs seconds at import, kept off the command line's start-up

    g = stats.geometry.group
    W = torch.from_numpy(_rows(np.asarray(w, np.float32), g).astype(np.float64))  # [g, r, d]
    S = torch.from_numpy(_rows(expand_scale(scale, w.shape, spec.block), g).astype(np.float64))
    H = torch.from_numpy(stats.hessian).clone()  # [g, d, d]
    d = H.shape[-1]
    diag = torch.diagonal(H, dim1=1, dim2=2)
    dead = diag == 0
    H = H + torch.diag_embed(dead.double())  # a dead input (always 0) gets H = 1 and weight 0
    W[dead[:, None, :].expand_as(W)] = 0.0
    diag = torch.diagonal(H, dim1=1, dim2=2)
    perm = torch.argsort(diag, dim=1, descending=True) if act_order else torch.arange(d).expand(g, d)
    W, S = torch.gather(W, 2, perm[:, None, :].expand_as(W)), torch.gather(S, 2, perm[:, None, :].expand_as(S))
    H = torch.gather(torch.gather(H, 1, perm[:, :, None].expand_as(H)), 2, perm[:, None, :].expand_as(H))
    H = H + torch.diag_embed(damp * diag.mean(dim=1, keepdim=True).expand(g, d))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    qmax = spec.qmax
    for i1 in range(0, d, block_cols):
        i2 = min(i1 + block_cols, d)
        W1, S1, U1 = W[:, :, i1:i2].clone(), S[:, :, i1:i2], U[:, i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, :, i]
            q = torch.clamp(torch.round(col / S1[:, :, i]), -qmax, qmax)
            Q[:, :, i1 + i] = q
            err = (col - q * S1[:, :, i]) / U1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * U1[:, i, i:][:, None, :]
            E1[:, :, i] = err
        W[:, :, i2:] -= E1 @ U[:, i1:i2, i2:]
    Q = torch.gather(Q, 2, torch.argsort(perm, dim=1)[:, None, :].expand_as(Q))
    return Q.reshape(w.shape).numpy().astype(np.int8)


class Gptq(FourBitMethod):
    """MSE-clipped scales, GPTQ rounding."""

    name, clip, needs_stats = "gptq", "mse", True
    text = "MSE-clipped scale, GPTQ rounding"

    def codes(self, w: np.ndarray, scale: np.ndarray, spec: WeightSpec, stats: ConvStats | None) -> np.ndarray:
        return gptq_codes(w, scale, spec, stats)
