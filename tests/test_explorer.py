"""explorer.py: widgets build without a frontend; the threshold slider updates metrics exactly."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from d3m_lib import explorer  # noqa: E402
from d3m_lib.analysis import OVERALL  # noqa: E402
from d3m_lib.privacy import Policy  # noqa: E402


def _preds():
    """Group A: y = 1,1,0,0 with prob .9,.4,.6,.1; group B: y = 1,0 with prob .7,.3."""
    return pd.DataFrame({
        "finding": "F", "method": "erm", "seed": 0, "split": "test", "row": np.arange(6),
        "group": ["A", "A", "A", "A", "B", "B"], "y": [1, 1, 0, 0, 1, 0],
        "logit": 0.0, "prob": [0.9, 0.4, 0.6, 0.1, 0.7, 0.3], "threshold": 0.5,
        "pred": [1, 0, 1, 0, 1, 0]})


def test_threshold_metrics_known_values():
    p = _preds()
    m = explorer.threshold_metrics(p["y"], p["prob"], p["group"], 0.5).set_index("group")
    assert m.loc["A", "accuracy"] == 0.5 and m.loc["A", "fpr"] == 0.5 and m.loc["A", "fnr"] == 0.5
    assert m.loc["B", "accuracy"] == 1.0 and m.loc[OVERALL, "accuracy"] == pytest.approx(4 / 6)
    m = explorer.threshold_metrics(p["y"], p["prob"], p["group"], 0.35).set_index("group")
    assert m.loc["A", "accuracy"] == 0.75 and m.loc["A", "fnr"] == 0.0 and m.loc["A", "fpr"] == 0.5
    assert m.loc["A", "n"] == 4


def test_curves_agree_with_fairlearn_metricframe():
    from fairlearn.metrics import MetricFrame, false_negative_rate, false_positive_rate
    from sklearn.metrics import accuracy_score

    rng = np.random.default_rng(1)
    y, prob, g = rng.integers(0, 2, 200), rng.random(200), rng.choice(["a", "b"], 200)
    c = explorer.threshold_curves(y, prob, g, [0.3, 0.62])
    for t in (0.3, 0.62):
        mf = MetricFrame(metrics={"accuracy": accuracy_score, "fpr": false_positive_rate,
                                  "fnr": false_negative_rate}, y_true=y, y_pred=(prob >= t).astype(int),
                         sensitive_features=pd.Series(g, name="group"))
        got = c[c["threshold"] == t].set_index("group")
        for col in ("accuracy", "fpr", "fnr"):
            np.testing.assert_allclose(got.loc[["a", "b"], col], mf.by_group[col].loc[["a", "b"]])
            assert got.loc[OVERALL, col] == pytest.approx(mf.overall[col])


class _FakeScorer:
    train_rows = np.array([10, 11, 12, 13])

    def scores(self, rows):
        return np.array([[0.5], [-2.0], [1.5], [0.0]]) * (1 + np.arange(len(rows)))[None, :]


def test_widgets_build_and_slider_updates_metrics():
    ex = explorer.Explorer(_preds(), Policy(True), scorer_for=lambda f, s: _FakeScorer(), n_top=2)
    assert ex.finding.value == "F" and ex.method.value == "erm" and ex.seed.value == 0
    assert ex.threshold.value == 0.5
    assert ex.metrics.set_index("group").loc["A", "accuracy"] == 0.5
    ex.threshold.value = 0.35
    m = ex.metrics.set_index("group")
    assert m.loc["A", "accuracy"] == 0.75 and m.loc["A", "fnr"] == 0.0
    assert "0.750" in ex.metrics_html.value
    # misclassified targets of group A at 0.35: row 2 (y=0, p=.6) only
    ex.group.value = "A"
    assert [v for _, v in ex.target.options] == [2]
    inf = ex.influential(2)
    assert list(inf["positive"][0]) == [12, 10] and list(inf["negative"][0]) == [11, 13]


def test_show_static_returns_figure_and_interactive_returns_widget():
    import ipywidgets
    import matplotlib.figure

    fig = explorer.show(_preds(), Policy(True), "F", "erm", interactive=False)
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 3
    w = explorer.show(_preds(), Policy(True), "F", "erm", interactive=True)
    assert isinstance(w, ipywidgets.VBox)
    with pytest.raises(KeyError, match="no predictions"):
        explorer.show(_preds(), Policy(True), "G", "erm")


class _SeedScorer:
    """Scores that differ by seed: seed 0 favours row 10, seed 1 favours row 13."""

    def __init__(self, seed):
        self.seed, self.train_rows = seed, np.array([10, 11, 12, 13])

    def scores(self, rows):
        s = np.array([3.0, 0.0, -1.0, 1.0]) if self.seed == 0 else np.array([0.0, 1.0, -1.0, 3.0])
        return s[:, None].repeat(len(rows), 1)


def _two_seeds():
    p0 = _preds()
    p1 = _preds().assign(seed=1, prob=[0.9, 0.6, 0.4, 0.1, 0.3, 0.3])  # seed 1: group B is worst
    return pd.concat([p0, p1], ignore_index=True)


def test_explorer_opens_on_worst_group_and_seed_selects_its_scores():
    calls = []

    def scorer_for(finding, seed):
        calls.append((finding, seed))
        return _SeedScorer(seed)

    ex = explorer.Explorer(_two_seeds(), Policy(True), scorer_for=scorer_for, n_top=1,
                           images=np.zeros((20, 8, 8), np.uint8),
                           cohort=pd.DataFrame({"row": np.arange(20), "group": "A", "F": 1.0}))
    assert ex.seed.value == 0 and ex.group.value == ex.worst_group() == "A"
    assert ex.influential(2)["positive"][0].tolist() == [10]
    ex.seed.value = 1
    assert ex.group.value == "B" and [v for _, v in ex.target.options] == [4]
    assert ex.influential(4)["positive"][0].tolist() == [13]
    ex.influential(4)
    assert calls == [("F", 0), ("F", 1)]  # one scorer per seed, then cached
    fig = ex.influence_figure(4)
    assert len(fig.axes) == 2 * 2 and "seed 1" in fig._suptitle.get_text()
    assert explorer.figure_png(fig).startswith(b"\x89PNG")


def test_explorer_draws_without_pyplot_and_is_still_outside_a_frontend():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig = explorer.influence_grid(np.zeros((8, 8), np.uint8), "t", {"most helpful": [(np.ones((8, 8)), "a")]})
    assert plt.get_fignums() == before and fig.canvas is not None
    assert explorer.live_frontend() is False  # no kernel here
    assert not isinstance(explorer.show(_preds(), Policy(True), "F", "erm"), __import__("ipywidgets").Widget)
