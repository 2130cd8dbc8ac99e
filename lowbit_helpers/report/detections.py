"""Side-by-side detections: the same images through FP32, the INT8 pick and the low-bit pick.

What the mAP deltas look like on real images: each model's decoded boxes (score at least
``SHOW_SCORE``) drawn on the original image with class and score, one column per model.
"""

from __future__ import annotations

from pathlib import Path

from ..data import load_image, preprocess
from ..decode import decode
from ..runtime import make_session

SHOW_SCORE = 0.35  # boxes below this score are not drawn (the evaluation keeps them all)


def detections_figure(models: dict[str, Path], subset, image_ids: list[int], decode_cfg, threads: int = 2):
    """A grid: one row per image of ``image_ids``, one column per ``models`` entry (label -> ONNX)."""
    import matplotlib.pyplot as plt  # late: matplotlib only for figures

    names = {i: c["name"] for i, c in enumerate(sorted(subset.coco.loadCats(subset.coco.getCatIds()), key=lambda c: c["id"]))}
    sessions = {label: make_session(path, threads=threads) for label, path in models.items()}
    fig, axes = plt.subplots(len(image_ids), len(models), figsize=(4.6 * len(models), 3.6 * len(image_ids)), squeeze=False)
    for row, image_id in enumerate(image_ids):
        path = subset.image_path(image_id)
        tensor, lb = preprocess(path)
        rgb = load_image(path)[:, :, ::-1]
        for col, (label, sess) in enumerate(sessions.items()):
            d = decode(sess.run(None, {sess.get_inputs()[0].name: tensor})[0], decode_cfg)
            keep = d.scores >= SHOW_SCORE
            ax = axes[row, col]
            ax.imshow(rgb)
            for (x0, y0, x1, y1), s, c in zip(lb.to_original(d.boxes[keep]), d.scores[keep], d.classes[keep]):
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.6, color=f"C{int(c) % 10}"))
                ax.text(x0, y0, f"{names.get(int(c), c)} {s:.2f}", fontsize=7, color="white", va="bottom",
                        bbox={"facecolor": f"C{int(c) % 10}", "alpha": 0.8, "pad": 1, "lw": 0})  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"image {image_id}", fontsize=9)
            ax.set_xlabel(f"{int(keep.sum())} boxes ≥ {SHOW_SCORE}", fontsize=8)
    fig.tight_layout()
    return fig
