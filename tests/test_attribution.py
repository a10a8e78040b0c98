"""TRAK wrapper: multi-checkpoint scoring, group means, self-influence, resume, LDS."""

import numpy as np
import pandas as pd
import pytest
import torch

from d3m_lib import attribution
from d3m_lib.attribution import TrakScorer

PX = 6


def cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1))


def linear():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(PX * PX, 1))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (80, PX, PX), dtype=np.uint8)
    labels = pd.Series(rng.integers(0, 2, 80).astype(float), index=np.arange(80))
    torch.manual_seed(0)
    ckpts = {}
    for mid in (1, 2):
        m = cnn()
        with torch.no_grad():  # make BatchNorm buffers non-trivial too
            m[1].running_mean.uniform_(-0.2, 0.2)
        ckpts[mid] = m.state_dict()
    return images, labels, ckpts


def scorer(tmp_path, name, data, ids, **kw):
    images, labels, ckpts = data
    return TrakScorer(cnn, tmp_path / name, images, np.arange(50), labels,
                      {i: ckpts[i] for i in ids}, proj_dim=16, **kw)


@pytest.mark.parametrize("featurizer", attribution.FEATURIZERS)
def test_each_checkpoint_scores_its_own_targets(tmp_path, data, featurizer):
    targets = np.arange(50, 80)
    both = scorer(tmp_path, "ab", data, (1, 2), featurizer=featurizer)
    s_ab = both.scores(targets)
    one = {i: scorer(tmp_path, f"s{i}", data, (i,), featurizer=featurizer) for i in (1, 2)}
    s = {i: one[i].scores(targets) for i in (1, 2)}
    q = {i: one[i].out_to_loss(i)[:, None] for i in (1, 2)}
    # traker: mean_c(Phi_c g_c^T) * mean_c(Q_c); single-checkpoint runs give Phi_c g_c^T Q_c
    expected = (s[1] / q[1] + s[2] / q[2]) / 2 * (q[1] + q[2]) / 2
    np.testing.assert_allclose(s_ab, expected, rtol=1e-4, atol=1e-9)
    # scoring every checkpoint against the last checkpoint's targets gives something else
    sv = both.traker.saver
    sv.load_current_store(1)
    phi1 = np.array(sv.current_store["features"])
    sv.load_current_store(2, "targets", len(targets))
    g2 = np.array(sv.current_store["targets_grads"])
    last_only = (phi1 @ g2.T + s[2] / q[2]) / 2 * (q[1] + q[2]) / 2
    assert not np.allclose(s_ab, last_only, rtol=1e-2, atol=0)


def test_group_mean_equals_mean_of_per_image_scores(tmp_path, data):
    targets = np.arange(50, 80)
    groups = np.array(["Black", "White", "Asian"])[np.arange(30) % 3]
    sc = scorer(tmp_path, "g", data, (1, 2))
    per_image = sc.scores(targets, exp_name="per_image")
    tau = sc.group_scores(targets, groups)
    assert list(tau.columns) == ["Asian", "Black", "White"]
    assert list(tau.index) == list(range(50))
    for g in tau.columns:
        np.testing.assert_allclose(tau[g].to_numpy(), per_image[:, groups == g].mean(axis=1),
                                   rtol=1e-4, atol=1e-9)
    # the per-image target gradients stay stored for later scoring
    np.testing.assert_allclose(sc.experiment_scores("validate", 30), per_image, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("featurizer", attribution.FEATURIZERS)
def test_resume_reuses_features(tmp_path, data, featurizer):
    a = scorer(tmp_path, "r", data, (1, 2), featurizer=featurizer)
    s1 = a.scores(np.arange(50, 55))
    b = scorer(tmp_path, "r", data, (1, 2), featurizer=featurizer)
    assert all(b.traker.saver.model_ids[i]["is_finalized"] == 1 for i in (1, 2))
    np.testing.assert_allclose(b.scores(np.arange(50, 55)), s1, rtol=1e-5)
    # a folder holds one featurizer's features: traker refuses the other projection type
    other = [f for f in attribution.FEATURIZERS if f != featurizer][0]
    with pytest.raises(AssertionError, match="JL matrix"):
        scorer(tmp_path, "r", data, (1, 2), featurizer=other)


def test_interrupted_featurizing_resumes_to_the_same_features(tmp_path, data):
    """Kill after one batch of checkpoint 1; a new scorer finishes with identical features."""
    full = scorer(tmp_path, "full", data, (1, 2), batch_size=16)
    full.featurize()
    part = scorer(tmp_path, "part", data, (1, 2), batch_size=16)
    part.plan_for(1)
    part.traker.load_checkpoint(part._use_checkpoint(1), model_id=1)
    inds, batch = next(part._batches(part.train_rows))
    part.traker.featurize(batch=batch, inds=inds)
    again = scorer(tmp_path, "part", data, (1, 2), batch_size=16)
    assert again.traker.saver.model_ids[1]["is_featurized"] == 0
    again.featurize()
    for m in (1, 2):
        np.testing.assert_allclose(again.features(m), full.features(m), rtol=1e-6, atol=1e-9)


def test_self_influence_ranks_distinctive_point_first(tmp_path):
    rng = np.random.default_rng(1)
    n = 60
    images = np.zeros((n, PX, PX), dtype=np.uint8)
    y = rng.integers(0, 2, n)
    images[:, 0, :] = np.where(y[:, None] == 1, 200, 20)   # the label cue
    images[:, 1:, :] = rng.integers(0, 40, (n, PX - 1, PX))
    images[7, 4, 4] = 255                                   # one distinctive training image
    images[7, 0, :] = 20 if y[7] == 1 else 200              # ... that contradicts the cue
    labels = pd.Series(y.astype(float))
    torch.manual_seed(0)
    m = linear()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 255
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(
            m(x).reshape(-1), torch.as_tensor(y, dtype=torch.float32)).backward()
        opt.step()
    sc = TrakScorer(linear, tmp_path / "self", images, np.arange(n), labels,
                    {0: m.state_dict()}, proj_dim=30, lambda_reg=1e-3)
    r = attribution.self_influence_rank(sc, [7, 3, 11])
    assert r.loc[r.row == 7, "rank"].item() == 1
    assert list(r.columns) == ["row", "self_score", "rank", "percentile"]


def test_bad_parameters(tmp_path, data):
    images, labels, ckpts = data
    with pytest.raises(ValueError, match="trak_proj_dim"):
        TrakScorer(cnn, tmp_path / "x", images, np.arange(10), labels, ckpts, proj_dim=16)
    with pytest.raises(ValueError, match="at least one checkpoint"):
        TrakScorer(cnn, tmp_path / "y", images, np.arange(50), labels, {}, proj_dim=16)
    bad = labels.copy()
    bad[60] = np.nan
    sc = TrakScorer(cnn, tmp_path / "z", images, np.arange(50), bad, {1: ckpts[1]}, proj_dim=16)
    with pytest.raises(ValueError, match="0/1"):
        sc.scores([60])


def test_lds_known_answers():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(40, 5))
    exact = attribution.lds(true, lambda mask: mask @ true, n_models=12, seed=1, n_boot=200)
    assert exact["lds"] == pytest.approx(1.0)
    noise = attribution.lds(rng.normal(size=(40, 5)), lambda mask: mask @ true, n_models=12,
                            seed=1, n_boot=200)
    assert noise["lds"] < 0.6 and noise["lo"] <= noise["lds"] <= noise["hi"]


def test_load_scorer_round_trip(tmp_path):
    """Notebook 04's layout: baseline_scorer writes, load_scorer re-opens without refeaturizing."""
    import json

    from d3m_lib import image_cache, models
    from d3m_lib.training import TrainConfig

    px, n = 8, 40
    rng = np.random.default_rng(2)
    cohort = pd.DataFrame({"row": np.arange(n), "split": ["train"] * 30 + ["validate"] * 10,
                           "group": rng.choice(["A", "B"], n), "Edema": rng.integers(0, 2, n).astype(float)})
    cohort.loc[3, "Edema"] = np.nan  # not in the task
    (tmp_path / "01_cohort").mkdir()
    cohort.to_parquet(tmp_path / "01_cohort" / "cohort.parquet")
    f = image_cache.cache_files(tmp_path / "01_cohort" / "image_cache", px)
    f["images"].parent.mkdir(parents=True)
    mm = np.memmap(f["images"], dtype=np.uint8, mode="w+", shape=(n, px, px))
    mm[:] = rng.integers(0, 256, (n, px, px), dtype=np.uint8)
    mm.flush()
    np.save(f["done"], np.ones(n, bool))
    f["meta"].write_text(json.dumps({"n": n, "image_size": px, "complete": True, "paths_sha256": ""}))
    cfg = TrainConfig(arch="resnet9", width=2, image_size=px)
    ck = tmp_path / "03_baseline" / "Edema" / "seed0"
    ck.mkdir(parents=True)
    torch.manual_seed(0)
    for e in (1, 2):
        torch.save(models.build_model("resnet9", 1, width=2).state_dict(), ck / f"epoch_{e:02d}.pt")
    images = image_cache.open_cache(tmp_path / "01_cohort" / "image_cache", px)
    sc = attribution.baseline_scorer(tmp_path, "Edema", 0, cohort, images, cfg, [1, 2], proj_dim=8,
                                     lambda_reg=0.0, batch_size=16, projector_seed=0)
    assert len(sc.train_rows) == 29 and 3 not in sc.train_rows
    sc.featurize()
    s = sc.scores([30, 31, 35])
    s4 = sc.scores([30, 31, 35, 36], exp_name="four")
    tau = sc.group_scores([30, 31, 35, 36], ["A", "B", "A", "B"])
    trak_dir = tmp_path / "04_trak" / "Edema" / "seed0"

    def snapshot():
        return {str(p.relative_to(trak_dir)): (p.stat().st_mtime_ns, p.read_bytes())
                for p in sorted(trak_dir.rglob("*")) if p.is_file()}

    before = snapshot()
    again = attribution.load_scorer(trak_dir, scratch_dir=tmp_path / "scratch")
    assert again.read_only and all(again.is_finalized(i) for i in (1, 2))
    np.testing.assert_allclose(again.scores([30, 31, 35]), s, rtol=1e-4)
    np.testing.assert_allclose(again.group_scores([30, 31, 35, 36], ["A", "B", "A", "B"]).to_numpy(),
                               tau.to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(again.experiment_scores("validate", 4), s4, rtol=1e-4)
    blocks, G = again.score_factors("validate", block_rows=7)  # S = M G^T for Auto-D3M
    M = np.concatenate([b for _, b in blocks()])
    np.testing.assert_allclose(M @ G.T, s4, rtol=1e-4, atol=1e-12)
    assert snapshot() == before  # load_scorer and its scoring wrote nothing into 04_trak
    with pytest.raises(FileNotFoundError, match="trak_checkpoints"):
        attribution.baseline_scorer(tmp_path, "Edema", 0, cohort, images, cfg, [3], proj_dim=8,
                                    lambda_reg=0.0, batch_size=16, projector_seed=0)


def test_an_ensemble_of_identical_models_equals_one_model(tmp_path, data):
    images, labels, ckpts = data
    targets = np.arange(50, 80)
    one = TrakScorer(cnn, tmp_path / "one", images, np.arange(50), labels, {1: ckpts[1]}, proj_dim=16)
    same = {m * attribution.ENSEMBLE_ID + 1: ckpts[1] for m in range(3)}
    three = TrakScorer(cnn, tmp_path / "three", images, np.arange(50), labels, same, proj_dim=16)
    np.testing.assert_allclose(three.scores(targets), one.scores(targets), rtol=1e-5, atol=1e-10)


def test_ensemble_subsets_and_seeds_are_deterministic_given_trak_seed():
    a = attribution.ensemble_subsets(100, 4, 0.5, trak_seed=0, seed=3)
    assert a.shape == (4, 100) and (a.sum(axis=1) == 50).all()
    assert np.array_equal(a, attribution.ensemble_subsets(100, 4, 0.5, trak_seed=0, seed=3))
    assert not np.array_equal(a, attribution.ensemble_subsets(100, 4, 0.5, trak_seed=1, seed=3))
    assert not np.array_equal(a, attribution.ensemble_subsets(100, 4, 0.5, trak_seed=0, seed=4))
    assert not np.array_equal(a[0], a[1])                                   # each model its own subset
    # the first models of a larger ensemble are the smaller ensemble (M can grow without redrawing)
    assert np.array_equal(attribution.ensemble_subsets(100, 8, 0.5, 0, 3)[:4], a)
    seeds = {attribution.ensemble_seed(0, 3, m) for m in range(4)}
    assert len(seeds) == 4 and attribution.ensemble_seed(0, 3, 0) == attribution.ensemble_seed(0, 3, 0)
    assert not np.array_equal(a, attribution.lds_subsets(100, 4, 0.5, 0))   # LDS draws its own subsets


def test_the_attribution_page_table_is_the_committed_benchmark_record():
    import json
    from pathlib import Path

    book = Path(__file__).resolve().parents[1] / "book" / "attribution"
    record = json.loads((book / "trak_ensemble.json").read_text())
    for part in ("stability", "harm"):
        shown = pd.read_csv(book / f"trak_ensemble_{part}.csv", dtype=str, keep_default_na=False)
        expected = attribution.ensemble_quality_table(record, part).astype(str)
        pd.testing.assert_frame_equal(shown, expected, check_dtype=False)
    assert [r["variant"] for r in record["rows"]] == ["anchor", "M=1", "M=2", "M=4", "M=8", "M=16"]
