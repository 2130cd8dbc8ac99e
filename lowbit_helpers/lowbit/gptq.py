"""Layer-wise reconstruction for Conv weights: input statistics, GPTQ rounding, bias correction.

Why our own code: the libraries that implement GPTQ / AdaRound (Brevitas, AIMET, AutoGPTQ,
llm-compressor) work on torch ``nn.Linear`` modules or on their own graph formats, not on an
ONNX Conv graph whose deployed form is ``DequantizeLinear`` with int4 codes; and their codes
cannot be handed to ORT's ``quantize_static``, which re-derives weights from floats. The
algorithm is short; here it is written against the ONNX graph that is deployed.

A Conv ``y = W * x`` with ``groups = g`` is, per group j and output position, a matrix product
``W_j [Cout/g, d] @ X_j [d, L]`` where ``X_j`` are the unfolded input patches (``d = Cin/g *
kh * kw``, channel-major like the weight). From calibration images we accumulate, per Conv and
group, ``H_j = sum X_j X_j^T`` and ``m_j = sum X_j`` over positions (``ConvStats``):

* GPTQ (Frantar et al., 2022) quantizes the columns of ``W_j`` one at a time and moves each
  column's rounding error onto the columns not yet quantized, weighted by the inverse of
  ``H_j``, which minimises ``||W_j X_j - Q_j X_j||^2`` far better than rounding to nearest.
  Scales are fixed before rounding (from :mod:`.weights`), so per-channel and blocked scales
  are handled alike and act-order (largest ``diag(H)`` first) is free to permute columns.
* Bias correction: the expected output error of a quantized weight is ``(Q_j - W_j) mean(X_j)``
  per output channel; subtracting it from the bias removes the error's mean on calibration
  images.

Statistics come from the FP32 model on calibration images only (never evaluation images).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..runtime import Activations
from ..weights import WeightSpec, compute_scale, expand_scale


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
    import torch
    import torch.nn.functional as F

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


def gptq_codes(w: np.ndarray, scale: np.ndarray, spec: WeightSpec, stats: ConvStats, damp: float = 0.01,
               act_order: bool = True, block_cols: int = 128) -> np.ndarray:  # fmt: skip
    """GPTQ integer codes of ``w`` for fixed scales (ONNX layout), same shape as ``w``.

    All groups of a grouped (e.g. depthwise) Conv are solved at once as a batch.
    """
    import torch

    g = stats.geometry.group
    W = torch.from_numpy(_rows(np.asarray(w, np.float32), g).astype(np.float64))  # [g, r, d]
    S = torch.from_numpy(_rows(expand_scale(scale, w.shape, spec.block), g).astype(np.float64))
    H = torch.from_numpy(stats.hessian).clone()  # [g, d, d]
    d = H.shape[-1]
    diag = torch.diagonal(H, dim1=1, dim2=2)
    dead = diag == 0
    H = H + torch.diag_embed(dead.double())  # a dead input (always 0) gets H = 1 and weight 0
    W[dead[:, None, :].expand_as(W)] = 0.0
    diag = torch.diagonal(H, dim1=1, dim2=2)
    perm = torch.argsort(diag, dim=1, descending=True) if act_order else torch.arange(d).expand(g, d)
    W, S = torch.gather(W, 2, perm[:, None, :].expand_as(W)), torch.gather(S, 2, perm[:, None, :].expand_as(S))
    H = torch.gather(torch.gather(H, 1, perm[:, :, None].expand_as(H)), 2, perm[:, None, :].expand_as(H))
    H = H + torch.diag_embed(damp * diag.mean(dim=1, keepdim=True).expand(g, d))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    qmax = spec.qmax
    for i1 in range(0, d, block_cols):
        i2 = min(i1 + block_cols, d)
        W1, S1, U1 = W[:, :, i1:i2].clone(), S[:, :, i1:i2], U[:, i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, :, i]
            q = torch.clamp(torch.round(col / S1[:, :, i]), -qmax, qmax)
            Q[:, :, i1 + i] = q
            err = (col - q * S1[:, :, i]) / U1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * U1[:, i, i:][:, None, :]
            E1[:, :, i] = err
        W[:, :, i2:] -= E1 @ U[:, i1:i2, i2:]
    Q = torch.gather(Q, 2, torch.argsort(perm, dim=1)[:, None, :].expand_as(Q))
    return Q.reshape(w.shape).numpy().astype(np.int8)


def bias_correction(w: np.ndarray, w_q: np.ndarray, stats: ConvStats) -> np.ndarray:
    """Per output channel, the mean output error ``(Q - W) mean(X)`` on calibration images."""
    g = stats.geometry.group
    delta = _rows(np.asarray(w_q, np.float64) - np.asarray(w, np.float64), g)  # [g, co/g, d]
    return np.einsum("gcd,gd->gc", delta, stats.mean).reshape(-1).astype(np.float32)


def scales_for(w: np.ndarray, spec: WeightSpec, stats: ConvStats | None) -> np.ndarray:
    """Scales under ``spec``; the MSE clip search weights errors by input energy when stats exist."""
    imp = importance(stats, w.shape) if (stats is not None and spec.clip == "mse") else None
    return compute_scale(w, spec, imp)


def conv_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    inits = {i.name: i for i in model.graph.initializer}
    return numpy_helper.to_array(inits[node.input[1]])
