"""Stage 02 without papermill: the scan of a tiny synthetic cohort through ``stages.scan.run``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from d3m_lib import config, training
from d3m_lib import scan as scanmod
from d3m_lib.metrics import ALL
from d3m_lib.rundir import RunDir, open_stage
from d3m_lib.stages import cohort as stage01
from d3m_lib.stages import scan as stage02

PARAMS = dict(synthetic_n_patients=150, synthetic_image_size=16, image_size=16, cohort_min_group_n=3,
              cache_workers=1, width=4, batch_size=32, scan_epochs=2, n_boot=30, min_group_n=1,
              min_group_pos=0, device="cpu", scan_top_k=2)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage02") / "run"
    RunDir(run_dir).write_config(config.resolve(PARAMS))
    stage01.run(open_stage("01_cohort", run_dir))
    return run_dir, stage02.run(open_stage("02_scan", run_dir))


def test_artifacts_and_summary(scanned):
    run_dir, res = scanned
    run = RunDir(run_dir)
    d = run.stage_dir("02_scan")
    for f in ("model/epoch_02.pt", "model/history.csv", "scan.csv", "thresholds.json", "ranking.csv",
              "chosen_findings.json"):
        assert (d / f).exists(), f
    m = run.manifest("02_scan")
    assert m["complete"] and m["summary"]["chosen"] == res.chosen == run.findings()
    assert m["summary"]["top_gap"] == pytest.approx(res.glue["scan_top_gap"])
    assert json.loads((d / "thresholds.json").read_text()) == res.thresholds
    assert list(res.history["epoch"]) == [1, 2] and not res.reused_model
    assert res.noun == "race" and res.glue["scan_chosen"] == ", ".join(res.chosen)


def test_scan_table_and_ranking_agree(scanned):
    run_dir, res = scanned
    s = pd.read_csv(RunDir(run_dir).stage_dir("02_scan") / "scan.csv")
    assert set(s["finding"]) == set(res.available) and set(s["metric"]) == {"accuracy", "auroc", "fpr", "fnr"}
    ok = s.dropna(subset=["lo", "hi"])
    assert ((0 <= ok["lo"]) & (ok["lo"] <= ok["hi"]) & (ok["hi"] <= 1)).all()
    r = res.ranking.set_index("finding")
    for f in res.available:
        acc = s[(s["finding"] == f) & (s["metric"] == "accuracy") & (s["group"] != ALL)
                & (s["n"] >= PARAMS["min_group_n"])].dropna(subset=["value"])
        if len(acc) >= 2:
            assert r.loc[f, "gap_accuracy"] == pytest.approx(acc["value"].max() - acc["value"].min())
            assert r.loc[f, "worst_group"] == acc.sort_values(["value", "group"])["group"].iloc[0]
            assert 0 <= r.loc[f, "gap_accuracy_lo"] <= r.loc[f, "gap_accuracy_hi"] <= 1
    eligible = res.ranking[res.ranking["eligible"]]
    assert list(eligible["rank"]) == list(range(1, len(eligible) + 1))
    assert eligible["gap_accuracy"].is_monotonic_decreasing
    assert res.chosen == eligible["finding"].head(PARAMS["scan_top_k"]).tolist()
    assert res.top["finding"] == res.chosen[0] == res.glue["scan_top_finding"]
    assert list(res.ranking_table.columns) == stage02.RANKING_COLUMNS
    assert list(res.accuracy.columns)[-1] == ALL and set(res.accuracy.index) == set(res.available)


def test_overall_accuracy_is_the_thresholded_predictions(scanned):
    run_dir, res = scanned
    run = RunDir(run_dir)
    cohort = run.cohort()
    cfg = run.config()
    tcfg = training.TrainConfig.from_params(cfg.values, seed=cfg.scan_seed)
    preds, thr = scanmod.scan_predictions(tcfg, run.images(cohort["row"]), cohort, res.available,
                                          run.stage_dir("02_scan") / "model" / "epoch_02.pt", cfg.threshold_rule)
    assert thr == res.thresholds
    f = res.available[0]
    p = preds[preds["finding"] == f]
    assert len(p) == int(cohort.loc[cohort["split"] == "validate", f].notna().sum())
    assert np.array_equal(p["pred"], (p["prob"] >= thr[f]).astype(int))
    row = res.scan[(res.scan["finding"] == f) & (res.scan["group"] == ALL) & (res.scan["metric"] == "accuracy")]
    assert row["value"].iloc[0] == pytest.approx((p["pred"] == p["y"]).mean())


def test_resume_reuses_the_model_and_gives_the_same_tables(scanned):
    run_dir, res = scanned
    again = stage02.run(open_stage("02_scan", run_dir))
    assert again.reused_model and again.chosen == res.chosen
    pd.testing.assert_frame_equal(again.scan, res.scan)
    pd.testing.assert_frame_equal(again.ranking, res.ranking)


def test_explicit_findings_and_no_eligible_finding(scanned):
    run_dir, res = scanned
    st = open_stage("02_scan", run_dir, overrides={"findings": [res.available[-1]]})
    assert stage02.run(st).chosen == [res.available[-1]]
    st = open_stage("02_scan", run_dir, overrides={"min_group_n": 10_000})
    with pytest.raises(ValueError, match="no finding is eligible"):
        stage02.run(st)
    assert (st.dir / "ranking.csv").exists() and not st.run.manifest("02_scan")["complete"]
    st.lock.release()


def test_top_finding_falls_back_to_the_first_row():
    r = pd.DataFrame({"finding": ["A", "B"], "eligible": [False, True], "gap_accuracy": [0.3, 0.1]})
    assert stage02.top_finding(r)["finding"] == "B"
    assert stage02.top_finding(r.assign(eligible=False))["finding"] == "A"
    r = r.assign(gap_accuracy_lo=[0.2, 0.05], gap_accuracy_hi=[0.4, 0.2], worst_group=["X", "Y"])
    assert stage02.chosen_sentence(["B"], r, "sex") == (
        "Chosen: **B**. Largest eligible accuracy gap: B 0.100 [0.050, 0.200] (worst sex group: Y).")
    assert "No finding is eligible; largest accuracy gap: A 0.300" in stage02.chosen_sentence(
        ["A"], r.assign(eligible=False), "sex")
