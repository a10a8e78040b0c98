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
