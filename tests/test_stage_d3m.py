"""Stage 05 without papermill: a tiny real run (cohort, anchor and continued ERM, a saved TRAK state)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from d3m_lib import config, methods, training
from d3m_lib.stages import d3m as stage_d3m

FINDING = "Cardiomegaly"
PX = 16


def _tiny_run(root, **over):
    from test_analysis import write_tiny_run_to_02

    from d3m_lib import attribution, image_cache

    run, cfg = write_tiny_run_to_02(root, {"image_size": PX, "width": 4, "batch_size": 32, "seeds": [0],
                                           "epochs_anchor": 1, "epochs_more": 2, "device": "cpu", "min_group_n": 3,
                                           "trak_models": 0,
                                           "trak_checkpoints": [1], "trak_proj_dim": 16, "d3m_k_grid": [0.05, 0.15],
                                           "findings": [FINDING], **over}, FINDING, PX)
    cohort = run.cohort()
    images = image_cache.open_cache(run.path / "01_cohort" / "image_cache", PX)
    st = run.begin("03_baseline", cfg)
    tcfg = training.TrainConfig.from_params(cfg.values, seed=0)
    training.run_baseline(tcfg, images, cohort, FINDING, run.model_dir("03_baseline", FINDING, 0), progress=False)
    st.finish()
    st = run.begin("04_trak", cfg)
    sc = attribution.baseline_scorer(run.path, FINDING, 0, cohort, images, tcfg, [1], proj_dim=16,
                                     lambda_reg=0.0, batch_size=64, projector_seed=0)
    sc.featurize()
    va = training.task_rows(cohort, FINDING, "validate")
    sc.group_scores(va[0], va[2], exp_name="validate").to_parquet(sc.save_dir / "tau.parquet")
    st.finish()
    return run, cfg, cohort


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("d3mstage")
    run, cfg, cohort = _tiny_run(root, methods=list(methods.selectable()), group_dro_eta_grid=[0.1, 1.0],
                                 jtt_lambda_grid=[3.0, 10.0])
    res = stage_d3m.run(run.begin("05_d3m", cfg))
    return run, cfg, cohort, res


def test_every_arm_is_retrained_for_ercms_steps_and_written(result):
    run, cfg, cohort, res = result
    n_train = len(training.task_rows(cohort, FINDING, "train")[0])
    assert set(res.arms["method"]) == set(methods.selectable())        # every arm, through the registry
    draws = res.arms.groupby("method")["draw"].apply(sorted).to_dict()
    assert draws["random"] == draws["auto_random"] == [0, 1, 2] and draws["d3m"] == [0]   # random_draws = 3
    assert res.arms["steps"].nunique() == 1
    assert res.arms["steps"].iloc[0] == 2 * int(np.ceil(n_train / 32))
    assert res.arms.set_index("method").loc["balanced", "n_kept"] < n_train   # fewer rows, same steps
    assert res.arms["seconds"].notna().all()
    cols = ["finding", "method", "seed", "draw", "split", "row", "group", "y", "logit", "prob", "threshold", "pred"]
    saved = pd.read_parquet(run.path / "05_d3m" / "predictions.parquet")
    assert list(saved.columns) == cols and set(saved["method"]) == set(methods.selectable()) | {"erm", "base"}
    first = res.arms[res.arms["draw"] == 0].set_index("method")
    sgd = [m for m in methods.selectable() if methods.get(m).trainer == "sgd"]
    for m in sgd:   # every continuation: ERM's step budget, whatever its objective
        hist = pd.read_csv(run.path / "05_d3m" / FINDING / first.loc[m, "model"] / "seed0" / "history.csv")
        assert hist["step"].iloc[-1] == res.arms["steps"].iloc[0] and hist["epoch"].iloc[-1] == 3
    assert run.manifest("05_d3m")["complete"]


def test_validated_k_comes_from_the_curve_and_controls_are_count_matched(result):
    run, _, _, res = result
    arms = res.arms[res.arms["draw"] == 0].set_index("method")
    ck = res.chosen_k.set_index("method")
    assert arms.loc["d3m", "n_removed"] == ck.loc["d3m", "k"] == arms.loc["random", "n_removed"]
    assert arms.loc["auto_d3m", "n_removed"] == ck.loc["auto_d3m", "k"] == arms.loc["auto_random", "n_removed"]
    assert (res.arms.loc[res.arms["method"] == "random", "n_removed"] == ck.loc["d3m", "k"]).all()
    v = res.curve[(res.curve["method"] == "d3m") & (res.curve["split"] == "validate") & (res.curve["k"] > 0)]
    assert ck.loc["d3m", "k"] == v.sort_values(["wga", "k"], ascending=[False, True])["k"].iloc[0]
    assert set(res.curve["k"]) == {0} | {max(1, round(f * arms.loc["d3m", "n_train"])) for f in (0.05, 0.15)}
    assert set(res.curve["method"]) == {"d3m", "auto_d3m"} and ck.loc["d3m", "oracle_k"] == 12
    # every test model is trained fresh in the default stream: never the curve model that won on validation
    assert arms.loc["d3m", "model"] == "d3m"
    d = run.path / "05_d3m" / FINDING
    test_p = pd.read_parquet(d / "d3m" / "seed0" / "preds_test.parquet")
    curve_p = pd.read_parquet(d / f"curve_d3m_k{ck.loc['d3m', 'k']}" / "seed0" / "preds_test.parquet")
    assert not np.array_equal(test_p["logit"], curve_p["logit"])


def test_random_draws_differ_and_are_deterministic(result, tmp_path):
    _, _, _, res = result
    s = res.selections[res.selections["method"] == "random"]
    masks = [g["kept"].to_numpy() for _, g in s.groupby("draw")]
    assert len(masks) == 3 and not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])
    p = res.predictions[(res.predictions["method"] == "random") & (res.predictions["split"] == "test")]
    assert sorted(p["draw"].unique()) == [0, 1, 2]
    assert (res.predictions.loc[~res.predictions["method"].isin(["random", "auto_random"]), "draw"] == 0).all()
    # the same draws from a fresh selection context; another removal_seed draws others
    from d3m_lib.methods import SelectionContext

    rows = np.sort(s["row"].unique())
    n = int((~masks[0]).sum())
    for draw, mask in enumerate(masks):
        ctx = SelectionContext(rows, seed=0, draw=draw, n_removed={"d3m": n})
        assert np.array_equal(methods.get("random").select(ctx), mask)
    other = SelectionContext(rows, seed=0, draw=0, removal_seed=1, n_removed={"d3m": n})
    assert not np.array_equal(methods.get("random").select(other), masks[0])


def test_oracle_removes_exactly_the_planted_images_and_tables_are_filled(result):
    _, _, _, res = result
    pl = res.planted.set_index("method")
    assert pl.loc["oracle", "precision"] == 1.0 and pl.loc["oracle", "recall"] == 1.0
    assert pl.loc["oracle", "n_removed"] == 12
    assert set(res.weighting["groups"]) == {"race", "race_x_label"}      # both group choices, no retraining
    for kind, w in res.weighting.groupby("groups"):
        assert list(w["beta"].iloc[:4]) == [0.0, 1.0, 5.0, 20.0] and w["weighting"].iloc[4] == "linear"
        wcols = [c for c in w.columns if c.startswith("w_") and w[c].notna().all()]
        assert np.allclose(w.loc[w["weighting"] == "softmax", wcols].sum(axis=1), 1.0)
        assert np.allclose(w.iloc[0][wcols].astype(float), 1 / len(wcols))    # beta 0: equal weights
        assert w["changed"].between(0, 1).all() and w["recall"].between(0, 1).all()
    # the run's own setting (race, softmax beta 1) removes exactly D3M's set
    own = res.weighting[(res.weighting["groups"] == "race") & (res.weighting["beta"] == 1.0)]
    assert (own["changed"] == 0).all()
    assert set(res.auto_groups["pseudo"]) <= {"y0_a", "y0_b", "y1_a", "y1_b"}


def test_oracle_refused_on_real_data_with_a_clear_message():
    with pytest.raises(config.ConfigError, match="exist only in synthetic data"):
        config.resolve({"synthetic": False, "dataset": "nih", "nih_dir": ".", "methods": ["d3m", "oracle"]})
    assert "oracle" not in methods.for_data(None, "nih")


def test_who_was_removed_averages_a_controls_draws(result):
    from d3m_lib import analysis

    _, _, cohort, res = result
    t = analysis.removed_summary(res.selections, cohort).by_finding.set_index("method")
    n = res.arms.set_index(["method", "draw"])["n_removed"]
    assert t.loc["random", "removed"] == n.loc[("d3m", 0)] and t.loc["random", "n_train"] == t.loc["d3m", "n_train"]


def test_train_counts_average_a_controls_draws(result):
    from d3m_lib import analysis

    _, _, cohort, res = result
    mc = analysis.MethodComparison(res.predictions, res.selections, cohort, n_boot=10)
    overall = {m: mc.train_counts(FINDING, m).set_index("group").loc[analysis.OVERALL, "removed"]
               for m in ("d3m", "random")}
    assert overall["random"] == overall["d3m"] == res.chosen_k.set_index("method").loc["d3m", "k"]


def test_null_methods_run_the_default_arms_and_name_the_rest():
    assert methods.for_data(None, "synthetic") == [m for m in methods.selectable() if methods.get(m).default]
    assert {"group_dro", "jtt", "oracle_k"}.isdisjoint(methods.for_data(None, "synthetic"))
    assert "rwg" not in methods.for_data(None, "synthetic", group_labels="validation")


def test_arms_needing_training_group_labels_are_refused_by_name():
    with pytest.raises(config.ConfigError, match="'group_dro' needs training group labels.*group_labels"):
        config.resolve({"methods": ["d3m", "group_dro"], "group_labels": "validation"})
    from d3m_lib.stages.d3m import _check_training_groups

    with pytest.raises(ValueError, match="1 of 3 training images have no protected group.*'rwg'"):
        _check_training_groups(["d3m", "rwg"], FINDING, pd.Series(["a", None, "b"]))
    _check_training_groups(["d3m", "jtt"], FINDING, pd.Series(["a", None, "b"]))   # JTT needs none in training


def test_loss_filter_and_oracle_k_remove_d3ms_count(result):
    _, _, _, res = result
    n = res.arms.set_index(["method", "draw"])["n_removed"]
    assert n.loc[("loss_filter", 0)] == n.loc[("d3m", 0)] == n.loc[("oracle_k", 0)] == n.loc[("d3m_cells", 0)] > 0
    pl = res.planted.set_index("method")
    assert pl.loc["oracle_k", "precision"] == 1.0 or pl.loc["oracle_k", "recall"] == 1.0   # planted first


def test_loss_filter_removes_the_anchors_highest_losses(result):
    run, cfg, cohort, res = result
    tr = training.task_rows(cohort, FINDING, "train")
    tcfg = training.TrainConfig.from_params(cfg.values, seed=0)
    z = training.predict(run.model_dir("03_baseline", FINDING, 0) / "epoch_01.pt", tcfg, run.images(cohort["row"]),
                         tr[0])
    loss = np.logaddexp(0, z) - tr[1] * z
    s = res.selections
    kept = s[(s["method"] == "loss_filter")].set_index("row").loc[tr[0], "kept"].to_numpy()
    assert loss[~kept].min() >= loss[kept].max()


def test_jtt_upsamples_the_anchors_errors_and_every_tuned_arm_has_its_grid(result):
    _, _, _, res = result
    t = res.tuning[res.tuning["split"] == "validate"]
    assert sorted(t.loc[t["method"] == "group_dro", "value"].unique()) == ["eta=0.1", "eta=1"]
    assert sorted(t.loc[t["method"] == "jtt", "value"].unique()) == ["lam=10", "lam=3"]
    assert len(t[t["method"] == "dfr"]) == 4          # dfr_c_grid's 4 values, one seed
    ch = res.chosen_hp.set_index("method")
    for m in ("group_dro", "jtt", "dfr"):              # the chosen point is the best mean on validation
        means = t[t["method"] == m].groupby("value")["wga"].mean()
        assert means.loc[ch.loc[m, "setting"]] == means.max() == ch.loc[m, "val_wga"]
    row = res.arms.set_index("method").loc["jtt"]
    assert row["objective"].startswith("upsamples") and row["n_removed"] == 0


def test_dfr_never_fits_on_test_or_its_tuning_half(result):
    run, cfg, cohort, res = result
    va = training.task_rows(cohort, FINDING, "validate")
    p = res.predictions[res.predictions["method"] == "dfr"]
    tune_rows = set(p.loc[p["split"] == "validate", "row"])
    assert tune_rows < set(va[0])                     # DFR's validation predictions: the tuning half only
    from d3m_lib import objectives

    subj = cohort.set_index("row").loc[va[0], "subject_id"]
    fit, tune = objectives.dfr_halves(va[0], subj, objectives.stream(cfg.removal_seed, 0, "dfr"))
    assert set(va[0][tune]) == tune_rows and not (fit & tune).any() and (fit | tune).all()
    assert set(subj[fit]).isdisjoint(set(subj[tune]))  # halves split by patient
    assert set(p.loc[p["split"] == "test", "row"]) == set(training.task_rows(cohort, FINDING, "test")[0])
