"""Stage 07: which training images drive the worst group's errors, and what the selections removed.

For each finding, :func:`run` takes the first seed that has a saved TRAK state
(``RunDir.model_dir("04_trak", finding, seed)``, opened read-only by
:func:`d3m_lib.attribution.load_scorer`: nothing is written into ``04_trak/``),
finds the worst group of that seed's ERM model on the test set, its most
confidently misclassified images, and scores every training image on them
with *that seed's* TRAK state: the strongest positive and negative training
images per target (``influential``) and their group and label mix
(``composition``). Then who every arm removed (by group, label and, on
synthetic data, planted kind against the base rate), and the mean removed and
kept images of each TRAK-driven arm. Sentences come from
:mod:`d3m_lib.conclusions`.

Files written in ``07_error_analysis/``: ``targets.csv``, ``influential.csv``,
``composition.csv``, ``removed_by_group.csv``, ``removed_by_label.csv``,
``removed_by_finding.csv``, ``planted_recovery.csv`` and ``score_harm_auroc.csv`` (synthetic data),
``mean_images_regions.csv`` and ``sentences.json``. Recomputed whole (TRAK
scoring of a few targets is cheap).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import analysis, attribution, conclusions, explorer
from .. import methods as _methods
from ..book import group_noun
from ..synthetic import GROUND_TRUTH_FILE, planted_ground_truth

BASELINE = "erm"    # the model whose errors are analysed
STUDY_ARM = "d3m"   # the arm the Results page quotes


def trak_dir(run, finding: str, seed: int):
    """The saved TRAK state of one finding and seed (stage 04's layout)."""
    return run.model_dir("04_trak", finding, seed)


def trak_seeds(run, finding: str, seeds) -> list[int]:
    """The seeds among ``seeds`` (ascending) that have a saved TRAK state for ``finding``."""
    return [int(s) for s in sorted(set(int(x) for x in seeds)) if (trak_dir(run, finding, s) / attribution.CONFIG)
            .is_file()]


def scorer_for(run, scratch_dir=None) -> Callable:
    """``(finding, seed) -> scorer``: that seed's TRAK state, opened read-only (the explorer's seed control).

    ``scratch_dir``: where traker may write scratch files (a temporary folder if None; never ``04_trak``).
    """
    def open_scorer(finding: str, seed: int):
        return attribution.load_scorer(trak_dir(run, finding, int(seed)), scratch_dir=scratch_dir)
    return open_scorer


@dataclass
class FindingErrors:
    """The worst group's errors of one finding and what TRAK says drives them."""

    finding: str
    seed: int
    worst_group: str
    targets: pd.DataFrame        # row, group, y, prob, threshold, pred, seed, image_id, subject_id, study_id
    influential: pd.DataFrame    # target, target_row, direction, rank, train_row, score, group, label
    composition: pd.DataFrame    # analysis.influence_composition
    sentence: str

    def composition_wide(self) -> pd.DataFrame:
        """Share of each (group, label) among the strongest positive / negative images and in all training."""
        return self.composition.pivot_table(index=["group", "label"], columns="direction", values="share",
                                            fill_value=0.0)


@dataclass
class Result:
    """What notebook 07 shows."""

    findings: list[str]
    errors: dict[str, FindingErrors]
    removed: analysis.RemovedSummary
    means: dict[tuple[str, str], dict]   # (finding, arm) -> analysis.removed_vs_kept_means
    predictions: pd.DataFrame
    cohort: pd.DataFrame
    images: object
    noun: str
    sentences: dict[str, list[str]] = field(default_factory=dict)
    quotes: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)
    score_harm: pd.DataFrame | None = None   # planted-harm AUROC of the scores stage 05 selected with

    @property
    def primary(self) -> str:
        return self.findings[0]

    @property
    def planted(self) -> pd.DataFrame | None:
        return self.removed.planted


def ground_truth(run, override=None) -> pd.DataFrame | None:
    """The planted ground truth when stage 01 read synthetic data, else None.

    Stage 01 records its facts under ``summary.data`` (``synthetic``), which
    :func:`d3m_lib.synthetic.planted_ground_truth` does not read; the file beside the
    cohort (``summary.synthetic_dir``) is passed to it explicitly.
    """
    summary = (run.manifest("01_cohort") or {}).get("summary") or {}
    synthetic = (summary.get("data") or {}).get("synthetic", summary.get("synthetic", False))
    if override or not synthetic or "synthetic_dir" not in summary:
        return planted_ground_truth(run, override)
    return planted_ground_truth(run, run.path / summary["synthetic_dir"] / GROUND_TRUTH_FILE)


SCORES = {"score": "A_i (D3M's alignment score)", "auto_score": "Auto-D3M's score",
          "tau_mean": "equal-weight mean of tau (comparison)"}


def score_harm_auroc(alignment: pd.DataFrame, gt: pd.DataFrame | None, cohort: pd.DataFrame, *, n_boot: int,
                     ci_level: float) -> pd.DataFrame | None:
    """How well the scores stage 05 *selected with* rank the planted images low, per planted mechanism.

    AUROC of ``-score`` against each planted kind (and all kinds together) for D3M's ``A_i``, Auto-D3M's
    score, and, as a labelled comparison, the equal-weight mean of ``tau`` over groups; mean over seeds
    with the interval of that mean (:func:`attribution.harm_ranking_auroc`, patients of the training
    images). None on real data. Columns: finding, score, kind, value, lo, hi, n, n_planted.
    """
    if gt is None:
        return None
    coh = cohort.set_index("row")
    recs = []
    for f, a in alignment.groupby("finding", sort=False):
        a = a.sort_values(["seed", "row"], kind="mergesort")
        seeds = sorted(a["seed"].unique())
        rows = a.loc[a["seed"] == seeds[0], "row"].to_numpy()
        ids = coh.loc[rows, "image_id"].astype(str).to_numpy()
        clusters = coh.loc[rows, "subject_id"].astype(str).to_numpy()
        g = gt[gt["finding"] == f]
        taus = [c for c in a.columns if c.startswith("tau_")]
        a = a.assign(tau_mean=a[taus].mean(axis=1))
        for kind in ("all", *sorted(g["kind"].unique())):
            planted = np.isin(ids, (g if kind == "all" else g[g["kind"] == kind])["dicom_id"].astype(str))
            if not 0 < planted.sum() < len(planted):
                continue
            for col, label in SCORES.items():
                if col not in a.columns:
                    continue
                per_seed = [a.loc[a["seed"] == s, col].to_numpy(float) for s in seeds]
                if any(~np.isfinite(v).all() for v in per_seed):
                    continue   # e.g. no Auto-D3M in this run
                r = attribution.harm_ranking_auroc(per_seed, planted, clusters, n_boot=n_boot, ci_level=ci_level)
                recs.append(dict(finding=f, score=label, kind=kind.replace("_", " "), value=r["value"], lo=r["lo"],
                                 hi=r["hi"], n=r["n"], n_planted=r["n_planted"]))
    return pd.DataFrame(recs)


def score_harm_view(table: pd.DataFrame | None) -> pd.DataFrame:
    """Display form of :func:`score_harm_auroc` (or a note on real data)."""
    if table is None or table.empty:
        return pd.DataFrame({"note": ["real data (or nothing planted): no planted ground truth to rank"]})
    return pd.DataFrame({"finding": table["finding"], "score": table["score"], "planted kind": table["kind"],
                         "AUROC [CI]": [conclusions.interval_text(v, lo, hi) for v, lo, hi in
                                        zip(table["value"], table["lo"], table["hi"])],
                         "planted / training images": [f"{int(p)} / {int(n)}" for p, n in
                                                       zip(table["n_planted"], table["n"])]})


def _influential(scores: np.ndarray, train_rows: np.ndarray, targets: pd.DataFrame, cohort: pd.DataFrame,
                 finding: str, k: int) -> pd.DataFrame:
    coh = cohort.set_index("row")
    recs = []
    for j, target_row in enumerate(targets["row"].to_numpy()):
        s = scores[:, j]
        order = np.argsort(s, kind="stable")
        for direction, pick in (("positive", order[::-1][:k]), ("negative", order[:k])):
            rows = train_rows[pick]
            recs.append(pd.DataFrame({"target": j, "target_row": int(target_row), "direction": direction,
                                      "rank": np.arange(len(pick)), "train_row": rows, "score": s[pick],
                                      "group": coh.loc[rows, "group"].astype(str).to_numpy(),
                                      "y": coh.loc[rows, finding].to_numpy()}))
    return pd.concat(recs, ignore_index=True) if recs else pd.DataFrame(
        columns=["target", "target_row", "direction", "rank", "train_row", "score", "group", "y"])


def _finding_errors(run, cfg, predictions, cohort, finding, noun) -> FindingErrors:
    seeds = predictions.loc[(predictions["finding"] == finding) & (predictions["method"] == BASELINE), "seed"]
    have = trak_seeds(run, finding, seeds)
    if not have:
        raise FileNotFoundError(f"no saved TRAK state for '{finding}' under {run.stage_dir('04_trak')} for any "
                                f"seed of {sorted(set(seeds))}: run notebook 04")
    seed = have[0]
    worst, errs = analysis.worst_group_errors(predictions, finding, cfg.n_targets, method=BASELINE, split="test",
                                              seed=seed, min_group_n=cfg.min_group_n)
    targets = errs.merge(cohort[["row", "image_id", "subject_id", "study_id"]], on="row", how="left")
    p = predictions[(predictions["finding"] == finding) & (predictions["method"] == BASELINE)
                    & (predictions["seed"] == seed) & (predictions["split"] == "test")]
    g = p[p["group"] == worst]
    acc = float((g["pred"].astype(int) == g["y"].astype(int)).mean())
    sentence = (conclusions.worst_group_sentence(worst, acc, float("nan"), float("nan"), noun, BASELINE,
                                                 finding=finding)[:-1]
                + f" (seed {seed}, test set); {len(errs)} of its misclassified images are analysed.")
    if errs.empty:
        empty = _influential(np.zeros((0, 0)), np.zeros(0, int), errs, cohort, finding, cfg.n_top)
        return FindingErrors(finding, seed, worst, targets, empty, pd.DataFrame(
            columns=["direction", "group", "label", "count", "share"]), sentence)
    scorer = attribution.load_scorer(trak_dir(run, finding, seed))   # read-only
    scores = np.asarray(scorer.scores(errs["row"].to_numpy()))
    train_rows = np.asarray(scorer.train_rows)
    return FindingErrors(finding, seed, worst, targets,
                         _influential(scores, train_rows, errs, cohort, finding, cfg.n_top),
                         analysis.influence_composition(scores, train_rows, cohort, finding, cfg.n_top), sentence)


def _planted_sentences(planted: pd.DataFrame | None, finding: str, arms=None, head: bool = False) -> list[str]:
    if planted is None:
        return ["Real data has no planted ground truth, so the precision and recall of a selection cannot be "
                "computed."]
    p = planted[(planted["finding"] == finding) & (planted["method"].isin(arms) if arms else True)]
    p = p.assign(_o=p["method"].map({m: i for i, m in enumerate(_methods.order(p["method"]))})).sort_values(
        ["_o", "kind"], kind="stable")
    return [conclusions.planted_sentence(r.method, r.kind, r.precision, r.precision_min, r.precision_max,
                                         r.base_rate, r.recall, int(r.n_seeds), finding if head else None)
            for r in p.itertuples()]


def _quotes(res: Result) -> tuple[dict, dict]:
    f = res.primary
    q = {"ea_primary_finding": f, "ea_worst_group_sentence": res.errors[f].sentence if f in res.errors else ""}
    n = {"ea_most_removed_rate": float("nan"), "ea_d3m_removed": float("nan")}
    rg = res.removed.by_group[(res.removed.by_group["finding"] == f) & (res.removed.by_group["method"] == STUDY_ARM)]
    if rg.empty:
        q["ea_most_removed_group"] = q["ea_removal_sentence"] = (
            f"not run ({_methods.label(STUDY_ARM)} is not among this run's arms)")
    else:
        top = rg.sort_values(["removed_rate", "group"], ascending=[False, True]).iloc[0]
        tot = res.removed.by_finding.set_index(["finding", "method"]).loc[(f, STUDY_ARM)]
        q["ea_most_removed_group"] = str(top["group"])
        q["ea_removal_sentence"] = conclusions.removal_sentence(STUDY_ARM, str(top["group"]), top["removed_rate"],
                                                                tot["removed_rate"], res.noun)
        n["ea_most_removed_rate"], n["ea_d3m_removed"] = float(top["removed_rate"]), float(tot["removed"])
    # the Results page: the study's arm and its count-matched random control
    arms = [STUDY_ARM] + [m for m in _methods.order() if _methods.get(m).count_from == STUDY_ARM]
    q["ea_planted_summary"] = " ".join(_planted_sentences(res.planted, f, arms))
    return q, n


def planted_view(res: Result, finding: str | None = None) -> pd.DataFrame:
    """The planted-bias table of one finding (all arms, registry order), or a note on real data."""
    if res.planted is None:
        return pd.DataFrame({"note": ["real data: no planted ground truth"]})
    p = res.planted[res.planted["finding"] == (finding or res.primary)]
    p = p.assign(arm=[_methods.label(m) for m in p["method"]],
                 _o=p["method"].map({m: i for i, m in enumerate(_methods.order(p["method"]))}))
    return p.sort_values(["_o", "kind"], kind="stable")[["arm", "kind", "n_removed", "precision", "precision_min",
                                                         "precision_max", "recall", "base_rate"]]


def run(stage, progress: bool = False) -> Result:
    """Compute every table of stage 07, save them in ``stage.dir`` and finish the stage."""
    from tqdm.auto import tqdm

    cfg, rd = stage.cfg, stage.run
    d05 = rd.require("05_d3m")
    rd.require("04_trak")
    predictions = pd.read_parquet(d05 / "predictions.parquet")
    selections = pd.read_parquet(d05 / "selections.parquet")
    cohort = rd.cohort()
    images = rd.images(cohort["row"])
    findings = list(dict.fromkeys(predictions["finding"].astype(str)))
    noun = group_noun(cfg)
    errs = {f: _finding_errors(rd, cfg, predictions, cohort, f, noun)
            for f in tqdm(findings, desc="worst-group errors (TRAK)", disable=not progress)}
    removed = analysis.removed_summary(selections, cohort, ground_truth(rd, cfg.synthetic_ground_truth))
    trak_arms = [m for m in _methods.order(selections["method"].astype(str))
                 if m in _methods.REGISTRY and _methods.get(m).needs_trak]
    means = {(f, m): analysis.removed_vs_kept_means(images, selections, cohort, f, method=m)
             for f in tqdm(findings, desc="mean images", disable=not progress) for m in trak_arms
             if ((selections["finding"] == f) & (selections["method"] == m) & ~selections["kept"]).any()}
    res = Result(findings, errs, removed, means, predictions, cohort, images, noun)
    res.score_harm = score_harm_auroc(pd.read_parquet(d05 / "alignment.parquet"),
                                      ground_truth(rd, cfg.synthetic_ground_truth), cohort,
                                      n_boot=cfg.n_boot_descriptive, ci_level=cfg.ci_level)
    res.sentences = {"worst_group": [e.sentence for e in errs.values()],
                     "planted": [s for f in findings for s in _planted_sentences(res.planted, f, head=True)]}
    res.quotes, res.numbers = _quotes(res)
    pd.concat([e.targets.drop(columns=["subject_id", "study_id", "image_id"]).assign(finding=f)  # no identifiers
               for f, e in errs.items()], ignore_index=True).to_csv(stage.path("targets.csv"), index=False)
    pd.concat([e.influential.assign(finding=f) for f, e in errs.items()], ignore_index=True).to_csv(
        stage.path("influential.csv"), index=False)
    pd.concat([e.composition.assign(finding=f) for f, e in errs.items()], ignore_index=True).to_csv(
        stage.path("composition.csv"), index=False)
    for name in ("by_group", "by_label", "by_finding"):
        getattr(removed, name).to_csv(stage.path(f"removed_{name}.csv"), index=False)
    if removed.planted is not None:
        removed.planted.to_csv(stage.path("planted_recovery.csv"), index=False)
    if res.score_harm is not None:
        res.score_harm.to_csv(stage.path("score_harm_auroc.csv"), index=False)
    if means:
        pd.concat([m["region_table"].assign(finding=f, method=a, seed=m["seed"]) for (f, a), m in means.items()],
                  ignore_index=True).to_csv(stage.path("mean_images_regions.csv"), index=False)
    stage.path("sentences.json").write_text(json.dumps({**res.sentences, "quotes": res.quotes}, indent=1))
    stage.finish({"findings": findings, "trak_seeds": {f: e.seed for f, e in errs.items()}})
    return res


def explorer_panel(stage, res: Result):
    """The explorer (live panel in JupyterLab, still figure in the book) on ERM of the first finding.

    Its seed control scores with that seed's own TRAK state (:func:`scorer_for`).
    """
    return explorer.show(res.predictions, stage.policy(), res.primary, BASELINE, interactive=stage.cfg.interactive,
                         images=res.images, cohort=res.cohort, scorer_for=scorer_for(stage.run),
                         n_top=stage.cfg.n_top)


def explorer_note(panel) -> str:
    """How to get the live explorer, for a still figure; nothing for the live panel."""
    try:
        from ipywidgets import Widget
    except ImportError:
        return explorer.HOW_TO_INTERACT
    return "" if isinstance(panel, Widget) else explorer.HOW_TO_INTERACT
