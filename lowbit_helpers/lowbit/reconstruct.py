"""Block reconstruction of 4-bit codes (BRECQ, Li et al. 2021; QDrop, Wei et al. 2022), one YOLO block at a time.

Layer-wise rounding (GPTQ, AdaRound on the Conv's Hessian) sees one Conv with float inputs. Block
reconstruction sees what the deployed file computes: each top-level layer of the Ultralytics model
(a C2f, the PSA, the head, ...) is run with the 4-bit, 8-bit and activation quantizers of a
quantized ONNX file, on the inputs the *quantized* earlier layers give, and the rounding of its
4-bit Convs is learned so that its output matches FP32's:

* the quantizers are read from the file itself (:func:`file_quantizers`): for every Conv its input
  and output Q/DQ (scale, zero point, integer range), its weight (INT4 / INT8 codes times the
  per-channel scale, or float) and its bias. A Conv whose weight holds INT4 codes is learned; its
  scales stay the file's;
* each INT4 weight is ``clamp(down + h, -qmax, qmax) * s`` with ``h`` the rectified sigmoid of a
  free variable (AdaRound), started from the file's codes (``h`` 0.3 or 0.7 around ``down``), and
  Adam minimises the block's output MSE (normalised by the starting codes' error) plus AdaRound's
  regulariser, annealed after a warm-up; the codes are ``h >= 0.5``;
* activations are fake-quantized with the file's scales; during learning each activation value
  keeps its float value with probability :data:`DROP` (QDrop), which measured better than always
  quantizing in the QDrop paper and costs nothing;
* blocks are learned in order, each on the outputs of the already learned blocks before it; a block
  whose learned codes give a larger error on the calibration images than its start keeps the start.

Measured on YOLOv10n's 75 % budget integer form (``budget75-w4a8-w8a8.gptq-bc.int`` of the default run,
carried by ``ort-percentile``; ORT kernels on an AMX CPU; 32 calibration images, 300 steps of two
images per block): every block but the head ended with 10-60 % less output MSE than GPTQ's codes;
the head's raw-output MSE did not improve (its start was kept). mAP50-95 against FP32: val500
-3.48 [-4.50, -2.26] against -3.51 with GPTQ's codes, extra800 -2.54 [-3.20, -1.71] against
-2.11 [-3.15, -1.35]: no gain. The prototype before it (without the SiLU's Q/DQ in the objective)
measured -3.25 from GPTQ's codes and -4.97 from round to nearest on val500, and the head's error
measured as detection quantities (scores and decoded boxes of foreground anchors) instead of its
raw MSE -3.39. (Those files had the ``-bc`` bias recomputed for the learned codes; the file now keeps
the bias the codes were learned against.) So the default run does not reconstruct; ``params/full.yaml``
measures it.

Why our own code: no library reconstructs codes for another tool's quantizers. ``aimet-onnx`` learns
AdaRound layer by layer for the encodings its own simulation computes (min-max scales, not the
file's) and has no block objective; Brevitas' learned rounding works on Brevitas' torch layers.
Here the objective is the file's own arithmetic, and the learned codes go back into the file
unchanged (:func:`lowbit_helpers.lowbit.integer_form.integer_form`, ``codes=``).
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import LowbitError
from ..runtime import fixed_torch_threads
from ..weights import WeightSpec
from .base import Method
from .integer_form import integer_form

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid
START_H = (0.3, 0.7)  # h of a start code at down / down + 1: near enough to 0.5 that Adam can flip it in a few hundred steps
DROP = 0.5  # QDrop: the share of activation values left unquantized while learning
WARMUP = 0.2  # share of the iterations before the regulariser starts
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed linearly
LEARNING_RATE = 1e-2
REG_WEIGHT = 1.0  # against the normalised block error; 30 measured no better (more codes decided, same mAP)
SEED = 0
RECONSTRUCT_VERSION = 1  # in every reconstructed file's stage key: bump when the objective or the quantizers read change


@dataclass(frozen=True)
class ReconstructionSettings:
    """What a reconstruction depends on (part of every reconstructed file's stage key)."""

    iterations: int
    images: int
    batch: int = 2
    learning_rate: float = LEARNING_RATE
    reg_weight: float = REG_WEIGHT
    drop: float = DROP
    start_h: tuple[float, float] = START_H
    warmup: float = WARMUP
    beta: tuple[float, float] = BETA
    seed: int = SEED

    def record(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class ConvQuantizers:
    """What the file computes around one Conv."""

    x: tuple[float, int, int, int] | None  # input Q/DQ: scale, zero point, qmin, qmax
    y: tuple[float, int, int, int] | None  # output Q/DQ
    weight: np.ndarray  # dequantized (or float) weight, ONNX layout
    bias: np.ndarray | None
    sigmoid: tuple[float, int, int, int] | None = None  # SiLU after it (Sigmoid, Mul), each output Q/DQ'd by the file
    silu: tuple[float, int, int, int] | None = None
    codes: np.ndarray | None = None  # INT4 codes (int8 array) when the weight is 4-bit: learned
    scale: np.ndarray | None = None  # their per-output-channel scales
    qmax: int = WeightSpec(4).qmax  # symmetric INT4 codes, as every 4-bit method writes them


def _range(dtype: int) -> tuple[int, int]:
    info = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
            onnx.TensorProto.INT4: (-8, 7), onnx.TensorProto.UINT4: (0, 15)}  # fmt: skip
    if dtype not in info:
        raise LowbitError(f"a Q/DQ of type {onnx.TensorProto.DataType.Name(dtype)} cannot be reconstructed",
                          "reconstruct a file with int8 / uint8 activations and int4 / int8 weights")  # fmt: skip
    return info[dtype]


def file_quantizers(model: onnx.ModelProto) -> dict[str, ConvQuantizers]:
    """Every Conv's quantizers in a Q/DQ file (per-tensor activations, per-channel weights on axis 0)."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def arr(name):
        return numpy_helper.to_array(inits[name])

    def act(dq_or_q) -> tuple[float, int, int, int] | None:
        if dq_or_q is None or dq_or_q.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            return None
        scale = arr(dq_or_q.input[1])
        if scale.size != 1:
            raise LowbitError(f"{dq_or_q.name} quantizes an activation per channel",
                              "reconstruct a file with per-tensor activation scales")  # fmt: skip
        zp = inits[dq_or_q.input[2]] if len(dq_or_q.input) > 2 and dq_or_q.input[2] else None
        lo, hi = _range(zp.data_type if zp is not None else onnx.TensorProto.UINT8)
        return float(scale.reshape(())), int(numpy_helper.to_array(zp).reshape(())) if zp is not None else 0, lo, hi

    def quantized_output(n) -> tuple[float, int, int, int] | None:
        return act(next((c for c in consumers.get(n.output[0], []) if c.op_type == "QuantizeLinear"), None)) if n else None

    out = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w_dq = producer.get(node.input[1])
        codes = scale = None
        if w_dq is not None and w_dq.op_type == "DequantizeLinear":
            if any(a.name == "block_size" and a.i > 0 for a in w_dq.attribute):
                raise LowbitError(f"{node.name}'s weight has blocked scales; the reconstruction reads per-channel ones",
                                  "reconstruct an integer form (one scale per output channel)")  # fmt: skip
            raw = inits[w_dq.input[0]]
            q = numpy_helper.to_array(raw).astype(np.int32)
            s = arr(w_dq.input[1]).astype(np.float32)
            weight = (q * s.reshape(-1, *([1] * (q.ndim - 1)))).astype(np.float32)
            if raw.data_type == onnx.TensorProto.INT4:
                codes, scale = q.astype(np.int8), s
        else:
            weight = arr(node.input[1]).astype(np.float32)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            b_dq = producer.get(node.input[2])
            if b_dq is not None and b_dq.op_type == "DequantizeLinear":
                bias = (arr(b_dq.input[0]).astype(np.float64) * arr(b_dq.input[1]).astype(np.float64)).astype(np.float32)
            else:
                bias = arr(node.input[2]).astype(np.float32)
        y_q = next((c for c in consumers.get(node.output[0], []) if c.op_type == "QuantizeLinear"), None)
        # the SiLU: Conv -> [Q/DQ] -> Sigmoid -> [Q/DQ] -> Mul(x, sigmoid) -> [Q/DQ]
        y_dq = next((c for c in consumers.get(y_q.output[0], []) if c.op_type == "DequantizeLinear"), None) if y_q else None
        after = consumers.get(y_dq.output[0] if y_dq else node.output[0], [])
        sig = next((c for c in after if c.op_type == "Sigmoid"), None)
        mul = next((c for c in after if c.op_type == "Mul"), None)
        out[node.name] = ConvQuantizers(act(producer.get(node.input[0])), act(y_q), weight, bias, quantized_output(sig),
                                        quantized_output(mul) if sig else None, codes, scale)  # fmt: skip
    return out


class _QuantConv:
    """One ``nn.Conv2d`` computing what the file computes; its INT4 rounding learnable."""

    def __init__(self, name: str, module, q: ConvQuantizers, settings: ReconstructionSettings, generator):
        import torch  # late: torch costs seconds at import

        self.name, self.module, self.q, self.generator, self.drop = name, module, q, generator, 0.0
        self.saved: list = []  # (module, its instance forward or None) while the file's arithmetic is installed
        self.bias = torch.from_numpy(q.bias) if q.bias is not None else None
        self.learned = q.codes is not None
        if self.learned:
            w = torch.from_numpy(module.weight.detach().numpy().astype(np.float32))
            self.S = torch.from_numpy(q.scale.reshape(-1, *([1] * (w.ndim - 1))).copy())
            start = torch.from_numpy(q.codes.astype(np.float32))
            down = torch.minimum(torch.floor(w / self.S), start)
            self.down = torch.where(start - down > 1, start - 1, down)  # the start code is down or down + 1
            lo, hi = settings.start_h
            h0 = torch.where(start > self.down, torch.tensor(hi), torch.tensor(lo))
            p = (h0 - GAMMA) / (ZETA - GAMMA)
            self.V = torch.log(p / (1 - p)).requires_grad_(True)
            self.V0 = self.V.detach().clone()  # the start, restored where learning made the block worse
            self.hard = True
        else:
            self.W = torch.from_numpy(q.weight)

    def h(self):
        import torch  # late: torch costs seconds at import

        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def codes(self):
        import torch  # late: torch costs seconds at import

        return torch.clamp(self.down + (self.h() >= 0.5).float(), -self.q.qmax, self.q.qmax)

    def weight(self):
        import torch  # late: torch costs seconds at import

        if not self.learned:
            return self.W
        return (self.codes() if self.hard else torch.clamp(self.down + self.h(), -self.q.qmax, self.q.qmax)) * self.S

    def _fq(self, t, qp):
        import torch  # late: torch costs seconds at import

        scale, zp, lo, hi = qp
        out = torch.fake_quantize_per_tensor_affine(t, scale, zp, lo, hi)
        if self.drop > 0:
            keep = torch.rand(t.shape, generator=self.generator) < self.drop
            out = torch.where(keep, t, out)
        return out

    def silu(self, y):
        import torch  # late: torch costs seconds at import

        s = torch.sigmoid(y)
        if self.q.sigmoid is not None:
            s = self._fq(s, self.q.sigmoid)
        out = y * s
        return self._fq(out, self.q.silu) if self.q.silu is not None else out

    def forward(self, x):
        import torch.nn.functional as F  # late: with torch

        m = self.module
        if self.q.x is not None:
            x = self._fq(x, self.q.x)
        y = F.conv2d(x, self.weight(), self.bias, m.stride, m.padding, m.dilation, m.groups)
        return self._fq(y, self.q.y) if self.q.y is not None else y


def _install(qc: _QuantConv, modules: dict, on: bool) -> None:
    """Make ``qc``'s module compute the file's arithmetic, or its own again. Where the file quantizes the
    SiLU after it, the Ultralytics ``Conv`` around it (``act(conv(x))``) is replaced as a whole: its
    ``act`` is one ``nn.SiLU`` shared by every ``Conv`` of the model."""
    import torch  # late: torch costs seconds at import

    parent = modules.get(qc.name.rsplit(".", 1)[0]) if "." in qc.name else None
    wraps = (qc.q.silu is not None and getattr(parent, "conv", None) is qc.module
             and isinstance(getattr(parent, "act", None), torch.nn.SiLU))  # fmt: skip
    targets = [(qc.module, qc.forward)] + ([(parent, lambda x: qc.silu(qc.forward(x)))] if wraps else [])
    if on and not qc.saved:  # what the module ran before (Ultralytics' fuse() sets an instance forward: forward_fuse)
        qc.saved = [(module, module.__dict__.get("forward")) for module, _ in targets]
        for module, forward in targets:
            module.forward = forward
    elif not on:
        for module, before in qc.saved:
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before
        qc.saved = []


def reconstruct(torch_model, mapping: dict[str, str], quantized: onnx.ModelProto, images: np.ndarray,
                settings: ReconstructionSettings, progress=None) -> tuple[dict[str, np.ndarray], dict]:  # fmt: skip
    """Learned INT4 codes of ``quantized``'s 4-bit Convs ({ONNX Conv: int8 array of codes}) and a record.

    ``torch_model``: the Ultralytics model (fused, raw head) the file was made from; ``mapping``: ONNX
    Conv -> torch module name (:func:`lowbit_helpers.sensitivity.torch_proxy.map_convs`, verified by
    weights); ``images``: calibration images [N, 3, H, W] (``settings.images`` of them are used)."""
    qs = file_quantizers(quantized)
    four = [c for c, q in qs.items() if q.codes is not None]
    if not four:
        raise LowbitError("the file has no INT4 Conv weight to reconstruct", "give a file with 4-bit Convs (an integer form)")
    missing = [c for c in qs if c not in mapping]
    if missing:
        raise LowbitError(f"{len(missing)} Conv(s) of the file have no torch module, e.g. {missing[0]}",
                          "reconstruct a file made from this torch model (notebook 01's export)")  # fmt: skip
    if settings.images < settings.batch or len(images) < settings.images:
        raise LowbitError(f"block reconstruction needs {max(settings.images, settings.batch)} calibration images; "
                          f"{len(images)} are there and {settings.images} asked",
                          "raise data.calib_images, or lower candidates.reconstruction.images (at least its batch)")  # fmt: skip
    with fixed_torch_threads():  # codes must not depend on torch's thread count (runtime/threads.py)
        return _reconstruct(torch_model, mapping, qs, four, np.array(images[: settings.images], np.float32), settings, progress)


def _reconstruct(torch_model, mapping, qs, four, images, settings, progress):
    import torch  # late: torch costs seconds at import

    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    modules = dict(torch_model.named_modules())
    convs = {mapping[c]: _QuantConv(mapping[c], modules[mapping[c]], q, settings, generator) for c, q in qs.items()}
    to_onnx = {t: o for o, t in mapping.items()}

    def quantized(on: bool):
        for qc in convs.values():
            _install(qc, modules, on)

    layers = list(torch_model.model)
    last_use: dict[int, int] = {}
    for m in layers:
        for j in [m.f] if isinstance(m.f, int) else m.f:
            last_use[m.i - 1 if j == -1 else j] = m.i

    def inputs(store, m, idx):
        pick = [m.f] if isinstance(m.f, int) else m.f
        xs = [store[m.i - 1 if j == -1 else j][idx] for j in pick]
        return xs[0] if isinstance(m.f, int) else xs

    def run(m, store, n, chunk=4):
        return torch.cat([m(inputs(store, m, slice(k, k + chunk))) for k in range(0, n, chunk)])

    n = len(images)
    x = torch.from_numpy(images)
    fp, qt = {-1: x}, {-1: x}
    blocks = []
    try:
        for m in layers:
            with torch.no_grad():
                quantized(False)
                target = run(m, fp, n)
                quantized(True)
            mine = [qc for name, qc in convs.items() if name.startswith(f"model.{m.i}.") and qc.learned]
            if mine and settings.iterations > 0:
                blocks.append(_learn(m, mine, convs, inputs, run, qt, target, n, settings, generator, to_onnx))
                if progress:
                    progress(blocks[-1])
            with torch.no_grad():
                fp[m.i], qt[m.i] = target, run(m, qt, n)
            for j in [j for j in fp if j != m.i and last_use.get(j, -1) <= m.i]:
                del fp[j], qt[j]
    finally:
        quantized(False)
    learned = {to_onnx[name]: qc.codes().detach().numpy().astype(np.int8) for name, qc in convs.items() if qc.learned}
    changed = sum(int(np.sum(learned[c] != qs[c].codes)) for c in four)
    record = {"settings": settings.record(), "convs": len(four), "weights": int(sum(qs[c].codes.size for c in four)),
              "changed_codes": changed, "blocks": blocks, "seconds": round(time.perf_counter() - t0, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}  # fmt: skip
    return learned, record


def _learn(m, mine, convs, inputs, run, store, target, n, settings, generator, to_onnx) -> dict:
    """Learn the rounding of ``mine`` (the block's INT4 Convs) against the block's FP32 output."""
    import torch  # late: torch costs seconds at import

    t0 = time.perf_counter()
    with torch.no_grad():
        start = float(((run(m, store, n) - target) ** 2).mean())
    for qc in mine:
        qc.hard = False
    for qc in convs.values():
        qc.drop = settings.drop
    opt = torch.optim.Adam([qc.V for qc in mine], lr=settings.learning_rate)
    warm = int(settings.warmup * settings.iterations)
    total = sum(qc.V.numel() for qc in mine)
    for t in range(settings.iterations):
        idx = torch.randint(0, n, (settings.batch,), generator=generator)
        loss = ((m(inputs(store, m, idx)) - target[idx]) ** 2).mean() / max(start, 1e-30)
        if t >= warm:
            frac = (t - warm) / max(settings.iterations - warm, 1)
            beta = settings.beta[1] + (settings.beta[0] - settings.beta[1]) * (1 - frac)
            reg = sum((1 - torch.abs(2 * qc.h() - 1) ** beta).sum() for qc in mine) / total
            loss = loss + settings.reg_weight * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
    for qc in convs.values():
        qc.drop = 0.0
    for qc in mine:
        qc.hard = True
    with torch.no_grad():
        end = float(((run(m, store, n) - target) ** 2).mean())
        kept = end <= start
        if not kept:  # hard rounding of what was learned soft can lose: never leave a block worse than its start
            for qc in mine:
                qc.V.copy_(qc.V0)
    return {"layer": m.i, "type": type(m).__name__, "convs": [to_onnx[qc_name] for qc_name, qc in convs.items() if qc in mine],
            "mse_start": start, "mse_end": end, "kept": kept, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip



def quantized_outputs(torch_model, mapping: dict[str, str], quantized: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    """The torch model's output computing what ``quantized`` computes around its Convs (the objective's
    arithmetic, checked against ORT's exact Q/DQ run of the file in the tests)."""
    import torch  # late: torch costs seconds at import

    qs = file_quantizers(quantized)
    modules = dict(torch_model.named_modules())
    convs = [_QuantConv(mapping[c], modules[mapping[c]], q, ReconstructionSettings(0, 1), None) for c, q in qs.items()]
    try:
        for qc in convs:
            _install(qc, modules, True)
        with fixed_torch_threads(), torch.no_grad():
            return torch_model(torch.from_numpy(np.array(images, np.float32))).numpy()
    finally:
        for qc in convs:
            _install(qc, modules, False)


def reconstructed_integer_form(int8_model: onnx.ModelProto, float_model: onnx.ModelProto, nodes: dict[str, str], method: Method,
                               torch_model, mapping: dict[str, str], images: np.ndarray, settings: ReconstructionSettings, *,
                               stats: dict, cache: dict | None = None) -> tuple[onnx.ModelProto, dict, dict]:  # fmt: skip
    """The integer form of ``nodes`` (:func:`.integer_form.integer_form`) with its INT4 codes learned by
    :func:`reconstruct` on the quantizers of the form with the method's own codes: (model, its record,
    the reconstruction's record)."""
    start, _ = integer_form(int8_model, float_model, nodes, method, stats=stats, cache=cache)
    codes, record = reconstruct(torch_model, mapping, start, images, settings)
    q, info = integer_form(int8_model, float_model, nodes, method, stats=stats, cache=cache, codes=codes)
    return q, info, record
