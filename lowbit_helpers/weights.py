"""The reference weight quantizer: symmetric integer codes and scales for a Conv weight.

One definition serves the sweep, the PTQ methods and the materialised ONNX, so the model that
is deployed computes exactly what was scored. A Conv weight ``w`` has shape
``[Cout, Cin/g, kh, kw]``; its scales have one of two granularities, both of which ONNX's
``DequantizeLinear`` expresses directly:

* per output channel (``block=None``): scale shape ``[Cout]``, ``DequantizeLinear(axis=0)``;
* blocked along the input channels (``block=B``, opset 21): scale shape
  ``[Cout, ceil(Cin/B), kh, kw]``, ``DequantizeLinear(axis=1, block_size=B)``: each scale
  covers B input channels at one kernel position, ``w[o, i, y, x] ~ q[o, i, y, x] * s[o, i // B, y, x]``.

Codes are symmetric with the narrow range (int8 -127..127, int4 -7..7) and zero point 0; the
scale of a group is ``clip * max|w| / qmax`` where ``clip`` is 1 (max-abs) or the ratio that
minimises the group's squared rounding error (``clip="mse"``, searched on a grid). Dequantised
values are computed as ``float32(q) * scale`` in float32: bit for bit what ORT's
``DequantizeLinear`` computes (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIP_GRID = np.linspace(0.5, 1.0, 26, dtype=np.float32)  # ratios of max|w| tried by clip="mse"


@dataclass(frozen=True)
class WeightSpec:
    """How a weight is quantized: bit width, scale granularity and clipping rule."""

    bits: int = 4
    block: int | None = None  # None: one scale per output channel; B: blocks of B input channels
    clip: str = "maxabs"  # maxabs | mse

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def granularity(self) -> str:
        return "per-channel" if self.block is None else f"block{self.block}"


def _groups(w: np.ndarray, block: int | None) -> np.ndarray:
    """View of ``w`` as [n_groups, group_size] rows, zero-padded (for the scale search only)."""
    co, ci = w.shape[:2]
    if block is None:
        return w.reshape(co, -1)
    nb = -(-ci // block)
    t = np.zeros((co, nb * block, *w.shape[2:]), np.float32)
    t[:, :ci] = w
    # [Co, nb, B, kh, kw] -> [Co, nb, kh, kw, B]: one row per (o, block, y, x)
    t = t.reshape(co, nb, block, *w.shape[2:]).transpose(0, 1, 3, 4, 2)
    return t.reshape(-1, block)


def scale_shape(w_shape: tuple, block: int | None) -> tuple:
    co, ci = w_shape[:2]
    return (co,) if block is None else (co, -(-ci // block), *w_shape[2:])


def expand_scale(scale: np.ndarray, w_shape: tuple, block: int | None) -> np.ndarray:
    """The scale of every weight element, shape ``w_shape`` (ONNX's blocked broadcasting)."""
    if block is None:
        return scale.reshape(-1, *([1] * (len(w_shape) - 1))) * np.ones(w_shape, np.float32)
    return np.repeat(scale, block, axis=1)[:, : w_shape[1]]


def compute_scale(w: np.ndarray, spec: WeightSpec, importance: np.ndarray | None = None) -> np.ndarray:
    """Scales (ONNX layout) of ``w`` under ``spec``.

    ``clip="mse"`` picks, per group, the ratio of ``CLIP_GRID`` that minimises the squared
    rounding error of the group's weights, each weighted by ``importance`` when given (same
    shape as ``w``, e.g. the mean square of the input each weight multiplies).
    """
    w = np.asarray(w, np.float32)
    rows = _groups(w, spec.block)
    amax = np.abs(rows).max(axis=1)
    amax = np.where(amax == 0, 1.0, amax).astype(np.float32)
    if spec.clip == "maxabs":
        best = amax / spec.qmax
    elif spec.clip == "mse":
        imp = np.ones_like(rows) if importance is None else _groups(np.asarray(importance, np.float32), spec.block)
        best, best_err = amax / spec.qmax, np.full(len(rows), np.inf, np.float32)
        for r in CLIP_GRID:
            s = (r * amax / spec.qmax).astype(np.float32)
            q = np.clip(np.round(rows / s[:, None]), -spec.qmax, spec.qmax)
            err = ((q * s[:, None] - rows) ** 2 * imp).sum(axis=1)
            better = err < best_err
            best, best_err = np.where(better, s, best), np.where(better, err, best_err)
    else:
        raise ValueError(f"unknown clip rule {spec.clip!r} (maxabs | mse)")
    return best.astype(np.float32).reshape(scale_shape(w.shape, spec.block))


def quantize_codes(w: np.ndarray, scale: np.ndarray, spec: WeightSpec) -> np.ndarray:
    """Integer codes (int8 array holding values in [-qmax, qmax]) of ``w`` for the given scales."""
    s = expand_scale(scale, w.shape, spec.block)
    return np.clip(np.round(np.asarray(w, np.float32) / s), -spec.qmax, spec.qmax).astype(np.int8)


def dequantize(codes: np.ndarray, scale: np.ndarray, block: int | None) -> np.ndarray:
    """What ``DequantizeLinear`` returns: float32(codes) * scale, in float32."""
    return (codes.astype(np.float32) * expand_scale(scale, codes.shape, block)).astype(np.float32)


def quantize_weight(w: np.ndarray, spec: WeightSpec) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest codes and scales of ``w``: the ladder's baseline quantizer."""
    scale = compute_scale(w, spec)
    return quantize_codes(w, scale, spec), scale
