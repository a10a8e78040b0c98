"""Per-group metrics with bootstrap intervals, decision thresholds, worst group, gaps.

Point estimates come from fairlearn's ``MetricFrame`` (one row per group plus
``All``). Intervals come from a **stratified percentile bootstrap**: the images
of each group are resampled with replacement within that group (``n_boot``
times), and the ``All`` row resamples every group within itself and pools
them, so group sizes stay fixed. fairlearn 0.15's own ``n_boot`` resamples
the pooled data instead, so a small group's size varies between resamples and
it can lose all its positives; that is why it is not used here. An interval is
the ``(1 - ci_level) / 2`` and ``(1 + ci_level) / 2`` quantiles over the
resamples in which the metric is defined (AUROC needs both classes).

Metrics: ``accuracy`` (of ``pred``), ``auroc`` (of ``prob``), ``fpr`` = FP / negatives,
``fnr`` = FN / positives. A metric that is undefined for a group is NaN with a
``note`` ("one class only", "no negatives", "no positives", "n < min_n"), never a
made-up number.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from scipy import stats
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

METRICS = ("accuracy", "auroc", "fpr", "fnr")
THRESHOLD_RULES = ("youden", "max_accuracy", "fixed_0.5")
ALL = "All"
LOWER_IS_BETTER = {"fpr", "fnr"}


# ---------------------------------------------------------------- thresholds
def choose_threshold(y, prob, rule: str = "youden") -> float:
    """Decision threshold on predicted probabilities; predict positive when ``prob >= t``.

    Rules (applied to one split, normally ``validate``, over all groups
    together -- never per group, which would use the group at test time):

    - ``youden``: maximise Youden's J = TPR - FPR (sensitivity + specificity - 1)
      over the ROC curve's thresholds; ties go to the highest threshold.
    - ``max_accuracy``: maximise accuracy over the observed probabilities;
      ties go to the highest threshold.
    - ``fixed_0.5``: 0.5.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"parameter `threshold_rule` must be one of {THRESHOLD_RULES}, got {rule!r}")
    if rule == "fixed_0.5":
        return 0.5
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, dtype=float)
    if len(np.unique(y)) < 2:
        raise ValueError(f"threshold rule {rule!r} needs both classes in y; got only {np.unique(y)}")
    if rule == "youden":
        fpr, tpr, thr = roc_curve(y, prob)
        finite = np.isfinite(thr)
        j = np.where(finite, tpr - fpr, -np.inf)
        return float(thr[int(np.argmax(j))])  # roc_curve orders thresholds high -> low
    cand = np.unique(prob)[::-1]
    acc = [(np.equal(prob >= t, y == 1)).mean() for t in cand]
    return float(cand[int(np.argmax(acc))])


# ---------------------------------------------------------------- metric functions
def _acc(y, pred) -> float:
    return float(np.mean(np.asarray(y) == np.asarray(pred))) if len(y) else np.nan


def _fpr(y, pred) -> float:
    y, pred = np.asarray(y), np.asarray(pred)
    neg = y == 0
    return float(np.mean(pred[neg] == 1)) if neg.any() else np.nan


def _fnr(y, pred) -> float:
    y, pred = np.asarray(y), np.asarray(pred)
    pos = y == 1
    return float(np.mean(pred[pos] == 0)) if pos.any() else np.nan


def _auroc(y, prob) -> float:
    y = np.asarray(y)
    return float(roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else np.nan


def _boot_stats(y: np.ndarray, prob: np.ndarray, pred: np.ndarray, idx: np.ndarray) -> dict:
    """Every metric on each resample; ``idx`` is (n_boot, n) positions. Vectorised."""
    yb, pb, db = y[idx], prob[idx], pred[idx]
    pos = yb == 1
    n_pos = pos.sum(1)
    n_neg = idx.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (yb == db).mean(1)
        fpr = np.where(n_neg > 0, ((db == 1) & ~pos).sum(1) / n_neg, np.nan)
        fnr = np.where(n_pos > 0, ((db == 0) & pos).sum(1) / n_pos, np.nan)
        ranks = rankdata(pb, axis=1)  # Mann-Whitney U with average ranks for ties
        u = (ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2
        auc = np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)
    return {"accuracy": acc, "auroc": auc, "fpr": fpr, "fnr": fnr}


def _note(metric: str, n: int, n_pos: int, min_n: int) -> str:
    if n < min_n:
        return f"n < min_n ({n} < {min_n})"
    if metric == "auroc" and (n_pos == 0 or n_pos == n):
        return "one class only"
    if metric == "fpr" and n_pos == n:
        return "no negatives"
    if metric == "fnr" and n_pos == 0:
        return "no positives"
    return ""


def group_metrics(y, prob, pred, groups, n_boot: int = 200, ci_level: float = 0.95, seed: int = 0,
                  min_n: int = 1, metrics=METRICS) -> pd.DataFrame:
    """Per-group accuracy, AUROC, FPR, FNR with bootstrap intervals (module docstring).

    y: 0/1 labels; prob: predicted probabilities (AUROC); pred: 0/1 decisions
    (``prob >= threshold``; accuracy, FPR, FNR); groups: group of each image.
    Groups with fewer than ``min_n`` images get NaN for every metric. ``n_boot=0``
    gives no intervals (lo, hi NaN).

    Returns a long table: group, metric, value, lo, hi, n, n_pos, note; groups
    in sorted order, then ``All``. Deterministic given ``seed``.
    """
    y = np.asarray(y).astype(float)
    prob = np.asarray(prob, dtype=float)
    pred = np.asarray(pred).astype(float)
    groups = np.asarray(groups).astype(str)
    if not (len(y) == len(prob) == len(pred) == len(groups)):
        raise ValueError(f"y, prob, pred, groups differ in length: {len(y)}, {len(prob)}, "
                         f"{len(pred)}, {len(groups)}")
    if len(y) == 0:
        raise ValueError("group_metrics got no images")
    if np.isnan(y).any() or not np.isin(y, (0, 1)).all():
        raise ValueError("y must be 0/1 without NaN (leave out images whose label is missing)")
    if not np.isin(pred, (0, 1)).all():
        raise ValueError("pred must be 0/1 decisions (prob >= threshold)")
    if np.isnan(prob).any():
        raise ValueError(f"prob has {int(np.isnan(prob).sum())} NaN values")
    if ALL in set(groups):
        raise ValueError(f"a group may not be named {ALL!r} (reserved for the overall row)")
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; available: {METRICS}")
    if not 0 < ci_level < 1:
        raise ValueError(f"parameter `ci_level` must lie in (0, 1), got {ci_level}")

    # point estimates: fairlearn MetricFrame, by group and overall
    mf_pred = MetricFrame(metrics={"accuracy": _acc, "fpr": _fpr, "fnr": _fnr},
                          y_true=y, y_pred=pred, sensitive_features=pd.Series(groups, name="group"))
    mf_prob = MetricFrame(metrics={"auroc": _auroc}, y_true=y, y_pred=prob,
                          sensitive_features=pd.Series(groups, name="group"))
    by_group = pd.concat([mf_pred.by_group, mf_prob.by_group], axis=1)
    overall = pd.concat([mf_pred.overall, mf_prob.overall])

    names = sorted(np.unique(groups))
    members = {g: np.flatnonzero(groups == g) for g in names}
    members[ALL] = np.arange(len(y))

    # bootstrap: resample positions within each group
    lo_q, hi_q = (1 - ci_level) / 2, (1 + ci_level) / 2
    boot = {}
    if n_boot and n_boot > 0:
        rngs = dict(zip(names, (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(names)))))
        draws = {g: members[g][rngs[g].integers(0, len(members[g]), size=(n_boot, len(members[g])))]
                 for g in names}
        for g in names:
            boot[g] = _boot_stats(y, prob, pred, draws[g])
        boot[ALL] = _boot_stats(y, prob, pred, np.concatenate([draws[g] for g in names], axis=1))

    records = []
    for g in names + [ALL]:
        idx = members[g]
        n, n_pos = len(idx), int(y[idx].sum())
        for metric in metrics:
            note = _note(metric, n, n_pos, min_n)
            value = overall[metric] if g == ALL else by_group.loc[g, metric]
            lo = hi = np.nan
            if note.startswith("n < min_n"):
                value = np.nan
            elif np.isfinite(value) and g in boot:
                b = boot[g][metric]
                b = b[np.isfinite(b)]
                if len(b):
                    lo, hi = np.quantile(b, [lo_q, hi_q])
            records.append({"group": g, "metric": metric, "value": float(value), "lo": float(lo),
                            "hi": float(hi), "n": n, "n_pos": n_pos, "note": note})
    return pd.DataFrame.from_records(records)


# ---------------------------------------------------------------- summaries
def _groups_only(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    if metric not in set(df["metric"]):
        raise KeyError(f"metric {metric!r} not in table (has {sorted(set(df['metric']))})")
    sub = df[(df["metric"] == metric) & (df["group"] != ALL)]
    return sub[np.isfinite(sub["value"].astype(float))]


def worst_group(df: pd.DataFrame, metric: str = "accuracy") -> tuple[str, float]:
    """The group with the worst value of ``metric`` (lowest accuracy/AUROC, highest FPR/FNR).

    Groups whose value is NaN are not candidates; ``All`` never is.
    """
    sub = _groups_only(df, metric)
    if sub.empty:
        return ("", float("nan"))
    i = sub["value"].idxmax() if metric in LOWER_IS_BETTER else sub["value"].idxmin()
    return (str(sub.loc[i, "group"]), float(sub.loc[i, "value"]))


def best_group(df: pd.DataFrame, metric: str = "accuracy") -> tuple[str, float]:
    """The group with the best value of ``metric``; mirror of :func:`worst_group`."""
    sub = _groups_only(df, metric)
    if sub.empty:
        return ("", float("nan"))
    i = sub["value"].idxmin() if metric in LOWER_IS_BETTER else sub["value"].idxmax()
    return (str(sub.loc[i, "group"]), float(sub.loc[i, "value"]))


def gap(df: pd.DataFrame, metric: str = "accuracy") -> float:
    """Best minus worst group value of ``metric``, as a non-negative number (max - min over groups)."""
    sub = _groups_only(df, metric)
    return float(sub["value"].max() - sub["value"].min()) if len(sub) >= 2 else float("nan")


_PER_RUN = ("seed", "value", "lo", "hi", "n", "n_pos", "note")


def seed_summary(df: pd.DataFrame, ci_level: float = 0.95) -> pd.DataFrame:
    """Mean across seeds with a Student-t interval, for every other key column combination.

    ``df`` is a stack of :func:`group_metrics` tables with a ``seed`` column
    (and any further key columns such as ``finding``, ``method``, ``split``).
    Returns the keys plus mean, sd, lo, hi, n_seeds, n (mean images per seed).
    NaN values (undefined metrics) are left out of the seed count; with one
    seed the interval is NaN.
    """
    if "seed" not in df.columns:
        raise KeyError("seed_summary needs a 'seed' column")
    keys = [c for c in df.columns if c not in _PER_RUN]
    rows = []
    for key, sub in df.groupby(keys, sort=False, dropna=False):
        v = sub["value"].astype(float).to_numpy()
        v = v[np.isfinite(v)]
        k = len(v)
        mean = float(v.mean()) if k else np.nan
        sd = float(v.std(ddof=1)) if k > 1 else np.nan
        half = stats.t.ppf((1 + ci_level) / 2, k - 1) * sd / np.sqrt(k) if k > 1 else np.nan
        rec = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        rec.update(mean=mean, sd=sd, lo=mean - half, hi=mean + half, n_seeds=k,
                   n=float(sub["n"].mean()) if "n" in sub else np.nan)
        rows.append(rec)
    return pd.DataFrame(rows)
