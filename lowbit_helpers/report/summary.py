"""Notebook 06's ``summary.md`` (the sections' markdown, in :data:`.sections.SECTIONS` order),
``results/summary.json``, and the README's results block."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import atomic_path
from ..rundir import RunDir, Stage
from .baseline import baseline_table
from .sections import SECTIONS, Results

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "results/summary.json"


def write_summary(run: RunDir, results: Results) -> str:
    """``summary.md`` in the run directory: what each section of :data:`.sections.SECTIONS` keeps for
    markdown, in their order; and ``results/summary.json``."""
    parts = [f"# {run.cfg.name}: YOLOv10 low-bit report", "", run.cfg.description.strip(), ""]
    for section in SECTIONS:
        lines = section.summary(results) if section.summary else []
        if lines:  # a section with nothing to say in markdown (skipped, figures only) is left out
            parts += ["#" * section.level + " " + section.title, ""]
            for line in lines:
                parts += [line, ""]
    text = "\n".join(parts)
    with atomic_path(run.file(SUMMARY_MD)) as tmp:
        tmp.write_text(text)
    # accuracy only: the latencies are in the benches' latency.json files (measurements, not results)
    baseline = {"baseline": baseline_table(run, latency=False).to_dict(orient="records")}
    run.stage(Stage("summary", None, [], [SUMMARY_JSON, SUMMARY_MD], fixed_key="always"), lambda: baseline, read=None)
    return text


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(readme, summary_md, run_id: str) -> None:
    """Replace the README's results block with a run's ``summary.md`` (headings demoted)."""

    readme, text = Path(readme), Path(summary_md).read_text()
    body = "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines())
    block = f"{README_START}\n_From `reports/{run_id}/{SUMMARY_MD}`, written by the run itself._\n\n{body.strip()}\n{README_END}"
    current = readme.read_text()
    if README_START not in current or README_END not in current:
        raise ValueError(f"{readme} has no {README_START} … {README_END} block")
    head, rest = current.split(README_START, 1)
    readme.write_text(head + block + rest.split(README_END, 1)[1])
