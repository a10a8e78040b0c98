"""D3M alignment scores, selection rules and Auto-D3M on hand-computed cases."""

import math

import numpy as np
import pandas as pd
import pytest

from d3m_lib import d3m

TAU = pd.DataFrame({"a": [1.0, 0.5, -1.0], "b": [-2.0, 0.5, 1.0]}, index=[10, 11, 12])
LOSS = pd.Series({"a": 0.0, "b": math.log(3.0)})


def test_softmax_alignment_hand_computed():
    # weights exp(0) : exp(ln 3) = 1 : 3 -> 0.25, 0.75
    a = d3m.alignment_scores(TAU, LOSS, "softmax", beta=1.0)
    np.testing.assert_allclose(a.to_numpy(), [0.25 - 1.5, 0.125 + 0.375, -0.25 + 0.75])
    assert list(a.index) == [10, 11, 12]
    # beta = 2: 1 : 9 -> 0.1, 0.9
    a2 = d3m.alignment_scores(TAU, LOSS, "softmax", beta=2.0)
    np.testing.assert_allclose(a2.to_numpy(), [0.1 - 1.8, 0.5, -0.1 + 0.9])


def test_linear_alignment_hand_computed():
    a = d3m.alignment_scores(TAU, LOSS, "linear")
    l3 = math.log(3.0)
    np.testing.assert_allclose(a.to_numpy(), [-2 * l3 / 2, 0.5 * l3 / 2, l3 / 2])


def test_alignment_uses_group_names_not_order():
    a = d3m.alignment_scores(TAU, LOSS.iloc[::-1], "softmax")
    np.testing.assert_allclose(a.to_numpy(), [-1.25, 0.5, 0.5])
    with pytest.raises(KeyError, match="no validation loss"):
        d3m.alignment_scores(TAU, LOSS.drop("b"))
    with pytest.raises(ValueError, match="d3m_weighting"):
        d3m.alignment_scores(TAU, LOSS, "cubic")


def test_group_losses_is_bce_per_group():
    y = [1, 0, 1, 1]
    logits = [0.0, 0.0, 2.0, -1.0]
    gl = d3m.group_losses(y, logits, ["x", "x", "y", "y"])
    np.testing.assert_allclose(gl["x"], math.log(2))
    np.testing.assert_allclose(gl["y"], (math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2)
    with pytest.raises(ValueError, match="0/1"):
        d3m.group_losses([0.5], [0.0], ["x"])


def test_selection_rules():
    s = pd.Series([-1.0, 0.0, 2.0, -0.5, 1.0], index=[5, 6, 7, 8, 9])
    neg = d3m.select(s, "negative")
    assert neg.tolist() == [False, True, True, False, True]
    k2 = d3m.select(s, "k_lowest", k=2)
    assert k2.tolist() == [False, True, True, False, True]
    k3 = d3m.select(s, "k_lowest", k=3)
    assert k3.tolist() == [False, False, True, False, True]
    assert d3m.select(s, "k_lowest", k=0).all()
    with pytest.raises(ValueError, match="d3m_k"):
        d3m.select(s, "k_lowest")
    with pytest.raises(ValueError, match="d3m_selection"):
        d3m.select(s, "top")


def test_auto_d3m_recovers_planted_split():
    rng = np.random.default_rng(0)
    n_train, n_val = 200, 60
    u = rng.normal(size=n_train)
    truth = np.repeat([0, 1], n_val // 2)
    S = np.where(truth[None, :] == 0, u[:, None], -u[:, None]) + 0.3 * rng.normal(size=(n_train, n_val))
    y = rng.integers(0, 2, n_val)
    logits = np.where(truth == 0, 3.0, -3.0) * (2 * y - 1)  # pseudo-group of truth 1 has high loss
    for method in ("pca", "kmeans"):
        res = d3m.auto_d3m(S, np.arange(100, 100 + n_train), y, logits, method=method)
        same = (res.pseudo_groups == "pseudo_1") == (truth == 1)
        assert same.all() or (~same).all()
        assert len(res.kept) == n_train and res.tau.shape == (n_train, 2)
    # the high-loss pseudo-group dominates: images that help it (u < 0 -> +score) are kept
    res = d3m.auto_d3m(S, np.arange(n_train), y, logits, beta=5.0)
    assert res.kept.to_numpy()[u < -0.5].mean() > 0.9
    assert (~res.kept.to_numpy()[u > 0.5]).mean() > 0.9
    with pytest.raises(ValueError, match="shape"):
        d3m.auto_d3m(S[:, :10], np.arange(n_train), y, logits)


def test_paper_auto_d3m_per_class_finds_a_split_other_than_the_label():
    """Scores S = M G^T; within each class a hidden attribute (not the label) splits G."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(3)
    n_train, kdim, n_val = 500, 12, 80
    M = rng.normal(size=(n_train, kdim))
    y = np.tile([0, 1], n_val // 2)
    hidden = rng.permutation(np.repeat([0, 1], n_val // 2))  # independent of y
    a = {0: rng.normal(size=kdim), 1: rng.normal(size=kdim)}
    b = rng.normal(size=kdim)
    G = np.stack([a[c] + (2 * h - 1) * 1.5 * b for c, h in zip(y, hidden)]) + 0.3 * rng.normal(size=(n_val, kdim))
    logits = np.where(hidden == 1, -2.0, 2.0) * (2 * y - 1)  # hidden == 1 is the high-loss half
    res = d3m.auto_d3m_per_class(M, G, np.arange(n_train), y, logits)
    assert sorted(set(res.pseudo_groups)) == ["y0_a", "y0_b", "y1_a", "y1_b"]
    for c in (0, 1):
        part = res.pseudo_groups[y == c] == f"y{c}_a"
        same = part == (hidden[y == c] == 1)
        assert same.all() or (~same).all()
    # the same split as the paper's recipe on the explicit n_train x n_val score matrix
    S = M @ G.T
    for c in (0, 1):
        vecs = S[:, y == c].T
        proj = PCA(n_components=1).fit_transform(vecs / np.linalg.norm(vecs, axis=1, keepdims=True))[:, 0]
        ours = res.pseudo_groups[y == c] == f"y{c}_a"
        assert (ours == (proj > 0)).all() or (ours == (proj < 0)).all()
    # tau is the group mean of S's columns; streamed blocks give the same result
    for g in res.tau.columns:
        np.testing.assert_allclose(res.tau[g], S[:, res.pseudo_groups == g].mean(axis=1), rtol=1e-10)

    def blocks():
        for s in range(0, n_train, 64):
            yield s, M[s:s + 64]
    res2 = d3m.auto_d3m_per_class(blocks, G, np.arange(n_train), y, logits)
    assert (res2.pseudo_groups == res.pseudo_groups).all()
    np.testing.assert_allclose(res2.scores, res.scores)
    # the high-loss hidden half is up-weighted: images that help it (M b > 0) are kept more
    helps = M @ b > 0
    assert res.kept.to_numpy()[helps].mean() > res.kept.to_numpy()[~helps].mean()
    with pytest.raises(ValueError, match="rows"):
        d3m.auto_d3m_per_class(M, G[:5], np.arange(n_train), y, logits)


def test_race_x_label_tau_from_factors_equals_the_mean_score_of_each_group():
    from d3m_lib.d3m import d3m_groups, group_tau, group_weights, weighting_table

    rng = np.random.default_rng(1)
    M, G = rng.normal(size=(40, 6)), rng.normal(size=(30, 6))
    race = rng.choice(["A", "B"], 30)
    y = rng.integers(0, 2, 30).astype(float)
    g = d3m_groups(race, y, "race_x_label")
    assert set(g) == {"A | y=0", "A | y=1", "B | y=0", "B | y=1"}
    tau = group_tau(lambda: iter([(0, M[:25]), (25, M[25:])]), G, g, np.arange(40))
    S = M @ G.T
    for name in tau.columns:
        assert np.allclose(tau[name], S[:, g == name].mean(axis=1))
    loss = pd.Series([0.2, 0.9, 0.3, 0.4], index=tau.columns)
    w = group_weights(loss, "softmax", 20.0)
    assert w.idxmax() == "A | y=1" and w.max() > 0.99          # a high beta aims at one race's positives
    ref = np.ones(40, bool)
    ref[:5] = False
    t = weighting_table(tau, loss, 5, ref, planted=np.arange(40) < 5)
    assert t["k"].eq(5).all() and len(t) == 5 and t["precision"].between(0, 1).all()
