"""The papermill runner and the book build, on tiny notebooks made in tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from conftest import CROSS_PAGE_INTRO
from d3m_lib import __version__
from d3m_lib.__main__ import main
from d3m_lib.runner import (RunnerError, assemble_book, build_book, check_known, discover,
                            load_params, parse_overrides, report_param_changes, run)

REPO_ROOT = Path(__file__).resolve().parent.parent

# A cell that records which parameters the notebook ended up with.
RECORD = """
import json, pathlib
seen = {{k: globals()[k] for k in ("run_dir", "a", "b", "data_dir") if k in globals()}}
pathlib.Path(run_dir, "seen_{n}.json").write_text(json.dumps(seen))
"""


@pytest.fixture
def two_notebooks(tmp_path, make_notebook):
    nbs = tmp_path / "nbs"
    make_notebook(nbs / "01_first.ipynb", "run_dir = 'x'\na = 1\ndata_dir = None",
                  RECORD.format(n="01"))
    make_notebook(nbs / "02_second.ipynb", "run_dir = 'x'\nb = [0]", RECORD.format(n="02"))
    return nbs


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["seeds=[0, 1]", "lr=0.1", "arch=resnet9", "x=", "flag=true"]) == {
        "seeds": [0, 1], "lr": 0.1, "arch": "resnet9", "x": None, "flag": True}
    with pytest.raises(RunnerError, match="name=value"):
        parse_overrides(["seeds"])


def test_load_params_rejects_non_mapping(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(RunnerError, match="mapping"):
        load_params(f)
    f.write_text("a: 1\nb: two\n")
    assert load_params(f, {"b": 3}) == {"a": 1, "b": 3}
    with pytest.raises(RunnerError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")


def test_unknown_key_is_refused_with_a_suggestion_before_running(tmp_path, two_notebooks):
    params = tmp_path / "p.yaml"
    params.write_text("a: 2\nbb: 3\n")
    run_dir = tmp_path / "run"
    with pytest.raises(RunnerError) as err:
        run(params, run_dir=run_dir, notebooks_dir=two_notebooks)
    msg = str(err.value)
    assert "bb" in msg and "did you mean b" in msg
    assert not run_dir.exists(), "nothing may run (or be created) when a parameter is unknown"
    # the same through the command line: non-zero exit, message on stderr
    assert main(["run", str(params), "--run-dir", str(run_dir),
                 "--notebooks", str(two_notebooks), "-p", "a=5"]) == 1
    assert not run_dir.exists()


def test_discover_checks_the_parameters_cell(tmp_path, make_notebook):
    nbs = tmp_path / "nbs"
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("run_dir = 'x'"))
    nbs.mkdir()
    nbformat.write(nb, nbs / "01_untagged.ipynb")
    with pytest.raises(RunnerError, match="01_untagged.ipynb has no cell tagged 'parameters'"):
        discover(nbs)
    make_notebook(nbs / "01_untagged.ipynb", "seed = 0")
    with pytest.raises(RunnerError, match="does not declare run_dir"):
        discover(nbs)
    make_notebook(nbs / "01_untagged.ipynb",
                  "run_dir = 'x'\nk = None  # images to drop with rule = 'k_lowest'")
    with pytest.raises(RunnerError, match="cannot read the parameter line.*for k"):
        discover(nbs)
    make_notebook(nbs / "01_untagged.ipynb", "run_dir = 'x'\nk = None  # images to drop (k_lowest)")
    assert discover(nbs)[0].declared == ("run_dir", "k")
    make_notebook(nbs / "01_again.ipynb", "run_dir = 'x'")
    with pytest.raises(RunnerError, match="share number 01"):
        discover(nbs)


def test_each_notebook_gets_only_its_declared_parameters_and_run_json(tmp_path, two_notebooks,
                                                                      monkeypatch):
    params = tmp_path / "p.yaml"
    params.write_text("a: 2\nb: [1, 2]\ndata_dir: some/data\n")
    monkeypatch.chdir(tmp_path)
    run_path = run(params, run_dir="run", overrides={"a": 7}, notebooks_dir=two_notebooks)
    assert run_path == (tmp_path / "run").resolve()
    seen1 = json.loads((run_path / "seen_01.json").read_text())
    seen2 = json.loads((run_path / "seen_02.json").read_text())
    # -p wins over the YAML; relative *_dir paths resolve against the starting folder
    assert seen1 == {"run_dir": str(run_path), "a": 7, "data_dir": str(tmp_path / "some" / "data")}
    assert seen2 == {"run_dir": str(run_path), "b": [1, 2]}
    assert sorted(p.name for p in (run_path / "executed").iterdir()) == [
        "01_first.ipynb", "02_second.ipynb"]

    rec = json.loads((run_path / "run.json").read_text())
    assert rec["status"] == "complete"
    assert rec["params"] == {"a": 7, "b": [1, 2], "data_dir": str(tmp_path / "some" / "data"),
                             "run_dir": str(run_path)}
    assert [n["notebook"] for n in rec["notebooks"]] == ["01_first", "02_second"]
    assert all(n["status"] == "complete" and n["seconds"] >= 0 and n["finished_at"]
               for n in rec["notebooks"])
    assert rec["notebooks"][0]["params"] == ["a", "data_dir", "run_dir"]
    assert rec["versions"]["d3m_lib"] == __version__
    assert {"python", "torch", "traker"} <= set(rec["versions"])
    assert rec["host"]["cpu_count"] >= 1
    cv = rec["code_version"]
    assert cv == "unknown" or (len(cv["commit"]) == 40 and isinstance(cv["dirty"], bool))


def test_failing_notebook_stops_the_run_naming_it(tmp_path, make_notebook):
    nbs = tmp_path / "nbs"
    make_notebook(nbs / "01_fails.ipynb", "run_dir = 'x'", "x = 1",
                  "raise ValueError('no images left after exclusions')")
    make_notebook(nbs / "02_after.ipynb", "run_dir = 'x'", RECORD.format(n="02"))
    run_dir = tmp_path / "run"
    with pytest.raises(RunnerError) as err:
        run(None, run_dir=run_dir, notebooks_dir=nbs)
    msg = str(err.value)
    assert "01_fails" in msg and "ValueError" in msg and "no images left" in msg
    # papermill's injected-parameters cell is In [2]; the failing cell is In [4]
    assert "In [4]" in msg and "raise ValueError" in msg
    assert not (run_dir / "executed" / "02_after.ipynb").exists()
    assert not (run_dir / "seen_02.json").exists()
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "failed"
    assert rec["notebooks"][0]["status"] == "failed" and "ValueError" in rec["notebooks"][0]["error"]
    # the book refuses a run whose notebook failed
    with pytest.raises(RunnerError, match="01_fails: executed with an exception"):
        assemble_book(run_dir, notebooks_dir=nbs)


def test_from_to_selects_by_number(tmp_path, make_notebook, capsys):
    nbs = tmp_path / "nbs"
    for name in ("01_one", "02_middle", "03_three"):
        make_notebook(nbs / f"{name}.ipynb", "run_dir = 'x'", RECORD.format(n=name[:2]))
    run_dir = tmp_path / "run"
    assert main(["run", str(_empty_yaml(tmp_path)), "--run-dir", str(run_dir),
                 "--notebooks", str(nbs), "--from", "2", "--to", "2"]) == 0
    assert [p.name for p in (run_dir / "executed").iterdir()] == ["02_middle.ipynb"]
    assert (run_dir / "seen_02.json").exists() and not (run_dir / "seen_01.json").exists()
    assert main(["run", str(_empty_yaml(tmp_path)), "--run-dir", str(run_dir),
                 "--notebooks", str(nbs), "--from", "5"]) == 1
    assert "no notebook numbered" in capsys.readouterr().err


def _empty_yaml(tmp_path: Path) -> Path:
    f = tmp_path / "empty.yaml"
    f.write_text("# no parameters: notebook defaults\n")
    return f


def test_changed_params_are_reported(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"params": {"a": 1, "b": 2, "gone": 0}}))
    changed = report_param_changes(tmp_path / "run.json", {"a": 1, "b": 3, "new": [1]})
    assert changed == ["b", "gone", "new"]
    out = capsys.readouterr().out
    assert "b: 2 -> 3" in out and "gone: 0 -> '<unset>'" in out
    assert report_param_changes(tmp_path / "absent.json", {"a": 1}) == []


def test_check_known_lists_close_matches():
    from d3m_lib.runner import Notebook

    nbs = [Notebook(1, Path("01_a.ipynb"), ("run_dir", "trak_proj_dim", "seeds"))]
    check_known({"seeds": [0]}, nbs)
    with pytest.raises(RunnerError, match=r"trak_projdim \(did you mean trak_proj_dim\?\)"):
        check_known({"trak_projdim": 512}, nbs)


# -- the book ------------------------------------------------------------------------
def test_book_builds_with_cross_page_glue(built_tiny_book):
    run_dir, html = built_tiny_book
    assert html == run_dir / "book" / "_build" / "html" and (html / "index.html").exists()
    page = (html / "book" / "intro.html").read_text()
    assert "3,000" in page and "Cardiomegaly" in page and "81.2%" in page
    assert "0.81 [0.75, 0.88]" in page
    assert "<table" in page and "Asian" in page and 'src="../_images/' in page
    nb_html = (html / "notebooks" / "01_glue.html").read_text()
    assert "3,000" in nb_html and "<img" in nb_html


def test_book_build_fails_on_a_missing_glue_key(tmp_path, tiny_book):
    intro = "# Intro\n\n{glue:text}`../notebooks/01_glue.ipynb::no_such_key:.2f`\n"
    root, nbs = tiny_book(tmp_path, intro)
    run_dir = run(None, run_dir=tmp_path / "run", notebooks_dir=nbs)
    with pytest.raises(RunnerError, match="no_such_key"):
        build_book(run_dir, notebooks_dir=nbs, book_root=root)


def test_book_refuses_a_run_with_a_notebook_missing(tmp_path, make_notebook):
    nbs = tmp_path / "nbs"
    make_notebook(nbs / "01_a.ipynb", "run_dir = 'x'")
    make_notebook(nbs / "02_b.ipynb", "run_dir = 'x'")
    (tmp_path / "run" / "executed").mkdir(parents=True)
    shutil.copy2(nbs / "01_a.ipynb", tmp_path / "run" / "executed" / "01_a.ipynb")
    with pytest.raises(RunnerError, match="02_b: not executed in this run"):
        assemble_book(tmp_path / "run", notebooks_dir=nbs)


PRIVACY_CELL = """
import pathlib, pandas as pd
d = pathlib.Path(run_dir, "01_cohort"); d.mkdir(parents=True, exist_ok=True)
pd.DataFrame({"image_id": ["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"],
              "subject_id": ["10000032"], "study_id": ["50414267"]}).to_parquet(d / "cohort.parquet")
print("hardest image: 02aa804e-bde0afdd-112c0b34-7bc16630-4e384014")
"""


def test_credentialed_run_fails_when_a_notebook_shows_identifiers(tmp_path, make_notebook):
    nbs = tmp_path / "nbs"
    make_notebook(nbs / "01_cohort.ipynb",
                  "run_dir = 'x'\ndataset = 'mimic'\nsynthetic = False\npublish_identifiers = False",
                  PRIVACY_CELL)
    with pytest.raises(RunnerError, match=r"(?s)may not publish \(1 found\).*01_cohort.ipynb cell 2.*02aa804e"):
        run(None, run_dir=tmp_path / "run", notebooks_dir=nbs)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
    # explicitly allowed: the run completes and says it was not scanned for identifiers
    run(None, run_dir=tmp_path / "run", notebooks_dir=nbs, overrides={"publish_identifiers": True})
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["status"] == "complete" and rec["privacy"]["credentialed"] is True
    # synthetic data is not credentialed: nothing to scan
    run(None, run_dir=tmp_path / "run", notebooks_dir=nbs, overrides={"synthetic": True})
    assert json.loads((tmp_path / "run" / "run.json").read_text())["privacy"] == {
        "scanned": False, "credentialed": False}
