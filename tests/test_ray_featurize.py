"""Featurizing sharded over 2 local Ray workers equals a single-process run (to 1e-6)."""

import functools

import numpy as np
import pandas as pd
import pytest
import torch

from d3m_lib import attribution, models
from d3m_lib.ray_featurize import shard_bounds

ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install 'd3m-lib[ray]')")

PX = 8


# workers import the model builder by name: a function of this test module would not import there
cnn = functools.partial(models.build_model, "resnet9", 1, width=1)


def test_shard_bounds_cut_at_batches():
    assert shard_bounds(100, 2, 16) == [(0, 64), (64, 100)]
    assert shard_bounds(10, 4, 16) == [(0, 10)]
    b = shard_bounds(1000, 3, 7)
    assert b[0][0] == 0 and b[-1][1] == 1000 and all(s % 7 == 0 for s, _ in b)


@pytest.mark.parametrize("featurizer", attribution.FEATURIZERS)
def test_two_workers_equal_single_process(tmp_path, featurizer):
    from d3m_lib.ray_featurize import featurize_on_ray

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (120, PX, PX), dtype=np.uint8)
    labels = pd.Series(rng.integers(0, 2, 120).astype(float))
    torch.manual_seed(0)
    ckpts = {1: cnn().state_dict(), 2: cnn().state_dict()}

    def make(name):
        return attribution.TrakScorer(cnn, tmp_path / name, images, np.arange(100), labels, ckpts,
                                      proj_dim=24, batch_size=16, featurizer=featurizer)
    single = make("single")
    single.featurize()
    sharded = make("ray")
    try:
        featurize_on_ray(sharded, workers=2)
    finally:
        ray.shutdown()
    for m in (1, 2):
        np.testing.assert_allclose(sharded.features(m), single.features(m), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(sharded.out_to_loss(m), single.out_to_loss(m), rtol=1e-6, atol=1e-7)
    t = np.arange(100, 120)
    np.testing.assert_allclose(sharded.scores(t), single.scores(t), rtol=1e-6, atol=1e-6)
