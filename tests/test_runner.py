"""The runner and the book build: checks before work, plans, reuse, refusals, the lock.

The study's seven stages are played by tiny notebooks (one file per stage) so that
the runner's behaviour is tested in seconds; the real notebooks run in test_book.py.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from d3m_lib import __version__, rundir
from d3m_lib.__main__ import main
from d3m_lib.runner import RunnerError, assemble_book, build_book, parse_overrides, privacy_scan, run

TOY_CELL = """
from d3m_lib.rundir import open_stage
stage = open_stage({name!r}, run_dir, namespace=globals(), replace=replace)
{body}
stage.path("out.txt").write_text(repr(stage.cfg.for_stage({name!r})))
stage.finish({summary})
"""


TOY_BODY = {
    # stage 01 reads an input file when the test names one
    "01_cohort": "import os\nfrom pathlib import Path\nif os.environ.get('TOY_INPUT'):\n"
                 "    stage.record_inputs([os.environ['TOY_INPUT']], Path(os.environ['TOY_INPUT']).parent, [])\n"
                 "if os.environ.get('TOY_TRAIN'):   # a cohort of that many training images\n"
                 "    import pandas as pd\n"
                 "    pd.DataFrame({'split': ['train'] * int(os.environ['TOY_TRAIN'])}).to_parquet("
                 "stage.path('cohort.parquet'))",
    "06_per_race": "stage.path('wga_change.csv').write_text("
                   "'finding,method,change,lo,hi\\nPleural Effusion,d3m,0.052,-0.01,0.11\\n')",
}


@pytest.fixture
def toy_notebooks(tmp_path, make_notebook):
    """One tiny notebook per stage, each listing the parameters its stage owns."""
    nbs = tmp_path / "nbs"
    for name, spec in rundir.STAGES.items():
        params = "\n".join(["run_dir = 'x'", "replace = False"] +
                           [f"{p} = None" for p in rundir.parameters_of(name)])
        summary = '{"data": {"dataset": stage.cfg.dataset, "synthetic": stage.cfg.synthetic}}' \
            if name == "01_cohort" else "{}"
        body = "raise RuntimeError('stage 02 broke')" if name == "02_scan" and os.environ.get("TOY_FAIL") else ""
        body = TOY_BODY.get(name, body)
        make_notebook(nbs / spec.notebook, params, TOY_CELL.format(name=name, body=body, summary=summary))
    return nbs


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["seeds=[0, 1]", "lr=0.1", "arch=resnet9", "x=", "flag=true"]) == {
        "seeds": [0, 1], "lr": 0.1, "arch": "resnet9", "x": None, "flag": True}
    with pytest.raises(RunnerError, match="name=value"):
        parse_overrides(["seeds"])


BAD = [("seeds=abc", "'seeds' = 'abc': must be a list of integers"),
       ("seeds=[-1]", "every seed must be >= 0"),
       ("d3m_selection=k_lowest", "'d3m_k' must be set when d3m_selection is 'k_lowest'"),
       ("methods=[randm]", "unknown method\\(s\\) 'randm' \\(did you mean 'random'\\?\\)"),
       ("findings=[Cardiomegally]", "did you mean 'Cardiomegaly'"),
       ("ci_level=1.5", "'ci_level' = 1.5: must be < 1"),
       ("trak_projdim=64", "trak_projdim \\(did you mean trak_proj_dim"),
       ("trak_checkpoints=[5, 20]", "epochs \\[20\\] do not exist")]


def test_bad_values_are_refused_before_anything_runs_or_is_deleted(tmp_path, toy_notebooks, capsys):
    done = tmp_path / "done"
    run(None, run_dir=done, notebooks_dir=toy_notebooks)
    before = snapshot(done)
    for override, message in BAD + ([("device=cuda", "no CUDA GPU")] if not _has_cuda() else []):
        for target in (done, tmp_path / "fresh"):
            code = main(["run", "--run-dir", str(target), "--notebooks", str(toy_notebooks),
                         "-p", override, "--replace", _empty_yaml(tmp_path)])
            assert code == 1, override
            import re
            assert re.search(message, capsys.readouterr().err), override
        assert not (tmp_path / "fresh").exists()
        assert snapshot(done) == before, f"{override} changed the finished run"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _empty_yaml(tmp_path: Path) -> str:
    f = tmp_path / "empty.yaml"
    f.write_text("# the defaults\n")
    return str(f)


def test_a_parameter_given_twice_on_the_command_line_is_refused(tmp_path, capsys):
    code = main(["run", _empty_yaml(tmp_path), "--run-dir", str(tmp_path / "r"), "-p", "seeds=[0]",
                 "-p", "seeds=[1]"])
    assert code == 1 and "-p seeds is given twice" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_parameter_given_twice_in_a_file_is_refused(tmp_path, toy_notebooks):
    f = tmp_path / "p.yaml"
    f.write_text("n_boot: 100\nlr: 0.1\nn_boot: 200\n")
    with pytest.raises(RunnerError, match="'n_boot' is given twice \\(lines 1 and 3\\)"):
        run(f, run_dir=tmp_path / "r", notebooks_dir=toy_notebooks)


def test_run_plans_keeps_and_records(tmp_path, toy_notebooks, capsys):
    run_dir = run(None, run_dir=tmp_path / "demo", notebooks_dir=toy_notebooks)
    out = capsys.readouterr().out
    assert out.count("compute  not computed yet") == 7
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "complete" and rec["versions"]["d3m_lib"] == __version__
    assert [s["action"] for s in rec["plan"]] == ["compute"] * 7
    assert rec["code_version"]["library"] == rundir.code_version()
    assert json.loads((run_dir / "config.json").read_text())["d3m_beta"] == 1.0
    # again: every stage is current and kept, nothing runs
    before = snapshot(run_dir)
    run(None, run_dir=run_dir, notebooks_dir=toy_notebooks)
    assert capsys.readouterr().out.count("keep     current") == 7
    # run.json keeps the earlier call, and the kept stages keep their timings
    again = json.loads((run_dir / "run.json").read_text())
    assert [h["started_at"] for h in again["history"]] == [rec["started_at"]] and "history" not in again["history"][0]
    assert again["history"][0]["notebooks"] == rec["notebooks"]
    assert [e["action"] for e in again["notebooks"]] == ["keep"] * 7
    assert [e["seconds"] for e in again["notebooks"]] == [e["seconds"] for e in rec["notebooks"]]
    assert {p: b for p, b in snapshot(run_dir).items() if p.name != "run.json"} == \
        {p: b for p, b in before.items() if p.name != "run.json"}


def test_a_new_folder_links_the_unchanged_stages(tmp_path, toy_notebooks, capsys):
    demo = run(None, run_dir=tmp_path / "demo", notebooks_dir=toy_notebooks)
    capsys.readouterr()
    beta2 = run(None, run_dir=tmp_path / "beta2", overrides={"d3m_beta": 2}, notebooks_dir=toy_notebooks)
    out = capsys.readouterr().out
    rec = json.loads((beta2 / "run.json").read_text())
    assert [s["action"] for s in rec["plan"]] == ["link"] * 4 + ["compute"] * 3
    assert f"reuse    same fingerprint in {demo}" in out
    assert "05_d3m             compute  not computed yet" in out
    assert os.stat(beta2 / "03_baseline" / "out.txt").st_ino == os.stat(demo / "03_baseline" / "out.txt").st_ino
    assert "'d3m_beta': 2.0" in (beta2 / "05_d3m" / "out.txt").read_text()
    assert "'d3m_beta': 1.0" in (demo / "05_d3m" / "out.txt").read_text()
    build_ok = rundir.RunDir(beta2)
    assert all(build_ok.state(s) == "current" for s in rundir.STAGES)
    # linked stages say where they came from, in their own manifest and in run.json
    linked = [e for e in rec["notebooks"] if e["action"] == "link"]
    first = json.loads((demo / "run.json").read_text())
    assert len(linked) == 4 and {e["linked_from"] for e in linked} == {str(demo)}
    assert linked[0]["seconds"] == first["notebooks"][0]["seconds"]
    assert build_ok.manifest("03_baseline")["linked_from"]["run"] == str(demo)
    assert "linked_from" not in rundir.RunDir(demo).manifest("03_baseline")
    own = os.stat(beta2 / "03_baseline" / "manifest.json").st_ino
    assert own != os.stat(demo / "03_baseline" / "manifest.json").st_ino


def test_other_parameters_in_an_existing_folder_need_replace(tmp_path, toy_notebooks, capsys):
    demo = run(None, run_dir=tmp_path / "demo", notebooks_dir=toy_notebooks)
    before = snapshot(demo)
    with pytest.raises(RunnerError, match="(?s)other parameters \\(image_size: 24 -> 16\\).*--replace"):
        run(None, run_dir=demo, overrides={"image_size": 16}, last=1, notebooks_dir=toy_notebooks)
    assert snapshot(demo) == before
    # replacing stage 01 in place makes every later stage stale, and the book refuses them
    run(None, run_dir=demo, overrides={"image_size": 16}, last=1, replace=True, notebooks_dir=toy_notebooks)
    assert "replacing in place (--replace); marked stale: 02_scan" in capsys.readouterr().out
    assert json.loads((demo / "run.json").read_text())["status"] == "partial"
    with pytest.raises(RunnerError, match="(?s)cannot build the book.*02_scan: stale.*07_error_analysis: stale"):
        assemble_book(demo, notebooks_dir=toy_notebooks)


def test_a_stage_needed_but_not_selected_must_be_current(tmp_path, toy_notebooks):
    with pytest.raises(RunnerError, match="stage 01_cohort is needed by the selected stages.*--from 1"):
        run(None, run_dir=tmp_path / "r", first=5, notebooks_dir=toy_notebooks)


def test_a_second_runner_is_refused(tmp_path, toy_notebooks):
    run_dir = tmp_path / "busy"
    lock = rundir.acquire_lock(run_dir, "python -m d3m_lib run")
    try:
        code = ("import sys; from d3m_lib.runner import run; "
                "run(None, run_dir=sys.argv[1], notebooks_dir=sys.argv[2])")
        proc = subprocess.run([sys.executable, "-c", code, str(run_dir), str(toy_notebooks)],
                              capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert proc.returncode != 0 and f"is in use by process {os.getpid()}" in proc.stderr
        assert not (run_dir / "run.json").exists()
    finally:
        lock.release()


def test_failing_notebook_stops_the_run_naming_it(tmp_path, toy_notebooks, monkeypatch):
    monkeypatch.setenv("TOY_FAIL", "1")
    nbs = tmp_path / "failing"
    import shutil

    shutil.copytree(toy_notebooks, nbs)
    from conftest import write_notebook

    write_notebook(nbs / "02_discrepancy_scan.ipynb", "run_dir = 'x'\nreplace = False",
                   "x = 1", "raise ValueError('no images left after exclusions')")
    with pytest.raises(RunnerError) as err:
        run(None, run_dir=tmp_path / "r", notebooks_dir=nbs)
    msg = str(err.value)
    assert "02_discrepancy_scan" in msg and "ValueError" in msg and "no images left" in msg
    assert "In [4]" in msg
    rec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert rec["status"] == "failed" and rec["notebooks"][-1]["status"] == "failed"
    assert not (tmp_path / "r" / "executed" / "03_baseline.ipynb").exists()
    with pytest.raises(RunnerError, match="02_scan: did not finish|02_scan: not run"):
        assemble_book(tmp_path / "r", notebooks_dir=nbs)


# -- the book ------------------------------------------------------------------------
def test_book_builds_with_cross_page_glue(built_tiny_book):
    run_dir, html = built_tiny_book
    assert html == run_dir / "book" / "_build" / "html" and (html / "index.html").exists()
    page = (html / "book" / "intro.html").read_text()
    assert "3,000" in page and "Cardiomegaly" in page and "81.2%" in page
    assert "0.81 [0.75, 0.88]" in page
    assert "<table" in page and "Asian" in page and 'src="../_images/' in page
    for src in re.findall(r'src="\.\./(_images/[^"]+)"', page):
        assert (html / src).is_file(), f"cross-page figure {src} was not written"
    nb_html = (html / "notebooks" / "01_glue.html").read_text()
    assert "3,000" in nb_html and "<img" in nb_html


def test_book_build_fails_on_a_missing_glue_key(tmp_path, tiny_book):
    from conftest import execute_tiny

    intro = "# Intro\n\n{glue:text}`../notebooks/01_glue.ipynb::no_such_key:.2f`\n"
    root, nbs = tiny_book(tmp_path, intro)
    run_dir = execute_tiny(nbs, tmp_path / "run", n=1)
    with pytest.raises(RunnerError, match="no_such_key"):
        build_book(run_dir, notebooks_dir=nbs, book_root=root, study=False)


def test_book_refuses_a_study_run_without_config(tmp_path, toy_notebooks):
    (tmp_path / "run").mkdir()
    with pytest.raises(RunnerError, match="no config.json"):
        assemble_book(tmp_path / "run", notebooks_dir=toy_notebooks)


PRIVACY_OUTPUT = {"output_type": "stream", "name": "stdout",
                  "text": "hardest image: 02aa804e-bde0afdd-112c0b34-7bc16630-4e384014\n"}


def test_credentialed_run_fails_when_a_notebook_shows_identifiers(tmp_path, toy_notebooks):
    import nbformat
    import pandas as pd

    from d3m_lib import config

    run_dir = run(None, run_dir=tmp_path / "run", notebooks_dir=toy_notebooks)
    r = rundir.RunDir(run_dir)
    pd.DataFrame({"image_id": ["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"],
                  "subject_id": ["10000032"], "study_id": ["50414267"]}).to_parquet(
        r.stage_dir("01_cohort") / "cohort.parquet")
    ex = r.executed("06_per_race")
    nb = nbformat.read(ex, as_version=4)
    nb.cells[-1].outputs = [nbformat.from_dict(PRIVACY_OUTPUT)]
    nbformat.write(nb, ex)
    cfg = config.resolve({})
    assert privacy_scan(r, cfg) == {"scanned": False, "credentialed": False}   # synthetic
    m = r.manifest("01_cohort")
    m["summary"]["data"]["synthetic"] = False       # stage 01 read real MIMIC
    r._write_manifest("01_cohort", m)
    with pytest.raises(RunnerError, match=r"(?s)may not publish \(1 found\).*06_per_race.ipynb.*02aa804e"):
        privacy_scan(r, cfg)
    assert privacy_scan(r, config.resolve({"publish_identifiers": True}))["credentialed"] is True


def test_an_edited_artifact_is_refused_by_status_and_book_and_recomputed_by_a_rerun(tmp_path, toy_notebooks,
                                                                                    capsys):
    """An edited 06_per_race/wga_change.csv is named, never published as current."""
    run_dir = run(None, run_dir=tmp_path / "demo", notebooks_dir=toy_notebooks)
    f = run_dir / "06_per_race" / "wga_change.csv"
    f.write_text(f.read_text().replace("0.052,-0.01,0.11", "0.40,0.30,0.50"))
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert f"06_per_race: stale (stage 06_per_race: {f} was changed after the stage wrote it)" in out
    assert "07_error_analysis" not in out                   # 07 does not read 06
    with pytest.raises(rundir.StaleArtifactError, match="wga_change.csv was changed"):
        rundir.RunDir(run_dir).require("06_per_race")
    assert main(["book", str(run_dir), "--notebooks", str(toy_notebooks)]) == 1
    assert "wga_change.csv was changed after the stage wrote it" in capsys.readouterr().err
    run(None, run_dir=run_dir, notebooks_dir=toy_notebooks)
    out = capsys.readouterr().out
    assert "06_per_race        compute  stage 06_per_race: " in out and out.count("keep     current") == 6
    assert "0.052" in f.read_text() and main(["status", str(run_dir)]) == 0


def test_changed_inputs_recompute_from_stage_01(tmp_path, toy_notebooks, monkeypatch, capsys):
    """An input changed after stage 01 -> status says so, the rerun recomputes 01."""
    labels = tmp_path / "data" / "chexpert.csv"
    labels.parent.mkdir()
    labels.write_text("study,Edema\n1,1\n2,0\n")
    monkeypatch.setenv("TOY_INPUT", str(labels))
    run_dir = run(None, run_dir=tmp_path / "demo", notebooks_dir=toy_notebooks)
    labels.write_text("study,Edema\n1,1\n")
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 1
    assert f"01_cohort: stale (stage 01_cohort: input {labels} was changed since stage 01_cohort read it" \
        in capsys.readouterr().out
    run(None, run_dir=run_dir, notebooks_dir=toy_notebooks)
    out = capsys.readouterr().out
    assert "01_cohort          compute  stage 01_cohort: input" in out
    assert out.count("  compute  ") == 7 and "(read by 07_error_analysis, directly or through others)" in out
    assert "recomputing" in (run_dir / "executed" / "01_cohort.ipynb").read_text()
    assert not rundir.RunDir(run_dir).manifest("01_cohort")["resumed"] and main(["status", str(run_dir)]) == 0
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_trak_proj_dim_is_checked_against_the_cohort_before_later_stages(tmp_path, toy_notebooks, monkeypatch):
    """trak_proj_dim above the training set is refused once stage 01 is known, not at stage 04."""
    monkeypatch.setenv("TOY_TRAIN", "50")
    with pytest.raises(RunnerError, match=r"'trak_proj_dim' = 64: must be below the number of training images, "
                                          r"and this run's cohort \(stage 01\) has 50 in train.*-p trak_proj_dim=12"):
        run(None, run_dir=tmp_path / "r", overrides={"trak_proj_dim": 64}, notebooks_dir=toy_notebooks)
    assert (tmp_path / "r" / "executed" / "01_cohort.ipynb").exists()
    assert not (tmp_path / "r" / "executed" / "02_discrepancy_scan.ipynb").exists()


def test_a_read_only_or_full_run_folder_gets_one_line(tmp_path, monkeypatch, capsys):
    """No traceback for a run folder that cannot be written."""
    import errno
    import shutil as sh
    from collections import namedtuple

    from d3m_lib import runner as runner_mod

    target = tmp_path / "ro" / "run"
    monkeypatch.setattr(runner_mod.os, "access", lambda p, mode: False)
    assert main(["run", _empty_yaml(tmp_path), "--run-dir", str(target)]) == 1
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in err
    assert f"cannot write to the run folder {target}" in line[0] and "read-only" in line[0]
    monkeypatch.undo()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    assert main(["run", _empty_yaml(tmp_path), "--run-dir", str(target)]) == 1
    assert "its disk has 1 MiB free" in capsys.readouterr().err
    monkeypatch.undo()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(target / "book" / "x.html"))
    monkeypatch.setattr("d3m_lib.__main__.build_book", full)
    assert main(["book", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and str(target) in err
    assert not target.exists()


def test_a_run_whose_notebooks_ran_elsewhere_gets_a_book_by_the_command_the_message_names(tmp_path, toy_notebooks,
                                                                                         capsys):
    """The papermill route (executed copies elsewhere) ends in a book, and the refusal says how."""
    demo = run(None, run_dir=tmp_path / "demo", notebooks_dir=toy_notebooks)
    for nb in ("05_d3m", "06_per_race", "07_error_analysis"):    # as if papermill had written them elsewhere
        (demo / "executed" / f"{nb}.ipynb").unlink()
    capsys.readouterr()
    assert main(["book", str(demo), "--notebooks", str(toy_notebooks)]) == 1
    command = f"python -m d3m_lib run {demo / 'config.json'} --run-dir {demo}"
    assert f"05_d3m: its notebook was not executed into {demo / 'executed'}" in capsys.readouterr().err
    assert command in str(pytest.raises(RunnerError, assemble_book, demo, notebooks_dir=toy_notebooks).value)
    assert main(command.split()[3:] + ["--notebooks", str(toy_notebooks)]) == 0
    out = capsys.readouterr().out
    assert out.count("keep     current") == 4 and "not executed into this run folder" in out
    assert (assemble_book(demo, notebooks_dir=toy_notebooks) / "notebooks" / "07_error_analysis.ipynb").exists()
