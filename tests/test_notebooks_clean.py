"""Committed notebooks carry no outputs and no execution counts (the run folder holds executed copies)."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} carry outputs or execution counts; clear them "
                       "(jupyter nbconvert --clear-output --inplace) before committing")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_markdown_has_no_book_only_template_syntax(path):
    """JupyterLab shows a notebook's markdown as written: no {{ substitution }} of the book."""
    nb = nbformat.read(path, as_version=4)
    raw = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "{{" in c.source]
    assert not raw, f"{path.name}: markdown cells {raw} use {{{{ ... }}}}, which only the book substitutes"
