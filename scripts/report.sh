#!/usr/bin/env bash
# The main job: the six notebooks on PARAMS (default: params/default.yaml), ending in
# reports/<run-id>/report.html. Extra arguments go to `python -m lowbit_helpers run`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
PARAMS="${1:-params/default.yaml}"
shift || true
exec .venv/bin/python -m lowbit_helpers run "$PARAMS" "$@"
