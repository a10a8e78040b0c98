"""Stage 03 on a tiny synthetic run: anchor + continued ERM, engine metrics, anchor-loss spread."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from d3m_lib import cohort as cohort_mod
from d3m_lib import config, image_cache, synthetic
from d3m_lib.rundir import RunDir, open_stage
from d3m_lib.stages import baseline

FINDING = "Cardiomegaly"
TINY = dict(synthetic_n_patients=150, synthetic_image_size=24, image_size=16, width=4, batch_size=32,
            seeds=[0, 1], epochs_anchor=2, epochs_more=1, findings=[FINDING], min_group_n=5, n_boot=20,
            cohort_min_group_n=5, trak_models=0, trak_checkpoints=[1, 2], trak_proj_dim=16, trak_batch_size=64,
            device="cpu")


def build_tiny_run(root: Path, **overrides) -> RunDir:
    """Stages 01 and 02 of a 150-patient synthetic cohort, written directly (no notebooks)."""
    cfg = config.resolve({**TINY, **overrides})
    data = root / "synthetic"
    synthetic.generate(data, n_jobs=1, progress=False, n_patients=cfg.synthetic_n_patients,
                       image_size=cfg.synthetic_image_size, seed=0)
    run = RunDir(root / "run")
    run.write_config(cfg)
    st = run.begin("01_cohort", cfg)
    res = cohort_mod.build_mimic_cohort(data / synthetic.CXR_DIR, data / synthetic.IV_DIR)
    report = image_cache.build_cache([data / synthetic.CXR_DIR / p for p in res.table["path"]],
                                     st.dir / "image_cache", cfg.image_size, workers=1, progress=False)
    res = cohort_mod.finalize(res, report, min_group_n=cfg.cohort_min_group_n)
    res.table.to_parquet(st.path("cohort.parquet"), index=False)
    st.finish({"data": {"dataset": "mimic", "synthetic": True}, "synthetic_dir": str(data)})  # as notebook 01
    st = run.begin("02_scan", cfg)
    st.path("chosen_findings.json").write_text(json.dumps([FINDING]))
    st.finish()
    return run


@pytest.fixture(scope="module")
def tiny_baseline(tmp_path_factory):
    run = build_tiny_run(tmp_path_factory.mktemp("tiny"))
    res = baseline.run(open_stage("03_baseline", run.path))
    return run, res


def test_baseline_tables_and_intervals(tiny_baseline):
    run, res = tiny_baseline
    assert run.manifest("03_baseline")["complete"]
    assert res.epochs == {"base": 2, "erm": 3}
    assert set(res.runs["seed"]) == {0, 1} and res.runs["threshold_erm"].between(0, 1).all()
    # learning curves: every epoch of both calls, per seed; the anchor ends annealed (lr 0)
    h = res.history
    assert sorted(h.loc[h["seed"] == 0, "epoch"]) == [1, 2, 3]
    assert (h.loc[h["epoch"] == 2, "lr"] == 0).all()
    # engine table: both models, every group and All, intervals inside [0, 1] and around the point
    t = res.test_metrics
    assert set(t["model"]) == {"base", "erm"} and "All" in set(t["group"])
    acc = t[(t["metric"] == "accuracy") & t["value"].notna()]
    assert acc["lo"].ge(0).all() and acc["hi"].le(1).all()
    assert (acc["lo"] <= acc["value"] + 1e-9).all() and (acc["value"] <= acc["hi"] + 1e-9).all()
    assert (acc["n_seeds"] == 2).all() and (acc["n_clusters"] <= acc["n"]).all()
    # one worst-group definition: the engine's, min_group_n from the configuration
    w = res.worst_group.set_index("model")
    for m in ("base", "erm"):
        row = t[(t["model"] == m) & (t["metric"] == "accuracy") & (t["group"] == w.loc[m, "group"])]
        assert row["n"].iloc[0] >= 5
    assert len(res.erm_vs_anchor) == 1 and -1 <= res.erm_vs_anchor["lo"].iloc[0] <= 1
    for name in ("test_metrics", "worst_group", "anchor_loss_spread", "history"):
        assert (run.stage_dir("03_baseline") / f"{name}.csv").exists()


def test_anchor_losses_are_the_d3m_group_losses_and_their_spread(tiny_baseline):
    run, res = tiny_baseline
    from d3m_lib import d3m

    pv = pd.read_parquet(run.model_dir("03_baseline", FINDING, 1) / "preds_validate_epoch02.parquet")
    gl = d3m.group_losses(pv["y"].to_numpy(), pv["logit"].to_numpy(), pv["group"].to_numpy())
    mine = res.anchor_losses[res.anchor_losses["seed"] == 1].set_index("group")["loss"]
    pd.testing.assert_series_equal(mine.sort_index(), gl.sort_index(), check_names=False)
    sp = res.anchor_loss_spread.set_index("group")
    g = gl.index[0]
    both = res.anchor_losses[res.anchor_losses["group"] == g]["loss"]
    assert sp.loc[g, "mean"] == pytest.approx(both.mean())
    assert sp.loc[g, "cv"] == pytest.approx(both.std(ddof=1) / both.mean())
    assert (sp["n_seeds"] == 2).all()


def test_anchor_loss_spread_on_a_hand_case():
    losses = pd.DataFrame({"finding": "F", "seed": [0, 1, 2, 0, 1, 2], "group": list("AAABBB"),
                           "loss": [1.0, 2.0, 3.0, 0.5, 0.5, 0.5]})
    sp = baseline.anchor_loss_spread(losses).set_index("group")
    assert sp.loc["A", "mean"] == 2.0 and sp.loc["A", "sd"] == pytest.approx(1.0)
    assert sp.loc["A", "cv"] == pytest.approx(0.5) and sp.loc["A", "max_over_min"] == 3.0
    assert sp.loc["B", "cv"] == 0.0
    one = baseline.anchor_loss_spread(losses[losses["seed"] == 0])
    assert one["sd"].isna().all() and np.isnan(one["cv"]).all()


def test_resume_reuses_models(tiny_baseline):
    run, _ = tiny_baseline
    ck = run.model_dir("03_baseline", FINDING, 0) / "epoch_03.pt"
    before = ck.stat().st_mtime_ns
    res = baseline.run(open_stage("03_baseline", run.path))
    assert ck.stat().st_mtime_ns == before
    assert set(res.runs["resumed"]) == {"anchor,more"}


def test_learning_curves_fit_with_many_seeds():
    """Twenty seeds (the powered study): one colour and two legend entries, and the layout fits."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from d3m_lib import plots

    hist = pd.DataFrame([dict(finding="Edema", seed=s, epoch=e, train_loss=1 / e, val_loss=1.1 / e, lr=0.1)
                         for s in range(20) for e in range(1, 6)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.learning_curves(hist, anchor_epoch=5)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["train, every seed", "validate, every seed"]
    few = plots.learning_curves(hist[hist["seed"] < 2], anchor_epoch=5)
    assert len(few.axes[0].get_legend().get_texts()) == 4
