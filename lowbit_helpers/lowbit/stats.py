"""Input statistics of Conv layers for layer-wise 4-bit methods (GPTQ, AdaRound, MSE clipping, bias correction).

A Conv ``y = W * x`` with ``groups = g`` is, per group j and output position, a matrix product
``W_j [Cout/g, d] @ X_j [d, L]`` where ``X_j`` are the unfolded input patches (``d = Cin/g *
kh * kw``, channel-major like the weight). From calibration images we accumulate, per Conv and
group, ``H_j = sum X_j X_j^T`` and ``m_j = sum X_j`` over positions (:class:`ConvStats`), from
the FP32 model on calibration images only (never evaluation images), read through the one
activation collector (:class:`lowbit_helpers.runtime.Activations`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..runtime import Activations, fixed_torch_threads


@dataclass
class ConvGeometry:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]
    group: int

    @classmethod
    def of(cls, node: onnx.NodeProto, w_shape: tuple) -> "ConvGeometry":
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ValueError(f"{node.name}: auto_pad is not supported (export with explicit pads)")
        pads = tuple(a.get("pads", [0, 0, 0, 0]))
        return cls(tuple(w_shape[2:]), tuple(a.get("strides", [1, 1])), (pads[0], pads[1], pads[2], pads[3]),
                   tuple(a.get("dilations", [1, 1])), int(a.get("group", 1)))  # fmt: skip


@dataclass
class ConvStats:
    """Sums over calibration positions of ``X X^T`` [g, d, d] and ``X`` [g, d], and their count."""

    geometry: ConvGeometry
    xxt: np.ndarray
    xsum: np.ndarray
    count: int = 0

    @property
    def hessian(self) -> np.ndarray:
        return self.xxt / max(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.xsum / max(self.count, 1)


def unfold(x: np.ndarray, geo: ConvGeometry):
    """Input patches of a Conv, per group: torch tensor [g, d, L] (channel-major like the weight)."""
    import torch  # late: torch costs seconds at import, kept off the command line's start-up
    import torch.nn.functional as F  # late: with torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    top, left, bottom, right = geo.pads
    t = F.pad(t, (left, right, top, bottom))
    cols = F.unfold(t, geo.kernel, dilation=geo.dilations, stride=geo.strides)  # [N, C*kh*kw, L]
    n, cd, L = cols.shape
    cols = cols.reshape(n, geo.group, cd // geo.group, L).permute(1, 2, 0, 3).reshape(geo.group, cd // geo.group, n * L)
    return cols


@dataclass
class StatsCollector:
    """Accumulates :class:`ConvStats` for chosen Convs of a float ONNX graph over images."""

    model: onnx.ModelProto
    convs: list[str]
    threads: int = 2
    stats: dict[str, ConvStats] = field(default_factory=dict)

    def __post_init__(self):
        g = self.model.graph
        inits = {i.name: i for i in g.initializer}
        by_name = {n.name: n for n in g.node}
        self._inputs = {}
        for name in self.convs:
            node = by_name[name]
            w_shape = tuple(inits[node.input[1]].dims)
            geo = ConvGeometry.of(node, w_shape)
            d = w_shape[1] * w_shape[2] * w_shape[3]
            self.stats[name] = ConvStats(geo, np.zeros((geo.group, d, d), np.float64), np.zeros((geo.group, d), np.float64))
            self._inputs[name] = node.input[0]
        self._activations = Activations(self.model, sorted(set(self._inputs.values())), self.threads)

    def add(self, images: np.ndarray) -> None:
        import torch  # late: torch costs seconds at import, kept off the command line's start-up

        with fixed_torch_threads():
            for values in self._activations.each(images):
                for name, st in self.stats.items():
                    cols = unfold(values[self._inputs[name]], st.geometry)  # float32 products, float64 sums
                    st.xxt += torch.bmm(cols, cols.transpose(1, 2)).double().numpy()
                    st.xsum += cols.double().sum(dim=2).numpy()
                    st.count += cols.shape[2]


def collect_stats(model: onnx.ModelProto, convs: list[str], images: np.ndarray, threads: int = 2) -> dict[str, ConvStats]:
    c = StatsCollector(model, convs, threads)
    c.add(images)
    return c.stats


def _rows(w: np.ndarray, group: int) -> np.ndarray:
    """Weight [Cout, Cin/g, kh, kw] as [g, Cout/g, d]."""
    return w.reshape(group, w.shape[0] // group, -1)


def importance(stats: ConvStats, w_shape: tuple) -> np.ndarray:
    """Mean square of the input each weight multiplies (diag of the Hessian), shape ``w_shape``."""
    diag = np.diagonal(stats.hessian, axis1=1, axis2=2)  # [g, d]
    g = stats.geometry.group
    return np.repeat(diag[:, None, :], w_shape[0] // g, axis=1).reshape(w_shape).astype(np.float32)
