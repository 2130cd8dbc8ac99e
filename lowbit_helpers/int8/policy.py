"""Which nodes stay in higher precision: the head policy and user exclusions.

The YOLOv10 one-to-one head ends in six 1x1 Convs (``one2one_cv2.{0,1,2}.2`` for the DFL box
logits, ``one2one_cv3.{0,1,2}.2`` for the class logits) whose outputs are the raw head: what
the decoder integrates (DFL softmax) and thresholds (sigmoid). Policies:
* ``none``: quantize everything the algorithm quantizes;
* ``conservative``: keep those six final Convs and everything after them (reshape / concat
  of the output) in float: the plan's conservative head exclusion list;
* ``head``: keep the whole detection head (every node of the last module) in float.
"""

from __future__ import annotations

import re

import onnx

from ..errors import LowbitError

HEAD_POLICIES = ("none", "conservative", "head")
_FINAL_CONV = re.compile(r"/one2one_cv[23]\.\d+/one2one_cv[23]\.\d+\.2/Conv$")


def head_module_prefix(model) -> str:
    """``/model.N/`` of the detection head: the last module that owns a one2one Conv."""
    names = [n.name for n in model.graph.node if "one2one" in n.name]
    if not names:
        raise ValueError("no one-to-one head nodes found: is this a YOLOv10 raw-head export?")
    return names[-1].split("/")[1].join(["/", "/"])


def excluded_nodes(model, policy: str, extra: list[str] | None = None) -> list[str]:
    """Node names to keep in float for ``policy`` plus ``extra`` (validated against the graph)."""
    if policy not in HEAD_POLICIES:
        raise ValueError(f"unknown head policy {policy!r}; use one of {HEAD_POLICIES}")
    names = [n.name for n in model.graph.node]
    unknown = sorted(set(extra or []) - set(names))
    if unknown:
        raise LowbitError(f"excluded node(s) not in the graph: {unknown[:5]}",
                          "use ONNX node names as listed in notebook 01 (e.g. /model.0/conv/Conv)")  # fmt: skip
    out = list(extra or [])
    if policy == "conservative":
        finals = [n for n in names if _FINAL_CONV.search(n)]
        out += finals + _downstream(model, finals)
    elif policy == "head":
        prefix = head_module_prefix(model)
        out += [n for n in names if n.startswith(prefix)] + _downstream(model, [n for n in names if n.startswith(prefix)])
    return sorted(set(out), key=names.index)


def _downstream(model, start: list[str]) -> list[str]:
    """Every node fed (transitively) by the outputs of ``start``."""
    by_name = {n.name: n for n in model.graph.node}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    seen, stack = set(), [o for s in start for o in by_name[s].output]
    while stack:
        t = stack.pop()
        for n in consumers.get(t, []):
            if n.name not in seen:
                seen.add(n.name)
                stack.extend(n.output)
    return [n for n in seen if n not in start]


def checked_exclusions(model_path, calib, method: str, methods: tuple[str, ...], backend: str, head_policy: str,
                       exclude: list[str] | None) -> list[str]:  # fmt: skip
    """The checks both INT8 backends make before calibrating; returns the nodes kept in float."""

    if method not in methods:
        raise LowbitError(f"unknown {backend} calibration method {method!r}", f"use one of {', '.join(methods)}")
    if len(calib) == 0:
        raise LowbitError("no calibration images", "build the calibration tensor with at least one image")
    return excluded_nodes(onnx.load(str(model_path), load_external_data=False), head_policy, exclude)
