"""Command line: ``python -m lowbit_helpers {run,export,evaluate,quantize-int8,sensitivity,schemes,materialize,bench,gpu-bench} ...``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import onnx

from .artifacts import atomic_path, read_json, sha256_file, write_json
from .assets import resolve_model, validate_raw_onnx
from .config import CandidatesCfg, ReconstructionCfg, SensitivityCfg, load_config, parse_config
from .data import calibration_tensor, read_image_list
from .errors import LowbitError
from .export import export_raw_onnx, load_torch_model
from .formats import FORMATS, get_format
from .int8 import (
    ALL_BIAS_CORRECTIONS,
    ALL_METHODS,
    BACKENDS,
    HEAD_POLICIES,
    Int8Options,
    checked,
    option_specs,
    quantize_int8,
)
from .int8.calibration import load_calibration
from .lowbit import DEFAULT_METHOD, method_grammar, parse_method
from .lowbit.integer_form import integer_form
from .lowbit.materialize import check_scheme, materialize, stats_convs
from .lowbit.reconstruct import ReconstructionSettings, reconstructed_integer_form
from .lowbit.stats import collect_stats
from .rundir import REPO_ROOT, RunDir, run_lock
from .runtime import RUNTIMES, bench_models, compare_profiles, environment, profile_model
from .runtime.sessions import OPENVINO_PRECISIONS
from .schema import DECODE_MODES, Skipped
from .sensitivity.metrics import METRICS
from .sensitivity.schemes import write_schemes
from .sensitivity.sweep import DIRECTIONS, activation_ranges, measure
from .sensitivity.torch_proxy import map_convs
from .steps import baseline
from .steps import sensitivity as step
from .steps.baseline import evaluate_model
from .steps.candidates import CANDIDATES


def _raw_onnx(path: str, check_output: bool = True) -> Path:
    """The model argument of a command: an existing raw-head ONNX, or one clear error."""
    model = Path(path)
    if not model.is_file():
        raise LowbitError(f"model not found: {model}", "give an existing raw-head .onnx")
    if check_output:
        validate_raw_onnx(model)
    return model


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _cmd_run(args) -> int:
    t0 = time.perf_counter()
    # late (here and in gpu-bench): the notebook runner and the report layer (papermill, pandas) stay off
    # the start-up of every other command
    from .pipeline import run_pipeline
    from .report.summary import SUMMARY_MD, update_readme

    report = run_pipeline(args.params, args.run_id)
    print(f"report: {report}  ({time.perf_counter() - t0:.0f} s)")
    if args.update_readme:
        update_readme(args.update_readme, report.parent / SUMMARY_MD, report.parent.name)
        print(f"updated the results block of {args.update_readme}")
    return 0


def _cmd_export(args) -> int:
    out = export_raw_onnx(resolve_model(args.weights), args.out, opset=args.opset)
    print(f"wrote {out}")
    return 0


def _cmd_evaluate(args) -> int:
    # an OpenVINO IR (.xml) is read by OpenVINO alone; an ONNX is checked to be a raw-head detector
    ir = Path(args.model).suffix == ".xml"
    if ir and args.runtime != "openvino":
        raise LowbitError(f"{args.model} is an OpenVINO IR, which ONNX Runtime cannot read", "add --runtime openvino")
    model = _raw_onnx(args.model, check_output=not ir)
    subset = args.subset or (f"first:{args.max_images}" if args.max_images else "all")
    cfg = parse_config({
        "name": "evaluate",
        "data": {"coco_root": str(Path(args.coco_root).resolve()), "annotations": args.ann, "subset": subset},
        "decode": {"mode": args.decode, "conf": args.conf, "iou": args.iou, "max_det": args.max_det},
        "evaluation": {"bootstrap": args.bootstrap},
        "runtime": {"threads": args.threads, "providers": args.providers},
    }, source="command line")  # fmt: skip
    engine = "ort-exact" if args.exact else args.runtime if args.precision == "f32" else f"{args.runtime}-{args.precision}"
    if args.exact and args.runtime != "ort":
        raise LowbitError("--exact is ORT with graph optimizations off; OpenVINO has no such mode",
                          "use --runtime ort --exact, or drop --exact")  # fmt: skip
    if args.precision != "f32" and args.runtime != "openvino":
        raise LowbitError("--precision bf16 is an OpenVINO inference precision", "add --runtime openvino")
    result, dets = evaluate_model(model, cfg, progress=not args.quiet, engine=engine)
    m = result["metrics"]
    out = {**{k: m[k] for k in ("mAP_50_95", "mAP_50", "mAP_75")}, "num_images": m["num_images"],
           "model": str(model), **result}  # fmt: skip
    write_json(args.out, out)
    if args.detections:
        write_json(args.detections, dets)
    print(f"mAP50-95 {m['mAP_50_95']:.4f}  mAP50 {m['mAP_50']:.4f}  mAP75 {m['mAP_75']:.4f}  on {m['num_images']} images"
          f" ({engine}) -> {args.out}")  # fmt: skip
    return 0


def _cmd_bench(args) -> int:
    for m in args.models:
        if not Path(m).is_file():
            raise LowbitError(f"model not found: {m}", "give existing .onnx files")
    if args.profile and args.runtime != ["ort"]:
        raise LowbitError("--profile uses ORT's profiler", "profile with --runtime ort alone")
    # every model under every runtime, all interleaved in one process; ratios to the first row
    pairs = [(m, r) for m in args.models for r in args.runtime]
    rows = bench_models([m for m, _ in pairs], args.threads, args.providers, args.warmup, args.runs,
                        runtimes=[r for _, r in pairs])  # fmt: skip
    env = environment()
    for r in rows:
        r["environment"] = env
        print(f"{r['model']} [{r['runtime']}]: median {r['median_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms, x{r['ratio_to_first']:.3f}")
    if args.profile:
        print(f"ORT profiler, {args.profile} runs each; int8 ISA of this CPU: {', '.join(env['cpu_int8_isa']) or 'none'}")
        profiles = [profile_model(m, args.threads, args.providers, args.profile) for m in args.models]
        for r, prof in zip(rows, profiles):
            cmp = compare_profiles(profiles[0], prof)
            r["profile"], r["profile_vs_first"] = prof, cmp
            top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(prof["by_op_type"].items())[:4])
            print(f"{r['model']}: kernels {prof['kernel_ms']:.1f} ms (x{cmp['kernel_ratio']:.3f}); "
                  f"Conv kernels {cmp['conv_ms'][1]:.1f} ms (x{cmp['conv_ratio']:.3f} over {cmp['convs_matched']} Convs); "
                  f"top: {top}")  # fmt: skip
    write_json(args.out, rows)
    return 0


def _cmd_quantize_int8(args) -> int:
    # every option the command line has, into one options object; the backend's rules check it
    # (int8/base.py: check_options, the same rules as a params variant's)
    own = {k: tuple(getattr(args, k)) if spec.many else getattr(args, k) for k, spec in option_specs().items()}
    o = checked(args.backend, Int8Options(method=args.method, head_policy=args.head_policy, exclude=tuple(args.exclude),
                                          bias_correction=args.bias_correction,
                                          bias_correction_images=args.bias_correction_images, **own),
                flags=True)  # fmt: skip
    model = _raw_onnx(args.model, check_output=False)
    if args.calib_npy:
        calib = load_calibration(args.calib_npy, args.images)
    else:
        paths = read_image_list(args.calib)
        calib = calibration_tensor(paths, min(args.images, len(paths)) if args.images else len(paths))
    quantize_int8(args.backend, model, args.out, calib, o)
    print(f"wrote {args.out}")
    return 0


def _cmd_sensitivity(args) -> int:
    model = _raw_onnx(args.model)
    formats = [get_format(f) for f in args.format]
    paths = read_image_list(Path(args.coco_root) / args.calib_list)
    need = args.range_images + args.images
    if len(paths) < need:
        raise LowbitError(f"{args.calib_list} lists {len(paths)} images; --range-images {args.range_images} + "
                          f"--images {args.images} need {need}", "lower --images / --range-images or list more images")  # fmt: skip
    calib = calibration_tensor(paths, need)
    sens = measure(model, calib[args.range_images :], calib[: args.range_images], formats, args.directions,
                   args.metric, args.workers, args.group, args.threads, args.naive_check, progress=print)  # fmt: skip
    sens["calibration"].update(list=str(Path(args.coco_root) / args.calib_list), range_images=[0, args.range_images],
                               sweep_images=[args.range_images, need])  # fmt: skip
    write_json(args.out, sens)
    for name, r in sens["formats"].items():
        naive = r.get("naive", {})
        print(f"{name}: {len(r['records'])} Convs x {r['directions']} on {r['images']} images in "
              f"{r['seconds']['total']:.0f} s (naive, extrapolated: {naive.get('estimated_seconds', float('nan')):.0f} s); "
              f"all-{name}: {args.metric} {r['all'][args.metric]:.2f} dB, raw-head SQNR {r['all']['raw_sqnr']:.2f} dB; "
              f"peak memory {r['peak_rss_gb']:.2f} GB")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


def _commit() -> str:
    """The checkout's commit, short, with ``+changes`` when the package differs from it ("unknown" outside git)."""
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *a], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--", "lowbit_helpers") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cmd_validate_sensitivity(args) -> int:
    """Notebook 04's metric validation alone, on a run's cached stages; its JSON beside the report."""

    cfg = load_config(args.params).resolved()
    s = cfg.sensitivity
    cfg = cfg.model_copy(update={"sensitivity": s.model_copy(update={"validation": s.validation.model_copy(update={"enabled": True})})})
    with run_lock(cfg, args.run_id):  # the run directory is the main job's: one writer at a time
        run = RunDir.create(cfg, args.run_id)
        baseline.baseline_onnx(run)
        baseline.calibration(run)
        # the ground truth needs no sweep; notebook 04 adds the sweep's and the Torch proxy's rows
        result = step.validation(run, None, progress=print)
    if isinstance(result, Skipped):
        raise LowbitError(f"the validation cannot run: {result.why}", "use a params file with real weights")
    out = Path(cfg.output.reports_dir) / run.run_id / step.VALIDATION_REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    # with its measured costs (the run's file leaves them to the manifest) and when and from which code it was made
    write_json(out, {**run.read(step.VALIDATION), "made_on": {"date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": _commit()}})
    a = result["agreement"]
    for name, table in a["spearman"].items():
        print(name + ": " + ", ".join(f"{m} {t['select']['rho']:+.2f}/{t['confirm']['rho']:+.2f}" for m, t in table.items()))
    print(f"chosen metric: {a['chosen'] or 'none (the selection split ranks nothing)'}; best on the selection split: "
          f"{a['best_on_select']} (Spearman select / confirm above); {result['total_seconds']:.0f} s")  # fmt: skip
    print(f"wrote {out}")
    return 0


# materialize's image counts when neither the command line nor --run gives them: the params' defaults
RANGE_IMAGES = SensitivityCfg.model_fields["range_images"].default
STATS_IMAGES = CandidatesCfg.model_fields["stats_images"].default
RECONSTRUCT_IMAGES = ReconstructionCfg.model_fields["images"].default
RECONSTRUCT_BATCH = ReconstructionCfg.model_fields["batch"].default


def _materialize_defaults(args) -> None:
    """Fill what the command line left open: from ``--run`` (the method its ladder chose, its
    calibration tensor and image counts), else the defaults the params and the report use."""
    explicit = args.method is not None
    if args.run:
        run = RunDir.open(args.run)
        if not run.has(CANDIDATES):
            raise LowbitError(f"{args.run} has no {CANDIDATES}", "run notebook 05 for it first, or drop --run")
        args.method = args.method or run.read(CANDIDATES)["method"]
        args.range_images = args.range_images or run.cfg.sensitivity.range_images
        args.stats_images = args.stats_images or run.cfg.candidates.stats_images
        args.weights = args.weights or run.cfg.model.weights
        args.reconstruct_images = args.reconstruct_images or run.cfg.candidates.reconstruction.images
        args.reconstruct_batch = args.reconstruct_batch or run.cfg.candidates.reconstruction.batch
        if not (args.calib or args.calib_npy):
            args.calib_npy = str(run.artifact(baseline.CALIB))
    args.method = args.method or DEFAULT_METHOD
    if args.integer_form and not explicit:  # QLinearConv takes one scale per output channel: the method without blocks
        args.method = parse_method(args.method).per_channel
    args.range_images = args.range_images or RANGE_IMAGES
    args.stats_images = args.stats_images or STATS_IMAGES
    args.reconstruct_images = args.reconstruct_images or RECONSTRUCT_IMAGES
    args.reconstruct_batch = args.reconstruct_batch or RECONSTRUCT_BATCH


def _cmd_materialize(args) -> int:
    _materialize_defaults(args)
    scheme_path = Path(args.scheme)
    if not scheme_path.is_file():
        raise LowbitError(f"scheme not found: {scheme_path}", "give a scheme JSON written by notebook 04 or `schemes`")
    try:
        scheme = read_json(scheme_path)
    except ValueError as exc:
        raise LowbitError(f"{scheme_path} is not valid JSON ({exc})", "give a scheme JSON written by `schemes`") from None
    model_path = _raw_onnx(args.model)
    method = parse_method(args.method)
    if args.integer_form and not Path(args.integer_form).is_file():
        raise LowbitError(f"INT8 recipe not found: {args.integer_form}",
                          "give --integer-form the ORT INT8 file (placement all) of this model, e.g. a run's onnx/ort-percentile-bc.onnx")  # fmt: skip
    if args.integer_form and method.block is not None:
        raise LowbitError(f"method {method.name} has blocked scales, which QLinearConv cannot run (one scale per output channel)",
                          f"drop --method (the default is {method.per_channel} with --integer-form) or give a per-channel one")  # fmt: skip
    if args.reconstruct and not args.integer_form:
        raise LowbitError("--reconstruct learns the codes of an integer form", "add --integer-form INT8.onnx (or drop --reconstruct)")
    if args.reconstruct and not args.weights:
        raise LowbitError("--reconstruct needs the torch model the ONNX was exported from", "add --weights yolov10n (or path.pt), or --run RUN_DIR")
    model = onnx.load(str(model_path))
    source = (scheme.get("source") or {}).get("model_sha256") if isinstance(scheme, dict) else None
    if source and source != sha256_file(model_path):
        raise LowbitError(f"{scheme_path} was made for another model (SHA-256 {source[:12]}…, not {model_path.name}'s)",
                          "materialize the scheme with the model its sensitivity was measured on, or drop its 'source' "
                          "entry to apply its node precisions to this model anyway")  # fmt: skip
    nodes = check_scheme(model, scheme.get("nodes") if isinstance(scheme, dict) else None)
    need = max(args.range_images, args.stats_images, args.reconstruct_images if args.reconstruct else 0)
    if not (args.calib or args.calib_npy):
        raise LowbitError("no calibration images", "pass --calib LIST.txt or --calib-npy calib.npy, or --run RUN_DIR")
    if args.calib_npy:
        calib = load_calibration(args.calib_npy, need)
    else:
        if not Path(args.calib).is_file():
            raise LowbitError(f"calibration list not found: {args.calib}", "pass --calib a text file of train2017 image paths")
        paths = read_image_list(args.calib)
        if len(paths) < need:
            raise LowbitError(f"{args.calib} lists {len(paths)} images; --range-images {args.range_images} / "
                              f"--stats-images {args.stats_images}{f' / --reconstruct-images {args.reconstruct_images}' if args.reconstruct else ''} "
                              f"need {need}", "lower them or list more images")  # fmt: skip
        calib = calibration_tensor(paths, need)
    t0 = time.perf_counter()
    ranges = activation_ranges(model, calib[: args.range_images])
    convs = stats_convs(nodes, method)
    stats = collect_stats(model, convs, calib[: args.stats_images]) if convs else None
    reconstruction = None
    if args.reconstruct:
        tm = load_torch_model(resolve_model(args.weights))
        settings = ReconstructionSettings(iterations=args.reconstruct, images=args.reconstruct_images, batch=args.reconstruct_batch)
        q, info, reconstruction = reconstructed_integer_form(onnx.load(args.integer_form), model, nodes, method, tm,
                                                             map_convs(model, tm)["mapping"], calib, settings, stats=stats)  # fmt: skip
    elif args.integer_form:
        q, info = integer_form(onnx.load(args.integer_form), model, nodes, method, stats=stats)
    else:
        q, info = materialize(model, nodes, method, ranges=ranges, stats=stats)
    out = Path(args.out)
    with atomic_path(out) as tmp:
        onnx.save(q, str(tmp))
    recipe = {"scheme": str(scheme_path), "model": str(model_path), "method": method.name,
              "calibration": {"range_images": args.range_images, "stats_images": args.stats_images},
              "seconds": round(time.perf_counter() - t0, 1), "materialize": info,
              **({"integer_form": str(args.integer_form)} if args.integer_form else {}),
              **({"reconstruction": reconstruction} if reconstruction else {})}  # fmt: skip
    write_json(out.with_suffix(".recipe.json"), recipe)
    print(json.dumps({k: info[k] for k in ("precisions", "deployed", "four_bit_share", "opset") if k in info}))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB) and {out.with_suffix('.recipe.json')}")
    return 0


def _cmd_gpu_bench(args) -> int:
    from .gpu import describe, gpu_bench  # late: see _cmd_run

    result = gpu_bench(args.run_dir, args.out, args.models, args.runs)
    for line in describe(result):
        print(line)
    print(f"wrote {args.out}")
    return 0


def _cmd_schemes(args) -> int:
    paths = write_schemes(args.sens, args.out_dir, args.top_k, args.budgets, args.low, args.high)
    missing = [f for f in (args.low, args.high) if f not in read_json(args.sens)["formats"]]
    if args.budgets and missing:
        print(f"note: no budgeted schemes: the sensitivity file has no {' / '.join(missing)} sweep")
    print(f"wrote {len(paths)} schemes and index.json to {args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lowbit_helpers", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="the main job: six notebooks and the HTML report")
    r.add_argument("params", help="params YAML, e.g. params/default.yaml")
    r.add_argument("--run-id", help="run directory name (default: the params' name)")
    r.add_argument("--update-readme", metavar="README", help="also copy the run's summary into README's results block")
    r.set_defaults(func=_cmd_run)

    e = sub.add_parser("export", help="export YOLOv10 to ONNX with the raw one-to-one head [1,144,8400]")
    e.add_argument("--weights", default="yolov10n", help="yolov10n | yolov10{s,m,b,l,x} | model.pt | random:yolov10m")
    e.add_argument("--out", required=True)
    e.add_argument("--opset", type=int, default=19)
    e.set_defaults(func=_cmd_export)

    v = sub.add_parser("evaluate", help="COCO mAP of a raw-head ONNX")
    v.add_argument("model")
    v.add_argument("--coco-root", required=True)
    v.add_argument("--ann", required=True, help="annotation json, relative to --coco-root")
    v.add_argument("--max-images", type=int, help="the first N image ids in sorted order")
    v.add_argument("--subset", help="instead of --max-images: all | first:N | val100 | ids.txt")
    v.add_argument("--decode", choices=list(DECODE_MODES), default=DECODE_MODES[0])
    v.add_argument("--conf", type=float, default=0.001)
    v.add_argument("--iou", type=float, default=0.7)
    v.add_argument("--max-det", type=int, default=300)
    v.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% interval (0: none)")
    v.add_argument("--threads", type=int, default=2)
    v.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    v.add_argument("--runtime", choices=list(RUNTIMES), default=RUNTIMES[0])
    v.add_argument("--exact", action="store_true", help="ORT with graph optimizations off: exact Q/DQ arithmetic, no integer kernels")
    v.add_argument("--precision", choices=list(OPENVINO_PRECISIONS), default=OPENVINO_PRECISIONS[0],
                   help="openvino: inference precision")
    v.add_argument("--out", required=True, help="metrics.json")
    v.add_argument("--detections", help="also write the detections (COCO results json)")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_cmd_evaluate)

    q = sub.add_parser("quantize-int8", help="INT8 Q/DQ with a registered backend: " + "; ".join(
        f"{b.name} ({b.help})" for b in BACKENDS.values()))  # fmt: skip
    q.add_argument("model")
    q.add_argument("--backend", default=next(iter(BACKENDS)), metavar="{" + ",".join(BACKENDS) + "}",
                   help=" | ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()))  # fmt: skip
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--calib", help="text file of calibration image paths, relative to the file's folder")
    src.add_argument("--calib-npy", help="instead: an N x 3 x 640 x 640 float32 .npy (a run's calib/calib.npy)")
    q.add_argument("--out", required=True)
    q.add_argument("--method", metavar="{" + ",".join(ALL_METHODS) + "}", help="; ".join(
        f"{b.name}: {' | '.join(b.methods)} (default {b.default_method})" for b in BACKENDS.values()))  # fmt: skip
    q.add_argument("--bias-correction", metavar="{" + ",".join(ALL_BIAS_CORRECTIONS) + "}", help="; ".join(
        f"{b.name}: {' | '.join(b.bias_corrections)} (default {b.default_bias_correction})" for b in BACKENDS.values())
        + "; fast on a Q/DQ file is this project's per-Conv correction (int8/bias_correction.py)")  # fmt: skip
    q.add_argument("--bias-correction-images", type=_positive, default=Int8Options.bias_correction_images,
                   help="calibration images [0, N) for this project's bias-correction statistics")
    q.add_argument("--images", type=int, default=128, help="calibration images (the first N of the list)")
    q.add_argument("--head-policy", choices=list(HEAD_POLICIES), default=Int8Options.head_policy)
    q.add_argument("--exclude", nargs="*", default=[], help="ONNX node names kept in float")
    for key, spec in option_specs().items():  # each backend's own options, from the registry
        owner = next(b.name for b in BACKENDS.values() if key in b.options)
        default = getattr(Int8Options(), key)
        kw = {"action": "store_true"} if spec.kind is bool else {
            "type": spec.kind, "metavar": "{" + ",".join(spec.choices) + "}" if spec.choices else None,
            "nargs": spec.nargs, "default": list(default) if spec.many else default}  # fmt: skip
        q.add_argument(spec.flag, dest=key, help=f"{owner}: {spec.help}", **kw)
    q.set_defaults(func=_cmd_quantize_int8)

    s = sub.add_parser("sensitivity", help="per-Conv sensitivity of a raw-head ONNX (alone / kept, detection-aware metrics)")
    s.add_argument("model")
    s.add_argument("--format", nargs="+", default=["w4a16"], choices=list(FORMATS),
                   help="w8a8-ort: the quantizers ORT's quantize_static deploys (sensitivity/deployed.py)")
    s.add_argument("--coco-root", required=True, help="its calibration list gives the (evaluation-disjoint) images")
    s.add_argument("--calib-list", default="calib160.txt", help="relative to --coco-root")
    s.add_argument("--images", type=int, default=64, help="sweep images: list entries [R, R+N)")
    s.add_argument("--range-images", type=int, default=32, help="activation ranges from list entries [0, R)")
    s.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=list(DIRECTIONS))
    s.add_argument("--metric", default="det_sqnr", choices=list(METRICS), help="the ranking metric (sensitivity/metrics.py)")
    s.add_argument("--workers", type=_positive, default=2, help="sweep processes (one ORT thread each)")
    s.add_argument("--group", type=_positive, default=32, help="perturbations whose sessions live at once per worker")
    s.add_argument("--naive-check", type=int, default=2, help="Convs per format also computed naively")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--out", required=True, help="sens.json")
    s.set_defaults(func=_cmd_sensitivity)

    vs = sub.add_parser("validate-sensitivity", help="which sensitivity metric predicts mAP: candidate metrics against "
                        "the COCO mAP of single-layer perturbations (notebook 04's validation, alone)")  # fmt: skip
    vs.add_argument("params", help="params YAML (its sensitivity.validation section; enabled is implied)")
    vs.add_argument("--run-id", default=None, help="run directory name (default: the params' name)")
    vs.set_defaults(func=_cmd_validate_sensitivity)

    c = sub.add_parser("schemes", help="top-K and budgeted mixed-precision schemes from a sensitivity file")
    c.add_argument("sens", help="the JSON `sensitivity` wrote")
    c.add_argument("--out-dir", required=True)
    c.add_argument("--top-k", nargs="+", type=int, default=[0, 5, 10, 20])
    c.add_argument("--budgets", nargs="+", type=float, default=[25, 50, 75, 90], help="percent of conv weights in 4-bit")
    c.add_argument("--low", default="w4a8", choices=[n for n, f in FORMATS.items() if f.weight_bits == 4],
                   help="4-bit format of budgeted schemes")
    c.add_argument("--high", default="w8a8", choices=[n for n, f in FORMATS.items() if f.weight_bits == 8 and not f.ort_placement],
                   help="8-bit format of budgeted schemes")
    c.set_defaults(func=_cmd_schemes)

    z = sub.add_parser("materialize", help="a mixed-precision scheme (JSON) -> one deployable Q/DQ ONNX with INT4/INT8/FP8 weights")
    z.add_argument("scheme", help="scheme JSON (node -> fp32 | fp16 | w8a8 | w4a16 | w4a8 | fp8)")
    z.add_argument("model", help="the FP32 raw-head ONNX the scheme was made for")
    zsrc = z.add_mutually_exclusive_group()
    zsrc.add_argument("--calib", help="text file of calibration image paths (train2017, never evaluation images)")
    zsrc.add_argument("--calib-npy", help="instead: an N x 3 x 640 x 640 float32 .npy (a run's calib/calib.npy)")
    z.add_argument("--run", metavar="RUN_DIR", help="a run after notebook 05 (e.g. runs/default): its chosen 4-bit method, "
                   "its calibration tensor and image counts")  # fmt: skip
    z.add_argument("--method", help=f"4-bit method {method_grammar()} (default: the run's with --run, else "
                   f"{DEFAULT_METHOD}, the default report's choice)")  # fmt: skip
    z.add_argument("--range-images", type=_positive, help="activation ranges from calibration images [0, R) "
                   f"(default: the run's, else {RANGE_IMAGES} as in the params)")  # fmt: skip
    z.add_argument("--stats-images", type=_positive, help="GPTQ / bias-correction statistics from images [0, N) "
                   f"(default: the run's, else {STATS_IMAGES} as in the params)")  # fmt: skip
    z.add_argument("--integer-form", metavar="INT8.onnx", help="write the scheme's 4-bit codes into this ORT INT8 recipe "
                   "of the model (placement all, e.g. a run's onnx/ort-percentile-bc.onnx), so that ORT runs every Conv as "
                   "QLinearConv (scales per output channel: the default method without its -b<B>)")  # fmt: skip
    z.add_argument("--reconstruct", type=_positive, metavar="N", help="with --integer-form: learn the 4-bit codes by block "
                   "reconstruction, N steps per YOLO block (lowbit/reconstruct.py); needs the torch model (--weights)")  # fmt: skip
    z.add_argument("--reconstruct-images", type=_positive, help=f"reconstruction images: calibration images [0, N) (default {RECONSTRUCT_IMAGES})")
    z.add_argument("--reconstruct-batch", type=_positive, help=f"reconstruction images per step (default {RECONSTRUCT_BATCH})")
    z.add_argument("--weights", help="the checkpoint the model was exported from (yolov10n | path.pt; default: the run's model.weights)")
    z.add_argument("--out", required=True, help="OUT.onnx (its recipe goes beside it as OUT.recipe.json)")
    z.set_defaults(func=_cmd_materialize)

    gb = sub.add_parser("gpu-bench", help="ORT CUDA EP and TensorRT (strongly typed) latency of a run's candidates")
    gb.add_argument("run_dir", help="a run directory after notebook 05, e.g. runs/default")
    gb.add_argument("--models", choices=["winners", "all"], default="winners", help="FP32, best INT8 and the winners, or every candidate")
    gb.add_argument("--runs", type=int, default=200)
    gb.add_argument("--out", required=True, help="gpu.json")
    gb.set_defaults(func=_cmd_gpu_bench)

    b = sub.add_parser("bench", help="time ONNX models in one process with the same session options")
    b.add_argument("models", nargs="+")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--runs", type=int, default=50)
    b.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also run each model N times under ORT's profiler: time per op type, Conv kernels vs the first model")  # fmt: skip
    b.add_argument("--runtime", nargs="+", choices=list(RUNTIMES), default=[RUNTIMES[0]],
                   help="time every model under each (interleaved, one process)")  # fmt: skip
    b.add_argument("--out", required=True, help="bench.json")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LowbitError as exc:
        print(f"error: {exc.cause}\n  fix: {exc.fix}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
