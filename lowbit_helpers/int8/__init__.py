"""INT8 post-training quantization: one module per backend behind one protocol (:mod:`.base`).

* :mod:`.ort`: ONNX Runtime's ``quantize_static`` (the CPU recipe; QLinearConv under ORT);
* :mod:`.modelopt`: NVIDIA ModelOpt (TensorRT's placement);
* :mod:`.nncf`: NNCF (the peer; a Q/DQ ONNX or an OpenVINO IR);
* :mod:`.calibration`: activation ranges independent of slicing and order, the calibration tensor;
* :mod:`.policy`: the head policy (which nodes stay float);
* :mod:`.bias_correction`: the fast (empirical, per-Conv) bias correction of a finished Q/DQ file;
* :mod:`.kernel_check`: does this CPU's ORT int8 kernel saturate?
* :mod:`.tensorrt`: what TensorRT requires of a Q/DQ file, rule by rule (every recipe records it).

A new backend is one module with an :class:`.base.Int8Backend` subclass and one line in
:data:`BACKENDS`; the params schema, the ``quantize-int8`` command line and notebook 03 read
their choices and rules from here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from ..artifacts import write_json
from ..errors import LowbitError
from .base import COMMON_OPTIONS, Int8Backend, Int8Options, OptionSpec, check_options
from .bias_correction import correct_recipe_file
from .modelopt import ModelOptBackend
from .nncf import NncfBackend
from .ort import OrtBackend
from .policy import HEAD_POLICIES
from .tensorrt import tensorrt_ready

# The registry: name -> backend (the first is the command line's default).
BACKENDS: dict[str, Int8Backend] = {b.name: b for b in (OrtBackend(), ModelOptBackend(), NncfBackend())}

ALL_METHODS = tuple(dict.fromkeys(m for b in BACKENDS.values() for m in b.methods))
ALL_BIAS_CORRECTIONS = tuple(dict.fromkeys(c for b in BACKENDS.values() for c in b.bias_corrections))


def backend(name: str) -> Int8Backend:
    """The registered backend ``name``, or one clear error naming the registered ones."""
    if name not in BACKENDS:
        raise LowbitError(f"unknown INT8 backend {name!r}", f"use one of {', '.join(BACKENDS)} (int8/__init__.py: BACKENDS)")
    return BACKENDS[name]


def option_specs() -> dict[str, OptionSpec]:
    """Every backend's own options (for the command line), in registry order."""
    return {k: s for b in BACKENDS.values() for k, s in b.options.items()}


def checked(name: str, o: Int8Options, where: str = "", flags: bool = False) -> Int8Options:
    """``o`` for backend ``name`` with its defaults filled in, or one clear error (:func:`.base.check_options`)."""
    return check_options(backend(name), o, BACKENDS, where, flags)


def command_args(name: str, model: str | Path, calib_npy: str | Path, images: int, out: str | Path,
                 o: Int8Options) -> list[str]:  # fmt: skip
    """The ``quantize-int8`` arguments that reproduce ``o`` (the recipe's recorded command)."""
    b = backend(name)
    o = checked(name, o)
    args = ["quantize-int8", str(model), "--backend", name, "--method", o.method, "--calib-npy", str(calib_npy),
            "--images", str(images), "--head-policy", o.head_policy, "--out", str(out)]  # fmt: skip
    if o.exclude:
        args += ["--exclude", *o.exclude]
    args += b.command_args(o)
    if b.corrects_file and o.bias_correction == "fast":  # this project's, on the finished file
        args += ["--bias-correction", "fast", "--bias-correction-images", str(o.bias_correction_images)]
    elif o.bias_correction != b.default_bias_correction:  # none where the backend's default corrects
        args += ["--bias-correction", o.bias_correction]
    return args


def quantize_int8(name: str, model_in: str | Path, model_out: str | Path, calib: np.ndarray, o: Int8Options) -> dict:
    """Quantize with backend ``name`` (and this project's fast bias correction where asked): the
    recipe, also saved beside ``model_out``. A failure leaves neither file behind."""
    b = backend(name)
    o = checked(name, o)
    recipe = b.quantize(model_in, model_out, calib, o)
    if b.corrects_file and o.bias_correction == "fast":
        try:
            recipe = correct_recipe_file(model_out, model_in, calib, o.bias_correction_images)
        except BaseException:  # no uncorrected file left behind looking like the corrected one
            for p in (Path(model_out), Path(model_out).with_suffix(".recipe.json")):
                p.unlink(missing_ok=True)
            raise
    if Path(model_out).suffix == ".onnx":  # what TensorRT would take of it, rule by rule (.tensorrt)
        ready, violations = tensorrt_ready(onnx.load(str(model_out), load_external_data=False))
        recipe["tensorrt"] = {"ready": ready,
                              "violations": {k: {"count": len(v), "first": v[:3]} for k, v in violations.items() if v}}  # fmt: skip
        write_json(Path(model_out).with_suffix(".recipe.json"), recipe)
    print(json.dumps({k: recipe[k] for k in ("backend", "method", "head_policy", "seconds")}))
    return recipe


__all__ = ["ALL_BIAS_CORRECTIONS", "ALL_METHODS", "BACKENDS", "COMMON_OPTIONS", "HEAD_POLICIES", "Int8Backend",
           "Int8Options", "OptionSpec", "backend", "checked", "command_args", "option_specs", "quantize_int8"]  # fmt: skip
