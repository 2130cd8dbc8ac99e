import numpy as np
import pytest

from lowbit_helpers.config import DecodeCfg
from lowbit_helpers.decode import anchors, decode, dfl_boxes

BACKGROUND = -20.0  # sigmoid(-20) ~ 2e-9, below any conf threshold


def empty_head() -> np.ndarray:
    raw = np.zeros((144, 8400), dtype=np.float32)
    raw[64:] = BACKGROUND
    return raw


def put_box(raw, anchor, bins, cls=None, logit=2.0):
    """Peaked DFL logits: side s sits (almost exactly) at bin bins[s]."""
    for side, b in enumerate(bins):
        raw[side * 16 : side * 16 + 16, anchor] = -50.0
        raw[side * 16 + b, anchor] = 50.0
    if cls is not None:
        raw[64 + cls, anchor] = logit


def test_anchor_layout():
    pts, stride = anchors()
    assert pts.shape == (8400, 2)
    assert tuple(pts[0]) == (0.5, 0.5) and stride[0] == 8
    assert tuple(pts[81]) == (1.5, 1.5)  # row-major within a level: index = y * 80 + x
    assert stride[6400] == 16 and tuple(pts[6400]) == (0.5, 0.5)
    assert stride[8000] == 32 and tuple(pts[8399]) == (19.5, 19.5)


def test_dfl_integral_hand_computed():
    raw = empty_head()
    # anchor (x=10, y=4) of the stride-8 level: index 4*80+10; sides l,t,r,b at bins 3,1,5,2
    a = 4 * 80 + 10
    put_box(raw, a, (3, 1, 5, 2))
    # expected: ((10.5-3)*8, (4.5-1)*8, (10.5+5)*8, (4.5+2)*8)
    np.testing.assert_allclose(dfl_boxes(raw)[a], [60.0, 28.0, 124.0, 52.0], atol=1e-4)
    # two equal bins 2 and 4 -> expectation 3; all-equal logits -> mean bin 7.5
    raw[0:16, a] = -100.0
    raw[2, a] = raw[4, a] = 10.0
    assert dfl_boxes(raw)[a, 0] == pytest.approx((10.5 - 3.0) * 8, abs=1e-4)
    b = 6400 + 2 * 40 + 3  # stride 16, x=3, y=2, all-zero logits
    np.testing.assert_allclose(dfl_boxes(raw)[b], [(3.5 - 7.5) * 16, (2.5 - 7.5) * 16, (3.5 + 7.5) * 16, (2.5 + 7.5) * 16],
                               atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("mode", ["nms", "topk"])
def test_single_detection(mode):
    raw = empty_head()
    a = 4 * 80 + 10
    put_box(raw, a, (3, 1, 5, 2), cls=5, logit=2.0)
    d = decode(raw[None], DecodeCfg(mode=mode))
    assert len(d) == 1
    assert d.classes[0] == 5 and d.scores[0] == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-6)
    np.testing.assert_allclose(d.boxes[0], [60.0, 28.0, 124.0, 52.0], atol=1e-4)


def test_nms_is_class_aware():
    raw = empty_head()
    a, b, c = 4 * 80 + 10, 4 * 80 + 11, 40 * 80 + 40
    put_box(raw, a, (3, 3, 3, 3), cls=0, logit=3.0)
    put_box(raw, b, (4, 3, 2, 3), cls=0, logit=1.0)  # the same box as a (shifted anchor), lower score
    put_box(raw, c, (3, 3, 3, 3), cls=0, logit=0.5)  # far away
    d = decode(raw, DecodeCfg(mode="nms", iou=0.7))
    np.testing.assert_allclose(sorted(d.scores), sorted(1 / (1 + np.exp(-np.array([3.0, 0.5])))), rtol=1e-6)
    raw[64 + 0, b] = BACKGROUND
    raw[64 + 7, b] = 1.0  # same box, another class: kept
    d = decode(raw, DecodeCfg(mode="nms", iou=0.7))
    assert len(d) == 3 and set(d.classes.tolist()) == {0, 7}


def test_multi_label_and_limits():
    raw = empty_head()
    a = 4 * 80 + 10
    put_box(raw, a, (3, 3, 3, 3), cls=1, logit=2.0)
    raw[64 + 2, a] = 1.0  # the same anchor is also class 2
    assert len(decode(raw, DecodeCfg(mode="nms", multi_label=True))) == 2
    assert len(decode(raw, DecodeCfg(mode="nms", multi_label=False))) == 1
    for i in range(50):
        put_box(raw, 6400 + i * 2, (1, 1, 1, 1), cls=3, logit=1.0 + i / 100)
    assert len(decode(raw, DecodeCfg(mode="nms", max_det=10))) == 10
    d = decode(raw, DecodeCfg(mode="nms", pre_nms_topk=5))
    assert len(d) == 5 and d.scores.min() >= 1 / (1 + np.exp(-1.46))


def test_topk_selects_best_anchors_then_pairs():
    raw = empty_head()
    put_box(raw, 0, (1, 1, 1, 1), cls=0, logit=4.0)
    raw[64 + 1, 0] = 3.5  # anchor 0 also scores class 1
    put_box(raw, 100, (1, 1, 1, 1), cls=2, logit=3.0)
    put_box(raw, 200, (1, 1, 1, 1), cls=3, logit=-1.0)
    d = decode(raw, DecodeCfg(mode="topk", max_det=2))
    # anchors 0 and 100 are the two best; among their pairs the top two are (0, c0) and (0, c1)
    assert d.classes.tolist() == [0, 1]
    d = decode(raw, DecodeCfg(mode="topk", max_det=3, conf=0.5))
    assert d.classes.tolist() == [0, 1, 2]  # anchor 200 (score 0.27) is cut by conf
