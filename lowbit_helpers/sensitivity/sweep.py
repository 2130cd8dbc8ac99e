"""Per-layer sensitivity on the deployed ONNX graph, in both directions, with cached tensors.

For each Conv L and a format F (see :mod:`lowbit_helpers.formats`):
* *alone*: only L computes in F, everything else in FP32;
* *kept*: everything computes in F except L (what keeping L in float buys).

Each perturbation is scored against FP32 on the raw head by every metric of
:mod:`.metrics` (raw-head SQNR and the detection-aware ones), summed over the sweep images.

Cost. Rebuilding and rerunning the whole network for each of 2 x N perturbations (naive)
costs 2 N full passes per image. A perturbation of L changes only L's descendants, so the
sweep runs the base network once per image (FP32 for *alone*, all-in-F for *kept*), keeps
every tensor that enters a descendant set from outside, and runs, per L, only the sub-graph
of L's descendants (extracted with ``onnx.utils.Extractor``) on those tensors. On YOLOv10n
the descendants of a Conv hold 39 % of the network's MACs on average.

Work is split into *groups* of perturbations of one direction: a group's sub-graph sessions
are built, run over every image (one image's boundary tensors alive at a time) and dropped,
so memory is bounded by the group size, not by the network or the image count. Groups go to
``workers`` processes (one ORT thread each: the sub-graphs are small and one intra-op
thread per core keeps both cores busy, which intra-op threads on small graphs do not).
``naive`` computes one perturbation the naive way: the tests and notebook 04 check that
both give the same metrics, and time the naive cost.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import psutil

from ..artifacts import sha256_file
from ..formats import Format, apply_format
from ..graph import graph_info
from ..lowbit.materialize import materialize
from ..runtime import activations, make_session, with_outputs
from .deployed import DeployedPerturber
from .metrics import METRICS, Accumulator, Reference

DIRECTIONS = ("alone", "kept")
ALL = "__all__"  # the key of the every-Conv-in-format perturbation


def conv_nodes(model: onnx.ModelProto) -> list[str]:
    """Conv node names in graph (topological) order."""
    return [n.name for n in model.graph.node if n.op_type == "Conv"]


def sim_session(model: onnx.ModelProto, threads: int = 2, disabled: Iterable[str] = ()):
    """The sweep's session of an in-memory graph: the fake-quantized graph in float (``simulated``
    arithmetic), no memory arena (many small sessions live at once); ``disabled``: more graph
    optimizers to turn off (a perturber's ``disabled_optimizers``)."""
    return make_session(model, threads=threads, arithmetic="simulated", disabled_optimizers=disabled, memory_arena=False)


def activation_ranges(model: onnx.ModelProto, images: np.ndarray, threads: int = 2) -> dict[str, tuple[float, float]]:
    """Calibrated range of every Conv input: the mean over images of each image's min and max.

    The same statistic as the ``avgminmax`` INT8 calibration of notebook 03 (per-image
    extremes averaged, so one outlier image does not set the range).
    """
    inputs = sorted({n.input[0] for n in model.graph.node if n.op_type == "Conv"})
    lo, hi = {k: [] for k in inputs}, {k: [] for k in inputs}
    for values in activations(model, inputs, images, threads):
        for name, value in values.items():
            lo[name].append(float(value.min()))
            hi[name].append(float(value.max()))
    return {k: (float(np.mean(lo[k])), float(np.mean(hi[k]))) for k in inputs}


class Plan:
    """Descendants and boundary tensors of every Conv (computed once per graph)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.output = g.output[0].name
        self.input = g.input[0].name
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
        self.boundary[ALL] = [self.input]

    def subgraph(self, extractor, conv: str) -> onnx.ModelProto:
        return extractor.extract_model(self.boundary[conv], [self.output])

    def descendant_convs(self, conv: str) -> set[str]:
        return {c for c in self.convs if c in self.descendants[conv]}


# ------------------------------------------------------------------ what a perturbation does
class FormatPerturber:
    """Quantize the named Convs of a (sub-)graph in a :class:`.formats.Format` (round-to-nearest weights)."""

    def __init__(self, fmt: Format, ranges: dict):
        self.fmt, self.ranges, self.name = fmt, ranges, fmt.name

    def __call__(self, model: onnx.ModelProto, convs: set[str]) -> onnx.ModelProto:
        return apply_format(model, set(convs) & set(conv_nodes(model)), self.fmt, self.ranges)


class MethodPerturber:
    """Quantize the named Convs as notebook 05 deploys them: ``precision`` with 4-bit PTQ ``method``
    (GPTQ, MSE clipping, blocks, bias correction; :func:`lowbit_helpers.lowbit.materialize.materialize`), statistics
    taken on FP32 inputs."""

    def __init__(self, precision: str, method: str, ranges: dict, stats: dict | None):
        self.precision, self.method, self.ranges, self.stats = precision, method, ranges, stats
        self.name = f"{precision}.{method}"
        self.cache: dict = {}

    def __call__(self, model: onnx.ModelProto, convs: set[str]) -> onnx.ModelProto:
        convs = set(convs) & set(conv_nodes(model))
        if not convs:
            return model
        return materialize(model, dict.fromkeys(convs, self.precision), self.method, ranges=self.ranges,
                           stats=self.stats, cache=self.cache)[0]  # fmt: skip


# ------------------------------------------------------------------ what is measured on each output
class MetricScorer:
    """Every :mod:`.metrics` metric of each perturbation against FP32; with ``checkpoints``,
    also the metrics after the first N images (how the ranking settles with the image count)."""

    def __init__(self, checkpoints: Iterable[int] = ()):
        self.checkpoints = set(checkpoints)

    def reference(self, ref: np.ndarray, meta) -> Reference:
        return Reference(ref)

    def new(self) -> Accumulator:
        return Accumulator()

    def add(self, state: Accumulator, ref: Reference, out: np.ndarray, meta) -> None:
        state.add(ref, out)
        if meta + 1 in self.checkpoints:  # ArrayImages: meta is the image index, images run in order
            state.snapshots[meta + 1] = state.metrics()

    def merge(self, a: Accumulator, b: Accumulator) -> Accumulator:
        a.merge(b)
        return a


class ArrayImages:
    """Letterboxed images [N, 3, H, W] as the sweep reads them: (tensor [1, 3, H, W], meta = index)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return np.ascontiguousarray(self.images[i : i + 1]), i


@dataclass
class _Job:
    model: onnx.ModelProto
    plan: Plan
    perturber: Callable
    groups: list[list[tuple[str, str]]]
    images: Sequence
    scorer: object
    threads: int


_JOB: _Job | None = None  # the job this process runs (a worker gets it once, from the pool's initializer)


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job


def _run_group(index: int) -> tuple[dict, dict]:
    """Build one group's sessions, run them over every image, return (states, seconds)."""
    job = _JOB
    t0 = time.perf_counter()
    group = job.groups[index]
    plan, model, fmt = job.plan, job.model, job.perturber
    direction = group[0][1]
    extractor = onnx.utils.Extractor(model)
    disabled = getattr(fmt, "disabled_optimizers", ())
    subs = {}
    for conv, d in group:
        if conv == ALL:
            subs[conv, d] = sim_session(fmt(model, set(plan.convs)), job.threads, disabled)
            continue
        sub = plan.subgraph(extractor, conv)
        # kept: every other Conv, also those outside the sub-graph (a perturber may quantize edges
        # into the sub-graph that a Conv upstream owns; it ignores what the sub-graph lacks)
        convs = {conv} if d == "alone" else set(plan.convs) - {conv}
        subs[conv, d] = sim_session(fmt(sub, convs), job.threads, disabled)
    needed = sorted({t for key in subs for t in plan.boundary[key[0]]} - {plan.input})
    fp32_out = needed if direction != "kept" else []
    bases = {"fp32": sim_session(with_outputs(model, fp32_out), job.threads, disabled)}
    if direction == "kept":
        bases["kept"] = sim_session(with_outputs(fmt(model, set(plan.convs)), needed), job.threads, disabled)
    t_setup = time.perf_counter() - t0
    states = {key: job.scorer.new() for key in subs}
    t_base = t_sub = 0.0
    for i in range(len(job.images)):
        x, meta = job.images[i]
        t1 = time.perf_counter()
        values = {}
        ref = None
        for name, sess in bases.items():
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {plan.input: x})))
            if name == "fp32":
                ref = got[plan.output]
            if name == ("kept" if direction == "kept" else "fp32"):
                values = got
        values[plan.input] = x
        ref_info = job.scorer.reference(ref, meta)
        t2 = time.perf_counter()
        for key, sess in subs.items():
            out = sess.run([plan.output], {k: values[k] for k in plan.boundary[key[0]]})[0]
            job.scorer.add(states[key], ref_info, out, meta)
        t_base += t2 - t1
        t_sub += time.perf_counter() - t2
    return states, {"setup": t_setup, "base_passes": t_base, "subgraphs": t_sub}


class MemoryPeak:
    """Peak memory of this process and its workers together, sampled every 0.2 s: the sum of their
    proportional set sizes (PSS: a page shared after the fork counts once over all processes, where
    summed RSS would count it in each)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        me = psutil.Process()

        def sample():
            while not self._stop.is_set():
                total = 0
                for p in [me, *me.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except psutil.Error:  # a worker that just exited
                        pass
                self.peak = max(self.peak, total)
                self._stop.wait(0.2)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gb(self) -> float:
        return self.peak / 2**30


def run_perturbations(model: onnx.ModelProto, images: Sequence, perturber: Callable, convs: list[str],
                      directions: Iterable[str], scorer, *, workers: int = 2, group: int = 32, threads: int = 1,
                      progress: Callable[[str], None] | None = None) -> tuple[dict, dict]:  # fmt: skip
    """Score every (conv, direction) perturbation of ``model`` (and the all-Convs one, key
    ``(ALL, "all")``) on ``images`` with ``scorer``. Returns ({key: scorer state}, cost).

    ``images``: a sequence of (tensor [1, 3, H, W], meta) (:class:`ArrayImages`, or COCO images
    with their letterbox for the ground truth of :mod:`.validation`).
    ``perturber(graph, convs) -> graph`` quantizes the named Convs of a (sub-)graph.
    """
    global _JOB
    directions = list(directions)
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"unknown direction(s) {sorted(unknown)}; use {DIRECTIONS}")
    t0 = time.perf_counter()
    model = onnx.shape_inference.infer_shapes(model)
    plan = Plan(model)
    groups: list[list[tuple[str, str]]] = []
    for d in directions:
        keys = [(c, d) for c in convs]
        n = max(1, -(-len(keys) // max(1, group)))
        n = -(-n // workers) * workers  # a multiple of the workers: none idles while another finishes
        groups += [part for part in (keys[i::n] for i in range(n)) if part]
    groups.insert(0, [(ALL, "all")])
    job = _Job(model, plan, perturber, groups, images, scorer, threads)
    seconds = {"setup": 0.0, "base_passes": 0.0, "subgraphs": 0.0}
    states: dict = {}
    workers = max(1, min(workers, len(groups)))
    with MemoryPeak() as memory:
        try:
            if workers == 1:
                _JOB = job
                results = map(_run_group, range(len(groups)))
                pool = None
            else:
                # spawn, not fork: a fork of a process whose OpenMP / ORT thread pools have run (torch
                # statistics, calibration sessions) can inherit a held lock and hang in the child
                pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(job,))
                results = pool.imap_unordered(_run_group, range(len(groups)))
            for done, (part, secs) in enumerate(results, 1):
                for key, state in part.items():
                    states[key] = scorer.merge(states[key], state) if key in states else state
                for k in seconds:
                    seconds[k] += secs[k]
                if progress:
                    progress(f"{getattr(perturber, 'name', '?')}: group {done}/{len(groups)}")
            if pool is not None:
                pool.close()
                pool.join()
        finally:
            _JOB = None
    cost = {"seconds": {**{f"{k}_cpu": v for k, v in seconds.items()}, "total": time.perf_counter() - t0},
            "peak_rss_gb": memory.gb, "workers": workers, "threads_per_worker": threads, "groups": len(groups),
            "cached_tensors": len(set().union(*(plan.boundary[c] for c in convs))) if convs else 0,
            "mean_descendant_nodes": float(np.mean([len(plan.descendants[c]) for c in convs])) if convs else 0.0,
            "graph_nodes": len(model.graph.node)}  # fmt: skip
    return states, cost


def sweep(
    model: onnx.ModelProto,
    images: np.ndarray,
    fmt: Format | Callable,
    ranges: dict | None = None,
    directions: Iterable[str] = DIRECTIONS,
    convs: list[str] | None = None,
    workers: int = 2,
    group: int = 32,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Every metric of :mod:`.metrics` for each Conv and direction, and the sweep's cost.

    ``images``: [N, 3, H, W] float32 (letterboxed). ``fmt``: a Format (with ``ranges``) or a
    perturber. ``convs``: a subset of Convs (default all). Returns ``{"records": {conv:
    {"alone": {metric: dB}, "kept": {...}}}, "all": {metric: dB}, "seconds", ...}``.
    """
    perturber = FormatPerturber(fmt, ranges) if isinstance(fmt, Format) else fmt
    directions = list(directions)
    convs = list(convs or conv_nodes(model))
    checkpoints = [n for n in (4, 8, 16, 32, 64, 128) if n < len(images)]
    states, cost = run_perturbations(model, ArrayImages(images), perturber, convs, directions, MetricScorer(checkpoints),
                                     workers=workers, group=group, threads=threads, progress=progress)  # fmt: skip
    records = {c: {d: states[c, d].metrics() for d in directions} for c in convs}
    at_images = {str(n): {c: {d: states[c, d].snapshots[n] for d in directions} for c in convs} for n in checkpoints}
    return {"format": perturber.name, "images": int(len(images)), "directions": directions, "metrics": list(METRICS),
            "records": records, "all": states[ALL, "all"].metrics(), "at_images": at_images, **cost}  # fmt: skip


def perturber(fmt: Format, model_path, ranges: dict, range_images: np.ndarray):
    """The sweep's perturber of a format: fake quantization (:mod:`lowbit_helpers.formats`), or for ``w8a8-ort``
    the quantizers of the file ORT deploys (:mod:`.deployed`, built from ``range_images``)."""
    if fmt.ort_placement:
        return DeployedPerturber(model_path, range_images)
    return FormatPerturber(fmt, ranges)


def naive(model: onnx.ModelProto, images: np.ndarray, fmt: Format | Callable, ranges: dict | None, conv: str,
          direction: str, threads: int = 2) -> tuple[dict, float]:  # fmt: skip
    """One perturbation the naive way: the whole graph rebuilt and rerun on every image.

    Returns (every metric, seconds this perturbation cost: graph edit, session, a full pass per
    image; the FP32 reference passes are not counted).
    """
    perturber = FormatPerturber(fmt, ranges) if isinstance(fmt, Format) else fmt
    disabled = getattr(perturber, "disabled_optimizers", ())
    ref_sess = sim_session(model, threads, disabled)
    feed = model.graph.input[0].name
    refs = [Reference(ref_sess.run(None, {feed: x[None]})[0]) for x in images]
    t0 = time.perf_counter()
    convs = conv_nodes(model)
    sess = sim_session(perturber(model, {conv} if direction == "alone" else set(convs) - {conv}), threads, disabled)
    acc = Accumulator()
    for x, ref in zip(images, refs):
        acc.add(ref, sess.run(None, {feed: x[None]})[0])
    return acc.metrics(), time.perf_counter() - t0


def conv_params(model: onnx.ModelProto) -> dict[str, int]:
    """Weight parameter count of each Conv."""
    inits = {i.name: i for i in model.graph.initializer}
    return {n.name: int(np.prod(inits[n.input[1]].dims)) for n in model.graph.node if n.op_type == "Conv"}


def value(sens: dict, fmt: str, conv: str, direction: str) -> float:
    """The ranking metric (``sens["metric"]``, dB) of one Conv and direction."""
    return sens["formats"][fmt]["records"][conv][direction][sens["metric"]]


def kept_gain(sens: dict, fmt: str, conv: str) -> float:
    """dB the ranking metric gains when ``conv`` alone stays float and every other Conv is in ``fmt``."""
    return value(sens, fmt, conv, "kept") - sens["formats"][fmt]["all"][sens["metric"]]


def measure(
    model_path,
    sweep_images: np.ndarray,
    range_images: np.ndarray,
    formats: list[Format],
    directions: Iterable[str] = DIRECTIONS,
    metric: str = "det_sqnr",
    workers: int = 2,
    group: int = 32,
    threads: int = 2,
    naive_check: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The sensitivity file: every Conv swept for every format, plus the naive-cost check.

    ``naive_check`` perturbations per format (the first Conv, whose descendants are the whole
    network, and Convs spread over the graph) are also computed the naive way: their metrics
    must equal the cached sweep's, and their time gives the naive cost of the full sweep.
    ``threads``: ORT threads of the range and naive passes (whole graphs); the sweep itself
    runs ``workers`` processes of one thread each.
    """

    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
    model = onnx.load(str(model_path))
    convs = conv_nodes(model)
    t0 = time.perf_counter()
    ranges = activation_ranges(model, range_images, threads)
    t_ranges = time.perf_counter() - t0
    checks = [convs[int(i)] for i in np.linspace(0, len(convs) - 1, naive_check)] if naive_check else []
    out = {
        "model": str(model_path), "model_sha256": sha256_file(model_path), "convs": convs,
        "params": conv_params(model), "macs": graph_info(model_path)["conv_macs"],
        "images": int(len(sweep_images)), "metric": metric, "metrics": list(METRICS),
        "workers": workers, "group": group, "cpu_count": os.cpu_count(),
        "calibration": {"statistic": "avgminmax (mean of per-image min / max)", "images": int(len(range_images)),
                        "seconds": t_ranges},
        "formats": {},
    }  # fmt: skip
    for fmt in formats:
        pert = perturber(fmt, model_path, ranges, range_images)
        result = sweep(model, sweep_images, pert, None, directions, workers=workers, group=group, progress=progress)
        naive_rows = []
        for conv in checks:
            for d in result["directions"]:
                values, seconds = naive(model, sweep_images, pert, None, conv, d, threads)
                naive_rows.append({"conv": conv, "direction": d, "naive": values, "seconds": seconds,
                                   "cached": result["records"][conv][d]})  # fmt: skip
        if naive_rows:
            per = float(np.mean([r["seconds"] for r in naive_rows]))
            n = len(convs) * len(result["directions"])
            diff = max(abs(r["naive"][m] - r["cached"][m]) for r in naive_rows for m in METRICS)
            result["naive"] = {"checks": naive_rows, "seconds_per_perturbation": per, "perturbations": n,
                               "estimated_seconds": per * n, "max_abs_difference_db": diff}  # fmt: skip
        out["formats"][fmt.name] = result
    return out
