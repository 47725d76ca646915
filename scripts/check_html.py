"""Open a leaderboard.html in headless Chromium and check that it renders.

    python scripts/check_html.py results/leaderboard.html [--screenshot shot.png] [--rows N]

Chromium (Debian: ``apt-get install -y chromium``) renders the page offline twice:
``--dump-dom`` (the DOM after scripts ran) and ``--screenshot``.  Checks:
the page leads with the scheme x mitigation matrix (cells coloured by verdict, a best
mitigation marked when one helps), then the scheme ranking; the full leaderboard table has
the expected rows (``--rows``, else at least one), a few columns shown by default (the
column chooser hides the rest) and a link from each row to its record;
every plot is an inline ``data:image/png`` <img> that decoded to a non-empty
image, nothing refers to the network, no injected <script> beyond the page's own,
the screenshot is not blank, and at 1400 px nothing is cut: no element reaches past the viewport's
right edge (the page's script counts them into <body data-overflow>; the full table's scrolling
box counts, the rows it scrolls do not).  Prints one JSON line; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _chromium(html: Path, *args: str, fragment: str = "", timeout: float = 120) -> str:
    exe = chromium()
    if exe is None:
        raise SystemExit("chromium not found: apt-get update && apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", *args, html.resolve().as_uri() + fragment]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"chromium failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


class DomCounter(HTMLParser):
    """Counts what the checks need in the rendered DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.rows = 0
        self.images: list[str] = []
        self.scripts = 0
        self.external: list[str] = []
        self.table_ids: list[str] = []
        self.cells: list[list[str]] = []  # data-v of each leaderboard cell, in DOM order
        self.matrix_cells: list[str] = []  # class of each verdict cell of the matrices
        self.ranking_rows = 0
        self.shown_columns = 0  # leaderboard header cells not hidden by the column chooser
        self.record_links = 0  # leaderboard links to a record file
        self.first_table = ""  # id or class of the first table on the page
        self.overflow: int | None = None  # elements past the viewport's right edge (the page's own count)
        self.overflow_first = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "body" and attr.get("data-overflow") is not None:
            self.overflow, self.overflow_first = int(attr["data-overflow"] or 0), attr.get("data-overflow-first") or ""
        if tag == "table":
            self.table_ids.append(attr.get("id") or attr.get("class") or "")
            self.first_table = self.first_table or self.table_ids[-1]
        table = self.table_ids[-1] if self.table_ids else ""
        classes = (attr.get("class") or "").split()
        if tag == "td" and table == "matrix" and any(c.startswith("v-") for c in classes):
            self.matrix_cells.append(" ".join(classes))
        if tag == "tr" and "tbody" in self.stack and table == "ranking":
            self.ranking_rows += 1
        if tag == "th" and table == "leaderboard" and "hide" not in classes:
            self.shown_columns += 1
        if tag == "a" and table == "leaderboard" and (attr.get("href") or "").endswith(".json"):
            self.record_links += 1
        if tag == "tr" and "tbody" in self.stack and self.table_ids and self.table_ids[-1] == "leaderboard":
            self.rows += 1
            self.cells.append([])
        if tag == "td" and self.cells and self.table_ids and self.table_ids[-1] == "leaderboard":
            self.cells[-1].append(attr.get("data-v") or "")
        if tag == "img":
            self.images.append(attr.get("src") or "")
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            value = attr.get(key) or ""
            if re.match(r"^\s*(https?:|//)", value):
                self.external.append(value)
        if tag not in ("img", "br", "meta", "link", "input", "hr"):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.stack:
            while self.stack and self.stack.pop() != tag:
                pass


def blank_fraction(png: Path) -> tuple[float, tuple[int, int]]:
    """Share of near-white pixels in the screenshot, and its size."""
    from PIL import Image

    image = Image.open(png).convert("L")
    histogram = image.histogram()  # 256 grey levels
    return sum(histogram[246:]) / sum(histogram), image.size


def rendered(html: Path, fragment: str = "", size: str = "1400,2400") -> DomCounter:
    """The DOM after the page's script ran in a ``size`` window (``fragment`` e.g. ``#sort=6`` sorts by
    column 6)."""
    dom = DomCounter()
    dom.feed(_chromium(html, "--dump-dom", f"--window-size={size}", fragment=fragment))
    return dom


def check(html: Path, screenshot: Path, rows: int | None = None, size: str = "1400,2400") -> dict[str, Any]:
    dom = rendered(html, size=size)
    _chromium(html, f"--screenshot={screenshot}", f"--window-size={size}")
    white, (width, height) = blank_fraction(screenshot)
    pngs = [src for src in dom.images if src.startswith("data:image/png;base64,") and len(src) > 1000]
    result = {"rows": dom.rows, "images": len(dom.images), "png_images": len(pngs), "scripts": dom.scripts,
              "external_refs": dom.external, "screenshot": str(screenshot), "screenshot_size": [width, height],
              "white_fraction": round(white, 3), "first_table": dom.first_table,
              "matrix_cells": len(dom.matrix_cells), "best_cells": sum("best" in c for c in dom.matrix_cells),
              "ranking_rows": dom.ranking_rows, "shown_columns": dom.shown_columns,
              "record_links": dom.record_links, "width": int(size.split(",")[0]), "overflow": dom.overflow,
              "overflow_first": dom.overflow_first}
    failures = [
        (dom.rows >= 1 if rows is None else dom.rows == rows, f"table rows {dom.rows} (expected {rows or '>= 1'})"),
        (len(pngs) >= 1 and len(pngs) == len(dom.images), "every <img> is an inline PNG (and there is one)"),
        (not dom.external, f"no network references ({dom.external[:3]})"),
        (dom.scripts == 1, f"exactly the page's own <script> ({dom.scripts} found)"),
        (white < 0.97, f"screenshot not blank (white fraction {white:.3f})"),
        (dom.first_table == "matrix", f"the page leads with the matrix (first table: {dom.first_table!r})"),
        (dom.ranking_rows >= 1, "a ranking of schemes"),
        (3 <= dom.shown_columns <= 14, f"a few columns shown by default ({dom.shown_columns})"),
        (dom.record_links == dom.rows, f"each row links to its record ({dom.record_links} of {dom.rows})"),
        (dom.overflow == 0, f"nothing past the right edge at {size.split(',')[0]} px ({dom.overflow} elements, "
                            f"first {dom.overflow_first!r})"),
    ]
    result["failed"] = [message for ok, message in failures if not ok]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--rows", type=int, default=None)
    args = parser.parse_args()
    shot = args.screenshot or args.html.with_suffix(".png")
    result = check(args.html, shot, args.rows)
    print(json.dumps(result))
    sys.exit(1 if result["failed"] else 0)


if __name__ == "__main__":
    main()
