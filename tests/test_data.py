import numpy as np
import pytest

from lowbit_helpers.data import (
    calibration_tensor,
    letterbox,
    load_image,
    open_coco,
    preprocess,
    read_image_list,
)  # fmt: skip
from lowbit_helpers.errors import LowbitError

from .conftest import VAL100, VAL500


@pytest.mark.parametrize("hw", [(480, 640), (640, 427), (333, 500), (1000, 200), (640, 640)])
def test_letterbox_round_trip(hw):
    img = np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)
    out, lb = letterbox(img)
    assert out.shape == (640, 640, 3)
    h, w = hw
    boxes = np.array([[0, 0, w, h], [10.5, 20.25, 100.0, 150.0]])
    back = lb.to_original(lb.to_input(boxes))
    np.testing.assert_allclose(back, boxes, atol=1e-9)
    # the whole image maps inside the padded square, padding is split evenly (±1 px)
    full = lb.to_input(boxes[:1])[0]
    assert full[0] >= 0 and full[1] >= 0 and full[2] <= 640 and full[3] <= 640
    assert abs(full[0] - (640 - full[2])) <= 1 and abs(full[1] - (640 - full[3])) <= 1


def test_letterbox_matches_ultralytics_pixels(coco_root):
    from ultralytics.data.augment import LetterBox

    for name in ["000000000139.jpg", "000000000285.jpg", "000000000632.jpg"]:
        img = load_image(coco_root / "images" / "val2017" / name)
        ours, _ = letterbox(img)
        theirs = LetterBox((640, 640), auto=False)(image=img)
        assert np.array_equal(ours, theirs), name


def test_preprocess_is_rgb_unit_float(coco_root):
    x, lb = preprocess(coco_root / "images" / "val2017" / "000000000139.jpg")
    assert x.shape == (1, 3, 640, 640) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.isclose(x[0, :, 0, 0], 114 / 255).all()  # top rows are padding (image is 640x426)
    img = load_image(coco_root / "images" / "val2017" / "000000000139.jpg")
    row = lb.pad_y + 5
    np.testing.assert_allclose(x[0, 0, row, 320], letterbox(img)[0][row, 320, 2] / 255, rtol=1e-6)  # R from BGR


def test_corrupt_and_missing_images(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(LowbitError, match="cannot decode image"):
        load_image(bad)
    with pytest.raises(LowbitError, match="image not found"):
        load_image(tmp_path / "missing.jpg")


def test_open_coco_subsets(coco_root):
    s100 = open_coco(coco_root, VAL500, "val100")
    assert len(s100) == 100 and s100.ids == sorted(s100.ids) and s100.ids[0] == 139
    assert open_coco(coco_root, VAL500, "val500").ids[:100] == s100.ids
    assert len(open_coco(coco_root, VAL100, "first:7")) == 7
    assert len(open_coco(coco_root, VAL100, "all")) == 100
    assert s100.image_path(139).is_file()
    assert len(s100.category_ids) == 80 and s100.category_ids[0] == 1 and s100.category_ids[-1] == 90


def test_open_coco_errors(coco_root, tmp_path):
    with pytest.raises(LowbitError, match="COCO root not found"):
        open_coco(tmp_path / "nowhere", VAL100, "all")
    with pytest.raises(LowbitError, match="annotation file not found"):
        open_coco(coco_root, "annotations/missing.json", "all")
    with pytest.raises(LowbitError, match="unknown subset"):
        open_coco(coco_root, VAL100, "val999")
    with pytest.raises(LowbitError, match="not in instances_val2017_val100.json"):
        open_coco(coco_root, VAL100, "val500")


def test_image_list_errors(tmp_path, coco_root):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(LowbitError, match="is empty"):
        read_image_list(empty)
    with pytest.raises(LowbitError, match="calibration list not found"):
        read_image_list(tmp_path / "none.txt")
    missing = tmp_path / "missing.txt"
    missing.write_text("a.jpg\n")
    with pytest.raises(LowbitError, match="do not exist"):
        read_image_list(missing)
    paths = read_image_list(coco_root / "calib160.txt")
    assert len(paths) == 160 and all("train2017" in str(p) for p in paths)
    with pytest.raises(LowbitError, match="requested but the list has"):
        calibration_tensor(paths[:2], 3)


def test_calibration_tensor_matches_preprocess(coco_root):
    paths = read_image_list(coco_root / "calib160.txt")
    cal = calibration_tensor(paths, 2)
    assert cal.shape == (2, 3, 640, 640) and cal.dtype == np.float32
    np.testing.assert_array_equal(cal[1], preprocess(paths[1])[0][0])


def test_calibration_images_are_disjoint_from_evaluation(coco_root):
    paths = read_image_list(coco_root / "calib160.txt")
    val500 = open_coco(coco_root, VAL500, "val500")
    eval_files = {val500.image_path(i).name for i in val500.ids}
    assert not eval_files & {p.name for p in paths}
