"""Committed notebooks carry no outputs and no execution counts (the run folder holds executed copies)."""

import json
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter_and_its_help(path, caplog):
    """papermill's parser skips a line it cannot read (a help comment with '=' or ';'), with only a warning."""
    from papermill.translators import PythonTranslator

    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    src = "".join(cell["source"])
    with caplog.at_level("WARNING", logger="papermill.translators"):
        parsed = PythonTranslator.inspect({**cell, "source": src})
    assert not [r for r in caplog.records if "Unable to parse" in r.getMessage()]
    names = [ln.split("=")[0].strip() for ln in src.splitlines() if ln.strip() and not ln.startswith("#")]
    assert [p.name for p in parsed] == names
