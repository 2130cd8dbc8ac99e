"""INT8 Q/DQ with NVIDIA ModelOpt's ONNX PTQ: the TensorRT-targeted recipe.

ModelOpt places Q/DQ where TensorRT fuses them (inputs of Conv and friends; no Q/DQ after
every activation), so on ORT CPU most of it runs as float with extra Q/DQ and is *slower*
than FP32: the latency shown for it on CPU is honest, not its deployment speed.

ModelOpt patches ONNX Runtime's calibrator classes process-wide when it runs; call this in
its own process (notebook 03 quantizes every recipe in a fresh worker process) so
that ORT's own ``quantize_static`` elsewhere is unaffected.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..artifacts import atomic_path, sha256_file, write_json
from .base import Int8Backend, Int8Options, OptionSpec
from .policy import checked_exclusions

MODELOPT_METHODS = ("max", "entropy")


def quantize_int8_modelopt(model_in: str | Path, model_out: str | Path, calib: np.ndarray, method: str = "entropy",
                           head_policy: str = "conservative", exclude: list[str] | None = None,
                           op_types_to_exclude: list[str] | None = None, calibration_eps: list[str] | None = None,
                           high_precision_dtype: str = "fp32") -> dict:  # fmt: skip
    from modelopt.onnx.quantization import (
        quantize,  # late: modelopt patches ORT when imported; only its recipe loads it
    )

    model_out = Path(model_out)
    excluded = checked_exclusions(model_in, calib, method, MODELOPT_METHODS, "ModelOpt", head_policy, exclude)
    call = {
        "api": "modelopt.onnx.quantization.quantize",
        "quantize_mode": "int8", "calibration_method": method, "calibration_eps": calibration_eps or ["cpu"],
        "high_precision_dtype": high_precision_dtype, "nodes_to_exclude": excluded,
        "op_types_to_exclude": op_types_to_exclude or [], "calibration_images": len(calib),
    }  # fmt: skip
    log = model_out.with_suffix(".modelopt.log")
    t0 = time.perf_counter()
    # ModelOpt leaves intermediate models (model_named.onnx, ...) beside its output: let it
    # work in a scratch folder and move only the result into place.
    with tempfile.TemporaryDirectory(dir=model_out.parent) as scratch, atomic_path(model_out) as tmp:
        work = Path(scratch) / model_out.name
        quantize(
            onnx_path=str(model_in), quantize_mode="int8", calibration_data=np.asarray(calib),
            calibration_method=method, calibration_eps=call["calibration_eps"], nodes_to_exclude=excluded or None,
            op_types_to_exclude=op_types_to_exclude or None, high_precision_dtype=high_precision_dtype,
            output_path=str(work), log_file=str(log), log_level="INFO",
        )  # fmt: skip
        os.replace(work, tmp)
    recipe = {"backend": "modelopt", "method": method, "head_policy": head_policy, "call": call,
              "seconds": time.perf_counter() - t0, "log": log.name, "input": str(model_in),
              "input_sha256": sha256_file(model_in), "output_sha256": sha256_file(model_out)}  # fmt: skip
    write_json(model_out.with_suffix(".recipe.json"), recipe)
    return recipe


class ModelOptBackend(Int8Backend):
    """NVIDIA ModelOpt's ONNX PTQ: Q/DQ where TensorRT fuses them (float under ORT CPU)."""

    name, title, library, logs = "modelopt", "ModelOpt", "nvidia-modelopt", (".modelopt.log",)
    help = "TensorRT's placement"
    methods, default_method = MODELOPT_METHODS, "entropy"
    options = {
        "exclude_op_types": OptionSpec("--exclude-op-type", "op types kept in float", nargs="*"),
        "calibration_eps": OptionSpec("--calibration-eps", "cpu | cuda:0 | trt", nargs="+"),
        "high_precision_dtype": OptionSpec("--high-precision-dtype", "what stays unquantized", choices=("fp32", "fp16")),
    }  # fmt: skip

    def quantize(self, model_in, model_out, calib, o: Int8Options) -> dict:
        return quantize_int8_modelopt(model_in, model_out, calib, method=o.method, head_policy=o.head_policy,
                                      exclude=list(o.exclude), op_types_to_exclude=list(o.exclude_op_types),
                                      calibration_eps=list(o.calibration_eps),
                                      high_precision_dtype=o.high_precision_dtype)  # fmt: skip

    def command_args(self, o: Int8Options) -> list[str]:
        return (["--calibration-eps", *o.calibration_eps, "--high-precision-dtype", o.high_precision_dtype]
                + (["--exclude-op-type", *o.exclude_op_types] if o.exclude_op_types else []))  # fmt: skip
