"""Round to nearest with max-abs scales: the sweep's quantizer and the ladder's first rung."""

from __future__ import annotations

from .base import FourBitMethod


class RoundToNearest(FourBitMethod):
    """Max-abs scale, round to nearest."""

    name, clip = "rtn", "maxabs"
    text = "max-abs scale, round to nearest"
