"""The routes a user takes after a run, on the real notebooks and the smoke run:
papermill with only run_dir, the README's papermill example, a rerun into a new
folder, a credentialed run opened directly, and a killed run resumed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d3m_lib import rundir
from d3m_lib.privacy import scan_notebook_outputs

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO_ROOT / "notebooks"
pytestmark = pytest.mark.smoke


def artifacts(run_dir: Path) -> dict[str, str]:
    """Hash of every artifact a stage wrote (not the records: manifests, run.json, executed, book)."""
    skip = {"manifest.json", "run.json", ".lock", "config.json"}
    out = {}
    for f in sorted(run_dir.rglob("*")):
        rel = f.relative_to(run_dir)
        if f.is_file() and rel.parts[0] in rundir.STAGES and f.name not in skip:
            out[str(rel)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def papermill(notebook: str, out: Path, *params: str, cwd: Path = NOTEBOOKS) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-m", "papermill", str(NOTEBOOKS / notebook), str(out),
                           "-k", "python3", *params], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def runner(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-m", "d3m_lib", "run", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_papermill_with_only_run_dir_reproduces_each_stage_and_deletes_nothing(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    before = artifacts(run_dir)
    for spec in rundir.STAGES.values():
        proc = papermill(spec.notebook, tmp_path / spec.notebook, "-p", "run_dir", str(run_dir))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "writing this stage to" not in (tmp_path / spec.notebook).read_text()
    after = artifacts(run_dir)
    assert sorted(after) == sorted(before), "files appeared or disappeared"
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"artifacts differ after re-running with the same configuration: {changed[:10]}"
    assert all(rundir.RunDir(run_dir).state(s) == "current" for s in rundir.STAGES)


def test_readme_papermill_example_writes_a_fork_and_keeps_the_run(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    before = artifacts(run_dir)
    proc = papermill("05_d3m.ipynb", tmp_path / "05.ipynb", "-p", "run_dir", str(run_dir),
                     "-p", "d3m_weighting", "linear")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fork = run_dir.with_name(run_dir.name + "+d3m_weighting=linear")
    assert f"writing this stage to {fork}" in (tmp_path / "05.ipynb").read_text()
    assert artifacts(run_dir) == before
    f = rundir.RunDir(fork)
    assert f.config().d3m_weighting == "linear" and f.require("05_d3m")
    assert f.manifest("05_d3m")["params"]["d3m_weighting"] == "linear"
    # its upstream stages are the run's own files, linked; their manifests say so, in the fork's own file
    assert os.stat(fork / "01_cohort" / "cohort.parquet").st_ino == \
        os.stat(run_dir / "01_cohort" / "cohort.parquet").st_ino
    assert f.manifest("03_baseline")["linked_from"]["run"] == str(run_dir)
    assert str(run_dir) not in (fork / "01_cohort" / "flow.csv").read_text()
    # and the next notebooks, pointed at the fork, read the linear selection
    proc = papermill("06_per_race.ipynb", tmp_path / "06.ipynb", "-p", "run_dir", str(fork))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f.state("06_per_race") == "current"
    # the fork gets a book by the command the refusal names
    proc = papermill("07_error_analysis.ipynb", tmp_path / "07.ipynb", "-p", "run_dir", str(fork))
    assert proc.returncode == 0, proc.stderr[-3000:]
    book = subprocess.run([sys.executable, "-m", "d3m_lib", "book", str(fork)], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    command = f"python -m d3m_lib run {fork / 'config.json'} --run-dir {fork}"
    assert book.returncode == 1 and command in book.stderr
    proc = runner(*command.split()[4:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from d3m_lib.runner import stage_problems, study_notebooks
    assert stage_problems(f, f.config(), study_notebooks()) == []


def test_rerun_into_a_new_folder_recomputes_only_what_a_parameter_shapes(smoke_run):
    run_dir, _ = smoke_run
    new = run_dir.with_name("beta2")
    proc = runner("params/smoke.yaml", "--run-dir", str(new), "-p", "d3m_beta=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = {s["stage"]: s["action"] for s in json.loads((new / "run.json").read_text())["plan"]}
    assert plan == {"01_cohort": "link", "02_scan": "link", "03_baseline": "link", "04_trak": "link",
                    "05_d3m": "compute", "06_per_race": "compute", "07_error_analysis": "compute"}
    for s in ("01_cohort", "02_scan", "03_baseline", "04_trak"):
        assert f"{s:<18} reuse    same fingerprint in {run_dir}" in proc.stdout
    assert "[01_cohort] running" not in proc.stdout and "[05_d3m] running" in proc.stdout


def test_notebooks_06_and_07_on_a_credentialed_run_show_no_identifiers_or_images(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    cred = tmp_path / "credentialed"
    shutil.copytree(run_dir, cred, ignore=shutil.ignore_patterns("book", "book_src", ".lock"))
    r = rundir.RunDir(cred)
    m = r.manifest("01_cohort")
    m["summary"]["data"]["synthetic"] = False          # as if stage 01 had read real MIMIC
    r._write_manifest("01_cohort", m)
    out = tmp_path / "executed"
    out.mkdir()
    for nb in ("06_per_race.ipynb", "07_error_analysis.ipynb"):
        proc = papermill(nb, out / nb, "-p", "run_dir", str(cred))
        assert proc.returncode == 0, proc.stderr[-3000:]
    found = scan_notebook_outputs(out, cred / "01_cohort" / "cohort.parquet", allow_ids=False,
                                  allow_images=False)
    assert found == []
    # the same notebooks on the synthetic run do show identifiers or images (the scan can see them)
    (tmp_path / "open").mkdir()
    proc = papermill("07_error_analysis.ipynb", tmp_path / "open" / "07.ipynb", "-p", "run_dir", str(run_dir))
    assert proc.returncode == 0
    assert scan_notebook_outputs(tmp_path / "open", run_dir / "01_cohort" / "cohort.parquet",
                                 allow_ids=False, allow_images=False)


def test_a_killed_run_is_recorded_as_interrupted_and_resumes(smoke_run):
    run_dir, _ = smoke_run
    target = run_dir.with_name("killed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "d3m_lib", "run", "params/smoke.yaml", "--run-dir",
                             str(target), "-p", "d3m_beta=3"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (target / "05_d3m" / "manifest.json").exists():
        time.sleep(0.5)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((target / "run.json").read_text())["status"] == "running"
    again = runner("params/smoke.yaml", "--run-dir", str(target), "-p", "d3m_beta=3")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"the previous run in {target} was interrupted" in again.stdout
    assert "01_cohort          keep" in again.stdout
    assert json.loads((target / "run.json").read_text())["status"] == "complete"


def test_an_edited_headline_table_is_refused_by_status_require_and_book(smoke_run, tmp_path):
    """On the real artifacts: D3M's row of wga_change.csv set to 0.40 [0.30, 0.50]."""
    import pandas as pd

    from d3m_lib.__main__ import main

    run_dir, _ = smoke_run
    copy = tmp_path / "edited"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("book", "book_src", ".lock"))
    assert main(["status", str(copy)]) == 0                 # a faithful copy is current
    f = copy / "06_per_race" / "wga_change.csv"
    t = pd.read_csv(f)
    t.loc[t["method"] == "d3m", ["change", "lo", "hi"]] = [0.40, 0.30, 0.50]
    t.to_csv(f, index=False)
    assert main(["status", str(copy)]) == 1
    with pytest.raises(rundir.StaleArtifactError, match=f"{f} was changed after the stage wrote it"):
        rundir.RunDir(copy).require("06_per_race")
    assert main(["book", str(copy)]) == 1
    assert not (copy / "book").exists()
