import os
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parent.parent
COCO = (REPO.parent / "shared" / "coco2017").resolve()
VAL500 = "annotations/instances_val2017_val500.json"
VAL100 = "annotations/instances_val2017_val100.json"


@pytest.fixture(scope="session")
def coco_root() -> Path:
    assert COCO.is_dir(), f"the shared COCO subset is expected at {COCO}"
    return COCO


@pytest.fixture(scope="session")
def yolov10n():
    from lowbit_helpers.assets import resolve_model

    return resolve_model("yolov10n")


@pytest.fixture(scope="session")
def yolov10n_onnx(yolov10n, tmp_path_factory) -> Path:
    from lowbit_helpers.export import export_raw_onnx

    return export_raw_onnx(yolov10n, tmp_path_factory.mktemp("export") / "yolov10n.onnx")


# Tests that need the real model (download, export) or the COCO folder are slow by definition:
# `-m "not slow"` is then the unit tests on tiny inputs alone (the README gives its time).
SLOW_FIXTURES = {"coco_root", "yolov10n", "yolov10n_onnx"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def beside(request, tmp_path_factory):
    """The killed-and-resumed and the structure-only pipelines (tests/smoke.py), started with the
    session's first test when their tests are collected, so they run beside everything else; the
    weights are fetched first, so no two processes download them (a missing COCO folder or
    weights fails those tests, not the session). Not a dependency of the fast tests: their
    fixtures stay theirs (the slow marking above reads them). Whatever still runs at the end of
    the session (interrupted, failed) is killed."""
    from tests.smoke import KILL_TEST, RERUN_TEST, STRUCTURE_TEST, start_beside, stop_beside

    wanted = {getattr(item, "originalname", item.name) for item in request.session.items} & {KILL_TEST, RERUN_TEST, STRUCTURE_TEST}
    if not wanted:
        yield {}
        return

    def inputs():
        request.getfixturevalue("yolov10n")
        return request.getfixturevalue("coco_root")

    try:
        yield start_beside(wanted, tmp_path_factory, inputs)
    finally:
        stop_beside()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, coco_root, beside):
    """The smoke run of all six notebooks, once per test session: the content, browser,
    gpu-bench, CLI and resume tests all read it (each full pipeline costs minutes on two cores)."""
    from lowbit_helpers.pipeline import run_pipeline
    from tests.smoke import SMOKE_ID, Smoke, smoke_params

    root = tmp_path_factory.mktemp("smoke")
    report = run_pipeline(smoke_params(root, coco_root), run_id=SMOKE_ID, progress=False)
    return Smoke(root, root / "runs" / SMOKE_ID, report)
