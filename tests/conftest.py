"""Shared test helpers: tiny parameterized notebooks, and an importable d3m_lib in kernels."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Kernels started by papermill inherit the environment: make d3m_lib importable
# there even when the package is not pip-installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)


def write_notebook(path: Path, parameters: str, *cells: str, markdown: str = "") -> Path:
    """Write a notebook with an optional title cell, a `parameters` cell and code cells."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if markdown:
        nb.cells.append(nbformat.v4.new_markdown_cell(markdown))
    nb.cells.append(nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    nb.cells.extend(nbformat.v4.new_code_cell(c) for c in cells)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def make_notebook():
    return write_notebook


# -- a one-notebook book that glues numbers, a table and a figure ---------------
GLUE_CELL = """
import numpy as np, pandas as pd, matplotlib.pyplot as plt
from d3m_lib.book import glue_number, glue_text, glue_table, glue_figure, glue_interval
glue_number("n_images", np.int64(n) * 1000)
glue_number("wga", np.float64(0.8125))
glue_interval("wga_ci", 0.8125, 0.75, 0.875, fmt=".2f")
glue_text("finding", "Cardiomegaly")
glue_table("per_group", pd.DataFrame({"group": ["Asian", "White"], "accuracy": [0.8, 0.9]}))
fig, ax = plt.subplots(figsize=(2, 2)); ax.plot([0, 1], [1, 0])
glue_figure("curve", fig)
"""

NB_MARKDOWN_AFTER = """
Here {glue:text}`n_images:,d` images.

```{glue:} per_group
```

```{glue:figure} curve
:name: fig-curve

A line.
```
"""


def make_tiny_book(tmp_path: Path, intro: str) -> tuple[Path, Path]:
    """A book root (the repository's _config.yml, a one-notebook toc) and its notebooks folder."""
    root = tmp_path / "bookroot"
    (root / "book").mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "_config.yml", root / "_config.yml")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n"
                                   "  - file: notebooks/01_glue\n")
    (root / "book" / "intro.md").write_text(intro)
    nbs = tmp_path / "nbs"
    path = write_notebook(nbs / "01_glue.ipynb", "run_dir = 'x'\nn = 1", GLUE_CELL,
                          markdown="# Glue stage")
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell(NB_MARKDOWN_AFTER))
    nbformat.write(nb, path)
    return root, nbs


# A book page quoting the notebook above from another folder: numbers, text, a table, a figure.
CROSS_PAGE_INTRO = """# Intro

We kept {glue:text}`../notebooks/01_glue.ipynb::n_images:,d` images of
{glue:text}`../notebooks/01_glue.ipynb::finding:s`; worst-group accuracy
{glue:text}`../notebooks/01_glue.ipynb::wga:.1%` ({glue:text}`../notebooks/01_glue.ipynb::wga_ci:s`).
The worst-group accuracy is $\\min_g \frac{c_g}{n_g}$ (MathJax, bundled with the book).

```{glue:} per_group
:doc: ../notebooks/01_glue.ipynb
```

```{glue:} curve
:doc: ../notebooks/01_glue.ipynb
```
"""


@pytest.fixture
def tiny_book():
    return make_tiny_book


@pytest.fixture(scope="session")
def built_tiny_book(tmp_path_factory):
    """The tiny book run (n = 3) and built once: (run_dir, html_dir)."""
    from d3m_lib.runner import build_book

    tmp = tmp_path_factory.mktemp("tinybook")
    root, nbs = make_tiny_book(tmp, CROSS_PAGE_INTRO)
    run_dir = execute_tiny(nbs, tmp / "run", n=3)
    index = build_book(run_dir, notebooks_dir=nbs, book_root=root, study=False, check=False)
    return run_dir, index.parent


def execute_tiny(nbs: Path, run_dir: Path, **params) -> Path:
    """Execute every notebook of a tiny book into ``<run_dir>/executed`` with papermill."""
    from d3m_lib.runner import execute_notebook

    for nb in sorted(nbs.glob("*.ipynb")):
        execute_notebook(nb, run_dir / "executed" / nb.name, {"run_dir": str(run_dir), **params})
    return run_dir


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """``python -m d3m_lib run params/smoke.yaml --run-dir <tmp>/runs/smoke --book``, once per session.

    Shared by the book tests, the route tests and the JupyterLab test of the explorer.
    """

    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-m", "d3m_lib", "run", "params/smoke.yaml",
                           "--run-dir", str(run_dir), "--book"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout[-5000:] + "\n" + proc.stderr[-5000:])
    return run_dir, proc.stdout
