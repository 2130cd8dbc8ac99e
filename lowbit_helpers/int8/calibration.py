"""Calibration data and activation ranges, from the run's calibration tensor.

ORT's histogram calibrators (Entropy, Percentile) keep every intermediate activation of every
image they are given before building histograms (32 images of YOLOv10m at 640 exhausted 24 GB
here), and merging slices of images is inexact in ORT 1.24 (see :func:`activation_ranges`).
The ORT recipe therefore takes its ranges from :func:`activation_ranges`: one image at a time,
reduced exactly, the same whatever the slicing or order. :class:`ArrayReader` feeds ORT's and
ModelOpt's calibrators (one image per ``get_next``).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from ..errors import LowbitError
from ..runtime import Activations


def load_calibration(path: str | Path, count: int | None = None) -> np.ndarray:
    """The (N, 3, 640, 640) float32 calibration tensor, memory-mapped (read lazily)."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"calibration tensor not found: {path}", "run notebook 02 (or the whole pipeline) first")
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 4 or arr.shape[1:] != (3, 640, 640) or arr.dtype != np.float32:
        raise LowbitError(f"{path}: expected N x 3 x 640 x 640 float32, found {arr.shape} {arr.dtype}",
                          "rebuild it with the calibration stage")  # fmt: skip
    if count is not None:
        if count > len(arr):
            raise LowbitError(f"{count} calibration images requested, {path} holds {len(arr)}",
                              "lower the count or rebuild the tensor with more images")  # fmt: skip
        arr = arr[:count]
    return arr


class ArrayReader:
    """One image per ``get_next``: ORT's ``CalibrationDataReader`` interface (which takes any class with
    ``get_next`` as its own); ``set_range`` restricts it to a slice."""

    def __init__(self, data: np.ndarray, input_name: str = "images"):
        self.data = data
        self.input_name = input_name
        self.set_range(0, len(data))

    def __len__(self) -> int:
        return len(self.data)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pos, self._end = start_index, min(end_index, len(self.data))

    def get_next(self):
        if self._pos >= self._end:
            return None
        x = np.ascontiguousarray(self.data[self._pos : self._pos + 1])
        self._pos += 1
        return {self.input_name: x}

    def rewind(self) -> None:
        self.set_range(0, len(self.data))

    def __iter__(self):
        return iter(self.get_next, None)


# ----------------------------------------------------------------- activation ranges
# ORT 1.24's calibrators merge slices inexactly: the histogram collectors take their bin width
# from the first slice (later slices only widen it in steps of that width), and MinMax with
# CalibMovingAverage averages within a slice but merges slices as an exponential moving average.
# So ORT's ranges depend on how the images are sliced and ordered. The ranges here do not: they
# are computed from per-image statistics, one image at a time (memory: one forward pass of
# activations), and reduced exactly at the end. ORT's own code still picks the tensors to
# calibrate (its calibrator's augmented model) and still turns a histogram into a threshold
# (its HistogramCollector's percentile / entropy search), fed with a histogram whose edges are
# fixed by the global range (a second pass over the images). No library computes such
# slicing-independent ranges for ORT's quantize_static, hence this code.

RANGE_METHODS = ("avgminmax", "minmax", "percentile", "entropy")
RANGES_VERSION = 5  # 1: ORT's own calibrators (slicing-dependent); 2: activation_ranges; 3: with ORT's Softmax / Relu
#                     range adjustments (int8/ort.py: _ort_adjusted); 4: entropy on ENTROPY_BINS; 5: the same ranges, the
#                     recipe naming this function at its new path (int8/calibration.py). Part of the ORT recipe's stage key.
# ORT's Entropy default is 128 bins for 128 quantized bins: on one fixed histogram its KL search then
# has a single candidate, the full range (= minmax). ORT's own merge only escaped that by growing the
# histogram slice by slice. 2048 bins (TensorRT's entropy calibrator's count) give it 961 candidates.
ENTROPY_BINS = 2048


def quantized_op_types(op_types: list[str] | None) -> list[str]:
    """The op types ``quantize_static`` quantizes (and calibrates) for ``op_types`` (None: all it knows)."""
    from onnxruntime.quantization.registry import (  # late: ORT's quantization imports torch
        QDQRegistry,
        QLinearOpsRegistry,
    )

    return sorted(op_types) if op_types else sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def activation_ranges(model: str | Path, calib: np.ndarray, method: str, op_types: list[str] | None = None,
                      percentile: float = 99.999, order: list[int] | None = None,
                      threads: int = 2) -> dict[str, tuple[np.float32, np.float32]]:  # fmt: skip
    """Per tensor ORT would calibrate, its (rmin, rmax), independent of slicing and image order.

    * ``minmax``: the global min and max over all images;
    * ``avgminmax``: the mean of the per-image min and of the per-image max (exact sums);
    * ``percentile`` (asymmetric, ``percentile`` and 100 − ``percentile`` cut evenly) and
      ``entropy``: ORT's own search on one histogram per tensor over all images, with ORT's bin
      count and edges spanning [-T, T], T the largest |value| over all images.

    ``order`` (a permutation of the images) exists for the test that the result does not depend on it.
    """
    from onnxruntime.quantization import CalibrationMethod  # late: ORT's quantization imports torch (seconds)
    from onnxruntime.quantization.calibrate import HistogramCollector, create_calibrator  # late: as above

    if method not in RANGE_METHODS:
        raise LowbitError(f"unknown calibration method {method!r}", f"use one of {', '.join(RANGE_METHODS)}")
    if len(calib) == 0:
        raise LowbitError("no calibration images", "build the calibration tensor with at least one image")
    order = list(range(len(calib))) if order is None else list(order)
    with tempfile.TemporaryDirectory(prefix="lowbit.ranges.") as tmp:
        calibrator = create_calibrator(
            Path(model), quantized_op_types(op_types), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.Percentile,
            extra_options={"symmetric": False, "percentile": percentile,
                           **({"num_bins": ENTROPY_BINS} if method == "entropy" else {})},
        )  # fmt: skip
        names = sorted(calibrator.tensors_to_calibrate)
        # the graph as written (ORT's calibrator runs it with optimizations off too)
        acts = Activations(model, names, threads, arithmetic="exact")

        # pass 1: per-image min / max of every tensor
        mins: dict[str, list[float]] = {t: [] for t in names}
        maxs: dict[str, list[float]] = {t: [] for t in names}
        for values in acts.each(calib, order):
            for t, a in values.items():
                mins[t].append(float(np.nanmin(a)) if a.size else 0.0)
                maxs[t].append(float(np.nanmax(a)) if a.size else 0.0)
        names = [t for t in names if mins[t]]
        if method == "minmax":
            return {t: (np.float32(min(mins[t])), np.float32(max(maxs[t]))) for t in names}
        if method == "avgminmax":
            n = len(order)
            return {t: (np.float32(math.fsum(mins[t]) / n), np.float32(math.fsum(maxs[t]) / n)) for t in names}
        # pass 2: one histogram per tensor over all images, edges fixed by the global range
        lo = {t: np.float32(min(mins[t])) for t in names}
        hi = {t: np.float32(max(maxs[t])) for t in names}
        thr = {t: np.float32(max(abs(lo[t]), abs(hi[t]))) for t in names}
        bins = calibrator.num_bins
        hists = {t: np.zeros(bins, np.int64) for t in names}
        for values in acts.each(calib, order):
            for t, a in values.items():
                hists[t] += np.histogram(a.ravel(), bins, range=(-thr[t], thr[t]))[0]
        collector = HistogramCollector(method=calibrator.method, symmetric=False, num_bins=bins,
                                       num_quantized_bins=calibrator.num_quantized_bins, percentile=percentile,
                                       scenario=calibrator.scenario)  # fmt: skip
        collector.histogram_dict = {
            # edges as ORT's collector makes them (np.histogram of float32 data): they depend on the range only
            t: (hists[t], np.histogram(np.zeros(1, np.float32), bins, range=(-thr[t], thr[t]))[1], lo[t], hi[t], thr[t])
            for t in names
        }  # fmt: skip
        calibrator.collector = collector
        data = calibrator.compute_data()
        return {t: (np.float32(data[t].range_value[0]), np.float32(data[t].range_value[1])) for t in names}
