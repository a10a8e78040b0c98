"""Stage 02: the discrepancy scan and the findings the study continues with.

:func:`run` trains one shared multi-label model over the findings with labels
(:func:`d3m_lib.scan.train_scan_model`), chooses a threshold per finding on
validate, measures per-group accuracy, AUROC, FPR and FNR there with
patient-level bootstrap intervals (the metric engine
:class:`d3m_lib.metrics.GroupMetrics`), the gap between groups with its
interval, ranks the findings and chooses them. Files in ``02_scan/``:
``model/`` (checkpoints, history.csv), ``scan.csv``, ``thresholds.json``,
``ranking.csv``, ``chosen_findings.json``. A finished scan model is reused.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import scan as scanmod
from .. import training
from ..book import group_noun
from ..metrics import DESCRIPTIVE_SEED

RANKING_COLUMNS = ["rank", "finding", "gap_accuracy", "gap_accuracy_lo", "gap_accuracy_hi", "gap_auroc",
                   "worst_group", "worst_accuracy", "best_group", "best_accuracy", "overall_accuracy",
                   "eligible", "reason"]


@dataclass
class Result:
    """What notebook 02 shows; the tables are also in ``02_scan/``."""

    history: pd.DataFrame          # epoch, lr, train_loss, val_loss, ... of the scan model
    scan: pd.DataFrame             # long: finding, group, metric, value, lo, hi, n, n_pos, note
    thresholds: dict               # {finding: threshold chosen on validate}
    counts: pd.DataFrame           # labelled images and positives per finding, split, group
    ranking: pd.DataFrame          # one row per finding (all columns of ranking.csv)
    ranking_table: pd.DataFrame    # the columns the notebook shows
    accuracy: pd.DataFrame         # finding x group validation accuracy (heatmap)
    chosen: list[str]
    top: pd.Series                 # the first eligible finding's ranking row (first row if none is eligible)
    available: list[str]
    unavailable: dict              # {finding: why it has no task}
    noun: str                      # race, sex or age band
    reused_model: bool
    seconds: float
    sentence: str                  # markdown: the chosen findings and the largest gap with its interval
    glue: dict = field(default_factory=dict)  # numbers and sentences the book quotes


def _finished_history(model_dir: Path, epochs: int) -> pd.DataFrame | None:
    """The history of a scan model that finished all ``epochs`` (its last checkpoint exists), else None."""
    hist, last = model_dir / "history.csv", model_dir / f"epoch_{epochs:02d}.pt"
    if not (hist.is_file() and last.is_file()):
        return None
    h = pd.read_csv(hist)
    return h if len(h) and int(h["epoch"].max()) == epochs else None


def top_finding(ranking: pd.DataFrame) -> pd.Series:
    """The eligible finding with the largest accuracy gap (the first row when none is eligible)."""
    eligible = ranking[ranking["eligible"].astype(bool)]
    return eligible.iloc[0] if len(eligible) else ranking.iloc[0]


def chosen_sentence(chosen, ranking: pd.DataFrame, noun: str) -> str:
    """Markdown: the chosen findings, then the largest gap (eligible if any finding is) with its interval."""
    from ..book import format_interval

    t = top_finding(ranking)
    which = ("Largest eligible accuracy gap" if ranking["eligible"].astype(bool).any()
             else "No finding is eligible; largest accuracy gap")
    gap = format_interval(t["gap_accuracy"], t["gap_accuracy_lo"], t["gap_accuracy_hi"])
    return f"Chosen: **{', '.join(chosen)}**. {which}: {t['finding']} {gap} (worst {noun} group: {t['worst_group']})."


def run(stage, progress: bool = False) -> Result:
    """Everything stage 02 computes; writes its files into ``stage.dir`` and finishes the stage."""
    t_start = time.time()
    cfg, run_ = stage.cfg, stage.run
    cohort = run_.cohort()
    images = run_.images(cohort["row"])
    tcfg = training.TrainConfig.from_params(cfg.values, seed=cfg.scan_seed)
    available, unavailable = scanmod.available_findings(cohort)
    if not available:
        raise ValueError(f"no finding has labels in both classes in this cohort: {unavailable}")

    model_dir = stage.path("model", "history.csv").parent
    history = _finished_history(model_dir, cfg.scan_epochs)
    reused = history is not None
    if not reused:
        history = scanmod.train_scan_model(tcfg, images, cohort, available, cfg.scan_epochs, model_dir,
                                           progress=progress)
    ckpt = model_dir / f"epoch_{cfg.scan_epochs:02d}.pt"
    preds, thresholds = scanmod.scan_predictions(tcfg, images, cohort, available, ckpt, cfg.threshold_rule)
    stats = dict(n_boot=cfg.n_boot_descriptive, ci_level=cfg.ci_level, seed=DESCRIPTIVE_SEED)
    scan_df = scanmod.metrics_from_predictions(preds, available, **stats)
    counts = scanmod.label_counts(cohort, available)
    ranking = scanmod.rank_findings(scan_df, counts, min_group_n=cfg.min_group_n, min_group_pos=cfg.min_group_pos,
                                    unavailable=unavailable)
    gaps = scanmod.gap_intervals(preds, available, min_group_n=cfg.min_group_n, **stats)
    ranking = ranking.merge(gaps, on="finding", how="left")
    scan_df.to_csv(stage.path("scan.csv"), index=False)
    stage.path("thresholds.json").write_text(json.dumps(thresholds, indent=2))
    ranking.to_csv(stage.path("ranking.csv"), index=False)   # written first: an error below points to it
    with warnings.catch_warnings(record=True) as caught:   # a chosen finding that is not eligible: said
        warnings.simplefilter("always")                      # as a note, not a Python warning on the page
        chosen = scanmod.choose_findings(ranking, findings=cfg.findings, top_k=cfg.scan_top_k)
    for w in caught:
        print(f"note: {w.message}")
    stage.path("chosen_findings.json").write_text(json.dumps(chosen))

    top = top_finding(ranking)
    seconds = time.time() - t_start
    glue = dict(scan_chosen=", ".join(chosen), scan_top_finding=str(top["finding"]),
                scan_top_gap=float(top["gap_accuracy"]), scan_top_worst_group=str(top["worst_group"]),
                scan_n_eligible=int(ranking["eligible"].sum()), scan_seconds=seconds)
    stage.finish({"chosen": chosen, "top_gap": float(top["gap_accuracy"]), "thresholds": thresholds,
                  "reused_model": reused, "seconds": seconds})
    return Result(history=history, scan=scan_df, thresholds=thresholds, counts=counts, ranking=ranking,
                  ranking_table=ranking[RANKING_COLUMNS], accuracy=scanmod.metric_matrix(scan_df, "accuracy"),
                  chosen=chosen, top=top, available=available, unavailable=unavailable, noun=group_noun(cfg),
                  reused_model=reused, seconds=seconds,
                  sentence=chosen_sentence(chosen, ranking, group_noun(cfg)), glue=glue)
