"""The discrepancy scan: which of the 14 findings show the largest gaps between groups?

One *shared* multi-label model is trained over all available findings
(NaN-masked BCE), not 14 binary models: it costs one training run instead of
14, and every finding is judged on the same images by a model of the same
capacity, so the gaps are comparable across findings. The scan only ranks
findings; the study's models (notebook 03) are then trained per finding.

Steps: :func:`train_scan_model` (train split) -> :func:`scan_predictions`
(threshold per finding on validate) -> :func:`metrics_from_predictions`
(per-group metrics on validate, the one engine :class:`~d3m_lib.metrics.GroupMetrics`)
and :func:`gap_intervals` -> :func:`rank_findings` (gaps, eligibility) ->
:func:`choose_findings`. :mod:`d3m_lib.stages.scan` runs them for notebook 02.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .constants import FINDINGS
from .metrics import ALL, GroupMetrics, best_group, choose_threshold, gap, group_metrics, worst_group
from .training import TrainConfig, predict, train


def available_findings(cohort: pd.DataFrame, findings=FINDINGS) -> tuple[list[str], dict[str, str]]:
    """Findings with labels in this cohort, and ``{finding: reason}`` for the others."""
    avail, unavailable = [], {}
    for f in findings:
        if f not in cohort.columns:
            unavailable[f] = "unavailable: no such column in the cohort table"
        elif cohort[f].notna().sum() == 0:
            unavailable[f] = "unavailable: all labels missing (NaN) in this dataset"
        elif cohort.loc[cohort["split"] == "train", f].nunique(dropna=True) < 2:
            unavailable[f] = "unavailable: training split lacks one of the two classes"
        else:
            avail.append(f)
    return avail, unavailable


def label_counts(cohort: pd.DataFrame, findings) -> pd.DataFrame:
    """Images with a label (``n``) and positives (``n_pos``) per finding, split and group."""
    out = []
    for f in findings:
        sub = cohort[cohort[f].notna()]
        c = sub.groupby(["split", "group"], observed=True)[f].agg(n="size", n_pos="sum").reset_index()
        c.insert(0, "finding", f)
        out.append(c)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(
        columns=["finding", "split", "group", "n", "n_pos"])


def train_scan_model(cfg: TrainConfig, images: np.ndarray, cohort: pd.DataFrame, findings,
                     epochs: int, out_dir: str | Path, progress: bool = True) -> pd.DataFrame:
    """Train the shared multi-label model for ``epochs`` epochs on the train split.

    Training images are those with at least one label among ``findings``.
    The learning-rate schedule spans exactly ``epochs``. Returns the history;
    the last checkpoint is ``out_dir/epoch_{epochs:02d}.pt``.
    """
    cfg = TrainConfig(**{**cfg.to_dict(), "epochs_anchor": int(epochs), "epochs_more": 0})
    findings = list(findings)
    tr = cohort[(cohort["split"] == "train") & cohort[findings].notna().any(axis=1)]
    va = cohort[(cohort["split"] == "validate") & cohort[findings].notna().any(axis=1)]
    val = (va["row"].to_numpy(), va[findings].to_numpy(np.float32), va["group"].astype(str).to_numpy())
    return train(cfg, images, tr["row"].to_numpy(), tr[findings].to_numpy(np.float32), (0, int(epochs)),
                 out_dir, val=val, num_outputs=len(findings), progress=progress)


def scan_predictions(cfg: TrainConfig, images: np.ndarray, cohort: pd.DataFrame, findings, checkpoint,
                     threshold_rule: str = "youden") -> tuple[pd.DataFrame, dict[str, float]]:
    """The scan model's validate predictions, one row per finding and labelled image.

    For each finding the threshold is chosen on its validate images by
    ``threshold_rule`` (all groups together; 0.5 when one class is absent).
    Returns the long table (finding, row, subject_id when the cohort has it,
    group, y, prob, pred) and ``{finding: threshold}``.
    """
    findings = list(findings)
    va = cohort[cohort["split"] == "validate"]
    logits = predict(checkpoint, cfg, images, va["row"].to_numpy(), num_outputs=len(findings))
    logits = logits.reshape(len(va), len(findings))
    keep = [c for c in ("row", "subject_id", "group") if c in va.columns]
    frames, thresholds = [], {}
    for k, f in enumerate(findings):
        m = va[f].notna().to_numpy()
        y = va.loc[m, f].to_numpy().astype(int)
        prob = 1 / (1 + np.exp(-logits[m, k].astype(float)))
        t = choose_threshold(y, prob, threshold_rule) if len(np.unique(y)) == 2 else 0.5
        thresholds[f] = float(t)
        d = va.loc[m, keep].copy()
        d["group"] = d["group"].astype(str)
        d.insert(0, "finding", f)
        d["y"], d["prob"], d["pred"] = y, prob, (prob >= t).astype(int)
        frames.append(d)
    return pd.concat(frames, ignore_index=True), thresholds


def _clusters(d: pd.DataFrame):
    return d["subject_id"].to_numpy() if "subject_id" in d.columns else None


def metrics_from_predictions(preds: pd.DataFrame, findings, n_boot: int = 200, ci_level: float = 0.95,
                             seed: int = 0, min_n: int = 1) -> pd.DataFrame:
    """Per-finding, per-group metrics (accuracy, AUROC, FPR, FNR) of :func:`scan_predictions`.

    Patient-level bootstrap intervals (``subject_id``; images if absent); the
    bootstrap of the k-th finding is seeded ``seed + k``. Long table: finding,
    group, metric, value, lo, hi, n, n_pos, note.
    """
    tables = []
    for k, f in enumerate(findings):
        d = preds[preds["finding"] == f]
        df = group_metrics(d["y"].to_numpy(), d["prob"].to_numpy(), d["pred"].to_numpy(), d["group"].to_numpy(),
                           n_boot=n_boot, ci_level=ci_level, seed=seed + k, min_n=min_n, clusters=_clusters(d))
        df.insert(0, "finding", f)
        tables.append(df)
    return pd.concat(tables, ignore_index=True)


def gap_intervals(preds: pd.DataFrame, findings, n_boot: int = 200, ci_level: float = 0.95, seed: int = 0,
                  min_group_n: int = 1, metrics=("accuracy", "auroc")) -> pd.DataFrame:
    """The between-group gap (best minus worst group) of each finding with its interval.

    :meth:`GroupMetrics.difference_ci` on the same patient resamples as
    :func:`metrics_from_predictions` (seed ``seed + k``), over groups with at
    least ``min_group_n`` validate images: the point equals ``rank_findings``'s
    gap. Columns: finding, then ``gap_<metric>_lo`` / ``gap_<metric>_hi``
    (NaN where fewer than two groups qualify).
    """
    recs = []
    for k, f in enumerate(findings):
        d = preds[preds["finding"] == f]
        gm = GroupMetrics(d["y"].to_numpy(), d["prob"].to_numpy(), d["pred"].to_numpy(), d["group"].to_numpy(),
                          cluster=_clusters(d), n_boot=n_boot, ci_level=ci_level, random_state=seed + k,
                          min_group_n=min_group_n)
        rec = {"finding": f}
        for metric in metrics:
            try:
                r = gm.difference_ci(metric).iloc[0]
                rec[f"gap_{metric}_lo"], rec[f"gap_{metric}_hi"] = float(r["lo"]), float(r["hi"])
            except ValueError:  # no group reaches min_group_n with a defined metric
                rec[f"gap_{metric}_lo"] = rec[f"gap_{metric}_hi"] = np.nan
        recs.append(rec)
    return pd.DataFrame(recs)


def scan_metrics(cfg: TrainConfig, images: np.ndarray, cohort: pd.DataFrame, findings, checkpoint,
                 threshold_rule: str = "youden", n_boot: int = 200, ci_level: float = 0.95,
                 seed: int = 0, min_n: int = 1) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-finding, per-group metrics of the scan model on the validate split.

    :func:`scan_predictions` then :func:`metrics_from_predictions`. Returns the
    long table (finding, group, metric, value, lo, hi, n, n_pos, note) and the thresholds.
    """
    preds, thresholds = scan_predictions(cfg, images, cohort, findings, checkpoint, threshold_rule)
    return metrics_from_predictions(preds, list(findings), n_boot, ci_level, seed, min_n), thresholds


def rank_findings(scan: pd.DataFrame, counts: pd.DataFrame, min_group_n: int = 20,
                  min_group_pos: int = 5, unavailable: dict[str, str] | None = None,
                  splits=("train", "validate", "test")) -> pd.DataFrame:
    """One row per finding: gaps, worst/best group, eligibility, rank by accuracy gap.

    Eligible: in every group present in the cohort and in each of ``splits``,
    at least ``min_group_n`` labelled images and ``min_group_pos`` positives
    (otherwise per-group accuracy, and D3M's per-group validation loss, are
    too noisy to act on). ``reason`` says why a finding is not eligible.
    ``rank`` (1 = largest accuracy gap) is given to eligible findings only;
    ``gap_auroc`` is shown alongside. Worst/best group and gaps use the one
    worst-group rule of :mod:`d3m_lib.metrics`: groups with at least
    ``min_group_n`` validate images, ties to the name sorting first.
    """
    groups = sorted(set(counts["group"]))
    recs = []
    for f, sub in scan.groupby("finding", sort=False):
        w_g, w_v = worst_group(sub, "accuracy", min_group_n)
        b_g, b_v = best_group(sub, "accuracy", min_group_n)
        wa_g, wa_v = worst_group(sub, "auroc", min_group_n)
        reasons = []
        c = counts[counts["finding"] == f]
        for s in splits:
            for g in groups:
                row = c[(c["split"] == s) & (c["group"] == g)]
                n = int(row["n"].sum())
                p = int(row["n_pos"].sum())
                if n < min_group_n:
                    reasons.append(f"{g}/{s}: n={n} < {min_group_n}")
                elif p < min_group_pos:
                    reasons.append(f"{g}/{s}: {p} positives < {min_group_pos}")
        overall = sub[(sub["group"] == ALL) & (sub["metric"] == "accuracy")]["value"]
        recs.append({
            "finding": f, "available": True, "gap_accuracy": gap(sub, "accuracy", min_group_n),
            "gap_auroc": gap(sub, "auroc", min_group_n), "worst_group": w_g, "worst_accuracy": w_v,
            "best_group": b_g, "best_accuracy": b_v, "worst_auroc_group": wa_g, "worst_auroc": wa_v,
            "overall_accuracy": float(overall.iloc[0]) if len(overall) else np.nan,
            "eligible": not reasons, "reason": "; ".join(reasons),
        })
    for f, why in (unavailable or {}).items():
        recs.append({"finding": f, "available": False, "eligible": False, "reason": why})
    r = pd.DataFrame(recs)
    r["gap_accuracy"] = r["gap_accuracy"].astype(float)
    r = r.sort_values(["eligible", "gap_accuracy"], ascending=[False, False], na_position="last",
                      kind="stable").reset_index(drop=True)
    r["rank"] = pd.array([i + 1 if e else pd.NA for i, e in enumerate(r["eligible"])], dtype="Int64")
    return r


def choose_findings(ranking: pd.DataFrame, findings=None, top_k: int = 2) -> list[str]:
    """The findings the study continues with.

    ``findings`` (explicit list) wins: each must be one of the 14 and
    available in this cohort; a listed finding that is not eligible is kept
    but a warning says why. Otherwise the ``top_k`` eligible findings with the
    largest accuracy gap.
    """
    import warnings

    if findings:
        if isinstance(findings, str):
            findings = [findings]
        out = []
        for f in findings:
            if f not in FINDINGS:
                raise ValueError(f"parameter `findings`: {f!r} is not one of the 14 findings {FINDINGS}")
            row = ranking[ranking["finding"] == f]
            if row.empty or not bool(row["available"].iloc[0]):
                why = row["reason"].iloc[0] if len(row) else "not scanned"
                raise ValueError(f"parameter `findings`: {f!r} cannot be studied here ({why})")
            if not bool(row["eligible"].iloc[0]):
                warnings.warn(f"finding {f!r} chosen explicitly but not eligible: {row['reason'].iloc[0]}")
            out.append(f)
        return out
    if top_k < 1:
        raise ValueError(f"parameter `scan_top_k` must be >= 1, got {top_k}")
    eligible = ranking[ranking["eligible"]].sort_values("rank")
    if eligible.empty:
        raise ValueError("no finding is eligible (see the `reason` column of ranking.csv); lower "
                         "`min_group_n` / `min_group_pos` or name `findings` explicitly")
    return eligible["finding"].head(top_k).tolist()


def metric_matrix(scan: pd.DataFrame, metric: str = "accuracy", include_all: bool = True) -> pd.DataFrame:
    """Finding x group table of ``metric`` (for the heatmap)."""
    sub = scan[scan["metric"] == metric]
    if not include_all:
        sub = sub[sub["group"] != ALL]
    m = sub.pivot(index="finding", columns="group", values="value")
    cols = [c for c in m.columns if c != ALL] + ([ALL] if ALL in m.columns else [])
    return m[cols]
