import pytest

from lowbit_helpers.report.summary import update_readme


def test_update_readme_replaces_only_the_results_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# T\nintro\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    summary = tmp_path / "summary.md"
    summary.write_text("# run: FP32\n\n## Model\n| a |\n")
    update_readme(readme, summary, "default")
    text = readme.read_text()
    assert text.startswith("# T\nintro\n<!-- results:start -->") and text.endswith("<!-- results:end -->\ntail\n")
    assert "old" not in text and "### run: FP32" in text and "#### Model" in text and "reports/default/summary.md" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="results:start"):
        update_readme(readme, summary, "default")


def test_int8_verdicts_need_the_whole_interval():
    from lowbit_helpers.report.int8 import _gap_verdict, _verdict, fmt_delta

    d = {"delta": -0.001, "lo": -0.009, "hi": 0.007}
    assert _verdict(d, 0.15) == "is compatible with" and _verdict(d, 1.0) == "meets"
    assert _verdict({"delta": -0.004, "lo": -0.01, "hi": 0.0}, 0.15) == "misses"
    assert _gap_verdict({"delta": 0.0005, "lo": -0.0009, "hi": 0.0008}, 0.1) == "meets"
    assert _gap_verdict({"delta": 0.0005, "lo": -0.002, "hi": 0.0008}, 0.1) == "is compatible with"
    assert _gap_verdict({"delta": -0.0015, "lo": -0.002, "hi": 0.0}, 0.1) == "misses"
    assert fmt_delta(d) == "-0.10 [-0.90, +0.70]"
