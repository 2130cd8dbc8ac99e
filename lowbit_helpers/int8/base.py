"""The INT8 backend protocol: one options object, one class per backend, one set of rules.

A backend (:class:`Int8Backend`) declares its calibration methods, its bias corrections and the
options of :class:`Int8Options` that are its own (``reduce_range`` is ORT's, ``format`` NNCF's, ...);
it quantizes a model with them and spells its part of the reproducible command line. The rules
that used to be written twice (params and command line) are :func:`check_options`, read by
both. Modelled on ONNX Runtime's quantizer (one options object, one factory) and NNCF's backend
split (the algorithm behind an abstract backend).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import LowbitError
from .bias_correction import BC_IMAGES
from .policy import HEAD_POLICIES


@dataclass(frozen=True)
class Int8Options:
    """Every option of an INT8 recipe (a params variant or a ``quantize-int8`` command line).

    ``method`` and ``bias_correction`` None mean the backend's default. Options other than the
    common ones belong to the backends that declare them (:attr:`Int8Backend.options`)."""

    method: str | None = None
    head_policy: str = "conservative"
    exclude: tuple[str, ...] = ()
    bias_correction: str | None = None
    bias_correction_images: int = BC_IMAGES
    reduce_range: bool = False
    placement: str = "all"
    activations: str = "uint8"
    percentile: float = 99.999
    format: str = "onnx"
    exclude_op_types: tuple[str, ...] = ()
    calibration_eps: tuple[str, ...] = ("cpu",)
    high_precision_dtype: str = "fp32"

    def changed(self) -> list[str]:
        """The options set to something other than their default."""
        default = Int8Options()
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)]


COMMON_OPTIONS = ("method", "head_policy", "exclude", "bias_correction", "bias_correction_images")


@dataclass(frozen=True)
class OptionSpec:
    """How an option shows on the command line (its flag, choices and help); the default is Int8Options'."""

    flag: str
    help: str
    choices: tuple[str, ...] | None = None
    nargs: str | None = None  # "+" / "*": a list of values
    kind: type = str

    @property
    def many(self) -> bool:
        return self.nargs is not None


class Int8Backend:
    """One INT8 quantizer. Subclasses set the class attributes and implement :meth:`quantize` and
    :meth:`command_args`; :data:`lowbit_helpers.int8.BACKENDS` registers them."""

    name: ClassVar[str]
    title: ClassVar[str]  # as messages and tables name it: ORT, ModelOpt, NNCF
    help: ClassVar[str]
    methods: ClassVar[tuple[str, ...]]
    default_method: ClassVar[str]
    bias_corrections: ClassVar[tuple[str, ...]] = ("none", "fast")
    default_bias_correction: ClassVar[str] = "none"
    # "fast" is this project's correction of the finished Q/DQ file (int8/bias_correction.py); a backend
    # whose library corrects inside its own pipeline (NNCF) sets this False
    corrects_file: ClassVar[bool] = True
    options: ClassVar[dict[str, OptionSpec]] = {}  # its own options beyond COMMON_OPTIONS
    library: ClassVar[str | None] = None  # the PyPI distribution whose version is part of a recipe's key
    logs: ClassVar[tuple[str, ...]] = ()  # log files the library writes beside the model (suffixes of its name)

    def code_versions(self) -> dict:
        """Versions of this project's own code inside the recipe (part of a recipe's key)."""
        return {}

    def quantize(self, model_in: str | Path, model_out: str | Path, calib: np.ndarray, o: Int8Options) -> dict:
        raise NotImplementedError

    def command_args(self, o: Int8Options) -> list[str]:
        """This backend's own options as ``quantize-int8`` arguments (after the common ones)."""
        raise NotImplementedError


def owner_of(option: str, backends: dict[str, Int8Backend]) -> list[Int8Backend]:
    return [b for b in backends.values() if option in b.options]


def check_options(backend: Int8Backend | None, o: Int8Options, backends: dict[str, Int8Backend], name: str = "",
                  flags: bool = False) -> Int8Options:  # fmt: skip
    """``o`` with the backend's defaults filled in, or one clear error (for a params variant, or,
    with ``flags``, for a command line: options are then named by their flags)."""
    where = f"{name}: " if name else ""

    def label(option: str) -> str:
        spec = next((b.options[option] for b in backends.values() if option in b.options), None)
        return spec.flag if flags and spec else ("--" + option.replace("_", "-") if flags else option)

    if backend is None:
        raise LowbitError(f"{where}unknown INT8 backend", f"use one of {', '.join(backends)}")
    method = o.method or backend.default_method
    if method not in backend.methods:
        raise LowbitError(f"{where}{label('method')} {method!r} is not available for backend {backend.name}",
                          f"use one of {', '.join(backend.methods)} for {backend.name}")  # fmt: skip
    if o.head_policy not in HEAD_POLICIES:
        raise LowbitError(f"{where}unknown head policy {o.head_policy!r}", f"use one of {', '.join(HEAD_POLICIES)}")
    for option in o.changed():
        if option in COMMON_OPTIONS or option in backend.options:
            continue
        owners = owner_of(option, backends)
        raise LowbitError(f"{where}{label(option)} is an option of {' / '.join(b.title for b in owners)}, not of {backend.title}",
                          f"set it only with backend {' / '.join(b.name for b in owners)}")  # fmt: skip
    for option, spec in backend.options.items():
        if spec.choices is not None:
            values = getattr(o, option)
            for v in values if spec.many else [values]:
                if v not in spec.choices:
                    raise LowbitError(f"{where}{label(option)} {v!r} is not available for backend {backend.name}",
                                      f"use one of {', '.join(spec.choices)}")  # fmt: skip
    bias = o.bias_correction or backend.default_bias_correction
    if bias not in backend.bias_corrections:
        raise LowbitError(f"{where}{label('bias_correction')} {bias} is not available for backend {backend.name}",
                          f"use one of {', '.join(backend.bias_corrections)} for {backend.name}")  # fmt: skip
    return replace(o, method=method, bias_correction=bias)
