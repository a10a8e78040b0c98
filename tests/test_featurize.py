"""Factorized featurizer: equals exact per-example gradients under the same Kronecker projection."""

import math

import numpy as np
import pytest
import torch

from d3m_lib import attribution, models
from d3m_lib.featurize import FactorizedFeaturizer


def cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1, stride=2), torch.nn.BatchNorm2d(3), torch.nn.ReLU(inplace=True),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1))


def _perturb_bn(m):
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-.2, .2)
                mod.running_var.uniform_(.5, 1.5)
                mod.weight.uniform_(.5, 1.5)
                mod.bias.uniform_(-.2, .2)
    return m.eval()


def _exact_projected(fz, m, x, y):
    """Per-example gradients by one backward each, projected with the featurizer's matrices."""
    rows = []
    for i in range(len(x)):
        m.zero_grad()
        ((2 * y[i] - 1) * m(x[i:i + 1]).reshape(())).backward()
        parts = []
        for j, (b, (_, mod)) in enumerate(zip(fz.blocks, fz.layers)):
            if not b.dim:
                continue
            dw = mod.weight.grad.reshape(b.d_out, -1)
            po = fz._mat(("out", j), 2 * j + 1, (b.k_out, b.d_out), b.k_out == b.d_out, "cpu")
            pi = fz._mat(("in", j), 2 * j, (b.k_in, b.d_in), b.k_in == b.d_in, "cpu")
            po = torch.eye(b.d_out) if po is None else po
            pi = torch.eye(b.d_in) if pi is None else pi
            parts.append((po @ dw @ pi.T).reshape(-1) * fz._scale(b))
        v = torch.cat([getattr(mod, k).grad.reshape(-1) for _, mod, k in fz.vector_params])
        pv = fz._mat(("vec",), 1_000_000, (fz.k_vec, fz.d_vec), fz.k_vec == fz.d_vec, "cpu")
        parts.append((v if pv is None else pv @ v) * math.sqrt(fz.proj_dim / (1 if pv is None else fz.k_vec)))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("build,dim", [(cnn, 20), (lambda: models.build_model("resnet9", 1, width=2), 40),
                                       (lambda: models.build_model("resnet9", 1, width=2), 5)])
def test_features_equal_projected_exact_gradients(build, dim):
    torch.manual_seed(0)
    m = _perturb_bn(build())
    x, y = torch.rand(6, 1, 12, 12), torch.tensor([0, 1, 1, 0, 1, 0.])
    fz = FactorizedFeaturizer(m, proj_dim=dim, seed=3)
    plan = fz.plan(fz.energies(x, y))
    assert sum(k_o * k_i for _, k_o, k_i in plan["blocks"]) + plan["k_vec"] == dim
    f = fz.features(x, y)
    assert f.shape == (6, dim)
    np.testing.assert_allclose(f.numpy(), _exact_projected(fz, m, x, y).numpy(), rtol=1e-4, atol=1e-6)
    # in-place ReLU is restored; a plan restored from JSON gives the same features
    assert m[2].inplace if isinstance(m[2], torch.nn.ReLU) else True
    fz2 = FactorizedFeaturizer(m, proj_dim=dim, seed=3)
    fz2.set_plan(plan)
    np.testing.assert_allclose(fz2.features(x, y).numpy(), f.numpy(), rtol=1e-6)


def test_inner_products_are_unbiased_on_traker_scale():
    """E<f(g), f(h)> = p <g, h> as for traker's dense Gaussian projection (averaged over seeds)."""
    torch.manual_seed(1)
    m = _perturb_bn(cnn())
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1.0, 0.0])
    fz0 = FactorizedFeaturizer(m, proj_dim=12, seed=0)
    fz0.plan()
    m.zero_grad()
    g = []
    for i in range(2):
        m.zero_grad()
        ((2 * y[i] - 1) * m(x[i:i + 1]).reshape(())).backward()
        g.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    exact = float(g[0] @ g[1]) * 12
    est = []
    for seed in range(400):
        fz = FactorizedFeaturizer(m, proj_dim=12, seed=seed)
        fz.set_plan({**fz0.plan(), "seed": seed})
        f = fz.features(x, y)
        est.append(float(f[0] @ f[1]))
    assert np.mean(est) == pytest.approx(exact, rel=0.15)


def test_unsupported_modules_are_refused():
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.LayerNorm([2, 4, 4]), torch.nn.Flatten(),
                            torch.nn.Linear(32, 1))
    with pytest.raises(NotImplementedError, match="trak_featurizer='traker'"):
        FactorizedFeaturizer(m, proj_dim=8)
    with pytest.raises(ValueError, match="trak_featurizer"):
        attribution.TrakScorer(cnn, "unused", np.zeros((5, 4, 4), np.uint8), np.arange(5), None, {0: {}},
                               proj_dim=2, featurizer="exact")


def test_xtx_in_float64_at_mimic_scale(tmp_path):
    """300,000 training features: traker's fp16 store overflows X^T X; the adapter's does not."""
    n, p = 300_000, 4
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, p)).astype(np.float32)
    q = rng.uniform(0.1, 0.9, size=(n, 1)).astype(np.float32)
    targets = rng.normal(size=(3, p)).astype(np.float32)
    assert float((X.astype(np.float64) ** 2).sum(0).min()) > 65_504  # beyond float16
    model = torch.nn.Linear(p, 1, bias=False)

    def finalize(half):
        t = attribution.TRAKer(model=model, task=attribution.BinaryLogitOutput(), train_set_size=n,
                               save_dir=str(tmp_path / f"h{int(half)}"), device="cpu",
                               projector=attribution._PassThroughProjector(p, p, 0, "cpu"),
                               score_computer=None if half else attribution._Fp64ScoreComputer,
                               proj_dim=p, use_half_precision=half, logging_level=40)
        t.saver.register_model_id(0, False)
        t.saver.current_store["grads"][:] = X
        t.saver.current_store["out_to_loss"][:] = q
        t.saver.current_store["is_featurized"][:] = 1
        t.saver.serialize_current_model_id_metadata()
        with attribution._quiet_traker_bars():
            t.finalize_features(model_ids=[0])
        return np.array(t.saver.current_store["features"], dtype=np.float64)

    phi = finalize(half=False)
    xtx = X.astype(np.float64).T @ X.astype(np.float64)
    inv = np.linalg.inv(xtx)
    ref = X.astype(np.float64) @ (inv / np.abs(inv).mean())
    np.testing.assert_allclose(phi, ref, rtol=1e-5, atol=1e-9)
    scores = (phi @ targets.T.astype(np.float64)) * q
    ref_scores = (ref @ targets.T.astype(np.float64)) * q
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-6 * np.abs(ref_scores).max())
    half = finalize(half=True)  # traker's fp16 X^T X: inf, so NaN or zero features
    assert not np.isfinite(half).all() or np.allclose(half, 0)
