"""Mixed-precision schemes chosen from a sensitivity file: node -> precision, as JSON.

Two families (notebook 04 states the rules beside the list):
The sensitivity file's ranking metric (``sens["metric"]``, in dB, e.g. the detection-aware
``det_sqnr`` of :mod:`.metrics`) ranks and costs every layer:
* ``top-K`` for a format F: every Conv in F except the K layers whose float precision buys
  the most (largest *kept* gain, i.e. the metric of all-in-F with the layer kept minus that of
  all-in-F; the *alone* metric ranks when no *kept* sweep exists), which stay in ``fp32``.
* ``budget-P``: at least P % of the conv weight parameters in 4-bit (``low`` format), the
  rest in 8-bit (``high`` format). The cost of moving a layer to 4-bit is the extra output
  noise power it causes alone, ``noise(low) - noise(high)`` with ``noise = 10^(-SQNR/10)``
  (noise powers of independent small perturbations add); the gain is its parameters x the
  bits saved per weight. Greedy by cost per bit saved until the budget is reached, then
  layers are dropped again, most costly first, while the budget still holds, so no layer
  is in 4-bit that the budget does not need.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from ..artifacts import read_json, write_json
from ..errors import LowbitError
from ..formats import FORMATS
from .metrics import read_back
from .sweep import value


def _noise(sqnr_db: float) -> float:
    return 0.0 if math.isinf(sqnr_db) else 10 ** (-sqnr_db / 10)


def fill_share(order: list[str], params: dict, target: float, drop_first) -> tuple[list[str], int]:
    """Layers taken in ``order`` until their parameters reach ``target``, then dropped again (in
    the order of ``drop_first``) while the target still holds: no layer the share does not need."""
    chosen, covered = [], 0
    for n in order:
        if covered >= target:
            break
        chosen.append(n)
        covered += params[n]
    for n in sorted(chosen, key=drop_first):
        if covered - params[n] >= target:
            chosen.remove(n)
            covered -= params[n]
    return chosen, covered


def ranking(sens: dict, fmt: str) -> tuple[list[str], str]:
    """Conv nodes, most sensitive first, for ``fmt``; and which direction ranked them."""
    sweep = sens["formats"].get(fmt)
    if sweep is None:
        raise LowbitError(f"the sensitivity file has no {fmt} sweep (it has {sorted(sens['formats'])})",
                          f"rerun `sensitivity` with --format {fmt}")  # fmt: skip
    recs = sweep["records"]
    if all("kept" in r for r in recs.values()):
        return sorted(recs, key=lambda n: -value(sens, fmt, n, "kept")), "kept"
    return sorted(recs, key=lambda n: value(sens, fmt, n, "alone")), "alone"


def top_k_scheme(sens: dict, fmt: str, k: int, ranked_as: str | None = None) -> dict:
    """Every Conv in ``fmt`` but the K most sensitive; ``ranked_as``: the swept format whose ranking
    stands in for ``fmt`` (one that ranks alike: notebook 04 measures the agreement)."""
    source = ranked_as or fmt
    order, direction = ranking(sens, source)
    if not 0 <= k <= len(order):
        raise LowbitError(f"top-K: K={k} is outside 0..{len(order)} for this graph", "choose K within that range")
    keep = order[:k]
    nodes = {n: ("fp32" if n in keep else fmt) for n in sens["convs"]}
    return {"kind": "top-k", "name": f"{fmt}-top{k}", "format": fmt, "k": k, "fallback": "fp32",
            "ranked_by": f"{source} {direction} {sens['metric']}", "kept": keep, "nodes": nodes}  # fmt: skip


def budget_scheme(sens: dict, percent: float, low: str = "w4a8", high: str = "w8a8") -> dict:
    if FORMATS[low].weight_bits >= FORMATS[high].weight_bits:
        raise LowbitError(f"budget schemes need a lower-bit 'low' format than 'high' (got {low}, {high})",
                          "use low: w4a8 (or w4a16) and high: w8a8")  # fmt: skip
    for f in (low, high):
        if f not in sens["formats"]:
            raise LowbitError(f"the sensitivity file has no {f} sweep", f"rerun `sensitivity` with --format {f}")
    params = sens["params"]
    total = sum(params[n] for n in sens["convs"])
    target = percent / 100 * total
    bits = FORMATS[high].weight_bits - FORMATS[low].weight_bits
    cost = {n: max(0.0, _noise(value(sens, low, n, "alone")) - _noise(value(sens, high, n, "alone"))) for n in sens["convs"]}
    order = sorted(sens["convs"], key=lambda n: (cost[n] / (params[n] * bits), n))
    chosen, covered = fill_share(order, params, target, drop_first=lambda n: -cost[n])
    nodes = {n: (low if n in chosen else high) for n in sens["convs"]}
    return {"kind": "budget", "name": f"budget{int(percent)}-{low}-{high}", "budget_percent": percent,
            "low": low, "high": high, "four_bit_params": covered, "conv_params": total,
            "four_bit_fraction": covered / total, "predicted_noise": sum(cost[n] for n in chosen),
            "rule": f"greedy by (noise(low) - noise(high)) / (params x bits saved), noise = 10^(-{sens['metric']} / 10), "
                    "then drop unneeded layers",
            "nodes": nodes}  # fmt: skip


def make_schemes(sens: dict, top_k: list[int], budgets: list[float], low: str = "w4a8", high: str = "w8a8",
                 formats: list[str] | None = None, rank_as: dict[str, str] | None = None) -> list[dict]:  # fmt: skip
    """Every top-K scheme for each swept format (or ``formats``) and each format of ``rank_as``
    (format -> the swept format whose ranking it takes), and every budgeted scheme."""
    calibration = sens.get("calibration", {})
    rank_as = {f: src for f, src in (rank_as or {}).items() if src in sens["formats"]}
    out = []
    swept = [f for f in sens["formats"] if not FORMATS[f].ort_placement]  # w8a8-ort: ORT's own files, no scheme
    for fmt in formats or [*swept, *(f for f in rank_as if f not in swept)]:
        for k in top_k:
            out.append(top_k_scheme(sens, fmt, k, rank_as.get(fmt) if fmt not in sens["formats"] else None))
    if low in sens["formats"] and high in sens["formats"]:
        out += [budget_scheme(sens, p, low, high) for p in budgets]
    for s in out:
        s["calibration"] = calibration
        s["source"] = {"model": sens.get("model"), "model_sha256": sens.get("model_sha256")}
    return out


def write_schemes(sens_path: str | Path, out_dir: str | Path, top_k: list[int], budgets: list[float],
                  low: str = "w4a8", high: str = "w8a8", metric: str | None = None,
                  rank_as: dict[str, str] | None = None) -> list[Path]:  # fmt: skip
    """``schemes`` command: one JSON per scheme in ``out_dir``, plus ``index.json``; ``metric``
    ranks the layers (default: the one the sensitivity file names)."""
    path = Path(sens_path)
    if not path.is_file():
        raise LowbitError(f"sensitivity file not found: {path}", "make one with `python -m lowbit_helpers sensitivity`")
    sens = read_back(read_json(path))
    if "formats" not in sens or "convs" not in sens:
        raise LowbitError(f"{path} is not a sensitivity file (no 'formats' / 'convs')", "pass the JSON `sensitivity` wrote")
    if metric:
        sens["metric"] = metric
    out_dir = Path(out_dir)
    schemes = make_schemes(sens, top_k, budgets, low, high, rank_as=rank_as)
    paths = []
    for s in schemes:
        p = out_dir / f"{s['name']}.json"
        write_json(p, s)
        paths.append(p)
    write_json(out_dir / "index.json", [{"name": s["name"], "kind": s["kind"], "file": f"{s['name']}.json"} for s in schemes])
    return paths


def _share_scheme(convs: list[str], params: dict, chosen: set[str], low: str, high: str, **meta) -> dict:
    total = sum(params[n] for n in convs)
    four = sum(params[n] for n in chosen)
    return {**meta, "low": low, "high": high, "four_bit_params": four, "conv_params": total,
            "four_bit_fraction": four / total, "nodes": {n: (low if n in chosen else high) for n in convs}}  # fmt: skip


def random_scheme(sens: dict, percent: float, seed: int, low: str = "w4a8", high: str = "w8a8") -> dict:
    """A control for ``budget_scheme``: 4-bit layers drawn at random (seeded) until the same share is met."""

    convs, params = sens["convs"], sens["params"]
    order = list(convs)
    random.Random(seed).shuffle(order)
    target = percent / 100 * sum(params[n] for n in convs)
    chosen, _ = fill_share(order, params, target, drop_first=lambda n: -params[n])
    chosen = set(chosen)
    return _share_scheme(convs, params, chosen, low, high, kind="random", name=f"random{int(percent)}-s{seed}-{low}-{high}",
                         budget_percent=percent, seed=seed, rule=f"4-bit layers in a random order (seed {seed}) until the share is met")  # fmt: skip


def block_of(node: str) -> str:
    """The top-level block of an exported node name, e.g. ``/model.23/cv3.0/...`` -> ``model.23``."""
    parts = [p for p in node.split("/") if p]
    return parts[0] if parts else node


def heuristic_scheme(sens: dict, low: str = "w4a8", high: str = "w8a8") -> dict:
    """The rule of thumb without sensitivity: every Conv in 4-bit except the first block and the head (last block)."""
    convs, params = sens["convs"], sens["params"]
    blocks = [block_of(n) for n in convs]
    first, last = blocks[0], blocks[-1]
    chosen = {n for n, b in zip(convs, blocks) if b not in (first, last)}
    return _share_scheme(convs, params, chosen, low, high, kind="heuristic", name=f"heuristic-{low}-{high}",
                         rule=f"every Conv in {low} except the first block ({first}) and the head ({last})")  # fmt: skip
