"""Notebook 06: the summary (``summary.md``, ``results/summary.json``), provenance, and the README's results block."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..artifacts import atomic_path
from ..rundir import RunDir, Stage
from ..steps.baseline import MODEL, MODEL_INFO
from ..steps.sensitivity import SCHEMES_DIR
from . import candidates as rc
from . import sensitivity as rs
from .baseline import baseline_table, model_table, parity_table, parity_verdict
from .headline import fp32_ms, headline_sentences, headline_table
from .int8 import (
    accuracy_table,
    drop_decomposition,
    emulation_table,
    int8_conclusion,
    int8_table,
    kernel_probe_text,
    latency_breakdown,
    skipped_engines_text,
)

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "results/summary.json"


def provenance(run: RunDir) -> pd.DataFrame:
    m = run.manifest()
    rows = [{"artifact": k, "sha256": v["sha256"][:16] + "…", "bytes": v["bytes"], "stage": v["stage"]}
            for k, v in sorted(m["artifacts"].items())]  # fmt: skip
    return pd.DataFrame(rows)


def timing(run: RunDir, top: int = 12) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Where the time went: (seconds per notebook of the last run, the ``top`` longest stages
    recorded, each its own time without the stages it needed computed meanwhile). A stage reused from
    the cache keeps the duration of the run that computed it."""
    m = run.manifest()
    nbs = pd.DataFrame([{"notebook": k, "status": v["status"], "seconds": v["seconds"]} for k, v in m.get("notebooks", {}).items()])
    stages = [{"stage": k, "seconds": v["seconds"], "finished": v["finished"]} for k, v in m["stages"].items() if v.get("seconds") is not None]
    stages = pd.DataFrame(stages, columns=["stage", "seconds", "finished"]).sort_values("seconds", ascending=False).head(top)
    return nbs, stages.reset_index(drop=True)


def write_summary(run: RunDir, int8_result: dict | None = None, sensitivity_result: dict | None = None,
                  candidates_result: dict | None = None) -> str:  # fmt: skip
    """``summary.md`` in the run directory: the tables of this report as markdown."""
    parts = [f"# {run.cfg.name}: YOLOv10 low-bit report", "", run.cfg.description.strip(), ""]
    fp32_size = run.artifact(MODEL).stat().st_size
    answer = headline_table(int8_result, candidates_result, fp32_size)
    if answer is not None:  # the answer first
        parts += ["## The answer", "", *[line + "\n" for line in headline_sentences(int8_result, candidates_result, fp32_size)],
                  answer.to_markdown(), ""]  # fmt: skip
    parts += ["## Model", "", model_table(run.read(MODEL_INFO)).to_markdown(), ""]
    parts += ["## FP32 baseline", "", baseline_table(run, fp32_ms(int8_result, candidates_result)).to_markdown(index=False), ""]
    pt = parity_table(run)
    parts += ["## Parity with Ultralytics", "", parity_verdict(run), ""]
    if pt is not None:
        parts += [pt.drop(columns=["what"]).to_markdown(), ""]
    if int8_result and "skipped" not in int8_result:
        parts += ["## INT8 baselines", "", int8_conclusion(int8_result), "", int8_table(int8_result).to_markdown(), ""]
        acc = accuracy_table(int8_result)
        if acc is not None:
            parts += ["Accuracy under every engine:", "", acc.reset_index().to_markdown(index=False), ""]
        if skipped_engines_text(int8_result):
            parts += ["Not run here: " + skipped_engines_text(int8_result), ""]
        emu = emulation_table(int8_result)
        if emu is not None:
            parts += ["ORT's kernels on a CPU without VNNI (emulated):", "", emu.to_markdown(), ""]
        drop = drop_decomposition(int8_result)
        if drop is not None:
            parts += ["Where each ORT recipe's drop goes:", "", drop.to_markdown(), ""]
        probe = kernel_probe_text(int8_result)
        if probe:
            parts += ["The int16 saturation probe:", "", probe, ""]
        breakdown = latency_breakdown(int8_result)
        if breakdown is not None:
            parts += ["Where the time goes (ORT profiler, kernel time per run):", "", breakdown.to_markdown(), ""]
    if sensitivity_result and "skipped" not in sensitivity_result:
        parts += ["## Per-layer sensitivity", "", rs.cost_table(sensitivity_result).to_markdown(), "",
                  rs.conclusion(sensitivity_result), "", f"Schemes (JSON in `{SCHEMES_DIR}/` beside this report):", "",
                  rs.scheme_table(sensitivity_result["schemes"], sensitivity_result["sensitivity"]["params"]).to_markdown(), ""]  # fmt: skip
    if candidates_result and "skipped" not in candidates_result:
        c = candidates_result
        parts += ["## Low-bit candidates", "", rc.method_verdict(c), "", "The 4-bit method ladder (selection split):", "",
                  rc.ladder_table(c).to_markdown(), "", "Verdict per budget (chosen on the selection split, confirmed on the other images):", ""]  # fmt: skip
        verdicts = rc.verdicts(c)
        if verdicts is not None:
            parts += [verdicts.to_markdown(), ""]
        parts += [f"- {line}" for line in rc.target_lines(c)] + ["", rc.guided_verdict(c), ""]
        table = rc.guided_vs_random(c)
        if table is not None:
            parts += [table.to_markdown(), ""]
        parts += ["All candidates:", "", rc.candidate_table(c).to_markdown(), "", rc.int4_runtime_note(c), ""]
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
