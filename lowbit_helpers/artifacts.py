"""Atomic artifact writes and content hashes.

Every artifact is written under a temporary name in its final folder and renamed when
complete, so an interrupted stage never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as strict JSON (RFC 8259, what jq and JavaScript read): a float that is not finite is
    written as ``null`` (NaN: undefined, e.g. the AP of a class without boxes; an infinite SQNR:
    no noise at all, read back by :func:`lowbit_helpers.sensitivity.metrics.read_back`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def finite(obj: Any) -> Any:
    """``obj`` with JSON's types only: numpy scalars and arrays as Python numbers and lists, paths
    as strings, tuples as lists, and every float that is not finite as ``None``."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return finite(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
