"""INT8 Q/DQ with ONNX Runtime's ``quantize_static``: the CPU-deployable recipe.

uint8 activations (asymmetric) and int8 per-channel weights (symmetric), QDQ format: on x86
ORT fuses every such Conv into QLinearConv. int8 activations (S8S8) fuse almost nothing
there and run slower; they are offered for TensorRT alone (``activations: int8-symmetric``, zero
point 0, with ``placement: conv-inputs``: the file TensorRT builds from, :mod:`.tensorrt`). Calibration (:func:`.calibration.activation_ranges`,
one image at a time, independent of slicing and order): MinMax, Percentile or Entropy, or
``avgminmax``: each tensor's range is the mean of its per-image min and max. Outlier images
then widen a range by 1/N of their excess instead of setting it: on YOLOv10n val500 this lost
1.45 points where plain MinMax lost 3.8 and Percentile 1.8, so it is the default.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx

from ..artifacts import atomic_path, sha256_file, write_json
from ..errors import LowbitError
from .base import Int8Backend, Int8Options, OptionSpec
from .calibration import RANGES_VERSION, ArrayReader, activation_ranges
from .policy import checked_exclusions

ORT_METHODS = ("avgminmax", "minmax", "percentile", "entropy")
# where the Q/DQ go: ``all`` is quantize_static's default (inputs and outputs of every op it knows:
# Conv outputs, Sigmoid, Mul, Concat, Add, ...), which ORT's CPU fuses into QLinearConv and
# friends; ``conv-inputs`` quantizes only each Conv's input and weights (NNCF's and TensorRT's
# placement: one quantizer per activation, after SiLU, none on the heavy-tailed pre-activation
# Conv outputs). ORT runs that one in float (slower than FP32), OpenVINO fuses it.
PLACEMENTS = ("all", "conv-inputs")
# the activations' integer type: ``uint8`` with an asymmetric range (the CPU's u8s8 kernels), or
# ``int8-symmetric`` (zero point 0, scale max|range| / 127: what TensorRT takes, as ModelOpt writes it)
ACTIVATIONS = ("uint8", "int8-symmetric")


def _ort_adjusted(model_in: str | Path, ranges: dict, excluded: list[str], op_types: list[str] | None) -> dict:
    """``ranges`` with the adjustments ORT's quantizer makes to calibrated ranges
    (``BaseQuantizer.adjust_tensor_ranges``), which ``TensorQuantOverrides`` would otherwise bypass:
    a quantized Softmax's output is [0, 1]; a quantized Relu / Clip's (sole-consumer) input takes
    its output's range. Without the first, YOLOv10's attention Softmax got its data range."""

    g = onnx.load(str(model_in), load_external_data=False).graph
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    out = dict(ranges)
    for n in g.node:
        if n.name in excluded or (op_types and n.op_type not in op_types):
            continue
        if n.op_type == "Softmax" and n.output[0] in out:
            out[n.output[0]] = (np.float32(0.0), np.float32(1.0))
        elif n.op_type in ("Relu", "Clip") and consumers.get(n.input[0]) == 1 and n.input[0] in out and n.output[0] in out:
            out[n.input[0]] = out[n.output[0]]
    return out


def _check_ranges_used(path: Path, ranges: dict) -> None:
    """Every activation quantizer of the written file has its range from ``ranges`` (none from the
    single image ORT's own calibrator saw)."""

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    # ORT renames a quantized graph output x to x_QuantizeLinear_Input (Q -> DQ -> x); its range is x's
    quantized = {n.input[0].removesuffix("_QuantizeLinear_Input") for n in g.node
                 if n.op_type == "QuantizeLinear" and n.input[0] not in inits}  # fmt: skip
    missing = sorted(quantized - set(ranges))
    if missing:
        raise LowbitError(f"ORT quantized {len(missing)} tensor(s) without a computed range, e.g. {missing[0]!r}",
                          "report this: activation_ranges must cover every tensor quantize_static calibrates")  # fmt: skip


def quantize_int8_ort(model_in: str | Path, model_out: str | Path, calib: np.ndarray, method: str = "avgminmax",
                      head_policy: str = "conservative", exclude: list[str] | None = None,
                      percentile: float = 99.999, reduce_range: bool = False, placement: str = "all",
                      activations: str = "uint8") -> dict:  # fmt: skip
    """Quantize ``model_in`` to ``model_out``; returns (and saves beside it) the exact recipe.

    Activation ranges come from :func:`.calibration.activation_ranges` (per-image statistics,
    the same whatever the slicing or order of the images, memory bounded by one image) and reach
    ``quantize_static`` as its ``TensorQuantOverrides`` (rmin / rmax) for every tensor it
    calibrates; its own calibrator then sees one image only and decides nothing.

    ``reduce_range``: 7-bit weights ([-64, 64] per channel), ORT's remedy for CPUs without
    VNNI, whose u8s8 kernels saturate int16 pair sums of full-range weights
    (:mod:`.kernel_check`); it costs one bit of weight resolution everywhere.
    ``placement``: see :data:`PLACEMENTS`; ``activations``: see :data:`ACTIVATIONS` (the ranges are
    computed alike; ORT makes a symmetric one from them).
    """
    from onnxruntime.quantization import (  # late: imports torch
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model_out = Path(model_out)
    excluded = checked_exclusions(model_in, calib, method, ORT_METHODS, "ORT", head_policy, exclude)
    if placement not in PLACEMENTS:
        raise LowbitError(f"unknown Q/DQ placement {placement!r}", f"use one of {', '.join(PLACEMENTS)}")
    if activations not in ACTIVATIONS:
        raise LowbitError(f"unknown activation type {activations!r}", f"use one of {', '.join(ACTIVATIONS)}")
    # asymmetric uint8 activation ranges: a symmetric [-t, t] range wastes half of uint8 on SiLU outputs
    # (-0.28 .. t); measured here: 1.8 points of YOLOv10n mAP50-95 on val100 (ORT's symmetric percentile).
    # TensorRT takes symmetric int8 only (int8-symmetric)
    signed = activations == "int8-symmetric"
    extra: dict = {"ActivationSymmetric": signed, "WeightSymmetric": True}
    if signed:  # TensorRT dequantizes int8 only: the bias stays float, as ModelOpt leaves it
        extra["QuantizeBias"] = False
    act_type = "QInt8" if signed else "QUInt8"
    op_types = None
    if placement == "conv-inputs":
        op_types, extra["OpTypesToExcludeOutputQuantization"] = ["Conv"], ["Conv"]
    t0 = time.perf_counter()
    ranges = _ort_adjusted(model_in, activation_ranges(model_in, calib, method, op_types, percentile), excluded, op_types)
    range_seconds = time.perf_counter() - t0
    call = {
        "api": "onnxruntime.quantization.quantize_static",
        "quant_format": "QDQ", "activation_type": act_type, "weight_type": "QInt8", "per_channel": True,
        "reduce_range": reduce_range, "op_types_to_quantize": op_types, "nodes_to_exclude": excluded,
        "extra_options": {**extra, "TensorQuantOverrides": f"rmin / rmax of {len(ranges)} tensors"},
        "ranges": {"function": "lowbit_helpers.int8.calibration.activation_ranges", "method": method,
                   **({"percentile": percentile} if method == "percentile" else {}), "images": len(calib),
                   "seconds": round(range_seconds, 1)},
        "calibration_images": len(calib),
    }  # fmt: skip
    extra["TensorQuantOverrides"] = {t: [{"rmin": lo, "rmax": hi}] for t, (lo, hi) in ranges.items()}
    with atomic_path(model_out) as tmp:
        quantize_static(
            str(model_in), str(tmp), ArrayReader(calib[:1]),  # every range is overridden: one image to satisfy it
            quant_format=QuantFormat.QDQ, activation_type=getattr(QuantType, act_type), weight_type=QuantType.QInt8,
            per_channel=True, reduce_range=reduce_range, calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=excluded, op_types_to_quantize=op_types, extra_options=extra,
        )  # fmt: skip
        _check_ranges_used(tmp, ranges)
    recipe = {"backend": "ort", "method": method, "head_policy": head_policy, "reduce_range": reduce_range,
              "placement": placement, "activations": activations, "call": call,
              "seconds": time.perf_counter() - t0, "input": str(model_in), "input_sha256": sha256_file(model_in),
              "output_sha256": sha256_file(model_out)}  # fmt: skip
    write_json(model_out.with_suffix(".recipe.json"), recipe)
    return recipe


class OrtBackend(Int8Backend):
    """ONNX Runtime's ``quantize_static``: the CPU-deployable recipe (QLinearConv under ORT)."""

    name, title, library = "ort", "ORT", None
    help = "the recipe the report ships for ORT CPU"
    # the default report's CPU pick (ort-percentile-bc: percentile ranges and this project's fast bias correction);
    # tests/test_cli_defaults.py holds the two together. A recipe without the correction says bias_correction: none.
    methods, default_method, default_bias_correction = ORT_METHODS, "percentile", "fast"
    options = {
        "reduce_range": OptionSpec("--reduce-range", "7-bit weights (no int16 saturation on CPUs without VNNI)", kind=bool),
        "placement": OptionSpec("--placement", "Q/DQ on every op ORT quantizes (all: QLinearConv under ORT) or on Conv "
                                "inputs only (conv-inputs: NNCF's placement, fused by OpenVINO, float under ORT)",
                                choices=PLACEMENTS),
        "activations": OptionSpec("--activations", "activation integers: uint8 with an asymmetric range (the CPU's "
                                  "kernels) or int8-symmetric (zero point 0: what TensorRT takes; with --placement "
                                  "conv-inputs, the file TensorRT builds from)", choices=ACTIVATIONS),
        "percentile": OptionSpec("--percentile", "the percentile method's cut", kind=float),
    }  # fmt: skip

    def code_versions(self) -> dict:
        return {"ranges": RANGES_VERSION}  # how activation_ranges computes them

    def quantize(self, model_in, model_out, calib, o: Int8Options) -> dict:
        return quantize_int8_ort(model_in, model_out, calib, method=o.method, head_policy=o.head_policy,
                                 exclude=list(o.exclude), percentile=o.percentile, reduce_range=o.reduce_range,
                                 placement=o.placement, activations=o.activations)  # fmt: skip

    def command_args(self, o: Int8Options) -> list[str]:
        return ((["--percentile", str(o.percentile)] if o.method == "percentile" else [])
                + (["--reduce-range"] if o.reduce_range else [])
                + (["--placement", o.placement] if o.placement != "all" else [])
                + (["--activations", o.activations] if o.activations != "uint8" else []))  # fmt: skip
