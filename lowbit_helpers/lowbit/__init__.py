"""4-bit weight post-training methods, and the scheme -> deployable ONNX writer.

* :mod:`.base`: the method interface (:class:`.base.FourBitMethod`) and parsed names (:class:`.base.Method`);
* one module per rounding rung: :mod:`.rtn`, :mod:`.mse`, :mod:`.gptq`, :mod:`.adaround`;
* :mod:`.stats`: the Conv input statistics the methods read; :mod:`.bias_shift`: the ``-bc`` modifier;
* :mod:`.materialize`: a scheme (node -> precision) into one ONNX with the methods' codes.

A new rung is one module with a :class:`.base.FourBitMethod` subclass and one line in
:data:`METHODS`; the params schema, the ``materialize`` command and notebook 05 read it from here.
"""

from __future__ import annotations

import re

from ..errors import LowbitError
from .adaround import AdaRound
from .base import FourBitMethod, Method
from .gptq import Gptq
from .mse import MseClip
from .rtn import RoundToNearest

# The registry: rounding name -> method.
METHODS: dict[str, FourBitMethod] = {m.name: m for m in (RoundToNearest(), MseClip(), Gptq(), AdaRound())}

# The 4-bit method the committed default report's ladder chose (reports/default: notebook 05's
# "method"); the CLI's and the validation's default. tests/test_cli_defaults.py fails when a rerun of
# the default report chooses another, so the two cannot drift apart.
DEFAULT_METHOD = "gptq-bc-b32"

# The measured ladder of notebook 05 (params/full.yaml), in order; any name of the grammar is accepted too.
LADDER = ["rtn", "rtn-b128", "rtn-b64", "rtn-b32", "mse", "mse-bc", "gptq", "gptq-bc", "gptq-bc-b64", "gptq-bc-b32",
          "adaround-bc-b32"]

_MODIFIERS = re.compile(r"^(?P<rounding>[a-z0-9_]+?)(?P<bc>-bc)?(?:-b(?P<block>\d+))?$")


def method_grammar() -> str:
    return f"<{'|'.join(METHODS)}>[-bc][-b<B>], e.g. rtn, mse-bc, gptq-bc, gptq-bc-b64"


METHOD_GRAMMAR = method_grammar()


def parse_method(name: str) -> Method:
    """``<rounding>[-bc][-b<B>]`` with a registered rounding, or one clear error naming the registered ones."""
    m = _MODIFIERS.match(name) if isinstance(name, str) else None
    if not m or m.group("rounding") not in METHODS or (m.group("block") and int(m.group("block")) < 2):
        raise LowbitError(f"unknown 4-bit method {name!r}", f"use {method_grammar()} (lowbit/__init__.py: METHODS)")
    return Method(name, METHODS[m.group("rounding")], bool(m.group("bc")),
                  int(m.group("block")) if m.group("block") else None)  # fmt: skip


__all__ = ["LADDER", "METHODS", "METHOD_GRAMMAR", "FourBitMethod", "Method", "method_grammar", "parse_method"]
