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


def test_one_run_per_run_id_at_a_time(tmp_path, capsys, coco_root):
    """A second run with the same id refuses before writing anything; another id runs beside it."""
    import pytest

    from lowbit_helpers.__main__ import main
    from lowbit_helpers.errors import LowbitError
    from lowbit_helpers.rundir import run_lock

    cfg = Config(name="r", output={"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports")})
    with run_lock(cfg):
        with pytest.raises(LowbitError, match="run 'r' is already running"):
            with run_lock(cfg):
                pass
        with run_lock(cfg, "other"):  # a different id: no collision
            assert (tmp_path / "runs" / "other" / ".lock").is_file()
        params = tmp_path / "r.yaml"
        params.write_text(f"name: r\noutput: {{runs_dir: {tmp_path / 'runs'}, reports_dir: {tmp_path / 'reports'}}}\n"
                          f"data: {{coco_root: {coco_root}}}\n")  # fmt: skip
        assert main(["run", str(params)]) == 2  # the whole pipeline, as a second process would start it
        err = capsys.readouterr().err
        assert "error: run 'r' is already running (pid " in err and "fix: wait for it to finish" in err
        assert sorted(p.name for p in (tmp_path / "runs" / "r").iterdir()) == [".lock"]  # nothing written
        assert main(["validate-sensitivity", str(params)]) == 2  # the other command that writes a run directory
        assert "error: run 'r' is already running" in capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / "runs" / "r").iterdir()) == [".lock"]
    with run_lock(cfg):  # released with its holder
        pass


def test_an_unwritable_runs_directory_is_named(tmp_path):
    import pytest

    from lowbit_helpers.errors import LowbitError
    from lowbit_helpers.rundir import run_lock

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = Config(name="r", output={"runs_dir": str(blocker / "runs")})
    with pytest.raises(LowbitError, match="cannot write the run directory") as e:
        with run_lock(cfg):
            pass
    assert "output.runs_dir" in e.value.fix


def test_a_run_id_outside_the_runs_directory_is_refused_before_anything_is_written(tmp_path):
    import pytest

    from lowbit_helpers.errors import LowbitError
    from lowbit_helpers.rundir import run_lock

    cfg = Config(name="r", output={"runs_dir": str(tmp_path / "runs")})
    for bad in ("../escape", ".hidden", ""):
        with pytest.raises(LowbitError, match="invalid run id"):
            with run_lock(cfg, bad or None) if bad else run_lock(cfg.model_copy(update={"name": ""})):
                pass
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()
