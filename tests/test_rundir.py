"""The run folder: fingerprints, transitive staleness, forks, replace, the lock, privacy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from d3m_lib import config, rundir
from d3m_lib.config import ConfigError
from d3m_lib.rundir import (RunBusyError, RunDir, StaleArtifactError, acquire_lock, expected_fingerprints,
                            fingerprint, open_stage)


def finish_all(run_dir, upto="07_error_analysis", **overrides):
    """Open and finish every stage up to ``upto`` (a fake run: one file per stage)."""
    for name in rundir.STAGES:
        st = open_stage(name, run_dir, overrides=overrides if name == "01_cohort" else None)
        st.path("out.txt").write_text(name)
        st.finish({"data": {"dataset": "mimic", "synthetic": True}} if name == "01_cohort" else {})
        if name == upto:
            break


def test_fingerprint_covers_params_upstream_and_code():
    a = fingerprint({"x": 1}, {}, "c1")
    assert a == fingerprint({"x": 1}, {}, "c1")
    assert len({a, fingerprint({"x": 2}, {}, "c1"), fingerprint({"x": 1}, {"01": "f"}, "c1"),
                fingerprint({"x": 1}, {}, "c2")}) == 4
    assert fingerprint({"a": 1, "b": 2}, {}, "c") == fingerprint({"b": 2, "a": 1}, {}, "c")


def test_expected_fingerprints_follow_each_parameter_downstream_only():
    base = config.resolve({})
    fps = expected_fingerprints(base, code="c")
    beta = expected_fingerprints(base.with_overrides({"d3m_beta": 2.0}), code="c")
    changed = [s for s in rundir.STAGES if fps[s] != beta[s]]
    assert changed == ["05_d3m", "06_per_race", "07_error_analysis"]
    size = expected_fingerprints(base.with_overrides({"image_size": 16}), code="c")
    assert all(fps[s] != size[s] for s in rundir.STAGES)
    # view parameters change no fingerprint
    assert expected_fingerprints(base.with_overrides({"publish_images": True}), code="c") == fps
    assert expected_fingerprints(base, code="other") != fps


def test_require_refuses_missing_unfinished_and_transitively_stale(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(StaleArtifactError, match="stage 01_cohort has not been run"):
        RunDir(run_dir).require("01_cohort")
    finish_all(run_dir, upto="05_d3m")
    run = RunDir(run_dir)
    assert run.require("05_d3m") == run_dir.resolve() / "05_d3m"
    # re-run stage 02 in place with another scan_top_k: 03 and 04 and 05 are all stale now
    st = open_stage("02_scan", run_dir, overrides={"scan_top_k": 3}, replace=True)
    st.finish()
    with pytest.raises(StaleArtifactError, match="05_d3m is stale"):
        run.require("05_d3m")
    for name in ("03_baseline", "04_trak", "05_d3m"):
        assert run.state(name) == "stale"
    assert (run_dir / "05_d3m" / "out.txt").read_text() == "05_d3m"   # marked, never deleted


def test_stale_chain_is_found_without_a_stale_mark(tmp_path):
    """A stage whose upstream-of-upstream moved on is refused (the guard looks all the way back)."""
    run_dir = tmp_path / "run"
    finish_all(run_dir, upto="05_d3m")
    run = RunDir(run_dir)
    m = run.manifest("02_scan")
    m["fingerprint"] = "moved-on"
    run._write_manifest("02_scan", m)
    with pytest.raises(StaleArtifactError, match="earlier version of stage 02_scan"):
        run.require("05_d3m")


def test_changed_parameter_writes_a_fork_and_keeps_the_original(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    finish_all(run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    st = open_stage("05_d3m", run_dir, overrides={"d3m_weighting": "linear"})
    fork = tmp_path / "demo+d3m_weighting=linear"
    assert st.run.path == fork.resolve()
    assert "writing this stage to" in capsys.readouterr().out
    st.path("out.txt").write_text("linear")
    st.finish()
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before                                   # nothing in the original changed
    assert RunDir(fork).config().d3m_weighting == "linear"
    assert RunDir(run_dir).config().d3m_weighting == "softmax"
    # upstream stages are hard links, not copies
    assert os.stat(fork / "04_trak" / "out.txt").st_ino == os.stat(run_dir / "04_trak" / "out.txt").st_ino
    assert RunDir(fork).require("05_d3m")
    # the same override again resumes in the same fork
    assert open_stage("05_d3m", run_dir, overrides={"d3m_weighting": "linear"}).run.path == fork.resolve()


def test_replace_overwrites_in_place_and_marks_later_stages_stale(tmp_path, capsys):
    run_dir = tmp_path / "run"
    finish_all(run_dir)
    st = open_stage("05_d3m", run_dir, overrides={"d3m_beta": 5.0}, replace=True)
    out = capsys.readouterr().out
    assert "replacing this stage in place" in out and "06_per_race, 07_error_analysis" in out
    assert not (run_dir / "05_d3m" / "out.txt").exists()
    st.finish()
    run = RunDir(run_dir)
    assert run.config().d3m_beta == 5.0
    assert run.state("06_per_race") == "stale" and run.state("05_d3m") == "current"


def test_overriding_a_parameter_of_an_earlier_stage_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    finish_all(run_dir, upto="04_trak")
    with pytest.raises(ConfigError, match="arch also shapes 02_scan, 03_baseline, 04_trak, already computed"):
        open_stage("05_d3m", run_dir, overrides={"arch": "resnet50"})
    with pytest.raises(ConfigError, match="stage 05_d3m does not read scan_top_k"):
        open_stage("05_d3m", run_dir, overrides={"scan_top_k": 1})
    with pytest.raises(ConfigError, match="'d3m_k' must be set"):
        open_stage("05_d3m", run_dir, overrides={"d3m_selection": "k_lowest"})
    assert not (run_dir / "05_d3m").exists()


def test_notebook_namespace_gives_only_its_listed_parameters(tmp_path):
    run_dir = tmp_path / "run"
    finish_all(run_dir, upto="04_trak")
    ns = {"run_dir": str(run_dir), "replace": False, "d3m_beta": None, "findings": ["Edema"], "seeds": [9]}
    st = open_stage("05_d3m", run_dir, namespace=ns)       # findings/seeds are not 05's: ignored
    assert st.run.path == run_dir.resolve() and st.cfg.seeds == [0, 1, 2]


def test_code_change_recomputes_the_stage_in_place(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    finish_all(run_dir, upto="01_cohort")
    monkeypatch.setattr(rundir, "code_version", lambda: "new-code")
    st = open_stage("01_cohort", run_dir)
    assert "library code changed" in capsys.readouterr().out
    assert st.run.path == run_dir.resolve() and not (run_dir / "01_cohort" / "out.txt").exists()


def test_files_without_a_manifest_are_refused_not_deleted(tmp_path):
    run_dir = tmp_path / "run"
    RunDir(run_dir).write_config(config.resolve({}))
    (run_dir / "01_cohort").mkdir(parents=True)
    (run_dir / "01_cohort" / "mine.csv").write_text("x")
    with pytest.raises(ConfigError, match="holds files but no manifest.json"):
        open_stage("01_cohort", run_dir)
    assert (run_dir / "01_cohort" / "mine.csv").exists()


HOLD = """
import sys, time
from pathlib import Path
from d3m_lib.rundir import acquire_lock
acquire_lock(Path(sys.argv[1]), "test holder")
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_while_the_lock_is_held(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "held"
        assert rundir.lock_is_held(run_dir)
        with pytest.raises(RunBusyError, match=rf"in use by process {proc.pid} \(test holder"):
            acquire_lock(run_dir, "second")
        with pytest.raises(RunBusyError):
            open_stage("01_cohort", run_dir)
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.1)
    assert not rundir.lock_is_held(run_dir)   # a killed holder leaves no lock behind
    acquire_lock(run_dir, "after").release()


def test_a_kernel_of_the_holder_shares_its_lock(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    lock = acquire_lock(run_dir, "runner")
    try:
        code = ("import sys; from pathlib import Path; from d3m_lib.rundir import acquire_lock; "
                "acquire_lock(Path(sys.argv[1]), 'kernel'); print('ok')")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        shared = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True,
                                env={**env, rundir.LOCK_ENV: lock.token})
        assert shared.stdout.strip() == "ok", shared.stderr
        other = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True,
                               env=env)
        assert "RunBusyError" in other.stderr
    finally:
        lock.release()


def test_policy_is_read_from_stage_01_and_fails_closed(tmp_path):
    run_dir = tmp_path / "run"
    run = RunDir(run_dir)
    assert run.policy().credentialed            # nothing known about the data yet: closed
    st = open_stage("01_cohort", run_dir)
    st.finish({"data": {"dataset": "mimic", "synthetic": False}})
    assert run.policy().credentialed and not run.policy().may_show_ids()
    m = run.manifest("01_cohort")
    m["summary"]["data"]["synthetic"] = True
    run._write_manifest("01_cohort", m)
    assert not run.policy().credentialed
    real = run.policy(config.resolve({"publish_images": True}))
    m["summary"]["data"]["synthetic"] = False
    run._write_manifest("01_cohort", m)
    assert not real.credentialed and run.policy(config.resolve({"publish_images": True})).may_show_images()


def test_a_view_override_in_one_notebook_is_not_persisted(tmp_path):
    run_dir = tmp_path / "run"
    finish_all(run_dir, upto="05_d3m")
    st = open_stage("06_per_race", run_dir, overrides={"publish_images": True})
    assert st.run.path == run_dir.resolve() and st.cfg.publish_images
    assert not RunDir(run_dir).config().publish_images


def test_interrupted_run_is_reported_as_interrupted(tmp_path):
    from d3m_lib.runner import run_status

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.run_json.write_text(json.dumps({"status": "running"}))
    assert run_status(run) == "interrupted"
    lock = acquire_lock(run.path, "runner")
    try:
        assert run_status(run) == "running"
    finally:
        lock.release()


def test_step_log_lives_in_the_manifest_and_survives_a_resume_only(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    st = open_stage("01_cohort", run_dir)
    log = st.steps("Cardiomegaly", "seed0")
    f = st.path("Cardiomegaly", "seed0", "epoch_05.pt")
    f.write_text("w")
    assert not log.done("anchor", {"n": 3}, files=(f,))
    log.mark("anchor", {"n": 3})
    assert log.done("anchor", {"n": 3}, files=(f,)) and not log.done("anchor", {"n": 4}, files=(f,))
    assert RunDir(run_dir).manifest("01_cohort")["steps"] == {"Cardiomegaly/seed0/anchor": {"signature": {"n": 3}}}
    again = open_stage("01_cohort", run_dir)                     # same fingerprint: the record is kept
    assert again.steps("Cardiomegaly", "seed0").done("anchor", {"n": 3}, files=(f,))
    f.unlink()
    assert not again.steps("Cardiomegaly", "seed0").done("anchor", {"n": 3}, files=(f,))
    monkeypatch.setattr(rundir, "code_version", lambda: "new-code")
    fresh = open_stage("01_cohort", run_dir)                     # recomputed: the record starts empty
    assert RunDir(run_dir).manifest("01_cohort")["steps"] == {} and not fresh.steps("x").done("anchor")


def test_an_edited_artifact_is_refused_naming_the_file(tmp_path):
    """A finished stage's files are hashed; an edit is named by require, a touch is not."""
    run_dir = tmp_path / "run"
    finish_all(run_dir)
    run = RunDir(run_dir)
    m = run.manifest("06_per_race")
    assert set(m["files"]) == {"out.txt"} and m["files"]["out.txt"]["sha256"] and m["content"]
    assert run.manifest("07_error_analysis")["upstream_content"]["05_d3m"] == run.manifest("05_d3m")["content"]
    f = run_dir / "06_per_race" / "out.txt"
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))            # touched, same bytes: still current
    assert run.problems("06_per_race") == [] and run.problems("06_per_race", full=True) == []
    f.write_text("Pleural Effusion,d3m,0.40,0.30,0.50")
    with pytest.raises(StaleArtifactError, match=r"06_per_race/out.txt was changed after the stage wrote it"):
        run.require("06_per_race")
    assert run.state("06_per_race") == "stale" and run.state("05_d3m") == "current"
    # an upstream edit reaches every stage that read it; a removed or an added file is named too
    (run_dir / "03_baseline" / "out.txt").unlink()
    with pytest.raises(StaleArtifactError, match=r"03_baseline/out.txt was removed.*read by 07_error_analysis"):
        run.require("07_error_analysis")
    (run_dir / "02_scan" / "extra.csv").write_text("x")
    assert any("02_scan/extra.csv was added" in p for p in run.problems("03_baseline"))


def test_same_size_same_mtime_edit_is_found_by_the_full_check(tmp_path):
    run_dir = tmp_path / "run"
    finish_all(run_dir, upto="01_cohort")
    f = run_dir / "01_cohort" / "out.txt"
    st = f.stat()
    f.write_text("01_cohorX")                                            # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))                     # and the old mtime
    run = RunDir(run_dir)
    assert run.problems("01_cohort") == []                               # the quick check trusts stat
    assert "01_cohort/out.txt was changed" in run.problems("01_cohort", full=True)[0]


def test_rerunning_a_stage_whose_files_changed_recomputes_it_and_its_readers(tmp_path, capsys):
    run_dir = tmp_path / "run"
    finish_all(run_dir, upto="03_baseline")
    run = RunDir(run_dir)
    (run_dir / "02_scan" / "out.txt").write_text("edited")
    st = open_stage("02_scan", run_dir)
    assert "recomputing" in capsys.readouterr().out and not (run_dir / "02_scan" / "out.txt").exists()
    st.path("out.txt").write_text("02_scan, other bytes")
    st.finish()
    with pytest.raises(StaleArtifactError, match="03_baseline was computed from other files of stage 02_scan"):
        run.require("03_baseline")
    st = open_stage("03_baseline", run_dir)                               # same fingerprint, new upstream content
    assert "files of an upstream stage changed" in capsys.readouterr().out
    assert not (run_dir / "03_baseline" / "out.txt").exists()
    st.finish()
    assert run.require("03_baseline")


def test_stage_inputs_are_recorded_and_a_change_is_named(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    csv = data / "labels.csv"
    csv.write_text("a,b\n1,2\n")
    for i in range(3):
        (data / "img" / f"{i}.jpg").write_bytes(b"x" * (i + 1))
    run_dir = tmp_path / "run"
    st = open_stage("01_cohort", run_dir)
    rec = st.record_inputs([csv], data, [f"img/{i}.jpg" for i in range(3)])
    st.path("image_cache", "images_16.u8").write_bytes(b"\0")
    st.finish({"data": {"dataset": "mimic", "synthetic": True}})
    assert rec["images"]["n"] == 3 and str(csv) in rec["files"]
    run = RunDir(run_dir)
    assert run.problems("01_cohort", full=True) == []
    csv.write_text("a,b\n1,3\n")
    (data / "img" / "1.jpg").unlink()
    probs = run.problems("01_cohort", full=True)
    assert f"input {csv} was changed since stage 01_cohort read it" in probs[0]
    assert "1 input image(s) changed" in probs[1] and "img/1.jpg (removed)" in probs[1]
    monkeypatch.setattr(rundir, "INPUT_CHECK_TTL", 0.0)
    with pytest.raises(StaleArtifactError, match="labels.csv was changed"):
        run.require("01_cohort")
    # running the stage again recomputes it, keeping only its image cache (which checks its rows itself)
    again = open_stage("01_cohort", run_dir)
    assert sorted(p.name for p in again.dir.iterdir()) == ["image_cache", "manifest.json"]
    assert not again.run.manifest("01_cohort")["resumed"]
