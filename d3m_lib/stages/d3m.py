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

from .. import d3m, grid, methods, metrics, objectives, training
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
    #                                 base_rate (removal arms)
    tuning: pd.DataFrame | None = None     # finding, seed, method, setting, value, split, wga: every grid point
    chosen_hp: pd.DataFrame | None = None  # finding, method, setting, val_wga, n_settings, n_seeds
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
        self.dfr: dict = {}        # (finding, seed) -> (folder, C grid)

    def add(self, ps: dict, finding: str, seed: int, name: str, plan, stream: int = 0) -> str:
        """The model of ``plan`` (a kept mask or an :class:`objectives.Plan`; a new task, or the one already
        asked for with the same plan): its name."""
        plan = objectives.as_plan(plan, len(ps["tr"][0]), name)
        h = plan.signature()
        key = (finding, seed, stream, h)
        if key in self.by_key:
            return self.by_key[key]
        out = self.stage.model_dir(finding, seed, name)
        tcfg = dataclasses.replace(ps["tcfg"], stream=stream)
        tr, pos = ps["tr"], plan.positions()
        kwargs = dict(cfg=tcfg, images=self.images, rows=tr[0][pos], y=tr[1][pos], anchor=ps["anchor"], out_dir=out,
                      va=ps["va"], te=ps["te"], steps=ps["steps"])
        if plan.weights is not None:
            kwargs["weights"] = plan.weights[pos] / plan.weights[pos].mean()
        if plan.dro_groups is not None:
            kwargs.update(dro_groups=plan.dro_groups[pos], dro_eta=plan.dro_eta)
        self.tasks.append(grid.Task(
            f"{finding}/seed{seed}/{name}", "d3m_lib.training:retrain", kwargs,
            signature={"kept": h, "steps": ps["steps"], "stream": stream},
            files=tuple(out / f"preds_{s}.parquet" for s in ("validate", "test"))))
        self.by_key[key] = name
        self.dirs[(finding, seed, name)] = out
        return name

    def add_dfr(self, ps: dict, finding: str, seed: int, plan) -> str:
        """DFR's task of one seed: every C of its grid fitted on one half of validation (:func:`objectives.dfr`)."""
        name = "dfr"
        out = self.stage.model_dir(finding, seed, name)
        fit, tune = ps["dfr_halves"]
        va = ps["va"]
        part = lambda m: tuple(np.asarray(a)[m] for a in va)   # noqa: E731
        self.tasks.append(grid.Task(
            f"{finding}/seed{seed}/{name}", "d3m_lib.objectives:dfr",
            dict(cfg=ps["tcfg"], images=self.images, erm_checkpoint=ps["erm_checkpoint"], fit=part(fit),
                 tune=part(tune), te=ps["te"], grid_c=plan.dfr_c, out_dir=out,
                 stream_seed=objectives.stream(ps["tcfg"].seed, "dfr")),
            signature={"dfr": list(plan.dfr_c), "fit": hashlib.sha256(np.packbits(fit).tobytes()).hexdigest()},
            files=tuple(out / f"preds_{s}_C{i}.parquet" for s in ("validate", "test")
                        for i in range(len(plan.dfr_c)))))
        self.dfr[(finding, seed)] = (out, plan.dfr_c)
        return name

    def run(self, g) -> dict:
        """Train the wave on ``g``; ``{(finding, seed, name): {split: predictions}}``."""
        res = {t.key: r for t, r in zip(self.tasks, g.run(self.tasks))}
        out = {}
        for (f, s, name), d in self.dirs.items():
            out[(f, s, name)] = ({sp: pd.read_parquet(d / f"preds_{sp}.parquet") for sp in ("validate", "test")},
                                 res[f"{f}/seed{s}/{name}"].seconds)
        for (f, s), (d, grid_c) in self.dfr.items():
            for i in range(len(grid_c)):
                out[(f, s, f"dfr_C{i}")] = ({sp: pd.read_parquet(d / f"preds_{sp}_C{i}.parquet")
                                             for sp in ("validate", "test")}, res[f"{f}/seed{s}/dfr"].seconds)
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


def choose_setting(tuning: pd.DataFrame, method: str) -> tuple[int, float]:
    """The grid point of ``method`` with the highest validation worst-group accuracy averaged over ALL seeds
    (the rule of :func:`choose_k`); ties: the first listed. ``tuning``: stage 05's tuning table.
    Returns ``(index into the arm's settings, mean)``."""
    v = tuning[(tuning["method"] == method) & (tuning["split"] == "validate")]
    mean = v.groupby("setting")["wga"].mean().dropna().sort_index()
    if mean.empty:
        raise RuntimeError(f"tuning of {method}: no validation worst-group accuracy (groups too small for "
                           f"min_group_n?)")
    best = mean.max()
    return int(mean.index[mean.to_numpy() == best].min()), float(best)


def setting_text(hp: dict) -> str:
    """``eta=0.1`` style text of a grid point ("" without hyperparameters)."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())


def objective_text(plan: objectives.Plan) -> str:
    """What an arm's plan changes, for the arms table."""
    if plan.dfr_c is not None:
        return "last layer of continued ERM refitted (DFR)"
    parts = [f"removes {int((~plan.kept).sum())}"] if (~plan.kept).any() else []
    if plan.repeats is not None:
        parts.append(f"upsamples {int((plan.repeats > 1).sum())} x{int(plan.repeats.max())}")
    if plan.weights is not None:
        parts.append(f"loss weights {plan.weights.min():.2f}-{plan.weights.max():.2f}")
    if plan.dro_groups is not None:
        parts.append(f"GroupDRO over {len(np.unique(plan.dro_groups))} cells")
    return "; ".join(parts) or "every image, plain loss"


def _context(f: dict, ps: dict, seed: int, cfg, dataset: str, draw: int = 0, hp: dict | None = None,
             n_removed: dict | None = None, d3m_kept=None, auto_kept=None) -> methods.SelectionContext:
    """What a select hook sees for one finding (``f``), seed (``ps``) and draw."""
    tr = f["tr"]
    return methods.SelectionContext(
        train_rows=tr[0], train_groups=f["train_groups"], seed=seed, draw=draw, removal_seed=cfg.removal_seed,
        d3m_kept=d3m_kept, auto_d3m_kept=auto_kept, n_removed={} if n_removed is None else n_removed,
        train_image_ids=f["train_ids"], planted_ids=f["gt_ids"], dataset=dataset, train_y=tr[1],
        anchor_train_logit=ps.get("anchor_train_logit"), anchor_threshold=ps["anchor_threshold"], hp=hp or {})


def _check_training_groups(arms, finding: str, groups: pd.Series) -> None:
    """Refuse the arms that need training group labels when some training image has none."""
    need = [m for m in arms if methods.get(m).needs_group_labels]
    missing = groups.isna() | groups.astype(str).str.strip().isin(["", "nan", "None"])
    if need and missing.any():
        raise ValueError(f"{finding}: {int(missing.sum())} of {len(groups)} training images have no protected group "
                         f"(cohort column 'group'), but {need} need the group of every training image. Drop them "
                         f"from `methods` or set group_labels: validation.")


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
    arms = methods.for_data(cfg.methods, dataset, cfg.group_labels)
    errs = methods.validate(arms, dataset, has_ground_truth=gt is not None, group_labels=cfg.group_labels)
    if errs:
        raise ValueError("; ".join(errs))
    arms = methods.run_order(arms)
    need_auto = "auto_d3m" in arms
    tuned = [m for m in arms if methods.get(m).grid]
    anchor_losses = any(methods.get(m).anchor_losses for m in arms)
    curve_methods = CURVE_METHODS if need_auto else ("d3m",)
    coh = cohort.set_index("row")
    ea, et = cfg.epochs_anchor, cfg.epochs_anchor + cfg.epochs_more

    preds, sels, align, losses, curve, weighting, arm_rows, auto_ct, planted_rows, chosen, tuning, chosen_hp = (
        [] for _ in range(12))
    per: dict = {}   # finding -> what the waves need
    g = grid.Grid(stage, "05 D3M", progress=progress)
    try:
        curve_models = _Models(stage, images)
        # -- scores per finding and seed; the removal curve's models (every seed) ---------------------
        for finding in findings:
            tr, va, te = (training.task_rows(cohort, finding, s) for s in ("train", "validate", "test"))
            n_train = len(tr[0])
            train_groups = coh.loc[tr[0], "group"].astype(str).to_numpy()
            _check_training_groups(arms, finding, coh.loc[tr[0], "group"])
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

                def view(kind, tdir=tdir, tr=tr, va=va, base_val=base_val, scorer=scorer):
                    """(tau, group losses) of D3M's groups ``kind``: race, or race x label."""
                    vgroups = d3m.d3m_groups(va[2], va[1], kind)
                    gl_ = d3m.group_losses(base_val["y"], base_val["logit"], vgroups)
                    if kind == "race":
                        tau_ = pd.read_parquet(tdir / "tau.parquet")
                    else:
                        blocks, G = scorer().score_factors("validate")
                        tau_ = d3m.group_tau(blocks, G, vgroups, tr[0])
                    if not np.array_equal(tau_.index.to_numpy(), tr[0]):
                        raise RuntimeError(f"TRAK scores in {tdir} do not cover {finding}'s training rows; "
                                           f"re-run 04_trak")
                    return tau_, gl_

                views = {kind: view(kind) for kind in dict.fromkeys([cfg.d3m_groups, *d3m.GROUPINGS])}
                tau, gl = views[cfg.d3m_groups]
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
                ps = per_seed[seed] = dict(score=score, auto=auto, tau=tau, gl=gl, views=views, tcfg=tcfg, tr=tr,
                                           va=va, te=te,
                                           anchor=bdir / f"epoch_{ea:02d}.pt",
                                           erm_checkpoint=bdir / f"epoch_{et:02d}.pt",
                                           steps=training.continuation_steps(tcfg, n_train),
                                           anchor_threshold=float(metrics.choose_threshold(
                                               fr["base"]["validate"]["y"], fr["base"]["validate"]["prob"],
                                               cfg.threshold_rule)))
                if anchor_losses:
                    ps["anchor_train_logit"] = training.predict(ps["anchor"], tcfg, images, tr[0])
                if "dfr" in arms:
                    ps["dfr_halves"] = objectives.dfr_halves(va[0], coh.loc[va[0], "subject_id"],
                                                             objectives.stream(cfg.removal_seed, seed, "dfr"))
                for m in curve_methods:   # k = 0: continued ERM
                    curve += _wga_rows(erm_pred, cfg.min_group_n, finding=finding, seed=seed, method=m, k=0,
                                       share=0.0)
                for k in grid_k:
                    scores = {"d3m": score, "auto_d3m": auto.scores if auto is not None else None}
                    for m in curve_methods:
                        kept = d3m.select(scores[m], "k_lowest", k).to_numpy()
                        name = curve_models.add(ps, finding, seed, f"curve_{m}_k{k}", kept, stream=CURVE_STREAM)
                        ps.setdefault("curve", []).append((m, k, name))
            f = per[finding] = dict(tr=tr, va=va, te=te, n_train=n_train, train_groups=train_groups,
                                    train_ids=train_ids, planted=planted, per_seed=per_seed, gt_ids=None if gt is None
                                    else set(gt.loc[gt["finding"] == finding, "dicom_id"].astype(str)))
            # -- every grid point of every tuned arm, every seed (SGD arms: in the curve's batch order) -------
            for seed, ps in per_seed.items():
                for m in tuned:
                    spec = methods.get(m)
                    settings = spec.settings(cfg.values)
                    plans = [objectives.as_plan(spec.select(_context(f, ps, seed, cfg, dataset, hp=hp)), n_train, m)
                             for hp in settings]
                    if spec.trainer == "dfr":   # one task fits every C; its test predictions are DFR's
                        curve_models.add_dfr(ps, finding, seed, objectives.Plan(
                            plans[0].kept, dfr_c=tuple(p.dfr_c[0] for p in plans)))
                        names = [f"dfr_C{i}" for i in range(len(plans))]
                    else:
                        names = [curve_models.add(ps, finding, seed, f"tune_{m}_{i}", plan, stream=CURVE_STREAM)
                                 for i, plan in enumerate(plans)]
                    ps.setdefault("tune", []).extend((m, i, setting_text(hp), name)
                                                     for i, (hp, name) in enumerate(zip(settings, names)))
        curve_out = curve_models.run(g)
        for finding, f in per.items():
            for seed, ps in f["per_seed"].items():
                for m, k, name in ps.get("curve", []):
                    p = _with_threshold(curve_out[(finding, seed, name)][0], m, finding, seed, cfg.threshold_rule)
                    curve += _wga_rows(p, cfg.min_group_n, finding=finding, seed=seed, method=m, k=k,
                                       share=k / f["n_train"])
        curve_df = pd.DataFrame(curve)
        for finding, f in per.items():
            for seed, ps in f["per_seed"].items():
                for m, i, text, name in ps.get("tune", []):
                    p = _with_threshold(curve_out[(finding, seed, name)][0], m, finding, seed, cfg.threshold_rule)
                    tuning += _wga_rows(p, cfg.min_group_n, finding=finding, seed=seed, method=m, setting=i,
                                        value=text)
        tuning_df = pd.DataFrame(tuning, columns=["finding", "seed", "method", "setting", "value", "split", "wga"])
        for finding, f in per.items():
            f["hp"], f["hp_index"] = {}, {}
            for m in tuned:
                i, vw = choose_setting(tuning_df[tuning_df["finding"] == finding], m)
                f["hp"][m], f["hp_index"][m] = methods.get(m).settings(cfg.values)[i], i
                chosen_hp.append(dict(finding=finding, method=m, setting=setting_text(f["hp"][m]), val_wga=vw,
                                      n_settings=len(methods.get(m).settings(cfg.values)), n_seeds=len(cfg.seeds)))
        # -- the k of D3M and Auto-D3M: mean over every seed, ties to the smaller k -------------------
        arm_models = _Models(stage, images)
        plan_list = []
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
            tr, n_train_f = f["tr"], f["n_train"]
            for seed, ps in f["per_seed"].items():
                d3m_kept = d3m.select(ps["score"], rule, ks["d3m"]).to_numpy()
                auto_kept = (d3m.select(ps["auto"].scores, rule, ks.get("auto_d3m")).to_numpy()
                             if ps["auto"] is not None else None)
                sels.append(pd.DataFrame({"finding": finding, "method": "erm", "seed": seed, "draw": 0, "row": tr[0],
                                          "kept": True}))
                for kind, (tau_k, gl_k) in ps["views"].items():   # both group choices, without retraining
                    weighting.append(d3m.weighting_table(tau_k, gl_k, int((~d3m_kept).sum()), d3m_kept,
                                                         f["planted"], BETAS).assign(finding=finding, seed=seed,
                                                                                     groups=kind))
                tau_c, gl_c = ps["views"]["race_x_label"]
                cells_kept = d3m.select(d3m.alignment_scores(tau_c, gl_c, cfg.d3m_weighting, cfg.d3m_beta),
                                        "k_lowest", int((~d3m_kept).sum())).to_numpy()
                n_removed: dict = {}
                for m in arms:
                    spec = methods.get(m)
                    for draw in range(methods.draws(m, cfg.random_draws)):
                        ctx = _context(f, ps, seed, cfg, dataset, draw=draw, hp=f["hp"].get(m, {}), n_removed=n_removed,
                                       d3m_kept=d3m_kept, auto_kept=auto_kept)
                        ctx.d3m_cells_kept = cells_kept
                        plan = objectives.as_plan(spec.select(ctx), n_train_f, m)
                        n_removed.setdefault(m, int((~plan.kept).sum()))
                        name = (f"dfr_C{f['hp_index'][m]}" if spec.trainer == "dfr" else
                                arm_models.add(ps, finding, seed, m if draw == 0 else f"{m}_draw{draw}", plan))
                        plan_list.append((finding, seed, m, draw, plan, name))
        arm_out = {**curve_out, **arm_models.run(g)}
    finally:
        g.close()

    for finding, seed, m, draw, plan, name in plan_list:
        f = per[finding]
        tr, n_train, planted = f["tr"], f["n_train"], f["planted"]
        kept = plan.kept
        frames, secs = arm_out[(finding, seed, name)]
        preds.append(_with_threshold(frames, m, finding, seed, cfg.threshold_rule).assign(draw=draw))
        sels.append(pd.DataFrame({"finding": finding, "method": m, "seed": seed, "draw": draw, "row": tr[0],
                                  "kept": kept}))
        arm_rows.append(dict(finding=finding, seed=seed, method=m, draw=draw, n_train=n_train,
                             n_kept=int(kept.sum()), n_removed=int((~kept).sum()),
                             steps=f["per_seed"][seed]["steps"], objective=objective_text(plan),
                             setting=setting_text(f["hp"].get(m, {})), model=name, seconds=round(secs, 1)))
        if planted is not None and plan.plain:   # removal arms: who was removed
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
        tuning=tuning_df, chosen_hp=pd.DataFrame(chosen_hp, columns=["finding", "method", "setting", "val_wga",
                                                                     "n_settings", "n_seeds"]),
        methods=arms, dataset=dataset, seconds=time.time() - t_start)
    for name in ("predictions", "selections", "alignment", "curve", "weighting", "arms", "auto_groups",
                 "group_losses", "chosen_k", "tuning", "chosen_hp"):
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
