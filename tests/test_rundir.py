"""The run directory's manifest: stage durations and the path a report may show."""

import time

from lowbit_helpers.config import Config
from lowbit_helpers.rundir import RunDir


def _run(tmp_path, run_id="r"):
    cfg = Config(name="r", output={"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports")})
    return RunDir.create(cfg, run_id)


def test_a_computed_stage_records_its_duration_and_a_reused_one_keeps_it(tmp_path):
    run = _run(tmp_path)
    assert not run.is_fresh("s", "k1")  # stale: the clock starts
    time.sleep(0.25)
    run.file("out.txt").write_text("x")
    run.finish("s", "k1", ["out.txt"])
    first = run.manifest()["stages"]["s"]["seconds"]
    assert 0.2 <= first < 5
    again = RunDir.open(run.path)
    assert again.is_fresh("s", "k1")  # reused: nothing starts, the recorded duration stays
    assert again.manifest()["stages"]["s"]["seconds"] == first
    again.finish("t", "k", ["out.txt"])  # finished without a stale check: duration unknown, not made up
    assert again.manifest()["stages"]["t"]["seconds"] is None


def test_the_label_is_never_the_machines_absolute_path(tmp_path):
    run = _run(tmp_path, "abc")
    assert run.label == "<output.runs_dir>/abc" and str(tmp_path) not in run.label
