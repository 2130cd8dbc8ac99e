"""The work behind notebooks 01 and 02, one function per stage.

Each stage reads its inputs through the run's manifest, writes its outputs atomically, and
records them; called again with the same parameters and inputs it returns the recorded
result without recomputing.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from scipy.special import expit

from ..artifacts import atomic_path, write_json
from ..assets import ModelSource, resolve_model
from ..config import Config
from ..data import calibration_tensor, open_coco, preprocess, read_image_list
from ..errors import LowbitError
from ..evaluate import bootstrap_difference, bootstrap_map, evaluate_coco, predict_models, predict_onnx_multi
from ..export import export_raw_onnx, load_torch_model
from ..graph import graph_info
from ..parity import export_ultralytics_e2e, ultralytics_predictions
from ..rundir import RunDir, Stage
from ..runtime import (
    BENCH_SETTINGS,
    bench_models,
    environment,
    fixed_torch_threads,
    make_session,
    run_head,
)
from ..schema import DecodeCfg, Skipped

MODEL = "baseline-onnx/model.onnx"
MODEL_INFO = "baseline-onnx/model_info.json"
SMOKE = "baseline-onnx/smoke.json"
CALIB = "calib/calib.npy"
CALIB_INFO = "calib/calib.json"
FP32_METRICS = "baseline-coco/metrics.json"
FP32_DETECTIONS = "baseline-coco/detections.json"
FP32_LATENCY = "baseline-coco/latency.json"
PARITY = "baseline-coco/parity.json"
PARITY_EXPORT_DIR = "baseline-coco"  # parity puts Ultralytics' end-to-end ONNX here (not recorded)
PARITY_TOLERANCE = 0.002


def versions() -> dict:
    """Library versions that change exported or quantized models (part of stage keys)."""
    import torch  # late: torch costs seconds at import
    import ultralytics  # late: ultralytics (and torch) cost seconds at import

    return {"torch": torch.__version__, "ultralytics": ultralytics.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}  # fmt: skip


def model_source(cfg: Config) -> ModelSource:
    return resolve_model(cfg.model.weights)


# ------------------------------------------------------------------ 01: baseline ONNX
@dataclass
class BaselineResult:
    """Notebook 01's result: the model's facts (``info``: source, graph, op counts, MACs) and the ORT smoke run."""

    info: dict
    smoke: dict


def baseline_onnx(run: RunDir) -> BaselineResult:
    """Resolve and check the model, put the raw-head ONNX in ``baseline-onnx/``, ORT smoke, graph facts."""

    cfg = run.cfg
    source = model_source(cfg)
    params = {"source": source.name, "kind": source.kind, "sha256": source.sha256, "opset": cfg.model.opset,
              "versions": versions()}  # fmt: skip

    def compute():
        out = run.file(MODEL)
        if source.kind == "onnx":
            with atomic_path(out) as tmp:
                shutil.copyfile(source.path, tmp)
        else:
            export_raw_onnx(source, out, opset=cfg.model.opset)
        info = graph_info(out)
        info.update(source=source.name, source_kind=source.kind, source_path=str(source.path or ""),
                    source_sha256=source.sha256, structure_only=source.structure_only, label=source.label)  # fmt: skip
        if source.kind == "checkpoint":
            info["torch_vs_onnx_max_abs"] = torch_onnx_difference(source, out, _first_image(cfg))
        write_json(run.file(MODEL_INFO), info)
        write_json(run.file(SMOKE), ort_smoke(out, cfg))

    run.stage(Stage("baseline_onnx", params, [], [MODEL, MODEL_INFO, SMOKE]), compute, read=None)
    return BaselineResult(run.read(MODEL_INFO), run.read(SMOKE))


def _first_image(cfg: Config) -> Path:
    subset = open_coco(cfg.data.coco_root, cfg.data.annotations, cfg.data.subset)
    return subset.image_path(subset.ids[0])


def torch_onnx_difference(source: ModelSource, onnx_path: str | Path, image: str | Path) -> dict:
    """How far the exported ONNX (run by ORT) is from the torch model on one real image.

    Reported per part of the raw head: DFL logits, class logits, class scores after sigmoid,
    and the error relative to max(1, |logit|). ``float32_floor`` is the same torch model in
    float32 against float64: class logits reach about -90 on background anchors, where
    float32 rounding alone moves them by ~1e-4, so that is the scale to read the others on.
    """
    import torch  # late: torch costs seconds at import

    x, _ = preprocess(image)
    model = load_torch_model(source)
    with torch.no_grad(), fixed_torch_threads():  # the recorded floor must not depend on the caller's threads
        ref = model(torch.from_numpy(x)).numpy()
        ref64 = model.double()(torch.from_numpy(x).double()).numpy()
    got = run_head(make_session(onnx_path, threads=2), x)
    diff = np.abs(got - ref)
    return {
        "image": Path(image).name,
        "max_abs": float(diff.max()),
        "max_abs_dfl": float(diff[:, :64].max()),
        "max_abs_cls_logit": float(diff[:, 64:].max()),
        "max_abs_cls_score": float(np.abs(expit(got[:, 64:]) - expit(ref[:, 64:])).max()),
        "max_rel": float((diff / np.maximum(1.0, np.abs(ref))).max()),
        "float32_floor": float(np.abs(ref - ref64).max()),
    }


def ort_smoke(model: str | Path, cfg: Config) -> dict:
    """One ORT run on a random tensor: loads, runs, right shape, finite."""

    session = make_session(model, cfg.runtime.providers, cfg.runtime.threads)
    x = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    t0 = time.perf_counter()
    y = run_head(session, x)
    ms = (time.perf_counter() - t0) * 1000
    ok = y.shape == (1, 144, 8400) and bool(np.isfinite(y).all())
    if not ok:
        raise LowbitError(f"ORT smoke failed on {model}: output {y.shape}, finite={np.isfinite(y).all()}",
                          "re-export the model; check the source checkpoint")  # fmt: skip
    return {"providers": session.get_providers(), "output_shape": list(y.shape), "finite": True,
            "min": float(y.min()), "max": float(y.max()), "first_run_ms": ms}  # fmt: skip


# ------------------------------------------------------------------ 02: calibration tensor
def calibration(run: RunDir) -> dict:
    """``calib/calib.npy``: the first N listed calibration images through the shared letterbox."""
    cfg = run.cfg
    list_path = Path(cfg.data.coco_root) / cfg.data.calib_list
    paths = read_image_list(list_path)
    n = cfg.data.calib_images
    params = {"list": str(list_path), "images": [str(p) for p in paths[:n]], "count": n}

    def compute():
        arr = calibration_tensor(paths, n)
        with atomic_path(run.file(CALIB)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, arr)
        write_json(run.file(CALIB_INFO), {
            "list": str(list_path), "count": n, "shape": list(arr.shape), "dtype": str(arr.dtype),
            "bytes": int(arr.nbytes), "mean": float(arr.mean()), "std": float(arr.std()),
            "images": [str(p.relative_to(list_path.parent)) for p in paths[:n]],
        })  # fmt: skip

    record = {k: v for k, v in params.items() if k != "images"}
    return run.stage(Stage("calibration", params, [], [CALIB, CALIB_INFO], record=record), compute, read=CALIB_INFO)


# ------------------------------------------------------------------ 02: FP32 COCO evaluation
def evaluate_model(model: str | Path, cfg: Config, subset_name: str | None = None, progress: bool = True,
                   engine: str = "ort") -> tuple[dict, list]:  # fmt: skip
    """mAP of one ONNX on a subset with the run's decode and runtime settings, with its interval;
    ``engine``: one of :data:`..runtime.ENGINES` (ORT's kernels by default)."""

    subset = open_coco(cfg.data.coco_root, cfg.data.annotations, subset_name or cfg.data.subset)
    t0 = time.perf_counter()
    dets = predict_models({"m": (model, engine)}, subset, cfg.decode, cfg.runtime.providers, cfg.runtime.threads)[0]["m"]
    seconds = time.perf_counter() - t0
    ev = evaluate_coco(subset, dets)
    e = cfg.evaluation
    result = {"subset": subset.name, "engine": engine, "annotations": str(subset.ann_file), "decode": cfg.decode.model_dump(),
              "metrics": ev.metrics, "per_class_ap": ev.per_class, "predict_seconds": seconds,
              "bootstrap": bootstrap_map(ev, e.bootstrap, e.confidence, e.seed) if e.bootstrap and dets else None}  # fmt: skip
    return result, dets


def fp32_evaluation(run: RunDir) -> dict:
    cfg = run.cfg
    info = run.read(MODEL_INFO)
    if info["structure_only"]:
        result = {"structure_only": True, "reason": f"{info['label']}: no accuracy is computed for random weights"}
        return run.stage(Stage("fp32_evaluation", None, [], [FP32_METRICS], fixed_key="structure-only"), lambda: result)
    params = {"data": cfg.data.model_dump(), "decode": cfg.decode.model_dump(), "evaluation": cfg.evaluation.model_dump()}

    def compute():
        result, dets = evaluate_model(run.artifact(MODEL), cfg)
        write_json(run.file(FP32_DETECTIONS), dets)
        return result

    return run.stage(Stage("fp32_evaluation", params, [MODEL], [FP32_METRICS, FP32_DETECTIONS]), compute)


# ------------------------------------------------------------------ 02: FP32 latency
def fp32_latency(run: RunDir) -> dict:
    cfg = run.cfg
    model = run.artifact(MODEL)
    params = {"runtime": cfg.runtime.model_dump(), "latency": cfg.latency.model_dump(), "bench": BENCH_SETTINGS}

    def compute():
        row = bench_models([model], cfg.runtime.threads, cfg.runtime.providers, cfg.latency.warmup, cfg.latency.runs)[0]
        row["model"] = MODEL
        return {**row, "environment": environment()}

    return run.stage(Stage("fp32_latency", params, [MODEL], [FP32_LATENCY]), compute)


# ------------------------------------------------------------------ 02: parity with Ultralytics
def parity(run: RunDir, progress: bool = True) -> dict | Skipped:
    """This project's decode against Ultralytics' own predictions on ``parity.subset``.

    Pass: |mAP50-95(top-k decode) - mAP50-95(Ultralytics end-to-end ONNX)| <= 0.002.
    """

    cfg = run.cfg
    info = run.read(MODEL_INFO)
    if not cfg.parity.enabled or info["source_kind"] != "checkpoint":
        why = "disabled in params" if not cfg.parity.enabled else f"needs an Ultralytics checkpoint; model is {info['label']}"
        result = Skipped(why)
        run.stage(Stage("parity", None, [], [PARITY], fixed_key="skipped"), result.record)
        return result
    model = run.artifact(MODEL)
    params = {"subset": cfg.parity.subset, "pt": cfg.parity.ultralytics_pt, "decode": cfg.decode.model_dump(),
              "data": cfg.data.model_dump(), "versions": versions(), "source": info["source_sha256"]}  # fmt: skip

    def compute():
        source = model_source(cfg)
        subset = open_coco(cfg.data.coco_root, cfg.data.annotations, cfg.parity.subset)
        d = cfg.decode
        conf, max_det = d.conf, d.max_det
        topk = DecodeCfg(mode="topk", conf=conf, max_det=max_det)
        nms = DecodeCfg(mode="nms", conf=conf, iou=d.iou, max_det=max_det, pre_nms_topk=d.pre_nms_topk,
                        multi_label=d.multi_label)  # fmt: skip
        rows, evals = [], {}

        def score(tag: str, what: str, dets: list, seconds: float) -> None:
            ev = evaluate_coco(subset, dets, areas=False)  # the table shows no small / medium / large split
            evals[tag] = ev
            rows.append({"variant": tag, "what": what, **{k: ev.metrics[k] for k in ("mAP_50_95", "mAP_50", "mAP_75")},
                         "detections": len(dets), "seconds": seconds})  # fmt: skip

        t0 = time.perf_counter()
        ours_topk, ours_nms = predict_onnx_multi(make_session(model, threads=cfg.runtime.threads), subset, [topk, nms], progress)
        t_ours = time.perf_counter() - t0
        shared = "(seconds: one forward pass shared by both decodes)"
        score("ours_topk", f"this project: raw-head ONNX, square letterbox, one-to-one top-k decode {shared}", ours_topk, t_ours)
        score("ours_nms", f"this project: raw-head ONNX, square letterbox, NMS IoU {d.iou} {shared}", ours_nms, t_ours)
        e2e = export_ultralytics_e2e(source, run.path / PARITY_EXPORT_DIR, opset=cfg.model.opset)
        refs = [("ultralytics_onnx_e2e", "Ultralytics predict, its own NMS-free ONNX (square letterbox, top-300)", e2e, {})]
        if cfg.parity.ultralytics_pt:
            refs += [
                ("ultralytics_pt", f"Ultralytics predict from .pt (rect letterbox, one-to-many head + NMS IoU {d.iou})",
                 source.path, {"iou": d.iou}),
                ("ultralytics_pt_one2one", "Ultralytics predict from .pt with nms=False (rect letterbox, one-to-one head)",
                 source.path, {"nms": False}),
            ]  # fmt: skip
        for tag, what, f, kw in refs:
            t0 = time.perf_counter()
            dets = ultralytics_predictions(f, subset, conf=conf, max_det=max_det, progress=progress, **kw)
            score(tag, what, dets, time.perf_counter() - t0)
        e = cfg.evaluation
        diff = bootstrap_difference(evals["ours_topk"], evals["ultralytics_onnx_e2e"], e.bootstrap or 200, e.confidence, e.seed)
        return {"subset": subset.name, "num_images": len(subset), "rows": rows, "difference_topk_vs_e2e": diff,
                "tolerance": PARITY_TOLERANCE, "passed": abs(diff["delta"]) <= PARITY_TOLERANCE}  # fmt: skip

    return run.stage(Stage("parity", params, [MODEL], [PARITY]), compute)
