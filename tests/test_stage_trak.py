"""Stage 04 on a tiny synthetic run: anchor checkpoints only, tau, planted-harm AUROC, LDS."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_stage_baseline import FINDING, build_tiny_run

from d3m_lib import attribution, config, models, training
from d3m_lib.config import ConfigError
from d3m_lib.rundir import open_stage
from d3m_lib.stages import baseline, trak


@pytest.fixture(scope="module")
def tiny_trak(tmp_path_factory):
    run = build_tiny_run(tmp_path_factory.mktemp("tiny"))
    baseline.run(open_stage("03_baseline", run.path))
    stage = open_stage("04_trak", run.path)
    return run, stage, trak.run(stage)


def test_checkpoints_default_to_the_anchor_and_later_epochs_are_refused():
    cfg = config.resolve({})
    assert max(cfg.trak_checkpoints) <= cfg.epochs_anchor
    with pytest.raises(ConfigError, match=r"epochs \[10, 15\] come from continued ERM.*TRAK must attribute "
                                          r"the model D3M edits"):
        config.resolve({"trak_checkpoints": [5, 10, 15]})
    with pytest.raises(ConfigError, match="come from continued ERM"):
        config.resolve({"epochs_anchor": 2, "epochs_more": 1, "trak_checkpoints": [1, 2, 3]})
    for f in ("smoke", "demo", "lds"):
        config.resolve(config.read_params_file(f"params/{f}.yaml"))  # these resolve on any machine
    for f in ("nih-sample", "mimic"):  # need data folders: check their TRAK epochs only
        v = {**config.defaults(), **config.read_params_file(f"params/{f}.yaml")}
        assert max(v["trak_checkpoints"]) <= v["epochs_anchor"]
    with pytest.raises(ConfigError, match="trak_lds_models"):
        config.resolve({"trak_lds_models": 10})


def test_harm_auroc_on_a_constructed_case():
    planted = np.array([True] * 5 + [False] * 15)
    perfect = np.where(planted, -1.0, 1.0) + np.linspace(0, 0.1, 20)
    r = attribution.harm_ranking_auroc([perfect, perfect], planted, n_boot=50)
    assert r["value"] == 1.0 and r["lo"] == 1.0 and r["n_planted"] == 5
    assert attribution.harm_ranking_auroc([-perfect], planted, n_boot=0)["value"] == 0.0
    # half of the planted images below all others, half above: 0.5, interval inside [0, 1]
    mixed = np.r_[[-1.0, -1.0, 2.0, 2.0, 0.0], np.linspace(-0.4, 0.4, 15)]  # 30 + 0 + 7.5 of 75 pairs
    r = attribution.harm_ranking_auroc([mixed], planted, np.arange(20) // 2, n_boot=200)
    assert r["value"] == pytest.approx(0.5) and 0 <= r["lo"] < 0.5 < r["hi"] <= 1
    with pytest.raises(ValueError, match="needs both kinds"):
        attribution.harm_ranking_auroc([perfect], np.ones(20, bool))


def test_harm_table_scores_each_group_the_mean_and_the_highest_loss_group():
    rows = np.arange(6)
    flags = pd.DataFrame({"row": rows, "label_flip": [1, 1, 0, 0, 0, 0], "shortcut": [0, 0, 0, 0, 0, 0]}).astype(
        {"label_flip": bool, "shortcut": bool})
    flags["all"] = flags["label_flip"]
    tau = pd.DataFrame({"A": [-2, -1, 0, 1, 2, 3.0], "B": [3, 2, 1, 0, -1, -2.0]}, index=rows)
    t = trak.harm_table({0: tau}, {0: pd.Series({"A": 0.9, "B": 0.1})}, flags, None, n_boot=0, ci_level=0.95,
                        random_state=0).set_index(["score", "kind"])
    assert t.loc[("tau(A)", "all"), "value"] == 1.0 and t.loc[("tau(B)", "all"), "value"] == 0.0
    assert t.loc[(trak.HIGHEST_LOSS, "all"), "value"] == 1.0      # A has the higher loss
    assert ("tau(A)", "shortcut") not in t.index                   # no planted shortcut: left out
    only_b = trak.harm_table({0: tau}, {0: pd.Series({"B": 0.1})}, flags, None, n_boot=0, ci_level=0.95,
                             random_state=0).set_index(["score", "kind"])   # A too small to be a candidate
    assert only_b.loc[(trak.HIGHEST_LOSS, "all"), "value"] == 0.0


def test_trak_stage_writes_tau_and_checks_attribution(tiny_trak):
    run, stage, res = tiny_trak
    assert run.manifest("04_trak")["complete"] and res.checkpoints == [1, 2]
    d = run.model_dir("04_trak", FINDING, 0)
    tau = pd.read_parquet(d / "tau.parquet")
    assert len(tau) == res.summary.loc[0, "n_train"] and tau.shape[1] == res.summary.loc[0, "groups"]
    assert set(res.summary["seed"]) == {0, 1}
    ex = res.examples
    assert set(ex["direction"]) == {"+", "-"} and (ex.groupby(["target", "direction"]).size() == 5).all()
    assert (ex.loc[ex["direction"] == "+", "score"].min() >= ex.loc[ex["direction"] == "-", "score"].max())
    h = res.harm_auroc
    assert h is not None and {"all", trak.EQUAL, trak.HIGHEST_LOSS} <= set(h["kind"]) | set(h["score"])
    assert h["value"].between(0, 1).all() and (h["lo"] <= h["hi"]).all() and h["hi"].le(1).all()
    assert (h["n_planted"] > 0).all() and all(len(v) == 2 for v in h["seed_values"])
    assert res.lds is None and "trak_lds is false" in res.lds_note


def test_lds_on_the_tiny_run(tiny_trak):
    run, stage, res = tiny_trak
    sc = attribution.load_scorer(run.model_dir("04_trak", FINDING, 0))
    cohort, images = run.cohort(), run.images()
    out = trak.linear_datamodeling(stage, sc, cohort, images, FINDING, 0, n_models=3, n_targets=12,
                                   subset_fraction=0.5)
    assert out["n_models"] == 3 and out["n_targets"] + out["n_targets_constant"] == 12
    assert -1 <= out["lo"] <= out["hi"] <= 1 and (stage.dir / "lds.json").exists()
    assert len(list((stage.dir / "lds").rglob("epoch_02.pt"))) == 3


def test_real_data_has_no_harm_table(tiny_trak, monkeypatch):
    run, _, _ = tiny_trak
    monkeypatch.setattr(trak, "ground_truth", lambda run: None)
    res = trak.run(open_stage("04_trak", run.path))
    assert res.harm_auroc is None and "no planted ground truth" in res.harm_note


def test_an_interrupted_ensemble_resumes_to_identical_features(tmp_path):
    run = build_tiny_run(tmp_path, trak_models=3, seeds=[0, 1], trak_checkpoints=[2], trak_lds_targets=100)
    baseline.run(open_stage("03_baseline", run.path))
    stage = open_stage("04_trak", run.path)
    res = trak.run(stage)
    assert (res.summary["models"] == 3).all() and (res.summary["model_ids"] == 3).all()
    # LDS for free: seed 0's scores against seed 1's three ensemble models
    assert res.lds is not None and res.lds["n_models"] == 3 and res.lds["models_from"].startswith("other seeds")
    assert -1 <= res.lds["lo"] <= res.lds["lds"] <= res.lds["hi"] <= 1
    d = run.model_dir("04_trak", FINDING, 0)
    sc = attribution.load_scorer(d)
    assert sorted(sc.checkpoints) == [m * attribution.ENSEMBLE_ID + 2 for m in (0, 1, 2)]
    feats = {m: sc.features(m) for m in sc.checkpoints}
    # interrupt: model 1's training lost; the grid retrains it, to identical weights and features
    ck = d / "ensemble" / "model01" / f"epoch_{res.checkpoints[-1]:02d}.pt"
    before = ck.read_bytes()
    ck.unlink()
    stage2 = open_stage("04_trak", run.path, replace=True)
    cohort = run.cohort()
    out = trak.train_ensembles(stage2, cohort, run.images(cohort["row"]), [(FINDING, 0)])
    assert ck.read_bytes() == before and len(out["dirs"][(FINDING, 0)]) == 3
    cfg = stage2.cfg
    fresh = attribution.TrakScorer(     # features computed anew, in a folder of their own
        lambda: models.build_model(cfg.arch, num_outputs=1, width=cfg.width), tmp_path / "fresh",
        run.images(cohort["row"]), sc.train_rows, cohort.set_index("row")[FINDING].dropna(),
        attribution.ensemble_checkpoints(out["dirs"][(FINDING, 0)], res.checkpoints), proj_dim=cfg.trak_proj_dim,
        projector_seed=cfg.trak_seed, batch_size=cfg.trak_batch_size, transform=training.to_tensor,
        featurizer=cfg.trak_featurizer)
    fresh.featurize()
    for m, f in feats.items():
        np.testing.assert_allclose(fresh.features(m), f, rtol=1e-5, atol=1e-8)
