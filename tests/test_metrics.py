"""metrics: hand-computed answers, undefined metrics, cluster-bootstrap intervals, paired differences,
the worst-group rule, thresholds, seeds."""

import numpy as np
import pandas as pd
import pytest

from d3m_lib.metrics import (GroupMetrics, choose_threshold, cluster_bootstrap_weights, gap, group_metrics,
                             metric_value, metric_values, pick_worst, seed_summary, threshold_curves,
                             worst_group)


def _val(df, group, metric, col="value"):
    return df[(df.group == group) & (df.metric == metric)][col].iloc[0]


@pytest.fixture
def tiny():
    #          group A: y 1 1 0 0, pred 1 0 0 1   group B: y 1 0 0, pred 1 0 0
    y = np.array([1, 1, 0, 0, 1, 0, 0])
    pred = np.array([1, 0, 0, 1, 1, 0, 0])
    prob = np.array([0.9, 0.4, 0.2, 0.6, 0.8, 0.3, 0.1])
    groups = np.array(["A"] * 4 + ["B"] * 3)
    return y, prob, pred, groups


def test_known_answers(tiny):
    df = group_metrics(*tiny, n_boot=0)
    assert list(df.columns) == ["group", "metric", "value", "lo", "hi", "n", "n_pos", "note"]
    assert _val(df, "A", "accuracy") == pytest.approx(0.5)
    assert _val(df, "A", "fpr") == pytest.approx(0.5)   # 1 of 2 negatives predicted positive
    assert _val(df, "A", "fnr") == pytest.approx(0.5)   # 1 of 2 positives missed
    assert _val(df, "A", "auroc") == pytest.approx(0.75)  # pairs: (.9>.2,.9>.6,.4>.2,.4<.6) = 3/4
    assert _val(df, "B", "accuracy") == pytest.approx(1.0)
    assert _val(df, "All", "accuracy") == pytest.approx(5 / 7)
    assert _val(df, "All", "accuracy", "n") == 7 and _val(df, "All", "accuracy", "n_pos") == 3
    assert worst_group(df, "accuracy") == ("A", 0.5)
    assert worst_group(df, "fpr") == ("A", 0.5)
    assert gap(df, "accuracy") == pytest.approx(0.5)


def test_one_class_group_gives_nan_auroc_with_note():
    y = np.array([1, 0, 1, 0, 1, 1])
    prob = np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.6])
    pred = (prob >= 0.5).astype(int)
    groups = np.array(["A"] * 4 + ["B"] * 2)
    df = group_metrics(y, prob, pred, groups, n_boot=50)
    row = df[(df.group == "B") & (df.metric == "auroc")].iloc[0]
    assert np.isnan(row.value) and np.isnan(row.lo) and row.note == "one class only"
    assert _val(df, "B", "fpr", "note") == "no negatives" and np.isnan(_val(df, "B", "fpr"))
    assert _val(df, "B", "accuracy") == 1.0
    small = group_metrics(y, prob, pred, groups, n_boot=0, min_n=3)
    assert np.isnan(_val(small, "B", "accuracy")) and _val(small, "B", "accuracy", "note").startswith("n < min_n")


def test_bootstrap_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(1)
    n = 400
    y = rng.integers(0, 2, n)
    prob = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
    pred = (prob >= 0.5).astype(int)
    groups = rng.choice(["A", "B", "C"], n)
    a = group_metrics(y, prob, pred, groups, n_boot=200, seed=3)
    b = group_metrics(y, prob, pred, groups, n_boot=200, seed=3)
    c = group_metrics(y, prob, pred, groups, n_boot=200, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["lo"], c["lo"])
    assert ((a["lo"] <= a["value"]) & (a["value"] <= a["hi"])).all()
    assert ((a["hi"] - a["lo"]) > 0).all()
    # the pooled row is narrower than a single group's interval
    w = (a["hi"] - a["lo"]).to_numpy().reshape(4, 4)  # 4 groups-or-All x 4 metrics
    assert (w[3] < w[:3].max(0)).all()


def test_bad_input():
    with pytest.raises(ValueError, match="length"):
        group_metrics([0, 1], [0.1, 0.2], [0, 1], ["A"])
    with pytest.raises(ValueError, match="NaN"):
        group_metrics([0, np.nan], [0.1, 0.2], [0, 1], ["A", "A"])


def test_threshold_rules_on_constructed_case():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    prob = np.array([0.05, 0.1, 0.2, 0.7, 0.3, 0.75, 0.8, 0.9])
    # Youden: at t=0.75 -> TPR 3/4, FPR 0 (J=.75); at t=0.3 -> TPR 1, FPR 1/4 (J=.75); ties -> higher t
    assert choose_threshold(y, prob, "youden") == pytest.approx(0.75)
    # accuracy: t=0.75 -> 7/8; t=0.3 -> 7/8; t=0.7 -> 6/8; ties -> higher t
    assert choose_threshold(y, prob, "max_accuracy") == pytest.approx(0.75)
    assert choose_threshold(y, prob, "fixed_0.5") == 0.5
    y2 = np.array([0, 0, 1, 1, 1])
    p2 = np.array([0.1, 0.6, 0.5, 0.7, 0.8])
    # t=0.5: J = 1 - 1/2 = .5; t=0.7: J = 2/3 - 0 = .667 -> 0.7
    assert choose_threshold(y2, p2, "youden") == pytest.approx(0.7)
    with pytest.raises(ValueError, match="threshold_rule"):
        choose_threshold(y, prob, "median")
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(np.ones(3), np.array([0.1, 0.2, 0.3]))


def test_seed_summary_is_deprecated_and_stays_in_range():
    df = pd.DataFrame({"seed": [0, 1, 2, 0, 1, 2], "group": ["A"] * 3 + ["B"] * 3,
                       "metric": "accuracy", "value": [0.9, 1.0, 1.0, 0.9, np.nan, 0.9],
                       "lo": [0.8, 0.9, 0.95, 0.7, np.nan, 0.8], "hi": [1.0, 1.0, 1.0, 1.0, np.nan, 0.95],
                       "n": 10, "n_pos": 3, "note": ""})
    with pytest.warns(FutureWarning, match="GroupMetrics"):
        s = seed_summary(df).set_index("group")
    assert s.loc["A", "mean"] == pytest.approx(2.9 / 3) and s.loc["A", "n_seeds"] == 3
    assert s.loc["A", "hi"] <= 1 and s.loc["A", "lo"] == 0.8
    assert s.loc["B", "n_seeds"] == 2 and s.loc["B", "sd"] == 0


# ---------------------------------------------------------------- the engine
def test_points_agree_with_sklearn_and_fairlearn():
    from fairlearn.metrics import false_negative_rate, false_positive_rate
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    prob = np.round(np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1), 2)  # rounded: ties in scores
    pred = (prob >= 0.5).astype(int)
    assert metric_value("accuracy", y, pred) == pytest.approx(accuracy_score(y, pred))
    assert metric_value("auroc", y, prob=prob) == pytest.approx(roc_auc_score(y, prob))
    assert metric_value("fpr", y, pred) == pytest.approx(false_positive_rate(y, pred))
    assert metric_value("fnr", y, pred) == pytest.approx(false_negative_rate(y, pred))
    assert metric_value("balanced_accuracy", y, pred) == pytest.approx(balanced_accuracy_score(y, pred))


def test_weights_equal_an_explicit_resample():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 40)
    prob = rng.random(40)
    pred = (prob >= 0.5).astype(int)
    idx = rng.integers(0, 40, 40)
    w = np.bincount(idx, minlength=40)[None, :]
    assert metric_values("auroc", y, pred, prob, w)[0] == pytest.approx(roc_auc_score(y[idx], prob[idx]))
    assert metric_values("accuracy", y, pred, prob, w)[0] == pytest.approx((pred[idx] == y[idx]).mean())


def _clustered(n_patients=10, per_patient=5, right_patients=6):
    """One group; every image of a patient is right or every one wrong (perfectly correlated)."""
    subj = np.repeat(np.arange(n_patients), per_patient)
    y = np.tile([1, 0, 1, 0, 1], n_patients)[: len(subj)]
    right = subj < right_patients
    pred = np.where(right, y, 1 - y)
    prob = np.where(pred == 1, 0.8, 0.2)
    return y, prob, pred, np.array(["A"] * len(y)), subj


def test_cluster_bootstrap_keeps_patients_whole_and_group_size_fixed():
    groups = np.array(["A"] * 6 + ["B"] * 4)
    subj = np.array([1, 1, 1, 2, 3, 3, 7, 7, 8, 9])
    w = cluster_bootstrap_weights(groups, subj, n_boot=300, random_state=1)
    for p in np.unique(subj):
        cols = w[:, subj == p]
        assert (cols == cols[:, :1]).all()  # a patient's images move together
    # each group draws as many patients as it has: 3 in A, 3 in B
    for g, pats in (("A", [1, 2, 3]), ("B", [7, 8, 9])):
        first = [np.flatnonzero((groups == g) & (subj == p))[0] for p in pats]
        assert (w[:, first].sum(1) == 3).all()


def test_cluster_interval_is_wider_than_image_interval():
    y, prob, pred, groups, subj = _clustered()
    by_patient = group_metrics(y, prob, pred, groups, n_boot=2000, seed=0, clusters=subj)
    by_image = group_metrics(y, prob, pred, groups, n_boot=2000, seed=0)
    wp = _val(by_patient, "A", "accuracy", "hi") - _val(by_patient, "A", "accuracy", "lo")
    wi = _val(by_image, "A", "accuracy", "hi") - _val(by_image, "A", "accuracy", "lo")
    assert _val(by_patient, "A", "accuracy") == _val(by_image, "A", "accuracy") == pytest.approx(0.6)
    # 10 independent patients vs 50 "independent" images: about sqrt(5) wider
    assert wp > 1.6 * wi


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    rng = np.random.default_rng(3)
    n = 80
    y = rng.integers(0, 2, n)
    prob = rng.random(n)
    pred = (prob >= 0.5).astype(int)
    groups = rng.choice(["A", "B"], n)
    subj = rng.integers(0, 30, n)
    df = pd.DataFrame({"y": y, "prob": prob, "pred": pred, "group": groups, "subject_id": subj,
                       "row": np.arange(n)})
    both = pd.concat([df.assign(method=m, seed=s) for m in ("erm", "copy") for s in (0, 1)])
    gm = GroupMetrics.from_frame(both, cluster="subject_id", model="method", seed="seed", n_boot=200)
    for a, b in (("erm", "erm"), ("erm", "copy")):
        d = gm.paired_difference_ci(a, b, "auroc")
        assert (d[["value", "lo", "hi"]].to_numpy() == 0).all()
        w = gm.paired_worst_ci(a, b)
        assert w["value"] == w["lo"] == w["hi"] == 0


def test_paired_difference_is_narrower_than_the_separate_intervals():
    rng = np.random.default_rng(4)
    n = 300
    y = rng.integers(0, 2, n)
    base = rng.normal(0, 1, n) + 0.5 * (2 * y - 1)
    better = base + 0.3 * (2 * y - 1)  # the same images, a little more separated
    rows = []
    for m, s in (("erm", base), ("d3m", better)):
        prob = 1 / (1 + np.exp(-s))
        rows.append(pd.DataFrame({"model": m, "row": np.arange(n), "y": y, "prob": prob,
                                  "pred": (prob >= 0.5).astype(int), "group": np.where(np.arange(n) % 3, "A", "B")}))
    gm = GroupMetrics.from_frame(pd.concat(rows), model="model", n_boot=500)
    d = gm.paired_difference_ci("d3m", "erm").set_index("group")
    sep = gm.by_group_ci("accuracy").set_index(["model", "group"])
    assert d.loc["A", "value"] > 0
    width = {m: sep.loc[(m, "A"), "hi"] - sep.loc[(m, "A"), "lo"] for m in ("erm", "d3m")}
    # the shared difficulty of a resample cancels: narrower than either model's own interval
    assert d.loc["A", "hi"] - d.loc["A", "lo"] < min(width.values())
    assert d.loc["A", "lo"] > 0  # the separate intervals overlap, the paired one excludes 0
    assert sep.loc[("d3m", "A"), "lo"] <= sep.loc[("erm", "A"), "hi"]


def test_worst_group_tie_goes_to_the_name_sorting_first():
    # B and A both have accuracy 0.5; C has 1.0. Order of appearance puts B first.
    y = np.array([1, 0, 1, 0, 1, 0])
    pred = np.array([1, 1, 1, 1, 1, 0])
    groups = np.array(["B", "B", "A", "A", "C", "C"])
    df = group_metrics(y, pred.astype(float), pred, groups, n_boot=0)
    assert worst_group(df, "accuracy") == ("A", 0.5)
    assert worst_group(df.iloc[::-1], "accuracy") == ("A", 0.5)
    assert pick_worst(["B", "A"], [0.5, 0.5 + 1e-15]) == ("A", 0.5 + 1e-15)  # equal to 12 decimals
    assert pick_worst(["B", "A", "C"], [0.2, 0.5, 0.2], "fpr") == ("A", 0.5)  # FPR: highest is worst
    gm = GroupMetrics(y, pred.astype(float), pred, groups, n_boot=50)
    assert gm.worst_ci().loc[0, "group"] == "A"


def test_min_group_n_is_the_one_worst_group_rule():
    y = np.array([1, 0, 1, 0, 1, 0, 1])
    pred = np.array([1, 0, 1, 0, 1, 0, 0])  # C: one image, wrong
    groups = np.array(["A", "A", "A", "B", "B", "B", "C"])
    gm = GroupMetrics(y, pred.astype(float), pred, groups, n_boot=20, min_group_n=2)
    w = gm.worst_ci()
    assert w.loc[0, "group"] == "A" and w.loc[0, "value"] == 1.0 and w.loc[0, "excluded_groups"] == "C"
    df = group_metrics(y, pred.astype(float), pred, groups, n_boot=0)
    assert worst_group(df, "accuracy") == ("C", 0.0)
    assert worst_group(df, "accuracy", min_group_n=2) == ("A", 1.0)


def test_intervals_stay_in_unit_interval_and_seeds_that_agree_still_have_width():
    # The old t-interval over seeds 0.9, 1.0, 1.0 reached above 1; seeds that agree had zero width.
    rng = np.random.default_rng(5)
    n = 60
    y = rng.integers(0, 2, n)
    groups = np.where(np.arange(n) < 30, "A", "B")
    frames = []
    for s in (0, 1, 2):
        pred = y.copy()
        if s == 0:
            pred[:3] = 1 - pred[:3]  # seed 0: 0.9 on A; seeds 1, 2: 1.0
        frames.append(pd.DataFrame({"y": y, "prob": pred * 0.6 + 0.2, "pred": pred, "group": groups,
                                    "seed": s, "row": np.arange(n)}))
    gm = GroupMetrics.from_frame(pd.concat(frames), seed="seed", n_boot=400)
    t = gm.table(["accuracy", "fpr", "fnr", "auroc", "balanced_accuracy"]).set_index(["group", "metric"])
    assert ((t["lo"] >= 0) & (t["hi"] <= 1)).all()
    assert t.loc[("A", "accuracy"), "value"] == pytest.approx((0.9 + 1 + 1) / 3)
    assert t.loc[("A", "accuracy"), "hi"] == 1.0 and t.loc[("A", "accuracy"), "lo"] < 0.9
    twins = pd.concat([frames[0].assign(seed=0), frames[0].assign(seed=1)])  # two seeds, same predictions
    a = GroupMetrics.from_frame(twins, seed="seed", n_boot=400).by_group_ci("accuracy").set_index("group")
    assert a.loc["A", "hi"] - a.loc["A", "lo"] > 0.1  # two identical seeds: test-set sampling remains


def test_recovery_share():
    rng = np.random.default_rng(6)
    n = 400
    y = rng.integers(0, 2, n)
    groups = np.where(np.arange(n) % 4 == 0, "small", "large")
    frames = []
    for m, flip in (("erm", 0.30), ("oracle", 0.05), ("half", 0.175), ("same", 0.30)):
        pred = y.copy()
        bad = (groups == "small") & (np.arange(n) < n * flip)  # errors only in the small group
        pred[bad] = 1 - pred[bad]
        frames.append(pd.DataFrame({"m": m, "y": y, "prob": 0.2 + 0.6 * pred, "pred": pred, "group": groups,
                                    "row": np.arange(n)}))
    gm = GroupMetrics.from_frame(pd.concat(frames), model="m", n_boot=300)
    r = gm.recovery_ci("oracle", "oracle", "erm")
    assert r["share"] == pytest.approx(1.0) and r["gain_lo"] > 0
    assert gm.recovery_ci("same", "oracle", "erm")["share"] == pytest.approx(0.0)
    half = gm.recovery_ci("half", "oracle", "erm")
    assert 0.2 < half["share"] < 0.8 and half["lo"] < half["share"] < half["hi"]
    none = gm.recovery_ci("half", "same", "erm")
    assert np.isnan(none["share"]) and "includes 0" in none["reason"]


def test_threshold_curves_match_group_metrics():
    rng = np.random.default_rng(7)
    n = 100
    y = rng.integers(0, 2, n)
    prob = rng.random(n)
    groups = rng.choice(["A", "B"], n)
    c = threshold_curves(y, prob, groups, [0.3, 0.6]).set_index(["threshold", "group"])
    gm = group_metrics(y, prob, (prob >= 0.6).astype(int), groups, n_boot=0, metrics=["accuracy", "fpr", "fnr"])
    for g in ("A", "B", "All"):
        for m in ("accuracy", "fpr", "fnr"):
            assert c.loc[(0.6, g), m] == pytest.approx(_val(gm, g, m))


def test_models_must_share_rows():
    df = pd.DataFrame({"y": [0, 1, 0, 1], "prob": [.1, .9, .2, .8], "pred": [0, 1, 0, 1],
                       "group": ["A", "A", "B", "B"], "m": ["x", "x", "z", "z"], "row": [0, 1, 0, 2]})
    with pytest.raises(ValueError, match="other images"):
        GroupMetrics.from_frame(df, model="m")
    with pytest.raises(ValueError, match="align"):
        GroupMetrics(df["y"], df["prob"], df["pred"], df["group"], model=df["m"])
