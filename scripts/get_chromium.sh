#!/usr/bin/env bash
# Headless Chromium for the report's browser check (tests/test_notebooks.py): Debian's package,
# installed when missing and apt-get can run (root); otherwise that test names the fix.
set -uo pipefail
for name in chromium chromium-browser google-chrome; do
  command -v "$name" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[env] installing Debian's chromium (the report's browser check)"
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
    && exit 0
fi
echo "[env] no Chromium and cannot install it: the browser check will fail (fix: apt-get install -y chromium)"
exit 0
