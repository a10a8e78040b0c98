"""End to end: every notebook runs on the smoke parameters, the book builds with
warnings as errors, and its pages render in headless Chromium."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest


REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHECK_BOOK = REPO_ROOT / "scripts" / "check_book.py"


def toc_notebooks() -> list[str]:
    """Notebook pages (``notebooks/NN_name``) that _toc.yml lists."""
    from d3m_lib.book_check import toc_files

    return [f for f in toc_files(REPO_ROOT / "_toc.yml") if f.startswith("notebooks/")]


NOTEBOOKS = toc_notebooks()
MISSING = [f for f in NOTEBOOKS if not (REPO_ROOT / f"{f}.ipynb").exists()]


def require_chromium():
    from d3m_lib.book_check import browser_problem

    why = browser_problem()
    if why is None:
        return
    if os.environ.get("REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"REQUIRE_CHROMIUM=1 but {why}")
    pytest.skip(f"{why}; set REQUIRE_CHROMIUM=1 to make this a failure")


def test_toc_lists_the_seven_notebooks():
    assert [Path(f).name[:2] for f in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


def test_check_book_passes_a_good_book_and_names_each_problem(tmp_path, built_tiny_book):
    """scripts/check_book.py on the tiny book: passes (cross-page figure and formula included),
    then names the page and the problem for a missing image, raw TeX, a wide table, an error
    output, a network request and a page missing from the table of contents."""
    require_chromium()
    html = tmp_path / "html"
    shutil.copytree(built_tiny_book[1], html)
    shots = tmp_path / "shots"
    ok = subprocess.run([sys.executable, str(CHECK_BOOK), str(html), "--screenshots", str(shots)],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "book/intro.html: 1 images, 1 tables, 1 formulas, 0 problems" in ok.stdout
    assert (shots / "notebooks__01_glue.png").stat().st_size > 0
    intro = html / "book" / "intro.html"
    page = intro.read_text()
    body_end = page.index("</article>")
    wide = "<table><tr>" + "".join(f"<td>column{i:03d}_wide_value</td>" for i in range(60)) + "</tr></table>"
    page = (page[:body_end] + wide
            + '<div class="output traceback">ZeroDivisionError</div>'
            + '<pre style="white-space: pre; overflow-x: auto; width: 200px">' + "interval_end " * 40 + '</pre>'
            + '<table><tr><td style="max-width: 40px; overflow: hidden">AUROC 0.81 [0.75, 0.88]</td></tr></table>'
            + '<div class="cell_output"><div class="output stderr"><pre>x.py:1: UserWarning: careful</pre></div></div>'
            + '<p>the `literal` {{ group_noun }}</p>'
            + '<img src="https://example.org/x.png">' + page[body_end:])
    intro.write_text(page)
    for img in (html / "_images").iterdir():
        img.unlink()
    shutil.rmtree(html / "_static" / "mathjax")  # as if MathJax came from a CDN, offline
    (html / "orphan.html").write_text("<html><body>not in the toc</body></html>")
    bad = subprocess.run([sys.executable, str(CHECK_BOOK), str(html), "--screenshots", str(shots)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    out = bad.stdout
    assert "PROBLEM book/intro.html: image not loaded: ../_images/" in out
    assert "PROBLEM notebooks/01_glue.html: image not loaded: ../_images/" in out
    assert "PROBLEM book/intro.html: raw TeX left in the text" in out
    assert "PROBLEM book/intro.html: table wider than the content column" in out
    assert "PROBLEM book/intro.html: error output" in out
    assert "PROBLEM book/intro.html: requests https://example.org/x.png from the network" in out
    assert "PROBLEM orphan.html: built but missing from the table of contents" in out
    # what a reader should not see
    assert "PROBLEM book/intro.html: clipped: a code or output block needs" in out
    assert "PROBLEM book/intro.html: clipped: a table cell cuts off its text" in out
    assert "PROBLEM book/intro.html: a warning or stderr output is shown" in out
    assert "PROBLEM book/intro.html: literal backticks" in out and "template syntax left" in out


def test_book_copies_fold_code_and_drop_widgets(tmp_path, built_tiny_book):
    """assemble_book's notebook copies: code cells folded (hide-input), widget outputs dropped."""
    from d3m_lib.runner import WIDGET_VIEW, fold_code

    run_dir, html = built_tiny_book
    src = nbformat.read(run_dir / "book_src" / "notebooks" / "01_glue.ipynb", as_version=4)
    code = [c for c in src.cells if c.cell_type == "code"]
    assert code and all({"hide-input", "remove-input"} & set(c.metadata.get("tags", [])) for c in code)
    page = (html / "notebooks" / "01_glue.html").read_text()
    assert "tag_hide-input" in page
    nb = nbformat.read(run_dir / "executed" / "01_glue.ipynb", as_version=4)
    nb.metadata["widgets"] = {"state": {}}
    nb.cells[-2].outputs.append(nbformat.v4.new_output(
        "display_data", data={WIDGET_VIEW: {"model_id": "x"}, "text/plain": "bar"}))
    nbformat.write(nb, tmp_path / "in.ipynb")
    fold_code(tmp_path / "in.ipynb", tmp_path / "out.ipynb")
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert "widgets" not in out.metadata
    assert not any(WIDGET_VIEW in o.get("data", {}) for c in out.cells for o in c.get("outputs", []))


@pytest.mark.smoke
def test_smoke_run_executes_every_notebook_and_builds_the_book(smoke_run):
    run_dir, stdout = smoke_run
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "complete"
    assert [n["notebook"] for n in rec["notebooks"]] == [Path(f).name for f in NOTEBOOKS]
    for f in NOTEBOOKS:
        nb = nbformat.read(run_dir / "executed" / f"{Path(f).name}.ipynb", as_version=4)
        assert not nb.metadata["papermill"].get("exception"), f
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, f"{f}: error outputs {errors[:1]}"
        page = run_dir / "book" / "_build" / "html" / f"{f}.html"
        assert page.exists(), f"no book page for {f}"
    assert "--warningiserror" in stdout and "--nitpick" in stdout
    assert (run_dir / "book" / "_build" / "html" / "index.html").exists()


@pytest.mark.smoke
def test_smoke_book_passes_the_browser_check(smoke_run):
    """The runner's --book checked every page in Chromium: screenshots of each, Results with its figures."""
    require_chromium()
    run_dir, stdout = smoke_run
    assert "every page passes the browser check" in stdout
    shots = run_dir / "book" / "screenshots"
    for f in NOTEBOOKS + ["book/results", "book/intro"]:
        assert (shots / f"{f.replace('/', '__')}.png").exists(), f
    from d3m_lib.book_check import check_book

    html = run_dir / "book" / "_build" / "html"
    assert check_book(html, pages=["book/results.html"], min_images={"book/results.html": 3},
                      verbose=False) == []
    results = (html / "book" / "results.html").read_text()
    assert re.search(r"worst race\s+group", results) and "headline.png" in results
    # keep the screenshots where CI and a developer can look at them
    keep = REPO_ROOT / "runs" / "smoke-screenshots"
    shutil.rmtree(keep, ignore_errors=True)
    shutil.copytree(shots, keep)


def test_glue_helpers_check_types_and_format_intervals():
    import numpy as np

    from d3m_lib.book import format_interval, glue_number, glue_table, glue_text

    assert format_interval(np.float64(0.8125), 0.75, np.float32(0.875), ".2f") == "0.81 [0.75, 0.88]"
    with pytest.raises(TypeError, match="glue_number\\('wga'\\): expected a real number, got str"):
        glue_number("wga", "0.81")
    with pytest.raises(TypeError, match="got bool"):
        glue_number("flag", True)
    with pytest.raises(TypeError, match="expected str"):
        glue_text("finding", 3)
    with pytest.raises(TypeError, match="expected a DataFrame"):
        glue_table("t", [[1, 2]])


def test_glued_images_are_named_as_cross_page_glue_links_them(tmp_path):
    """sphinx_ext.glued_images: every glued PNG under the sha256 name MyST-NB's cross-page glue uses."""
    import base64
    import hashlib

    from d3m_lib.sphinx_ext import glued_images

    png = b"\x89PNG\r\n\x1a\n" + b"fake image bytes"
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "06_per_race.glue.json").write_text(json.dumps({
        "forest_fig": {"data": {"image/png": base64.b64encode(png).decode(), "text/plain": "<Figure>"}},
        "n_seeds": {"data": {"text/plain": "3"}}}))
    assert glued_images(tmp_path) == {hashlib.sha256(png).hexdigest() + ".png": png}


def test_reader_problems_name_what_a_reader_should_not_see():
    """The page-content rules of the browser check, on what _INSPECT collects (no browser)."""
    from d3m_lib.book_check import reader_problems

    info = {
        "clipped": ["a table cell cuts off its text (300 px in 120 px): 'interval'"],
        "outputs": [{"text": "/home/me/d3m/training.py:621: UserWarning: array not writable", "stderr": True},
                    {"text": "decoding images (16px): 100%|██████████| 691/691 [00:01<00:00, 500.2img/s]",
                     "stderr": False}],
        "allText": "written to /home/me/d3m/runs/demo/01_cohort/unreadable.csv",
        "tableInfo": [{"head": [["", "", ""]], "body": [["a", "NaN", "27.000"], ["b", "<NA>", "3.000"],
                                                         ["ViewPosition not PA or AP (lateral, other or b...", "", ""]],
                       "first": "a"}],
        "pres": ["AUROC nan"],
        "text": "run `python -m d3m_lib` for the {{ group_noun }}",
    }
    probs = reader_problems(info, ("/home/me/d3m",))
    text = "\n".join(probs)
    for expected in ("clipped: a table cell cuts off", "a warning or stderr output is shown", "a progress bar is shown",
                     "an absolute path of the build machine is shown: '/home/me/d3m/runs/demo",
                     "raw missing values ['<NA>', 'NaN']", "an empty header", "counts written as floats in column",
                     "an output shows a raw missing value 'nan'", "literal backticks", "template syntax left",
                     "a table cell is cut short by pandas"):
        assert expected in text, expected
    clean = {"clipped": [], "outputs": [{"text": "Kept 691 images", "stderr": False}],
             "allText": "runs/demo/01_cohort/unreadable.csv", "pres": ["AUROC 0.81"], "text": "plain prose",
             "tableInfo": [{"head": [["group", "n", "share"]], "body": [["a", "27", "0.5"], ["b", "3", "–"]],
                            "first": "group"}]}
    assert reader_problems(clean, ("/home/me/d3m",)) == []


def test_the_book_copy_drops_progress_bars_and_writes_tables_for_readers(tmp_path):
    """fold_code drops tqdm frames; tables show '–' for missing values and integers for counts."""
    from d3m_lib.runner import fold_code, readable_tables

    nb = nbformat.v4.new_notebook()
    table = ("<table><thead><tr><th></th><th>n_removed</th><th>precision</th><th>help</th></tr></thead><tbody>"
             "<tr><th>0</th><td>27.000</td><td>NaN</td><td>when `findings` is null</td></tr>"
             "<tr><th>1</th><td>3.000</td><td>0.5</td><td>&lt;NA&gt;</td></tr></tbody></table>")
    nb.cells.append(nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stderr",
                               text="decoding images (16px):   0%|          | 0/691 [00:00<?, ?img/s]\r"
                                    "decoding images (16px): 100%|██████████| 691/691 [00:01<00:00, 500img/s]\n"),
        nbformat.v4.new_output("stream", name="stderr", text="0%|   | 0/3 [00:00<?]\nUserWarning: kept\n"),
        nbformat.v4.new_output("display_data", data={"text/html": table, "text/plain": "t"})]))
    nbformat.write(nb, tmp_path / "in.ipynb")
    fold_code(tmp_path / "in.ipynb", tmp_path / "out.ipynb")
    outs = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[0].outputs
    assert len(outs) == 2 and outs[0]["text"] == "UserWarning: kept\n"   # a warning is never hidden
    html = outs[1]["data"]["text/html"]
    assert "<td>27</td>" in html and "<td>3</td>" in html and "NaN" not in html and "&lt;NA&gt;" not in html
    assert "<code>findings</code>" in html and "<td>0.5</td>" in html
    assert readable_tables("<p>no table</p>") == "<p>no table</p>"


@pytest.mark.parametrize("n, ncols, cell", [(12, 12, 1.3), (8, 4, 1.3), (4, 4, 2.0), (3, 8, 1.3)])
def test_image_grid_captions_are_as_large_as_the_body_text(n, ncols, cell):
    """Captions of image grids, fitted into the book's column, are at least the body text's size."""
    import io

    import matplotlib
    import numpy as np
    from PIL import Image

    from d3m_lib import plots
    from d3m_lib.privacy import Policy

    matplotlib.use("Agg")
    fig = plots.image_grid([np.zeros((8, 8), np.uint8)] * n, ["Black or African American\ntest"] * n, Policy(False),
                           ncols=ncols, title="Examples as the models see them (16 px)", cell=cell)
    buf = io.BytesIO()
    dpi = matplotlib.rcParams["figure.dpi"]
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=dpi)   # as the notebook's inline backend does
    width_px = Image.open(io.BytesIO(buf.getvalue())).size[0]
    shown = min(1.0, plots.BOOK_COLUMN_PX / width_px)
    fs = fig.axes[0].title.get_fontsize()
    assert fs * dpi / 72 * shown >= plots.BOOK_BODY_PX
    assert len(fig.axes) <= plots.MAX_GRID_COLS * int(np.ceil(n / min(ncols, plots.MAX_GRID_COLS)))
