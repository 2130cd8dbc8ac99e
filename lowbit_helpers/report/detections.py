"""Side-by-side detections: the same images through FP32, the INT8 pick and the low-bit pick.

What the mAP deltas look like on real images: each model's boxes (recorded by
:func:`..steps.summary.pick_detections`: score at least its ``show_score``, original image pixels)
drawn on the original image with class and score, one column per model.
"""

from __future__ import annotations

from ..data import load_image


def detections_figure(detections: dict, subset):
    """A grid: one row per recorded image, one column per model (``subset`` finds the image files)."""
    import matplotlib.pyplot as plt  # late: matplotlib only for figures

    names, boxes, show = detections["class_names"], detections["boxes"], detections["show_score"]
    ids = detections["images"]
    fig, axes = plt.subplots(len(ids), len(boxes), figsize=(4.6 * len(boxes), 3.6 * len(ids)), squeeze=False)
    for row, image_id in enumerate(ids):
        rgb = load_image(subset.image_path(image_id))[:, :, ::-1]
        for col, (label, per_image) in enumerate(boxes.items()):
            found = per_image[str(image_id)]
            ax = axes[row, col]
            ax.imshow(rgb)
            for x0, y0, x1, y1, s, c in found:
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.6, color=f"C{int(c) % 10}"))
                ax.text(x0, y0, f"{names[int(c)]} {s:.2f}", fontsize=7, color="white", va="bottom",
                        bbox={"facecolor": f"C{int(c) % 10}", "alpha": 0.8, "pad": 1, "lw": 0})  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"image {image_id}", fontsize=9)
            ax.set_xlabel(f"{len(found)} boxes ≥ {show}", fontsize=8)
    fig.tight_layout()
    return fig
