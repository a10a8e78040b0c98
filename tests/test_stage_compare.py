"""Stage 06 (stages.compare.run) on the fake run of test_analysis, extended with oracle and auto_random arms."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_analysis import build_fake_run, restamp

from d3m_lib import methods
from d3m_lib.rundir import RunDir, open_stage
from d3m_lib.stages import compare


def _add_arms(run_dir):
    """Add oracle (clearly better on every group) and auto_random (= random) rows to stage 05's tables."""
    d05 = RunDir(run_dir).stage_dir("05_d3m")
    p = pd.read_parquet(d05 / "predictions.parquet")
    erm = p[p["method"] == "erm"].copy()
    oracle = erm.assign(method="oracle", pred=erm["y"])  # a perfect model: a gain far outside any noise
    auto_random = p[p["method"] == "random"].assign(method="auto_random")
    pd.concat([p, oracle, auto_random], ignore_index=True).to_parquet(d05 / "predictions.parquet", index=False)
    s = pd.read_parquet(d05 / "selections.parquet")
    extra = [s[s["method"] == "random"].assign(method=m) for m in ("oracle", "auto_random")]
    pd.concat([s, *extra], ignore_index=True).to_parquet(d05 / "selections.parquet", index=False)
    restamp(run_dir, "05_d3m")   # as if stage 05 had written them


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    d = build_fake_run(tmp_path_factory.mktemp("cmp"), with_trak=False)
    _add_arms(d["run_dir"])
    stage = open_stage("06_per_race", d["run_dir"])
    return stage, compare.run(stage)


def test_arms_follow_the_registry(result):
    _, res = result
    assert res.arms == list(methods.order(res.arms))
    assert {"oracle", "auto_random"} <= set(res.arms)
    assert res.comparison.cluster_unit == "patient" and res.quotes["cluster_unit"] == "patients"


def test_paired_table_has_every_reviewer_pair(result):
    _, res = result
    pairs = set(zip(res.paired["a"], res.paired["b"]))
    assert pairs == {("d3m", "random"), ("d3m", "erm"), ("auto_d3m", "auto_random"), ("auto_d3m", "random"),
                     ("oracle", "erm"), ("d3m", "balanced")}
    oracle = res.paired[(res.paired["a"] == "oracle")]
    assert oracle["excludes_zero"].all() and (oracle["lo"] > 0).all()   # the perfect arm is reliably better
    assert ((res.paired["lo"] <= res.paired["diff"] + 1e-12) & (res.paired["diff"] <= res.paired["hi"] + 1e-12)).all()


def test_recovery_of_the_oracle_gain(result):
    _, res = result
    rec = res.recovery
    assert set(rec["method"]) == {"d3m", "random", "balanced", "auto_d3m", "auto_random"}
    assert list(dict.fromkeys(rec["method"])) == list(methods.order(rec["method"]))
    assert np.isfinite(rec["share"]).all() and (rec["share"] < 1).all()  # nobody beats a perfect model
    w = res.wga.set_index(["finding", "method"])
    f = res.primary
    expect = (w.loc[(f, "d3m"), "wga"] - w.loc[(f, "erm"), "wga"]) / (w.loc[(f, "oracle"), "wga"]
                                                                     - w.loc[(f, "erm"), "wga"])
    got = rec[(rec["finding"] == f) & (rec["method"] == "d3m")]["share"].iloc[0]
    assert got == pytest.approx(expect)
    assert "D3M recovers" in res.quotes["recovery_summary"]


def test_files_the_runner_reads(result, tmp_path):
    stage, res = result
    from d3m_lib import runner

    w = pd.read_csv(stage.path("wga_change.csv"))
    assert {"finding", "method", "change", "lo", "hi"} <= set(w.columns) and len(w) == len(res.wga_change)
    assert set(w["method"]) == set(res.arms) - {"erm"}
    assert runner.write_headline_figure(stage.run, tmp_path / "headline.png").is_file()
    for name in ("worst_group", "paired", "recovery", "forest", "auroc", "underdiagnosis"):
        assert stage.path(f"{name}.csv").is_file(), name
    assert stage.path("source_No_Finding.csv").is_file()
    assert json.loads(stage.path("sentences.json").read_text())["quotes"]["primary_finding"] == res.primary
    assert (stage.run.manifest("06_per_race") or {}).get("complete")


def test_quotes_claim_only_where_the_interval_excludes_zero(result):
    _, res = result
    for s, r in zip(res.sentences["paired"], res.paired.itertuples()):
        assert ("excludes 0" in s) == bool(r.excludes_zero)
        claimed = r.excludes_zero and (r.role == "primary" or r.p_holm < 0.05)
        assert ("better" in s or "worse" in s) == bool(claimed)
    q = res.quotes
    for m in methods.order():
        assert q[f"wga_{m}"] != ""
    assert "race group" in q["d3m_change_worst_sentence"]
    reliable = "excludes 0" in q["d3m_change_worst_sentence"]
    assert reliable == ("improved" in q["d3m_change_worst_sentence"] or "worsened" in q["d3m_change_worst_sentence"])
    assert q["leader_sentence"].startswith("The highest point estimate")
    assert res.numbers["n_seeds"] == 2 and res.numbers["d3m_removed_total"] > 0


def test_display_tables(result):
    _, res = result
    d = compare.paired_display(res.paired, seed_diffs=res.seed_diffs)
    assert len(d) == len(res.paired) and "D3M − random" in set(d["contrast"])
    assert d["seeds > 0"].str.match(r"^\d+ of \d+$").all()
    a = compare.answer_table(res)
    assert a["reading"].iloc[0].startswith("primary") and "finding" not in a.columns
    r = compare.recovery_display(res.recovery)
    assert len(r) == len(res.recovery) and r.iloc[0, 2].endswith("]")
    assert "note" in compare.recovery_display(res.recovery.iloc[:0]).columns
    assert res.underdiagnosis is not None and set(res.underdiagnosis["metric"]) == {"fpr"}


def test_without_an_oracle_the_sentence_says_why(tmp_path):
    d = build_fake_run(tmp_path, with_trak=False)   # synthetic (summary.data.synthetic), no oracle arm
    run = RunDir(d["run_dir"])
    m = run.manifest("01_cohort")
    m["summary"].pop("synthetic")   # what stage 01 records: the facts live under summary.data
    run._write_manifest("01_cohort", m)
    res = compare.run(open_stage("06_per_race", d["run_dir"]))
    assert res.recovery.empty and "add 'oracle' to `methods`" in res.quotes["recovery_summary"]


def test_primary_contrast_verdict_holm_and_seed_values(result):
    stage, res = result
    prim = res.paired[res.paired["role"] == "primary"]
    assert len(prim) == 1 and (prim["finding"].iloc[0], prim["a"].iloc[0], prim["b"].iloc[0]) == (
        res.primary, *stage.cfg.primary_contrast)
    assert res.paired.iloc[0]["role"] == "primary" and prim["p_holm"].isna().all()
    sec = res.paired[res.paired["role"] == "secondary"]
    assert (sec["p_holm"] >= sec["p"] - 1e-12).all()  # Holm never lowers a p-value
    assert res.verdict.split(":")[0] in ("Supported", "Contradicted", "Inconclusive at this run's power") \
        or res.verdict.startswith("Smaller than")
    assert res.quotes["verdict"] == res.verdict
    # each seed's difference: its mean is the point estimate of the paired table
    sd = res.seed_diffs
    for r in res.paired.itertuples():
        v = sd[(sd["finding"] == r.finding) & (sd["a"] == r.a) & (sd["b"] == r.b)]["diff"]
        assert len(v) == r.n_pairs and v.mean() == pytest.approx(r.diff)
    assert set(compare.headline_seeds(res)["method"]) <= set(res.wga_change["method"])
    m = json.loads(stage.path("manifest.json").read_text())["summary"]
    assert m["verdict"] in ("supported", "contradicted", "smaller than delta", "inconclusive")
    assert stage.path("paired_seeds.csv").is_file()


def test_worst_group_error_rates(result):
    _, res = result
    e = res.error_rates
    assert set(e["metric"]) == {"fpr", "fnr"} and e["group"].nunique() == 1
    oracle = e[e["method"] == "oracle"]   # the perfect arm makes no error
    assert (oracle["value"] == 0).all() and (oracle["change"] <= 0).all()
    erm = e[e["method"] == "erm"]
    assert (erm["change"] == 0).all()
    d = compare.error_rates_display(res)
    assert len(d) == len(e) and (d.loc[d["arm"] == "ERM", "change vs ERM [CI]"] == "–").all()


def test_alternatives_table_in_the_d3m_papers_form(result):
    _, res = result
    t = res.alternatives[res.alternatives["finding"] == res.primary].set_index("method")
    assert list(t.index) == [m for m in res.arms if methods.get(m).retrained]     # every retrained arm, no anchor
    assert t.loc["oracle", "labels"] == "planted truth" and t.loc["d3m", "labels"] == "val"
    assert t.loc["erm", "labels"] == "none" and t.loc["balanced", "labels"] == "train + val"
    pt = res.paired.set_index(["finding", "a", "b"])
    assert t.loc["oracle", "vs_erm"] == pytest.approx(pt.loc[(res.primary, "oracle", "erm"), "diff"])
    assert np.isnan(t.loc["erm", "vs_erm"]) and np.isnan(t.loc["d3m", "vs_d3m"])
    p, ph = t[["vs_erm_p", "vs_d3m_p"]].to_numpy(), t[["vs_erm_p_holm", "vs_d3m_p_holm"]].to_numpy()
    ok = np.isfinite(p)
    assert (ph[ok] >= p[ok] - 1e-12).all()                                       # Holm never lowers a p
    w = res.wga.set_index(["finding", "method"])
    assert t.loc["oracle", "wga"] == pytest.approx(w.loc[(res.primary, "oracle"), "wga"])
    levels, diffs = (compare.alternatives_display(res, part) for part in ("levels", "differences"))
    assert list(levels["arm"]) == list(diffs["arm"]) == [methods.label(m) for m in t.index]
    assert diffs.set_index("arm").loc["ERM", "Δ vs ERM"] == "–"
    # the oracle's perfect predictions: a claimed gain over ERM, marked and named in the sentence
    assert diffs.set_index("arm").loc["oracle", "Δ vs ERM"].endswith(" *")
    assert "oracle above by" in res.quotes["alternatives_summary"]


def test_alternatives_sentence_claims_nothing_with_one_seed():
    from d3m_lib import conclusions

    t = pd.DataFrame({"method": ["erm", "d3m"], "vs_erm": [np.nan, 0.2], "vs_erm_lo": [np.nan, 0.1],
                      "vs_erm_hi": [np.nan, 0.3], "vs_erm_p_holm": [np.nan, 0.001]})
    assert "no difference" in conclusions.alternatives_sentence(t, n_seeds=1)
    assert "D3M above by 0.200 [0.100, 0.300]" in conclusions.alternatives_sentence(t, n_seeds=3)


def test_underdiagnosis_shows_the_published_mimic_rates_only_on_real_mimic():
    from d3m_lib.analysis import MethodComparison

    rng = np.random.default_rng(0)
    n = 400
    groups = np.where(rng.random(n) < 0.5, "White", "Black or African American")
    rows = []
    y = rng.integers(0, 2, n)
    for m in ("erm", "d3m"):
        for s in (0, 1):
            rows.append(pd.DataFrame({"finding": "No Finding", "method": m, "seed": s, "draw": 0, "split": "test",
                                      "row": np.arange(n), "group": groups, "y": y, "logit": 0.0, "prob": 0.5,
                                      "threshold": 0.5, "pred": rng.integers(0, 2, n),
                                      "subject_id": np.arange(n).astype(str)}))
    mc = MethodComparison(pd.concat(rows, ignore_index=True), n_boot=20)

    class R:
        underdiagnosis = mc.underdiagnosis()
    real = compare.underdiagnosis_display(R, real_mimic=True).set_index("group")
    assert real.loc["White", "Seyyed-Kalantari et al. 2021 (MIMIC-CXR)"] == "0.170"
    assert real.loc["Black or African American", "Seyyed-Kalantari et al. 2021 (MIMIC-CXR)"] == "0.276"
    assert {"ERM", "D3M"} <= set(real.columns)
    assert "Seyyed-Kalantari et al. 2021 (MIMIC-CXR)" not in compare.underdiagnosis_display(R, real_mimic=False)
