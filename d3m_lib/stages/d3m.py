"""Stage 05: D3M selections and the retraining of every arm, each with the same training budget.

For each finding and seed: the anchor's (``base``) validation loss per D3M group,
the TRAK group coefficients of stage 04, the alignment scores, the removal curve
(D3M, Auto-D3M and count-matched random removal at each share of ``d3m_k_grid``,
retrained, on the first ``d3m_curve_seeds`` seeds), the k each of D3M and
Auto-D3M chooses on validation worst-group accuracy, the selections of every arm
through :mod:`d3m_lib.methods`, and the retraining of each arm by
:func:`training.continue_training` from the anchor for ERM's step budget.
Thresholds are chosen on validate. ``erm`` and ``base`` predictions come from
stage 03 (ERM's continuation is the same call on all training rows).

Writes ``predictions.parquet``, ``selections.parquet``, ``alignment.parquet``,
``curve.parquet``, ``weighting.parquet``, ``arms.parquet``, ``auto_groups.parquet``
and, per retrained model, ``<finding>/<name>/seed<s>/`` (kept mask, final
checkpoint, history, predictions). A model whose kept mask is unchanged is
not retrained on a re-run; two arms with the same kept mask share one model.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import d3m, methods, metrics, training
from ..controls import random_removal
from ..synthetic import planted_ground_truth

PRED_COLUMNS = ["finding", "method", "seed", "split", "row", "group", "y", "logit", "prob", "threshold", "pred"]
CURVE_METHODS = ("d3m", "auto_d3m", "random")
BETAS = (0.0, 1.0, 5.0, 20.0)


@dataclass
class Result:
    """What notebook 05 shows."""

    predictions: pd.DataFrame       # PRED_COLUMNS, every arm incl. erm and base
    selections: pd.DataFrame        # finding, method, seed, row, kept
    alignment: pd.DataFrame         # finding, seed, row, score, auto_score, planted, tau_<group>...
    group_losses: pd.DataFrame      # finding, seed, group, loss, weight
    curve: pd.DataFrame             # finding, seed, method, k, share, split, wga
    chosen_k: pd.DataFrame          # finding, method, k, share, heuristic_k, val_wga
    weighting: pd.DataFrame         # finding, seed, weighting, beta, k, changed, w_<group>, precision, recall
    arms: pd.DataFrame              # finding, seed, method, n_train, n_kept, n_removed, steps, model, seconds
    auto_groups: pd.DataFrame       # finding, seed, group, pseudo, n  (Auto-D3M pseudo-groups x race)
    planted: pd.DataFrame | None    # finding, method, seed, n_removed, n_planted, hit, precision, recall, base_rate
    methods: list = field(default_factory=list)
    dataset: str = "synthetic"
    seconds: float = 0.0


def worst_group_accuracy(y, pred, groups, min_group_n: int) -> float:
    """The one worst-group accuracy (:class:`metrics.GroupMetrics`, groups of at least ``min_group_n``)."""
    gm = metrics.GroupMetrics(np.asarray(y, int), np.asarray(pred, float), np.asarray(pred, int),
                              np.asarray(groups).astype(str), n_boot=0, min_group_n=min_group_n)
    return float(gm.worst("accuracy").loc[0, "value"]) if gm.eligible else float("nan")


def _with_threshold(frames: dict, method: str, finding: str, seed: int, rule: str) -> pd.DataFrame:
    thr = metrics.choose_threshold(frames["validate"]["y"], frames["validate"]["prob"], rule)
    out = pd.concat([frames[s] for s in ("validate", "test")], ignore_index=True)
    out = out.assign(finding=finding, method=method, seed=seed, threshold=thr)
    out["pred"] = (out["prob"] >= thr).astype(int)
    return out[PRED_COLUMNS]


class _Trainer:
    """Retrains kept masks of one finding and seed from the anchor; one model per distinct mask."""

    def __init__(self, stage, images, tcfg, anchor, tr, va, te, steps, progress):
        self.stage, self.images, self.tcfg, self.anchor = stage, images, tcfg, anchor
        self.tr, self.va, self.te, self.steps, self.progress = tr, va, te, steps, progress
        self.models: dict[bytes, tuple[str, dict]] = {}

    def fit(self, finding: str, seed: int, name: str, kept: np.ndarray) -> tuple[str, dict, float]:
        """``(model name, {split: predictions}, seconds)`` of the model trained on ``kept``."""
        kept = np.asarray(kept, dtype=bool)
        key = np.packbits(kept).tobytes() + len(kept).to_bytes(8, "little")
        if key in self.models:
            return (*self.models[key], 0.0)
        t0 = time.time()
        out = self.stage.model_dir(finding, seed, name)
        log, sig = self.stage.steps(finding, f"seed{seed}"), {"kept": hashlib.sha256(key).hexdigest(),
                                                              "steps": self.steps}
        if not log.done(name, sig, files=tuple(out / f"preds_{s}.parquet" for s in ("validate", "test"))):
            training.continue_training(self.tcfg, self.images, self.tr[0][kept], self.tr[1][kept], self.anchor,
                                       out, val=self.va, progress=False, steps=self.steps)
            final = out / f"epoch_{self.tcfg.total_epochs:02d}.pt"
            for f in out.glob("epoch_*.pt"):
                if f != final:
                    f.unlink()  # the final model only
            model = training.load_model(self.tcfg, final)
            for split, (rows, y, groups) in (("validate", self.va), ("test", self.te)):
                training.predictions_frame(rows, split, groups, y, training.predict(model, self.tcfg, self.images, rows)
                                           ).to_parquet(out / f"preds_{split}.parquet")
            log.mark(name, sig)
        frames = {s: pd.read_parquet(out / f"preds_{s}.parquet") for s in ("validate", "test")}
        self.models[key] = (name, frames)
        return name, frames, time.time() - t0


def _planted_mask(gt: pd.DataFrame | None, finding: str, train_ids: np.ndarray) -> np.ndarray | None:
    if gt is None:
        return None
    ids = gt.loc[gt["finding"] == finding, "dicom_id"].astype(str)
    return np.isin(train_ids.astype(str), ids.to_numpy())


def _auto(scorer_fn, cfg, tr, base_val, seed):
    """Auto-D3M scores (per-validation-image pseudo-groups, no group labels) for ``cfg.d3m_auto_method``."""
    scorer = scorer_fn()
    if cfg.d3m_auto_method == "pca_per_class":   # the paper's Auto-D3M, without the n_train x n_val matrix
        blocks, G = scorer.score_factors("validate")
        return d3m.auto_d3m_per_class(blocks, G, tr[0], base_val["y"], base_val["logit"],
                                      weighting=cfg.d3m_weighting, beta=cfg.d3m_beta)
    return d3m.auto_d3m(scorer.experiment_scores("validate", len(base_val)), tr[0], base_val["y"],
                        base_val["logit"], method=cfg.d3m_auto_method, weighting=cfg.d3m_weighting,
                        beta=cfg.d3m_beta, seed=seed)


def _choose_k(curve: pd.DataFrame, method: str) -> tuple[int, float]:
    """The k with the highest mean validation worst-group accuracy over the curve's seeds (ties: smaller k)."""
    v = curve[(curve["method"] == method) & (curve["split"] == "validate") & (curve["k"] > 0)]
    mean = v.groupby("k")["wga"].mean().sort_index()
    if mean.dropna().empty:
        raise RuntimeError(f"removal curve of {method}: no validation worst-group accuracy (groups too small "
                           f"for min_group_n?)")
    k = int(mean.idxmax())
    return k, float(mean.loc[k])


def run(stage, progress: bool = False) -> Result:
    """Selections, removal curve, retraining and predictions of every arm (see the module docstring)."""
    from tqdm.auto import tqdm

    from .. import attribution

    t_start = time.time()
    cfg, run_ = stage.cfg, stage.run
    run_.require("03_baseline")
    run_.require("04_trak")
    cohort = run_.cohort()
    images = run_.images(cohort["row"])
    findings = run_.findings()
    dev = str(training.resolve_device(cfg.device))
    dataset = "synthetic" if cfg.dataset == "mimic" and cfg.synthetic else cfg.dataset
    gt = planted_ground_truth(run_, cfg.synthetic_ground_truth)
    arms = methods.for_data(cfg.methods, dataset)
    errs = methods.validate(arms, dataset, has_ground_truth=gt is not None)
    if errs:
        raise ValueError("; ".join(errs))
    arms = methods.run_order(arms)
    need_auto = "auto_d3m" in arms
    curve_seeds = list(cfg.seeds)[:cfg.d3m_curve_seeds]
    coh = cohort.set_index("row")
    ea, et = cfg.epochs_anchor, cfg.epochs_anchor + cfg.epochs_more

    preds, sels, align, losses, curve, weighting, arm_rows, auto_ct, planted_rows, chosen = ([] for _ in range(10))
    bar = tqdm(total=len(findings) * len(cfg.seeds), desc="05 D3M", disable=not progress)
    for finding in findings:
        tr, va, te = (training.task_rows(cohort, finding, s) for s in ("train", "validate", "test"))
        n_train = len(tr[0])
        train_groups = coh.loc[tr[0], "group"].astype(str).to_numpy()
        train_ids = coh.loc[tr[0], "image_id"].astype(str).to_numpy() if "image_id" in coh else tr[0].astype(str)
        planted = _planted_mask(gt, finding, train_ids)
        grid_k = sorted({max(1, int(round(f * n_train))) for f in cfg.d3m_k_grid})
        per_seed = {}
        # -- scores, and the removal curve on the curve seeds -----------------------------------
        for seed in cfg.seeds:
            tcfg = training.TrainConfig.from_params(cfg.values, seed=seed, device=dev)
            bdir = run_.model_dir("03_baseline", finding, seed)
            tdir = run_.model_dir("04_trak", finding, seed)
            fr = {m: {s: pd.read_parquet(bdir / f"preds_{s}_epoch{e:02d}.parquet") for s in ("validate", "test")}
                  for m, e in (("erm", et), ("base", ea))}
            erm_pred = _with_threshold(fr["erm"], "erm", finding, seed, cfg.threshold_rule)
            preds += [erm_pred, _with_threshold(fr["base"], "base", finding, seed, cfg.threshold_rule)]
            base_val = fr["base"]["validate"].set_index("row").loc[va[0]]
            scorer_cache = {}

            def scorer(tdir=tdir, cache=scorer_cache):
                if "s" not in cache:
                    cache["s"] = attribution.load_scorer(tdir, device=dev)   # read-only
                return cache["s"]

            vgroups = d3m.d3m_groups(va[2], va[1], cfg.d3m_groups)
            gl = d3m.group_losses(base_val["y"], base_val["logit"], vgroups)
            if cfg.d3m_groups == "race":
                tau = pd.read_parquet(tdir / "tau.parquet")
            else:
                blocks, G = scorer().score_factors("validate")
                tau = d3m.group_tau(blocks, G, vgroups, tr[0])
            if not np.array_equal(tau.index.to_numpy(), tr[0]):
                raise RuntimeError(f"TRAK scores in {tdir} do not cover {finding}'s training rows; re-run 04_trak")
            w = d3m.group_weights(gl.loc[list(tau.columns)], cfg.d3m_weighting, cfg.d3m_beta)
            losses.append(pd.DataFrame({"finding": finding, "seed": seed, "group": gl.index, "loss": gl.to_numpy(),
                                        "weight": w.reindex(gl.index).to_numpy()}))
            score = d3m.alignment_scores(tau, gl, cfg.d3m_weighting, cfg.d3m_beta)
            auto = _auto(scorer, cfg, tr, base_val, seed) if need_auto else None
            a = pd.DataFrame({"finding": finding, "seed": seed, "row": tr[0], "score": score.to_numpy(),
                              "auto_score": auto.scores.to_numpy() if auto is not None else np.nan,
                              "planted": planted if planted is not None else False})
            align.append(pd.concat([a, tau.add_prefix("tau_").reset_index(drop=True)], axis=1))
            if auto is not None:
                ct = pd.crosstab(pd.Series(va[2], name="group"), pd.Series(auto.pseudo_groups, name="pseudo"))
                auto_ct.append(ct.stack().rename("n").reset_index().assign(
                    finding=finding, seed=seed, evr=auto.explained_variance_ratio))
            anchor = bdir / f"epoch_{ea:02d}.pt"
            trainer = _Trainer(stage, images, tcfg, anchor, tr, va, te, training.continuation_steps(tcfg, n_train),
                               progress)
            rseed = cfg.stats_seed * 10007 + seed
            per_seed[seed] = dict(score=score, auto=auto, trainer=trainer, rseed=rseed, tau=tau, gl=gl)
            if seed in curve_seeds:
                for split in ("validate", "test"):   # k = 0: continued ERM
                    p = erm_pred[erm_pred["split"] == split]
                    for m in CURVE_METHODS if need_auto else ("d3m", "random"):
                        curve.append(dict(finding=finding, seed=seed, method=m, k=0, share=0.0, split=split,
                                          wga=worst_group_accuracy(p["y"], p["pred"], p["group"], cfg.min_group_n)))
                for k in grid_k:
                    masks = {"d3m": d3m.select(score, "k_lowest", k).to_numpy(),
                             "random": random_removal(tr[0], k, seed=rseed).to_numpy()}
                    if auto is not None:
                        masks["auto_d3m"] = d3m.select(auto.scores, "k_lowest", k).to_numpy()
                    for m, kept in masks.items():
                        name, frames, _ = trainer.fit(finding, seed, f"curve_{m}_k{k}", kept)
                        p = _with_threshold(frames, m, finding, seed, cfg.threshold_rule)
                        for split in ("validate", "test"):
                            ps = p[p["split"] == split]
                            curve.append(dict(finding=finding, seed=seed, method=m, k=k, share=k / n_train,
                                              split=split, wga=worst_group_accuracy(ps["y"], ps["pred"], ps["group"],
                                                                                    cfg.min_group_n)))
        # -- the k of D3M and Auto-D3M ------------------------------------------------------------
        cf = pd.DataFrame([c for c in curve if c["finding"] == finding])
        heuristic = int(np.mean([(per_seed[s]["score"] < 0).sum() for s in cfg.seeds]))
        ks = {}
        for m in ("d3m", "auto_d3m") if need_auto else ("d3m",):
            if cfg.d3m_selection == "validated_k":
                ks[m], vw = _choose_k(cf, m)
            else:
                ks[m], vw = (cfg.d3m_k if cfg.d3m_selection == "k_lowest" else None), float("nan")
            chosen.append(dict(finding=finding, method=m, rule=cfg.d3m_selection, k=ks[m],
                               share=(ks[m] / n_train) if ks[m] else float("nan"), heuristic_k=heuristic,
                               val_wga=vw))
        rule = "negative" if cfg.d3m_selection == "negative" else "k_lowest"
        # -- every arm, every seed ---------------------------------------------------------------------
        for seed in cfg.seeds:
            ps = per_seed[seed]
            d3m_kept = d3m.select(ps["score"], rule, ks["d3m"]).to_numpy()
            auto_kept = (d3m.select(ps["auto"].scores, rule, ks.get("auto_d3m")).to_numpy()
                         if ps["auto"] is not None else None)
            ctx = methods.SelectionContext(train_rows=tr[0], train_groups=train_groups, seed=ps["rseed"],
                                           d3m_kept=d3m_kept, auto_d3m_kept=auto_kept, train_image_ids=train_ids,
                                           planted_ids=None if gt is None else set(
                                               gt.loc[gt["finding"] == finding, "dicom_id"].astype(str)),
                                           dataset=dataset)
            sels.append(pd.DataFrame({"finding": finding, "method": "erm", "seed": seed, "row": tr[0], "kept": True}))
            k_run = int((~d3m_kept).sum())
            weighting.append(d3m.weighting_table(ps["tau"], ps["gl"], k_run, d3m_kept, planted, BETAS)
                             .assign(finding=finding, seed=seed))
            for m in arms:
                kept = np.asarray(methods.get(m).select(ctx), dtype=bool)
                ctx.n_removed[m] = int((~kept).sum())
                name, frames, secs = ps["trainer"].fit(finding, seed, m, kept)
                preds.append(_with_threshold(frames, m, finding, seed, cfg.threshold_rule))
                sels.append(pd.DataFrame({"finding": finding, "method": m, "seed": seed, "row": tr[0], "kept": kept}))
                arm_rows.append(dict(finding=finding, seed=seed, method=m, n_train=n_train, n_kept=int(kept.sum()),
                                     n_removed=int((~kept).sum()), steps=ps["trainer"].steps, model=name,
                                     seconds=round(secs, 1)))
                if planted is not None:
                    rem = ~kept
                    hit = int((rem & planted).sum())
                    planted_rows.append(dict(finding=finding, method=m, seed=seed, n_removed=int(rem.sum()),
                                             n_planted=int(planted.sum()), hit=hit,
                                             precision=hit / max(int(rem.sum()), 1),
                                             recall=hit / max(int(planted.sum()), 1),
                                             base_rate=float(planted.mean())))
            bar.update(1)
    bar.close()

    res = Result(
        predictions=pd.concat(preds, ignore_index=True)[PRED_COLUMNS],
        selections=pd.concat(sels, ignore_index=True),
        alignment=pd.concat(align, ignore_index=True),
        group_losses=pd.concat(losses, ignore_index=True),
        curve=pd.DataFrame(curve), chosen_k=pd.DataFrame(chosen),
        weighting=pd.concat(weighting, ignore_index=True),
        arms=pd.DataFrame(arm_rows),
        auto_groups=pd.concat(auto_ct, ignore_index=True) if auto_ct else pd.DataFrame(
            columns=["group", "pseudo", "n", "finding", "seed", "evr"]),
        planted=pd.DataFrame(planted_rows) if planted_rows else None,
        methods=arms, dataset=dataset, seconds=time.time() - t_start)
    for name in ("predictions", "selections", "alignment", "curve", "weighting", "arms", "auto_groups",
                 "group_losses", "chosen_k"):
        stage.save_table(getattr(res, name), f"{name}.parquet")
    stage.finish({"findings": findings, "seeds": list(cfg.seeds), "methods": arms,
                  "chosen_k": {f"{r['finding']}/{r['method']}": r["k"] for r in chosen},
                  "d3m_removed_mean": float(res.arms.loc[res.arms["method"] == "d3m", "n_removed"].mean())
                  if "d3m" in arms else None,
                  "steps": {f: int(res.arms.loc[res.arms["finding"] == f, "steps"].iloc[0]) for f in findings},
                  "seconds": res.seconds})
    return res
