"""The rendered report as a reader's browser shows it: headless Chromium's DOM and screenshot.

Chromium runs the page's own scripts and layout, so a figure that does not decode, a table
that renders empty or a page that shows nothing is caught here, not by reading the HTML source.
Debian's ``chromium`` package (``scripts/test.sh`` installs it when missing: ``scripts/get_chromium.sh``).
"""

from __future__ import annotations

import base64
import binascii
import io
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from ..errors import LowbitError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage"]


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    raise LowbitError("no Chromium found (looked for " + ", ".join(CHROMIUM_NAMES) + ")",
                      "install Debian's package: apt-get install -y chromium")  # fmt: skip


def decode_image(src: str) -> dict:
    """An inline image as the page carries it: whether it decodes as a PNG, its width and height in
    pixels and the spread of its pixel values (0 for a blank image)."""
    from matplotlib import image as mpimg  # late: matplotlib only for figures

    head, _, data = src.partition(",")
    if head != "data:image/png;base64":
        return {"png": False, "width": 0, "height": 0, "pixel_std": 0.0}
    try:
        px = np.asarray(mpimg.imread(io.BytesIO(base64.b64decode(data, validate=True)), format="png"), float)
    except (ValueError, binascii.Error, OSError, SyntaxError):  # not base64, or not a PNG (Pillow's errors)
        return {"png": False, "width": 0, "height": 0, "pixel_std": 0.0}
    return {"png": True, "width": int(px.shape[1]), "height": int(px.shape[0]), "pixel_std": float(px.std())}


class _Page(HTMLParser):
    """What the rendered DOM holds: headings, tables (rows with text) and images (decoded)."""

    def __init__(self):
        super().__init__()
        self.headings: list[str] = []
        self.tables: list[dict] = []
        self.images: list[dict] = []
        self._heading: list[str] | None = None
        self._table: dict | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        elif tag == "table":
            self._table = {"rows": 0, "cells": 0, "text": [], "after": self.headings[-1] if self.headings else ""}
        elif tag == "tr" and self._table is not None:
            self._table["rows"] += 1
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            src = a.get("src") or ""
            self.images.append({"after": self.headings[-1] if self.headings else "", "src": src[:40], **decode_image(src)})

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading).strip().rstrip("¶").strip())
            self._heading = None
        elif tag in ("td", "th") and self._cell is not None and self._table is not None:
            text = "".join(self._cell).strip()
            self._table["cells"] += bool(text)
            self._table["text"].append(text)
            self._cell = None
        elif tag == "table" and self._table is not None:
            self.tables.append(self._table)
            self._table = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading.append(data)
        if self._cell is not None:
            self._cell.append(data)


def render(html: str | Path, width: int = 1400, height: int = 6000, timeout: float = 120) -> dict:
    """Open ``html`` in headless Chromium: {headings, tables, images (each decoded: :func:`decode_image`),
    screenshot_std (pixel spread of the first screen of its screenshot: 0 for a blank page)}."""
    from matplotlib import image as mpimg  # late: matplotlib only for figures

    html = Path(html).resolve()
    if not html.is_file():
        raise LowbitError(f"report not found: {html}", "run the main job first (bash scripts/report.sh)")
    exe = chromium()
    url = html.as_uri()
    with tempfile.TemporaryDirectory(prefix="report-browser-") as tmp:
        flags = [*FLAGS, f"--user-data-dir={tmp}/profile"]  # no profile left in the home folder
        shot = Path(tmp) / "report.png"
        try:
            dom = subprocess.run([exe, *flags, "--virtual-time-budget=5000", "--dump-dom", url],
                                 capture_output=True, text=True, timeout=timeout)  # fmt: skip
            subprocess.run([exe, *flags, f"--window-size={width},{height}", f"--screenshot={shot}", url],
                           capture_output=True, text=True, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise LowbitError(f"Chromium did not finish rendering {html} in {timeout:.0f} s",
                              "check that the page opens in a browser; a larger timeout for a very large report") from None  # fmt: skip
        if dom.returncode != 0 or not dom.stdout.strip():
            raise LowbitError(f"Chromium could not render {html}: {dom.stderr.strip()[-300:]}", "check the Chromium install")
        if not shot.is_file():
            raise LowbitError(f"Chromium wrote no screenshot of {html}", "check the Chromium install")
        pixels = np.asarray(mpimg.imread(str(shot))[:1200], float)
    page = _Page()
    page.feed(dom.stdout)
    return {"headings": page.headings, "tables": page.tables, "images": page.images,
            "screenshot_std": float(pixels.std()), "dom_bytes": len(dom.stdout)}  # fmt: skip
