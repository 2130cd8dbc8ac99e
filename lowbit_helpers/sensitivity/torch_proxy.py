"""The plan's Torch proxy: per-layer fake quantization of the Ultralytics model, and the
verified mapping between its Conv modules and the ONNX graph's Conv nodes.

The proxy quantizes one ``nn.Conv2d`` at a time with torch's own fake-quantization ops
(``torch.fake_quantize_per_channel_affine`` for weights, ``fake_quantize_per_tensor_affine``
for the input activation, ``float8_e4m3fn`` casts for fp8), with activation ranges calibrated
in torch on the same images and statistic as the ONNX sweep, and scores the raw head's SQNR
against the unquantized torch model. It is the method the plan used; notebook 04 measures how
well its ranking transfers to the ONNX graph.

Speed: the Ultralytics ``DetectionModel`` is a list of top-level layers, each reading earlier
layers' outputs (``m.f``). The clean outputs of every layer are cached per image chunk and a
perturbation inside layer ``i`` reruns only layers ``i..end`` (:func:`forward_from`), the same
idea as the ONNX sweep's sub-graphs. ``forward_from(.., 0)`` is the plain forward (tested).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from onnx import numpy_helper

from ..formats import FP8_MAX, Format
from .metrics import sqnr_db


# ------------------------------------------------------------------ name mapping
def onnx_to_torch_name(node_name: str) -> str:
    """``/model.23/one2one_cv3.2/one2one_cv3.2.0/one2one_cv3.2.0.0/conv/Conv`` -> ``model.23.one2one_cv3.2.0.0.conv``.

    torch.onnx names a node by its module scopes; a scope of a child in a ModuleList or
    Sequential repeats its parent's name with the index appended, so such a scope replaces
    its parent instead of following it. The op name at the end is dropped.
    """
    parts: list[str] = []
    for scope in node_name.strip("/").split("/")[:-1]:
        if parts and scope.startswith(parts[-1] + "."):
            parts[-1] = scope
        else:
            parts.append(scope)
    return ".".join(parts)


def map_convs(onnx_model, torch_model, atol: float = 1e-6) -> dict:
    """Map every ONNX Conv node to a torch ``nn.Conv2d`` and verify it by its weights.

    A node maps by name (:func:`onnx_to_torch_name`) when that module exists and holds the
    same weight (shape and values within ``atol``); otherwise by an exact weight match among
    the remaining modules. Nodes that match neither way, and torch Convs no node uses, are
    listed, never dropped.
    """
    import torch  # late: torch costs seconds at import

    inits = {i.name: i for i in onnx_model.graph.initializer}
    modules = {n: m for n, m in torch_model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    weights = {n: m.weight.detach().cpu().numpy() for n, m in modules.items()}

    def same(w: np.ndarray, name: str) -> bool:
        t = weights[name]
        return t.shape == w.shape and float(np.abs(t - w).max()) <= atol

    mapping, how, unmapped = {}, {}, []
    for node in onnx_model.graph.node:
        if node.op_type != "Conv":
            continue
        w = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
        guess = onnx_to_torch_name(node.name)
        if w is not None and guess in modules and same(w, guess):
            mapping[node.name], how[node.name] = guess, "name"
            continue
        found = [n for n in modules if n not in mapping.values() and w is not None and same(w, n)]
        if len(found) == 1:
            mapping[node.name], how[node.name] = found[0], "weights"
        else:
            unmapped.append(node.name)
    unused = [n for n in modules if n not in set(mapping.values())]
    return {"mapping": mapping, "matched_by": how, "unmapped_onnx": unmapped, "unused_torch": unused}


# ------------------------------------------------------------------ fake quantization
def _fake_weight(w, fmt: Format):
    import torch  # late: torch costs seconds at import

    amax = w.abs().flatten(1).amax(1).clamp_min(1e-12)
    if fmt.fp8:
        scale = (amax / FP8_MAX).view(-1, *([1] * (w.dim() - 1)))
        return (w / scale).to(torch.float8_e4m3fn).float() * scale
    qmax = 2 ** (fmt.weight_bits - 1) - 1
    zero = torch.zeros_like(amax, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, amax / qmax, zero, 0, -qmax, qmax)


def _act_quantizer(lo: float, hi: float, fmt: Format) -> Callable:
    import torch  # late: torch costs seconds at import

    if fmt.fp8:
        scale = max(abs(lo), abs(hi), 1e-8) / FP8_MAX
        return lambda x: (x / scale).to(torch.float8_e4m3fn).float() * scale
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2**fmt.act_bits - 1
    scale = max(hi - lo, 1e-8) / qmax
    zero = int(np.clip(round(-lo / scale), 0, qmax))
    return lambda x: torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, qmax)


class _Perturb:
    """Context manager: module ``name`` computes in ``fmt`` while inside."""

    def __init__(self, model, name: str, fmt: Format, ranges: dict):
        self.module = model.get_submodule(name)
        self.fmt, self.range = fmt, ranges.get(name)

    def __enter__(self):
        self.weight = self.module.weight.data
        self.module.weight.data = _fake_weight(self.weight, self.fmt)
        self.hook = None
        if self.fmt.act_bits is not None:
            q = _act_quantizer(*self.range, self.fmt)
            self.hook = self.module.register_forward_pre_hook(lambda m, args: (q(args[0]), *args[1:]))
        return self

    def __exit__(self, *exc):
        self.module.weight.data = self.weight
        if self.hook is not None:
            self.hook.remove()


# ------------------------------------------------------------------ resumable forward
def layer_outputs(model, x) -> list:
    """Every top-level layer's output for input ``x`` (the clean run that perturbations resume from)."""
    return _run_layers(model, x, [], 0)


def forward_from(model, x, cache: list, start: int):
    """The model's output when layers ``start..`` are recomputed and earlier ones come from ``cache``."""
    return _run_layers(model, x, cache, start)[-1]


def _run_layers(model, x, cache: list, start: int) -> list:
    layers = model.model
    y = list(cache[:start]) + [None] * (len(layers) - start)
    h = x if start == 0 else y[start - 1]
    for m in layers[start:]:
        if m.f != -1:
            h = y[m.f] if isinstance(m.f, int) else [h if j == -1 else y[j] for j in m.f]
        h = m(h)
        y[m.i] = h
    return y


def torch_ranges(model, modules: list[str], images: np.ndarray) -> dict[str, tuple[float, float]]:
    """Mean over images of each Conv module's per-image input min and max (as the ONNX sweep)."""
    import torch  # late: torch costs seconds at import

    lo: dict[str, list] = {n: [] for n in modules}
    hi: dict[str, list] = {n: [] for n in modules}
    hooks = []
    for n in modules:
        def record(m, args, n=n):
            lo[n].append(float(args[0].min()))
            hi[n].append(float(args[0].max()))

        hooks.append(model.get_submodule(n).register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            for x in images:
                model(torch.from_numpy(np.array(x[None])))
    finally:
        for h in hooks:
            h.remove()
    return {n: (float(np.mean(lo[n])), float(np.mean(hi[n]))) for n in modules}


def torch_sweep(model, modules: list[str], images: np.ndarray, fmt: Format, ranges: dict, chunk: int = 8,
                progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """SQNR (dB) of the raw head for each module quantized alone in ``fmt``."""
    import torch  # late: torch costs seconds at import

    t0 = time.perf_counter()
    layer_of = {n: int(n.split(".")[1]) for n in modules}  # "model.<i>.<...>"
    signal = 0.0
    noise = dict.fromkeys(modules, 0.0)
    with torch.inference_mode():
        for start in range(0, len(images), chunk):
            block = [torch.from_numpy(np.array(x[None])) for x in images[start : start + chunk]]
            caches = [layer_outputs(model, x) for x in block]
            refs = [c[-1].double() for c in caches]
            signal += float(sum((r**2).sum() for r in refs))
            for n in modules:
                with _Perturb(model, n, fmt, ranges):
                    for x, cache, ref in zip(block, caches, refs):
                        out = forward_from(model, x, cache, layer_of[n])
                        noise[n] += float(((out.double() - ref) ** 2).sum())
            if progress:
                progress(f"torch {fmt.name}: {min(start + chunk, len(images))}/{len(images)} images")

    sqnr = {n: sqnr_db(signal, noise[n]) for n in modules}
    return {"format": fmt.name, "images": int(len(images)), "sqnr_db": sqnr, "seconds": time.perf_counter() - t0}
