"""methods: the registry's order and hooks, count matching, the oracle's refusal off synthetic data."""

import numpy as np
import pandas as pd
import pytest

from d3m_lib import methods, plots
from d3m_lib.methods import SelectionContext


def test_order_and_labels_come_from_the_registry():
    assert methods.order()[:3] == ("erm", "base", "d3m")
    assert plots.METHOD_ORDER == methods.order()
    assert methods.order(["zzz", "random", "erm"]) == ("erm", "random", "zzz")
    assert methods.label("auto_d3m") == "Auto-D3M" and methods.label("zzz") == "zzz"
    assert "base" not in methods.selectable() and "erm" not in methods.selectable()
    assert methods.run_order(["random", "d3m", "auto_random", "auto_d3m"]) == ["d3m", "auto_d3m", "random",
                                                                              "auto_random"]
    t = methods.describe()
    assert list(t["method"]) == list(methods.order())
    assert t.set_index("method").loc["balanced", "training_group_labels"]
    with pytest.raises(KeyError, match="did you mean 'random'"):
        methods.get("randon")


def test_hooks_return_kept_masks():
    rows = np.arange(100, 120)
    ctx = SelectionContext(rows, train_groups=np.array(["A"] * 15 + ["B"] * 5), seed=3,
                           d3m_kept=pd.Series(np.arange(20) >= 4, index=rows))
    assert methods.get("erm").select(ctx).all()
    d = methods.get("d3m").select(ctx)
    ctx.n_removed["d3m"] = int((~d).sum())
    r = methods.get("random").select(ctx)
    assert r.dtype == bool and (~r).sum() == 4
    assert (methods.get("balanced").select(ctx)).sum() == 10
    with pytest.raises(ValueError, match="select 'auto_d3m' first"):
        methods.get("auto_random").select(ctx)
    assert methods.get("base").select is None


def test_count_matched_controls_draw_independent_streams():
    """random and auto_random at the same count and seed remove different images, each reproducibly."""
    rows = np.arange(1000)
    ctx = SelectionContext(rows, seed=5, d3m_kept=pd.Series(rows >= 100, index=rows))
    ctx.n_removed.update(d3m=100, auto_d3m=100)
    r, a = methods.get("random").select(ctx), methods.get("auto_random").select(ctx)
    assert (~r).sum() == (~a).sum() == 100
    assert (r != a).sum() > 100                  # overlap of two independent draws: about 10 images
    assert (methods.get("random").select(ctx) == r).all()


def test_oracle_removes_planted_images_and_refuses_real_data():
    ids = np.array([f"img{i}" for i in range(6)])
    ctx = SelectionContext(np.arange(6), train_image_ids=ids, planted_ids={"img1", "img4", "elsewhere"})
    assert list(methods.get("oracle").select(ctx)) == [True, False, True, True, False, True]
    for dataset in ("mimic", "nih"):
        real = SelectionContext(np.arange(6), train_image_ids=ids, planted_ids=None, dataset=dataset)
        with pytest.raises(ValueError, match="only in synthetic data"):
            methods.get("oracle").select(real)
        assert any("synthetic" in e for e in methods.validate(["d3m", "oracle"], dataset, False))
    no_gt = SelectionContext(np.arange(6), train_image_ids=ids, planted_ids=None)
    with pytest.raises(ValueError, match="ground-truth file"):
        methods.get("oracle").select(no_gt)


def test_validate_names_count_sources():
    assert methods.validate(["d3m", "random", "balanced"]) == []
    errs = methods.validate(["random", "base", "d3n"])
    assert any("not selectable" in e for e in errs) and any("needs 'd3m'" in e for e in errs)
