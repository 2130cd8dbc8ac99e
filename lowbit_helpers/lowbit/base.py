"""The 4-bit method interface: a rounding rung is one :class:`FourBitMethod` subclass.

A method decides, for one Conv weight and a weight spec (bits, block, clip), the scales and the
integer codes, optionally from the Conv's calibration statistics (:mod:`.stats`). What every
method shares is handled once, outside it: ``-bc`` (the analytic bias correction,
:mod:`.bias_shift`) and ``-b<B>`` (scales per block of B input channels) are modifiers of any
registered method, and :mod:`.materialize` writes the codes into the deployed ONNX unchanged.
Modelled on Brevitas' ``gpxq`` (GPTQ-like methods as subclasses of one base).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..weights import WeightSpec, compute_scale, quantize_codes
from .stats import ConvStats, importance


class FourBitMethod:
    """A 4-bit rounding method. Subclasses set ``name`` (the registry key), ``text`` and, where they
    differ from round-to-nearest, ``clip`` (the scale rule of :mod:`lowbit_helpers.weights`),
    ``needs_stats`` and :meth:`codes` / :meth:`scales`."""

    name: ClassVar[str]
    text: ClassVar[str]  # what it does, as the report's ladder says it
    clip: ClassVar[str] = "maxabs"
    needs_stats: ClassVar[bool] = False  # calibration statistics of the Conv (stats.ConvStats) are required

    def scales(self, w: np.ndarray, spec: WeightSpec, stats: ConvStats | None) -> np.ndarray:
        """Scales under ``spec``; an MSE clip search weights errors by input energy when stats exist."""
        imp = importance(stats, w.shape) if (stats is not None and spec.clip == "mse") else None
        return compute_scale(w, spec, imp)

    def codes(self, w: np.ndarray, scale: np.ndarray, spec: WeightSpec, stats: ConvStats | None) -> np.ndarray:
        """Integer codes of ``w`` for fixed ``scale`` (ONNX layout, same shape as ``w``)."""
        return quantize_codes(w, scale, spec)

    def settings(self) -> dict:
        """The method's tunable constants (iterations, learning rate, ...): part of every candidate's
        cache key and recipe, so a changed setting recomputes the files made with it. None here."""
        return {}


@dataclass(frozen=True)
class Method:
    """A parsed method name ``<rounding>[-bc][-b<B>]``: a registered rounding and the shared modifiers."""

    name: str
    rounding: FourBitMethod
    bias_correction: bool
    block: int | None

    def spec(self, bits: int) -> WeightSpec:
        """The weight spec of a ``bits``-bit layer (8-bit layers are rounded to nearest per channel)."""
        if bits == 4:
            return WeightSpec(4, self.block, self.rounding.clip)
        return WeightSpec(bits, None, "maxabs")

    @property
    def per_channel(self) -> str:
        """This method's name without blocked scales (what one scale per output channel allows:
        the integer-kernel form, :mod:`.integer_form`)."""
        return re.sub(r"-b\d+$", "", self.name)

    @property
    def needs_stats(self) -> bool:
        return self.rounding.needs_stats or self.bias_correction or self.rounding.clip == "mse"

    @property
    def describe(self) -> str:
        parts = [self.rounding.text] + (["bias correction"] if self.bias_correction else [])
        parts.append("per output channel" if self.block is None else f"blocks of {self.block} input channels")
        return ", ".join(parts)

    def record(self) -> dict:
        """What a candidate's recipe records of the method. The keys are those recipes had before the
        registry (their files stay byte for byte the same); ``gptq``: the codes come from GPTQ."""
        out = {"name": self.name, "clip": self.rounding.clip, "gptq": self.rounding.name == "gptq",
               "bias_correction": self.bias_correction, "block": self.block}  # fmt: skip
        return out | ({"settings": s} if (s := self.rounding.settings()) else {})
