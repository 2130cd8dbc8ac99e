"""The smoke pipelines the slow tests share (params/smoke.yaml on a handful of images).

One smoke run of all six notebooks serves every test that reads a finished run (content, browser,
gpu-bench, CLI, strict JSON) and the resume and determinism tests: it is run as a user runs it,
``python -m lowbit_helpers run``, SIGKILLed during notebook 03 and again during notebook 05, run to
its end, then run once more after some outputs of every notebook were deleted (those
stages recompute the same bytes, every other stage is reused: :func:`kill_and_resume`). Beside it,
in threads from the session's first test on (:func:`start_beside`), the structure-only run. One
pipeline keeps the two cores about three quarters busy (notebook start-up, imports and papermill
are one thread), so the other, and the unit tests, run alongside; the tests that read a pipeline
run last (``conftest.pytest_collection_modifyitems``), so that the unit tests fill the wait.

Every pipeline process starts with the environment the session started with (:data:`ENV`), not
the one of the moment: a test that sets a variable (``monkeypatch.setenv("LOWBIT_CACHE", ...)`` in
tests/test_assets.py) while a background run starts a process would otherwise hand it to that run
(measured: a background run then fetched the weights into the test's folder and its
model_info.json named another source path).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from lowbit_helpers.artifacts import read_json, sha256_file
from lowbit_helpers.rundir import reproducible_outputs

REPO = Path(__file__).resolve().parent.parent
SMOKE_ID = "smoke-test"
STRUCTURE_TEST = "test_structure_only_model_shows_no_accuracy"
# the pipelines run without OMP_NUM_THREADS (importing ultralytics sets it to 1 in os.environ), and the
# last run of the smoke params with OMP_NUM_THREADS=1 (:func:`kill_and_resume`) shows that no
# recomputed result depends on it
ENV = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
# outputs deleted before the smoke run's last run: one stage or more of every notebook (the exported
# model with notebook 01's torch-vs-ONNX check, calibration, an INT8 model and its evaluation, the
# layer table, a GPTQ candidate, its evaluation, an integer-form model's exact Q/DQ score, the
# pictures' detections); they must come back byte for byte
RECOMPUTED = ("baseline-onnx/smoke.json", "calib/calib.npy", "onnx/ort-percentile.onnx", "int8-coco/ort-percentile.json",
              "int8-coco/openvino_settings.json",
              "sensitivity/layers.json",
              "candidates/w4a8-top0.gptq-bc-b64.onnx", "results/w4a8-top0.gptq-bc-b64.json",
              "results/budget50-w4a8-w8a8.gptq-bc.int.exact.json", "summary/detections.json")

# what the structure-only run needs of the smoke params: the code paths a random model changes
# (no accuracy, no parity, latency and the profiler still), not every backend and engine again
STRUCTURE_ONLY = {
    "int8": {"variants": [{"name": "ort-percentile", "backend": "ort", "method": "percentile", "bias_correction": "none"}], "fp32_engines": [],
             "emulate": {"cpu": None}},
    "sensitivity": {"formats": ["w4a8"], "naive_check": 0, "proxy": False, "budgets": [], "top_k": [0]},
    "candidates": {"ladder": ["rtn"], "ladder_schemes": ["w4a8-top0"], "schemes": ["w4a8-top0"], "fp8": False,
                   "random_schemes": 0, "heuristic": False},
}  # fmt: skip


@dataclass(frozen=True)
class Smoke:
    root: Path  # the params' output folders live here
    run: Path
    report: Path
    history: dict  # what kill_and_resume saw after each run


def smoke_params(tmp_path, coco_root, sections: dict | None = None, **model) -> Path:
    """params/smoke.yaml writing under ``tmp_path``; ``sections``: keys replaced per params section."""
    p = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    p["data"]["coco_root"] = str(coco_root)
    p["output"] = {"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports")}
    p.setdefault("model", {}).update(model)
    for section, keys in (sections or {}).items():
        p[section].update(keys)
    out = tmp_path / "smoke.yaml"
    out.write_text(yaml.safe_dump(p))
    return out


# the pipelines' processes still running (each its own process group): killed when the session ends
LIVE: set[subprocess.Popen] = set()
PIPELINE_TIMEOUT = 1800  # seconds: a hung pipeline fails its test instead of the whole CI job


class Beside(threading.Thread):
    """A pipeline run as subprocesses in a thread; ``result()`` waits and re-raises its failure
    (or ``error``, given when it could not start)."""

    def __init__(self, fn, *args, error: BaseException | None = None):
        super().__init__(daemon=True)
        self.fn, self.args, self.value, self.error = fn, args, None, error

    def start(self):
        if self.error is None:
            super().start()

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test that reads it
            self.error = exc

    def result(self):
        if self.ident is not None:  # started
            self.join(5 * PIPELINE_TIMEOUT)  # the smoke run is four runs of the pipeline
            assert not self.is_alive(), f"{self.fn.__name__} still runs after {5 * PIPELINE_TIMEOUT} s"
        if self.error is not None:
            raise self.error
        return self.value


def start_beside(wanted: set[str], tmp_path_factory, inputs) -> dict[str, Beside]:
    """Start, each in its thread, the pipelines the collected tests read (``wanted``: "smoke" for
    the smoke run, :data:`STRUCTURE_TEST` for the structure-only run). ``inputs()`` gives the COCO
    root (and fetches the weights first, so no two processes download them); where it fails, only
    the tests that read a pipeline fail."""
    try:
        coco_root, error = inputs(), None
    except BaseException as exc:  # noqa: BLE001 - raised by the tests that read the jobs, not by every test
        coco_root, error = None, exc
    table = (("smoke", "smoke", kill_and_resume), (STRUCTURE_TEST, "random", structure_only_run))
    jobs = {key: Beside(fn, tmp_path_factory.mktemp(name), coco_root, error=error) for key, name, fn in table if key in wanted}
    for job in jobs.values():
        job.start()
    return jobs


def stop_beside() -> None:
    """Kill what is left of the pipelines (an interrupted or failed session must not leave them running)."""
    for proc in list(LIVE):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        LIVE.discard(proc)


def _start(cmd: list[str], **kw) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, **{"env": ENV, **kw})
    LIVE.add(proc)
    return proc


def run_cli(cmd: list[str], **env: str) -> None:
    proc = _start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, **env})
    try:
        out, err = proc.communicate(timeout=PIPELINE_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_beside()
        raise AssertionError(f"{' '.join(cmd[2:])} ran over {PIPELINE_TIMEOUT} s") from None
    LIVE.discard(proc)
    assert proc.returncode == 0, f"{' '.join(cmd[2:])} failed:\n{out[-3000:]}\n{err[-3000:]}"


def structure_only_run(root: Path, coco_root: Path) -> Path:
    params = smoke_params(root, coco_root, STRUCTURE_ONLY, weights="random:yolov10n")
    run_cli([sys.executable, "-m", "lowbit_helpers", "run", str(params), "--run-id", "random"])
    return root


def kill_when(cmd: list[str], manifest: Path, ready, timeout: float = PIPELINE_TIMEOUT) -> None:
    """Start ``cmd`` in its own process group and SIGKILL the whole group (papermill's kernel
    included) as soon as ``ready(manifest)`` holds: a crash, not a clean stop."""
    proc = _start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before it could be interrupted")
            try:
                if manifest.is_file() and ready(read_json(manifest)):
                    break
            except (ValueError, OSError):  # caught mid-write: read it again
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("the run never reached the point to interrupt")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        LIVE.discard(proc)


def claims_hold(run: Path) -> dict:
    """Every stage the manifest calls finished has its outputs, byte for byte; its finish times."""
    m = read_json(run / "manifest.json")
    for stage, entry in m["stages"].items():
        for rel in entry["outputs"]:
            assert (run / rel).is_file() and sha256_file(run / rel) == m["artifacts"][rel]["sha256"], (stage, rel)
    return {k: v["finished"] for k, v in m["stages"].items() if v["key"] not in ("always", "derived")}


def kill_and_resume(root: Path, coco_root: Path) -> Smoke:
    """The smoke run: SIGKILL during notebook 03, then during notebook 05, then the run to its end,
    then once more with OMP_NUM_THREADS=1 after deleting :data:`RECOMPUTED`. ``history``: what the
    manifest claimed after each (every claim checked against the files), whether a report or
    notebook 05's stages existed too early, and every reproducible output's SHA-256 before and
    after the last run."""
    params = smoke_params(root, coco_root)
    cmd = [sys.executable, "-m", "lowbit_helpers", "run", str(params), "--run-id", SMOKE_ID]
    run, report = root / "runs" / SMOKE_ID, root / "reports" / SMOKE_ID / "report.html"
    in_03 = lambda m: any(k.startswith("int8-eval:") for k in m["stages"])  # noqa: E731
    in_05 = lambda m: any(k.startswith("candidate-eval:") for k in m["stages"])  # noqa: E731
    out = {}
    kill_when(cmd, run / "manifest.json", in_03)
    out["before"] = claims_hold(run)
    out["early"] = [report.exists() or in_05(read_json(run / "manifest.json"))]
    kill_when(cmd, run / "manifest.json", in_05)
    out["middle"] = claims_hold(run)
    out["early"].append(report.exists())
    run_cli(cmd)
    out["after"] = claims_hold(run)
    out["report"] = report.is_file()
    out["notebooks"] = {k: v["status"] for k, v in read_json(run / "manifest.json")["notebooks"].items()}
    out["digests"] = digests(run)
    for rel in RECOMPUTED:
        (run / rel).unlink()
    run_cli(cmd, OMP_NUM_THREADS="1")
    out["again"] = claims_hold(run)
    out["digests_again"] = digests(run)
    return Smoke(root, run, report, out)


def digests(run: Path) -> dict[str, str]:
    """SHA-256 of every output the params determine (all but rundir.MEASUREMENTS), from the files."""
    return {rel: sha256_file(run / rel) for rel in reproducible_outputs(run)}
