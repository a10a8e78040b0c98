#!/usr/bin/env python
"""Open a built book's pages in headless Chromium and check that figures and tables render.

    python scripts/check_book.py runs/demo/book/_build/html [--screenshots DIR]

For every page checked, Chromium loads it (``--dump-dom``, after scripts ran)
and the rendered DOM must show:

- no notebook error output (``traceback`` / ``output error`` blocks);
- every ``<img>`` with a non-empty ``src`` that points at an image file on
  disk which decodes and is not blank;
- on notebook pages (``notebooks/*.html``): at least ``--min-images`` images
  and ``--min-tables`` tables with data rows.

It keeps a screenshot of each notebook page and of the front page (default
folder: ``screenshots/`` beside ``_build``), and checks that none is blank.
Exit status 0 when every check passes, 1 otherwise (each problem printed), 2
when Chromium is missing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=5000"]


class PageDom(HTMLParser):
    """Images, tables (with their data-row counts) and error outputs of one rendered page."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.table_rows: list[int] = []  # data rows (with a <td>) per table
        self.errors: list[str] = []
        self._open_tables: list[int] = []
        self._row_has_td = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "table":
            self._open_tables.append(0)
        elif tag == "tr":
            self._row_has_td = False
        elif tag == "td" and self._open_tables and not self._row_has_td:
            self._row_has_td = True
            self._open_tables[-1] += 1
        if "traceback" in classes or ("output" in classes and "error" in classes):
            self.errors.append(f"<{tag} class='{' '.join(classes)}'>")

    def handle_endtag(self, tag):
        if tag == "table" and self._open_tables:
            self.table_rows.append(self._open_tables.pop())


def chromium(args: list[str], profile: Path, exe: str = CHROMIUM, timeout: int = 60) -> str:
    """Run headless Chromium with the fixed flags; return its stdout."""
    proc = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def image_problem(path: Path) -> str | None:
    """Why an image file would not show (missing, undecodable, blank), or None."""
    from PIL import Image

    if not path.is_file():
        return f"missing file {path}"
    if path.suffix.lower() == ".svg":
        return None if path.stat().st_size > 0 else f"empty SVG {path}"
    try:
        with Image.open(path) as im:
            im.load()
            lo_hi = im.convert("L").getextrema()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the finding
        return f"cannot decode {path}: {exc}"
    if lo_hi[0] == lo_hi[1]:
        return f"blank image {path} (a single grey level)"
    return None


def follow_redirect(html_dir: Path, page: str) -> str:
    """The page a ``<meta http-equiv="refresh">`` page sends the browser to (else ``page``)."""
    file = html_dir / page
    if file.is_file():
        m = re.search(r'(?i)http-equiv="refresh"[^>]*url=([^"\s>]+)', file.read_text(errors="replace"))
        if m and not urlparse(m.group(1)).scheme:
            return str(((file.parent / m.group(1)).resolve()).relative_to(html_dir))
    return page


def check_page(html_dir: Path, page: str, profile: Path, *, notebook: bool, min_images: int,
               min_tables: int, shots: Path | None, exe: str = CHROMIUM) -> list[str]:
    """Problems found on one page (empty list: it renders)."""
    file = html_dir / page
    if not file.is_file():
        return [f"{page}: page missing ({file})"]
    dom = PageDom()
    dom.feed(chromium(["--dump-dom", file.as_uri()], profile, exe))
    problems = [f"{page}: error output {e}" for e in dom.errors]
    real_images = 0
    for src in dom.images:
        if not src:
            problems.append(f"{page}: <img> with an empty src")
            continue
        url = urlparse(src)
        if url.scheme == "data":
            real_images += 1
            continue
        if url.scheme not in ("", "file"):
            problems.append(f"{page}: image from outside the book: {src}")
            continue
        target = Path(unquote(url.path)) if url.scheme == "file" else (file.parent / unquote(url.path))
        why = image_problem(target.resolve())
        if why:
            problems.append(f"{page}: {why}")
        else:
            real_images += 1
    tables = sum(1 for n in dom.table_rows if n > 0)
    if notebook and real_images < min_images:
        problems.append(f"{page}: {real_images} rendered images, expected at least {min_images}")
    if notebook and tables < min_tables:
        problems.append(f"{page}: {tables} tables with rows, expected at least {min_tables}")
    if shots is not None:
        shot = shots / (page.replace("/", "__").removesuffix(".html") + ".png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        chromium([f"--screenshot={shot}", "--window-size=1280,2400", file.as_uri()], profile, exe)
        why = image_problem(shot)
        if why:
            problems.append(f"{page}: screenshot: {why}")
    print(f"{page}: {real_images} images, {tables} tables with rows, "
          f"{len(dom.errors)} error outputs" + (", screenshot kept" if shots else ""))
    return problems


def check_book(html_dir: str | Path, *, pages: list[str] | None = None, min_images: int = 1,
               min_tables: int = 1, shots: str | Path | None = None,
               exe: str = CHROMIUM) -> list[str]:
    """Check the front page and every notebook page (or ``pages``); return the problems."""
    html_dir = Path(html_dir).resolve()
    if pages is None:
        pages = [follow_redirect(html_dir, "index.html")] + sorted(f"notebooks/{p.name}"
                                        for p in (html_dir / "notebooks").glob("*.html"))
        if len(pages) == 1:
            return [f"no notebook pages in {html_dir / 'notebooks'}"]
    shots_dir = Path(shots) if shots is not None else None
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="check_book_") as profile:
        for page in pages:
            problems += check_page(html_dir, page, Path(profile), notebook=page.startswith("notebooks/"),
                                   min_images=min_images, min_tables=min_tables,
                                   shots=shots_dir, exe=exe)
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html_dir", help="the book's HTML folder (…/_build/html)")
    ap.add_argument("--pages", nargs="*", help="pages to check, relative to html_dir "
                                               "(default: index.html and notebooks/*.html)")
    ap.add_argument("--min-images", type=int, default=1, help="per notebook page")
    ap.add_argument("--min-tables", type=int, default=1, help="per notebook page")
    ap.add_argument("--screenshots", help="folder for screenshots (default: screenshots/ beside _build)")
    ap.add_argument("--chromium", default=CHROMIUM, help="Chromium executable")
    args = ap.parse_args(argv)
    if not Path(args.chromium).exists():
        print(f"chromium not found at {args.chromium}", file=sys.stderr)
        return 2
    html_dir = Path(args.html_dir)
    shots = args.screenshots or html_dir.resolve().parent.parent / "screenshots"
    problems = check_book(html_dir, pages=args.pages, min_images=args.min_images,
                          min_tables=args.min_tables, shots=shots, exe=args.chromium)
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"screenshots in {shots}")
    print("book renders" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
