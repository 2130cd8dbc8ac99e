"""MSE-clipped scales, round to nearest: each scale clipped to minimise the input-energy-weighted
squared rounding error (:func:`lowbit_helpers.weights.compute_scale` with ``clip="mse"``)."""

from __future__ import annotations

from .base import FourBitMethod


class MseClip(FourBitMethod):
    """MSE-clipped scale, round to nearest."""

    name, clip = "mse", "mse"
    text = "MSE-clipped scale, round to nearest"
