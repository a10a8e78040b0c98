"""Per-group metrics: one engine, one surface, patient-level intervals, paired differences.

Every per-group number of the study (the scan, training's validation record,
the baseline, the method comparison, the explorer's threshold curves) comes
from this module. There is one implementation of each metric,
:func:`metric_values`, which scores a model under a matrix of resampling
weights; the point estimate is the same function with weights 1. Points agree
with scikit-learn (``accuracy_score``, ``roc_auc_score``, ``balanced_accuracy_score``)
and fairlearn (``false_positive_rate``, ``false_negative_rate``); the tests check it.

Metrics
-------
``accuracy`` (of ``pred``), ``auroc`` (of ``prob``; Mann-Whitney with ties
counted one half), ``fpr`` = FP / negatives, ``fnr`` = FN / positives,
``balanced_accuracy`` = (TPR + TNR) / 2. A metric that is undefined for a
group (AUROC or balanced accuracy with one class, FPR without negatives, FNR
without positives) is NaN with a ``note``, never a made-up number.

Intervals: patient-level cluster bootstrap within group
--------------------------------------------------------
MIMIC-CXR has several, correlated images per patient, so resampling images
treats them as independent and makes intervals too narrow. Each of the
``n_boot`` resamples draws, **inside each group**, as many patients as the
group has, with replacement; every image of a drawn patient comes along
(an image's weight is the number of times its patient was drawn). A group
therefore keeps its number of patients (its number of images varies a
little), and the images of one patient move together. The cluster is the
pair (group, patient): a patient whose images fall in two groups (possible for
NIH age bands) is resampled separately in each. ``All`` uses the same draws
of every group together (stratified). Without patient ids every image is its
own patient, which is the image bootstrap. Group draws are seeded by
``(random_state, group name)``, so adding a group does not change the others'.

An interval is the percentile interval (``(1 - ci_level) / 2`` and
``(1 + ci_level) / 2`` quantiles) of the replicates in which the metric is
defined. Metrics lie in [0, 1] and differences in [-1, 1], so percentile
intervals cannot leave them (they are clipped as a guard).

Several seeds: one rule for every quantity
------------------------------------------
Every model (model/method, seed) is evaluated on the **same** patient resamples. For a
quantity ``q`` (a group's metric, the worst group's metric, a gap, a paired
difference, the share of the oracle's gain):

* point = mean over the S seeds of ``q`` on the full evaluation set;
* interval = a **two-level bootstrap of that mean** (:func:`seed_mean_replicates`):
  replicate ``b`` draws S seeds with replacement and, independently, patients
  within each group (resample ``b`` of the shared weights, the same draw for every
  arm and seed, so arms stay paired); it averages ``q`` over the drawn seeds. The
  seed draw of replicate ``b`` is the same for every quantity with the same seeds.

The interval therefore holds the between-seed spread of the mean (``s_b^2 / S``)
and the test-set sampling (``s_w^2``): it narrows as seeds are added and as the
test set grows. With one seed, or seeds that agree exactly, it is the plain
cluster bootstrap. With few seeds the percentile interval is too narrow (the
bootstrap sees only S values and uses normal quantiles: at S = 3 a nominal 95%
interval excludes a null difference ~16% of the time), so its half-widths are
scaled to the Student-t width with Welch–Satterthwaite degrees of freedom
(:func:`seed_mean_interval`, :func:`small_sample_scale`): the t interval of the
mean when seeds dominate, the bootstrap's own shape otherwise, unchanged at one
seed. (The percentile interval of the *pooled* seeds x resamples,
used before, is the spread of one seed's value and does not narrow with seeds.)
``seed_sd`` is the per-seed spread, kept as its own column. A model with several
*draws* per seed (count-matched random removal, drawn ``random_draws`` times) is
averaged over its draws within each seed and resample before anything else: its
own luck is then not confounded with the training seed.

Paired differences
------------------
``a - b`` for two models evaluated on the same images: within each seed (seeds
paired by number) and each resample both models are scored on the *same*
resampled patients, and the difference is taken per resample. A model against
itself gives exactly 0 with a zero-width interval. Worst-group differences take
each model's own worst group within each (seed, resample).

Worst group: one definition
---------------------------
Candidates are the groups with at least ``min_group_n`` labelled evaluation
images whose metric is defined (``All`` never). The worst is the lowest value
(highest for FPR and FNR); **ties go to the group whose name sorts first**
(values equal to 12 decimals count as tied). With several seeds the label is
the worst group of the seed means; the worst-group *value* is the mean over
seeds of each seed's worst value (and its replicates are per seed and resample).
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pandas as pd
from scipy.special import ndtri
from scipy.stats import t as student_t
from sklearn.metrics import roc_curve

METRICS = ("accuracy", "auroc", "fpr", "fnr")
AVAILABLE_METRICS = (*METRICS, "balanced_accuracy")
THRESHOLD_RULES = ("youden", "max_accuracy", "fixed_0.5")
ALL = "All"
LOWER_IS_BETTER = frozenset({"fpr", "fnr"})
_TIE_DECIMALS = 12
DESCRIPTIVE_SEED = 0  # bootstrap seed of the descriptive tables (notebooks 02-04); stats_seed seeds 06
_CHUNK = 20_000_000  # resample rows x images processed at once (memory bound)
_AUROC_CHUNK = 4_000_000  # the same for AUROC, which holds a few float arrays of that size


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


# ---------------------------------------------------------------- the one implementation
def _from_confusion(metric: str, tp, fp, tn, fn) -> np.ndarray:
    """Accuracy, FPR, FNR, balanced accuracy from (weighted) confusion counts; NaN if undefined."""
    tp, fp, tn, fn = (np.asarray(a, dtype=float) for a in (tp, fp, tn, fn))
    pos, neg = tp + fn, fp + tn
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "accuracy":
            tot = pos + neg
            return np.where(tot > 0, (tp + tn) / np.where(tot > 0, tot, 1), np.nan)
        fpr = np.where(neg > 0, fp / np.where(neg > 0, neg, 1), np.nan)
        fnr = np.where(pos > 0, fn / np.where(pos > 0, pos, 1), np.nan)
    if metric == "fpr":
        return fpr
    if metric == "fnr":
        return fnr
    if metric == "balanced_accuracy":
        return 1 - (fpr + fnr) / 2
    raise ValueError(f"unknown metric {metric!r}; available: {AVAILABLE_METRICS}")


def _auroc(y: np.ndarray, prob: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUROC: P(score_pos > score_neg) + 0.5 P(tie), per row of ``w``.

    The images are sorted by score once; tied scores are pooled (``np.add.reduceat``); each row's
    negatives below a positive come from one cumulative sum. Rows are scored a block at a time.
    """
    n = len(y)
    if n == 0:
        return np.full(w.shape[0], np.nan)
    order = np.argsort(prob, kind="mergesort")
    ps, ys = prob[order], y[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    tied = len(starts) < n
    out = np.empty(w.shape[0])
    step = max(1, _AUROC_CHUNK // n)
    for i in range(0, w.shape[0], step):
        # float32 holds resample counts and their partial sums exactly (below 2**24); sums in float64
        ws = np.asarray(w[i:i + step], dtype=np.float32)[:, order]
        pos, neg = ws * ys, ws * ~ys
        if tied:
            pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
        below = np.cumsum(neg, axis=1)
        below -= 0.5 * neg   # negatives strictly below, plus half the ties
        num = np.einsum("ij,ij->i", pos, below, dtype=np.float64)
        den = pos.sum(1, dtype=np.float64) * neg.sum(1, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i:i + step] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    return out


def metric_values(metric: str, y, pred, prob, weights=None) -> np.ndarray:
    """``metric`` of one model under each row of ``weights`` (B x n resample counts).

    ``weights=None`` (or a row of ones) gives the plain metric. Returns B values,
    NaN where the metric is undefined. ``pred`` may be None for ``auroc`` and
    ``prob`` None for the others.
    """
    y = np.asarray(y).astype(bool)
    n = len(y)
    w = np.ones((1, n)) if weights is None else np.asarray(weights, dtype=float)
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"weights must be B x {n}, got shape {w.shape}")
    step = max(1, _CHUNK // max(n, 1))
    if w.shape[0] > step:  # bound memory: score the resamples in chunks
        return np.concatenate([metric_values(metric, y, pred, prob, w[i:i + step])
                               for i in range(0, w.shape[0], step)])
    if metric == "auroc":
        return _auroc(y, np.asarray(prob, dtype=float), w)
    if metric not in AVAILABLE_METRICS:
        raise ValueError(f"unknown metric {metric!r}; available: {AVAILABLE_METRICS}")
    p = np.asarray(pred).astype(bool)
    return _from_confusion(metric, w @ (y & p), w @ (~y & p), w @ (~y & ~p), w @ (y & ~p))


def metric_value(metric: str, y, pred=None, prob=None) -> float:
    """``metric`` of one model on all its images (a number; NaN if undefined)."""
    return float(metric_values(metric, y, pred, prob)[0])


def threshold_curves(y, prob, groups, thresholds=None) -> pd.DataFrame:
    """Accuracy, FPR, FNR and balanced accuracy per group (and ``All``) at each threshold.

    ``pred = prob >= t``. ``thresholds``: default 0, 0.01, ..., 1. One
    threshold gives the metrics table of a threshold slider. Columns:
    threshold, group, accuracy, fpr, fnr, balanced_accuracy, n, n_pos.
    """
    t = np.linspace(0, 1, 101) if thresholds is None else np.atleast_1d(np.asarray(thresholds, dtype=float))
    y = np.asarray(y).astype(bool)
    prob = np.asarray(prob, dtype=float)
    groups = np.asarray(groups).astype(str)
    if not len(y) == len(prob) == len(groups):
        raise ValueError(f"y, prob, groups differ in length: {len(y)}, {len(prob)}, {len(groups)}")
    frames = []
    for g in [*sorted(np.unique(groups)), ALL]:
        m = np.ones(len(y), bool) if g == ALL else groups == g
        yy, pp = y[m], prob[m]
        hit = (pp[None, :] >= t[:, None]).astype(float)  # thresholds x images: predicted positive
        tp, fp = hit @ yy, hit @ ~yy
        fn, tn = yy.sum() - tp, (~yy).sum() - fp
        rec = {"threshold": t, "group": g}
        for metric in ("accuracy", "fpr", "fnr", "balanced_accuracy"):
            rec[metric] = _from_confusion(metric, tp, fp, tn, fn)
        rec.update(n=int(m.sum()), n_pos=int(yy.sum()))
        frames.append(pd.DataFrame(rec))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- resampling
def _group_seed(random_state, group: str) -> list[int]:
    base = list(np.atleast_1d(np.asarray(random_state, dtype=np.int64)).tolist())
    return [int(b) % 2**32 for b in base] + [zlib.crc32(str(group).encode())]


def cluster_bootstrap_weights(groups, clusters, n_boot: int, random_state=0) -> np.ndarray:
    """``n_boot x n`` image weights of a patient-level bootstrap within group (module docstring).

    Inside each group, as many clusters (patients) as the group has are drawn with
    replacement; an image's weight is the number of draws of its (group, patient).
    """
    groups = np.asarray(groups).astype(str)
    clusters = np.asarray(clusters).astype(str)
    w = np.zeros((int(n_boot), len(groups)), dtype=np.int32)
    for g in sorted(np.unique(groups)):
        idx = np.flatnonzero(groups == g)
        uc, inv = np.unique(clusters[idx], return_inverse=True)
        rng = np.random.default_rng(_group_seed(random_state, g))
        counts = rng.multinomial(len(uc), np.full(len(uc), 1 / len(uc)), size=int(n_boot))
        w[:, idx] = counts[:, inv]
    return w


def seed_draws(n_seeds: int, n_boot: int, random_state=0) -> np.ndarray:
    """``n_boot x n_seeds`` positions of the seeds drawn with replacement, replicate by replicate.

    Seeded by ``(random_state, n_seeds)`` only, so every quantity over the same seeds uses the
    same seed draw in replicate ``b`` (paired). With one seed every entry is 0.
    """
    rng = np.random.default_rng(_group_seed(random_state, f"__seeds__{int(n_seeds)}"))
    return rng.integers(0, int(n_seeds), size=(int(n_boot), int(n_seeds)))


def seed_mean_replicates(arr, random_state=0) -> np.ndarray:
    """The two-level bootstrap of a mean over seeds (module docstring).

    ``arr``: seeds x (1 + n_boot), column 0 each seed's value on the full set,
    column ``1 + b`` its value under patient resample ``b``. Returns ``n_boot``
    replicates of the seed mean: replicate ``b`` averages column ``1 + b`` over
    the seeds drawn by :func:`seed_draws` (NaN seeds left out; NaN when all are).
    """
    a = np.asarray(arr, dtype=float)
    if a.ndim != 2 or a.shape[1] < 2:
        return np.full(0, np.nan)
    S, B = a.shape[0], a.shape[1] - 1
    idx = seed_draws(S, B, random_state)
    picked = a[:, 1:][idx, np.arange(B)[:, None]]  # B x S
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(picked, axis=1)


def variance_parts(arr) -> tuple[int, float, float]:
    """``(S, s_b^2, s_w^2)`` of a seed mean from seeds x (1 + n_boot) values (NaN seeds left out).

    ``s_b^2``: the sample variance of the seeds' values on the full set (between seeds); ``s_w^2``: the
    variance over patient resamples of the mean over *all* seeds (test sampling, seeds held fixed).
    """
    a = np.asarray(arr, dtype=float)
    a = a[np.isfinite(a[:, 0])] if a.ndim == 2 else a.reshape(0, 1)
    S = len(a)
    s_b2 = float(np.var(a[:, 0], ddof=1)) if S > 1 else float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pm = np.nanmean(a[:, 1:], axis=0) if S and a.shape[1] > 1 else np.zeros(0)
    pm = pm[np.isfinite(pm)]
    s_w2 = float(np.var(pm, ddof=1)) if pm.size > 1 else 0.0
    return S, s_b2, s_w2


def mean_df(S: int, s_b2: float, s_w2: float) -> float:
    """Welch–Satterthwaite degrees of freedom of ``Var(mean) = s_b^2 / S + s_w^2``: only the
    between-seed part is estimated from few values (S − 1 df); test sampling, from many patients,
    counts as known. ``S − 1`` when seeds dominate, infinite when they agree or S < 2."""
    if S < 2 or not (np.isfinite(s_b2) and s_b2 > 0):
        return float("inf")
    v = s_b2 / S + s_w2
    return float(v ** 2 / ((s_b2 / S) ** 2 / (S - 1)))


def small_sample_scale(S: int, s_b2: float, s_w2: float, ci_level: float) -> tuple[float, float]:
    """``(k, df)``: the factor that widens the two-level percentile interval to a Student-t calibrated one.

    The bootstrap over S seeds estimates the between-seed variance by its plug-in, ``(S−1)/S s_b^2``, and
    a percentile interval uses normal quantiles: with 3 seeds a nominal 95% interval of a null difference
    excludes 0 about 16% of the time. Scaling its half-widths (about the point) by
    ``k = t_{df, 1−α/2} / z_{1−α/2} · sqrt(V / V_boot)``, with ``V = s_b^2/S + s_w^2``,
    ``V_boot = (S−1)/S · s_b^2/S + s_w^2`` and ``df`` from :func:`mean_df`, gives the width of the
    t interval and keeps the bootstrap's shape (Hesterberg's expanded percentile interval, with
    Satterthwaite's df). k = 1 with one seed, seeds that agree exactly, or many seeds.
    """
    df = mean_df(S, s_b2, s_w2)
    if not np.isfinite(df):
        return 1.0, df
    v = s_b2 / S + s_w2
    vb = (S - 1) / S * s_b2 / S + s_w2
    a = (1 - ci_level) / 2
    return float(student_t.ppf(1 - a, df) / ndtri(1 - a) * np.sqrt(v / vb)), df


def seed_mean_interval(arr, ci_level: float, bounds=(0.0, 1.0), random_state=0) -> dict:
    """The interval of the mean over seeds (module docstring): lo, hi, p, k and df.

    ``arr``: seeds x (1 + n_boot) (column 0 the full set). The percentile interval of the two-level
    replicates (:func:`seed_mean_replicates`), its half-widths about the point scaled by ``k`` of
    :func:`small_sample_scale`, clipped to ``bounds``. ``p``: the two-sided p-value of 0, from the same
    variance and df (Welch's t test of the mean; the interval excludes 0 exactly when ``p < 1 − ci_level``
    for symmetric replicates); the bootstrap p (:func:`bootstrap_p`) when ``k`` is 1.
    """
    nan = dict(lo=np.nan, hi=np.nan, p=np.nan, k=np.nan, df=np.nan)
    a = np.asarray(arr, dtype=float)
    if a.ndim != 2 or a.shape[1] < 2:
        return nan
    reps = seed_mean_replicates(a, random_state)
    v = reps[np.isfinite(reps)]
    pts = a[np.isfinite(a[:, 0]), 0]
    if v.size == 0 or pts.size == 0:
        return nan
    point = float(pts.mean())
    S, s_b2, s_w2 = variance_parts(a)
    k, df = small_sample_scale(S, s_b2, s_w2, ci_level)
    alpha = 1 - ci_level
    q_lo, q_hi = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    p0 = min(1.0, 2 * min((v <= 0).mean(), (v >= 0).mean()))
    if k == 1.0:   # the percentile interval, stretched to its point when a skewed statistic (a minimum) left it out
        lo, hi, p = min(q_lo, point), max(q_hi, point), p0
    else:
        lo, hi = point - k * max(point - q_lo, 0.0), point + k * max(q_hi - point, 0.0)   # always holds the point
        p = float(2 * student_t.sf(abs(point) / np.sqrt(s_b2 / S + s_w2), df))   # the t test of the same mean
    return dict(lo=float(np.clip(lo, *bounds)), hi=float(np.clip(hi, *bounds)), p=float(p), k=float(k),
                df=float(df))


def bootstrap_p(reps) -> float:
    """Two-sided bootstrap p-value of "the difference is 0": ``2 min(P(rep <= 0), P(rep >= 0))``, at most 1."""
    v = np.asarray(reps, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(min(1.0, 2 * min((v <= 0).mean(), (v >= 0).mean())))


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control); NaN stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="mergesort")]
    m = len(order)
    adj = np.maximum.accumulate([(m - i) * p[j] for i, j in enumerate(order)])
    out[order] = np.minimum(adj, 1.0)
    return out


def pick_worst(names, values, metric: str = "accuracy") -> tuple[str, float]:
    """The worst of ``values`` (lowest; highest for FPR/FNR), ties to the name sorting first.

    NaN values are not candidates. Returns ``("", nan)`` when there is none.
    """
    names = [str(n) for n in names]
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    if not ok.any():
        return ("", float("nan"))
    key = np.round(v, _TIE_DECIMALS) * (-1 if metric in LOWER_IS_BETTER else 1)
    cands = sorted((key[i], names[i], i) for i in np.flatnonzero(ok))
    i = cands[0][2]
    return (names[i], float(v[i]))


def pick_best(names, values, metric: str = "accuracy") -> tuple[str, float]:
    """Mirror of :func:`pick_worst` (highest; lowest for FPR/FNR; ties to the name sorting first)."""
    other = "accuracy" if metric in LOWER_IS_BETTER else "fpr"
    return pick_worst(names, values, other)


def _note(metric: str, n: int, n_pos: int) -> str:
    if n == 0:
        return "no images"
    if metric in ("auroc", "balanced_accuracy") and n_pos in (0, n):
        return "one class only"
    if metric == "fpr" and n_pos == n:
        return "no negatives"
    if metric == "fnr" and n_pos == 0:
        return "no positives"
    return ""


# ---------------------------------------------------------------- the engine
class GroupMetrics:
    """Per-group metrics of one or more models on the same images, with cluster-bootstrap intervals.

    In the spirit of fairlearn's ``MetricFrame``: :meth:`by_group`,
    :meth:`overall`, :meth:`group_min` (and :meth:`worst`, direction-aware),
    :meth:`difference` (between-group gap, max - min, as in fairlearn) and each
    with a ``_ci`` twin that adds ``lo``/``hi``; plus paired comparisons of two
    models: :meth:`paired_difference_ci`, :meth:`paired_worst_ci`,
    :meth:`recovery_ci`. Intervals, seeds and the worst-group rule: module docstring.

    Parameters (arrays of equal length, one entry per model x seed x image)
    ------------------------------------------------------------------------
    y : 0/1 labels; prob : predicted probabilities; pred : 0/1 decisions
    (``prob >= threshold``); group : each image's group.
    cluster : each image's patient (``subject_id``); None: each image its own
        patient (image bootstrap, with a warning when ``warn_no_cluster``).
    model, seed : which model and training seed made the prediction (None: one).
    draw : which draw of a model's seed (count-matched random removal drawn several
        times per seed; None: one draw). A (model, seed)'s draws are averaged.
    row : image key aligning models (needed when there are several models/seeds;
        every model must cover the same rows with the same y, group, cluster).
    n_boot : resamples (0: no intervals); ci_level; random_state : int or ints.
    min_group_n : labelled images a group needs to be a worst-group candidate.
    """

    def __init__(self, y, prob, pred, group, *, cluster=None, model=None, seed=None, row=None, draw=None,
                 n_boot: int = 1000, ci_level: float = 0.95, random_state=0, min_group_n: int = 1,
                 warn_no_cluster: bool = False):
        n = len(y)
        cols = {"y": y, "prob": prob, "pred": pred, "group": group, "cluster": cluster, "model": model,
                "seed": seed, "row": row, "draw": draw}
        lens = {k: len(v) for k, v in cols.items() if v is not None}
        if len(set(lens.values())) > 1:
            raise ValueError(f"inputs differ in length: {lens}")
        if n == 0:
            raise ValueError("GroupMetrics got no predictions")
        if not 0 < ci_level < 1:
            raise ValueError(f"parameter `ci_level` must lie in (0, 1), got {ci_level}")
        if n_boot < 0:
            raise ValueError(f"n_boot must be >= 0, got {n_boot}")
        df = pd.DataFrame({
            "y": pd.to_numeric(pd.Series(np.asarray(y)), errors="coerce").to_numpy(float),
            "prob": np.asarray(prob, dtype=float),
            "pred": pd.to_numeric(pd.Series(np.asarray(pred)), errors="coerce").to_numpy(float),
            "group": np.asarray(group).astype(str),
            "model": "model" if model is None else np.asarray(model).astype(str),
            "seed": 0 if seed is None else np.asarray(seed).astype(int),
            "draw": 0 if draw is None else np.asarray(draw).astype(int)})
        if np.isnan(df["y"]).any() or not df["y"].isin((0, 1)).all():
            raise ValueError("y must be 0/1 without NaN (leave out images whose label is missing)")
        if not df["pred"].isin((0, 1)).all():
            raise ValueError("pred must be 0/1 decisions (prob >= threshold)")
        if np.isnan(df["prob"]).any():
            raise ValueError(f"prob has {int(np.isnan(df['prob']).sum())} NaN values")
        if (df["group"] == ALL).any():
            raise ValueError(f"a group may not be named {ALL!r} (reserved for the overall row)")
        self.cluster_unit = "patient" if cluster is not None else "image"
        if cluster is None and warn_no_cluster:
            warnings.warn("no patient ids: intervals resample images, not patients, and are too narrow "
                          "where patients have several images", stacklevel=2)
        keys = df[["model", "seed", "draw"]].drop_duplicates()
        if row is None:
            if len(keys) > 1:
                raise ValueError("several models/seeds need `row` to align their images")
            df["row"] = np.arange(n)
        else:
            df["row"] = np.asarray(row)
        df["cluster"] = (df["row"].astype(str).to_numpy() if cluster is None
                         else np.asarray(cluster).astype(str))
        if df.duplicated(["model", "seed", "draw", "row"]).any():
            raise ValueError(f"{int(df.duplicated(['model', 'seed', 'draw', 'row']).sum())} duplicated "
                             "(model, seed, draw, row) predictions")
        ref = None
        self._models: dict = {}
        for (m, s, dr), d in df.groupby(["model", "seed", "draw"], sort=False):
            d = d.sort_values("row", kind="mergesort")
            if ref is None:
                ref = d
            elif not np.array_equal(d["row"].to_numpy(), ref["row"].to_numpy()):
                raise ValueError(f"model {m!r} seed {s} was evaluated on other images ({len(d)} rows) than "
                                 f"the first model ({len(ref)} rows); paired statistics need the same rows")
            elif not all(np.array_equal(d[c].to_numpy(), ref[c].to_numpy()) for c in ("y", "group", "cluster")):
                raise ValueError(f"model {m!r} seed {s} disagrees with the first model on y, group or "
                                 "patient of the same rows")
            self._models[(str(m), int(s), int(dr))] = (d["pred"].to_numpy().astype(bool), d["prob"].to_numpy())
        self.rows = ref["row"].to_numpy()
        self.y = ref["y"].to_numpy().astype(bool)
        self.group = ref["group"].to_numpy()
        self.cluster = ref["cluster"].to_numpy()
        self.groups = sorted(np.unique(self.group))
        self.n_boot, self.ci_level, self.random_state = int(n_boot), float(ci_level), random_state
        self.min_group_n = int(min_group_n)
        self._masks = {g: self.group == g for g in self.groups}
        self._masks[ALL] = np.ones(len(self.y), dtype=bool)
        c = pd.DataFrame({"group": self.group, "y": self.y.astype(int), "cluster": self.cluster})
        counts = c.groupby("group").agg(n=("y", "size"), n_pos=("y", "sum"), n_clusters=("cluster", "nunique"))
        counts.loc[ALL] = [len(c), int(c["y"].sum()), c[["group", "cluster"]].drop_duplicates().shape[0]]
        self.counts = counts.astype(int)
        self.eligible = [g for g in self.groups if self.counts.loc[g, "n"] >= self.min_group_n]
        self._w = None
        self._wg: dict = {}
        self._cache: dict = {}

    @classmethod
    def from_frame(cls, df: pd.DataFrame, *, y="y", prob="prob", pred="pred", group="group", cluster=None,
                   model=None, seed=None, row="row", draw=None, **kwargs) -> GroupMetrics:
        """Build from a long predictions table; the arguments name its columns (None: absent)."""
        def col(c):
            if c is None:
                return None
            if c not in df.columns:
                raise KeyError(f"predictions table has no column {c!r}; has {list(df.columns)}")
            return df[c].to_numpy()
        return cls(col(y), col(prob), col(pred), col(group), cluster=col(cluster), model=col(model),
                   seed=col(seed), row=col(row) if row in df.columns else None,
                   draw=col(draw) if draw is not None and draw in df.columns else None, **kwargs)

    # -- what is there ----------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(m for m, _, _ in self._models))

    def seeds(self, model: str) -> list[int]:
        s = sorted({s for m, s, _ in self._models if m == model})
        if not s:
            raise KeyError(f"no predictions of model {model!r}; models: {self.models}")
        return s

    def excluded_groups(self) -> list[str]:
        """Groups left out of the worst group for having fewer than ``min_group_n`` images."""
        return [g for g in self.groups if g not in self.eligible]

    # -- the computation --------------------------------------------------------
    @property
    def weights(self) -> np.ndarray:
        """The shared ``n_boot x n`` cluster-bootstrap weights (computed once)."""
        if self._w is None:
            self._w = cluster_bootstrap_weights(self.group, self.cluster, self.n_boot, self.random_state)
        return self._w

    def _group_weights(self, g: str) -> np.ndarray:
        """(1 + n_boot) x images of group ``g``: row 0 ones (the point), then the resample weights; built once
        per engine (every model, seed and metric reuses it)."""
        if g not in self._wg:
            m = self._masks[g]
            w = np.ones((1 + self.n_boot, int(m.sum())))
            if self.n_boot:
                w[1:] = self.weights[:, m]
            self._wg[g] = w
        return self._wg[g]

    def draws(self, model: str, seed: int) -> list[int]:
        d = sorted(dr for m, s, dr in self._models if m == model and s == seed)
        if not d:
            raise KeyError(f"no predictions of model {model!r} seed {seed}; models: {self.models}")
        return d

    def _per_seed(self, model: str, metric: str, seeds, reduce) -> np.ndarray:
        """``reduce`` of each draw's (groups + All) x (1 + n_boot) values, averaged over the seed's draws."""
        out = []
        for s in (seeds or self.seeds(model)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out.append(np.mean([reduce(self._draw_values(model, s, d, metric))
                                    for d in self.draws(model, s)], axis=0))
        return np.stack(out)

    def _draw_values(self, model: str, seed: int, draw: int, metric: str) -> np.ndarray:
        """(groups + All) x (1 + n_boot) of one draw: column 0 the point, then the replicates."""
        key = (model, seed, draw, metric)
        if key not in self._cache:
            if metric not in AVAILABLE_METRICS:
                raise ValueError(f"unknown metric {metric!r}; available: {AVAILABLE_METRICS}")
            if (model, seed, draw) not in self._models:
                raise KeyError(f"no predictions of model {model!r} seed {seed}; models: {self.models}")
            pred, prob = self._models[(model, seed, draw)]
            out = np.full((len(self.groups) + 1, 1 + self.n_boot), np.nan)
            for i, g in enumerate([*self.groups, ALL]):
                m = self._masks[g]
                out[i] = metric_values(metric, self.y[m], pred[m], prob[m], self._group_weights(g))
            self._cache[key] = out
        return self._cache[key]

    def _stack(self, model: str, metric: str, seeds=None) -> np.ndarray:
        """seeds x (groups + All) x (1 + n_boot), each seed the mean over its draws."""
        return self._per_seed(model, metric, seeds, lambda v: v)

    def _eligible_idx(self, metric: str, model: str) -> list[int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a group undefined in every seed
            pts = np.nanmean(self._stack(model, metric)[:, :-1, 0], axis=0)
        return [i for i, g in enumerate(self.groups) if g in self.eligible and np.isfinite(pts[i])]

    def replicates(self, arr: np.ndarray) -> np.ndarray:
        """The ``n_boot`` two-level replicates of the seed mean of ``arr`` (seeds x (1 + n_boot))."""
        return seed_mean_replicates(arr, self.random_state) if self.n_boot else np.full(0, np.nan)

    def interval(self, arr: np.ndarray, bounds=(0.0, 1.0)) -> dict:
        """:func:`seed_mean_interval` of ``arr`` (seeds x (1 + n_boot)) at this engine's level and draws."""
        return seed_mean_interval(arr, self.ci_level, bounds, self.random_state)

    def _summary(self, arr: np.ndarray, bounds=(0.0, 1.0), ci: dict | None = None) -> dict:
        """seeds x (1 + n_boot) -> point (mean of seed points), seed_sd, lo, hi (interval of the mean), n_seeds.
        ``ci``: the :meth:`interval` of ``arr`` when the caller already has it."""
        pts = arr[:, 0]
        ok = np.isfinite(pts)
        if ci is None:
            ci = self.interval(arr, bounds) if self.n_boot else dict(lo=np.nan, hi=np.nan, p=np.nan)
        return dict(value=float(pts[ok].mean()) if ok.any() else np.nan, lo=ci["lo"], hi=ci["hi"],
                    seed_sd=float(pts[ok].std(ddof=1)) if ok.sum() > 1 else np.nan, n_seeds=len(pts))

    # -- by group and overall ------------------------------------------------------
    def _table(self, metrics, groups_all: bool, ci: bool, models=None) -> pd.DataFrame:
        metrics = [metrics] if isinstance(metrics, str) else list(metrics or METRICS)
        recs = []
        names = [*self.groups, ALL] if groups_all else self.groups
        for model in models or self.models:
            for metric in metrics:
                st = self._stack(model, metric)
                for i, g in enumerate([*self.groups, ALL]):
                    if g not in names:
                        continue
                    n, n_pos = int(self.counts.loc[g, "n"]), int(self.counts.loc[g, "n_pos"])
                    rec = dict(model=model, group=g, metric=metric, **self._summary(st[:, i]), n=n, n_pos=n_pos,
                               n_clusters=int(self.counts.loc[g, "n_clusters"]), note=_note(metric, n, n_pos))
                    if not ci:
                        rec.pop("lo")
                        rec.pop("hi")
                    recs.append(rec)
        return pd.DataFrame(recs)

    def by_group(self, metrics=None, models=None) -> pd.DataFrame:
        """Per model, group and metric: value (mean over seeds), seed_sd, n_seeds, n, n_pos, n_clusters, note."""
        return self._table(metrics, False, False, models)

    def by_group_ci(self, metrics=None, models=None) -> pd.DataFrame:
        """:meth:`by_group` with the interval ``lo``, ``hi``."""
        return self._table(metrics, False, True, models)

    def overall(self, metrics=None, models=None) -> pd.DataFrame:
        """The ``All`` rows (every image) in the layout of :meth:`by_group`."""
        t = self._table(metrics, True, False, models)
        return t[t["group"] == ALL].reset_index(drop=True)

    def overall_ci(self, metrics=None, models=None) -> pd.DataFrame:
        t = self._table(metrics, True, True, models)
        return t[t["group"] == ALL].reset_index(drop=True)

    def table(self, metrics=None, models=None, ci: bool = True) -> pd.DataFrame:
        """By group then ``All``, per model: the long table of the study."""
        return self._table(metrics, True, ci, models)

    # -- worst group and gap ---------------------------------------------------------
    def _extreme(self, model: str, metric: str, kind: str, seeds=None) -> tuple[np.ndarray, list[int]]:
        """seeds x (1 + n_boot) of the min / max / worst / gap over eligible groups (per draw, then the
        mean over a seed's draws)."""
        idx = self._eligible_idx(metric, model)
        if not idx:
            raise ValueError(f"no group has at least min_group_n={self.min_group_n} images and a defined "
                             f"{metric} (groups: {dict(self.counts['n'])})")
        if kind == "worst":
            kind = "max" if metric in LOWER_IS_BETTER else "min"
        if kind not in ("min", "max", "gap"):
            raise ValueError(kind)

        def reduce(v):
            sub = v[idx, :]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN replicates stay NaN
                if kind == "min":
                    return np.nanmin(sub, axis=0)
                if kind == "max":
                    return np.nanmax(sub, axis=0)
                return (np.nanmax(sub, axis=0) - np.nanmin(sub, axis=0)) if len(idx) > 1 \
                    else np.full(sub.shape[1], np.nan)
        return self._per_seed(model, metric, seeds, reduce), idx

    def _extreme_table(self, metric: str, kind: str, ci: bool, models=None) -> pd.DataFrame:
        recs = []
        for model in models or self.models:
            arr, idx = self._extreme(model, metric, kind)
            s = self._summary(arr, (0.0, 1.0))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                seed_means = np.nanmean(self._stack(model, metric)[:, idx, 0], axis=0)
            rec = dict(model=model, metric=metric, **s)
            if kind in ("worst", "min", "max"):
                direction = {"min": "accuracy", "max": "fpr"}.get(kind, metric)
                g, _ = pick_worst([self.groups[i] for i in idx], seed_means, direction)
                rec.update(group=g, n=int(self.counts.loc[g, "n"]))
            rec["excluded_groups"] = ", ".join(self.excluded_groups())
            if not ci:
                rec.pop("lo")
                rec.pop("hi")
            recs.append(rec)
        return pd.DataFrame(recs)

    def group_min(self, metric: str = "accuracy", models=None) -> pd.DataFrame:
        """Lowest ``metric`` over eligible groups per model (mean over seeds of each seed's minimum)."""
        return self._extreme_table(metric, "min", False, models)

    def group_min_ci(self, metric: str = "accuracy", models=None) -> pd.DataFrame:
        return self._extreme_table(metric, "min", True, models)

    def worst(self, metric: str = "accuracy", models=None) -> pd.DataFrame:
        """Worst-group ``metric`` per model: the minimum, or the maximum for FPR/FNR (the one definition)."""
        return self._extreme_table(metric, "worst", False, models)

    def worst_ci(self, metric: str = "accuracy", models=None) -> pd.DataFrame:
        """:meth:`worst` with its interval. Columns: model, metric, value, lo, hi, seed_sd, n_seeds,
        group (worst group of the seed means), n, excluded_groups."""
        return self._extreme_table(metric, "worst", True, models)

    def difference(self, metric: str = "accuracy", models=None) -> pd.DataFrame:
        """Between-group gap (max - min over eligible groups) per model, as fairlearn's ``difference``."""
        return self._extreme_table(metric, "gap", False, models)

    def difference_ci(self, metric: str = "accuracy", models=None) -> pd.DataFrame:
        return self._extreme_table(metric, "gap", True, models)

    # -- paired comparisons of two models -----------------------------------------------
    def _paired_seeds(self, a: str, b: str) -> list[int]:
        seeds = sorted(set(self.seeds(a)) & set(self.seeds(b)))
        if not seeds:
            raise ValueError(f"models {a!r} and {b!r} share no seed; a paired difference needs the same seeds")
        return seeds

    def paired_difference_ci(self, a: str, b: str, metric: str = "accuracy") -> pd.DataFrame:
        """``a - b`` per group and ``All``, paired by seed and resample.

        Columns: group, metric, value, lo, hi, seed_sd, n_seeds (pairs), n.
        """
        seeds = self._paired_seeds(a, b)
        d = self._stack(a, metric, seeds) - self._stack(b, metric, seeds)
        recs = []
        for i, g in enumerate([*self.groups, ALL]):
            recs.append(dict(group=g, metric=metric, **self._summary(d[:, i], (-1.0, 1.0)),
                             n=int(self.counts.loc[g, "n"])))
        return pd.DataFrame(recs)

    def paired_worst(self, a: str, b: str, metric: str = "accuracy") -> tuple[list[int], np.ndarray]:
        """``(seeds, d)``: worst-group ``metric`` of ``a`` minus that of ``b``, seeds x (1 + n_boot)
        (each its own worst group per seed and resample; column 0 the full test set)."""
        seeds = self._paired_seeds(a, b)
        return seeds, self._extreme(a, metric, "worst", seeds)[0] - self._extreme(b, metric, "worst", seeds)[0]

    def paired_worst_ci(self, a: str, b: str, metric: str = "accuracy") -> dict:
        """Worst-group ``metric`` of ``a`` minus that of ``b`` (each its own worst group per seed and
        resample), paired. Returns value, lo, hi (interval of the seed mean), seed_sd, n_seeds (pairs),
        p (two-sided p-value of 0 on the interval's scale, :func:`seed_mean_interval`) and seed_values
        (each seed's difference)."""
        seeds, d = self.paired_worst(a, b, metric)
        ci = self.interval(d, (-1.0, 1.0)) if self.n_boot else dict(lo=np.nan, hi=np.nan, p=np.nan)
        out = self._summary(d, (-1.0, 1.0), ci)
        out["p"] = ci["p"]
        out["seed_values"] = {int(s): float(v) for s, v in zip(seeds, d[:, 0])}
        return out

    def recovery_ci(self, method: str, ceiling: str, baseline: str, metric: str = "accuracy") -> dict:
        """Share of the ceiling's worst-group gain over ``baseline`` that ``method`` recovers.

        ``S = mean_s(W_method - W_base) / mean_s(W_ceiling - W_base)`` with ``W``
        the worst-group ``metric`` of each seed; the interval takes the same ratio
        within each two-level replicate (the same seed draw and patient draw for
        numerator and denominator, as for every other interval), so it holds the
        seed spread that its gate holds. Returns share, lo, hi, and the ceiling's
        gain with its paired interval (gain, gain_lo, gain_hi). The share is NaN,
        with ``reason``, when the gain's interval includes 0: then there is no
        gain to recover.
        """
        seeds = sorted(set(self._paired_seeds(method, baseline)) & set(self._paired_seeds(ceiling, baseline)))
        if not seeds:
            raise ValueError(f"{method!r}, {ceiling!r} and {baseline!r} share no seed")
        wb = self._extreme(baseline, metric, "worst", seeds)[0]
        dm = self._extreme(method, metric, "worst", seeds)[0] - wb
        dc = self._extreme(ceiling, metric, "worst", seeds)[0] - wb
        num = np.concatenate([[dm[:, 0].mean()], self.replicates(dm)])
        den = np.concatenate([[dc[:, 0].mean()], self.replicates(dc)])
        gain = self._summary(dc, (-1.0, 1.0))
        out = dict(share=np.nan, lo=np.nan, hi=np.nan, gain=gain["value"], gain_lo=gain["lo"],
                   gain_hi=gain["hi"], n_seeds=len(seeds), reason="")
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0  # a gain lowers FPR/FNR
        if not (np.isfinite(gain["lo"]) and sign * gain["lo"] > 0 and sign * gain["hi"] > 0):
            from .methods import label   # the models' table names (erm -> ERM); unregistered names stay

            out["reason"] = (f"the {label(ceiling)} gain over {label(baseline)} has an interval that includes 0 "
                             "or points the wrong way: no gain to recover")
            return out
        with np.errstate(invalid="ignore", divide="ignore"):
            out["share"] = float(num[0] / den[0])
            if self.n_boot:
                r = num[1:] / den[1:]
                a = (1 - self.ci_level) / 2
                r = r[np.isfinite(r)]
                if r.size:
                    out["lo"], out["hi"] = (float(q) for q in np.quantile(r, [a, 1 - a]))
        return out


# ---------------------------------------------------------------- the long table, and helpers on it
def group_metrics(y, prob, pred, groups, n_boot: int = 200, ci_level: float = 0.95, seed: int = 0,
                  min_n: int = 1, metrics=METRICS, clusters=None) -> pd.DataFrame:
    """Per-group metrics of one model with cluster-bootstrap intervals (module docstring).

    ``clusters``: each image's patient; None resamples images (and says so in no
    column: pass patient ids). Groups with fewer than ``min_n`` images get NaN
    for every metric. ``n_boot=0`` gives no intervals (lo, hi NaN).

    Returns a long table: group, metric, value, lo, hi, n, n_pos, note; groups
    in sorted order, then ``All``. Deterministic given ``seed``.
    """
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = set(metrics) - set(AVAILABLE_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; available: {AVAILABLE_METRICS}")
    if not (len(y) == len(prob) == len(pred) == len(groups)):
        raise ValueError(f"y, prob, pred, groups differ in length: {len(y)}, {len(prob)}, "
                         f"{len(pred)}, {len(groups)}")
    gm = GroupMetrics(y, prob, pred, groups, cluster=clusters, n_boot=n_boot, ci_level=ci_level,
                      random_state=seed, min_group_n=min_n)
    t = gm.table(metrics)
    t = t.sort_values("metric", key=lambda s: s.map({m: i for i, m in enumerate(metrics)}), kind="stable")
    order = {g: i for i, g in enumerate([*gm.groups, ALL])}
    t = t.sort_values("group", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    small = (t["n"] < min_n) & (t["group"] != ALL)
    t.loc[small, ["value", "lo", "hi"]] = np.nan
    t.loc[small, "note"] = [f"n < min_n ({n} < {min_n})" for n in t.loc[small, "n"]]
    return t[["group", "metric", "value", "lo", "hi", "n", "n_pos", "note"]]


def _groups_only(df: pd.DataFrame, metric: str, min_group_n: int = 1) -> pd.DataFrame:
    if metric not in set(df["metric"]):
        raise KeyError(f"metric {metric!r} not in table (has {sorted(set(df['metric']))})")
    sub = df[(df["metric"] == metric) & (df["group"] != ALL)]
    sub = sub[np.isfinite(sub["value"].astype(float))]
    if "n" in sub.columns:
        sub = sub[sub["n"] >= min_group_n]
    return sub


def worst_group(df: pd.DataFrame, metric: str = "accuracy", min_group_n: int = 1) -> tuple[str, float]:
    """Worst group of a :func:`group_metrics` table by the one rule (:func:`pick_worst`).

    Candidates: groups with a defined value and at least ``min_group_n`` images; never ``All``.
    """
    sub = _groups_only(df, metric, min_group_n)
    return pick_worst(sub["group"], sub["value"], metric)


def best_group(df: pd.DataFrame, metric: str = "accuracy", min_group_n: int = 1) -> tuple[str, float]:
    """The group with the best value of ``metric``; mirror of :func:`worst_group`."""
    sub = _groups_only(df, metric, min_group_n)
    return pick_best(sub["group"], sub["value"], metric)


def gap(df: pd.DataFrame, metric: str = "accuracy", min_group_n: int = 1) -> float:
    """Best minus worst group value of ``metric`` (max - min over the worst-group candidates)."""
    sub = _groups_only(df, metric, min_group_n)
    return float(sub["value"].max() - sub["value"].min()) if len(sub) >= 2 else float("nan")


_PER_RUN = ("seed", "value", "lo", "hi", "n", "n_pos", "note")


def seed_summary(df: pd.DataFrame, ci_level: float = 0.95) -> pd.DataFrame:
    """Deprecated: mean and sd across seeds of stacked :func:`group_metrics` tables.

    Its former Student-t interval over seeds ignored test-set sampling, had zero
    width where seeds agree and could leave [0, 1]. ``lo``/``hi`` are now the
    pooled range of the per-seed bootstrap bounds only as a fallback display;
    use :class:`GroupMetrics` on the per-seed predictions (``seed=``) for the
    study's interval. Returns the keys plus mean, sd, lo, hi, n_seeds, n.
    """
    warnings.warn("metrics.seed_summary is deprecated: build GroupMetrics(..., seed=seeds) and use "
                  "by_group_ci() for seed-pooled cluster-bootstrap intervals", FutureWarning, stacklevel=2)
    if "seed" not in df.columns:
        raise KeyError("seed_summary needs a 'seed' column")
    keys = [c for c in df.columns if c not in _PER_RUN]
    rows = []
    for key, sub in df.groupby(keys, sort=False, dropna=False):
        v = sub["value"].astype(float).to_numpy()
        v = v[np.isfinite(v)]
        k = len(v)
        rec = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        lo = sub["lo"].astype(float) if "lo" in sub else pd.Series(dtype=float)
        hi = sub["hi"].astype(float) if "hi" in sub else pd.Series(dtype=float)
        rec.update(mean=float(v.mean()) if k else np.nan, sd=float(v.std(ddof=1)) if k > 1 else np.nan,
                   lo=float(lo.min()) if lo.notna().any() else np.nan,
                   hi=float(hi.max()) if hi.notna().any() else np.nan, n_seeds=k,
                   n=float(sub["n"].mean()) if "n" in sub else np.nan)
        rows.append(rec)
    return pd.DataFrame(rows)
