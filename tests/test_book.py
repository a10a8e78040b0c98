"""End to end: every notebook runs on the smoke parameters, the book builds with
warnings as errors, and its pages render in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml


REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHECK_BOOK = REPO_ROOT / "scripts" / "check_book.py"


def toc_notebooks() -> list[str]:
    """Notebook pages (``notebooks/NN_name``) that _toc.yml lists."""
    toc = yaml.safe_load((REPO_ROOT / "_toc.yml").read_text())
    files: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                files.append(node["file"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(toc)
    return [f for f in files if f.startswith("notebooks/")]


NOTEBOOKS = toc_notebooks()
MISSING = [f for f in NOTEBOOKS if not (REPO_ROOT / f"{f}.ipynb").exists()]


def require_chromium():
    if CHROMIUM.exists():
        return
    if os.environ.get("REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"REQUIRE_CHROMIUM=1 but {CHROMIUM} is missing (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is missing; set REQUIRE_CHROMIUM=1 to make this a failure")


def test_toc_lists_the_seven_notebooks():
    assert [Path(f).name[:2] for f in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


def test_check_book_sees_figures_tables_and_broken_images(tmp_path, built_tiny_book):
    """scripts/check_book.py on a one-notebook book: passes, then catches a missing image."""
    require_chromium()
    html = tmp_path / "html"
    shutil.copytree(built_tiny_book[1], html)
    shots = tmp_path / "shots"
    ok = subprocess.run([sys.executable, str(CHECK_BOOK), str(html), "--screenshots", str(shots)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "notebooks/01_glue.html: 1 images, 1 tables with rows" in ok.stdout
    assert (shots / "notebooks__01_glue.png").stat().st_size > 0
    for img in (html / "_images").iterdir():
        img.unlink()
    bad = subprocess.run([sys.executable, str(CHECK_BOOK), str(html), "--pages",
                          "notebooks/01_glue.html", "--screenshots", str(shots)],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert "PROBLEM notebooks/01_glue.html: missing file" in bad.stdout


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
def test_smoke_book_renders_in_chromium(smoke_run, tmp_path):
    require_chromium()
    run_dir, _ = smoke_run
    html = run_dir / "book" / "_build" / "html"
    proc = subprocess.run([sys.executable, str(CHECK_BOOK), str(html),
                           "--screenshots", str(run_dir / "book" / "screenshots")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for f in NOTEBOOKS:
        assert (run_dir / "book" / "screenshots" / f"{f.replace('/', '__')}.png").exists()
    # keep the screenshots where CI and a developer can look at them
    keep = REPO_ROOT / "runs" / "smoke-screenshots"
    shutil.rmtree(keep, ignore_errors=True)
    shutil.copytree(run_dir / "book" / "screenshots", keep)


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
