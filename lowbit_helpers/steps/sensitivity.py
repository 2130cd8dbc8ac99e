"""Notebook 04: per-layer sensitivity on the ONNX graph, the Torch proxy, their agreement, schemes.

Stages (each cached in the run's manifest like the others):

* ``onnx_sweep``: every Conv x every format of ``params.sensitivity.formats`` x {alone, kept},
  raw-head SQNR on calibration images disjoint from evaluation (:mod:`lowbit_helpers.quant.sensitivity`);
* ``map_check``: COCO mAP of single-layer perturbations for the most sensitive layers and a
  spread of the others, and the Spearman correlation of the cheap metric with mAP;
* ``torch_proxy``: the plan's Torch sweep (:mod:`lowbit_helpers.quant.torch_proxy`), the verified name
  mapping, and the Spearman correlation with the ONNX ranking;
* ``schemes``: top-K and budgeted schemes (:mod:`lowbit_helpers.quant.schemes`) in ``schemes/``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..artifacts import read_json, write_json
from ..errors import LowbitError
from ..rundir import RunDir, stage_key
from . import baseline

SENS = "sensitivity/sensitivity.json"
LAYERS = "sensitivity/layers.json"
MAP_CHECK = "sensitivity/map_check.json"
PROXY = "sensitivity/torch_proxy.json"
SCHEMES_DIR = "schemes"
SCHEMES_INDEX = f"{SCHEMES_DIR}/index.json"  # written by quant.schemes.write_schemes


def _images(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    """(range images, sweep images): calibration images [0, R) and [R, R+N)."""
    from ..quant.calibration import load_calibration

    s = run.cfg.sensitivity
    calib = load_calibration(run.artifact(baseline.CALIB))
    need = s.range_images + s.images
    if len(calib) < need:
        raise LowbitError(
            f"sensitivity needs {s.range_images} + {s.images} = {need} calibration images; the run has {len(calib)}",
            "raise data.calib_images (at most the list's length) or lower sensitivity.range_images / images",
        )
    return np.ascontiguousarray(calib[: s.range_images]), np.ascontiguousarray(calib[s.range_images : need])


def layer_table(run: RunDir) -> list[dict]:
    """One row per Conv in graph order: layer index, block type, section, torch module, params, MACs."""
    import onnx

    from ..graph import graph_info
    from ..quant.sensitivity import conv_params
    from ..quant.torch_proxy import onnx_to_torch_name

    model_path = run.artifact(baseline.MODEL)
    key = stage_key({"versions": baseline.versions()}, [model_path])
    if not run.is_fresh("sensitivity-layers", key):
        model = onnx.load(str(model_path))
        params = conv_params(model)
        macs = graph_info(model_path)["conv_macs"]
        types, n_backbone, n_layers = {}, None, None
        if baseline.model_source(run.cfg).kind != "onnx":
            from ..export import load_torch_model

            tm = load_torch_model(baseline.model_source(run.cfg))
            types = {i: type(m).__name__ for i, m in enumerate(tm.model)}
            n_backbone, n_layers = len(tm.yaml["backbone"]), len(tm.model)
        rows = []
        for name in params:
            module = onnx_to_torch_name(name)
            idx = int(module.split(".")[1]) if module.startswith("model.") else -1
            section = "?" if n_backbone is None else "backbone" if idx < n_backbone else "head" if idx == n_layers - 1 else "neck"
            rows.append({"node": name, "module": module, "layer": idx, "block": types.get(idx, "?"), "section": section,
                         "params": params[name], "macs": macs.get(name, 0)})  # fmt: skip
        write_json(run.file(LAYERS), rows)
        run.finish("sensitivity-layers", key, [LAYERS])
    return read_json(run.artifact(LAYERS))


def onnx_sweep(run: RunDir) -> dict:
    from ..quant.formats import get_format
    from ..quant.sensitivity import measure

    s = run.cfg.sensitivity
    model = run.artifact(baseline.MODEL)
    params = {k: getattr(s, k) for k in ("formats", "directions", "range_images", "images", "chunk", "naive_check")}
    params["threads"] = run.cfg.runtime.threads
    key = stage_key({**params, "versions": baseline.versions()}, [model, run.artifact(baseline.CALIB)])
    if not run.is_fresh("sensitivity", key):
        ranges, images = _images(run)
        sens = measure(model, images, ranges, [get_format(f) for f in s.formats], s.directions, s.chunk,
                       run.cfg.runtime.threads, s.naive_check)  # fmt: skip
        sens["model"] = baseline.MODEL
        sens["calibration"].update(list=str(Path(run.cfg.data.coco_root) / run.cfg.data.calib_list),
                                   range_images=[0, s.range_images], sweep_images=[s.range_images, s.range_images + s.images])  # fmt: skip
        write_json(run.file(SENS), sens)
        run.finish("sensitivity", key, [SENS], params)
    return read_json(run.artifact(SENS))


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def map_layers(sens: dict, fmt: str, n: int) -> list[str]:
    """The n//2 most sensitive layers (alone SQNR in ``fmt``) and the rest spread evenly over the others."""
    recs = sens["formats"][fmt]["records"]
    order = sorted(recs, key=lambda c: recs[c]["alone_sqnr_db"])
    top = order[: (n + 1) // 2]
    rest = order[len(top) :]
    spread = [rest[int(i)] for i in np.linspace(0, len(rest) - 1, n - len(top))] if rest and n > len(top) else []
    return top + [c for c in spread if c not in top]


def map_check(run: RunDir, sens: dict) -> dict:
    """mAP of single-layer perturbations, and how well the SQNR ranks them (Spearman)."""
    import onnx

    from ..data import open_coco
    from ..evaluate import evaluate_coco, predict_onnx
    from ..quant.formats import apply_format, get_format
    from ..quant.sensitivity import activation_ranges, session

    cfg, s = run.cfg, run.cfg.sensitivity
    info = read_json(run.artifact(baseline.MODEL_INFO))
    if s.map_layers == 0 or info["structure_only"] or s.map_format not in sens["formats"]:
        why = ("map_layers is 0" if s.map_layers == 0 else "random weights: no accuracy" if info["structure_only"]
               else f"map_format {s.map_format} is not among the swept formats")  # fmt: skip
        return {"skipped": why}
    model_path = run.artifact(baseline.MODEL)
    params = {"format": s.map_format, "layers": s.map_layers, "subset": s.map_subset, "decode": cfg.decode.model_dump(),
              "data": cfg.data.model_dump(), "range_images": s.range_images}  # fmt: skip
    key = stage_key(params, [model_path, run.artifact(SENS)])
    if not run.is_fresh("sensitivity-map", key):
        t0 = time.perf_counter()
        model = onnx.load(str(model_path))
        fmt = get_format(s.map_format)
        ranges = activation_ranges(model, _images(run)[0], cfg.runtime.threads)
        subset = open_coco(cfg.data.coco_root, cfg.data.annotations, s.map_subset)

        def score(m) -> float:
            dets = predict_onnx(session(m, cfg.runtime.threads), subset, cfg.decode, progress=False)
            return evaluate_coco(subset, dets).metrics["mAP_50_95"]

        fp32 = score(model)
        recs = sens["formats"][s.map_format]["records"]
        rows = []
        for conv in map_layers(sens, s.map_format, s.map_layers):
            m = score(apply_format(model, {conv}, fmt, ranges))
            rows.append({"conv": conv, "alone_sqnr_db": recs[conv]["alone_sqnr_db"], "mAP_50_95": m, "delta": m - fp32})
        result = {"format": s.map_format, "subset": subset.name, "num_images": len(subset), "fp32_mAP_50_95": fp32,
                  "rows": rows, "spearman_sqnr_vs_map": _spearman([r["alone_sqnr_db"] for r in rows], [r["mAP_50_95"] for r in rows]),
                  "seconds": time.perf_counter() - t0}  # fmt: skip
        write_json(run.file(MAP_CHECK), result)
        run.finish("sensitivity-map", key, [MAP_CHECK], params)
    return read_json(run.artifact(MAP_CHECK))


def torch_proxy(run: RunDir, sens: dict) -> dict:
    """The plan's Torch proxy on the same images and format, and its agreement with the ONNX sweep."""
    cfg, s = run.cfg, run.cfg.sensitivity
    source = baseline.model_source(cfg)
    if not s.proxy or source.kind == "onnx" or s.proxy_format not in sens["formats"]:
        why = ("disabled in params" if not s.proxy else "the model is an ONNX file: no torch model"
               if source.kind == "onnx" else f"proxy_format {s.proxy_format} is not among the swept formats")  # fmt: skip
        return {"skipped": why}
    model_path = run.artifact(baseline.MODEL)
    params = {"format": s.proxy_format, "range_images": s.range_images, "images": s.images, "chunk": s.chunk,
              "source": source.sha256, "versions": baseline.versions()}  # fmt: skip
    key = stage_key(params, [model_path, run.artifact(baseline.CALIB), run.artifact(SENS)])
    if not run.is_fresh("sensitivity-proxy", key):
        import onnx
        import torch

        from ..export import load_torch_model
        from ..quant.formats import get_format
        from ..quant.torch_proxy import map_convs, torch_ranges, torch_sweep

        torch.set_num_threads(cfg.runtime.threads)
        tm = load_torch_model(source)
        mapping = map_convs(onnx.load(str(model_path)), tm)
        modules = list(mapping["mapping"].values())
        range_imgs, images = _images(run)
        t0 = time.perf_counter()
        ranges = torch_ranges(tm, modules, range_imgs)
        result = torch_sweep(tm, modules, images, get_format(s.proxy_format), ranges, s.chunk)
        result["seconds_with_ranges"] = time.perf_counter() - t0
        onnx_recs = sens["formats"][s.proxy_format]["records"]
        pairs = list(mapping["mapping"].items())
        onnx_vals = [onnx_recs[n]["alone_sqnr_db"] for n, _ in pairs]
        torch_vals = [result["sqnr_db"][m] for _, m in pairs]
        onnx_rank = {n: r for r, n in enumerate(sorted(onnx_recs, key=lambda c: onnx_recs[c]["alone_sqnr_db"]), 1)}
        by_torch = sorted(pairs, key=lambda p: result["sqnr_db"][p[1]])
        torch_rank = {n: r for r, (n, _) in enumerate(by_torch, 1)}
        rows = [{"node": n, "module": m, "onnx_sqnr_db": onnx_recs[n]["alone_sqnr_db"], "torch_sqnr_db": result["sqnr_db"][m],
                 "onnx_rank": onnx_rank[n], "torch_rank": torch_rank[n], "rank_shift": torch_rank[n] - onnx_rank[n]}
                for n, m in pairs]  # fmt: skip
        kept = sens["formats"][s.proxy_format]
        kept_gain = ([kept["all_sqnr_db"] - onnx_recs[n]["kept_sqnr_db"] for n, _ in pairs]
                     if all("kept_sqnr_db" in onnx_recs[n] for n, _ in pairs) else None)  # fmt: skip
        out = {**mapping, "sweep": result, "rows": rows, "spearman": _spearman(onnx_vals, torch_vals),
               # the proxy ranks by "alone"; top-K schemes keep what buys most when everything else is low-bit.
               # Both series are "higher = less sensitive" (all - kept = minus the kept gain), so agreement is > 0.
               "spearman_vs_onnx_kept": _spearman(kept_gain, torch_vals) if kept_gain else None,
               "top20_onnx": [n for n in sorted(onnx_rank, key=onnx_rank.get)[:20]],
               "top20_torch": [n for n, _ in by_torch[:20]],
               "top20_overlap": len(set(sorted(onnx_rank, key=onnx_rank.get)[:20]) & {n for n, _ in by_torch[:20]})}  # fmt: skip
        write_json(run.file(PROXY), out)
        run.finish("sensitivity-proxy", key, [PROXY], params)
    return read_json(run.artifact(PROXY))


def scheme_files(run: RunDir) -> list[dict]:
    from ..quant.schemes import write_schemes

    s = run.cfg.sensitivity
    sens_path = run.artifact(SENS)
    params = {"top_k": s.top_k, "budgets": s.budgets, "low": s.budget_low, "high": s.budget_high}
    key = stage_key(params, [sens_path])
    if not run.is_fresh("schemes", key):
        out_dir = run.path / SCHEMES_DIR
        for old in out_dir.glob("*.json"):  # a scheme list from other params must not linger
            old.unlink()
        paths = write_schemes(sens_path, out_dir, s.top_k, s.budgets, s.budget_low, s.budget_high)
        rels = [str(p.relative_to(run.path)) for p in paths] + [SCHEMES_INDEX]
        run.finish("schemes", key, rels, params)
    index = read_json(run.artifact(SCHEMES_INDEX))
    return [read_json(run.artifact(f"{SCHEMES_DIR}/{e['file']}")) for e in index]


def run_sensitivity(run: RunDir) -> dict:
    """Everything notebook 04 shows."""
    if not run.cfg.sensitivity.enabled:
        return {"skipped": "sensitivity.enabled is false in the params"}
    s = run.cfg.sensitivity
    if s.budgets and not all(0 < b <= 100 for b in s.budgets):
        raise LowbitError(f"sensitivity.budgets must be percentages in (0, 100], got {s.budgets}", "use e.g. [25, 50, 75, 90]")
    sens = onnx_sweep(run)
    return {"layers": layer_table(run), "sensitivity": sens, "map_check": map_check(run, sens),
            "proxy": torch_proxy(run, sens), "schemes": scheme_files(run)}  # fmt: skip
