"""INT8 with NNCF's post-training quantization: the best peer's recipe, as a row beside ours.

``nncf.quantize`` with the same calibration images as the other recipes, either on the ONNX
graph itself (NNCF's ONNX backend, ``target="onnx"``: a Q/DQ ONNX) or on the OpenVINO model
converted from it (``target="openvino"``: an OpenVINO IR, ``.xml`` + ``.bin``, NNCF's own
deployment path). OpenVINO 2026.4 computes NNCF's *ONNX* Q/DQ wrongly here (mAP near 0 on
YOLOv10n, while ORT runs the same file right), so OpenVINO rows come from the IR. Both: the MIXED preset (symmetric per-channel int8 weights, asymmetric
uint8 activations), with its full bias correction or the fast one, and the head's final Convs
(the head policy) in its ignored scope. NNCF places activation quantizers on the *inputs* of
the compute ops (after SiLU, not on Conv outputs), which is what OpenVINO fuses; ORT's x86
QLinearConv fusion needs a quantized Conv output, so ORT runs almost all of it as float Convs
between Q/DQ (the table's QLinearConv column shows it).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from ..artifacts import atomic_path, sha256_file, write_json
from ..errors import LowbitError
from .base import Int8Backend, Int8Options, OptionSpec
from .policy import checked_exclusions

NNCF_METHODS = ("mixed", "performance")  # NNCF's QuantizationPreset
BIAS_CORRECTIONS = ("full", "fast")


TARGETS = ("onnx", "openvino")


def quantize_int8_nncf(model_in: str | Path, model_out: str | Path, calib: np.ndarray, method: str = "mixed",
                       head_policy: str = "conservative", exclude: list[str] | None = None,
                       bias_correction: str = "full", target: str = "onnx") -> dict:  # fmt: skip
    """Quantize ``model_in`` to ``model_out`` (``.onnx``, or ``.xml`` for the OpenVINO IR) with NNCF;
    returns (and saves beside it) the recipe."""

    try:
        import nncf  # late: nncf is optional, only its recipe needs it
    except ImportError:
        raise LowbitError("the nncf package is not installed", "install the pinned environment or pip install nncf") from None
    if bias_correction not in BIAS_CORRECTIONS:
        raise LowbitError(f"unknown bias correction {bias_correction!r}", f"use one of {', '.join(BIAS_CORRECTIONS)}")
    model_out = Path(model_out)
    suffix = {"onnx": ".onnx", "openvino": ".xml"}.get(target)
    if suffix is None:
        raise LowbitError(f"unknown NNCF target {target!r}", f"use one of {', '.join(TARGETS)}")
    if model_out.suffix != suffix:
        raise LowbitError(f"NNCF target {target} writes a {suffix} file, not {model_out.name}", f"name the output *{suffix}")
    excluded = checked_exclusions(model_in, calib, method, NNCF_METHODS, "NNCF", head_policy, exclude)
    preset = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}[method]
    if target == "onnx":
        model = onnx.load(str(model_in))
        name = model.graph.input[0].name
        # one image per item, read from the (memory-mapped) tensor only when NNCF asks for it
        dataset = nncf.Dataset(range(len(calib)), lambda i: {name: np.ascontiguousarray(calib[i : i + 1])})
        ignored = excluded
    else:
        import openvino as ov  # late: openvino is optional: only its rows need it

        model = ov.convert_model(str(model_in))
        dataset = nncf.Dataset(range(len(calib)), lambda i: np.ascontiguousarray(calib[i : i + 1]))
        # OpenVINO splits an ONNX Conv into Convolution "<name>/WithoutBiases" and the bias Add "<name>"
        ops = {op.get_friendly_name() for op in model.get_ordered_ops()}
        ignored = [n for e in excluded for n in (e, f"{e}/WithoutBiases") if n in ops]
    call = {"api": "nncf.quantize", "nncf": nncf.__version__, "target": target, "preset": method.upper(),
            "subset_size": len(calib), "fast_bias_correction": bias_correction == "fast", "ignored_scope": ignored,
            "calibration_images": len(calib)}  # fmt: skip
    t0 = time.perf_counter()
    quantized = nncf.quantize(model, dataset, preset=preset, subset_size=len(calib),
                              fast_bias_correction=bias_correction == "fast",
                              ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))  # fmt: skip
    if target == "onnx":
        with atomic_path(model_out) as tmp:
            onnx.save(quantized, str(tmp))
    else:
        _save_ir(quantized, model_out)
    recipe = {"backend": "nncf", "method": method, "head_policy": head_policy, "bias_correction": bias_correction,
              "target": target, "call": call, "seconds": time.perf_counter() - t0, "input": str(model_in),
              "input_sha256": sha256_file(model_in), "output_sha256": sha256_file(model_out)}  # fmt: skip
    write_json(model_out.with_suffix(".recipe.json"), recipe)
    return recipe


def _save_ir(model, xml: Path) -> None:
    """``xml`` and its ``.bin``, both moved into place only once both are written."""

    import openvino as ov  # late: openvino is optional: only its rows need it

    with tempfile.TemporaryDirectory(dir=xml.parent) as scratch:
        tmp = Path(scratch) / xml.name
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)


class NncfBackend(Int8Backend):
    """NNCF's post-training quantization: the best peer's recipe (ONNX Q/DQ or an OpenVINO IR)."""

    name, title, library = "nncf", "NNCF", "nncf"
    help = "the peer: NNCF MIXED"
    methods, default_method = NNCF_METHODS, "mixed"
    bias_corrections, default_bias_correction, corrects_file = BIAS_CORRECTIONS, "full", False
    options = {
        "format": OptionSpec("--format", "a Q/DQ ONNX, or an OpenVINO IR (--out model.xml; OpenVINO runs it, ORT cannot)",
                             choices=TARGETS),
    }  # fmt: skip

    def quantize(self, model_in, model_out, calib, o: Int8Options) -> dict:
        return quantize_int8_nncf(model_in, model_out, calib, method=o.method, head_policy=o.head_policy,
                                  exclude=list(o.exclude), bias_correction=o.bias_correction, target=o.format)  # fmt: skip

    def command_args(self, o: Int8Options) -> list[str]:
        return ["--bias-correction", o.bias_correction] + (["--format", o.format] if o.format != "onnx" else [])
