"""metrics: hand-computed answers, undefined metrics, bootstrap intervals, thresholds, seeds."""

import numpy as np
import pandas as pd
import pytest

from d3m_lib.metrics import (choose_threshold, gap, group_metrics, seed_summary, worst_group)


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


def test_seed_summary_t_interval():
    df = pd.DataFrame({"seed": [0, 1, 2, 0, 1, 2], "group": ["A"] * 3 + ["B"] * 3,
                       "metric": "accuracy", "value": [0.6, 0.7, 0.8, 0.9, np.nan, 0.9],
                       "lo": 0.0, "hi": 1.0, "n": 10, "n_pos": 3, "note": ""})
    s = seed_summary(df).set_index("group")
    assert s.loc["A", "mean"] == pytest.approx(0.7)
    assert s.loc["A", "n_seeds"] == 3
    half = 4.302652729911275 * 0.1 / np.sqrt(3)  # t_{0.975, 2} * sd / sqrt(k)
    assert s.loc["A", "hi"] - 0.7 == pytest.approx(half)
    assert s.loc["B", "n_seeds"] == 2 and s.loc["B", "sd"] == 0
