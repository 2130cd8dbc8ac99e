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
