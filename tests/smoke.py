"""The smoke pipelines the slow tests share (params/smoke.yaml on a handful of images).

The smoke run itself (``conftest.smoke_run``) and, beside it in threads from the session's first
test on (:func:`start_beside`), the killed-and-resumed run and the structure-only run. One pipeline
keeps the two cores about three quarters busy (notebook start-up, imports and papermill are one
thread), so the others, and the unit tests, run alongside.

Every pipeline process starts with the environment the session started with (:data:`ENV`), not
the one of the moment: a test that sets a variable (``monkeypatch.setenv("LOWBIT_CACHE", ...)`` in
tests/test_assets.py) while a background run starts a process would otherwise hand it to that run
(measured: the killed run then fetched the weights into the test's folder and its model_info.json
named another source path than the smoke run's).
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

REPO = Path(__file__).resolve().parent.parent
SMOKE_ID = "smoke-test"
STRUCTURE_TEST = "test_structure_only_model_shows_no_accuracy"
KILL_TEST = "test_a_killed_run_resumes_where_it_stopped"
RERUN_TEST = "test_a_rerun_reuses_every_stage"  # reads the killed run too
# at import (collection, before any test imports ultralytics, which sets OMP_NUM_THREADS=1 in os.environ):
# so the background runs have no OMP_NUM_THREADS and the in-process smoke run's kernels have 1, and the
# killed run's byte comparison with the smoke run also shows that no recorded result depends on it
ENV = dict(os.environ)

# what the structure-only run needs of the smoke params: the code paths a random model changes
# (no accuracy, no parity, latency and the profiler still), not every backend and engine again
STRUCTURE_ONLY = {
    "int8": {"variants": [{"name": "ort-percentile", "backend": "ort", "method": "percentile"}], "fp32_engines": [],
             "emulate": {"cpu": None}},
    "sensitivity": {"formats": ["w8a8-ort", "w4a8"], "naive_check": 0, "proxy": False, "budgets": [], "top_k": [0]},
    "candidates": {"ladder": ["rtn"], "ladder_schemes": ["w4a8-top0"], "schemes": ["w4a8-top0"], "fp8": False,
                   "random_schemes": 0, "heuristic": False},
}  # fmt: skip


@dataclass(frozen=True)
class Smoke:
    root: Path  # the params' output folders live here
    run: Path
    report: Path


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
            self.join(3 * PIPELINE_TIMEOUT)
            assert not self.is_alive(), f"{self.fn.__name__} still runs after {3 * PIPELINE_TIMEOUT} s"
        if self.error is not None:
            raise self.error
        return self.value


def start_beside(wanted: set[str], tmp_path_factory, inputs) -> dict[str, Beside]:
    """Start, each in its thread, the background pipelines whose tests are in ``wanted``: the
    killed-and-resumed run and the structure-only run. ``inputs()`` gives the COCO root (and
    fetches the weights first, so no two processes download them); where it fails, only those
    tests fail."""
    try:
        coco_root, error = inputs(), None
    except BaseException as exc:  # noqa: BLE001 - raised by the tests that read the jobs, not by every test
        coco_root, error = None, exc
    jobs = {}
    table = (((KILL_TEST, RERUN_TEST), "killed", kill_and_resume), ((STRUCTURE_TEST,), "random", structure_only_run))
    for tests, name, fn in table:
        if wanted & set(tests):
            job = Beside(fn, tmp_path_factory.mktemp(name), coco_root, error=error)
            jobs.update({test: job for test in tests})
    for job in set(jobs.values()):
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
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, env=ENV, **kw)
    LIVE.add(proc)
    return proc


def run_cli(cmd: list[str]) -> None:
    proc = _start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def kill_and_resume(root: Path, coco_root: Path) -> dict:
    """SIGKILL during notebook 03, then during notebook 05, then the run to its end, then once more:
    what the manifest claimed after each (every claim checked against the files), and whether a
    report or notebook 05's stages existed too early."""
    params = smoke_params(root, coco_root)
    cmd = [sys.executable, "-m", "lowbit_helpers", "run", str(params), "--run-id", SMOKE_ID]
    run, report = root / "runs" / SMOKE_ID, root / "reports" / SMOKE_ID / "report.html"
    in_03 = lambda m: any(k.startswith("int8-eval:") for k in m["stages"])  # noqa: E731
    in_05 = lambda m: any(k.startswith("candidate-eval:") for k in m["stages"])  # noqa: E731
    out = {"root": root, "run": run}
    kill_when(cmd, run / "manifest.json", in_03)
    out["before"] = claims_hold(run)
    out["early"] = [report.exists() or in_05(read_json(run / "manifest.json"))]
    kill_when(cmd, run / "manifest.json", in_05)
    out["middle"] = claims_hold(run)
    out["early"].append(report.exists())
    run_cli(cmd)
    out["after"] = claims_hold(run)
    out["report"] = report.is_file()
    run_cli(cmd)  # the finished run once more: every stage is reused (test_a_rerun_reuses_every_stage)
    out["again"] = claims_hold(run)
    return out
