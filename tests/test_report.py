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
