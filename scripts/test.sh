#!/usr/bin/env bash
# The test suite: unit tests, the parity check on val100 and the smoke run of all six
# notebooks (the killed-and-resumed and structure-only pipelines run beside it: tests/smoke.py). Extra arguments go to pytest (e.g. -m "not slow" for the fast tests alone).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash scripts/get_chromium.sh   # the report's browser check (headless Chromium)
exec .venv/bin/python -m pytest "$@"
