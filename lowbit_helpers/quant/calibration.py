"""Calibration data for ORT / ModelOpt, streamed from the run's calibration tensor.

ORT's histogram calibrators (Entropy, Percentile) keep every intermediate activation of every
image they are given before building histograms: 32 images of YOLOv10m at 640 exhausted 24 GB
here. ``quantize_static`` also offers a strided collection (``CalibStridedMinMax``): it hands
the calibrator ``stride`` images at a time, and the calibrator merges each slice into its
running histograms (or min/max) before the next. :class:`ArrayReader` supports that protocol,
so every method runs with memory bounded by one slice, whatever the image count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from ..errors import LowbitError


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


class ArrayReader(CalibrationDataReader):
    """One image per ``get_next``; ``set_range`` restricts it to a slice (ORT's strided calibration)."""

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


def largest_divisor_at_most(n: int, limit: int) -> int:
    """ORT's strided collection needs a stride that divides the image count."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)
