"""Arms' training objectives (d3m_lib.objectives): known answers, and a planted toy where reweighting and
GroupDRO must lift a minority group that ERM ignores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from d3m_lib import methods, objectives


def _toy(n=2000, minority=0.05, seed=0):
    """Majority: feature 0 carries the label, feature 1 is noise. Minority: feature 0 carries the *opposite*
    label and feature 1 the label. A linear model that follows the majority fails the minority."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    g = (rng.random(n) < minority).astype(int)
    s = 2.0 * y - 1
    a = np.where(g == 0, s, -s) + 0.5 * rng.standard_normal(n)
    b = np.where(g == 0, 0.0, s) + 0.5 * rng.standard_normal(n)
    return np.c_[a, b].astype(np.float32), y.astype(np.float32), g


def _fit(X, y, plan: objectives.Plan, steps=400, lr=0.5, seed=0):
    """SGD on a linear model with objectives.batch_loss, batches of the plan's positions."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    pos_all = plan.positions()
    rng = np.random.default_rng(seed)
    dro = None if plan.dro_groups is None else objectives.GroupDRO(int(plan.dro_groups.max()) + 1, plan.dro_eta)
    for _ in range(steps):
        pos = pos_all[rng.integers(0, len(pos_all), 128)]
        w = None if plan.weights is None else torch.tensor(plan.weights[pos], dtype=torch.float32)
        gg = None if plan.dro_groups is None else torch.tensor(plan.dro_groups[pos])
        loss = objectives.batch_loss(model(torch.tensor(X[pos])), torch.tensor(y[pos]), weights=w, dro=dro, groups=gg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (model(torch.tensor(X)).reshape(-1).numpy() > 0).astype(int)


def _group_acc(pred, y, g, k):
    return float((pred[g == k] == y[g == k]).mean())


def test_reweighting_and_group_dro_lift_the_minority_that_erm_ignores():
    X, y, g = _toy()
    keep = np.ones(len(y), bool)
    erm = _fit(X, y, objectives.Plan(keep))
    rwg = _fit(X, y, objectives.Plan(keep, weights=objectives.inverse_cell_weights(g, y)))
    dro = _fit(X, y, objectives.Plan(keep, dro_groups=objectives.cells(g, y), dro_eta=1.0))
    assert _group_acc(erm, y, g, 1) < 0.4                      # ERM follows the majority's feature
    for pred in (rwg, dro):
        assert _group_acc(pred, y, g, 1) > _group_acc(erm, y, g, 1) + 0.4
        assert min(_group_acc(pred, y, g, k) for k in (0, 1)) > 0.7   # worst group: from ~0.3 to > 0.7


def test_group_dro_weights_follow_the_exponentiated_losses():
    dro = objectives.GroupDRO(2, eta=math.log(2))
    per = torch.tensor([1.0, 1.0, 0.0])        # group 0: loss 1 (two images), group 1: loss 0
    loss = dro(per, torch.tensor([0, 0, 1]))
    assert torch.allclose(dro.q, torch.tensor([2 / 3, 1 / 3]))
    assert float(loss) == pytest.approx(2 / 3)
    dro(torch.tensor([0.0]), torch.tensor([0]))   # an absent group keeps its weight relative to exp(0)
    assert torch.allclose(dro.q, torch.tensor([2 / 3, 1 / 3]))


def test_inverse_cell_weights_equalise_every_group_x_label_cell():
    g = np.array(["a"] * 6 + ["b"] * 2)
    y = np.array([0, 0, 0, 0, 1, 1, 0, 1])
    w = objectives.inverse_cell_weights(g, y)
    assert w.mean() == pytest.approx(1.0)
    cell_mass = {c: w[objectives.cells(g, y) == c].sum() for c in range(4)}
    assert np.allclose(list(cell_mass.values()), 2.0)    # each of 4 cells carries 1/4 of the loss


def test_plan_positions_repeat_and_remove():
    p = objectives.Plan(np.array([True, False, True]), repeats=np.array([1, 5, 3]))
    assert list(p.positions()) == [0, 2, 2, 2]
    assert objectives.Plan(np.array([True, True])).signature() != p.signature()
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        objectives.Plan(np.array([True]), repeats=np.array([0]))


def test_jtt_error_set_is_the_anchors_misclassified_images():
    ctx = methods.SelectionContext(np.arange(4), train_y=np.array([1, 0, 1, 0]),
                                   anchor_train_logit=np.array([2.0, 2.0, -2.0, -2.0]), anchor_threshold=0.5,
                                   hp={"lam": 7})
    assert list(methods.jtt_errors(ctx)) == [False, True, True, False]
    plan = methods.get("jtt").select(ctx)
    assert list(plan.repeats) == [1, 7, 7, 1] and plan.kept.all()


def test_dfr_halves_split_patients_deterministically():
    subj = np.repeat(np.arange(20), 3).astype(str)
    rows = np.arange(60)
    fit, tune = objectives.dfr_halves(rows, subj, (0, 1))
    fit2, _ = objectives.dfr_halves(rows, subj, (0, 1))
    assert np.array_equal(fit, fit2) and fit.sum() == 30 and not (fit & tune).any()
    assert set(subj[fit]).isdisjoint(subj[tune])


def test_last_layer_fit_separates_a_balanced_toy():
    X, y, g = _toy(n=600)
    w, b = objectives.fit_last_layer((X - X.mean(0)) / X.std(0), y, g, C=1.0, seed=0, n_subsamples=3)
    pred = ((((X - X.mean(0)) / X.std(0)) @ w + b) > 0).astype(int)
    assert min(_group_acc(pred, y, g, k) for k in (0, 1)) > 0.6     # balanced cells: both groups served
