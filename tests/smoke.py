"""The smoke pipelines the slow tests share (params/smoke.yaml on a handful of images).

The smoke run itself (``conftest.smoke_run``) and, beside it in threads from the session's first
test on, the pipelines that only their own test reads: the killed-and-resumed run and the
structure-only run (:func:`start_beside`). One pipeline keeps the two cores about three quarters
busy (notebook start-up, imports and papermill are one thread), so the others, and the unit
tests, run alongside.
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
KILL_TEST = "test_a_killed_run_resumes_where_it_stopped"
STRUCTURE_TEST = "test_structure_only_model_shows_no_accuracy"

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


class Beside(threading.Thread):
    """A pipeline run as subprocesses in a thread; ``result()`` waits and re-raises its failure."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.value, self.error = fn, args, None, None

    def run(self):
        try:
            self.value = self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test that reads it
            self.error = exc

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def start_beside(wanted: set[str], tmp_path_factory, coco_root: Path) -> dict[str, Beside]:
    """Start the pipelines of the collected tests among ``wanted`` (test names)."""
    jobs = {name: Beside(fn, tmp_path_factory.mktemp(name), coco_root)
            for name, (test, fn) in {"killed": (KILL_TEST, kill_and_resume), "random": (STRUCTURE_TEST, structure_only_run)}.items()
            if test in wanted}  # fmt: skip
    for job in jobs.values():
        job.start()
    return jobs


def run_cli(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd[2:])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def structure_only_run(root: Path, coco_root: Path) -> Path:
    params = smoke_params(root, coco_root, STRUCTURE_ONLY, weights="random:yolov10n")
    run_cli([sys.executable, "-m", "lowbit_helpers", "run", str(params), "--run-id", "random"])
    return root


def kill_when(cmd: list[str], manifest: Path, ready, timeout: float = 1500) -> None:
    """Start ``cmd`` in its own process group and SIGKILL the whole group (papermill's kernel
    included) as soon as ``ready(manifest)`` holds: a crash, not a clean stop."""
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def claims_hold(run: Path) -> dict:
    """Every stage the manifest calls finished has its outputs, byte for byte; its finish times."""
    m = read_json(run / "manifest.json")
    for stage, entry in m["stages"].items():
        for rel in entry["outputs"]:
            assert (run / rel).is_file() and sha256_file(run / rel) == m["artifacts"][rel]["sha256"], (stage, rel)
    return {k: v["finished"] for k, v in m["stages"].items() if v["key"] not in ("always", "derived")}


def kill_and_resume(root: Path, coco_root: Path) -> dict:
    """SIGKILL during notebook 03, then during notebook 05, then the run to its end: what the
    manifest claimed after each (every claim checked against the files), and whether a report or
    notebook 05's stages existed too early."""
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
    return out
