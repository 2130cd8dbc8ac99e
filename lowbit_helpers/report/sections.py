"""The report's sections, in the one order notebook 06 shows them and ``summary.md`` writes them.

A section has a title, a lead paragraph, what notebook 06 shows (``show``: markdown strings,
tables and figures) and what ``summary.md`` keeps of it (``summary``: markdown lines; an empty
list leaves the section out of the summary, None keeps it notebook-only). Both read the steps'
results (:class:`Results`); nothing here computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from ..rundir import RunDir
from ..schema import Skipped
from ..steps import baseline as baseline_step
from ..steps import summary as summary_step
from ..steps.candidates import CandidatesResult
from ..steps.int8 import Int8Result
from ..steps.int8 import splits as int8_splits
from ..steps.sensitivity import SCHEMES_DIR, SensitivityResult
from . import baseline as rb
from . import candidates as rc
from . import headline
from . import int8 as ri
from . import sensitivity as rs
from .detections import detections_figure
from .provenance import provenance, timing


@dataclass
class Results:
    """What the report draws: the run and each notebook step's result, read back from its stages."""

    run: RunDir
    info: dict
    int8: Int8Result | Skipped
    sensitivity: SensitivityResult | Skipped
    candidates: CandidatesResult | Skipped

    @property
    def fp32_size(self) -> int:
        return self.run.artifact(baseline_step.MODEL).stat().st_size


@dataclass(frozen=True)
class Section:
    title: str
    intro: str
    show: Callable[[Results], list]
    summary: Callable[[Results], list[str]] | None = None
    level: int = 2


# ------------------------------------------------------------------ the answer
def _answer(r: Results) -> list:
    table = headline.headline_table(r.int8, r.candidates, r.fp32_size)
    if table is None:
        return ["Structure-only model (random weights): no accuracy, so nothing to ship; the latency and fusion below are "
                "real." if r.info["structure_only"] else
                "Nothing to ship yet: no INT8 or low-bit result in this run (see the sections below)."]  # fmt: skip
    return ["\n\n".join(headline.headline_sentences(r.int8, r.candidates, r.fp32_size)), table]


def _answer_md(r: Results) -> list[str]:
    table = headline.headline_table(r.int8, r.candidates, r.fp32_size)
    if table is None:
        return []
    return [*headline.headline_sentences(r.int8, r.candidates, r.fp32_size), table.to_markdown()]


def _picks_see(r: Results) -> list:
    shown = None if isinstance(r.int8, Skipped) else summary_step.pick_detections(r.run, r.int8, r.candidates)
    if shown is None:
        return ["No INT8 or low-bit pick to show beside FP32 in this run."]
    return [detections_figure(shown, int8_splits(r.run)[1])]


def _per_class_change(r: Results) -> list:
    fp32 = None if isinstance(r.int8, Skipped) else summary_step.fp32_per_class(r.run, r.int8, r.candidates)
    table = headline.per_class_delta(fp32, r.int8, r.candidates)
    if table is None or table.empty:
        return ["No per-class comparison: no pick scored on the confirmation split, or no class with 25 boxes in it."]
    return [headline.per_class_figure(table, fp32["subset"])]


# ------------------------------------------------------------------ FP32, parity, model
def _fp32(r: Results) -> list:
    return [rb.baseline_table(r.run, headline.fp32_ms(r.int8, r.candidates)).set_index("model").T]


def _fp32_md(r: Results) -> list[str]:
    return [rb.baseline_table(r.run, headline.fp32_ms(r.int8, r.candidates)).to_markdown(index=False)]


def _parity(r: Results) -> list:
    table = rb.parity_table(r.run)
    return [rb.parity_verdict(r.run)] + ([table] if table is not None else [])


def _parity_md(r: Results) -> list[str]:
    table = rb.parity_table(r.run)
    return [rb.parity_verdict(r.run)] + ([table.drop(columns=["what"]).to_markdown()] if table is not None else [])


def _per_class_accuracy(r: Results) -> list:
    fig = rb.per_class_figure(r.run)
    return ["No accuracy for a structure-only model."] if fig is None else [fig]


# ------------------------------------------------------------------ the notebooks' own sections
def _int8(r: Results) -> list:
    if isinstance(r.int8, Skipped):
        return [r.int8.why]
    out = [ri.int8_table(r.int8), ri.int8_conclusion(r.int8)]
    return out + ([ri.latency_breakdown(r.int8)] if r.int8.profiles else [])


def _int8_md(r: Results) -> list[str]:
    res = r.int8
    if isinstance(res, Skipped):
        return []
    out = [ri.int8_conclusion(res), ri.int8_table(res).to_markdown()]
    acc, emu, drop = ri.accuracy_table(res), ri.emulation_table(res), ri.drop_decomposition(res)
    probe, breakdown = ri.kernel_probe_text(res), ri.latency_breakdown(res)
    if acc is not None:
        out += ["Accuracy under every engine:", acc.reset_index().to_markdown(index=False)]
    if ri.skipped_engines_text(res):
        out += ["Not run here: " + ri.skipped_engines_text(res)]
    if emu is not None:
        out += ["ORT's kernels on a CPU without VNNI (emulated):", emu.to_markdown()]
    if drop is not None:
        out += ["Where each ORT recipe's drop goes:", drop.to_markdown()]
    if probe:
        out += ["The int16 saturation probe:", probe]
    if breakdown is not None:
        out += ["Where the time goes (ORT profiler, kernel time per run):", breakdown.to_markdown()]
    return out


def _sensitivity(r: Results) -> list:
    s = r.sensitivity
    if isinstance(s, Skipped):
        return [s.why]
    out = [rs.cost_table(s), rs.sensitivity_figure(s)]
    if not isinstance(s.validation, Skipped):
        out.append(rs.validation_table(s.validation))
    return out + [rs.conclusion(s), rs.scheme_table(s.schemes, s.sensitivity["params"])]


def _sensitivity_md(r: Results) -> list[str]:
    s = r.sensitivity
    if isinstance(s, Skipped):
        return []
    return [rs.cost_table(s).to_markdown(), rs.conclusion(s), f"Schemes (JSON in `{SCHEMES_DIR}/` beside this report):",
            rs.scheme_table(s.schemes, s.sensitivity["params"]).to_markdown()]  # fmt: skip


def _candidates(r: Results) -> list:
    c = r.candidates
    if isinstance(c, Skipped):
        return [c.why]
    verdicts = rc.verdicts(c)
    return [rc.method_verdict(c), *([verdicts] if verdicts is not None else []),
            "\n".join(f"* {line}" for line in rc.target_lines(c)), rc.guided_verdict(c), rc.pareto_figure(c),
            rc.candidate_table(c)]  # fmt: skip


def _candidates_md(r: Results) -> list[str]:
    c = r.candidates
    if isinstance(c, Skipped):
        return []
    verdicts, guided = rc.verdicts(c), rc.guided_vs_random(c)
    return [rc.method_verdict(c), "The 4-bit method ladder (selection split):", rc.ladder_table(c).to_markdown(),
            "Verdict per budget (chosen on the selection split, confirmed on the other images):",
            *([verdicts.to_markdown()] if verdicts is not None else []),
            "\n".join(f"- {line}" for line in rc.target_lines(c)), rc.guided_verdict(c),
            *([guided.to_markdown()] if guided is not None else []),
            "All candidates:", rc.candidate_table(c).to_markdown(), rc.int4_runtime_note(c)]  # fmt: skip


def _provenance(r: Results) -> list:
    nb_seconds, stage_seconds = timing(r.run)
    return [pd.Series(r.run.read(baseline_step.FP32_LATENCY)["environment"]).to_frame("measured on"),
            "Where the time went: seconds per notebook (this run; notebook 06 is still running) and the longest stages "
            "(a stage reused from the cache shows the run that computed it)", nb_seconds, stage_seconds,
            provenance(r.run)]  # fmt: skip


SECTIONS = [
    Section("The answer", "What to ship, chosen on the selection split by the rule in the last column and quoted "
            "on the confirmation split (images nobody chose on: extra800 in the default run) with the paired 95 % interval. \"Meets\" a target "
            "means its whole interval does; \"compatible with\" that only the point estimate does.", _answer, _answer_md),
    Section("What the picks see", "The first four images of the confirmation split through FP32, the CPU INT8 pick and "
            "the low-bit pick (boxes with score ≥ 0.35; the evaluation keeps them all).", _picks_see, level=3),
    Section("Per-class change", "AP50-95 of the CPU INT8 pick and the low-bit pick against FP32, per class, on the "
            "confirmation split (classes with at least 25 boxes there; a class's AP on a few dozen boxes moves by points from "
            "image noise alone).", _per_class_change, level=3),
    Section("FP32 baseline", "Every number below was measured in this run and read back from its recorded outputs. mAP "
            "is pycocotools' mAP50-95 in percent with a 95 % basic-bootstrap interval over images; latency is ONNX "
            "Runtime's median over repeated runs after warm-up, from the same interleaved bench as every ratio in this "
            "report.", _fp32, _fp32_md),
    Section("Decoder parity with Ultralytics", "", _parity, _parity_md),
    Section("Per-class accuracy", "", _per_class_accuracy),
    Section("Model", "", lambda r: [rb.model_table(r.info)], lambda r: [rb.model_table(r.info).to_markdown()]),
    Section("INT8 baselines", "", _int8, _int8_md),
    Section("Per-layer sensitivity", "On the deployed ONNX graph (notebook 04): raw-head SQNR for each Conv alone in a "
            "format and kept float while all others are in it; the plan's Torch proxy and how its ranking transfers; the "
            "mixed schemes derived from it.", _sensitivity, _sensitivity_md),
    Section("Low-bit candidates", "Every scheme of notebook 04 materialised into one deployable ONNX with real INT4 / "
            "INT8 / FP8 weights (notebook 05): the 4-bit method ladder, the verdict per budget (chosen on the selection "
            "split, confirmed on the confirmation split), guided against random schemes where the params draw them, and "
            "the Pareto view.",
            _candidates, _candidates_md),
    Section("Provenance", "Each artifact of the run with its SHA-256 (the manifest holds the full hashes and the "
            "parameters that made them).", _provenance),
]  # fmt: skip


def heading(section: Section) -> str:
    return "#" * section.level + " " + section.title + (f"\n\n{section.intro}" if section.intro else "")


def show(section: Section, results: Results) -> None:
    """Notebook 06: the section's heading, then each of its blocks (markdown, table or figure)."""
    import matplotlib.pyplot as plt  # late: matplotlib only for figures
    from IPython.display import Markdown, display  # late: IPython only in a notebook
    from matplotlib.figure import Figure

    display(Markdown(heading(section)))
    for block in section.show(results):
        if isinstance(block, str):
            display(Markdown(block))
        elif isinstance(block, Figure):
            display(block)
            plt.close(block)
        else:
            display(block)
