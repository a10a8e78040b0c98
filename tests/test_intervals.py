"""The interval of a mean over seeds: the two-level bootstrap (d3m_lib.metrics), Holm, power and the verdict."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from d3m_lib import conclusions, config, metrics, power


def _noiseless(values, n_per=30):
    """One group, every image of a seed right (1) or wrong (0): patient resampling cannot move a seed's
    accuracy, so only the seeds vary."""
    recs = []
    for s, v in enumerate(values):
        for i in range(n_per):
            recs.append(dict(model="m", seed=s, row=i, y=1, prob=0.9, pred=int(v), group="A", cluster=f"p{i}"))
    return pd.DataFrame(recs)


def _engine(df, n_boot=2000, random_state=0, **kw):
    return metrics.GroupMetrics.from_frame(df, cluster="cluster", model="model", seed="seed", draw="draw",
                                           n_boot=n_boot, random_state=random_state, **kw)


def _realistic(n_seeds=3, rng_seed=0, draws=1):
    """Two arms on a test set with a 45-patient and a 200-patient group, 2 images per patient."""
    rng = np.random.default_rng(rng_seed)
    groups = np.r_[np.repeat("B", 90), np.repeat("W", 400)]
    cluster = np.r_[np.repeat(np.arange(45), 2), 100 + np.repeat(np.arange(200), 2)].astype(str)
    y = rng.integers(0, 2, len(groups))
    recs = []
    for arm, acc in (("erm", 0.75), ("d3m", 0.80)):
        for s in range(n_seeds):
            for d in range(draws):
                correct = rng.random(len(groups)) < acc + rng.normal(0, 0.03)
                pred = np.where(correct, y, 1 - y)
                recs.append(pd.DataFrame(dict(model=arm, seed=s, draw=d, row=np.arange(len(groups)), y=y,
                                              prob=pred * 0.8 + 0.1, pred=pred, group=groups, cluster=cluster)))
    return pd.concat(recs, ignore_index=True)


def test_seeds_that_agree_give_the_plain_patient_bootstrap():
    df = _realistic(n_seeds=1)
    one = _engine(df).paired_worst_ci("d3m", "erm")
    three = _engine(pd.concat([df.assign(seed=s) for s in range(3)], ignore_index=True)).paired_worst_ci("d3m", "erm")
    assert (one["value"], one["lo"], one["hi"]) == pytest.approx((three["value"], three["lo"], three["hi"]))


def test_noiseless_test_set_gives_the_t_interval_of_the_seed_mean():
    """Only the seeds vary (every patient resample leaves each seed's value): the interval is the t
    interval of the mean, width 2 t_{S-1} s / sqrt(S), so it narrows about as 1/sqrt(S)."""
    rng = np.random.default_rng(0)
    widths = {}
    for S in (4, 16, 64):
        pts = rng.normal(0.5, 0.1, S)
        ci = metrics.seed_mean_interval(np.repeat(pts[:, None], 4001, axis=1), 0.95)
        widths[S] = ci["hi"] - ci["lo"]
        t = stats.ttest_1samp(pts, 0.5).confidence_interval(0.95)
        assert widths[S] == pytest.approx(t.high - t.low, rel=0.12)
        assert ci["df"] == pytest.approx(S - 1)
    assert widths[16] / widths[64] == pytest.approx(2.0, rel=0.25)


def test_pooled_rule_would_not_narrow_but_the_mean_rule_does():
    vals = [1, 0] * 5
    t = _engine(_noiseless(vals), n_boot=2000).by_group_ci("accuracy")
    # pooled seeds x resamples would give [0, 1] (one seed's spread); the mean of 10 seeds is far narrower
    assert t["lo"].iloc[0] > 0.1 and t["hi"].iloc[0] < 0.9


def test_agrees_with_independent_implementations():
    """The two-level replicates against scipy's bootstrap (the t interval: the noiseless test above)."""
    rng = np.random.default_rng(3)
    vals = (rng.random(12) < 0.7).astype(int)
    arr = _engine(_noiseless(vals), n_boot=8000)._stack("m", "accuracy")[:, 0, :]
    raw = np.quantile(metrics.seed_mean_replicates(arr), [0.025, 0.975])
    ref = stats.bootstrap((vals.astype(float),), np.mean, n_resamples=8000, method="percentile",
                          confidence_level=0.95, random_state=1).confidence_interval
    assert raw == pytest.approx([ref.low, ref.high], abs=0.05)
    t = _engine(_noiseless(vals), n_boot=8000).by_group_ci("accuracy")
    assert t["value"].iloc[0] == pytest.approx(vals.mean())
    assert t["lo"].iloc[0] < raw[0] and (t["hi"].iloc[0] > raw[1] or t["hi"].iloc[0] == 1.0)   # widened


def _null_claim_rate(S, widen=True, studies=400, n_boot=2000, s_b=0.07, s_w=0.02):
    """Share of simulated null studies (true difference 0) whose interval excludes 0."""
    rng = np.random.default_rng(S)
    claims = 0
    for _ in range(studies):
        pts = rng.normal(0, s_b, S) + rng.normal(0, s_w)            # one shared test set
        arr = np.c_[pts, pts[:, None] + rng.normal(0, s_w, n_boot)[None, :]]   # same patient draw for all seeds
        if widen:
            ci = metrics.seed_mean_interval(arr, 0.95, (-1, 1))
            lo, hi = ci["lo"], ci["hi"]
        else:
            lo, hi = np.quantile(metrics.seed_mean_replicates(arr), [0.025, 0.975])
        claims += (lo > 0) or (hi < 0)
    return claims / studies


def test_few_seeds_keep_the_nominal_false_claim_rate():
    """With 3 seeds the plain two-level percentile interval claims a null difference far above 5% of the
    time; the t-calibrated interval stays near 5%."""
    assert _null_claim_rate(3, widen=False) > 0.10
    assert _null_claim_rate(3) < 0.085
    assert _null_claim_rate(10) < 0.085


def test_p_value_and_interval_agree():
    rng = np.random.default_rng(1)
    for shift in (0.0, 0.02, 0.05, 0.1):
        pts = rng.normal(shift, 0.05, 5)
        arr = np.c_[pts, pts[:, None] + rng.normal(0, 0.01, 4000)[None, :]]
        ci = metrics.seed_mean_interval(arr, 0.95, (-1, 1))
        assert ci["k"] > 1 and np.isfinite(ci["df"])
        excludes = ci["lo"] > 0 or ci["hi"] < 0
        assert excludes == (ci["p"] < 0.05) or abs(ci["p"] - 0.05) < 0.01


def test_default_n_boot_keeps_bounds_within_0005_across_stats_seeds():
    n_boot = config.BY_NAME["n_boot"].default
    df = _realistic(n_seeds=3)
    los, his = [], []
    for rs in range(5):
        d = _engine(df, n_boot=n_boot, random_state=rs).paired_worst_ci("d3m", "erm")
        los.append(d["lo"])
        his.append(d["hi"])
    assert max(los) - min(los) < 0.005 and max(his) - min(his) < 0.005


def test_draws_of_a_control_are_averaged_within_seed():
    df = _realistic(n_seeds=2, draws=3)
    eng = _engine(df, n_boot=50)
    by = eng.by_group("accuracy", models=["d3m"])
    for g in ("B", "W"):
        expect = np.mean([[((d["pred"] == d["y"]) & (d["group"] == g)).sum() / (d["group"] == g).sum()
                           for _, d in df[(df.model == "d3m") & (df.seed == s)].groupby("draw")]
                          for s in (0, 1)])
        assert by.loc[by["group"] == g, "value"].iloc[0] == pytest.approx(expect)
    assert eng.draws("d3m", 0) == [0, 1, 2]


def test_recovery_share_uses_the_same_replicates_as_its_gate():
    df = _realistic(n_seeds=4)
    oracle = df[df.model == "d3m"].assign(model="oracle", pred=lambda d: d["y"])
    eng = _engine(pd.concat([df, oracle], ignore_index=True), n_boot=500)
    r = eng.recovery_ci("d3m", "oracle", "erm")
    g = eng.paired_worst_ci("oracle", "erm")
    assert (r["gain_lo"], r["gain_hi"]) == pytest.approx((g["lo"], g["hi"]))
    assert r["lo"] <= r["share"] <= r["hi"]


def test_holm_known_answer():
    assert metrics.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = metrics.holm([0.5, np.nan])
    assert out[0] == pytest.approx(0.5) and np.isnan(out[1])


def test_bootstrap_p():
    assert metrics.bootstrap_p(np.r_[np.ones(95), -np.ones(5)]) == pytest.approx(0.10)
    assert metrics.bootstrap_p(np.ones(10)) == 0.0


@pytest.mark.parametrize("lo,hi,expect", [(0.01, 0.2, "supported"), (-0.2, -0.01, "contradicted"),
                                          (-0.03, 0.04, "smaller than delta"), (-0.1, 0.2, "inconclusive")])
def test_verdict(lo, hi, expect):
    assert conclusions.verdict(lo, hi, 0.05) == expect
    s = conclusions.verdict_sentence("d3m", "random", "Edema", (lo + hi) / 2, lo, hi, 0.05, 0.12, 10)
    assert s.split(":")[0].lower().startswith(expect.replace(" delta", ""))
    assert "Edema" in s and "10 seeds" in s


def test_one_seed_is_never_a_verdict():
    assert conclusions.verdict(0.1, 0.3, 0.05, n_seeds=1) == "inconclusive"
    s = conclusions.verdict_sentence("d3m", "random", "Edema", 0.2, 0.1, 0.3, 0.05, float("nan"), 1)
    assert s.startswith("Inconclusive with one seed") and "between training seeds" in s
    assert conclusions.verdict(0.1, 0.3, 0.05, n_seeds=2) == "supported"


def test_power_known_answer():
    S, B = 10, 4000
    rng = np.random.default_rng(0)
    per_seed = rng.normal(0.02, 0.08, S)
    test_noise = rng.normal(0, 0.03, B)
    d = np.column_stack([per_seed, per_seed[:, None] + test_noise[None, :]])

    class Eng:  # the interface power.from_engine reads
        n_boot = B
        eligible = ["B"]
        groups = ["B"]
        counts = pd.DataFrame({"n_clusters": [45, 400]}, index=["B", "All"])

        def paired_worst(self, a, b, metric):
            return list(range(S)), d

    p = power.from_engine(Eng(), "d3m", "random", "Edema")
    assert p.s_b == pytest.approx(np.std(per_seed, ddof=1))
    assert p.s_w == pytest.approx(0.03, rel=0.05)
    v = p.s_b ** 2 / S + p.s_w ** 2
    df = v ** 2 / ((p.s_b ** 2 / S) ** 2 / (S - 1))   # Welch–Satterthwaite: only s_b is estimated
    assert df > S - 1
    q = stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)
    assert p.mde == pytest.approx(q * np.sqrt(v))
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert p.mde > z * np.sqrt(v)   # few seeds cost more than the normal formula says
    need = p.seeds_needed(0.05, 4)
    assert need is not None and p.mde_at(need, 4) <= 0.05 < p.mde_at(need - 1, 4)
    assert p.seeds_needed(0.05 * p.s_w / 1.0, 1) is None  # test sampling alone exceeds it
    plan = p.plan(0.05)
    assert list(plan["test_factor"]) == [1, 2, 4, 8]
    assert "minimum detectable effect" in p.text(0.05)


def test_one_seed_interval_holds_its_point_even_for_a_downward_biased_statistic():
    from d3m_lib import metrics

    rng = np.random.default_rng(0)
    arr = np.concatenate([[0.6], 0.45 + 0.04 * rng.standard_normal(2000)])[None, :]   # replicates all below
    ci = metrics.seed_mean_interval(arr, 0.95)
    assert ci["k"] == 1.0 and ci["lo"] < 0.5 and ci["hi"] == pytest.approx(0.6)
