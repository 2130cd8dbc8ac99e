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
    """Mark the slow tests; the tests that read a pipeline (tests/smoke.py) go last, so that the
    other tests run while the pipelines do."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: _reads(item) is not None)


def _reads(item) -> str | None:
    """The pipeline of tests/smoke.py a test reads: "smoke", the structure-only test's name, or None."""
    from tests.smoke import STRUCTURE_TEST

    if "smoke_run" in getattr(item, "fixturenames", ()):
        return "smoke"
    return STRUCTURE_TEST if getattr(item, "originalname", item.name) == STRUCTURE_TEST else None


@pytest.fixture(scope="session", autouse=True)
def beside(request, tmp_path_factory):
    """The smoke run and the structure-only run (tests/smoke.py), started with the session's first
    test when tests that read them are collected, so they run beside everything else; the weights
    are fetched first, so no two processes download them (a missing COCO folder or weights fails
    those tests, not the session). Not a dependency of the fast tests: their fixtures stay theirs
    (the slow marking above reads them). Whatever still runs at the end of the session
    (interrupted, failed) is killed."""
    from tests.smoke import start_beside, stop_beside

    wanted = {_reads(item) for item in request.session.items} - {None}
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
def smoke_run(coco_root, beside):
    """The smoke run of all six notebooks (killed twice, finished, run once more: tests/smoke.py),
    once per test session: the content, browser, gpu-bench, CLI, resume and determinism tests all
    read it (each full pipeline costs minutes on two cores)."""
    return beside["smoke"].result()
