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
                    ci_level: float = 0.95, finding: str | None = None, fmt: str = ".3f") -> str:
    """One sentence on the paired difference ``a - b``; a direction is claimed only if the interval excludes 0.

    ``a``, ``b``: method names (their registry labels are printed).
    """
    la, lb = _methods.label(a), _methods.label(b)
    what = METRIC_PHRASES.get(metric, metric)
    head = f"{finding}: " if finding else ""
    pct = f"{round(100 * ci_level)}%"
    diff = interval_text(est, lo, hi, fmt, signed=True)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{head}{la} − {lb} in {what}: {diff}; no paired interval, so no difference is claimed."
    if excludes_zero(lo, hi):
        better = (est > 0) != (metric in ("fpr", "fnr"))
        verdict = f"{la} is {'better' if better else 'worse'} than {lb}"
        return (f"{head}{la} − {lb} in {what}: {diff}; the {pct} paired interval excludes 0, "
                f"so {verdict}.")
    return (f"{head}{la} − {lb} in {what}: {diff}; the {pct} paired interval includes 0, "
            f"so this difference is not reliable.")


def paired_sentences(paired: pd.DataFrame, metric: str = "accuracy", ci_level: float = 0.95,
                     fmt: str = ".3f") -> list[str]:
    """One :func:`paired_sentence` per row of :meth:`~d3m_lib.analysis.MethodComparison.paired_table`."""
    return [paired_sentence(r.a, r.b, r.diff, r.lo, r.hi, metric, ci_level, r.finding, fmt)
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
    s = f"{share:.0%}"
    rng = f" [{lo:.0%}, {hi:.0%}]" if math.isfinite(lo) and math.isfinite(hi) else ""
    return (f"{head}{lm} recovers {s}{rng} of the {lc}'s gain in {what} over {lb} "
            f"({lc} − {lb}: {g}).")


def worst_group_sentence(group: str, value: float, lo: float, hi: float, noun: str = "race",
                         method: str = "erm", metric: str = "accuracy", finding: str | None = None) -> str:
    """"The worst race group of ERM is X, with accuracy v [lo, hi]." (noun from :func:`group_noun`)."""
    head = f"{finding}: " if finding else ""
    return (f"{head}the worst {noun} group of {_methods.label(method)} is {group}, with {metric} "
            f"{interval_text(value, lo, hi)}.")
