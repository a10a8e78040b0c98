"""Stage 04: TRAK scores of every chosen finding and seed, and evidence that they mean something.

Per finding and baseline seed, :func:`d3m_lib.attribution.baseline_scorer` featurizes
the finding's training images under the **anchor** checkpoints ``trak_checkpoints``
(epochs <= ``epochs_anchor``, checked by the configuration: TRAK attributes the model
D3M edits, never continued-ERM epochs), with ``trak_featurizer`` and optionally on Ray
workers, then scores the validation groups' means ``tau(g)_i`` (``tau.parquet`` in
``04_trak/<finding>/seed<s>/``; index: cohort row of the training image, one column
per group).

Attribution quality (it replaces a self-influence check):

* **planted harm** (synthetic cohorts only): AUROC of ``-score`` against the planted
  harmful training images of the finding (``planted_ground_truth.csv.gz``), for each
  group's ``tau(g)``, their equal-weight mean, and ``tau`` of the group with the highest
  anchor validation loss among groups with at least ``min_group_n`` validation images (the
  group D3M weights most), per planted kind, with the interval of the mean over seeds (two-level
  bootstrap of seeds and patients)
  (:func:`d3m_lib.attribution.harm_ranking_auroc`). Real data have no ground truth:
  the table is None and ``harm_note`` says so.
* **linear datamodeling score** (``trak_lds: true``, ``params/lds.yaml``): for the first
  finding and seed, ``trak_lds_models`` anchor models trained on random
  ``trak_lds_subset_fraction`` subsets (same seed and schedule as the anchor, so they
  differ only in data), margins of ``trak_lds_targets`` validation images, Spearman
  correlation with the summed scores, bootstrap interval over targets
  (:func:`d3m_lib.attribution.lds`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from .. import attribution, d3m, grid, synthetic, training
from ..rundir import Stage

EQUAL = "mean over groups"
HIGHEST_LOSS = "highest-loss group"


@dataclass
class Result:
    """What notebook 04 shows."""

    checkpoints: list
    summary: pd.DataFrame          # finding, seed, n_train, n_validate, groups, featurize_s, total_s
    tau_first: pd.DataFrame        # tau of the first finding and seed (train row x group)
    tau_corr: pd.DataFrame         # correlation of the groups' tau columns (first finding and seed)
    examples: pd.DataFrame         # finding, seed, target, target_y, target_group, direction, rank, row, y, score
    harm_auroc: pd.DataFrame | None  # finding, score, kind, value, lo, hi, n, n_planted, seed_values
    harm_note: str = ""
    lds: dict | None = None
    lds_note: str = ""
    seconds: float = 0.0
    first: tuple = field(default_factory=tuple)  # (finding, seed) of tau_first and the examples


def planted_flags(cohort: pd.DataFrame, train_rows, ground_truth: pd.DataFrame, finding: str) -> pd.DataFrame:
    """Per training row of ``finding``: planted (any kind) and one column per planted kind."""
    ids = cohort.set_index("row").loc[np.asarray(train_rows), "image_id"].astype(str).to_numpy()
    gt = ground_truth[ground_truth["finding"].astype(str) == finding]
    out = pd.DataFrame({"row": np.asarray(train_rows)})
    for kind in sorted(gt["kind"].astype(str).unique()):
        out[kind] = np.isin(ids, gt.loc[gt["kind"] == kind, "dicom_id"].astype(str).to_numpy())
    kinds = [c for c in out.columns if c != "row"]
    out["all"] = out[kinds].any(axis=1) if kinds else False
    return out


def harm_table(taus: dict, losses: dict, flags: pd.DataFrame, clusters, *, n_boot: int, ci_level: float,
               random_state) -> pd.DataFrame:
    """AUROC of each score against each planted kind: mean over seeds, with the interval of that mean.

    ``taus``: seed -> tau (train row x group, rows in ``flags`` order); ``losses``:
    seed -> anchor validation loss per group (the highest picks the "highest-loss group";
    groups missing from it are not candidates: the stage passes those with at least
    ``min_group_n`` validation images).
    Kinds with no planted image (or all planted) among these rows are left out.
    """
    seeds = sorted(taus)
    groups = list(taus[seeds[0]].columns)
    scores = {f"tau({g})": [taus[s][g].to_numpy() for s in seeds] for g in groups}
    scores[EQUAL] = [taus[s].mean(axis=1).to_numpy() for s in seeds]
    scores[HIGHEST_LOSS] = [taus[s][losses[s].reindex(groups).idxmax()].to_numpy() for s in seeds]
    recs = []
    for kind in ["all", *[c for c in flags.columns if c not in ("row", "all")]]:
        planted = flags[kind].to_numpy()
        if not 0 < planted.sum() < len(planted):
            continue
        for name, per_seed in scores.items():
            r = attribution.harm_ranking_auroc(per_seed, planted, clusters, n_boot=n_boot, ci_level=ci_level,
                                               random_state=random_state)
            recs.append(dict(score=name, kind=kind, **r))
    return pd.DataFrame(recs)


def ground_truth(run) -> pd.DataFrame | None:
    """The run's planted ground truth (None on real data).

    Notebook 01 records a synthetic cohort as ``summary.data.synthetic`` (and
    ``summary.synthetic_dir``), while :func:`d3m_lib.synthetic.planted_ground_truth` looks
    for ``summary.synthetic``; this reads either.
    """
    summary = (run.manifest("01_cohort") or {}).get("summary") or {}
    if summary.get("synthetic") is None and (summary.get("data") or {}).get("synthetic"):
        return synthetic.planted_ground_truth(run, run.path / summary["synthetic_dir"]
                                              / synthetic.GROUND_TRUTH_FILE)
    return synthetic.planted_ground_truth(run)


def _anchor_losses(run, finding: str, seed: int, epoch: int, min_group_n: int = 1) -> pd.Series:
    """The anchor's validation loss per group with at least ``min_group_n`` images (all if none has)."""
    pv = pd.read_parquet(run.model_dir("03_baseline", finding, seed) / f"preds_validate_epoch{epoch:02d}.parquet")
    gl = d3m.group_losses(pv["y"].to_numpy(), pv["logit"].to_numpy(), pv["group"].to_numpy())
    n = pv.groupby("group").size().reindex(gl.index)
    return gl[n >= min_group_n] if (n >= min_group_n).any() else gl


def examples_table(scorer, cohort: pd.DataFrame, finding: str, seed: int, n_targets: int = 3, k: int = 5,
                   random_state: int = 0) -> pd.DataFrame:
    """The ``k`` most helpful (+) and most harmful (-) training images of a few validation images."""
    val_rows = training.task_rows(cohort, finding, "validate")[0]
    pick = np.random.default_rng(random_state).choice(len(val_rows), size=min(n_targets, len(val_rows)),
                                                      replace=False)
    targets = val_rows[np.sort(pick)]
    s = scorer.scores(targets, exp_name="examples")
    by_row = cohort.set_index("row")
    pos = pd.Series(np.arange(len(scorer.train_rows)), index=scorer.train_rows)
    recs = []
    for direction, most_negative in (("+", False), ("-", True)):
        top = attribution.top_train_rows(s, scorer.train_rows, k=k, most_negative=most_negative)
        for j, t in enumerate(targets):
            for rank, r in enumerate(top[j], start=1):
                recs.append(dict(finding=finding, seed=seed, target=int(t), target_y=int(by_row.loc[t, finding]),
                                 target_group=str(by_row.loc[t, "group"]), direction=direction, rank=rank,
                                 row=int(r), y=int(by_row.loc[r, finding]), group=str(by_row.loc[r, "group"]),
                                 score=float(s[pos.loc[r], j])))
    return pd.DataFrame(recs).sort_values(["target", "direction", "rank"], kind="mergesort",
                                          ignore_index=True)


def lds_subset_model(cfg: training.TrainConfig, images, rows, y, targets, out_dir) -> None:
    """One LDS subset model (a grid task): the anchor's epochs on ``rows``, its logits on ``targets``.

    Writes ``epoch_<A>.pt`` and ``margins.npy`` (the logits; the stage signs them by label).
    """
    out = Path(out_dir)
    training.train(cfg, images, rows, y, (0, int(cfg.epochs_anchor)), out, progress=False)
    np.save(out / "margins.npy", training.predict(out / f"epoch_{int(cfg.epochs_anchor):02d}.pt", cfg, images,
                                                  targets))


def ensemble_model(cfg: training.TrainConfig, images, rows, y, epochs, out_dir) -> None:
    """One subset model of a TRAK ensemble (a grid task): the anchor's recipe on ``rows``; keeps the
    ``epochs`` checkpoints TRAK featurizes."""
    training.train(cfg, images, rows, y, (0, int(cfg.epochs_anchor)), out_dir, progress=False)
    training.keep_checkpoints(out_dir, epochs)


def train_ensembles(stage: Stage, cohort: pd.DataFrame, images, jobs, progress: bool = False) -> dict:
    """Every (finding, seed)'s ``trak_models`` subset models, as one wave of the training grid.

    Model ``m`` of a seed trains on :func:`attribution.ensemble_subsets` ``[m]`` with seed
    :func:`attribution.ensemble_seed`, in ``04_trak/<finding>/seed<s>/ensemble/model<m>/``;
    recorded with its subset's hash and seed, so an interrupted stage resumes.
    Returns ``{(finding, seed): [model folders]}``.
    """
    cfg = stage.cfg
    dev = str(training.resolve_device(cfg.device))
    tasks, dirs, owner = [], {}, []
    for finding, seed in jobs:
        tr_rows, tr_y, _ = training.task_rows(cohort, finding, "train")
        masks = attribution.ensemble_subsets(len(tr_rows), cfg.trak_models, cfg.trak_subset_fraction,
                                             cfg.trak_seed, seed)
        for m, mask in enumerate(masks):
            ms = attribution.ensemble_seed(cfg.trak_seed, seed, m)
            tcfg = training.TrainConfig.from_params(cfg.values, seed=ms, device=dev)
            out = stage.run.model_dir("04_trak", finding, seed) / "ensemble" / f"model{m:02d}"
            tasks.append(grid.Task(
                f"ensemble/{finding}/seed{seed}/model{m:02d}", "d3m_lib.stages.trak:ensemble_model",
                dict(cfg=tcfg, images=images, rows=tr_rows[mask], y=tr_y[mask], epochs=list(cfg.trak_checkpoints),
                     out_dir=out),
                signature={"subset": hashlib.sha256(np.packbits(mask).tobytes()).hexdigest(), "seed": ms,
                           "epochs": list(cfg.trak_checkpoints)},
                files=tuple(out / f"epoch_{int(e):02d}.pt" for e in cfg.trak_checkpoints)))
            dirs.setdefault((finding, seed), []).append(out)
            owner.append((finding, seed))
    with grid.Grid(stage, "04 TRAK ensemble models", progress=progress) as g:
        res = g.run(tasks)
    seconds = {}
    for key, r in zip(owner, res):
        seconds[key] = seconds.get(key, 0.0) + r.seconds
    return {"dirs": dirs, "seconds": seconds}


def lds_targets(cfg, cohort: pd.DataFrame, finding: str, n_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """LDS's targets: ``n_targets`` validation images of ``finding`` (all if fewer), drawn with ``trak_seed + 1``;
    their rows and labels."""
    val_rows, val_y, _ = training.task_rows(cohort, finding, "validate")
    pick = np.random.default_rng(cfg.trak_seed + 1).choice(len(val_rows), size=min(n_targets, len(val_rows)),
                                                           replace=False)
    return val_rows[pick], val_y[pick]


def _lds_record(stage: Stage, res: dict, finding: str, seed: int, targets, subset_fraction: float, **extra) -> dict:
    """:func:`attribution.lds`'s dict made JSON-ready with what it measured, written to ``lds.json``."""
    res = {**res, "per_target": [float(v) for v in res["per_target"]], "finding": finding, "seed": int(seed),
           "targets": [int(t) for t in targets], "subset_fraction": float(subset_fraction),
           "ci_level": float(stage.cfg.ci_level), **extra}
    stage.path("lds.json").write_text(json.dumps(res, indent=2))
    return res


def linear_datamodeling(stage: Stage, scorer, cohort: pd.DataFrame, images, finding: str, seed: int, *,
                        n_models: int, n_targets: int, subset_fraction: float, progress: bool = False) -> dict:
    """LDS of ``scorer`` (one finding and seed) from ``n_models`` anchor models on random subsets.

    Subset models train epochs 1..``epochs_anchor`` with the anchor's configuration and
    seed, on a random ``subset_fraction`` of the finding's training images; each is a task
    of the training grid (:func:`lds_subset_model`), kept in ``04_trak/lds/<finding>/model<k>/``
    and recorded with its subset's hash in the stage's step record, so an interrupted run
    resumes. Targets: ``n_targets`` validation images (all if fewer), drawn with
    ``trak_seed + 1``. Returns :func:`d3m_lib.attribution.lds`'s dict (``per_target``
    as a list), with the finding, seed and targets; also written to ``lds.json``.
    """
    cfg = stage.cfg
    targets, y_t = lds_targets(cfg, cohort, finding, n_targets)
    s = scorer.scores(targets, exp_name="lds")
    tr_rows, tr_y, _ = training.task_rows(cohort, finding, "train")
    if not np.array_equal(tr_rows, scorer.train_rows):
        raise RuntimeError("the scorer's training rows differ from the finding's training split")
    tcfg = training.TrainConfig.from_params(cfg.values, seed=seed, device=str(training.resolve_device(cfg.device)))
    masks = attribution.lds_subsets(len(tr_rows), n_models, subset_fraction, cfg.trak_seed)
    tasks = []
    for k, mask in enumerate(masks, start=1):   # one grid task per subset model
        out = stage.path("lds", training.finding_dirname(finding), f"model{k:02d}", "mask.npy").parent
        tasks.append(grid.Task(f"lds/{finding}/model{k:02d}", "d3m_lib.stages.trak:lds_subset_model",
                               dict(cfg=tcfg, images=images, rows=tr_rows[mask], y=tr_y[mask], targets=targets,
                                    out_dir=out),
                               signature=hashlib.sha256(np.packbits(mask).tobytes()).hexdigest(),
                               files=(out / "margins.npy",)))
    with grid.Grid(stage, f"04 LDS subset models ({finding})", progress=progress) as g:
        g.run(tasks)
    actual = iter([(2 * y_t - 1) * np.load(t.files[0]) for t in tasks])

    def margins(mask: np.ndarray) -> np.ndarray:   # lds asks in the order of lds_subsets
        return next(actual)

    res = attribution.lds(s, margins, n_models=n_models, subset_fraction=subset_fraction, seed=cfg.trak_seed,
                          n_boot=cfg.n_boot_descriptive, ci_level=cfg.ci_level)
    return _lds_record(stage, res, finding, seed, targets, subset_fraction)


def heldout_lds(stage: Stage, scorer, cohort: pd.DataFrame, images, finding: str, seed: int, ensembles: dict
                ) -> dict:
    """LDS of one seed's ensemble scores, measured on the *other* seeds' ensemble models of the finding.

    Each of those models was trained with the anchor's recipe on its own random subset (:func:`train_ensembles`),
    independently of this seed's scores, so they serve as LDS subset models at no training cost:
    ``trak_models x (seeds - 1)`` of them, margins on ``trak_lds_targets`` validation images (drawn with
    ``trak_seed + 1``, as :func:`linear_datamodeling`). Written to ``lds.json``.
    """
    cfg = stage.cfg
    targets, y_t = lds_targets(cfg, cohort, finding, cfg.trak_lds_targets)
    n = len(scorer.train_rows)
    last = int(max(cfg.trak_checkpoints))
    masks, actual = [], []
    dev = str(training.resolve_device(cfg.device))
    tcfg = training.TrainConfig.from_params(cfg.values, seed=seed, device=dev)
    for s in cfg.seeds:
        if s == seed or (finding, s) not in ensembles:
            continue
        sub = attribution.ensemble_subsets(n, cfg.trak_models, cfg.trak_subset_fraction, cfg.trak_seed, s)
        for m, d in enumerate(ensembles[(finding, s)]):
            masks.append(sub[m])
            actual.append((2 * y_t - 1) * training.predict(d / f"epoch_{last:02d}.pt", tcfg, images, targets))
    res = attribution.lds_from_models(scorer.scores(targets, exp_name="lds"), np.array(masks), np.array(actual),
                                      n_boot=cfg.n_boot_descriptive, ci_level=cfg.ci_level, seed=cfg.trak_seed)
    return _lds_record(stage, res, finding, seed, targets, cfg.trak_subset_fraction,
                       models_from="other seeds' ensemble models")


def run(stage: Stage, progress: bool = False) -> Result:
    """Featurize and score every (finding, seed), check the attribution, write, finish the stage."""
    from tqdm.auto import tqdm

    t_start = time.time()
    cfg, run_ = stage.cfg, stage.run
    cohort = run_.cohort()
    images = run_.images(cohort["row"])
    findings = run_.findings()
    dev = str(training.resolve_device(cfg.device))
    gt = ground_truth(run_)
    ea = int(cfg.epochs_anchor)

    records, scorers, taus, losses = [], {}, {}, {}
    jobs = [(f, s) for f in findings for s in cfg.seeds]
    ens = (train_ensembles(stage, cohort, images, jobs, progress) if cfg.trak_models
           else {"dirs": {}, "seconds": {}})
    for finding, seed in tqdm(jobs, desc="TRAK", disable=not progress):
        tcfg = training.TrainConfig.from_params(cfg.values, seed=seed, device=dev)
        t0 = time.time()
        sc = attribution.baseline_scorer(run_.path, finding, seed, cohort, images, tcfg, cfg.trak_checkpoints,
                                         proj_dim=cfg.trak_proj_dim, lambda_reg=cfg.trak_lambda_reg,
                                         batch_size=cfg.trak_batch_size, projector_seed=cfg.trak_seed,
                                         device=dev, featurizer=cfg.trak_featurizer,
                                         ensemble=ens["dirs"].get((finding, seed)))
        if cfg.trak_ray_workers:  # the same features, computed in shards on Ray workers
            from ..ray_featurize import featurize_on_ray

            featurize_on_ray(sc, cfg.trak_ray_workers, address=cfg.ray_address,
                             open_images=partial(run_.images, cohort["row"]))
        else:
            sc.featurize()
        t_feat = time.time() - t0
        val_rows, _, val_groups = training.task_rows(cohort, finding, "validate")
        tau = sc.group_scores(val_rows, val_groups, exp_name="validate")
        tau.to_parquet(sc.save_dir / "tau.parquet")
        scorers[(finding, seed)], taus[(finding, seed)] = sc, tau
        losses[(finding, seed)] = _anchor_losses(run_, finding, seed, ea, cfg.min_group_n)
        records.append(dict(finding=finding, seed=seed, n_train=len(sc.train_rows), n_validate=len(val_rows),
                            groups=tau.shape[1], models=max(int(cfg.trak_models), 1),
                            model_ids=len(sc.checkpoints),
                            ensemble_train_s=round(ens["seconds"].get((finding, seed), 0.0), 1),
                            featurize_s=round(t_feat, 1), total_s=round(time.time() - t0, 1)))
    summary = pd.DataFrame(records)

    first = (findings[0], cfg.seeds[0])
    tau_first = taus[first]
    examples = examples_table(scorers[first], cohort, *first, random_state=cfg.trak_seed)

    if gt is None:
        harm, harm_note = None, ("Real data: there is no planted ground truth, so how well TRAK ranks harmful "
                                 "images cannot be measured here; see the synthetic demo run.")
    else:
        parts = []
        clusters_of = cohort.set_index("row")["subject_id"] if "subject_id" in cohort.columns else None
        for finding in findings:
            rows = scorers[(finding, cfg.seeds[0])].train_rows
            flags = planted_flags(cohort, rows, gt, finding)
            clusters = None if clusters_of is None else clusters_of.loc[rows].to_numpy()
            t = harm_table({s: taus[(finding, s)] for s in cfg.seeds}, {s: losses[(finding, s)] for s in cfg.seeds},
                           flags, clusters, n_boot=cfg.n_boot_descriptive, ci_level=cfg.ci_level,
                           random_state=cfg.trak_seed)
            parts.append(t.assign(finding=finding))
        harm = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        harm = harm[["finding", *[c for c in harm.columns if c != "finding"]]] if len(harm) else None
        harm_note = ("" if harm is not None else
                     "The synthetic cohort has no planted harmful training image for these findings.")

    lds = None
    lds_note = ("not computed (trak_lds is false); python -m d3m_lib run params/lds.yaml --book "
                "computes it")   # no markdown: the book quotes it as plain text
    if cfg.trak_lds:
        lds = linear_datamodeling(stage, scorers[first], cohort, images, *first, n_models=cfg.trak_lds_models,
                                  n_targets=cfg.trak_lds_targets, subset_fraction=cfg.trak_lds_subset_fraction,
                                  progress=progress)
        lds_note = ""
    elif cfg.trak_models and cfg.trak_models * (len(cfg.seeds) - 1) >= 3:   # free: the other seeds' models
        lds = heldout_lds(stage, scorers[first], cohort, images, *first, ens["dirs"])
        lds_note = ""

    stage.save_table(summary, "summary.csv")
    examples.to_csv(stage.path("examples.csv"), index=False)
    if harm is not None:
        harm.drop(columns="seed_values").to_csv(stage.path("harm_auroc.csv"), index=False)
    seconds = time.time() - t_start
    stage.finish({"findings": findings, "seeds": list(cfg.seeds), "checkpoints": list(cfg.trak_checkpoints),
                  "seconds": seconds,
                  "harm_auroc": None if harm is None else {
                      f: float(d.loc[(d["score"] == EQUAL) & (d["kind"] == "all"), "value"].iloc[0])
                      for f, d in harm.groupby("finding") if ((d["score"] == EQUAL) & (d["kind"] == "all")).any()},
                  "lds": None if lds is None else {k: lds[k] for k in ("lds", "lo", "hi", "n_models", "n_targets")}})
    return Result(list(cfg.trak_checkpoints), summary, tau_first, tau_first.corr(), examples, harm, harm_note,
                  lds, lds_note, seconds, first)
