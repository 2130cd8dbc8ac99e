"""The command line's defaults are the report's answer, not a second opinion."""

import re
from pathlib import Path

from lowbit_helpers.__main__ import _materialize_defaults, build_parser
from lowbit_helpers.config import load_config
from lowbit_helpers.int8 import checked
from lowbit_helpers.int8.base import Int8Options
from lowbit_helpers.lowbit import DEFAULT_METHOD, parse_method

REPO = Path(__file__).resolve().parent.parent


def test_materialize_defaults_are_the_default_reports_choices():
    """The committed default report names the 4-bit method its ladder chose; `materialize` without
    --method uses that one, with the calibration counts params/default.yaml gives."""
    summary = (REPO / "reports" / "default" / "summary.md").read_text()
    chosen = re.search(r"Method for every candidate: \*\*(\S+)\*\*", summary)  # notebook 05's choice, in the summary
    assert chosen, "the default report names no chosen 4-bit method"
    assert chosen.group(1) == DEFAULT_METHOD, "rerun the report changed the choice: set lowbit.DEFAULT_METHOD to it"
    parse_method(DEFAULT_METHOD)
    args = build_parser().parse_args(["materialize", "s.json", "m.onnx", "--calib-npy", "c.npy", "--out", "o.onnx"])
    _materialize_defaults(args)
    cfg = load_config(REPO / "params" / "default.yaml")
    assert (args.method, args.range_images, args.stats_images) == (
        DEFAULT_METHOD, cfg.sensitivity.range_images, cfg.candidates.stats_images)
    assert cfg.sensitivity.validation.method == DEFAULT_METHOD


def test_quantize_int8_defaults_are_the_shipped_recipes():
    """`quantize-int8` with no --backend builds the default report's CPU pick; with --backend modelopt and
    nothing else, ModelOpt's TensorRT recipe: the backends' defaults are the shipped recipes. The TensorRT
    pick is that file or our own TensorRT-ready recipe (chosen beside it on the selection split), whose
    kept-float Convs come from the sweep: its recorded command names them (--exclude), no default does."""
    summary = (REPO / "reports" / "default" / "summary.md").read_text()
    cpu = re.search(r"\*\*CPU:\*\* ship `([^`]+)`", summary).group(1)
    trt = re.search(r"\*\*TensorRT:\*\* ship `([^`]+)`", summary).group(1)
    cfg = load_config(REPO / "params" / "default.yaml")
    variants = {v.name: v for v in cfg.int8.variants}
    args = build_parser().parse_args(["quantize-int8", "m.onnx", "--calib-npy", "c.npy", "--out", "q.onnx"])
    assert args.backend == variants[cpu].backend
    assert args.images == (cfg.int8.calib_images or cfg.data.calib_images)
    modelopt = [v for v in variants.values() if v.backend == "modelopt"]
    assert len(modelopt) == 1 and checked("modelopt", Int8Options()) == checked("modelopt", modelopt[0].options())
    for v in [variants[cpu]] + ([variants[trt]] if variants[trt].backend != "ort" else []):
        assert not v.keep_sensitive, v.name  # a keep_sensitive recipe needs the sweep: not a command-line default
        assert checked(v.backend, Int8Options()) == checked(v.backend, v.options()), v.name
    if variants[trt].backend == "ort":  # ours: TensorRT's placement and types (int8/tensorrt.py checks the file)
        assert (variants[trt].placement, variants[trt].activations) == ("conv-inputs", "int8-symmetric")
