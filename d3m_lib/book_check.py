"""Open every page of a built book in headless Chromium (Playwright) and check what a reader sees.

Offline: the browser may load only files of the book; any other request is
refused and reported. On every page:

- every ``<img>`` is loaded by the browser (``naturalWidth > 0``; lazy images
  are made eager first);
- no raw TeX is left in the rendered text (MathJax, bundled with the book,
  typeset every formula);
- no table is wider than the content column unless a box around it scrolls;
- no error output (tracebacks, error cells) and no script error;
- the page is in the table of contents (the sidebar of the front page), and
  every page of ``_toc.yml`` (when given) was built;
- what a reader should not see: warnings (``UserWarning: ...`` and
  stderr outputs), progress bars (tqdm), absolute paths of the build machine
  (its home, the repository, the run folder, the temporary folder), table cells
  or code/output blocks whose content is cut off (``scrollWidth`` beyond
  ``clientWidth``: a ``<pre>`` must wrap, not scroll; a table may scroll inside
  its own box, but no cell may clip its text), raw ``NaN``/``<NA>`` in tables
  and outputs, counts written as floats (a column whose every value is like
  ``27.000``), an empty table header row or column header, literal backticks or
  ``{{ }}``/``{glue`` template syntax in the rendered text.

A full-page screenshot of each page is kept (and must not be blank). The
Playwright-driven browser is Debian's ``/usr/bin/chromium`` (Playwright cannot
download its own here). ``python scripts/check_book.py HTML_DIR`` is the command
line; :func:`check_book` returns the problems, one line each, naming the page.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

CHROMIUM = os.environ.get("D3M_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic"]
# Sphinx's generated pages that are not chapters of the book.
NOT_CHAPTERS = {"genindex.html", "search.html", "py-modindex.html"}
# TeX that MathJax would have replaced: \( \) \[ \] $$ and common commands.
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\(?:frac|sum|begin|end|mathrm|text|hat|bar|tau|alpha|beta)\b")


class BrowserMissing(RuntimeError):
    """Chromium or the Playwright package is not installed."""


def browser_problem(exe: str = CHROMIUM) -> str | None:
    """Why the browser check cannot run here (None: it can)."""
    if not Path(exe).exists():
        return f"Chromium not found at {exe} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    return None


def launch(playwright, exe: str = CHROMIUM):
    """Headless Chromium from ``exe`` through Playwright."""
    return playwright.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)


@dataclass
class PageReport:
    page: str
    images: int = 0
    tables: int = 0
    math: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.page}: {self.images} images, {self.tables} tables, {self.math} formulas, "
                f"{len(self.problems)} problems")


# Runs in the page: make lazy images eager and wait for every image to settle.
_WAIT_IMAGES = """async () => {
  const imgs = Array.from(document.images);
  for (const im of imgs) { im.loading = 'eager'; }
  await Promise.all(imgs.map(im => im.complete ? null : new Promise(r => {
      im.addEventListener('load', r, {once: true}); im.addEventListener('error', r, {once: true});
      setTimeout(r, 5000); })));
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await Promise.race([MathJax.startup.promise, new Promise(r => setTimeout(r, 10000))]);
  }
}"""

# Runs in the page: what a reader would see. The content column is the article.
_INSPECT = """() => {
  const col = document.querySelector('article.bd-article') || document.querySelector('main')
              || document.body;
  const colRect = col.getBoundingClientRect();
  const images = Array.from(document.images).map(im => ({
      src: im.getAttribute('src') || '', natural: im.naturalWidth, complete: im.complete,
      visible: im.getClientRects().length > 0}));
  const tables = [];
  for (const t of col.querySelectorAll('table')) {
    if (t.closest('pre, .highlight')) continue;
    const r = t.getBoundingClientRect();
    if (r.width === 0) continue;  // inside a folded block
    let scroller = null;
    for (let el = t.parentElement; el && el !== col.parentElement; el = el.parentElement) {
      const ox = getComputedStyle(el).overflowX;
      if ((ox === 'auto' || ox === 'scroll')
          && el.getBoundingClientRect().right <= colRect.right + 1) { scroller = el; break; }
    }
    const text = (t.innerText || '').trim().split('\\n')[0].slice(0, 60);
    tables.push({width: Math.round(r.width), right: Math.round(r.right),
                 colRight: Math.round(colRect.right), scrolls: scroller !== null, head: text});
  }
  const clone = col.cloneNode(true);
  for (const el of clone.querySelectorAll('script, style, pre, code, mjx-container, .MathJax, '
                                          + 'mjx-assistive-mml, .highlight, textarea')) el.remove();
  const errors = Array.from(col.querySelectorAll('.traceback, .output.error, .cell_output .error, '
                                                 + '.system-message, .problematic'))
      .map(e => (e.className || e.tagName) + ': ' + (e.innerText || '').trim().slice(0, 120));
  const nav = Array.from(document.querySelectorAll('nav.bd-links a.reference.internal, '
                                                   + '.bd-sidenav a.reference.internal'))
      .map(a => a.href);
  // what a reader should not see
  const visible = el => el.getClientRects().length > 0 && el.getBoundingClientRect().width > 0;
  const clipped = [];
  for (const el of col.querySelectorAll('pre')) {
    if (!visible(el) || el.closest('mjx-container') || !(el.innerText || '').trim()) continue;  // folded code
    if (el.scrollWidth > el.clientWidth + 1)
      clipped.push('a code or output block needs ' + el.scrollWidth + ' px but shows ' + el.clientWidth
                   + ' px (it scrolls; it must wrap): starts '
                   + JSON.stringify((el.innerText || '').trim().slice(0, 60)));
  }
  const cells = [];
  const tableInfo = [];
  for (const t of col.querySelectorAll('table')) {
    if (t.closest('pre, .highlight') || !visible(t)) continue;
    for (const c of t.querySelectorAll('td, th')) {
      if (!visible(c)) continue;
      if (c.scrollWidth > c.clientWidth + 1)
        clipped.push('a table cell cuts off its text (' + c.scrollWidth + ' px in ' + c.clientWidth + ' px): '
                     + JSON.stringify((c.innerText || '').trim().slice(0, 60)));
    }
    for (let el = t.parentElement; el && el !== col; el = el.parentElement) {
      const ox = getComputedStyle(el).overflowX;
      if ((ox === 'hidden' || ox === 'clip') && el.scrollWidth > el.clientWidth + 1) {
        clipped.push('a table is cut off by a box that does not scroll: starts '
                     + JSON.stringify((t.innerText || '').trim().split('\\n')[0].slice(0, 60)));
        break;
      }
    }
    const headRows = Array.from(t.querySelectorAll('thead tr')).map(r =>
        Array.from(r.children).map(c => (c.innerText || '').trim()));
    const body = Array.from(t.querySelectorAll('tbody tr')).map(r =>
        Array.from(r.children).map(c => (c.innerText || '').trim()));
    tableInfo.push({head: headRows, body: body.slice(0, 200),
                    first: (t.innerText || '').trim().split('\\n')[0].slice(0, 60)});
  }
  const outputs = Array.from(col.querySelectorAll('.cell_output, div.output'))
      .filter(visible).map(e => ({text: e.innerText || '',
                                  stderr: e.matches('.stderr, .output.stderr') || !!e.querySelector('.stderr')}));
  const pres = Array.from(col.querySelectorAll('.cell_output pre, div.output pre')).filter(visible)
      .map(e => e.innerText || '');
  const bodyP = col.querySelector('p');
  const bodyPx = bodyP ? parseFloat(getComputedStyle(bodyP).fontSize) : 16;
  return {images, tables, text: clone.innerText || '', errors, clipped, tableInfo, outputs, pres, bodyPx,
          allText: col.innerText || '',
          math: col.querySelectorAll('mjx-container').length,
          rawMath: col.querySelectorAll('.math:not(:has(mjx-container))').length, nav,
          tracebackText: (col.innerText || '').includes('Traceback (most recent call last)')};
}"""


def chapter_pages(html_dir: Path) -> list[str]:
    """Every built page of the book (relative paths), Sphinx's index/search pages excepted."""
    out = []
    for p in sorted(html_dir.rglob("*.html")):
        rel = p.relative_to(html_dir).as_posix()
        if rel.split("/")[0].startswith("_") or rel in NOT_CHAPTERS:
            continue
        out.append(rel)
    return out


def toc_files(toc_yml: Path) -> list[str]:
    """The ``file:`` entries of a Jupyter Book ``_toc.yml`` (root first), without suffix."""
    import yaml

    toc = yaml.safe_load(Path(toc_yml).read_text())
    files = [toc["root"]] if "root" in toc else []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                files.append(node["file"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk({k: v for k, v in toc.items() if k != "root"})
    return [re.sub(r"\.(md|ipynb|rst)$", "", f) for f in files]


def _blank(png: Path) -> bool:
    from PIL import Image

    with Image.open(png) as im:
        lo, hi = im.convert("L").getextrema()
    return lo == hi


def _inspect_page(page, html_dir: Path, rel: str, shots: Path | None,
                  machine_paths: tuple[str, ...] = ()) -> tuple[PageReport, set[str]]:
    """Load one page, wait for images and math, and collect its problems and its TOC links."""
    rep = PageReport(rel)
    script_errors: list[str] = []
    page.on("pageerror", lambda exc: script_errors.append(str(exc).splitlines()[0][:160]))
    page.goto((html_dir / rel).as_uri(), wait_until="load", timeout=30_000)
    page.evaluate(_WAIT_IMAGES)
    info = page.evaluate(_INSPECT)
    for im in info["images"]:
        if not im["src"]:
            rep.problems.append("an <img> without src")
        elif im["natural"] == 0:
            rep.problems.append(f"image not loaded: {im['src']}")
        else:
            rep.images += 1
    for t in info["tables"]:
        rep.tables += 1
        if t["right"] > t["colRight"] + 1 and not t["scrolls"]:
            rep.problems.append(f"table wider than the content column ({t['width']} px, ends at "
                                f"{t['right']} px, column ends at {t['colRight']} px) with no scroll "
                                f"of its own: starts {t['head']!r}")
    rep.math = info["math"]
    raw = sorted(set(m.group(0) for m in RAW_TEX.finditer(info["text"])))
    if raw or info["rawMath"]:
        snippet = next((info["text"][max(0, m.start() - 30):m.end() + 30].replace("\n", " ")
                        for m in RAW_TEX.finditer(info["text"])), "")
        rep.problems.append(f"raw TeX left in the text ({', '.join(raw) or 'untypeset .math'}; "
                            f"{info['rawMath']} untypeset math elements): ...{snippet}...")
    for e in info["errors"]:
        rep.problems.append(f"error output: {e}")
    if info["tracebackText"] and not info["errors"]:
        rep.problems.append("error output: a Python traceback in the page text")
    for e in script_errors:
        rep.problems.append(f"script error: {e}")
    rep.problems += reader_problems(info, machine_paths or ())
    if shots is not None:
        shot = shots / (rel.replace("/", "__").removesuffix(".html") + ".png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        if _blank(shot):
            rep.problems.append(f"blank screenshot {shot}")
    nav = set()
    for href in info["nav"]:
        u = urlparse(href)
        if u.scheme == "file":
            try:
                nav.add(Path(unquote(u.path)).resolve().relative_to(html_dir).as_posix())
            except ValueError:
                pass
    return rep, nav


def check_book(html_dir: str | Path, *, pages: list[str] | None = None, toc: str | Path | None = None,
               shots: str | Path | None = None, exe: str = CHROMIUM, verbose: bool = True,
               min_images: dict[str, int] | None = None,
               forbidden_paths: list[str] | None = None) -> list[str]:
    """Problems of a built book, each ``page: problem`` (empty list: every page passes).

    ``pages``: pages to open (default: every built page); ``toc``: the book's
    ``_toc.yml``, whose every entry must have been built; ``shots``: folder for
    the screenshots; ``min_images``: ``{page: n}`` pages that must show at least
    ``n`` loaded images; ``forbidden_paths``: absolute paths no page may show (default:
    :func:`machine_paths`). Raises :class:`BrowserMissing` when it cannot run.
    """
    why = browser_problem(exe)
    if why:
        raise BrowserMissing(why)
    from playwright.sync_api import sync_playwright

    html_dir = Path(html_dir).resolve()
    if not (html_dir / "index.html").is_file():
        return [f"index.html: missing in {html_dir}"]
    all_pages = chapter_pages(html_dir)
    pages = list(pages) if pages is not None else [p for p in all_pages if not _redirect(html_dir / p)]
    shots_dir = Path(shots) if shots is not None else None
    problems: list[str] = []
    if toc is not None:
        for f in toc_files(Path(toc)):
            if not (html_dir / f"{f}.html").is_file():
                problems.append(f"{f}.html: listed in _toc.yml but not built")
    paths = machine_paths(html_dir) if forbidden_paths is None else tuple(forbidden_paths)
    blocked: list[str] = []
    in_nav: set[str] = set()
    reports: dict[str, PageReport] = {}
    with sync_playwright() as pw:
        browser = launch(pw, exe)
        try:
            ctx = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")

            def offline(route):
                url = route.request.url
                if url.startswith(("file:", "data:", "blob:", "about:")):
                    return route.continue_()
                blocked.append(url)
                return route.abort()
            ctx.route("**/*", offline)
            for rel in pages:
                if not (html_dir / rel).is_file():
                    problems.append(f"{rel}: page missing")
                    continue
                page = ctx.new_page()
                n_blocked = len(blocked)
                try:
                    rep, nav = _inspect_page(page, html_dir, rel, shots_dir, paths)
                except Exception as exc:  # noqa: BLE001 - a page that cannot be opened is the finding
                    rep, nav = PageReport(rel, problems=[f"could not be checked: {type(exc).__name__}: "
                                                         f"{str(exc).splitlines()[0][:200]}"]), set()
                finally:
                    page.close()
                for url in blocked[n_blocked:]:
                    rep.problems.append(f"requests {url[:120]} from the network (the book must work offline)")
                want = (min_images or {}).get(rel, 0)
                if rep.images < want:
                    rep.problems.append(f"{rep.images} images loaded, expected at least {want}")
                reports[rel] = rep
                in_nav |= nav
                if verbose:
                    print(rep.line(), flush=True)
        finally:
            browser.close()
    for rel, rep in reports.items():
        problems += [f"{rel}: {p}" for p in rep.problems]
    if in_nav:
        for rel in all_pages:
            if rel != "index.html" and rel not in in_nav and not _redirect(html_dir / rel):
                problems.append(f"{rel}: built but missing from the table of contents")
    else:
        problems.append("index.html: no table of contents found in the sidebar")
    return problems


WARNING = re.compile(r"\b(?:[A-Z][A-Za-z]*)?Warning: |warnings\.warn\(")
PROGRESS = re.compile(r"\d{1,3}%\|[^|\n]{0,80}\||\d+/\d+ \[\d+:\d+(?::\d+)?<"
                      r"|[0-9.]+\s?(?:it|img)/s\]|[\u2588-\u258f]{3,}")
MISSING = re.compile(r"(?<![\w-])(?:NaN|nan|<NA>|NaT)(?![\w-])")
FLOAT_COUNT = re.compile(r"^-?[\d,]+\.0+$")
TEMPLATE = re.compile(r"\{\{|\}\}|\{glue")


def machine_paths(html_dir: Path) -> tuple[str, ...]:
    """Absolute paths of the build machine that no page may show: home, repository, run folder.

    Not the temporary folder as such: the book's own examples may name ``/tmp/x.json``.
    """
    html_dir = Path(html_dir).resolve()
    out = {str(Path.home()), str(Path(__file__).resolve().parent.parent)}
    if html_dir.name == "html" and html_dir.parent.name == "_build":   # <run>/book/_build/html
        out.add(str(html_dir.parent.parent.parent))
    return tuple(sorted(p for p in out if p not in ("/", "")))


def reader_problems(info: dict, paths: tuple[str, ...] = ()) -> list[str]:
    """What a reader should not see, from the page's inspected content (``_INSPECT``)."""
    out = []
    for c in info.get("clipped", []):
        out.append(f"clipped: {c}")
    for o in info.get("outputs", []):
        m = WARNING.search(o["text"])
        if m or o["stderr"]:
            line = next((ln for ln in o["text"].splitlines() if WARNING.search(ln)), o["text"].strip()[:100])
            out.append(f"a warning or stderr output is shown: {line.strip()[:140]!r}")
        m = PROGRESS.search(o["text"])
        if m:
            out.append(f"a progress bar is shown: {m.group(0)[:80]!r}")
    text = info.get("allText", "")
    for p in paths:
        i = text.find(p + "/") if text.find(p + "/") >= 0 else text.find(p)
        if i >= 0 and (i + len(p) == len(text) or not (text[i + len(p)].isalnum() or text[i + len(p)] in "_-.")):
            out.append(f"an absolute path of the build machine is shown: {text[i:i + 80].splitlines()[0]!r}")
    for t in info.get("tableInfo", []):
        cells = [c for row in t["body"] for c in row]
        cut = [c for c in cells if c.endswith("...") and len(c) > 20]
        if cut:
            out.append(f"a table cell is cut short by pandas ({cut[0][:60]!r}): show the whole text")
        bad = sorted({c for c in cells if MISSING.fullmatch(c)})
        if bad:
            out.append(f"a table shows raw missing values {bad} (write '–' or explain): starts {t['first']!r}")
        heads = t["head"]
        if any(row and all(not c for c in row) for row in heads) or \
                (len(heads) == 1 and any(not c for c in heads[0][1:])):
            out.append(f"a table has an empty header: starts {t['first']!r}")
        ncol = max((len(r) for r in t["body"]), default=0)
        names = heads[0] if heads else []
        for j in range(ncol):
            col = [r[j] for r in t["body"] if j < len(r) and r[j]]
            if len(col) >= 2 and all(FLOAT_COUNT.match(v) for v in col):
                name = names[j] if j < len(names) else f"column {j + 1}"
                out.append(f"counts written as floats in column {name!r} (e.g. {col[0]}): starts {t['first']!r}")
    for pre in info.get("pres", []):
        m = MISSING.search(pre)
        if m:
            ln = next(x for x in pre.splitlines() if MISSING.search(x))
            out.append(f"an output shows a raw missing value {m.group(0)!r}: {ln.strip()[:100]!r}")
    prose = info.get("text", "")
    if "`" in prose:
        i = prose.index("`")
        out.append(f"literal backticks in the text (markdown not rendered): ...{prose[max(0, i - 40):i + 40]!r}...")
    m = TEMPLATE.search(prose)
    if m:
        out.append(f"template syntax left in the text: ...{prose[max(0, m.start() - 40):m.end() + 40]!r}...")
    return list(dict.fromkeys(out))


def _redirect(file: Path) -> bool:
    """True for a ``<meta http-equiv="refresh">`` stub (Jupyter Book's index.html)."""
    head = file.read_text(errors="replace")[:2000]
    return 'http-equiv="refresh"' in head.lower()
