"""Stage 05: D3M selections and the retraining of every arm, each with the same training budget.

For each finding and seed: the anchor's (``base``) validation loss per D3M group,
the TRAK group coefficients of stage 04, the alignment scores, and the removal curve:
D3M and Auto-D3M removal at each share of ``d3m_k_grid``, retrained on **every** seed.
The k each of D3M and Auto-D3M uses (``d3m_selection: validated_k``) is the grid point
with the highest validation worst-group accuracy **averaged over all seeds**; ties go to
the smaller k (:func:`choose_k`). Then the selections of every arm through
:mod:`d3m_lib.methods` and the retraining of each arm by
:func:`training.continue_training` from the anchor for ERM's step budget.

Every training is a task of the grid executor (:mod:`d3m_lib.grid`, :func:`training.retrain`).
The curve's models use their own batch-order stream (``CURVE_STREAM``); every arm's
test model is trained **fresh** at the chosen k in the default stream, like continued
ERM (whose predictions, with ``base``'s, come from stage 03). So the D3M model scored on
test is never the curve model that won on validation. Count-matched random controls
(``random``, ``auto_random``) get ``random_draws`` draws per seed, each its own training
(``draw`` 0..R-1 in the tables; 0 for every other arm); random selections draw from
``(removal_seed, seed, draw, arm)``, never from a statistics seed. Thresholds are chosen
on validate.

Writes ``predictions.parquet``, ``selections.parquet``, ``alignment.parquet``,
``curve.parquet``, ``chosen_k.parquet`` (with the A_i < 0 heuristic's count and the
oracle's planted count), ``weighting.parquet``, ``arms.parquet``, ``auto_groups.parquet``
and, per retrained model, ``<finding>/<name>/seed<s>/`` (final checkpoint, history,
predictions). A model whose kept mask is unchanged is not retrained on a re-run (the
stage's step record); two arms with the same kept mask share one model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import d3m, grid, methods, metrics, training
from ..synthetic import planted_ground_truth

PRED_COLUMNS = ["finding", "method", "seed", "draw", "split", "row", "group", "y", "logit", "prob", "threshold",
                "pred"]
CURVE_METHODS = ("d3m", "auto_d3m")
CURVE_STREAM = 1   # batch-order stream of the removal curve's models (every test model: stream 0)
BETAS = (0.0, 1.0, 5.0, 20.0)


@dataclass
class Result:
    """What notebook 05 shows."""

    predictions: pd.DataFrame       # PRED_COLUMNS, every arm incl. erm and base (draw: 0..R-1 of a control)
    selections: pd.DataFrame        # finding, method, seed, draw, row, kept
    alignment: pd.DataFrame         # finding, seed, row, score, auto_score, planted, tau_<group>...
    group_losses: pd.DataFrame      # finding, seed, group, loss, weight
    curve: pd.DataFrame             # finding, seed, method, k, share, split, wga (every seed)
    chosen_k: pd.DataFrame          # finding, method, rule, k, share, heuristic_k, oracle_k, val_wga, n_seeds
    weighting: pd.DataFrame         # finding, seed, weighting, beta, k, changed, w_<group>, precision, recall
    arms: pd.DataFrame              # finding, seed, method, draw, n_train, n_kept, n_removed, steps, model, seconds
    auto_groups: pd.DataFrame       # finding, seed, group, pseudo, n  (Auto-D3M pseudo-groups x race)
    planted: pd.DataFrame | None    # finding, method, seed, draw, n_removed, n_planted, hit, precision, recall,
    #                                 base_rate
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
    out = out.assign(finding=finding, method=method, seed=seed, draw=0, threshold=thr)
    out["pred"] = (out["prob"] >= thr).astype(int)
    return out[PRED_COLUMNS]


class _Models:
    """The retraining tasks of one grid wave; one model per (finding, seed, stream, kept mask)."""

    def __init__(self, stage, images):
        self.stage, self.images = stage, images
        self.tasks: list = []
        self.by_key: dict = {}     # (finding, seed, stream, mask hash) -> model name
        self.dirs: dict = {}       # (finding, seed, name) -> folder

    def add(self, ps: dict, finding: str, seed: int, name: str, kept: np.ndarray, stream: int = 0) -> str:
        """The model of ``kept`` (a new task, or the one already asked for with the same mask): its name."""
        kept = np.asarray(kept, dtype=bool)
        h = hashlib.sha256(np.packbits(kept).tobytes() + len(kept).to_bytes(8, "little")).hexdigest()
        key = (finding, seed, stream, h)
        if key in self.by_key:
            return self.by_key[key]
        out = self.stage.model_dir(finding, seed, name)
        tcfg = dataclasses.replace(ps["tcfg"], stream=stream)
        tr = ps["tr"]
        self.tasks.append(grid.Task(
            f"{finding}/seed{seed}/{name}", "d3m_lib.training:retrain",
            dict(cfg=tcfg, images=self.images, rows=tr[0][kept], y=tr[1][kept], anchor=ps["anchor"], out_dir=out,
                 va=ps["va"], te=ps["te"], steps=ps["steps"]),
            signature={"kept": h, "steps": ps["steps"], "stream": stream},
            files=tuple(out / f"preds_{s}.parquet" for s in ("validate", "test"))))
        self.by_key[key] = name
        self.dirs[(finding, seed, name)] = out
        return name

    def run(self, g) -> dict:
        """Train the wave on ``g``; ``{(finding, seed, name): {split: predictions}}``."""
        res = {t.key: r for t, r in zip(self.tasks, g.run(self.tasks))}
        out = {}
        for (f, s, name), d in self.dirs.items():
            out[(f, s, name)] = ({sp: pd.read_parquet(d / f"preds_{sp}.parquet") for sp in ("validate", "test")},
                                 res[f"{f}/seed{s}/{name}"].seconds)
        return out


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


def choose_k(curve: pd.DataFrame, method: str) -> tuple[int, float]:
    """The k of ``method`` with the highest validation worst-group accuracy, averaged over ALL seeds.

    ``curve``: stage 05's curve table (finding, seed, method, k, split, wga); every seed's
    curve counts equally (a seed whose value at some k is NaN, from too small groups, is
    left out of that k's mean). Ties (equal means): the smaller k. Returns ``(k, mean)``.
    """
    v = curve[(curve["method"] == method) & (curve["split"] == "validate") & (curve["k"] > 0)]
    mean = v.groupby("k")["wga"].mean().dropna().sort_index()
    if mean.empty:
        raise RuntimeError(f"removal curve of {method}: no validation worst-group accuracy (groups too small "
                           f"for min_group_n?)")
    best = mean.max()
    k = int(mean.index[mean.to_numpy() == best].min())
    return k, float(best)


def _wga_rows(p: pd.DataFrame, min_group_n: int, **keys) -> list[dict]:
    return [dict(**keys, split=split, wga=worst_group_accuracy(ps["y"], ps["pred"], ps["group"], min_group_n))
            for split, ps in ((sp, p[p["split"] == sp]) for sp in ("validate", "test"))]


def run(stage, progress: bool = False) -> Result:
    """Selections, removal curve, retraining and predictions of every arm (see the module docstring)."""
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
    curve_methods = CURVE_METHODS if need_auto else ("d3m",)
    coh = cohort.set_index("row")
    ea, et = cfg.epochs_anchor, cfg.epochs_anchor + cfg.epochs_more

    preds, sels, align, losses, curve, weighting, arm_rows, auto_ct, planted_rows, chosen = ([] for _ in range(10))
    per: dict = {}   # finding -> what the waves need
    g = grid.Grid(stage, "05 D3M", progress=progress)
    try:
        curve_models = _Models(stage, images)
        # -- scores per finding and seed; the removal curve's models (every seed) ---------------------
        for finding in findings:
            tr, va, te = (training.task_rows(cohort, finding, s) for s in ("train", "validate", "test"))
            n_train = len(tr[0])
            train_groups = coh.loc[tr[0], "group"].astype(str).to_numpy()
            train_ids = (coh.loc[tr[0], "image_id"].astype(str).to_numpy() if "image_id" in coh
                         else tr[0].astype(str))
            planted = _planted_mask(gt, finding, train_ids)
            grid_k = sorted({max(1, int(round(f * n_train))) for f in cfg.d3m_k_grid})
            per_seed = {}
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
                losses.append(pd.DataFrame({"finding": finding, "seed": seed, "group": gl.index,
                                            "loss": gl.to_numpy(), "weight": w.reindex(gl.index).to_numpy()}))
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
                ps = per_seed[seed] = dict(score=score, auto=auto, tau=tau, gl=gl, tcfg=tcfg, tr=tr, va=va, te=te,
                                           anchor=bdir / f"epoch_{ea:02d}.pt",
                                           steps=training.continuation_steps(tcfg, n_train))
                for m in curve_methods:   # k = 0: continued ERM
                    curve += _wga_rows(erm_pred, cfg.min_group_n, finding=finding, seed=seed, method=m, k=0,
                                       share=0.0)
                for k in grid_k:
                    scores = {"d3m": score, "auto_d3m": auto.scores if auto is not None else None}
                    for m in curve_methods:
                        kept = d3m.select(scores[m], "k_lowest", k).to_numpy()
                        name = curve_models.add(ps, finding, seed, f"curve_{m}_k{k}", kept, stream=CURVE_STREAM)
                        ps.setdefault("curve", []).append((m, k, name))
            per[finding] = dict(tr=tr, va=va, te=te, n_train=n_train, train_groups=train_groups,
                                train_ids=train_ids, planted=planted, per_seed=per_seed)
        curve_out = curve_models.run(g)
        for finding, f in per.items():
            for seed, ps in f["per_seed"].items():
                for m, k, name in ps.get("curve", []):
                    p = _with_threshold(curve_out[(finding, seed, name)][0], m, finding, seed, cfg.threshold_rule)
                    curve += _wga_rows(p, cfg.min_group_n, finding=finding, seed=seed, method=m, k=k,
                                       share=k / f["n_train"])
        curve_df = pd.DataFrame(curve)
        # -- the k of D3M and Auto-D3M: mean over every seed, ties to the smaller k -------------------
        arm_models = _Models(stage, images)
        plan = []
        for finding, f in per.items():
            cf = curve_df[curve_df["finding"] == finding]
            heuristic = int(np.mean([(ps["score"] < 0).sum() for ps in f["per_seed"].values()]))
            oracle_k = float(f["planted"].sum()) if f["planted"] is not None else np.nan
            ks = {}
            for m in curve_methods:
                if cfg.d3m_selection == "validated_k":
                    ks[m], vw = choose_k(cf, m)
                else:
                    ks[m], vw = (cfg.d3m_k if cfg.d3m_selection == "k_lowest" else None), float("nan")
                chosen.append(dict(finding=finding, method=m, rule=cfg.d3m_selection, k=ks[m],
                                   share=(ks[m] / f["n_train"]) if ks[m] else float("nan"), heuristic_k=heuristic,
                                   oracle_k=oracle_k, val_wga=vw, n_seeds=len(cfg.seeds)))
            rule = "negative" if cfg.d3m_selection == "negative" else "k_lowest"
            # -- every arm, every seed (count-matched controls: random_draws draws), all fresh in stream 0
            tr = f["tr"]
            for seed, ps in f["per_seed"].items():
                d3m_kept = d3m.select(ps["score"], rule, ks["d3m"]).to_numpy()
                auto_kept = (d3m.select(ps["auto"].scores, rule, ks.get("auto_d3m")).to_numpy()
                             if ps["auto"] is not None else None)
                sels.append(pd.DataFrame({"finding": finding, "method": "erm", "seed": seed, "draw": 0, "row": tr[0],
                                          "kept": True}))
                weighting.append(d3m.weighting_table(ps["tau"], ps["gl"], int((~d3m_kept).sum()), d3m_kept,
                                                     f["planted"], BETAS).assign(finding=finding, seed=seed))
                n_removed: dict = {}
                for m in arms:
                    for draw in range(methods.draws(m, cfg.random_draws)):
                        ctx = methods.SelectionContext(
                            train_rows=tr[0], train_groups=f["train_groups"], seed=seed, draw=draw,
                            removal_seed=cfg.removal_seed, d3m_kept=d3m_kept, auto_d3m_kept=auto_kept,
                            n_removed=n_removed, train_image_ids=f["train_ids"],
                            planted_ids=None if gt is None else set(
                                gt.loc[gt["finding"] == finding, "dicom_id"].astype(str)),
                            dataset=dataset)
                        kept = np.asarray(methods.get(m).select(ctx), dtype=bool)
                        n_removed.setdefault(m, int((~kept).sum()))
                        name = arm_models.add(ps, finding, seed, m if draw == 0 else f"{m}_draw{draw}", kept)
                        plan.append((finding, seed, m, draw, kept, name))
        arm_out = arm_models.run(g)
    finally:
        g.close()

    for finding, seed, m, draw, kept, name in plan:
        f = per[finding]
        tr, n_train, planted = f["tr"], f["n_train"], f["planted"]
        frames, secs = arm_out[(finding, seed, name)]
        preds.append(_with_threshold(frames, m, finding, seed, cfg.threshold_rule).assign(draw=draw))
        sels.append(pd.DataFrame({"finding": finding, "method": m, "seed": seed, "draw": draw, "row": tr[0],
                                  "kept": kept}))
        arm_rows.append(dict(finding=finding, seed=seed, method=m, draw=draw, n_train=n_train,
                             n_kept=int(kept.sum()), n_removed=int((~kept).sum()),
                             steps=f["per_seed"][seed]["steps"], model=name, seconds=round(secs, 1)))
        if planted is not None:
            rem = ~kept
            hit = int((rem & planted).sum())
            planted_rows.append(dict(finding=finding, method=m, seed=seed, draw=draw, n_removed=int(rem.sum()),
                                     n_planted=int(planted.sum()), hit=hit, precision=hit / max(int(rem.sum()), 1),
                                     recall=hit / max(int(planted.sum()), 1), base_rate=float(planted.mean())))

    res = Result(
        predictions=pd.concat(preds, ignore_index=True).fillna({"draw": 0}).astype({"draw": int})[PRED_COLUMNS],
        selections=pd.concat(sels, ignore_index=True),
        alignment=pd.concat(align, ignore_index=True),
        group_losses=pd.concat(losses, ignore_index=True),
        curve=curve_df, chosen_k=pd.DataFrame(chosen),
        weighting=pd.concat(weighting, ignore_index=True),
        arms=pd.DataFrame(arm_rows),
        auto_groups=pd.concat(auto_ct, ignore_index=True) if auto_ct else pd.DataFrame(
            columns=["group", "pseudo", "n", "finding", "seed", "evr"]),
        planted=pd.DataFrame(planted_rows) if planted_rows else None,
        methods=arms, dataset=dataset, seconds=time.time() - t_start)
    for name in ("predictions", "selections", "alignment", "curve", "weighting", "arms", "auto_groups",
                 "group_losses", "chosen_k"):
        stage.save_table(getattr(res, name), f"{name}.parquet")
    d3m_arm = res.arms[(res.arms["method"] == "d3m")]
    stage.finish({"findings": findings, "seeds": list(cfg.seeds), "methods": arms,
                  "random_draws": int(cfg.random_draws),
                  "chosen_k": {f"{r['finding']}/{r['method']}": r["k"] for r in chosen},
                  "d3m_removed_mean": float(d3m_arm["n_removed"].mean()) if "d3m" in arms else None,
                  "steps": {f: int(res.arms.loc[res.arms["finding"] == f, "steps"].iloc[0]) for f in findings},
                  "tasks": len(curve_models.tasks) + len(arm_models.tasks),
                  "seconds": res.seconds})
    return res
