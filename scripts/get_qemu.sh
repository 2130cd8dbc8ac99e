#!/usr/bin/env bash
# Fetch Debian's qemu-user-static into .cache/qemu (no root, no install): notebook 03 uses it to
# run ORT's kernels on an emulated AVX2-only CPU (int8.emulate). Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.cache/qemu/usr/bin/qemu-x86_64-static"
[ -x "$BIN" ] && { echo "$BIN"; exit 0; }
[ "$(uname -m)" = "x86_64" ] || { echo "[qemu] not an x86_64 machine: int8.emulate is skipped" >&2; exit 0; }
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
  echo "[qemu] apt-get / dpkg-deb not found: install qemu-user-static yourself, or set int8.emulate.cpu: null" >&2; exit 0; }
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
( cd "$TMP" && apt-get download qemu-user-static >/dev/null 2>&1 ) || {
  echo "[qemu] apt-get download qemu-user-static failed (no Debian mirror?): int8.emulate rows will say skipped" >&2; exit 0; }
mkdir -p "$ROOT/.cache/qemu"
dpkg-deb -x "$TMP"/qemu-user-static_*.deb "$TMP/x"
install -D -m 755 "$TMP/x/usr/bin/qemu-x86_64-static" "$BIN"
echo "$BIN"
