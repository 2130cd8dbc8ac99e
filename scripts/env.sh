# Sourced by scripts/report.sh and scripts/test.sh: create or reuse .venv at the repository
# root with the pinned environment of pyproject.toml (the `cpu` and `dev` extras).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[env] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
STAMP=".venv/.lowbit-installed"
WANT="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[env] installing pinned dependencies into .venv (first time: several minutes, torch is large)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch==2.14.1 / torchvision==0.29.1 are the releases this machine's pip serves (see README)
  .venv/bin/python -m pip install --quiet -e ".[cpu,dev]"
  .venv/bin/python -m pip check
  echo "$WANT" > "$STAMP"
fi
export YOLO_AUTOINSTALL=false YOLO_OFFLINE=1 MPLBACKEND=Agg
# QEMU user mode for notebook 03's emulated AVX2 CPU (int8.emulate): fetched once into .cache/qemu
bash scripts/get_qemu.sh >/dev/null || echo "[env] could not fetch QEMU: int8.emulate rows will say skipped"
