"""AdaRound: learned rounding of Conv weights (Nagel et al., 2020), layer by layer on the Conv's Hessian.

Each weight is rounded down or up, ``q = down + h`` with ``down = floor(w / s)``, where ``h`` in [0, 1] is a rectified
sigmoid of a free variable ``V`` that Adam optimises against the layer's output error
``tr(dW H dW^T)`` (``H``: the mean of ``X X^T`` over calibration positions, :mod:`.stats`; exactly the
mean squared error of the Conv's output over those positions, so no activation needs to be kept),
plus a regulariser that drives every ``h`` to 0 or 1 as its exponent anneals from 20 to 2. The
final codes take ``h >= 0.5``. Scales are fixed first (MSE-clipped, as for GPTQ), so per-channel and
blocked scales are handled alike; the ``-bc`` and ``-b<B>`` modifiers apply as to every method.

Started from GPTQ's codes instead (each weight between GPTQ's code and its neighbour towards
``w / s``) it measured no better than GPTQ on the same Conv Hessians, so only the paper's start is
registered; layer-wise learned rounding and GPTQ minimise the same layer objective, and what they
cannot see (the error of the next layers, quantized activations) is block reconstruction's to fix.

Why our own code: ``aimet-onnx`` (2.42, read before writing this) runs AdaRound through its
``QuantizationSimModel``: ``apply_adaround(sim, inputs, num_iterations)`` learns the rounding of
the weight encodings the simulation computed itself (its config's min-max scales, not our
MSE-clipped or blocked ones), layer after layer on input samples it caches, 10,000 iterations per
layer by default, and exports its own Q/DQ graph; it would also bring onnx2torch, bokeh, hvplot and
osqp into the environment. Codes learned for its scales are not codes for ours. On the Hessian the
optimisation is a few lines, and its codes land in the deployed file unchanged (tested).
"""

from __future__ import annotations

import numpy as np

from ..runtime import fixed_torch_threads
from ..weights import WeightSpec, expand_scale
from .base import FourBitMethod
from .stats import ConvStats, _rows

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's values)
ITERATIONS = 2000
LEARNING_RATE = 1e-2
# the mean regulariser's weight against the output error relative to round to nearest's. Measured on
# YOLOv10n's Convs (held-out Hessian error against GPTQ's, blocks of 32): at 0.1 and 1 the annealing
# ends with most h undecided and the final h >= 0.5 is round to nearest again (0.85-1.0 of its
# error where GPTQ reaches 0.1-0.65); at 100 the decisions are made and AdaRound lands within a few
# per cent of GPTQ, either side (1000 does no better)
REG_WEIGHT = 100.0
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed linearly ...
WARMUP = 0.2  # ... after this share of the iterations (reconstruction only before it)


def adaround_codes(w: np.ndarray, scale: np.ndarray, spec: WeightSpec, stats: ConvStats,
                   iterations: int | None = None) -> np.ndarray:  # fmt: skip
    """AdaRound integer codes of ``w`` for fixed scales (ONNX layout), same shape as ``w``.

    ``iterations``: Adam steps (default :data:`ITERATIONS`). All groups of a grouped Conv are
    optimised at once as a batch.
    """
    with fixed_torch_threads():  # the codes must not depend on torch's thread count (runtime/threads.py)
        return _adaround_codes(w, scale, spec, stats, ITERATIONS if iterations is None else iterations)


def _adaround_codes(w, scale, spec, stats, iterations) -> np.ndarray:
    import torch  # late: torch costs seconds at import, kept off the command line's start-up

    g = stats.geometry.group
    W = torch.from_numpy(_rows(np.asarray(w, np.float32), g).copy())  # [g, r, d]
    S = torch.from_numpy(_rows(expand_scale(scale, w.shape, spec.block).astype(np.float32), g).copy())
    H = torch.from_numpy(stats.hessian.astype(np.float32))  # [g, d, d]
    qmax = spec.qmax
    down = torch.floor(W / S)
    h0 = W / S - down  # the fractional part: down + h0 is w / s itself

    def error(codes):
        D = torch.clamp(codes, -qmax, qmax) * S - W
        return ((D @ H) * D).sum()

    nearest = float(error(torch.round(W / S)))
    if nearest <= 0:  # nothing to learn (all-zero input or weight)
        return torch.clamp(torch.round(W / S), -qmax, qmax).reshape(w.shape).numpy().astype(np.int8)
    p = torch.clamp((h0 - GAMMA) / (ZETA - GAMMA), 0.01, 0.99)
    V = torch.log(p / (1 - p)).requires_grad_(True)
    opt = torch.optim.Adam([V], lr=LEARNING_RATE)
    warm = int(WARMUP * iterations)
    for t in range(iterations):
        h = torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)
        loss = error(down + h) / nearest
        if t >= warm:
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - (t - warm) / max(iterations - warm, 1))
            loss = loss + REG_WEIGHT * (1 - torch.abs(2 * h - 1) ** beta).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        h = torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)
        codes = torch.clamp(down + (h >= 0.5).float(), -qmax, qmax)
    return codes.reshape(w.shape).numpy().astype(np.int8)


class AdaRound(FourBitMethod):
    """MSE-clipped scales, AdaRound from the fractional part."""

    name, clip, needs_stats = "adaround", "mse", True
    text = "MSE-clipped scale, AdaRound (learned up/down rounding)"

    def codes(self, w: np.ndarray, scale: np.ndarray, spec: WeightSpec, stats: ConvStats | None) -> np.ndarray:
        return adaround_codes(w, scale, spec, stats)

    def settings(self) -> dict:
        return {"iterations": ITERATIONS, "learning_rate": LEARNING_RATE, "reg_weight": REG_WEIGHT, "beta": list(BETA),
                "warmup": WARMUP, "zeta_gamma": [ZETA, GAMMA]}  # fmt: skip
