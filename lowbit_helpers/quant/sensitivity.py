"""Per-layer sensitivity on the deployed ONNX graph, in both directions, with cached tensors.

For each Conv L and a format F (see :mod:`.formats`):

* *alone*: only L computes in F, everything else in FP32;
* *kept*: everything computes in F except L (what keeping L in float buys).

The metric is the SQNR (dB) of the raw head output [1, 144, 8400] against FP32, summed over
the sweep images (the same definition as notebook 03's fidelity).

Cost. Rebuilding and rerunning the whole network for each of 2 x N perturbations (naive)
costs 2 N full passes per image. A perturbation of L changes only L's descendants, so the
sweep runs the base network once per image (FP32 for *alone*, all-in-F for *kept*), keeps
every tensor that enters a descendant set from outside, and runs, per L, only the sub-graph
of L's descendants (extracted with ``onnx.utils.Extractor``) on those cached tensors. On
YOLOv10n the descendants of a Conv hold 39 % of the network's MACs on average. Images are
processed in chunks so the cache stays small; the sub-graph sessions live for the sweep.
``naive_sqnr`` computes one perturbation the naive way: the tests and notebook 04 check that
both give the same SQNR, and time the naive cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
import onnx

from .formats import Format, apply_format

DIRECTIONS = ("alone", "kept")


def conv_nodes(model: onnx.ModelProto) -> list[str]:
    """Conv node names in graph (topological) order."""
    return [n.name for n in model.graph.node if n.op_type == "Conv"]


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """Copy of ``model`` that also returns the named intermediate float tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def session(model: onnx.ModelProto, threads: int = 2):
    """CPU session for an in-memory graph; no memory arena (many small sessions live at once)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = False
    so.log_severity_level = 3
    # Without this ORT fuses some DequantizeLinear -> Conv -> QuantizeLinear chains into
    # QLinearConv (and refuses float8 ones): the fake-quantized Conv must stay a float Conv.
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["QDQSelectorActionTransformer"])


def activation_ranges(model: onnx.ModelProto, images: np.ndarray, threads: int = 2) -> dict[str, tuple[float, float]]:
    """Calibrated range of every Conv input: the mean over images of each image's min and max.

    The same statistic as the ``avgminmax`` INT8 calibration of notebook 03 (per-image
    extremes averaged, so one outlier image does not set the range).
    """
    inputs = sorted({n.input[0] for n in model.graph.node if n.op_type == "Conv"})
    sess = session(with_outputs(model, inputs), threads)
    feed = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    lo, hi = {k: [] for k in inputs}, {k: [] for k in inputs}
    for x in images:
        for name, value in zip(names, sess.run(None, {feed: x[None]})):
            if name in lo:
                lo[name].append(float(value.min()))
                hi[name].append(float(value.max()))
    return {k: (float(np.mean(lo[k])), float(np.mean(hi[k]))) for k in inputs}


class Plan:
    """Descendants and boundary tensors of every Conv (computed once per graph)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.output = g.output[0].name
        self.convs = conv_nodes(model)
        inits = {i.name for i in g.initializer}
        consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        self.descendants: dict[str, set[str]] = {}
        self.boundary: dict[str, list[str]] = {}
        by_name = {n.name: n for n in g.node}
        for conv in self.convs:
            seen, stack = {conv}, [by_name[conv]]
            while stack:
                for o in stack.pop().output:
                    for c in consumers.get(o, []):
                        if c.name not in seen:
                            seen.add(c.name)
                            stack.append(c)
            produced = {o for name in seen for o in by_name[name].output}
            entering = {i for name in seen for i in by_name[name].input if i and i not in produced and i not in inits}
            self.descendants[conv] = seen
            self.boundary[conv] = sorted(entering)
        self.cached = sorted(set().union(*self.boundary.values())) if self.convs else []

    def subgraph(self, extractor, conv: str) -> onnx.ModelProto:
        return extractor.extract_model(self.boundary[conv], [self.output])

    def descendant_convs(self, conv: str) -> set[str]:
        return {c for c in self.convs if c in self.descendants[conv]}


def _sqnr(signal: float, noise: float) -> float:
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise))


def sweep(
    model: onnx.ModelProto,
    images: np.ndarray,
    fmt: Format,
    ranges: dict,
    directions: Iterable[str] = DIRECTIONS,
    convs: list[str] | None = None,
    chunk: int = 8,
    threads: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """SQNR of the raw head for each Conv and direction; timings of each phase.

    ``images``: [N, 3, H, W] float32 (letterboxed). ``convs``: a subset of Convs (default all).
    Returns ``{"records": {conv: {"alone_sqnr_db", "kept_sqnr_db"}}, "all_sqnr_db", "seconds", ...}``.
    """
    t_start = time.perf_counter()
    directions = list(directions)
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"unknown direction(s) {sorted(unknown)}; use {DIRECTIONS}")
    model = onnx.shape_inference.infer_shapes(model)
    plan = Plan(model)
    convs = list(convs or plan.convs)
    all_quant = apply_format(model, plan.convs, fmt, ranges)
    feed_name = model.graph.input[0].name
    cached = sorted(set().union(*(plan.boundary[c] for c in convs)))
    bases = {"alone": session(with_outputs(model, cached), threads)}
    need_kept = "kept" in directions
    if need_kept:
        bases["kept"] = session(with_outputs(all_quant, cached), threads)
    else:
        bases["all"] = session(all_quant, threads)

    extractor = onnx.utils.Extractor(model)
    subs: dict[tuple[str, str], object] = {}
    for conv in convs:
        sub = plan.subgraph(extractor, conv)
        if "alone" in directions:
            subs[conv, "alone"] = session(apply_format(sub, {conv}, fmt, ranges), threads)
        if need_kept:
            others = plan.descendant_convs(conv) - {conv}
            subs[conv, "kept"] = session(apply_format(sub, others, fmt, ranges), threads)
    t_setup = time.perf_counter() - t_start

    signal = 0.0
    noise = {key: 0.0 for key in subs}
    noise_all = 0.0
    t_base = t_sub = 0.0
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk]
        caches = {d: [] for d in bases}
        refs = []
        t0 = time.perf_counter()
        for x in block:
            for d, sess in bases.items():
                names = [o.name for o in sess.get_outputs()]
                values = dict(zip(names, sess.run(None, {feed_name: x[None]})))
                caches[d].append(values)
            ref = caches["alone"][-1][plan.output].astype(np.float64)
            refs.append(ref)
            signal += float(np.sum(ref**2))
            q = caches["kept" if need_kept else "all"][-1][plan.output]
            noise_all += float(np.sum((q - ref) ** 2))
        t1 = time.perf_counter()
        for (conv, d), sess in subs.items():
            inputs = plan.boundary[conv]
            for values, ref in zip(caches[d], refs):
                out = sess.run([plan.output], {k: values[k] for k in inputs})[0]
                noise[conv, d] += float(np.sum((out - ref) ** 2))
        t_sub += time.perf_counter() - t1
        t_base += t1 - t0
        if progress:
            progress(f"{fmt.name}: {min(start + chunk, len(images))}/{len(images)} images")
        del caches
    records = {c: {f"{d}_sqnr_db": _sqnr(signal, noise[c, d]) for d in directions} for c in convs}
    return {
        "format": fmt.name,
        "images": int(len(images)),
        "directions": directions,
        "records": records,
        "all_sqnr_db": _sqnr(signal, noise_all),
        "seconds": {"setup": t_setup, "base_passes": t_base, "subgraphs": t_sub, "total": time.perf_counter() - t_start},
        "cached_tensors": len(cached),
        "mean_descendant_nodes": float(np.mean([len(plan.descendants[c]) for c in convs])) if convs else 0.0,
        "graph_nodes": len(model.graph.node),
    }


def fp32_outputs(model: onnx.ModelProto, images: np.ndarray, threads: int = 2) -> list[np.ndarray]:
    sess = session(model, threads)
    feed = model.graph.input[0].name
    return [sess.run(None, {feed: x[None]})[0] for x in images]


def naive_sqnr(model: onnx.ModelProto, images: np.ndarray, refs: list[np.ndarray], fmt: Format, ranges: dict,
               conv: str, direction: str, threads: int = 2) -> tuple[float, float]:  # fmt: skip
    """One perturbation the naive way: the whole graph rebuilt and rerun on every image.

    ``refs``: the FP32 outputs of ``images`` (:func:`fp32_outputs`). Returns (sqnr_db, seconds
    this perturbation cost: graph edit, session and one full pass per image).
    """
    t0 = time.perf_counter()
    convs = conv_nodes(model)
    perturbed = apply_format(model, {conv} if direction == "alone" else set(convs) - {conv}, fmt, ranges)
    sess = session(perturbed, threads)
    feed = model.graph.input[0].name
    signal = noise = 0.0
    for x, ref in zip(images, refs):
        ref = ref.astype(np.float64)
        out = sess.run(None, {feed: x[None]})[0]
        signal += float(np.sum(ref**2))
        noise += float(np.sum((out - ref) ** 2))
    return _sqnr(signal, noise), time.perf_counter() - t0


def conv_params(model: onnx.ModelProto) -> dict[str, int]:
    """Weight parameter count of each Conv."""
    inits = {i.name: i for i in model.graph.initializer}
    return {n.name: int(np.prod(inits[n.input[1]].dims)) for n in model.graph.node if n.op_type == "Conv"}


def measure(
    model_path,
    sweep_images: np.ndarray,
    range_images: np.ndarray,
    formats: list[Format],
    directions: Iterable[str] = DIRECTIONS,
    chunk: int = 8,
    threads: int = 2,
    naive_check: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The sensitivity file: every Conv swept for every format, plus the naive-cost check.

    ``naive_check`` perturbations per format (the first Conv, whose descendants are the whole
    network, and Convs spread over the graph) are also computed the naive way: their SQNR must
    equal the cached sweep's, and their time gives the naive cost of the full sweep.
    """
    from ..artifacts import sha256_file
    from ..graph import graph_info

    model = onnx.load(str(model_path))
    convs = conv_nodes(model)
    t0 = time.perf_counter()
    ranges = activation_ranges(model, range_images, threads)
    t_ranges = time.perf_counter() - t0
    refs = fp32_outputs(model, sweep_images, threads) if naive_check else []
    checks = [convs[int(i)] for i in np.linspace(0, len(convs) - 1, naive_check)] if naive_check else []
    out = {
        "model": str(model_path), "model_sha256": sha256_file(model_path), "convs": convs,
        "params": conv_params(model), "macs": graph_info(model_path)["conv_macs"],
        "images": int(len(sweep_images)), "threads": threads, "chunk": chunk,
        "calibration": {"statistic": "avgminmax (mean of per-image min / max)", "images": int(len(range_images)),
                        "seconds": t_ranges},
        "formats": {},
    }  # fmt: skip
    for fmt in formats:
        result = sweep(model, sweep_images, fmt, ranges, directions, chunk=chunk, threads=threads, progress=progress)
        naive = []
        for conv in checks:
            for d in result["directions"]:
                value, seconds = naive_sqnr(model, sweep_images, refs, fmt, ranges, conv, d, threads)
                naive.append({"conv": conv, "direction": d, "naive_sqnr_db": value, "seconds": seconds,
                              "cached_sqnr_db": result["records"][conv][f"{d}_sqnr_db"]})  # fmt: skip
        if naive:
            per = float(np.mean([r["seconds"] for r in naive]))
            n = len(convs) * len(result["directions"])
            result["naive"] = {"checks": naive, "seconds_per_perturbation": per, "perturbations": n,
                               "estimated_seconds": per * n,
                               "max_abs_sqnr_difference_db": max(abs(r["naive_sqnr_db"] - r["cached_sqnr_db"]) for r in naive)}  # fmt: skip
        out["formats"][fmt.name] = result
    return out
