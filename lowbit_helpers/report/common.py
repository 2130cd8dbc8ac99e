"""Formatting helpers shared by the report's tables."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..assets import cache_dir
from ..rundir import REPO_ROOT


def shown_path(path: str | None) -> str:
    """A path as a report may show it: relative to the repository or the weights cache, else its
    file name; never the machine's absolute path."""

    if not path:
        return ""
    p = Path(path).resolve()
    for root, label in ((REPO_ROOT, ""), (cache_dir().resolve(), "<LOWBIT_CACHE>/")):
        if p.is_relative_to(root):
            return label + p.relative_to(root).as_posix()
    return f"…/{p.name}"


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
