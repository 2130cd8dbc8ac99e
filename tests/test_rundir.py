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


def test_a_stage_computed_inside_another_counts_in_its_own_duration_only(tmp_path, monkeypatch):
    import lowbit_helpers.rundir as rundir

    now = [100.0]  # a clock the test moves (rundir reads time.perf_counter)
    monkeypatch.setattr(rundir.time, "perf_counter", lambda: now[0])
    run = _run(tmp_path)
    run.file("o.txt").write_text("x")

    def tick(seconds):
        now[0] += seconds

    assert not run.is_fresh("outer", "k")
    tick(2)
    assert not run.is_fresh("inner", "k")  # an input the outer stage needs, computed while it runs
    assert not run.is_fresh("innermost", "k")
    tick(4)
    run.finish("innermost", "k", ["o.txt"])
    tick(1)
    run.finish("inner", "k", ["o.txt"])
    tick(3)
    run.finish("outer", "k", ["o.txt"])
    tick(5)
    assert not run.is_fresh("next", "k")  # after them, not inside: nothing of theirs is charged to it
    tick(1.5)
    run.finish("next", "k", ["o.txt"])
    seconds = {k: v["seconds"] for k, v in run.manifest()["stages"].items()}
    assert seconds == {"innermost": 4.0, "inner": 1.0, "outer": 5.0, "next": 1.5}
    assert not run.is_fresh("outer", "k2")  # recomputed: its earlier nested time is not subtracted again
    tick(2)
    run.finish("outer", "k2", ["o.txt"])
    assert run.manifest()["stages"]["outer"]["seconds"] == 2.0


def test_measured_costs_live_in_the_manifest_and_come_back_on_read(tmp_path):
    """What a stage cost (seconds, peak memory) is not a result: the file holds what the params
    determine, the manifest the rest, and RunDir.read merges the two back."""
    from lowbit_helpers.artifacts import read_json, write_json
    from lowbit_helpers.rundir import is_measurement, merge_measured, reproducible_outputs, split_measured

    obj = {"metrics": {"mAP": 0.5}, "predict_seconds": 1.25, "engines": {"ort": {"seconds": {"total": 3.0}, "n": 4}},
           "rows": [{"a": 1, "build_seconds": 2.0}, {"a": 2}], "calibration": {"seconds": 9.0, "peak_rss_mb": 900.0}}  # fmt: skip
    kept, measured = split_measured(obj)
    assert kept == {"metrics": {"mAP": 0.5}, "engines": {"ort": {"n": 4}}, "rows": [{"a": 1}, {"a": 2}], "calibration": {}}
    assert measured["rows"] == [{"build_seconds": 2.0}, None] and measured["engines"]["ort"]["seconds"] == {"total": 3.0}
    assert merge_measured(kept, measured) == obj and split_measured({"a": [1, 2]}) == ({"a": [1, 2]}, None)
    run = _run(tmp_path)
    for name, predict in (("a", 1.25), ("b", 7.5)):  # the same result, computed at two speeds
        assert not run.is_fresh(f"s-{name}", "k")
        write_json(run.file(f"results/{name}.json"), {**obj, "predict_seconds": predict})
        run.finish(f"s-{name}", "k", [f"results/{name}.json"])
    a, b = (run.path / "results" / f"{n}.json" for n in "ab")
    assert a.read_bytes() == b.read_bytes() and "seconds" not in a.read_text() and read_json(a) == kept
    assert run.read("results/a.json") == obj and run.read("results/b.json")["predict_seconds"] == 7.5
    assert run.manifest()["artifacts"]["results/a.json"]["measured"]["predict_seconds"] == 1.25
    # a bench is a measurement as a whole: left as written, and not among the reproducible outputs
    bench = {"rows": [{"median_ms": 3.0, "seconds": 1.0}]}
    write_json(run.file("results/latency.json"), bench)
    run.finish("bench", "k", ["results/latency.json"])
    assert read_json(run.path / "results/latency.json") == bench == run.read("results/latency.json")
    assert is_measurement("results/latency.json") and is_measurement("onnx/x.modelopt.log") and not is_measurement("results/a.json")
    assert reproducible_outputs(run.path) == ["results/a.json", "results/b.json"]


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


def test_a_declared_stage_computes_once_records_its_dependencies_and_refuses_an_altered_input(tmp_path):
    import pytest

    from lowbit_helpers.errors import LowbitError
    from lowbit_helpers.rundir import Stage

    run = _run(tmp_path)
    calls = []

    def base():
        calls.append("base")
        return {"value": 1, "seconds": 2.0}  # the first output's JSON; its cost moves to the manifest

    def declared():
        return Stage("base", {"p": 1}, [], ["a/base.json"], record={"shown": True})

    assert run.stage(declared(), base) == {"value": 1, "seconds": 2.0}
    assert run.stage(declared(), base) == {"value": 1, "seconds": 2.0} and calls == ["base"]  # fresh: not recomputed
    m = run.manifest()
    assert m["artifacts"]["a/base.json"]["params"] == {"shown": True} and "seconds" not in run.path.joinpath("a/base.json").read_text()

    def derived():  # writes its outputs itself, one of them known only once written
        calls.append("derived")
        run.file("a/extra.txt").write_text(str(run.read("a/base.json")["value"]))
        st.outputs.append("a/extra.txt")

    st = Stage("derived", {"q": 2}, ["a/base.json"], [])
    assert run.stage(st, derived, read=None) is None
    entry = run.manifest()["stages"]["derived"]
    assert entry["inputs"] == ["a/base.json"] and entry["outputs"] == ["a/extra.txt"]
    st = Stage("derived", {"q": 2}, ["a/base.json"], [])
    run.stage(st, derived, read=None)
    assert calls == ["base", "derived"]  # same params and input: reused
    st = Stage("derived", {"q": 3}, ["a/base.json"], [])
    run.stage(st, derived, read=None)
    assert calls == ["base", "derived", "derived"]  # other params: recomputed

    always = Stage("summary", None, [], ["a/s.json"], fixed_key="always")
    run.stage(always, lambda: calls.append("always") or {"n": 1})
    run.stage(always, lambda: calls.append("always") or {"n": 1})
    assert calls.count("always") == 2  # a fixed key is recomputed every time

    run.file("a/base.json").write_text('{"value": 9}')  # altered after it was recorded
    with pytest.raises(LowbitError, match="changed after it was recorded"):
        run.stage(Stage("derived", {"q": 3}, ["a/base.json"], []), derived, read=None)
    with pytest.raises(LowbitError, match="has not run"):
        run.stage(Stage("late", {}, ["a/missing.json"], ["a/late.json"]), lambda: {"x": 1})
    assert not run.has("a/late.json")


def test_json_outputs_are_strict_and_sqnrs_come_back_infinite(tmp_path):
    """NaN and infinity are not JSON (jq and JavaScript reject them): write_json writes null, and a
    sensitivity record reads its SQNRs back as computed (null there: no noise, +inf)."""
    import json
    import math

    import numpy as np

    from lowbit_helpers.artifacts import read_json, write_json
    from lowbit_helpers.sensitivity.metrics import read_back

    rec = {"per_class_ap": {"toaster": float("nan"), "cow": np.float32(0.25)}, "ratio": np.float64("nan"),
           "alone": {"fg_box_sqnr": float("inf"), "raw_sqnr": np.float32(30.5)}, "rows": [np.array([1.0, np.inf])],
           "shape": (2, np.int64(3))}  # fmt: skip
    path = write_json(tmp_path / "r.json", rec)

    def strict(name):
        raise ValueError(f"not JSON: {name}")

    back = json.loads(path.read_text(), parse_constant=strict)  # RFC 8259: no NaN / Infinity tokens
    assert back == {"per_class_ap": {"toaster": None, "cow": 0.25}, "ratio": None, "alone": {"fg_box_sqnr": None, "raw_sqnr": 30.5},
                    "rows": [[1.0, None]], "shape": [2, 3]}  # fmt: skip
    restored = read_back(read_json(path))
    assert restored["alone"]["fg_box_sqnr"] == math.inf and restored["per_class_ap"]["toaster"] is None
