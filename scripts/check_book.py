#!/usr/bin/env python
"""Open every page of a built book in headless Chromium and check what a reader sees.

    python scripts/check_book.py runs/demo/book/_build/html [--toc runs/demo/book_src/_toc.yml]
                                 [--screenshots DIR] [--pages book/results.html ...]

The checks are those of :mod:`d3m_lib.book_check` (images loaded, no raw TeX,
no table running off the column, no error output, every page in the table of
contents, offline; and what a reader should not see: warnings, progress bars,
absolute paths of this machine, clipped cells or code blocks at 1280 px, raw
NaN/<NA>, counts written as floats, empty table headers, literal backticks or
template syntax). Screenshots go to ``screenshots/`` beside ``_build`` unless
``--screenshots`` says otherwise. Exit status 0 when every page passes, 1 with
each problem printed, 2 when Chromium or Playwright is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from d3m_lib.book_check import CHROMIUM, BrowserMissing, check_book  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html_dir", help="the book's HTML folder (…/_build/html)")
    ap.add_argument("--pages", nargs="*", help="pages to open, relative to html_dir (default: all)")
    ap.add_argument("--toc", help="the book's _toc.yml: every entry must have been built")
    ap.add_argument("--screenshots", help="folder for screenshots (default: screenshots/ beside _build)")
    ap.add_argument("--chromium", default=CHROMIUM, help="Chromium executable")
    args = ap.parse_args(argv)
    html_dir = Path(args.html_dir)
    shots = Path(args.screenshots) if args.screenshots else html_dir.resolve().parent.parent / "screenshots"
    try:
        problems = check_book(html_dir, pages=args.pages, toc=args.toc, shots=shots, exe=args.chromium)
    except BrowserMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"screenshots in {shots}")
    print("every page passes" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
