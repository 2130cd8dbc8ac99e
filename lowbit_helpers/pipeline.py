"""The main job: a params file -> a run directory -> six executed notebooks -> an HTML report.

papermill executes ``notebooks/0*.ipynb`` in order with two parameters (``params_path``,
``run_dir``); nbconvert renders each executed copy to HTML with the code hidden; the
summary notebook's rendering is the report, copied to ``<reports_dir>/<run-id>/report.html``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .artifacts import atomic_path, read_json, write_json
from .assets import resolve_model
from .config import Config, load_config
from .data import open_coco, read_image_list
from .errors import LowbitError
from .report.summary import SUMMARY_MD
from .rundir import RunDir, run_lock, split_measured
from .runtime import check_openvino_properties, check_providers, runtime_unavailable
from .steps.sensitivity import SCHEMES_DIR
from .steps.summary import ANSWER

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
REPORT_NOTEBOOK = "06_summary_report"


def notebooks(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    found = sorted(folder.glob("0[1-6]_*.ipynb"))
    if len(found) != 6:
        raise LowbitError(f"expected notebooks 01..06 in {folder}, found {[p.name for p in found]}",
                          "the notebooks ship with the repository, not with the wheel: run `python -m lowbit_helpers run` "
                          "from a complete checkout (the helpers' other commands work from the wheel alone)")  # fmt: skip
    return found


def preflight(cfg: Config) -> None:
    """Fail fast, before anything is written, on a missing or wrong model, dataset, calibration
    list, execution provider or OpenVINO setting."""

    check_providers(cfg.runtime.providers)
    if cfg.int8.enabled and cfg.int8.openvino_settings and not runtime_unavailable("openvino"):
        check_openvino_properties(cfg.int8.openvino_settings)
    resolve_model(cfg.model.weights)
    open_coco(cfg.data.coco_root, cfg.data.annotations, cfg.data.subset)
    read_image_list(Path(cfg.data.coco_root) / cfg.data.calib_list)
    if cfg.parity.enabled:
        open_coco(cfg.data.coco_root, cfg.data.annotations, cfg.parity.subset)


def render_html(executed: Path, out: Path) -> Path:
    import nbformat  # late: nbformat only to render
    from nbconvert import HTMLExporter  # late: nbconvert only to render

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(executed), as_version=4))
    with atomic_path(out) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return out


def export_scheme(src: Path, dst: Path, coco_root: Path) -> None:
    """A scheme file as it travels with the report: no measured cost, no machine path (runs cached
    before the sensitivity stage did both itself still hold them)."""

    data, _ = split_measured(read_json(src))
    listed = (data.get("calibration") or {}).get("list") if isinstance(data, dict) else None
    if listed and Path(listed).is_absolute():
        p = Path(listed)
        data["calibration"]["list"] = (f"<data.coco_root>/{p.relative_to(coco_root).as_posix()}" if p.is_relative_to(coco_root)
                                       else p.name)  # fmt: skip
    write_json(dst, data)


def run_pipeline(params_path: str | Path, run_id: str | None = None, progress: bool = True,
                 notebook_dir: Path = NOTEBOOK_DIR) -> Path:  # fmt: skip
    """Execute the six notebooks for ``params_path``; return the report's path."""
    cfg = load_config(params_path).resolved()
    notebooks(notebook_dir)  # before anything is written
    preflight(cfg)
    with run_lock(cfg, run_id):  # one run per run id at a time
        return _run_locked(cfg, run_id, progress, notebook_dir)


def _run_locked(cfg: Config, run_id: str | None, progress: bool, notebook_dir: Path) -> Path:
    import papermill as pm  # late: papermill only to run notebooks
    from papermill.exceptions import PapermillExecutionError  # late: papermill only to run notebooks

    run = RunDir.create(cfg, run_id)
    report_dir = Path(cfg.output.reports_dir) / run.run_id
    report = report_dir / "report.html"
    if report.exists():
        report.unlink()  # a failed rerun must not leave the previous report looking current
    executed_dir, html_dir = run.path / "notebooks", run.path / "html"
    executed_dir.mkdir(exist_ok=True)
    for nb in notebooks(notebook_dir):
        out = executed_dir / nb.name
        t0 = time.perf_counter()
        print(f"[{run.run_id}] {nb.stem}", flush=True)
        try:
            pm.execute_notebook(
                str(nb), str(out), parameters={"params_path": str(run.path / "params.yaml"), "run_dir": str(run.path)},
                kernel_name="python3", progress_bar=progress, cwd=str(run.path),
            )  # fmt: skip
        except PapermillExecutionError as exc:
            run.update("notebooks", nb.stem, {"status": "failed", "seconds": time.perf_counter() - t0})
            raise LowbitError(
                f"notebook {nb.name} failed in cell {exc.exec_count} (cell index {exc.cell_index}): "
                f"{exc.ename}: {exc.evalue}",
                f"read the traceback in the executed copy {out}, fix the cause, and rerun (finished stages are reused)",
            ) from None
        run.update("notebooks", nb.stem, {"status": "ok", "seconds": round(time.perf_counter() - t0, 1)})
        render_html(out, html_dir / f"{nb.stem}.html")
    report_dir.mkdir(parents=True, exist_ok=True)
    for name in (SUMMARY_MD, ANSWER):
        if (run.path / name).is_file():
            shutil.copyfile(run.path / name, report_dir / name)
    schemes = run.path / SCHEMES_DIR
    if schemes.is_dir():  # the scheme files are a product of the run: they travel with the report
        shutil.rmtree(report_dir / SCHEMES_DIR, ignore_errors=True)
        for f in sorted(schemes.glob("*.json")):
            export_scheme(f, report_dir / SCHEMES_DIR / f.name, Path(cfg.data.coco_root))
    with atomic_path(report) as tmp:
        shutil.copyfile(html_dir / f"{REPORT_NOTEBOOK}.html", tmp)
    return report
