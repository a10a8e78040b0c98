"""Per-race comparison of training methods across seeds, with intervals.

One object, :class:`MethodComparison`, answers every per-group question that
notebooks 05, 06 and 07 ask of ``05_d3m/predictions.parquet``: per-group metrics
per method, the source study's table (baseline vs D3M per race, with the change
and the change in training images), worst-group accuracy across findings and
methods, paired differences between methods (:meth:`MethodComparison.paired_table`),
the share of the oracle's gain a method recovers, forest-plot data, AUROC per
group and the underdiagnosis view (false positive rate of "No Finding" per
race, Seyyed-Kalantari et al.). :func:`removed_summary` says who a selection
removed; :func:`worst_group_errors`, :func:`influence_composition` and
:func:`removed_vs_kept_means` serve the error analysis (notebook 07);
:func:`comparison_table`, :func:`wide_per_group`, :func:`wga_wide` and
:func:`format_intervals` make display tables.

Every number comes from :class:`d3m_lib.metrics.GroupMetrics`, one per
(finding, split), over every (method, seed) model on the same images. Its module
docstring states the rules: patient-level cluster bootstrap within group,
every model on the same patient resamples (point = mean over seeds; interval =
two-level bootstrap of that mean, seeds and patients resampled), paired differences per seed and
resample (seeds paired by number: a method's seed ``s`` and the baseline's seed
``s`` start from the same anchor checkpoint), and one worst-group rule
(``min_group_n``, ties to the group name sorting first).

Patients: the predictions table has no patient column, so the cohort table's
``subject_id`` is joined on ``row``. Without it the bootstrap falls back to
images, with a warning, and :attr:`MethodComparison.cluster_unit` says ``image``.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import methods as _methods
from .constants import PLANTED_KINDS
from .metrics import ALL as OVERALL  # the overall row is named as in metrics.group_metrics
from .metrics import AVAILABLE_METRICS, GroupMetrics, metric_values, pick_worst

METRICS = ("accuracy", "fpr", "fnr", "auroc")
PRED_COLUMNS = ("finding", "method", "seed", "split", "row", "group", "y", "prob", "pred")
SELECTION_COLUMNS = ("finding", "method", "seed", "row", "kept")
# The paired comparisons the book reports, in this order (those whose two methods were run).
DEFAULT_PAIRS = (("d3m", "random"), ("d3m", "erm"), ("auto_d3m", "auto_random"), ("auto_d3m", "random"),
                 ("oracle", "erm"), ("d3m", "balanced"))


def _require_columns(df: pd.DataFrame, cols, what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; has {list(df.columns)}")


def weighted_metric(metric: str, y: np.ndarray, pred: np.ndarray, prob: np.ndarray,
                    weights: np.ndarray) -> np.ndarray:
    """Deprecated alias of :func:`d3m_lib.metrics.metric_values` (same arguments, reordered)."""
    return metric_values(metric, y, pred, prob, weights)


def _stable_seed(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


class MethodComparison:
    """Per-group metrics of every method on every finding, pooled over seeds.

    Parameters
    ----------
    predictions : the long table ``05_d3m/predictions.parquet``.
    selections : ``05_d3m/selections.parquet`` (optional; needed for the change
        in training images in :meth:`source_table`).
    cohort : ``01_cohort/cohort.parquet`` (optional; gives training rows' groups
        and, with ``subject_id``, the patients the bootstrap resamples).
    n_boot, ci_level, seed : bootstrap resamples, interval level, random seed.
    min_group_n : groups with fewer evaluation images than this are left out of
        worst-group accuracy (listed in the table's ``excluded_groups``).
    """

    def __init__(self, predictions: pd.DataFrame, selections: pd.DataFrame | None = None,
                 cohort: pd.DataFrame | None = None, n_boot: int = 1000,
                 ci_level: float = 0.95, seed: int = 0, min_group_n: int = 1,
                 n_boot_descriptive: int | None = None):
        _require_columns(predictions, PRED_COLUMNS, "predictions table")
        if not 0 < ci_level < 1:
            raise ValueError(f"ci_level must be in (0, 1), got {ci_level}")
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        p = predictions.copy()
        for c in ("finding", "method", "split", "group"):
            p[c] = p[c].astype(str)
        p["seed"] = p["seed"].astype(int)
        p["row"] = p["row"].astype(int)
        p["draw"] = p["draw"].fillna(0).astype(int) if "draw" in p.columns else 0  # draws of a control
        dup = p.duplicated(["finding", "method", "seed", "draw", "split", "row"])
        if dup.any():
            raise ValueError(f"predictions table has {int(dup.sum())} duplicated "
                             "(finding, method, seed, draw, split, row) entries")
        bad_y = ~p["y"].isin([0, 1])
        if bad_y.any():
            raise ValueError(f"predictions column 'y' must be 0/1; {int(bad_y.sum())} rows are not")
        if selections is not None:
            _require_columns(selections, SELECTION_COLUMNS, "selections table")
        if cohort is not None:
            _require_columns(cohort, ("row", "group", "split"), "cohort table")
        self.cluster_unit = "image"
        if "subject_id" not in p.columns and cohort is not None and "subject_id" in cohort.columns:
            subj = cohort.set_index("row")["subject_id"]
            missing = ~p["row"].isin(subj.index)
            if missing.any():
                raise ValueError(f"{int(missing.sum())} predictions name rows that are not in the cohort table")
            p["subject_id"] = subj.loc[p["row"]].astype(str).to_numpy()
        if "subject_id" in p.columns:
            self.cluster_unit = "patient"
        else:
            warnings.warn("MethodComparison: no subject_id (pass the cohort with its subject_id column): "
                          "intervals resample images, not patients", stacklevel=2)
        self.predictions = p
        self.selections = selections
        self.cohort = cohort
        self.n_boot, self.ci_level, self.seed = int(n_boot), float(ci_level), int(seed)
        self.n_boot_descriptive = int(n_boot_descriptive or n_boot)
        self.min_group_n = int(min_group_n)
        self._engines: dict = {}

    # -- what is there ------------------------------------------------------
    @property
    def findings(self) -> list[str]:
        return list(dict.fromkeys(self.predictions["finding"]))

    def methods(self, finding: str | None = None) -> list[str]:
        p = self.predictions if finding is None else self.predictions[self.predictions["finding"] == finding]
        return list(dict.fromkeys(p["method"]))

    # -- the engine of one (finding, split) -----------------------------------------
    def engine(self, finding: str, split: str = "test", descriptive: bool = False) -> GroupMetrics:
        """The :class:`~d3m_lib.metrics.GroupMetrics` of every (method, seed) model on one finding and split.

        ``descriptive``: the engine with ``n_boot_descriptive`` replicates, for tables no claim rests on
        (per-group AUROC): the same rule, fewer replicates.
        """
        key = (finding, split, descriptive)
        if key not in self._engines:
            p = self.predictions
            sub = p[(p["finding"] == finding) & (p["split"] == split)]
            if sub.empty:
                raise KeyError(f"no predictions for finding '{finding}' on split '{split}'; "
                               f"findings: {self.findings}, splits: {sorted(p['split'].unique())}")
            try:
                self._engines[key] = GroupMetrics.from_frame(
                    sub, cluster="subject_id" if self.cluster_unit == "patient" else None, model="method",
                    seed="seed", row="row", draw="draw",
                    n_boot=self.n_boot_descriptive if descriptive else self.n_boot, ci_level=self.ci_level,
                    random_state=[self.seed, _stable_seed(finding, split)], min_group_n=self.min_group_n)
            except ValueError as e:
                raise ValueError(f"{finding}/{split}: {e}") from e
        return self._engines[key]

    def _group_counts(self, finding: str, split: str) -> pd.DataFrame:
        return self.engine(finding, split).counts

    def _seeds(self, finding: str, method: str, split: str) -> list[int]:
        try:
            return self.engine(finding, split).seeds(method)
        except KeyError:
            raise KeyError(f"no predictions of method '{method}' for '{finding}' on '{split}'; "
                           f"methods: {self.methods(finding)}") from None

    # -- per-group metrics ------------------------------------------------------
    def per_group(self, finding: str, split: str = "test", metric: str = "accuracy",
                  methods: list[str] | None = None, descriptive: bool = False) -> pd.DataFrame:
        """Per group (and Overall) and method: ``metric`` mean over seeds, interval, n.

        Columns: finding, split, metric, method, group, value, lo, hi, seed_sd,
        n_seeds, n, n_pos, n_clusters, note (why a value is NaN: a group without
        negatives has no FPR, one without positives no FNR; AUROC needs both).
        """
        if metric not in AVAILABLE_METRICS:
            raise ValueError(f"unknown metric '{metric}'; choose from {AVAILABLE_METRICS}")
        methods = methods or self.methods(finding)
        for m in methods:
            self._seeds(finding, m, split)
        t = self.engine(finding, split, descriptive).table(metric, methods).rename(columns={"model": "method"})
        t.insert(0, "split", split)
        t.insert(0, "finding", finding)
        return t[["finding", "split", "metric", "method", "group", "value", "lo", "hi", "seed_sd", "n_seeds",
                  "n", "n_pos", "n_clusters", "note"]]

    def change(self, finding: str, method: str, baseline: str = "erm", split: str = "test",
               metric: str = "accuracy") -> pd.DataFrame:
        """Paired change ``method - baseline`` per group: mean over shared seeds, interval.

        Columns: group, change, change_lo, change_hi, n_pairs.
        """
        for m in (method, baseline):
            self._seeds(finding, m, split)
        try:
            d = self.engine(finding, split).paired_difference_ci(method, baseline, metric)
        except ValueError as e:
            raise ValueError(f"{finding}: {e}") from e
        return pd.DataFrame({"group": d["group"], "change": d["value"], "change_lo": d["lo"],
                             "change_hi": d["hi"], "n_pairs": d["n_seeds"]})

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
            rep = ["seed", "draw"] if "draw" in ms.columns else ["seed"]   # a control's draws are replicates
            models = ms[rep].drop_duplicates().sort_values(rep)
            models = pd.MultiIndex.from_frame(models) if len(rep) > 1 else pd.Index(models["seed"], name="seed")
            per_seed = (pd.DataFrame({**{k: rem[k].to_numpy() for k in rep},
                                      "group": groups.loc[rem["row"]].to_numpy()})
                        .groupby([*rep, "group"]).size().unstack(fill_value=0)
                        .reindex(index=models, columns=n_train.index, fill_value=0))
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
        """Worst-group ``metric`` per finding and method (the one rule of :mod:`d3m_lib.metrics`).

        Worst = lowest (highest for FPR/FNR) over groups with at least
        ``min_group_n`` images; point: mean over seeds of each seed's worst value;
        interval: the two-level bootstrap of that mean (:mod:`d3m_lib.metrics`).
        Columns: finding, method, wga, lo, hi, worst_group (worst group of the
        seed means; ties to the name sorting first), n_worst, n_seeds, excluded_groups.
        """
        frames = []
        for f in findings or self.findings:
            eng = self.engine(f, split)
            ms = [m for m in (methods or self.methods(f)) if m in eng.models]
            if not eng.eligible:
                raise ValueError(f"{f}: no group has at least min_group_n={self.min_group_n} images")
            t = eng.worst_ci(metric, ms)
            frames.append(pd.DataFrame({"finding": f, "method": t["model"], "wga": t["value"], "lo": t["lo"],
                                        "hi": t["hi"], "worst_group": t["group"], "n_worst": t["n"],
                                        "n_seeds": t["n_seeds"], "excluded_groups": t["excluded_groups"]}))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["finding", "method", "wga", "lo", "hi", "worst_group", "n_worst", "n_seeds", "excluded_groups"])

    def paired_table(self, pairs=DEFAULT_PAIRS, split: str = "test", metric: str = "accuracy",
                     findings: list[str] | None = None) -> pd.DataFrame:
        """Paired worst-group differences ``a - b`` per finding, for the pairs whose methods were run.

        Each method's worst group is taken per seed and resample; seeds paired by
        number; the interval is that of the mean over seeds (two-level bootstrap).
        Columns: finding, a, b, diff, lo, hi, seed_sd, n_pairs, excludes_zero, p (two-sided
        bootstrap p-value of 0).
        """
        recs = []
        for f in findings or self.findings:
            eng = self.engine(f, split)
            for a, b in dict.fromkeys(map(tuple, pairs)):
                if a in eng.models and b in eng.models:
                    d = eng.paired_worst_ci(a, b, metric)
                    recs.append(dict(finding=f, a=a, b=b, diff=d["value"], lo=d["lo"], hi=d["hi"],
                                     seed_sd=d["seed_sd"], n_pairs=d["n_seeds"],
                                     excludes_zero=bool(d["lo"] > 0 or d["hi"] < 0), p=d["p"]))
        return pd.DataFrame(recs, columns=["finding", "a", "b", "diff", "lo", "hi", "seed_sd", "n_pairs",
                                           "excludes_zero", "p"])

    def seed_differences(self, pairs, split: str = "test", metric: str = "accuracy",
                         findings: list[str] | None = None) -> pd.DataFrame:
        """Each seed's paired worst-group difference ``a - b`` on the full test set (the per-seed values
        shown beside every headline interval). Columns: finding, a, b, seed, diff."""
        recs = []
        for f in findings or self.findings:
            eng = self.engine(f, split)
            for a, b in dict.fromkeys(map(tuple, pairs)):
                if a in eng.models and b in eng.models:
                    seeds, d = eng.paired_worst(a, b, metric)
                    recs += [dict(finding=f, a=a, b=b, seed=s, diff=float(v)) for s, v in zip(seeds, d[:, 0])]
        return pd.DataFrame(recs, columns=["finding", "a", "b", "seed", "diff"])

    def recovery(self, method: str = "d3m", ceiling: str = "oracle", baseline: str = "erm",
                 split: str = "test", metric: str = "accuracy", findings: list[str] | None = None) -> pd.DataFrame:
        """Share of the ceiling's worst-group gain over ``baseline`` that ``method`` recovers, per finding.

        See :meth:`d3m_lib.metrics.GroupMetrics.recovery_ci`. Columns: finding,
        method, share, lo, hi, gain, gain_lo, gain_hi, n_seeds, reason.
        """
        recs = []
        for f in findings or self.findings:
            eng = self.engine(f, split)
            if all(m in eng.models for m in (method, ceiling, baseline)):
                recs.append(dict(finding=f, method=method, **eng.recovery_ci(method, ceiling, baseline, metric)))
        return pd.DataFrame(recs)

    def wga_change(self, baseline: str = "erm", split: str = "test", metric: str = "accuracy",
                   findings: list[str] | None = None, methods: list[str] | None = None) -> pd.DataFrame:
        """Paired change of worst-group ``metric`` against ``baseline``, per finding and method.

        The engine's :meth:`~d3m_lib.metrics.GroupMetrics.paired_worst_ci`: both models on the
        same resampled patients, each side its own worst group. Columns: finding, method,
        change, lo, hi, n_pairs.
        """
        recs = []
        for f in findings or self.findings:
            eng = self.engine(f, split)
            for m in methods or [mm for mm in self.methods(f) if mm != baseline]:
                d = eng.paired_worst_ci(m, baseline, metric)
                recs.append(dict(finding=f, method=m, change=d["value"], lo=d["lo"], hi=d["hi"],
                                 n_pairs=d["n_seeds"]))
        return pd.DataFrame(recs)

    def error_rates(self, finding: str, group: str, baseline: str = "erm", split: str = "test",
                    methods: list[str] | None = None) -> pd.DataFrame:
        """False positive and false negative rate of one group per arm, and each arm's paired change against
        ``baseline`` (intervals of the mean over seeds). Shows *how* an arm moved a group's accuracy.

        Columns: finding, group, method, metric, value, lo, hi, change, change_lo, change_hi.
        """
        recs = []
        methods = [m for m in (methods or self.methods(finding)) if m != "base"]
        for metric in ("fpr", "fnr"):
            pg = self.per_group(finding, split, metric, methods).set_index(["method", "group"])
            for m in methods:
                v = pg.loc[(m, group)]
                ch = (dict(change=0.0, change_lo=0.0, change_hi=0.0) if m == baseline else
                      self.change(finding, m, baseline, split, metric).set_index("group").loc[group]
                      [["change", "change_lo", "change_hi"]].to_dict())
                recs.append(dict(finding=finding, group=group, method=m, metric=metric, value=v["value"],
                                 lo=v["lo"], hi=v["hi"], **ch))
        return pd.DataFrame(recs)

    def alternatives(self, finding: str, versus=("erm", "d3m"), split: str = "test",
                     methods: list[str] | None = None) -> pd.DataFrame:
        """Every retrained arm on one finding, in the D3M paper's table form: worst-group accuracy, mean
        accuracy and worst-group AUROC (each the mean over seeds with its interval), and the paired
        worst-group accuracy difference against each arm of ``versus`` that ran, with its p.

        Columns: method, wga, wga_lo, wga_hi, acc, acc_lo, acc_hi, wg_auroc, wg_auroc_lo, wg_auroc_hi, then
        per reference ``r``: ``vs_<r>``, ``vs_<r>_lo``, ``vs_<r>_hi``, ``vs_<r>_p``.
        """
        ms = [m for m in (methods or _methods.order(self.methods(finding)))
              if m in self.engine(finding, split).models and (m not in _methods.REGISTRY
                                                               or _methods.get(m).retrained)]
        wga = self.worst_group_table(split, "accuracy", [finding], ms).set_index("method")
        auc = self.worst_group_table(split, "auroc", [finding], ms).set_index("method")
        acc = self.per_group(finding, split, "accuracy", ms)
        acc = acc[acc["group"] == OVERALL].set_index("method")
        out = pd.DataFrame({"method": ms})
        for col, t, v in (("wga", wga, "wga"), ("acc", acc, "value"), ("wg_auroc", auc, "wga")):
            out[col] = t.loc[ms, v].to_numpy()
            out[f"{col}_lo"], out[f"{col}_hi"] = t.loc[ms, "lo"].to_numpy(), t.loc[ms, "hi"].to_numpy()
        for ref in versus:
            if ref not in ms:
                continue
            pt = self.paired_table([(m, ref) for m in ms if m != ref], split, "accuracy", [finding]).set_index("a")
            for k, c in (("", "diff"), ("_lo", "lo"), ("_hi", "hi"), ("_p", "p")):
                out[f"vs_{ref}{k}"] = [pt.loc[m, c] if m in pt.index else np.nan for m in ms]
        return out

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
    """Method with the highest worst-group accuracy for ``finding`` in a worst_group_table.

    Ties (equal to 12 decimals) go to the method listed first in the registry
    (:func:`d3m_lib.methods.order`). Prefer a paired comparison
    (:meth:`MethodComparison.paired_table`) before calling a method better.
    """
    sub = wga[wga["finding"] == finding]
    if sub.empty:
        raise KeyError(f"no worst-group rows for '{finding}'")
    rank = {m: i for i, m in enumerate(_methods.order(sub["method"]))}
    key = [(-round(float(v), 12) if np.isfinite(v) else np.inf, rank[m]) for m, v in zip(sub["method"], sub["wga"],
                                                                                         strict=True)]
    return str(sub["method"].iloc[min(range(len(key)), key=key.__getitem__)])


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
    rep = ["seed", "draw"] if "draw" in sel.columns else ["seed"]   # a control's draws: replicates, averaged

    def summarise(keys):
        t = sel.groupby(["finding", "method", *rep] + keys).agg(n_train=("row", "size"),
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
        for (f, m, s, *_), g in sel.groupby(["finding", "method", *rep]):
            kinds = gt[gt["finding"] == f]
            for kind in sorted(set(gt["kind"]) | set(PLANTED_KINDS)):   # a kind a scenario does not plant: 0 rows
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
    groups with at least ``min_group_n`` images (ties to the name sorting
    first: :func:`d3m_lib.metrics.pick_worst`); errors are ranked by
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
    eng = GroupMetrics(sub["y"].to_numpy(), sub["prob"].to_numpy(), sub["pred"].to_numpy(),
                       sub["group"].to_numpy(), n_boot=0, min_group_n=min_group_n)
    if not eng.eligible:
        raise ValueError(f"{finding}: no group has at least min_group_n={min_group_n} '{split}' images")
    acc = eng.by_group("accuracy").set_index("group").loc[eng.eligible, "value"]
    worst = pick_worst(acc.index, acc.to_numpy(), "accuracy")[0]
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
                          method: str = "d3m", seed: int | None = None, top_fraction: float = 0.02,
                          chunk: int = 1024) -> dict:
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
    # Sums per (removed/kept, label), a chunk of images at a time: memory is one chunk, not the training set.
    keys = [(name, lab) for lab in sorted(set(labels)) for name in ("removed", "kept")]
    sums, counts = {}, {k: 0 for k in keys}
    for start in range(0, len(rows), chunk):
        part = slice(start, start + chunk)
        imgs = np.stack([np.asarray(images[int(r)], dtype=np.float64) for r in rows[part]])
        for name, lab in keys:
            m = ((removed[part] if name == "removed" else ~removed[part]) & (labels[part] == lab))
            if m.any():
                add = imgs[m].sum(0)
                sums[(name, lab)] = sums[(name, lab)] + add if (name, lab) in sums else add
                counts[(name, lab)] += int(m.sum())

    def pooled(name):
        return sum(v for (n, _), v in sums.items() if n == name) / sum(c for (n, _), c in counts.items() if n == name)

    means = {f"{name}, {lab}": sums[(name, lab)] / counts[(name, lab)] for name, lab in keys if counts[(name, lab)]}
    diff = pooled("removed") - pooled("kept")
    thr = np.quantile(np.abs(diff), 1 - top_fraction)
    region = np.abs(diff) >= thr
    recs = []
    for lab in sorted(set(labels)):
        r, k = means.get(f"removed, {lab}"), means.get(f"kept, {lab}")
        recs.append(dict(label=lab, n_removed=counts[("removed", lab)], n_kept=counts[("kept", lab)],
                         region_mean_removed=float(r[region].mean()) if r is not None else np.nan,
                         region_mean_kept=float(k[region].mean()) if k is not None else np.nan,
                         whole_mean_removed=float(r.mean()) if r is not None else np.nan,
                         whole_mean_kept=float(k.mean()) if k is not None else np.nan))
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
    methods = methods or [m for m in _methods.order(mc.methods(finding)) if m not in (baseline, "base")]
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


def wga_wide(wga: pd.DataFrame, method_order=None, fmt: str = ".3f") -> pd.DataFrame:
    """Display table of a :meth:`MethodComparison.worst_group_table`: one row per arm (labelled, in
    ``method_order``, default the registry's, then any others), one column per finding (``est [lo, hi]``).
    Arms run down the page, so many arms never push the table off it."""
    method_order = _methods.order() if method_order is None else tuple(method_order)
    wide = format_intervals(wga, ["wga"], fmt).pivot(index="method", columns="finding", values="wga")
    rows = [m for m in method_order if m in wide.index] + [m for m in wide.index if m not in method_order]
    out = wide.loc[rows, list(dict.fromkeys(wga["finding"]))].reset_index()
    out.columns.name = None
    out.insert(0, "arm", [_methods.label(m) for m in out.pop("method")])
    return out


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
