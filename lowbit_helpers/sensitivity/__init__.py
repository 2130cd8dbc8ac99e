"""Per-layer sensitivity on the deployed ONNX graph, and the mixed schemes it suggests.

* :mod:`.sweep`: every Conv perturbed alone / kept float, in each format, on sub-graphs (workers);
* :mod:`.metrics`: the detection-aware metrics that rank layers (one list: ``METRICS``);
* :mod:`.deployed`: the ``w8a8-ort`` format, the quantizers ORT's file deploys;
* :mod:`.validation`: which metric predicts COCO mAP (ground truth, Spearman);
* :mod:`.torch_proxy`: the plan's Torch proxy sweep and its name mapping;
* :mod:`.schemes`: top-K and budgeted schemes (node -> precision) from a ranking.
"""
