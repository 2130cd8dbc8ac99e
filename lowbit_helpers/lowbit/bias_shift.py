"""Analytic bias correction of 4-bit weights (the ``-bc`` of a method name).

The expected output error of a quantized Conv weight is ``(Q_j - W_j) mean(X_j)`` per output
channel (:mod:`.stats`); subtracting it from the bias removes the error's mean on calibration
images. Not to be confused with :mod:`lowbit_helpers.int8.bias_correction`, which *measures*
the output shift of a finished INT8 Q/DQ file (activations quantized too) image by image.
"""

from __future__ import annotations

import numpy as np

from .stats import ConvStats, _rows


def expected_output_shift(w: np.ndarray, w_q: np.ndarray, stats: ConvStats) -> np.ndarray:
    """Per output channel, the mean output error ``(Q - W) mean(X)`` on calibration images."""
    g = stats.geometry.group
    delta = _rows(np.asarray(w_q, np.float64) - np.asarray(w, np.float64), g)  # [g, co/g, d]
    return np.einsum("gcd,gd->gc", delta, stats.mean).reshape(-1).astype(np.float32)
