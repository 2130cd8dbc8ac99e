"""Run directories and their manifest: the contract between notebooks.

``<runs_dir>/<run-id>/`` holds ``params.yaml`` (the validated config, paths absolute),
``manifest.json`` and one folder per stage output (``baseline-onnx/``, ``calib/``,
``baseline-coco/`` ...). Each finished stage records its key (a hash of its parameters
and of its inputs' SHA-256) and its outputs with their SHA-256; a stage whose key matches
and whose outputs are intact is not recomputed. Notebooks read earlier outputs through the
manifest, never through globals, so any one of them can be rerun alone.

Results and costs are kept apart: what a stage *costs* on this machine (wall-clock seconds, peak
memory: :data:`MEASURED_KEYS`) is moved out of its JSON outputs into the manifest when the stage
finishes, and :meth:`RunDir.read` merges it back. Every output but :data:`MEASUREMENTS` (the
benches, logs and the manifest itself) is then a function of the params and the inputs alone: two
runs with the same params write them byte for byte alike (``tests/test_notebooks.py`` deletes outputs
of every notebook from a finished run and checks that they come back byte for byte in a new process).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import fnmatch
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import atomic_path, read_json, sha256_file, write_json
from .config import Config, load_config
from .errors import LowbitError

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
PARAMS = "params.yaml"

# Keys of a JSON output that hold what its stage cost on this machine, not what it computed;
# finish() keeps them in the manifest (artifacts[rel]["measured"]), RunDir.read() merges them back.
MEASURED_KEYS = frozenset({
    "seconds", "total_seconds", "predict_seconds", "confirm_predict_seconds", "build_seconds", "seconds_with_ranges",
    "candidates_seconds", "truth_seconds", "seconds_per_perturbation", "estimated_seconds", "first_run_ms",
    "peak_rss_mb", "peak_rss_gb", "compile_s", "cold_s", "warm_s",
})  # fmt: skip
# Outputs that are a measurement as a whole, or a record of one process: the only files of a run
# directory that two runs with the same params may write differently (fnmatch patterns on the path
# relative to the run: ``*`` also matches ``/``).
MEASUREMENTS = {
    MANIFEST: "stage times and measured costs",
    PARAMS: "the params with their paths made absolute",
    ".lock": "the pid of the run holding it",
    "*/latency.json": "latency and memory benches",
    "*.log": "quantizer logs (progress, timings)",
    "summary.md": "the report's text, latency included",
    "answer.json": "the answer table as data, latency ratios included",
    "html/*": "the executed notebooks, rendered",
    "notebooks/*": "the executed notebooks",
    "baseline-coco/*_ultralytics_e2e.onnx": "Ultralytics stamps its own export with the export time",
}


def split_measured(obj: Any) -> tuple[Any, Any]:
    """(``obj`` without its :data:`MEASURED_KEYS`, those values in the same nesting; None when there are none)."""
    if isinstance(obj, dict):
        kept, measured = {}, {}
        for k, v in obj.items():
            if k in MEASURED_KEYS:
                measured[k] = v
            else:
                kept[k], m = split_measured(v)
                if m is not None:
                    measured[k] = m
        return kept, measured or None
    if isinstance(obj, list):
        pairs = [split_measured(v) for v in obj]
        measured = [m for _, m in pairs]
        return [k for k, _ in pairs], measured if any(m is not None for m in measured) else None
    return obj, None


def merge_measured(obj: Any, measured: Any) -> Any:
    """The inverse of :func:`split_measured`."""
    if measured is None:
        return obj
    if isinstance(measured, list):
        return [merge_measured(o, m) for o, m in zip(obj, measured)]
    out = dict(obj)
    for k, m in measured.items():
        out[k] = merge_measured(out[k], m) if k in out and k not in MEASURED_KEYS else m
    return out


def is_measurement(rel: str) -> bool:
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in MEASUREMENTS)


def reproducible_outputs(run_path: str | Path) -> list[str]:
    """Every output the manifest records for a run directory that the params and inputs alone
    determine (all but :data:`MEASUREMENTS`; what a killed stage left half-written is not recorded)."""
    return sorted(r for r in read_json(Path(run_path) / MANIFEST)["artifacts"] if not is_measurement(r))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_run_id(run_id: str | None) -> str:
    """A run id that names one folder inside the runs directory (checked before anything is written)."""
    if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
        raise LowbitError(f"invalid run id {run_id!r}", "use letters, digits, '-', '_' and '.' only")
    return run_id


def stage_key(params: Any, inputs: list[str | Path] = ()) -> str:
    return _key(params, [sha256_file(p) for p in inputs])


def _key(params: Any, digests: list[str]) -> str:
    blob = json.dumps({"params": params, "inputs": digests}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


_SAME = object()


@dataclass
class Stage:
    """A cached stage, declared once: what it is computed from and what it writes.

    ``name``: its entry in the manifest. ``params`` (JSON-able) and ``inputs`` make its key: an
    input given as a run-relative path is an earlier stage's recorded output (checked, and named
    in the manifest as this stage's dependency), a ``Path`` is any other file. ``outputs``: the
    paths it writes, relative to the run (the first is what :meth:`RunDir.stage` returns).
    ``record``: the parameters the manifest keeps beside the outputs (default: ``params``).
    ``fixed_key``: a key that is not a hash of the inputs (``"skipped"``, ``"derived"``, ...): such
    a stage is recomputed every time (it only reads what cached stages wrote)."""

    name: str
    params: Any = None
    inputs: Sequence[str | Path] = ()
    outputs: list[str] = field(default_factory=list)
    record: Any = _SAME
    fixed_key: str | None = None


class RunDir:
    def __init__(self, path: str | Path, cfg: Config):
        self.path = Path(path)
        self.cfg = cfg
        self._started: dict[str, float] = {}  # stage -> perf_counter when it was found stale (its duration)
        self._nested: dict[str, float] = {}  # stage -> seconds of the stages computed while it ran

    # ------------------------------------------------------------ creation
    @classmethod
    def create(cls, cfg: Config, run_id: str | None = None) -> "RunDir":
        """Make (or reuse) ``<runs_dir>/<run-id>`` for an already resolved config."""
        run_id = check_run_id(run_id or cfg.name)
        path = Path(cfg.output.runs_dir) / run_id
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, cfg)
        with atomic_path(path / PARAMS) as tmp:
            tmp.write_text(cfg.to_yaml())
        manifest = run.manifest() if (path / MANIFEST).is_file() else {"artifacts": {}, "stages": {}}
        manifest.update(run_id=run_id, params_file=PARAMS, updated=_now())
        manifest.setdefault("created", _now())
        run._save(manifest)
        return run

    @classmethod
    def open(cls, run_dir: str | Path) -> "RunDir":
        path = Path(run_dir)
        if not (path / PARAMS).is_file():
            raise LowbitError(
                f"{path} is not a run directory (no {PARAMS})",
                "start with `python -m lowbit_helpers run PARAMS.yaml`, or open the notebook with run_dir empty",
            )
        return cls(path, load_config(path / PARAMS))

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        """The run directory as a report may show it: relative to the repository, never the machine's absolute path."""
        try:
            return self.path.resolve().relative_to(REPO_ROOT).as_posix()
        except ValueError:
            return f"<output.runs_dir>/{self.run_id}"

    # ------------------------------------------------------------ manifest
    def manifest(self) -> dict:
        return read_json(self.path / MANIFEST)

    def _save(self, manifest: dict) -> None:
        write_json(self.path / MANIFEST, manifest)

    def update(self, section: str, key: str, value: Any) -> None:
        m = self.manifest()
        m.setdefault(section, {})[key] = value
        m["updated"] = _now()
        self._save(m)

    def file(self, rel: str) -> Path:
        """Path of an output, relative to the run directory (folders created)."""
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def artifact(self, rel: str) -> Path:
        """An output an earlier stage recorded; refuses one that is missing or was altered."""
        return self._recorded(rel)[0]

    def _recorded(self, rel: str) -> tuple[Path, str]:
        """(path, SHA-256) of a recorded output, checked against the manifest (hashed once)."""
        entry = self.manifest()["artifacts"].get(rel)
        p = self.path / rel
        if entry is None or not p.is_file():
            raise LowbitError(
                f"{rel} is not in {self.path / MANIFEST}; the stage that writes it has not run",
                "run the earlier notebooks first (or the whole pipeline with `python -m lowbit_helpers run`)",
            )
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise LowbitError(f"{p} changed after it was recorded", "rerun the stage that writes it")
        return p, digest

    def read(self, rel: str) -> Any:
        """A recorded JSON output (as :meth:`artifact` checks it), with its measured costs merged back."""
        obj = read_json(self.artifact(rel))
        return merge_measured(obj, self.manifest()["artifacts"][rel].get("measured"))

    def _digest(self, source: str | Path) -> str:
        """SHA-256 of a stage's input: a run-relative path must be a recorded output, unchanged since
        (:meth:`_recorded`); a ``Path`` is any file."""
        return self._recorded(source)[1] if isinstance(source, str) else sha256_file(source)

    def has(self, rel: str) -> bool:
        return rel in self.manifest()["artifacts"] and (self.path / rel).is_file()

    # ------------------------------------------------------------ stages
    def is_fresh(self, stage: str, key: str) -> bool:
        """True when ``stage`` finished with this key and its outputs are unchanged."""
        m = self.manifest()
        entry = m["stages"].get(stage)
        fresh = bool(entry) and entry.get("key") == key
        for rel in entry["outputs"] if fresh else ():
            art = m["artifacts"].get(rel)
            p = self.path / rel
            if art is None or not p.is_file() or sha256_file(p) != art["sha256"]:
                fresh = False
                break
        if not fresh:
            self._started[stage] = time.perf_counter()
            self._nested.pop(stage, None)
        return fresh

    def finish(self, stage: str, key: str, outputs: list[str], params: Any = None, inputs: Sequence[str] = ()) -> None:
        """Record ``outputs`` (paths relative to the run) as the complete result of ``stage``.

        A JSON output's measured costs move into the manifest first (see the module's docstring).
        ``seconds`` is the stage's own time: a stage computed while it ran (an input it needed)
        counts in its own duration only, so that the stages' seconds add up to the run's. ``inputs``:
        the earlier outputs it read (its dependencies, kept in the manifest)."""
        m = self.manifest()
        for rel in outputs:
            p = self.path / rel
            measured = None
            if p.suffix == ".json" and not is_measurement(rel):
                kept, measured = split_measured(read_json(p))
                if measured is not None:
                    write_json(p, kept)
            m["artifacts"][rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size, "stage": stage,
                                   "params": params, "created": _now(), **({"measured": measured} if measured else {})}  # fmt: skip
        started = self._started.pop(stage, None)
        seconds = None
        if started is not None:
            total = time.perf_counter() - started
            seconds = round(total - self._nested.pop(stage, 0.0), 1)
            # charge this stage's whole time to the innermost stage that was already running
            outer = max((s for s, t in self._started.items() if t <= started), key=self._started.get, default=None)
            if outer is not None:
                self._nested[outer] = self._nested.get(outer, 0.0) + total
        m["stages"][stage] = {"key": key, "outputs": list(outputs), "finished": _now(), "seconds": seconds,
                              **({"inputs": list(inputs)} if inputs else {})}  # fmt: skip
        m["updated"] = _now()
        self._save(m)

    def stage(self, st: Stage, compute: Callable[[], Any], read: str | None = _SAME) -> Any:
        """Run ``compute`` unless ``st`` is fresh, then record its outputs; return the first output
        read back (:meth:`read`), or ``read`` (a run-relative path; None: nothing).

        ``compute`` writes the stage's outputs, or returns the content of its first output (a JSON
        value, written here); it may append outputs it only discovers while it runs to ``st.outputs``.
        """
        key = st.fixed_key or _key(st.params, [self._digest(i) for i in st.inputs])
        if st.fixed_key is not None or not self.is_fresh(st.name, key):
            result = compute()
            if result is not None:
                write_json(self.file(st.outputs[0]), result)
            self.finish(st.name, key, st.outputs, st.params if st.record is _SAME else st.record,
                        inputs=[i for i in st.inputs if isinstance(i, str)])  # fmt: skip
        rel = st.outputs[0] if read is _SAME else read
        return None if rel is None else self.read(rel)


LOCK = ".lock"


@contextlib.contextmanager
def run_lock(cfg: Config, run_id: str | None = None):
    """Hold ``<runs_dir>/<run-id>/.lock`` (an exclusive ``flock``) for a whole run: a second run with
    the same id refuses at once, before it writes anything; the lock goes with the process (a
    killed run leaves nothing to clean up)."""
    run_id = check_run_id(run_id or cfg.name)
    path = Path(cfg.output.runs_dir) / run_id
    try:
        path.mkdir(parents=True, exist_ok=True)
        fh = open(path / LOCK, "a+")
    except OSError as exc:
        raise LowbitError(f"cannot write the run directory {path}: {exc.strerror}",
                          "set output.runs_dir in the params to a writable folder") from None  # fmt: skip
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise LowbitError(f"run {run_id!r} is already running ({holder}) in {path}",
                          "wait for it to finish, or give this run another id (--run-id NAME)") from None  # fmt: skip
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield path
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def open_run(params_path: str | Path = "", run_dir: str | Path = "") -> RunDir:
    """What a notebook's first cell calls: the run papermill made, or a new one for interactive use."""
    if run_dir:
        return RunDir.open(run_dir)
    if not params_path:
        raise LowbitError("neither run_dir nor params_path is set", "set params_path in the notebook's parameters cell")
    # Relative params paths mean "from the repository root"; a notebook opened in JupyterLab
    # runs in notebooks/, one level below it.
    base = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
    return RunDir.create(load_config(base / params_path if not Path(params_path).is_absolute() else params_path).resolved(base))
