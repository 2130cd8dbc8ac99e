"""Intermediate tensors of a model, image by image: the one collector behind every activation statistic.

INT8 calibration ranges, the sensitivity sweep's ranges, GPTQ's input statistics and the INT8
bias correction all read Conv inputs (or other intermediate tensors) of the FP32 graph on
calibration images; each reduces them its own way, all read them here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from .sessions import make_session


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """Copy of ``model`` that also returns the named intermediate float tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            have.add(name)
    return out


class Activations:
    """One session of ``model`` that returns ``names`` too; :meth:`of` gives them for one image.

    ``arithmetic``: see :func:`.sessions.make_session`; the default, ``simulated``, runs the FP32
    graph with every float optimization (the statistics' images are run one at a time)."""

    def __init__(self, model: onnx.ModelProto | str | Path, names: Iterable[str], threads: int = 2,
                 arithmetic: str = "simulated"):  # fmt: skip
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model))
        self.names = list(dict.fromkeys(names))
        self.session = make_session(with_outputs(model, self.names), threads=threads, arithmetic=arithmetic,
                                    memory_arena=False)  # fmt: skip
        self.feed = self.session.get_inputs()[0].name

    def of(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The named tensors for one image (C x H x W float32)."""
        x = np.ascontiguousarray(image[None], np.float32)
        return dict(zip(self.names, self.session.run(self.names, {self.feed: x})))

    def each(self, images: Sequence[np.ndarray], order: Iterable[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """:meth:`of` every image, in ``order`` (default: as given); memory stays one forward pass."""
        for i in range(len(images)) if order is None else order:
            yield self.of(images[i])


def activations(model: onnx.ModelProto | str | Path, names: Iterable[str], images: Sequence[np.ndarray],
                threads: int = 2, arithmetic: str = "simulated") -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
    """The named tensors of ``model`` for each image in turn (see :class:`Activations`)."""
    return Activations(model, names, threads, arithmetic).each(images)
