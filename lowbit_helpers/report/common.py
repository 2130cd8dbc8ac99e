"""Formatting helpers shared by the report's tables."""

from __future__ import annotations

import math

import pandas as pd


def fmt_delta(d: dict) -> str:
    """A Δ in points with its interval: "-0.45 [-1.07, +0.92]" (from a ``difference_interval`` dict)."""
    return f"{100 * d['delta']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"


def pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Blank cells as '—', and whole numbers without a trailing .0 (pandas made them floats)."""

    def fmt(x):
        if isinstance(x, float) and math.isnan(x):
            return "—"
        if isinstance(x, float) and x.is_integer() and abs(x) >= 10:
            return str(int(x))
        return x

    return df.astype(object).apply(lambda col: col.map(fmt))
