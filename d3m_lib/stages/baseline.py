"""Stage 03: the baseline of every chosen finding and seed, and its per-group test metrics.

Per finding and seed, two tasks of the training grid (:mod:`d3m_lib.grid`,
:func:`d3m_lib.training.baseline_anchor` and :func:`~d3m_lib.training.baseline_rest`) train the **anchor**
(epochs 1..``epochs_anchor`` from scratch on all training images, its learning
rate annealed to 0 within those epochs, :func:`d3m_lib.training.lr_at`) and then
**continued ERM** (epochs ``epochs_anchor+1 .. epochs_anchor+epochs_more`` from
the anchor on all training images), saves predictions on validate and test for
both, and chooses each one's decision threshold on validate.

Models in the tables carry the method registry's names: ``base`` is the anchor
(``epoch_<epochs_anchor>.pt``, the model D3M edits and TRAK attributes), ``erm``
is continued ERM (the last epoch). Test metrics come from the one metric engine
(:class:`d3m_lib.metrics.GroupMetrics`): point = mean over seeds; interval = that
of the mean, a two-level bootstrap of seeds and of patients within group, inside
[0, 1]; its one worst-group rule (``min_group_n``). The per-group validation losses of the anchor, which weight
D3M, are reported per seed with their spread across seeds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import d3m, grid, training
from ..metrics import DESCRIPTIVE_SEED, GroupMetrics
from ..rundir import Stage

ANCHOR, FINAL = "base", "erm"  # d3m_lib.methods names of the anchor and of continued ERM


@dataclass
class Result:
    """What notebook 03 shows (each table also written to ``03_baseline/<name>.csv``)."""

    runs: pd.DataFrame               # finding, seed, threshold_base, threshold_erm, resumed, seconds
    history: pd.DataFrame            # learning curves: finding, seed, epoch, lr, train_loss, val_loss, ...
    test_metrics: pd.DataFrame       # engine table: finding, model, epoch, group, metric, value, lo, hi, ...
    worst_group: pd.DataFrame        # finding, model, epoch, group, value, lo, hi, gap, gap_lo, gap_hi, ...
    erm_vs_anchor: pd.DataFrame      # finding: paired change of worst-group accuracy, erm - base
    anchor_losses: pd.DataFrame      # finding, seed, group, loss, n: validation BCE of the anchor
    anchor_loss_spread: pd.DataFrame  # finding, group, mean, sd, cv, min, max, max_over_min, n_seeds
    epochs: dict = field(default_factory=dict)  # {"base": epochs_anchor, "erm": last epoch}
    seconds: float = 0.0


def _model_epochs(cfg) -> dict[str, int]:
    ea, et = int(cfg.epochs_anchor), int(cfg.epochs_anchor) + int(cfg.epochs_more)
    return {ANCHOR: ea} if et == ea else {ANCHOR: ea, FINAL: et}


def anchor_loss_spread(losses: pd.DataFrame) -> pd.DataFrame:
    """Spread across seeds of each group's anchor validation loss.

    ``losses``: finding, seed, group, loss. Returns per finding and group the
    mean, sample sd, coefficient of variation (sd / mean), min, max,
    max / min and the number of seeds (sd and cv are NaN with one seed).
    """
    g = losses.groupby(["finding", "group"], sort=True)["loss"]
    out = g.agg(mean="mean", sd=lambda x: x.std(ddof=1) if len(x) > 1 else np.nan, min="min", max="max",
                n_seeds="size").reset_index()
    out["cv"] = out["sd"] / out["mean"]
    out["max_over_min"] = out["max"] / out["min"]
    return out[["finding", "group", "mean", "sd", "cv", "min", "max", "max_over_min", "n_seeds"]]


def run(stage: Stage, progress: bool = False) -> Result:
    """Train (or resume) every baseline, evaluate it, write the tables, finish the stage."""
    t_start = time.time()
    cfg, run_ = stage.cfg, stage.run
    cohort = run_.cohort()
    images = run_.images(cohort["row"])
    findings = run_.findings()
    epochs = _model_epochs(cfg)
    subject = cohort.set_index("row")["subject_id"] if "subject_id" in cohort.columns else None

    runs, hist, test, losses = [], [], [], []
    jobs = [(f, s) for f in findings for s in cfg.seeds]
    rows = {f: tuple(training.task_rows(cohort, f, s) for s in ("train", "validate", "test")) for f in findings}
    tasks = []
    for finding, seed in jobs:   # per finding and seed: the anchor, then continued ERM with predictions
        tcfg = training.TrainConfig.from_params(cfg.values, seed=seed)
        out = stage.model_dir(finding, seed)
        tr, va, te = rows[finding]
        files = training.baseline_files(tcfg)
        key = f"{finding}/seed{seed}"
        tasks += [grid.Task(f"{key}/anchor", "d3m_lib.training:baseline_anchor",
                            dict(cfg=tcfg, images=images, tr=tr, va=va, out_dir=out),
                            files=tuple(out / f for f in files["anchor"])),
                  grid.Task(f"{key}/more", "d3m_lib.training:baseline_rest",
                            dict(cfg=tcfg, images=images, tr=tr, va=va, te=te, out_dir=out,
                                 threshold_rule=cfg.threshold_rule),
                            files=tuple(out / f for f in files["more"]), after=(f"{key}/anchor",))]
    with grid.Grid(stage, "03 baseline", progress=progress) as g:
        done = g.run(tasks)
    for j, (finding, seed) in enumerate(jobs):
        anchor, more = done[2 * j], done[2 * j + 1]
        out = stage.model_dir(finding, seed)
        thresholds = json.loads((out / "threshold.json").read_text())["by_epoch"]
        runs.append(dict(finding=finding, seed=seed,
                         **{f"threshold_{m}": thresholds[str(e)] for m, e in epochs.items()},
                         resumed=",".join(n for n, r in (("anchor", anchor), ("more", more)) if r.resumed) or "-",
                         seconds=round(anchor.seconds + more.seconds, 1)))
        hist.append(pd.read_csv(out / "history.csv").assign(finding=finding, seed=seed))
        for model, e in epochs.items():
            p = pd.read_parquet(out / f"preds_test_epoch{e:02d}.parquet")
            t = thresholds[str(e)]
            test.append(p.assign(finding=finding, seed=seed, model=model, epoch=e,
                                 pred=(p["prob"] >= t).astype(int)))
        pv = pd.read_parquet(out / f"preds_validate_epoch{epochs[ANCHOR]:02d}.parquet")
        gl = d3m.group_losses(pv["y"].to_numpy(), pv["logit"].to_numpy(), pv["group"].to_numpy())
        n = pv.groupby("group").size()
        losses.append(pd.DataFrame({"finding": finding, "seed": seed, "group": gl.index,
                                    "loss": gl.to_numpy(), "n": n.loc[gl.index].to_numpy()}))

    runs = pd.DataFrame(runs)
    hist = pd.concat(hist, ignore_index=True)
    hist = hist[["finding", "seed", *[c for c in hist.columns if c not in ("finding", "seed")]]]
    test = pd.concat(test, ignore_index=True)
    if subject is not None:
        test["subject_id"] = subject.loc[test["row"]].to_numpy()
    losses = pd.concat(losses, ignore_index=True)

    metrics_t, worst, paired = [], [], []
    for finding, frame in test.groupby("finding", sort=False):
        gm = GroupMetrics.from_frame(frame, cluster="subject_id" if subject is not None else None,
                                     model="model", seed="seed", n_boot=cfg.n_boot_descriptive, ci_level=cfg.ci_level,
                                     random_state=DESCRIPTIVE_SEED, min_group_n=cfg.min_group_n)
        metrics_t.append(gm.table().assign(finding=finding))
        w = gm.worst_ci("accuracy")
        d = gm.difference_ci("accuracy")[["model", "value", "lo", "hi"]]
        w = w.merge(d.rename(columns={"value": "gap", "lo": "gap_lo", "hi": "gap_hi"}), on="model")
        worst.append(w.assign(finding=finding))
        if FINAL in epochs:
            pw = gm.paired_worst_ci(FINAL, ANCHOR, "accuracy")
            paired.append(dict(finding=finding, a=FINAL, b=ANCHOR, metric="worst-group accuracy", **pw))
    ep = pd.Series(epochs, name="epoch")
    metrics_t = pd.concat(metrics_t, ignore_index=True)
    metrics_t.insert(2, "epoch", ep.loc[metrics_t["model"]].to_numpy())
    metrics_t = metrics_t[["finding", *[c for c in metrics_t.columns if c != "finding"]]]
    worst = pd.concat(worst, ignore_index=True)
    worst.insert(1, "epoch", ep.loc[worst["model"]].to_numpy())
    worst = worst[["finding", "model", "epoch", "group", "value", "lo", "hi", "seed_sd", "n_seeds", "n",
                   "gap", "gap_lo", "gap_hi", "excluded_groups"]]
    paired = pd.DataFrame(paired, columns=["finding", "a", "b", "metric", "value", "lo", "hi", "seed_sd",
                                           "n_seeds"])
    spread = anchor_loss_spread(losses)

    for name, df in (("runs", runs), ("history", hist), ("test_metrics", metrics_t), ("worst_group", worst),
                     ("erm_vs_anchor", paired), ("anchor_group_losses", losses),
                     ("anchor_loss_spread", spread)):
        stage.save_table(df, f"{name}.csv")
    seconds = time.time() - t_start
    top = worst[worst["model"] == (FINAL if FINAL in epochs else ANCHOR)].set_index("finding")
    stage.finish({"findings": findings, "seeds": list(cfg.seeds), "epochs": epochs, "seconds": seconds,
                  "wga": {f: float(v) for f, v in top["value"].items()},
                  "anchor_loss_cv_max": _nan_none(spread["cv"].max())})
    return Result(runs, hist, metrics_t, worst, paired, losses, spread, epochs, seconds)


def _nan_none(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)
