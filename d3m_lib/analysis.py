"""Per-race comparison of training methods across seeds, with intervals.

One object, :class:`MethodComparison`, answers every per-group question that
notebooks 06 and 07 ask of ``05_d3m/predictions.parquet``: per-group metrics
per method, the source study's table (baseline vs D3M per race, with the change
and the change in training images), worst-group accuracy across findings and
methods, forest-plot data, AUROC per group and the underdiagnosis view
(false positive rate of "No Finding" per race, Seyyed-Kalantari et al.).
:func:`removed_summary` says who a selection removed; :func:`worst_group_errors`,
:func:`influence_composition` and :func:`removed_vs_kept_means` serve the error
analysis (notebook 07); :func:`comparison_table`, :func:`wide_per_group`,
:func:`wga_wide` and :func:`format_intervals` make display tables.

How intervals combine seeds and test-set sampling
-------------------------------------------------
For one (finding, split) every model is evaluated on the same images. We draw
``n_boot`` bootstrap resamples of those images once, stratified by group (each
group resampled within itself, so group sizes stay fixed), and evaluate *every*
(method, seed) model on the *same* resamples. For a quantity ``q`` (a group's
accuracy, a change against the baseline, worst-group accuracy):

* the point estimate is the mean over seeds of ``q`` on the full evaluation set;
* the interval is the percentile interval of the pooled ``seeds x n_boot``
  replicates of ``q``.

The pooled distribution is the mixture, over seeds, of each seed's bootstrap
distribution, so its width contains both the between-seed spread (training
randomness) and the within-seed sampling error of a finite test set. It is an
interval for "one training run of this method, evaluated on a test set like
this one" and is therefore wider (more conservative) than an interval for the
seed *mean*. We chose it over "mean of seeds with a t-interval" because with
the few seeds a study can afford (3-5) a t-interval on seed means ignores the
test-set sampling error that dominates for small groups. Changes (method minus
baseline) are paired: within a seed, both models are scored on the same
resampled images, so the shared difficulty of a resample cancels. Seeds are
paired by seed number; a method's seed ``s`` and the baseline's seed ``s``
start from the same baseline checkpoint in this pipeline.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse

from .metrics import ALL as OVERALL  # the overall row is named as in metrics.group_metrics
METRICS = ("accuracy", "fpr", "fnr", "auroc")
PRED_COLUMNS = ("finding", "method", "seed", "split", "row", "group", "y", "prob", "pred")
SELECTION_COLUMNS = ("finding", "method", "seed", "row", "kept")


def _require_columns(df: pd.DataFrame, cols, what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; has {list(df.columns)}")


def weighted_metric(metric: str, y: np.ndarray, pred: np.ndarray, prob: np.ndarray,
                    weights: np.ndarray) -> np.ndarray:
    """``metric`` of one model under each row of ``weights`` (B x n resample counts).

    ``weights = np.ones((1, n))`` gives the plain metric. Returns B values; NaN
    where the metric is undefined (e.g. FPR with no negatives, AUROC with one class).
    """
    y = np.asarray(y).astype(bool)
    pred = np.asarray(pred).astype(bool)
    w = np.asarray(weights, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "accuracy":
            return w @ (pred == y) / w.sum(1)
        if metric == "fpr":
            return w @ (pred & ~y) / (w @ ~y)
        if metric == "fnr":
            return w @ (~pred & y) / (w @ y)
        if metric == "auroc":
            # Weighted Mann-Whitney U: P(score_pos > score_neg) + 0.5 P(tie).
            _, inv = np.unique(np.asarray(prob, dtype=float), return_inverse=True)
            k = inv.max() + 1 if len(inv) else 0
            n = len(y)
            ind = sparse.csr_matrix((np.ones(n), (np.arange(n), inv)), shape=(n, k))
            pos = np.asarray((ind.T.multiply(y[None, :]) @ w.T).T)
            neg = np.asarray((ind.T.multiply(~y[None, :]) @ w.T).T)
            below = np.cumsum(neg, axis=1) - neg
            num = (pos * (below + 0.5 * neg)).sum(1)
            return num / (pos.sum(1) * neg.sum(1))
    raise ValueError(f"unknown metric '{metric}'; choose from {METRICS}")


def _percentile_interval(values: np.ndarray, ci_level: float) -> tuple[float, float]:
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (np.nan, np.nan)
    a = (1 - ci_level) / 2
    return (float(np.quantile(v, a)), float(np.quantile(v, 1 - a)))


def _undefined_note(metric: str, n: int, n_pos: int) -> str:
    """Why a metric is NaN for a group ("" when it is defined)."""
    if metric in ("fpr", "auroc") and n_pos == n:
        return "undefined: no negatives"
    if metric in ("fnr", "auroc") and n_pos == 0:
        return "undefined: no positives"
    return ""


def _stable_seed(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


@dataclass
class _EvalSet:
    """All models of one (finding, split), aligned on the same rows."""

    rows: np.ndarray
    groups: np.ndarray
    y: np.ndarray
    models: dict  # (method, seed) -> (pred, prob)
    weights: np.ndarray  # n_boot x n, stratified by group
    cache: dict = field(default_factory=dict)


class MethodComparison:
    """Per-group metrics of every method on every finding, pooled over seeds.

    Parameters
    ----------
    predictions : the long table ``05_d3m/predictions.parquet``.
    selections : ``05_d3m/selections.parquet`` (optional; needed for the change
        in training images in :meth:`source_table`).
    cohort : ``01_cohort/cohort.parquet`` (optional; gives training rows' groups).
    n_boot, ci_level, seed : bootstrap resamples, interval level, random seed.
    min_group_n : groups with fewer evaluation images than this are left out of
        worst-group accuracy (listed in the table's ``excluded_groups``).
    """

    def __init__(self, predictions: pd.DataFrame, selections: pd.DataFrame | None = None,
                 cohort: pd.DataFrame | None = None, n_boot: int = 1000,
                 ci_level: float = 0.95, seed: int = 0, min_group_n: int = 1):
        _require_columns(predictions, PRED_COLUMNS, "predictions table")
        if not 0 < ci_level < 1:
            raise ValueError(f"ci_level must be in (0, 1), got {ci_level}")
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        p = predictions.copy()
        p["finding"] = p["finding"].astype(str)
        p["method"] = p["method"].astype(str)
        p["split"] = p["split"].astype(str)
        p["group"] = p["group"].astype(str)
        p["seed"] = p["seed"].astype(int)
        p["row"] = p["row"].astype(int)
        dup = p.duplicated(["finding", "method", "seed", "split", "row"])
        if dup.any():
            raise ValueError(f"predictions table has {int(dup.sum())} duplicated "
                             "(finding, method, seed, split, row) entries")
        bad_y = ~p["y"].isin([0, 1])
        if bad_y.any():
            raise ValueError(f"predictions column 'y' must be 0/1; {int(bad_y.sum())} rows are not")
        self.predictions = p
        self.selections = selections
        self.cohort = cohort
        if selections is not None:
            _require_columns(selections, SELECTION_COLUMNS, "selections table")
        if cohort is not None:
            _require_columns(cohort, ("row", "group", "split"), "cohort table")
        self.n_boot, self.ci_level, self.seed = int(n_boot), float(ci_level), int(seed)
        self.min_group_n = int(min_group_n)
        self._sets: dict = {}

    # -- what is there ------------------------------------------------------
    @property
    def findings(self) -> list[str]:
        return list(dict.fromkeys(self.predictions["finding"]))

    def methods(self, finding: str | None = None) -> list[str]:
        p = self.predictions if finding is None else self.predictions[self.predictions["finding"] == finding]
        return list(dict.fromkeys(p["method"]))

    # -- the aligned evaluation set -------------------------------------------
    def _eval(self, finding: str, split: str) -> _EvalSet:
        key = (finding, split)
        if key in self._sets:
            return self._sets[key]
        p = self.predictions
        sub = p[(p["finding"] == finding) & (p["split"] == split)]
        if sub.empty:
            raise KeyError(f"no predictions for finding '{finding}' on split '{split}'; "
                           f"findings: {self.findings}, splits: {sorted(p['split'].unique())}")
        ref = None
        models = {}
        for (method, seed), g in sub.groupby(["method", "seed"], sort=False):
            g = g.sort_values("row")
            rows = g["row"].to_numpy()
            if ref is None:
                ref = g
            elif not np.array_equal(rows, ref["row"].to_numpy()):
                raise ValueError(
                    f"{finding}/{split}: method '{method}' seed {seed} was evaluated on other images "
                    f"({len(rows)} rows) than the first model ({len(ref)} rows); paired comparison "
                    "needs every model on the same rows")
            elif not (np.array_equal(g["y"].to_numpy(), ref["y"].to_numpy())
                      and np.array_equal(g["group"].to_numpy(), ref["group"].to_numpy())):
                raise ValueError(f"{finding}/{split}: method '{method}' seed {seed} disagrees with "
                                 "the other models on 'y' or 'group' of the same rows")
            models[(method, int(seed))] = (g["pred"].to_numpy().astype(bool),
                                           g["prob"].to_numpy().astype(float))
        groups = ref["group"].to_numpy().astype(str)
        rng = np.random.default_rng([self.seed, _stable_seed(finding, split)])
        n = len(groups)
        w = np.zeros((self.n_boot, n), dtype=np.int32)
        for g in np.unique(groups):
            idx = np.flatnonzero(groups == g)
            w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=self.n_boot)
        es = _EvalSet(ref["row"].to_numpy(), groups, ref["y"].to_numpy().astype(bool), models, w)
        self._sets[key] = es
        return es

    def _values(self, finding: str, split: str, metric: str):
        """{(method, seed): {group: (point, replicates)}} including the Overall group."""
        es = self._eval(finding, split)
        if metric in es.cache:
            return es.cache[metric]
        masks = {g: es.groups == g for g in sorted(np.unique(es.groups))}
        masks[OVERALL] = np.ones(len(es.groups), dtype=bool)
        out = {}
        for key, (pred, prob) in es.models.items():
            out[key] = {}
            for g, m in masks.items():
                args = (es.y[m], pred[m], prob[m])
                point = weighted_metric(metric, *args, np.ones((1, int(m.sum()))))[0]
                reps = weighted_metric(metric, *args, es.weights[:, m])
                out[key][g] = (float(point), reps)
        es.cache[metric] = out
        return out

    def _group_counts(self, finding: str, split: str) -> pd.DataFrame:
        es = self._eval(finding, split)
        df = pd.DataFrame({"group": es.groups, "y": es.y.astype(int)})
        c = df.groupby("group").agg(n=("y", "size"), n_pos=("y", "sum"))
        c.loc[OVERALL] = [len(df), int(df["y"].sum())]
        return c

    def _seeds(self, finding: str, method: str, split: str) -> list[int]:
        seeds = sorted(s for (m, s) in self._eval(finding, split).models if m == method)
        if not seeds:
            raise KeyError(f"no predictions of method '{method}' for '{finding}' on '{split}'; "
                           f"methods: {self.methods(finding)}")
        return seeds

    # -- per-group metrics ------------------------------------------------------
    def per_group(self, finding: str, split: str = "test", metric: str = "accuracy",
                  methods: list[str] | None = None) -> pd.DataFrame:
        """Per group (and Overall) and method: ``metric`` mean over seeds, interval, n.

        Columns: finding, split, metric, method, group, value, lo, hi, seed_sd,
        n_seeds, n, n_pos, note (why a value is NaN: a group without negatives
        has no FPR, one without positives no FNR; AUROC needs both).
        """
        vals = self._values(finding, split, metric)
        counts = self._group_counts(finding, split)
        recs = []
        for method in methods or self.methods(finding):
            seeds = self._seeds(finding, method, split)
            for g in counts.index:
                points = np.array([vals[(method, s)][g][0] for s in seeds])
                reps = np.stack([vals[(method, s)][g][1] for s in seeds])
                lo, hi = _percentile_interval(reps, self.ci_level)
                ok = np.isfinite(points)
                n, n_pos = int(counts.loc[g, "n"]), int(counts.loc[g, "n_pos"])
                recs.append(dict(finding=finding, split=split, metric=metric, method=method, group=g,
                                 value=float(points[ok].mean()) if ok.any() else np.nan,
                                 lo=lo, hi=hi,
                                 seed_sd=float(points[ok].std(ddof=1)) if ok.sum() > 1 else np.nan,
                                 n_seeds=len(seeds), n=n, n_pos=n_pos,
                                 note=_undefined_note(metric, n, n_pos)))
        return pd.DataFrame(recs)

    def change(self, finding: str, method: str, baseline: str = "erm", split: str = "test",
               metric: str = "accuracy") -> pd.DataFrame:
        """Paired change ``method - baseline`` per group: mean over shared seeds, interval.

        Columns: group, change, change_lo, change_hi, n_pairs.
        """
        vals = self._values(finding, split, metric)
        seeds = sorted(set(self._seeds(finding, method, split)) & set(self._seeds(finding, baseline, split)))
        if not seeds:
            raise ValueError(f"{finding}: methods '{method}' and '{baseline}' share no seed; "
                             "a paired change needs the same seeds")
        recs = []
        for g in self._group_counts(finding, split).index:
            d_point = np.array([vals[(method, s)][g][0] - vals[(baseline, s)][g][0] for s in seeds])
            d_reps = np.stack([vals[(method, s)][g][1] - vals[(baseline, s)][g][1] for s in seeds])
            lo, hi = _percentile_interval(d_reps, self.ci_level)
            recs.append(dict(group=g, change=float(np.nanmean(d_point)) if np.isfinite(d_point).any() else np.nan,
                             change_lo=lo, change_hi=hi, n_pairs=len(seeds)))
        return pd.DataFrame(recs)

    def train_counts(self, finding: str, method: str) -> pd.DataFrame:
        """Training images per group before selection and removed by ``method`` (mean over seeds).

        Needs ``selections`` and ``cohort``. A method without selection rows
        (``erm``, ``base``) removed nothing. Columns: group, n_train, removed,
        change_n (= -removed).
        """
        if self.selections is None or self.cohort is None:
            raise ValueError("train_counts needs the selections table and the cohort table")
        sel = self.selections[self.selections["finding"].astype(str) == finding]
        groups = self.cohort.set_index("row")["group"].astype(str)
        task = sel.drop_duplicates("row")
        missing = ~task["row"].isin(groups.index)
        if missing.any():
            raise ValueError(f"selections for '{finding}' name {int(missing.sum())} rows that are "
                             "not in the cohort table")
        n_train = groups.loc[task["row"]].value_counts()
        ms = sel[sel["method"].astype(str) == method]
        if ms.empty:
            removed = pd.Series(0.0, index=n_train.index)
        else:
            rem = ms[~ms["kept"].astype(bool)]
            per_seed = (pd.DataFrame({"seed": rem["seed"].to_numpy(),
                                      "group": groups.loc[rem["row"]].to_numpy()})
                        .groupby(["seed", "group"]).size().unstack(fill_value=0)
                        .reindex(index=sorted(ms["seed"].unique()), columns=n_train.index, fill_value=0))
            removed = per_seed.mean(axis=0)
        out = pd.DataFrame({"n_train": n_train, "removed": removed.reindex(n_train.index).fillna(0.0)})
        out.loc[OVERALL] = [out["n_train"].sum(), out["removed"].sum()]
        out["change_n"] = -out["removed"]
        return out.rename_axis("group").reset_index()

    # -- the tables of the study --------------------------------------------------
    def source_table(self, finding: str, method: str = "d3m", baseline: str = "erm",
                     split: str = "test", metric: str = "accuracy") -> pd.DataFrame:
        """The source study's table: per race (and Overall), baseline vs method.

        Columns: finding, group, n, <baseline>, <baseline>_lo, <baseline>_hi,
        <method>, <method>_lo, <method>_hi, change, change_lo, change_hi and, when
        selections and cohort were given, n_train, change_n.
        """
        pg = self.per_group(finding, split, metric, [baseline, method]).set_index(["method", "group"])
        if method == baseline:
            raise ValueError(f"method and baseline are both '{method}'")
        out = pd.DataFrame({"group": pg.loc[baseline].index, "n": pg.loc[baseline, "n"].to_numpy()})
        for m in (baseline, method):
            for c, src in ((m, "value"), (f"{m}_lo", "lo"), (f"{m}_hi", "hi")):
                out[c] = pg.loc[m, src].to_numpy()
        out = out.merge(self.change(finding, method, baseline, split, metric).drop(columns="n_pairs"), on="group")
        if self.selections is not None and self.cohort is not None:
            tc = self.train_counts(finding, method)
            out = out.merge(tc[["group", "n_train", "change_n"]], on="group", how="left")
        out.insert(0, "finding", finding)
        order = {g: i for i, g in enumerate(sorted(g for g in out["group"] if g != OVERALL))}
        order[OVERALL] = len(order)
        return out.sort_values("group", key=lambda s: s.map(order)).reset_index(drop=True)

    def forest_data(self, finding: str, baseline: str = "erm", methods: list[str] | None = None,
                    split: str = "test", metric: str = "accuracy") -> pd.DataFrame:
        """Per group and method: paired change vs ``baseline`` with interval (forest plot rows)."""
        methods = methods or [m for m in self.methods(finding) if m != baseline]
        counts = self._group_counts(finding, split)
        frames = []
        for m in methods:
            d = self.change(finding, m, baseline, split, metric)
            d.insert(0, "method", m)
            d["n"] = d["group"].map(counts["n"])
            frames.append(d)
        out = pd.concat(frames, ignore_index=True)
        out.insert(0, "finding", finding)
        out["metric"] = metric
        return out

    def worst_group_table(self, split: str = "test", metric: str = "accuracy",
                          findings: list[str] | None = None, methods: list[str] | None = None) -> pd.DataFrame:
        """Worst-group ``metric`` (minimum over groups) per finding and method.

        Point: mean over seeds of the per-seed minimum; interval: pooled
        percentile of per-replicate minima. Groups with fewer than
        ``min_group_n`` images are left out and listed in ``excluded_groups``.
        Columns: finding, method, wga, lo, hi, worst_group (most frequent
        per-seed argmin), n_worst, n_seeds, excluded_groups.
        """
        recs = []
        for f in findings or self.findings:
            vals = self._values(f, split, metric)
            counts = self._group_counts(f, split).drop(index=OVERALL)
            keep = [g for g in counts.index if counts.loc[g, "n"] >= self.min_group_n]
            excluded = [g for g in counts.index if g not in keep]
            if not keep:
                raise ValueError(f"{f}: no group has at least min_group_n={self.min_group_n} images")
            for m in methods or self.methods(f):
                if not any(mm == m for (mm, _) in vals):
                    continue
                seeds = self._seeds(f, m, split)
                pts = np.array([[vals[(m, s)][g][0] for g in keep] for s in seeds])  # seeds x groups
                reps = np.stack([np.stack([vals[(m, s)][g][1] for g in keep], 1) for s in seeds])  # s x B x g
                mins = np.nanmin(pts, axis=1)
                arg = [keep[i] for i in np.nanargmin(pts, axis=1)]
                worst = max(set(arg), key=arg.count)
                lo, hi = _percentile_interval(np.nanmin(reps, axis=2), self.ci_level)
                recs.append(dict(finding=f, method=m, wga=float(np.mean(mins)), lo=lo, hi=hi,
                                 worst_group=worst, n_worst=int(counts.loc[worst, "n"]),
                                 n_seeds=len(seeds), excluded_groups=", ".join(excluded)))
        return pd.DataFrame(recs)

    def wga_change(self, baseline: str = "erm", split: str = "test", metric: str = "accuracy",
                   findings: list[str] | None = None, methods: list[str] | None = None) -> pd.DataFrame:
        """Paired change of worst-group ``metric`` against ``baseline``, per finding and method.

        Within a seed and a bootstrap replicate both models are scored on the same
        resampled images; each side takes its own minimum over the groups kept by
        ``min_group_n`` (the worst group may differ). Point: mean over shared seeds;
        interval: pooled percentile over seeds x replicates.
        Columns: finding, method, change, lo, hi, n_pairs.
        """
        recs = []
        for f in findings or self.findings:
            vals = self._values(f, split, metric)
            counts = self._group_counts(f, split).drop(index=OVERALL)
            keep = [g for g in counts.index if counts.loc[g, "n"] >= self.min_group_n]
            if not keep:
                raise ValueError(f"{f}: no group has at least min_group_n={self.min_group_n} images")
            for m in methods or [mm for mm in self.methods(f) if mm != baseline]:
                seeds = sorted(set(self._seeds(f, m, split)) & set(self._seeds(f, baseline, split)))
                if not seeds:
                    raise ValueError(f"{f}: methods '{m}' and '{baseline}' share no seed")

                def worst(method, s):
                    pts = np.nanmin([vals[(method, s)][g][0] for g in keep])
                    reps = np.nanmin(np.stack([vals[(method, s)][g][1] for g in keep], 1), axis=1)
                    return pts, reps
                d_pts, d_reps = [], []
                for s in seeds:
                    (pm, rm), (pb, rb) = worst(m, s), worst(baseline, s)
                    d_pts.append(pm - pb)
                    d_reps.append(rm - rb)
                lo, hi = _percentile_interval(np.stack(d_reps), self.ci_level)
                recs.append(dict(finding=f, method=m, change=float(np.mean(d_pts)), lo=lo, hi=hi,
                                 n_pairs=len(seeds)))
        return pd.DataFrame(recs)

    def underdiagnosis(self, split: str = "test", finding: str = "No Finding",
                       methods: list[str] | None = None) -> pd.DataFrame:
        """False positive rate of "No Finding" per race and method.

        A false positive of "No Finding" is a patient with a finding called
        healthy: Seyyed-Kalantari et al.'s measure of underdiagnosis.
        """
        if finding not in self.findings:
            raise KeyError(f"'{finding}' is not among the findings of this run: {self.findings}")
        return self.per_group(finding, split, "fpr", methods)


def best_method(wga: pd.DataFrame, finding: str) -> str:
    """Method with the highest worst-group accuracy for ``finding`` in a worst_group_table."""
    sub = wga[wga["finding"] == finding]
    if sub.empty:
        raise KeyError(f"no worst-group rows for '{finding}'")
    return str(sub.loc[sub["wga"].idxmax(), "method"])


# -- who was removed ------------------------------------------------------------------
@dataclass
class RemovedSummary:
    """Tables describing the training images each selection removed (means over seeds)."""

    by_group: pd.DataFrame
    by_label: pd.DataFrame
    by_finding: pd.DataFrame
    planted: pd.DataFrame | None = None


def _label_name(v: float) -> str:
    if pd.isna(v):
        return "excluded (NaN)"
    return "positive" if v == 1 else "negative"


def removed_summary(selections: pd.DataFrame, cohort: pd.DataFrame,
                    ground_truth: pd.DataFrame | None = None) -> RemovedSummary:
    """Who each (finding, method) selection removed: by group, by label, overall.

    Counts are means over seeds. With the synthetic ``ground_truth``
    (``planted_ground_truth.csv.gz``: dicom_id, finding, kind), ``planted`` gives
    per finding, method and planted kind: planted training images, removed
    planted images, precision (share of removed images that are planted) and
    recall (share of planted images removed), and ``base_rate`` = planted /
    training images, the precision that removal at random would have in
    expectation. Ground-truth rows of other findings or of images outside the
    selection's training rows do not count.
    """
    _require_columns(selections, SELECTION_COLUMNS, "selections table")
    _require_columns(cohort, ("row", "group"), "cohort table")
    sel = selections.copy()
    sel["finding"] = sel["finding"].astype(str)
    sel["method"] = sel["method"].astype(str)
    sel["kept"] = sel["kept"].astype(bool)
    coh = cohort.set_index("row")
    missing = ~sel["row"].isin(coh.index)
    if missing.any():
        raise ValueError(f"selections name {int(missing.sum())} rows that are not in the cohort table")
    sel["group"] = coh.loc[sel["row"], "group"].astype(str).to_numpy()
    labels = np.full(len(sel), "", dtype=object)
    for f in sel["finding"].unique():
        m = (sel["finding"] == f).to_numpy()
        if f not in coh.columns:
            raise ValueError(f"cohort table has no label column '{f}'")
        labels[m] = [_label_name(v) for v in coh.loc[sel.loc[m, "row"], f].to_numpy()]
    sel["label"] = labels
    sel["removed"] = ~sel["kept"]
    n_seeds = sel.groupby(["finding", "method"])["seed"].nunique().rename("n_seeds")

    def summarise(keys):
        t = sel.groupby(["finding", "method", "seed"] + keys).agg(n_train=("row", "size"),
                                                                    removed=("removed", "sum"))
        t = t.groupby(["finding", "method"] + keys).agg(n_train=("n_train", "mean"), removed=("removed", "mean"))
        t = t.join(n_seeds).reset_index()
        t["removed_rate"] = t["removed"] / t["n_train"]
        tot = t.groupby(["finding", "method"])["removed"].transform("sum")
        t["share_of_removed"] = np.where(tot > 0, t["removed"] / tot.where(tot > 0, 1), np.nan)
        return t

    by_group = summarise(["group"])
    by_label = summarise(["label"])
    by_finding = summarise([]).drop(columns="share_of_removed")

    planted = None
    if ground_truth is not None:
        _require_columns(ground_truth, ("dicom_id", "finding", "kind"), "planted ground truth")
        _require_columns(cohort, ("image_id",), "cohort table")
        gt = ground_truth[["dicom_id", "finding", "kind"]].astype(str).drop_duplicates()
        sel["image_id"] = coh.loc[sel["row"], "image_id"].astype(str).to_numpy()
        recs = []
        for (f, m, s), g in sel.groupby(["finding", "method", "seed"]):
            kinds = gt[gt["finding"] == f]
            for kind in sorted(gt["kind"].unique()):
                ids = set(kinds.loc[kinds["kind"] == kind, "dicom_id"])
                is_pl = g["image_id"].isin(ids).to_numpy()
                rem = g["removed"].to_numpy()
                recs.append(dict(finding=f, method=m, seed=s, kind=kind, n_train=len(g),
                                 n_planted=int(is_pl.sum()), n_removed=int(rem.sum()),
                                 removed_planted=int((is_pl & rem).sum())))
        t = pd.DataFrame(recs)
        t["precision"] = t["removed_planted"] / t["n_removed"].where(t["n_removed"] > 0)
        t["recall"] = t["removed_planted"] / t["n_planted"].where(t["n_planted"] > 0)
        planted = (t.groupby(["finding", "method", "kind"])
                   .agg(n_train=("n_train", "mean"), n_planted=("n_planted", "mean"),
                        n_removed=("n_removed", "mean"), removed_planted=("removed_planted", "mean"),
                        precision=("precision", "mean"), precision_min=("precision", "min"),
                        precision_max=("precision", "max"), recall=("recall", "mean"),
                        recall_min=("recall", "min"), recall_max=("recall", "max"),
                        n_seeds=("seed", "nunique"))
                   .reset_index())
        planted["base_rate"] = planted["n_planted"] / planted["n_train"]
    return RemovedSummary(by_group, by_label, by_finding, planted)


# -- error analysis helpers (notebook 07) -------------------------------------------------
def worst_group_errors(predictions: pd.DataFrame, finding: str, n: int, method: str = "erm",
                       split: str = "test", seed: int | None = None,
                       min_group_n: int = 1) -> tuple[str, pd.DataFrame]:
    """The worst group of one model and its ``n`` most confidently misclassified images.

    The model is ``method`` at ``seed`` (default: the lowest seed). The worst
    group is the one with the lowest accuracy of that model on ``split`` among
    groups with at least ``min_group_n`` images; errors are ranked by
    ``|prob - threshold|`` (most confident first).
    Returns (group, table with row, group, y, prob, threshold, pred).
    """
    p = predictions
    sub = p[(p["finding"] == finding) & (p["method"] == method) & (p["split"] == split)]
    if sub.empty:
        raise KeyError(f"no '{method}' predictions for '{finding}' on split '{split}'")
    seed = int(sub["seed"].min()) if seed is None else int(seed)
    if seed not in set(sub["seed"].astype(int)):
        raise KeyError(f"no '{method}' predictions of seed {seed} for '{finding}' on '{split}'; "
                       f"seeds: {sorted(sub['seed'].unique())}")
    sub = sub[sub["seed"] == seed]
    right = (sub["pred"].astype(int) == sub["y"].astype(int)).groupby(sub["group"])
    acc = right.mean()[right.size() >= min_group_n]
    if acc.empty:
        raise ValueError(f"{finding}: no group has at least min_group_n={min_group_n} '{split}' images")
    worst = str(acc.idxmin())
    wrong = sub[(sub["group"] == worst) & (sub["pred"].astype(int) != sub["y"].astype(int))].copy()
    wrong["confidence"] = (wrong["prob"] - wrong["threshold"]).abs()
    wrong = wrong.sort_values(["confidence", "row"], ascending=[False, True]).head(int(n))
    return worst, wrong[["row", "group", "y", "prob", "threshold", "pred", "seed"]].reset_index(drop=True)


def influence_composition(scores: np.ndarray, train_rows, cohort: pd.DataFrame, finding: str,
                          k: int) -> pd.DataFrame:
    """Group and label mix of the ``k`` most positive and most negative training images per target.

    ``scores``: ``n_train x n_targets`` TRAK scores, rows in ``train_rows`` order.
    Returns, per direction (``positive``/``negative``/``all training``), group and
    label, the share of the selected images (pooled over targets).
    """
    train_rows = np.asarray(train_rows)
    if scores.shape[0] != len(train_rows):
        raise ValueError(f"scores have {scores.shape[0]} rows but there are {len(train_rows)} training rows")
    k = min(int(k), len(train_rows))
    order = np.argsort(scores, axis=0)
    coh = cohort.set_index("row")
    frames = []
    for name, pick in (("positive", order[::-1][:k]), ("negative", order[:k]),
                       ("all training", np.arange(len(train_rows))[:, None])):
        rows = train_rows[pick.ravel()]
        frames.append(pd.DataFrame({"direction": name, "group": coh.loc[rows, "group"].astype(str).to_numpy(),
                                    "label": [_label_name(v) for v in coh.loc[rows, finding].to_numpy()]}))
    d = pd.concat(frames, ignore_index=True)
    out = (d.groupby(["direction", "group", "label"]).size().rename("count").reset_index())
    out["share"] = out["count"] / out.groupby("direction")["count"].transform("sum")
    return out


def removed_vs_kept_means(images, selections: pd.DataFrame, cohort: pd.DataFrame, finding: str,
                          method: str = "d3m", seed: int | None = None, top_fraction: float = 0.02) -> dict:
    """Mean image of removed and kept training images per label, and where they differ most.

    Returns ``means`` ({"removed, positive": array, ...}), ``difference`` (removed
    minus kept mean, all labels pooled) and ``region_table``: per label, the mean
    intensity of removed and kept images inside the region of the ``top_fraction``
    pixels where the pooled means differ most (the region is chosen on the same
    images, so the table describes, it does not test).
    """
    sel = selections[(selections["finding"] == finding) & (selections["method"] == method)]
    if sel.empty:
        raise KeyError(f"no selection of method '{method}' for '{finding}'")
    seed = int(sel["seed"].min()) if seed is None else int(seed)
    sel = sel[sel["seed"] == seed]
    coh = cohort.set_index("row")
    rows = sel["row"].to_numpy()
    removed = ~sel["kept"].astype(bool).to_numpy()
    if removed.sum() == 0 or removed.all():
        raise ValueError(f"{method} seed {seed} removed {'nothing' if removed.sum() == 0 else 'everything'}"
                         f" for '{finding}': no removed/kept contrast")
    labels = np.array([_label_name(v) for v in coh.loc[rows, finding].to_numpy()])
    imgs = np.stack([np.asarray(images[int(r)], dtype=np.float64) for r in rows])
    means, recs = {}, []
    diff = imgs[removed].mean(0) - imgs[~removed].mean(0)
    thr = np.quantile(np.abs(diff), 1 - top_fraction)
    region = np.abs(diff) >= thr
    for lab in sorted(set(labels)):
        for name, m in (("removed", removed), ("kept", ~removed)):
            sel_m = m & (labels == lab)
            if sel_m.any():
                means[f"{name}, {lab}"] = imgs[sel_m].mean(0)
        r, k = removed & (labels == lab), ~removed & (labels == lab)
        recs.append(dict(label=lab, n_removed=int(r.sum()), n_kept=int(k.sum()),
                         region_mean_removed=float(imgs[r][:, region].mean()) if r.any() else np.nan,
                         region_mean_kept=float(imgs[k][:, region].mean()) if k.any() else np.nan,
                         whole_mean_removed=float(imgs[r].mean()) if r.any() else np.nan,
                         whole_mean_kept=float(imgs[k].mean()) if k.any() else np.nan))
    ys, xs = np.nonzero(region)
    return dict(means=means, difference=diff, region=region, region_table=pd.DataFrame(recs),
                region_center=(float(ys.mean() / diff.shape[0]), float(xs.mean() / diff.shape[1])),
                seed=seed)


def format_intervals(df: pd.DataFrame, columns, fmt: str = ".3f") -> pd.DataFrame:
    """Display copy of ``df``: each column ``c`` with ``c_lo``/``c_hi`` (or ``lo``/``hi``
    for ``c`` in ("value", "wga")) becomes one string ``est [lo, hi]``; the bound columns go."""
    out = df.copy()
    for c in columns:
        lo, hi = (f"{c}_lo", f"{c}_hi") if f"{c}_lo" in df.columns else ("lo", "hi")
        def num(v):  # no "-0.000" for values that round to zero
            return f"{float(f'{v:{fmt}}') + 0.0:{fmt}}"

        out[c] = [("" if pd.isna(e) else num(e) + ("" if pd.isna(a) else f" [{num(a)}, {num(b)}]"))
                  for e, a, b in zip(df[c], df[lo], df[hi])]
        out = out.drop(columns=[lo, hi])
    return out


def comparison_table(mc: MethodComparison, finding: str, baseline: str = "erm",
                     methods: list[str] | None = None, split: str = "test") -> pd.DataFrame:
    """One display table per finding: baseline accuracy, then per method accuracy, change and change in n.

    Every accuracy and change is ``est [lo, hi]``; ``Δn <method>`` is the mean
    number of that group's training images the method removed (negative).
    """
    methods = methods or [m for m in mc.methods(finding) if m not in (baseline, "base")]
    out = None
    for m in methods:
        t = mc.source_table(finding, m, baseline, split)
        t = format_intervals(t, [baseline, m, "change"])
        if out is None:
            out = t[["group", "n", baseline]].copy()
        out[f"{m}"] = t[m].to_numpy()
        out[f"Δ {m}"] = t["change"].to_numpy()
        if "change_n" in t:
            out[f"Δn {m}"] = t["change_n"].round(1).to_numpy()
    return out


def wide_per_group(per_group: pd.DataFrame, fmt: str = ".3f") -> pd.DataFrame:
    """Display table of a :meth:`MethodComparison.per_group` result: one row per group
    (n, n_pos), one column per method with ``est [lo, hi]`` (empty where undefined)."""
    f = format_intervals(per_group, ["value"], fmt)
    wide = f.pivot(index="group", columns="method", values="value")
    wide = wide[list(dict.fromkeys(per_group["method"]))]
    counts = per_group.drop_duplicates("group").set_index("group")[["n", "n_pos"]]
    order = [g for g in counts.index if g != OVERALL] + ([OVERALL] if OVERALL in counts.index else [])
    return counts.join(wide).loc[order].reset_index()


def wga_wide(wga: pd.DataFrame, method_order=("erm", "base", "d3m", "random", "balanced", "auto_d3m"),
             fmt: str = ".3f") -> pd.DataFrame:
    """Display table of a :meth:`MethodComparison.worst_group_table`: one row per finding,
    one column per method (``est [lo, hi]``), methods in ``method_order`` then any others."""
    wide = format_intervals(wga, ["wga"], fmt).pivot(index="finding", columns="method", values="wga")
    cols = [m for m in method_order if m in wide.columns] + [m for m in wide.columns if m not in method_order]
    return wide[cols].loc[list(dict.fromkeys(wga["finding"]))].reset_index()


def headline_from_forest(forest: pd.DataFrame, wga: pd.DataFrame, baseline: str = "erm") -> pd.DataFrame:
    """Per finding and method: paired change against ``baseline`` on the baseline's worst group.

    ``forest``: :meth:`MethodComparison.forest_data` rows; ``wga``: its
    :meth:`~MethodComparison.worst_group_table`. A stand-in for
    :meth:`MethodComparison.wga_change` when only these tables were saved.
    Columns: finding, method, change, lo, hi, group.
    """
    _require_columns(forest, ["finding", "method", "group", "change", "change_lo", "change_hi"], "forest")
    _require_columns(wga, ["finding", "method", "worst_group"], "worst-group table")
    worst = wga[wga["method"] == baseline].set_index("finding")["worst_group"].astype(str)
    f = forest[forest["method"] != baseline].copy()
    f["finding"] = f["finding"].astype(str)
    f = f[f["group"].astype(str) == f["finding"].map(worst)]
    out = f.rename(columns={"change_lo": "lo", "change_hi": "hi"})
    return out[["finding", "method", "change", "lo", "hi", "group"]].reset_index(drop=True)
