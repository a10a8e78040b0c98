"""Stage 06: every arm against ERM and against each other, per finding and per group.

From stage 05's predictions and selections and the cohort's patients (the
bootstrap unit), :func:`run` builds the source study's table per finding,
worst-group accuracy per arm with its interval, the paired comparisons a
reviewer asks for (:data:`d3m_lib.analysis.DEFAULT_PAIRS` wherever both arms
ran), the share of the oracle's gain each arm recovers, the paired change of
worst-group accuracy against ERM (the Results page's headline figure reads
``wga_change.csv``), forest-plot rows, AUROC per group and, when "No Finding"
is a task, underdiagnosis. Every sentence that states a result comes from
:mod:`d3m_lib.conclusions`. Arm names, labels and order come from
:mod:`d3m_lib.methods`.

Files written in ``06_per_race/``: ``source_<finding>.csv`` (one block per arm),
``worst_group.csv``, ``wga_change.csv``, ``paired.csv``, ``recovery.csv``,
``forest.csv``, ``auroc.csv``, ``underdiagnosis.csv`` (when "No Finding" is a
task) and ``sentences.json``. The stage is cheap (bootstrap only), so it is
recomputed whole rather than resumed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import analysis, conclusions, metrics, power
from .. import methods as _methods
from ..analysis import OVERALL, MethodComparison
from ..book import group_noun
from ..constants import SEYYED_KALANTARI_MIMIC_NO_FINDING_FPR

BASELINE = "erm"    # every change is against continued ERM
STUDY_ARM = "d3m"   # the arm the study is about (the headline sentences)
NO_FINDING = "No Finding"


def ceiling_arm() -> str:
    """The registry's ceiling: the arm that needs synthetic ground truth (the oracle)."""
    return next(m for m in _methods.order() if _methods.get(m).needs_ground_truth)


@dataclass
class Result:
    """What notebook 06 shows; every table is also saved in the stage folder."""

    comparison: MethodComparison
    findings: list[str]
    arms: list[str]                     # arms present, registry order
    n_seeds: int
    noun: str                           # race / sex / age band
    tables: dict[str, pd.DataFrame]     # per finding: the source study's display table
    source: pd.DataFrame                # long source tables (every arm vs ERM)
    wga: pd.DataFrame                   # worst-group accuracy per finding and arm
    wga_change: pd.DataFrame            # paired change of worst-group accuracy against ERM
    paired: pd.DataFrame                # the reviewer's paired comparisons
    recovery: pd.DataFrame              # share of the oracle's gain per arm (empty without an oracle)
    forest: pd.DataFrame
    auroc: pd.DataFrame
    underdiagnosis: pd.DataFrame | None
    leaders: pd.DataFrame               # per finding: the arm with the highest WGA vs every other arm, paired
    seed_diffs: pd.DataFrame            # finding, a, b, seed, diff: each seed's paired difference
    power: power.Power | None           # the primary contrast's variance components and MDE
    error_rates: pd.DataFrame | None = None  # ERM's worst group of the primary finding: FPR, FNR per arm, change
    alternatives: pd.DataFrame | None = None  # per finding and arm: the D3M paper's table (analysis.alternatives)
    verdict: str = ""                   # the study's answer: the primary contrast's reading, one sentence
    sentences: dict[str, list[str]] = field(default_factory=dict)
    quotes: dict[str, str] = field(default_factory=dict)     # text the book pages quote (primary finding)
    numbers: dict[str, float] = field(default_factory=dict)  # numbers the book pages quote

    @property
    def primary(self) -> str:
        return self.findings[0]

    def headline_change(self) -> pd.DataFrame:
        """:attr:`wga_change` of the retrained arms (the anchor selects nothing), as the Results figure shows."""
        keep = [m in _methods.REGISTRY and _methods.get(m).retrained for m in self.wga_change["method"]]
        return self.wga_change[keep].reset_index(drop=True)


def paired_display(paired: pd.DataFrame, ci_level: float = 0.95, seed_diffs: pd.DataFrame | None = None
                   ) -> pd.DataFrame:
    """Display table of the paired comparisons: labels, ``diff [lo, hi]``, seeds above 0, the reading."""
    out = pd.DataFrame({
        "finding": paired["finding"],
        "contrast": [f"{_methods.label(a)} − {_methods.label(b)}" for a, b in zip(paired["a"], paired["b"])],
        f"Δ worst-group accuracy [{round(100 * ci_level)}% CI]": [
            conclusions.interval_text(d, lo, hi, signed=True)
            for d, lo, hi in zip(paired["diff"], paired["lo"], paired["hi"])]})
    if seed_diffs is not None:
        sd = seed_diffs.groupby(["finding", "a", "b"], sort=False)["diff"]
        above = {k: f"{int((v > 0).sum())} of {len(v)}" for k, v in sd}
        out["seeds > 0"] = [above.get((f, a, b), "–") for f, a, b in zip(paired["finding"], paired["a"],
                                                                         paired["b"])]
    if "role" in paired.columns:
        out["reading"] = [conclusions.claim_reading(r.role, r.lo, r.hi, r.p_holm, 1 - ci_level)
                          for r in paired.itertuples()]
    else:
        out["reading"] = [conclusions.interval_reading(lo, hi) for lo, hi in zip(paired["lo"], paired["hi"])]
    return out


def with_roles(paired: pd.DataFrame, primary_finding: str, contrast) -> pd.DataFrame:
    """``paired`` with ``role`` (primary: the pre-specified contrast on the primary finding; secondary: the
    rest) and ``p_holm`` (Holm's adjustment over the secondary rows; NaN for the primary one)."""
    a, b = contrast
    out = paired.copy()
    prim = (out["finding"] == primary_finding) & (out["a"] == a) & (out["b"] == b)
    out["role"] = ["primary" if x else "secondary" for x in prim]
    out["p_holm"] = float("nan")
    sec = ~prim.to_numpy()
    if sec.any():
        out.loc[sec, "p_holm"] = metrics.holm(out.loc[sec, "p"].to_numpy())
    return out.sort_values("role", key=lambda r: r.map({"primary": 0, "secondary": 1}), kind="stable"
                           ).reset_index(drop=True)


def recovery_display(recovery: pd.DataFrame) -> pd.DataFrame:
    """Display table of the recovery rows: arm, share of the oracle's gain [interval], the oracle's gain."""
    if recovery.empty:
        return pd.DataFrame({"note": ["no oracle arm in this run: no share of its gain"]})
    if not np.isfinite(recovery["share"].to_numpy(float)).any() and recovery["finding"].nunique() == 1:
        r = recovery.iloc[0]   # no arm has a share: one row says why, not one per arm
        return pd.DataFrame({"finding": [r["finding"]], "arm": ["every arm"],
                             "share of the oracle's gain": [f"not stated ({r['reason'] or 'no reliable gain'})"],
                             "oracle − ERM (worst-group accuracy)": [
                                 conclusions.interval_text(r["gain"], r["gain_lo"], r["gain_hi"], signed=True)]})

    def share(r):
        if not math.isfinite(r.share):
            return "not stated (" + (r.reason or "no reliable gain") + ")"
        rng = f" [{r.lo:.0%}, {r.hi:.0%}]" if math.isfinite(r.lo) and math.isfinite(r.hi) else ""
        return f"{r.share:.0%}{rng}"
    return pd.DataFrame({
        "finding": recovery["finding"], "arm": [_methods.label(m) for m in recovery["method"]],
        "share of the oracle's gain": [share(r) for r in recovery.itertuples()],
        "oracle − ERM (worst-group accuracy)": [conclusions.interval_text(g, lo, hi, signed=True) for g, lo, hi in
                                                zip(recovery["gain"], recovery["gain_lo"], recovery["gain_hi"])]})


def _recovery(mc: MethodComparison, arms: list[str]) -> pd.DataFrame:
    ceiling = ceiling_arm()
    if ceiling not in arms or BASELINE not in arms:
        return pd.DataFrame(columns=["finding", "method", "share", "lo", "hi", "gain", "gain_lo", "gain_hi",
                                     "n_seeds", "reason"])
    tracked = [m for m in arms if _methods.get(m).retrained and m not in (BASELINE, ceiling)]
    frames = [mc.recovery(method=m, ceiling=ceiling, baseline=BASELINE) for m in tracked]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return _recovery(mc, [])
    out = pd.concat(frames, ignore_index=True)  # arms in registry order within each finding
    out["_f"] = out["finding"].map({f: i for i, f in enumerate(mc.findings)})
    return out.sort_values("_f", kind="stable").drop(columns="_f").reset_index(drop=True)


def _leaders(mc: MethodComparison, wga: pd.DataFrame) -> pd.DataFrame:
    frames = []
    for f in mc.findings:
        best = analysis.best_method(wga, f)
        others = [m for m in _methods.order(wga.loc[wga["finding"] == f, "method"]) if m != best]
        frames.append(mc.paired_table(pairs=[(best, m) for m in others], findings=[f]).assign(best=best))
    return pd.concat(frames, ignore_index=True)


def _synthetic(run) -> bool:
    """Whether stage 01 read synthetic data (its manifest's ``summary.data``, as the privacy policy reads it)."""
    summary = (run.manifest("01_cohort") or {}).get("summary") or {}
    return bool((summary.get("data") or {}).get("synthetic", summary.get("synthetic", False)))


def _quotes(res: Result, ci_level: float, synthetic: bool) -> tuple[dict, dict]:
    f = res.primary
    w = res.wga.set_index(["finding", "method"])
    q = {"primary_finding": f, "group_noun": res.noun,
         "cluster_unit": "patients" if res.comparison.cluster_unit == "patient" else "images"}
    for m in _methods.order():  # every arm the pages may quote; "not run" when absent
        q[f"wga_{m}"] = (conclusions.interval_text(*w.loc[(f, m), ["wga", "lo", "hi"]]) if (f, m) in w.index
                         else "not run")
    erm_worst = str(w.loc[(f, BASELINE), "worst_group"])
    q["wga_worst_group_erm"] = erm_worst
    best = res.leaders.loc[res.leaders["finding"] == f, "best"]
    best = str(best.iloc[0]) if len(best) else analysis.best_method(res.wga, f)
    q["best_wga_method"] = _methods.label(best)
    q["leader_sentence"] = conclusions.leader_sentence(best, *w.loc[(f, best), ["wga", "lo", "hi"]],
                                                       res.leaders[res.leaders["finding"] == f], ci_level)
    q["paired_summary"] = " ".join(conclusions.paired_sentences(res.paired[res.paired["finding"] == f],
                                                                ci_level=ci_level))
    q["verdict"] = res.verdict
    alt = res.alternatives[res.alternatives["finding"] == f] if res.alternatives is not None else None
    q["alternatives_summary"] = (conclusions.alternatives_sentence(alt, STUDY_ARM, BASELINE, 1 - ci_level,
                                                                   res.n_seeds)
                                 if alt is not None and len(alt) > 1 else "No arm besides ERM ran.")
    rec = conclusions.recovery_sentences(res.recovery[res.recovery["finding"] == f].assign(finding=None),
                                         ceiling_arm(), BASELINE)
    q["recovery_summary"] = " ".join(rec) if rec else conclusions.no_ceiling_sentence(ceiling_arm(), synthetic)
    n = {"n_findings": len(res.findings), "n_seeds": res.n_seeds, "n_boot": res.comparison.n_boot,
         "ci_pct": round(100 * ci_level), "d3m_removed_total": float("nan"),
         "mde": res.power.mde if res.power is not None else float("nan")}
    src = res.source[(res.source["finding"] == f) & (res.source["method"] == STUDY_ARM)].set_index("group")
    if src.empty:
        for k in ("d3m_change_worst", "d3m_change_overall", "d3m_change_worst_sentence"):
            q[k] = f"not run ({_methods.label(STUDY_ARM)} is not among this run's arms)"
        return q, n
    g, o = src.loc[erm_worst], src.loc[OVERALL]
    q["d3m_change_worst"] = conclusions.interval_text(g["change"], g["change_lo"], g["change_hi"], signed=True)
    q["d3m_change_overall"] = conclusions.interval_text(o["change"], o["change_lo"], o["change_hi"], signed=True)
    q["d3m_change_worst_sentence"] = conclusions.change_sentence(
        STUDY_ARM, BASELINE, erm_worst, g["change"], g["change_lo"], g["change_hi"], res.noun, ci_level)
    if "change_n" in src.columns:
        n["d3m_removed_total"] = float(-o["change_n"])
    return q, n


def _n_seeds(predictions: pd.DataFrame) -> int:
    return int(predictions["seed"].nunique())


LABELS_NEEDED = {"training": "train + val", "validation": "val", "none": "none"}


def labels_needed(method: str) -> str:
    """The group labels an arm needs, as the D3M paper's table groups methods."""
    if method not in _methods.REGISTRY:
        return "?"
    m = _methods.get(method)
    if m.needs_ground_truth:
        return "planted truth"
    return LABELS_NEEDED[m.group_labels]


def alternatives_table(mc: MethodComparison, versus=(BASELINE, STUDY_ARM)) -> pd.DataFrame:
    """:meth:`MethodComparison.alternatives` of every finding, with Holm's adjustment of the paired p-values over
    all of the table's contrasts of a finding (``vs_<r>_p_holm``): each is a secondary, exploratory claim."""
    frames = []
    for f in mc.findings:
        t = mc.alternatives(f, versus)
        ps = [c for c in t.columns if c.startswith("vs_") and c.endswith("_p")]
        flat = t[ps].to_numpy().ravel()
        ok = np.isfinite(flat)
        adj = np.full(flat.shape, np.nan)
        if ok.any():
            adj[ok] = metrics.holm(flat[ok])
        for i, c in enumerate(ps):
            t[f"{c}_holm"] = adj.reshape(t[ps].shape)[:, i]
        frames.append(t.assign(finding=f, labels=[labels_needed(m) for m in t["method"]]))
    return pd.concat(frames, ignore_index=True)


def alternatives_display(res: Result, part: str = "levels", finding: str | None = None,
                         alpha: float = 0.05) -> pd.DataFrame:
    """The Results page's comparison with the alternatives for one finding, one row per arm, in two parts that
    each fit a page: ``levels`` (group labels needed, worst-group and mean accuracy, worst-group AUROC) and
    ``differences`` (paired worst-group accuracy difference against ERM and against D3M). A difference marked
    ``*`` is claimed: interval excludes 0 and Holm p < ``alpha``, with more than one seed."""
    t = res.alternatives[res.alternatives["finding"] == (finding or res.primary)]
    arm = [_methods.label(m) for m in t["method"]]
    if part == "levels":
        return pd.DataFrame({
            "arm": arm, "group labels": t["labels"].to_numpy(),
            "worst-group accuracy": [conclusions.interval_text(*v) for v in zip(t["wga"], t["wga_lo"], t["wga_hi"])],
            "mean accuracy": [conclusions.interval_text(*v) for v in zip(t["acc"], t["acc_lo"], t["acc_hi"])],
            "worst-group AUROC": [conclusions.interval_text(*v) for v in
                                  zip(t["wg_auroc"], t["wg_auroc_lo"], t["wg_auroc_hi"])]})
    if part != "differences":
        raise ValueError(f"part must be 'levels' or 'differences', got {part!r}")

    def vs(r, ref):
        if r.method == ref:
            return "–"
        d, lo, hi, ph = (getattr(r, f"vs_{ref}{k}") for k in ("", "_lo", "_hi", "_p_holm"))
        claimed = res.n_seeds > 1 and math.isfinite(ph) and ph < alpha and conclusions.excludes_zero(lo, hi)
        return conclusions.interval_text(d, lo, hi, signed=True) + (" *" if claimed else "")
    out = pd.DataFrame({"arm": arm})
    for ref in (BASELINE, STUDY_ARM):
        if f"vs_{ref}" in t.columns:
            out[f"Δ vs {_methods.label(ref)}"] = [vs(r, ref) for r in t.itertuples()]
            out[f"Holm p ({_methods.label(ref)})"] = [
                "–" if r.method == ref else f"{getattr(r, f'vs_{ref}_p_holm'):.3f}" for r in t.itertuples()]
    return out


def underdiagnosis_display(res: Result, real_mimic: bool) -> pd.DataFrame | None:
    """The false positive rate of "No Finding" per group and arm (``est [lo, hi]``); on real MIMIC, with
    Seyyed-Kalantari et al.'s published MIMIC-CXR rates beside ours. None when "No Finding" is not a task."""
    if res.underdiagnosis is None:
        return None
    out = analysis.wide_per_group(res.underdiagnosis)
    out = out.rename(columns={m: _methods.label(m) for m in out.columns if m in _methods.REGISTRY})
    if real_mimic:
        ref = SEYYED_KALANTARI_MIMIC_NO_FINDING_FPR
        out["Seyyed-Kalantari et al. 2021 (MIMIC-CXR)"] = [f"{ref[g]:.3f}" if g in ref else "–" for g in out["group"]]
    return out


def power_table(res: Result, effect: float) -> pd.DataFrame | None:
    """The primary contrast's power: this run's MDE, and per test-set size the seeds needed for ``effect``."""
    if res.power is None:
        return None
    return res.power.plan(effect).assign(finding=res.power.finding, contrast=f"{res.power.a} − {res.power.b}",
                                         effect=effect, s_between_seeds=res.power.s_b, s_test=res.power.s_w,
                                         seeds=res.power.n_seeds, mde=res.power.mde)


def answer_table(res: Result, ci_level: float = 0.95) -> pd.DataFrame:
    """The Results page's one table: the primary finding's contrasts, the pre-specified primary one first,
    each with its interval, how many seeds point up, and how it is read (primary by its interval,
    secondary by Holm)."""
    rows = res.paired[res.paired["finding"] == res.primary]
    return paired_display(rows, ci_level, res.seed_diffs).drop(columns="finding")


def power_display(res: Result, effect: float) -> pd.DataFrame:
    """:func:`power_table` for the book: the run's MDE and the seeds needed per test-set size."""
    t = power_table(res, effect)
    if t is None:
        return pd.DataFrame({"note": ["one seed: the between-seed variance, and so the power, is not estimable"]})
    return pd.DataFrame({
        "test set": [f"×{m} ({n} patients, {w} in the smallest group)" for m, n, w in
                     zip(t["test_factor"], t["test_patients"], t["worst_group_patients"])],
        f"seeds needed for {effect:g}": ["–" if pd.isna(v) else str(int(v)) for v in t["seeds_needed"]],
        f"MDE at {int(t['seeds'].iloc[0])} seeds": [f"{v:.3f}" for v in t["mde_at_run_seeds"]]})


def error_rates_display(res: Result) -> pd.DataFrame:
    """ERM's worst group of the primary finding: each arm's FPR and FNR with its change against ERM."""
    e = res.error_rates
    out = pd.DataFrame({"arm": [_methods.label(m) for m in e["method"]], "metric": e["metric"].str.upper(),
                        "value [CI]": [conclusions.interval_text(v, lo, hi) for v, lo, hi in
                                       zip(e["value"], e["lo"], e["hi"])],
                        "change vs ERM [CI]": ["–" if m == BASELINE else
                                               conclusions.interval_text(c, lo, hi, signed=True)
                                               for m, c, lo, hi in zip(e["method"], e["change"], e["change_lo"],
                                                                       e["change_hi"])]})
    return out


def headline_seeds(res: Result) -> pd.DataFrame:
    """Each seed's paired change against ERM, in :attr:`Result.wga_change`'s layout (dots of the headline)."""
    d = res.seed_diffs[res.seed_diffs["b"] == BASELINE]
    return pd.DataFrame({"finding": d["finding"], "method": d["a"], "seed": d["seed"], "change": d["diff"]})


def run(stage, progress: bool = False) -> Result:
    """Compute every table of stage 06, save them in ``stage.dir`` and finish the stage."""
    from tqdm.auto import tqdm

    cfg, rd = stage.cfg, stage.run
    d05 = rd.require("05_d3m")
    predictions = pd.read_parquet(d05 / "predictions.parquet")
    selections = pd.read_parquet(d05 / "selections.parquet")
    cohort = rd.cohort(columns=["row", "group", "split", "subject_id"])  # patients: the bootstrap unit
    mc = MethodComparison(predictions, selections, cohort, n_boot=cfg.n_boot, ci_level=cfg.ci_level,
                          seed=cfg.stats_seed, min_group_n=cfg.min_group_n,
                          n_boot_descriptive=cfg.n_boot_descriptive)
    findings, arms = mc.findings, list(_methods.order(mc.methods()))
    if BASELINE not in arms:
        raise ValueError(f"stage 05 has no '{BASELINE}' predictions: every comparison is against it")
    tables, source, forest, auroc = {}, [], [], []
    for f in tqdm(findings, desc="per-group tables", disable=not progress):
        tables[f] = analysis.comparison_table(mc, f)
        src = pd.concat([mc.source_table(f, m).rename(columns={BASELINE: "baseline", f"{BASELINE}_lo": "baseline_lo",
                                                               f"{BASELINE}_hi": "baseline_hi", m: "value",
                                                               f"{m}_lo": "lo", f"{m}_hi": "hi"}).assign(method=m)
                         for m in _methods.order(mc.methods(f)) if m != BASELINE], ignore_index=True)
        src.to_csv(stage.path(f"source_{f.replace(' ', '_')}.csv"), index=False)
        source.append(src)
        forest.append(mc.forest_data(f))
        auroc.append(mc.per_group(f, metric="auroc", methods=list(_methods.order(mc.methods(f))), descriptive=True))
    wga = mc.worst_group_table()
    contrast = tuple(cfg.primary_contrast)
    pairs = [contrast, *[p for p in analysis.DEFAULT_PAIRS if p != contrast]]
    paired = with_roles(mc.paired_table(pairs=pairs), findings[0], contrast)
    prim = paired[paired["role"] == "primary"]
    if prim.empty:
        raise ValueError(f"parameter 'primary_contrast' = {list(contrast)!r}: the arms were not both run for the "
                         f"primary finding {findings[0]} (arms: {mc.methods(findings[0])})")
    pw = power.from_comparison(mc, cfg.values, findings[0]) if _n_seeds(predictions) > 1 else None
    r0 = prim.iloc[0]
    verdict = conclusions.verdict_sentence(contrast[0], contrast[1], findings[0], r0["diff"], r0["lo"], r0["hi"],
                                           cfg.smallest_effect, pw.mde if pw is not None else float("nan"),
                                           int(r0["n_pairs"]), cfg.ci_level)
    seed_pairs = [*pairs, *[(m, BASELINE) for m in arms if m != BASELINE]]
    res = Result(
        comparison=mc, findings=findings, arms=arms, n_seeds=_n_seeds(predictions),
        noun=group_noun(cfg), tables=tables, source=pd.concat(source, ignore_index=True), wga=wga,
        wga_change=mc.wga_change(), paired=paired, recovery=_recovery(mc, arms),
        forest=pd.concat(forest, ignore_index=True), auroc=pd.concat(auroc, ignore_index=True),
        underdiagnosis=mc.underdiagnosis() if NO_FINDING in findings else None, leaders=_leaders(mc, wga),
        seed_diffs=mc.seed_differences(seed_pairs), power=pw, verdict=verdict,
        error_rates=mc.error_rates(findings[0], str(wga.set_index(["finding", "method"]).loc[
            (findings[0], BASELINE), "worst_group"])),
        alternatives=alternatives_table(mc))
    res.sentences = {"paired": conclusions.paired_sentences(res.paired, ci_level=cfg.ci_level),
                     "recovery": conclusions.recovery_sentences(res.recovery, ceiling_arm(), BASELINE)}
    res.quotes, res.numbers = _quotes(res, cfg.ci_level, _synthetic(rd))
    for name, t in (("worst_group", wga), ("wga_change", res.wga_change), ("paired", res.paired),
                    ("recovery", res.recovery), ("forest", res.forest), ("auroc", res.auroc),
                    ("underdiagnosis", res.underdiagnosis), ("paired_seeds", res.seed_diffs),
                    ("error_rates", res.error_rates), ("alternatives", res.alternatives),
                    ("power", power_table(res, cfg.smallest_effect))):
        if t is not None:
            t.to_csv(stage.path(f"{name}.csv"), index=False)
    stage.path("sentences.json").write_text(json.dumps({**res.sentences, "quotes": res.quotes}, indent=1))
    stage.finish({"findings": findings, "arms": arms, "best_wga_method": res.quotes["best_wga_method"],
                  "verdict": conclusions.verdict(r0["lo"], r0["hi"], cfg.smallest_effect, int(r0["n_pairs"])),
                  "primary": {"finding": findings[0], "contrast": list(contrast), "diff": float(r0["diff"]),
                              "lo": float(r0["lo"]), "hi": float(r0["hi"]),
                              "mde": pw.mde if pw is not None else None},
                  "n_reliable_pairs": int(res.paired["excludes_zero"].sum()) if len(res.paired) else 0,
                  "cluster_unit": mc.cluster_unit})
    return res
