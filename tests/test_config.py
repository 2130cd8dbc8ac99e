from pathlib import Path

import pytest

from lowbit_helpers.config import Config, load_config, parse_config
from lowbit_helpers.errors import LowbitError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["default", "full", "smoke", "yolov10m", "gpu"])
def test_shipped_params_are_valid(name):
    cfg = load_config(REPO / "params" / f"{name}.yaml")
    assert cfg.name == name


def test_default_yaml_lists_the_schema_defaults():
    # params/default.yaml documents every key: it must equal the schema's own defaults
    cfg = load_config(REPO / "params" / "default.yaml")
    assert cfg.model_dump(exclude={"description"}) == Config(name="default").model_dump(exclude={"description"})


def test_unknown_key_is_named():
    with pytest.raises(LowbitError) as e:
        parse_config({"name": "x", "decode": {"iou_threshold": 0.5}})
    assert "decode.iou_threshold: unknown key" in str(e.value)


def test_wrong_type_is_named_with_what_was_found():
    with pytest.raises(LowbitError) as e:
        parse_config({"name": "x", "runtime": {"threads": "two"}})
    msg = str(e.value)
    assert "runtime.threads" in msg and "'two'" in msg and "fix:" in msg


def test_out_of_range_and_missing_name():
    with pytest.raises(LowbitError, match="decode.conf"):
        parse_config({"name": "x", "decode": {"conf": 1.5}})
    with pytest.raises(LowbitError, match="name"):
        parse_config({})


def test_reconstruction_iterations_are_distinct_and_not_negative():
    cfg = parse_config({"name": "x", "candidates": {"reconstruction": {"iterations": [0, 300]}}})
    assert cfg.candidates.reconstruction.iterations == [0, 300] and cfg.candidates.reconstruction.images == 32
    for bad in ([-1], [300, 300], []):
        with pytest.raises(LowbitError, match="candidates.reconstruction.iterations"):
            parse_config({"name": "x", "candidates": {"reconstruction": {"iterations": bad}}})
    with pytest.raises(LowbitError, match="batch .3. is larger than images .2."):
        parse_config({"name": "x", "candidates": {"reconstruction": {"images": 2, "batch": 3}}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(LowbitError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(LowbitError, match="not valid YAML"):
        load_config(bad)


def test_resolved_makes_paths_absolute(tmp_path):
    cfg = parse_config({"name": "x", "model": {"weights": "m/model.onnx"}, "data": {"coco_root": "coco"}})
    r = cfg.resolved(tmp_path)
    assert r.data.coco_root == str(tmp_path / "coco")
    assert r.model.weights == str(tmp_path / "m" / "model.onnx")
    assert cfg.resolved(tmp_path).model.weights != "yolov10n"
    assert parse_config({"name": "x"}).resolved(tmp_path).model.weights == "yolov10n"  # names stay names


@pytest.mark.parametrize("variant, message", [
    ({"name": "a", "backend": "ort", "method": "avgminmax", "bias_correction": "full"}, "use one of none, fast for ort"),
    ({"name": "a", "backend": "nncf", "method": "mixed", "bias_correction": "none"}, "use one of full, fast for nncf"),
    ({"name": "a", "backend": "modelopt", "method": "max", "placement": "conv-inputs"}, "placement is an option of ORT, not of ModelOpt"),
    ({"name": "a", "backend": "modelopt", "method": "max", "reduce_range": True}, "reduce_range is an option of ORT, not of ModelOpt"),
    ({"name": "a", "backend": "ort", "method": "avgminmax", "format": "openvino"}, "format is an option of NNCF, not of ORT"),
    ({"name": "a", "backend": "ort", "method": "max"}, "not available for backend ort"),
    ({"name": "a", "backend": "tensorrt", "method": "max"}, "'ort', 'modelopt' or 'nncf'"),
    ({"name": "a", "backend": "ort", "method": "kl"}, "'avgminmax', 'minmax', 'percentile'"),
])  # fmt: skip
def test_int8_variant_options_are_checked_per_backend(variant, message):
    """Each backend's rules (int8/base.py: check_options) refuse a variant when the params load, naming
    the key and the registered choices; the command line applies the same rules (test_cpu_int8.py)."""
    with pytest.raises(LowbitError, match=message) as e:
        parse_config({"name": "x", "int8": {"variants": [variant]}})
    assert "int8.variants.0" in e.value.cause and e.value.fix


def test_int8_variant_names_are_unique():
    from lowbit_helpers.steps.int8 import check_variants

    v = {"name": "a", "backend": "ort", "method": "avgminmax"}
    with pytest.raises(LowbitError, match="used twice"):
        check_variants(parse_config({"name": "x", "int8": {"variants": [v, v]}}))


def test_unknown_int8_backend_or_method_on_the_command_line(capsys, tmp_path):
    from lowbit_helpers.__main__ import main

    base = ["quantize-int8", "m.onnx", "--calib-npy", "c.npy", "--out", str(tmp_path / "q.onnx")]
    for extra, cause, choices in ((["--backend", "tensorrt"], "unknown INT8 backend 'tensorrt'", "ort, modelopt, nncf"),
                                  (["--method", "kl"], "--method 'kl' is not available for backend ort",
                                   "avgminmax, minmax, percentile, entropy"),
                                  (["--placement", "outputs"], "--placement 'outputs' is not available", "all, conv-inputs")):  # fmt: skip
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert f"error: {cause}" in err and "fix: use one of " + choices in err, err


def test_w8a8_ort_is_a_sweep_format_only():
    from lowbit_helpers.config import parse_config

    assert "w8a8-ort" in parse_config({"name": "x", "sensitivity": {"formats": ["w8a8-ort", "w4a8"]}}).sensitivity.formats
    for bad in ({"budget_high": "w8a8-ort"}, {"validation": {"formats": ["w8a8-ort"]}}, {"validation": {"kept_format": "w8a8-ort"}},
                {"metric": "sqnr"}, {"formats": ["w8a8", "w4a8"], "rank_as": {"w4a16": "w8a8-ort"}}):  # fmt: skip
        with pytest.raises(LowbitError):
            parse_config({"name": "x", "sensitivity": bad})


def test_resolved_params_load_again_with_any_format_list(tmp_path):
    """The run directory's params.yaml lists every key; a format list without w4a8 must still load
    (the default rank_as {w4a16: w4a8} is then ignored)."""
    from lowbit_helpers.sensitivity.schemes import make_schemes

    cfg = parse_config({"name": "x", "sensitivity": {"formats": ["w8a8-ort"], "budgets": []}})
    p = tmp_path / "params.yaml"
    p.write_text(cfg.to_yaml())
    again = load_config(p)
    assert again.sensitivity.formats == ["w8a8-ort"] and again.sensitivity.rank_as == {"w4a16": "w4a8"}
    sens = {"convs": ["a"], "params": {"a": 1}, "metric": "det_sqnr",
            "formats": {"w8a8-ort": {"records": {"a": {"alone": {"det_sqnr": 1.0}}}}}}  # fmt: skip
    assert make_schemes(sens, [0], [], rank_as=again.sensitivity.rank_as) == []  # no w4a8 sweep: no w4a16 scheme

