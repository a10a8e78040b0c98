"""The sentences that state the study's conclusions, as tested functions.

The rule: a difference between two arms is claimed only where its **paired**
interval excludes 0 (overlap or separation of two separate intervals is never
read). Otherwise the sentence says the difference is not reliable. Shares of the
oracle's gain are stated only where the oracle's own gain is reliable. The
dataset's group noun ("race" on MIMIC, "sex" or "age band" on NIH) is passed in
(:func:`group_noun`), so the prose follows the data.
"""

from __future__ import annotations

import math

import numpy as np

import pandas as pd

from . import methods as _methods

METRIC_PHRASES = {"accuracy": "worst-group accuracy", "auroc": "worst-group AUROC",
                  "fpr": "worst-group false positive rate", "fnr": "worst-group false negative rate",
                  "balanced_accuracy": "worst-group balanced accuracy"}


def group_noun(dataset: str = "mimic", nih_group: str = "sex") -> str:
    """The word for the protected attribute: ``race`` (MIMIC, synthetic), ``sex`` or ``age band`` (NIH)."""
    if dataset == "nih":
        return {"sex": "sex", "age_band": "age band"}[nih_group]
    return "race"


def _num(v: float, fmt: str) -> str:
    return f"{float(f'{v:{fmt}}') + 0.0:{fmt}}"  # no "-0.000"


def interval_text(est: float, lo: float, hi: float, fmt: str = ".3f", signed: bool = False) -> str:
    """``est [lo, hi]`` (``+est`` when ``signed``); ``n/a`` for a missing estimate."""
    if est is None or not math.isfinite(est):
        return "n/a"
    e = _num(est, fmt)
    if signed and not e.startswith("-"):
        e = "+" + e
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return e
    return f"{e} [{_num(lo, fmt)}, {_num(hi, fmt)}]"


def excludes_zero(lo: float, hi: float) -> bool:
    """True when the interval lies entirely above or entirely below 0 (NaN: False)."""
    return bool(math.isfinite(lo) and math.isfinite(hi) and (lo > 0 or hi < 0))


def interval_reading(lo: float, hi: float) -> str:
    """``lies entirely above zero`` / ``lies entirely below zero`` / ``includes zero`` / ``is not available``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "is not available"
    return "lies entirely above zero" if lo > 0 else "lies entirely below zero" if hi < 0 else "includes zero"


def paired_sentence(a: str, b: str, est: float, lo: float, hi: float, metric: str = "accuracy",
                    ci_level: float = 0.95, finding: str | None = None, fmt: str = ".3f",
                    p_holm: float | None = None) -> str:
    """One sentence on the paired difference ``a - b``; a direction is claimed only if the interval excludes 0.

    ``a``, ``b``: method names (their registry labels are printed). ``p_holm``: for a secondary
    contrast, its Holm-adjusted p-value; a direction is then claimed only where it is below
    ``1 - ci_level`` as well.
    """
    la, lb = _methods.label(a), _methods.label(b)
    what = METRIC_PHRASES.get(metric, metric)
    head = f"{finding}: " if finding else ""
    pct = f"{round(100 * ci_level)}%"
    diff = interval_text(est, lo, hi, fmt, signed=True)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{head}{la} − {lb} in {what}: {diff}; no paired interval, so no difference is claimed."
    holm_ok = p_holm is None or (math.isfinite(p_holm) and p_holm < 1 - ci_level)
    if excludes_zero(lo, hi) and holm_ok:
        better = (est > 0) != (metric in ("fpr", "fnr"))
        verdict = f"{la} is {'better' if better else 'worse'} than {lb}"
        adj = "" if p_holm is None else f" and its Holm-adjusted p is {p_holm:.3f}"
        return (f"{head}{la} − {lb} in {what}: {diff}; the {pct} paired interval excludes 0{adj}, "
                f"so {verdict}.")
    if excludes_zero(lo, hi):
        return (f"{head}{la} − {lb} in {what}: {diff}; the {pct} paired interval excludes 0, but after Holm's "
                f"correction over the secondary contrasts p = {p_holm:.3f}, so no difference is claimed.")
    return (f"{head}{la} − {lb} in {what}: {diff}; the {pct} paired interval includes 0, "
            f"so this difference is not reliable.")


def paired_sentences(paired: pd.DataFrame, metric: str = "accuracy", ci_level: float = 0.95,
                     fmt: str = ".3f") -> list[str]:
    """One :func:`paired_sentence` per row of :meth:`~d3m_lib.analysis.MethodComparison.paired_table`."""
    return [paired_sentence(r.a, r.b, r.diff, r.lo, r.hi, metric, ci_level, r.finding, fmt,
                            getattr(r, "p_holm", None) if getattr(r, "role", "") == "secondary" else None)
            for r in paired.itertuples()]


def recovery_sentence(share: float, lo: float, hi: float, gain: float, gain_lo: float, gain_hi: float,
                      method: str = "d3m", ceiling: str = "oracle", baseline: str = "erm",
                      metric: str = "accuracy", finding: str | None = None) -> str:
    """"D3M recovers S of the oracle's gain [lo, hi]", or why no share is stated."""
    lm, lc, lb = (_methods.label(m) for m in (method, ceiling, baseline))
    what = METRIC_PHRASES.get(metric, metric)
    head = f"{finding}: " if finding else ""
    g = interval_text(gain, gain_lo, gain_hi, signed=True)
    if not excludes_zero(gain_lo, gain_hi) or not math.isfinite(share):
        return (f"{head}removing the planted harmful images ({lc}) changes {what} by {g} against {lb}; "
                f"that interval includes 0, so there is no reliable gain for {lm} to recover "
                "and no share is stated.")
    def pc(v):
        return _num(100 * v, ".0f") + "%"  # no "-0%"
    s = pc(share)
    rng = f" [{pc(lo)}, {pc(hi)}]" if math.isfinite(lo) and math.isfinite(hi) else ""
    return (f"{head}{lm} recovers {s}{rng} of the {lc}'s gain in {what} over {lb} "
            f"({lc} − {lb}: {g}).")


def worst_group_sentence(group: str, value: float, lo: float, hi: float, noun: str = "race",
                         method: str = "erm", metric: str = "accuracy", finding: str | None = None) -> str:
    """"The worst race group of ERM is X, with accuracy v [lo, hi]." (noun from :func:`group_noun`)."""
    head = f"{finding}: " if finding else ""
    return (f"{head}the worst {noun} group of {_methods.label(method)} is {group}, with {metric} "
            f"{interval_text(value, lo, hi)}.")


def _pct(ci_level: float) -> str:
    return f"{round(100 * ci_level)}%"


def change_sentence(method: str, baseline: str, group: str, est: float, lo: float, hi: float,
                    noun: str = "race", ci_level: float = 0.95, finding: str | None = None,
                    metric: str = "accuracy") -> str:
    """The paired change ``method - baseline`` of ``metric`` on one group (e.g. the baseline's worst group).

    A direction is claimed only when the paired interval excludes 0.
    """
    lm, lb = _methods.label(method), _methods.label(baseline)
    head = f"{finding}: " if finding else ""
    what = f"{metric} on {lb}'s worst {noun} group ({group})"
    diff = interval_text(est, lo, hi, signed=True)
    if not excludes_zero(lo, hi):
        why = "includes 0" if math.isfinite(lo) and math.isfinite(hi) else "is not available"
        return (f"{head}{lm} − {lb} in {what}: {diff}; the {_pct(ci_level)} paired interval {why}, "
                "so no change is claimed.")
    better = (est > 0) != (metric in ("fpr", "fnr"))
    return (f"{head}{lm} − {lb} in {what}: {diff}; the {_pct(ci_level)} paired interval excludes 0, so {lm} "
            f"{'improved' if better else 'worsened'} it.")


def leader_sentence(best: str, value: float, lo: float, hi: float, paired: pd.DataFrame,
                    ci_level: float = 0.95, finding: str | None = None, metric: str = "accuracy") -> str:
    """Which arm has the highest worst-group point estimate, and against which arms that holds reliably.

    ``paired``: rows ``a == best`` against every other arm (columns b, diff, lo, hi), as from
    :meth:`~d3m_lib.analysis.MethodComparison.paired_table`. Only arms whose paired interval
    excludes 0 are called reliably worse; the rest are named as not reliably different.
    """
    head = f"{finding}: " if finding else ""
    what = METRIC_PHRASES.get(metric, metric)
    lb = _methods.label(best)
    s = f"{head}{'t' if head else 'T'}he highest point estimate of {what} is {lb}'s, {interval_text(value, lo, hi)}."
    rows = paired[paired["a"] == best]
    sure = [_methods.label(b) for b, lo_, hi_ in zip(rows["b"], rows["lo"], rows["hi"]) if excludes_zero(lo_, hi_)]
    unsure = [_methods.label(b) for b, lo_, hi_ in zip(rows["b"], rows["lo"], rows["hi"])
              if not excludes_zero(lo_, hi_)]
    if sure:
        s += f" Its {_pct(ci_level)} paired interval excludes 0 against {', '.join(sure)}."
    if unsure:
        s += (f" Against {', '.join(unsure)} the paired interval includes 0, so {lb} is not reliably "
              "better than " + ("it." if len(unsure) == 1 else "them."))
    if rows.empty:
        s += " No other arm was run, so nothing is compared."
    return s


def recovery_sentences(recovery: pd.DataFrame, ceiling: str = "oracle", baseline: str = "erm",
                       metric: str = "accuracy") -> list[str]:
    """One :func:`recovery_sentence` per row of :meth:`~d3m_lib.analysis.MethodComparison.recovery` tables.

    When the ceiling's own gain is not reliable there is nothing to recover for any arm of
    that finding: one sentence says so, instead of one per arm.
    """
    out = []
    for _, rows in recovery.groupby("finding", sort=False, dropna=False):
        first = rows.iloc[0]
        if not excludes_zero(first.gain_lo, first.gain_hi):
            arms = ", ".join(_methods.label(m) for m in rows["method"])
            s = recovery_sentence(np.nan, np.nan, np.nan, first.gain, first.gain_lo, first.gain_hi,
                                  rows["method"].iloc[0], ceiling, baseline, metric,
                                  first.finding if isinstance(first.finding, str) else None)
            out.append(s.replace(f"for {_methods.label(rows['method'].iloc[0])} to recover",
                                 f"for any arm ({arms}) to recover"))
            continue
        out += [recovery_sentence(r.share, r.lo, r.hi, r.gain, r.gain_lo, r.gain_hi, r.method, ceiling,
                                  baseline, metric, r.finding) for r in rows.itertuples()]
    return out


def no_ceiling_sentence(ceiling: str = "oracle", synthetic: bool = True) -> str:
    """Why no share of the ceiling's gain is stated when the ceiling arm did not run."""
    lc = _methods.label(ceiling)
    if not synthetic:
        return (f"Real data has no planted ground truth, so there is no {lc} arm and no share of an "
                f"{lc}'s gain is stated.")
    return f"This run has no {lc} arm (add '{ceiling}' to `methods`), so no share of its gain is stated."


def planted_sentence(method: str, kind: str, precision: float, precision_min: float, precision_max: float,
                     base_rate: float, recall: float, n_seeds: int, finding: str | None = None) -> str:
    """Precision of one arm's removals for one planted kind against the base rate (random removal's expectation).

    Enrichment is claimed only when the precision of *every* seed lies above the base rate
    (seeds are the only replication of a selection); otherwise it is called not consistent.
    """
    head = f"{finding}: " if finding else ""
    lm, k = _methods.label(method), kind.replace("_", " ")
    if not math.isfinite(precision):
        return f"{head}{lm} removed no image, so its precision for {k} images is undefined."
    if not base_rate > 0:
        return f"{head}{lm} removed no {k} image: this cohort plants none."
    rng = (f" (seeds {precision_min:.3f} to {precision_max:.3f})" if n_seeds > 1 else "")
    lm = lm if head else lm[:1].upper() + lm[1:]
    s = (f"{head}{lm}'s removals were {k} images at a rate of {precision:.3f}{rng}, against a base rate of "
         f"{base_rate:.3f}; it removed {recall:.1%} of them. ")
    if precision_min > base_rate:
        return s + ("In every seed" if n_seeds > 1 else "In its one seed") + " its precision exceeds the base rate."
    if precision_max < base_rate:
        return s + ("In every seed" if n_seeds > 1 else "In its one seed") + " its precision is below the base rate."
    return s + "Its precision is not above the base rate in every seed, so no enrichment is claimed."


def removal_sentence(method: str, group: str, rate: float, overall_rate: float, noun: str = "race",
                     finding: str | None = None) -> str:
    """The group whose training images an arm removed at the highest rate, beside its overall rate."""
    head = f"{finding}: " if finding else ""
    return (f"{head}{_methods.label(method)} removed {rate:.1%} of the {noun} group {group}'s training images, "
            f"the highest rate of any group (all groups: {overall_rate:.1%}).")


def verdict(lo: float, hi: float, delta: float, n_seeds: int = 2) -> str:
    """The reading of the primary contrast: ``supported`` / ``contradicted`` (the interval excludes 0, above /
    below), ``smaller than delta`` (it lies inside ``[-delta, delta]``), else ``inconclusive``. One seed is
    always ``inconclusive``: its interval holds test sampling only, not the spread between training seeds."""
    if n_seeds < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if lo > 0:
        return "supported"
    if hi < 0:
        return "contradicted"
    if -delta <= lo and hi <= delta:
        return "smaller than delta"
    return "inconclusive"


def verdict_sentence(a: str, b: str, finding: str, est: float, lo: float, hi: float, delta: float,
                     mde: float, n_seeds: int, ci_level: float = 0.95) -> str:
    """The study's answer in one sentence: the pre-specified primary contrast ``a − b`` and its reading."""
    la, lb = _methods.label(a), _methods.label(b)
    what = (f"{la} − {lb} in test worst-group accuracy on {finding} is "
            f"{interval_text(est, lo, hi, signed=True)} ({_pct(ci_level)} interval of the mean over "
            f"{n_seeds} seed{'s' if n_seeds != 1 else ''})")
    v = verdict(lo, hi, delta, n_seeds)
    if n_seeds < 2:
        return (f"Inconclusive with one seed: {what}; that interval holds the test patients' sampling but not "
                "the spread between training seeds, so no method is claimed better from it (run two or more "
                "seeds).")
    if v == "supported":
        return f"Supported: {what}, so {la} raised the worst group's accuracy more than {lb}."
    if v == "contradicted":
        return f"Contradicted: {what}, so {la} lowered the worst group's accuracy compared with {lb}."
    if v == "smaller than delta":
        return (f"Smaller than {delta:g}: {what}, inside ±{delta:g}, so any difference between {la} and {lb} "
                f"is smaller than the smallest effect worth having.")
    mde_s = f"{mde:.3f}" if math.isfinite(mde) else "not estimable"
    return (f"Inconclusive at this run's power: {what}, which includes 0 and reaches beyond ±{delta:g}; "
            f"the smallest effect this run could detect (80% power) is {mde_s}.")


def claim_reading(role: str, lo: float, hi: float, p_holm: float, alpha: float) -> str:
    """How a row of the paired table is read: the primary contrast by its interval, the secondary ones
    by their interval and their Holm-adjusted p-value (family: every secondary contrast of the run)."""
    if role == "primary":
        return f"primary: {interval_reading(lo, hi).replace('lies entirely', 'entirely')}"
    if not math.isfinite(p_holm):
        return "secondary: no interval"
    return (f"secondary: Holm p = {p_holm:.3f}, "
            + ("claimed" if p_holm < alpha and excludes_zero(lo, hi) else "not claimed"))


def alternatives_sentence(table: pd.DataFrame, study: str = "d3m", baseline: str = "erm", alpha: float = 0.05,
                          n_seeds: int = 0) -> str:
    """One finding's comparison with the alternatives in one sentence: which arms' worst-group accuracy differs
    from ``study``'s and from ``baseline``'s by a claimed margin (paired interval excludes 0 and Holm p < alpha),
    or that none does. ``table``: rows of ``compare.alternatives_table`` for one finding."""
    if n_seeds == 1:
        return ("With one seed no difference from the alternatives is claimed: its intervals hold test sampling "
                "only, not training randomness.")
    parts = []
    for ref in (study, baseline):
        col = f"vs_{ref}"
        if col not in table.columns:
            continue
        claimed = [r for r in table.itertuples() if r.method != ref and math.isfinite(getattr(r, f"{col}_p_holm"))
                   and getattr(r, f"{col}_p_holm") < alpha and excludes_zero(getattr(r, f"{col}_lo"),
                                                                             getattr(r, f"{col}_hi"))]
        if claimed:
            def by(r):
                d, lo, hi = (abs(getattr(r, col + k)) for k in ("", "_lo", "_hi"))
                return (f"{_methods.label(r.method)} {'above' if getattr(r, col) > 0 else 'below'} by "
                        f"{interval_text(d, min(lo, hi), max(lo, hi))}")
            parts.append(f"against {_methods.label(ref)}, " + "; ".join(by(r) for r in claimed))
        else:
            parts.append(f"no arm differs reliably from {_methods.label(ref)}")
    seeds = f" at {n_seeds} seeds" if n_seeds else ""
    return (f"Worst-group accuracy, paired and Holm-corrected over the table{seeds}: " + "; ".join(parts) + ".")


TARGETING_CHANGED = 0.25   # below this share of changed removals, the weighting "barely targets" the worst group


def targeting_sentence(weighting: pd.DataFrame, group_losses: pd.DataFrame, weighting_kind: str, beta: float
                       ) -> str:
    """Whether D3M's weighting targets the worst group, in numbers (one finding, the run's groups; every seed).

    ``weighting``: stage 05's weighting rows (``changed`` of the equal-weight row: the share of its removed
    images that the run's own rule does not remove); ``group_losses``: finding, seed, group, loss, weight.
    """
    eq = weighting[(weighting["weighting"] == "softmax") & (weighting["beta"] == 0.0)]
    changed = float(eq["changed"].mean())
    gl = group_losses.dropna(subset=["weight"])
    worst = gl.loc[gl.groupby("seed")["loss"].idxmax()]
    n_groups = gl.groupby("seed")["group"].nunique().mean()
    top = worst["group"].value_counts()
    setting = f"softmax β = {beta:g}" if weighting_kind == "softmax" else "linear weighting"
    verdict = ("barely targets the worst group" if changed < TARGETING_CHANGED
               else "moves the selection towards the worst group")
    return (f"The highest-loss group ({top.index[0]}, {top.iloc[0]} of {len(worst)} seeds) gets weight "
            f"{worst['weight'].mean():.2f} under {setting} (equal weights: {1 / n_groups:.2f}), and "
            f"{changed:.0%} of the images equal weighting would remove are not removed (mean over seeds; "
            f"below {TARGETING_CHANGED:.0%} we read it as no targeting): the weighting {verdict}.")


def group_choice_sentence(weighting: pd.DataFrame, run_groups: str, weighting_kind: str, beta: float) -> str:
    """Which of D3M's group choices (race, race x label) puts the planted images among its k lowest more often,
    at the run's weighting (one finding, every seed; stage 05's weighting rows with precision and recall)."""
    if "precision" not in weighting.columns or weighting["precision"].isna().all():
        return "Without planted ground truth the two group choices cannot be compared on what they remove."
    rows = weighting[weighting["weighting"] == weighting_kind]
    if weighting_kind == "softmax":
        rows = rows[rows["beta"] == beta]
    m = rows.groupby("groups")[["precision", "recall"]].mean()
    if len(m) < 2:
        return "Only one group choice was scored."
    names = {"race": "race groups", "race_x_label": "race × label groups"}
    best = str(m["precision"].idxmax())
    other = next(g for g in m.index if g != best)
    return (f"At D3M's k, {names[best]} put planted images among the removed at precision "
            f"{m.loc[best, 'precision']:.3f} (recall {m.loc[best, 'recall']:.3f}), {names[other]} at "
            f"{m.loc[other, 'precision']:.3f} ({m.loc[other, 'recall']:.3f}), mean over seeds: {names[best]} "
            + ("target the planted harm better and are this run's choice (d3m_groups)." if best == run_groups else
               f"target the planted harm better, but this run weighs {names[run_groups]} (d3m_groups)."))
