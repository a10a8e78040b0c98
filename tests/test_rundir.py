"""The run folder: stage manifests, resume, and the stale-artifact guard."""

import pytest

from d3m_lib.rundir import RunDir, StaleArtifactError, fingerprint


def test_fingerprint_depends_on_params_and_upstream():
    a = fingerprint({"x": 1}, {})
    assert a == fingerprint({"x": 1}, {})
    assert a != fingerprint({"x": 2}, {})
    assert a != fingerprint({"x": 1}, {"01": "abc"})
    # key order does not matter
    assert fingerprint({"a": 1, "b": 2}, {}) == fingerprint({"b": 2, "a": 1}, {})


def test_require_refuses_missing_and_unfinished_stage(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(StaleArtifactError, match="'01_cohort' has not been run"):
        run.require("01_cohort")
    run.begin("01_cohort", {"seed": 0})
    with pytest.raises(StaleArtifactError, match="did not finish"):
        run.require("01_cohort")


def test_same_params_resume_keeps_files(tmp_path):
    run = RunDir(tmp_path)
    st = run.begin("03_baseline", {"seed": 0})
    st.path("seed0", "epoch_01.pt").write_text("w")
    again = run.begin("03_baseline", {"seed": 0})
    assert again.path("seed0", "epoch_01.pt").read_text() == "w"
    assert run.manifest("03_baseline")["resumed"] is True


def test_changed_params_clear_stage_and_say_why(tmp_path, capsys):
    run = RunDir(tmp_path)
    st = run.begin("03_baseline", {"seed": 0, "lr": 0.1})
    st.path("old.txt").write_text("old")
    st.finish()
    st2 = run.begin("03_baseline", {"seed": 0, "lr": 0.2})
    assert not (st2.dir / "old.txt").exists()
    assert "parameters changed: lr" in capsys.readouterr().out
    assert run.manifest("03_baseline")["complete"] is False


def test_downstream_is_stale_after_upstream_rerun(tmp_path):
    run = RunDir(tmp_path)
    run.begin("01_cohort", {"uncertain_labels": "negative"}).finish()
    run.begin("02_scan", {"k": 3}, needs=["01_cohort"]).finish()
    assert run.require("02_scan") == tmp_path / "02_scan"
    # re-running the cohort with another label policy invalidates the scan
    run.begin("01_cohort", {"uncertain_labels": "drop"}).finish()
    with pytest.raises(StaleArtifactError, match="earlier version of stage '01_cohort'"):
        run.require("02_scan")
    # and a stage that needs the stale one cannot begin
    with pytest.raises(StaleArtifactError):
        run.begin("03_baseline", {}, needs=["02_scan"])
    # re-running the scan itself makes it current again
    run.begin("02_scan", {"k": 3}, needs=["01_cohort"]).finish()
    assert run.require("02_scan").name == "02_scan"


def test_finish_records_summary(tmp_path):
    run = RunDir(tmp_path)
    run.begin("01_cohort", {}).finish({"n_images": 12})
    m = run.manifest("01_cohort")
    assert m["complete"] and m["summary"] == {"n_images": 12}


def test_files_without_manifest_are_cleared(tmp_path, capsys):
    (tmp_path / "02_scan").mkdir()
    (tmp_path / "02_scan" / "stray.csv").write_text("x")
    RunDir(tmp_path).begin("02_scan", {})
    assert not (tmp_path / "02_scan" / "stray.csv").exists()
    assert "without a manifest" in capsys.readouterr().out
