"""ORT's CPU kernels on another x86 CPU model, emulated by QEMU user mode.

ORT picks its int8 kernels from CPUID at start-up; under ``qemu-x86_64-static -cpu Haswell``
a process sees (and executes) AVX2 + FMA without AVX-512 or VNNI, so ORT takes its
vpmaddubsw u8s8 path, int16 saturation included, on a machine that has VNNI. This is how the
report measures "what this file loses on an AVX2-only CPU" wherever it runs. QEMU's TCG
executes each instruction as the ISA defines it (saturation included) but about 100x slower,
so only accuracy is measured this way, never latency. ``scripts/get_qemu.sh`` fetches
Debian's ``qemu-user-static`` into ``.cache/qemu``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import LowbitError
from .machine import cpu_int8_isa
from .sessions import _Input, make_session, run_head

LOCAL_QEMU = Path(__file__).resolve().parents[2] / ".cache" / "qemu" / "usr" / "bin" / "qemu-x86_64-static"


def qemu_binary() -> str | None:
    """``$LOWBIT_QEMU``, else ``qemu-x86_64-static`` on PATH, else the one scripts/get_qemu.sh put in .cache."""
    for cand in (os.environ.get("LOWBIT_QEMU"), shutil.which("qemu-x86_64-static"), str(LOCAL_QEMU)):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def _child_env() -> dict:
    # LOWBIT_EMULATED: the child's /proc/cpuinfo is the host's; runtime.cpu_int8_isa then trusts CPUID alone
    return {**os.environ, "PYTHONUNBUFFERED": "1", "LOWBIT_EMULATED": "1"}


_FIX = "check that the QEMU CPU model exists (qemu-x86_64-static -cpu help) and that the command runs natively"


def _command(qemu: str, cpu: str, args: list[str]) -> list[str]:
    """This Python running ``args`` inside QEMU's ``cpu`` model."""
    return [qemu, "-cpu", cpu, sys.executable, *args]


def _stderr_tail(text: str) -> str:
    """The end of a QEMU child's stderr without TCG's unsupported-feature warnings."""
    return "\n".join(line for line in text.splitlines() if "TCG doesn't support" not in line)[-1500:]


def _run(qemu: str, cpu: str, args: list[str], what: str) -> str:
    proc = subprocess.run(_command(qemu, cpu, args), capture_output=True, text=True, env=_child_env())
    if proc.returncode != 0:
        raise LowbitError(f"{what} failed under QEMU ({cpu}), exit {proc.returncode}:\n{_stderr_tail(proc.stderr)}", _FIX)
    return proc.stdout


def emulated_probe(qemu: str, cpu: str) -> dict:
    """:func:`lowbit_helpers.int8.kernel_check.probe` inside the emulated CPU."""
    return json.loads(_run(qemu, cpu, ["-m", "lowbit_helpers.int8.kernel_check"], "the saturation probe"))


class EmulatedSession:
    """An ORT session living in a QEMU-emulated process, behind ORT's session interface.

    Only the forward pass runs emulated: the parent letterboxes and decodes natively and
    exchanges raw tensors with the child over a pipe, so the emulation costs only what ORT's
    kernels cost under QEMU. ``cpu_int8_isa`` is what the emulated process saw.
    """

    def __init__(self, qemu: str, cpu: str, model: str | Path, threads: int = 2):
        cmd = _command(qemu, cpu, ["-m", "lowbit_helpers.runtime.emulate", str(model), str(threads)])
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, env=_child_env())
        try:
            info = json.loads(self.proc.stdout.readline() or b"null")
        except ValueError:
            info = None
        if not isinstance(info, dict):
            self._fail("could not start the emulated ORT session")
        self.cpu_int8_isa = info["cpu_int8_isa"]
        self._inputs = [_Input(info["input"], info["shape"])]

    def _fail(self, what: str):
        self.close(kill=True)
        raise LowbitError(f"{what} under QEMU:\n{self._stderr_tail}", _FIX)

    def close(self, kill: bool = False):
        """Stop the child (politely: end of input; or ``kill``) and release its pipes and log."""
        if self._err.closed:
            return
        try:
            if kill:
                self.proc.kill()
            else:
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, OSError):
            self.proc.kill()
            self.proc.wait()
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream and not stream.closed:
                    try:
                        stream.close()
                    except OSError:
                        pass
            self._err.seek(0)
            self._stderr_tail = _stderr_tail(self._err.read().decode(errors="replace"))
            self._err.close()

    def get_inputs(self):
        return self._inputs

    def run(self, output_names, feeds: dict):
        (x,) = feeds.values()
        x = np.ascontiguousarray(x, dtype=np.float32)
        _send(self.proc.stdin, x)
        y = _receive(self.proc.stdout)
        if y is None:
            self._fail("the emulated ORT session died")
        return [y]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _send(stream, arr) -> None:
    head = json.dumps({"shape": list(arr.shape)}).encode()
    stream.write(len(head).to_bytes(4, "little") + head + arr.tobytes())
    stream.flush()


def _receive(stream):
    n = stream.read(4)
    if len(n) < 4:
        return None
    shape = json.loads(stream.read(int.from_bytes(n, "little")))["shape"]
    size = int(np.prod(shape)) * 4
    return np.frombuffer(stream.read(size), dtype=np.float32).reshape(shape).copy()


def _serve(model: str, threads: str) -> None:
    """The emulated side: an ORT session (kernels) answering raw tensors on stdin with raw heads."""

    session = make_session(model, threads=int(threads))
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    info = {"cpu_int8_isa": cpu_int8_isa(), "input": session.get_inputs()[0].name, "shape": session.get_inputs()[0].shape}
    out.write((json.dumps(info) + "\n").encode())
    out.flush()
    while (x := _receive(inp)) is not None:
        _send(out, run_head(session, x))


if __name__ == "__main__":  # python -m lowbit_helpers.runtime.emulate MODEL THREADS (run under QEMU by EmulatedSession)
    _serve(*sys.argv[1:3])
