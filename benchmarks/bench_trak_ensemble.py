"""TRAK ensemble size M against attribution quality, on a finished run's cohort and anchors (stages 01-03).

For M in ``--models`` (default 1 2 4 8 16) and two independent ensembles, A (``trak_seed`` 0, the anchor of
seed 0) and B (``trak_seed`` 1, the anchor of seed 1), each model trained with the anchor's recipe on its own
``--fraction`` of the finding's training images (:func:`d3m_lib.attribution.ensemble_subsets`; the first M
models of the largest ensemble), TRAK at each model's final anchor epoch, and D3M's alignment score A_i from
each ensemble's tau and its own anchor's validation group losses (the run's weighting). The reference row
``anchor`` is the default before ensembles: TRAK over the anchor's ``trak_checkpoints`` of one run.

Per row: LDS of ensemble A with its interval (``--lds-models`` subset models, ``--lds-targets`` validation
images; :func:`d3m_lib.attribution.lds`), Spearman of A_i between A and B and the overlap of their k lowest
(the removed sets; k = D3M's chosen k of the run, else 5% of the training images), AUROC of -A_i per planted
mechanism (mean of A and B), precision of the k lowest per mechanism (A) and seconds (training, featurizing).

    PYTHONPATH=. python benchmarks/bench_trak_ensemble.py --run runs/demo --out benchmarks/results/trak_ensemble.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from d3m_lib import attribution, d3m, grid, metrics, training
from d3m_lib.rundir import RunDir
from d3m_lib.stages import trak as trak_stage
from d3m_lib.synthetic import planted_ground_truth


def _scorer(cohort, images, tcfg, cfg, finding, save_dir, checkpoints, projector_seed):
    from d3m_lib import models

    return attribution.TrakScorer(
        lambda: models.build_model(tcfg.arch, num_outputs=1, width=tcfg.width), save_dir, images,
        training.task_rows(cohort, finding, "train")[0], cohort.set_index("row")[finding].dropna(), checkpoints,
        proj_dim=cfg.trak_proj_dim, lambda_reg=cfg.trak_lambda_reg, projector_seed=projector_seed,
        batch_size=cfg.trak_batch_size, transform=training.to_tensor, featurizer=cfg.trak_featurizer)


def _alignment(sc, run, cohort, cfg, finding, seed) -> tuple[np.ndarray, float]:
    va_rows, _, va_groups = training.task_rows(cohort, finding, "validate")
    t0 = time.time()
    sc.featurize()
    feat = time.time() - t0
    tau = sc.group_scores(va_rows, va_groups, exp_name="validate")
    pv = pd.read_parquet(run.model_dir("03_baseline", finding, seed) /
                         f"preds_validate_epoch{cfg.epochs_anchor:02d}.parquet").set_index("row").loc[va_rows]
    gl = d3m.group_losses(pv["y"], pv["logit"], d3m.d3m_groups(va_groups, pv["y"].to_numpy(), cfg.d3m_groups))
    return d3m.alignment_scores(tau, gl, cfg.d3m_weighting, cfg.d3m_beta).to_numpy(), feat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run folder with stages 01-03 finished (seeds 0 and 1)")
    ap.add_argument("--finding", help="default: the run's first finding")
    ap.add_argument("--models", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--lds-models", type=int, default=20)
    ap.add_argument("--lds-targets", type=int, default=100)
    ap.add_argument("--workdir", help="where models and features go (default: a new temporary folder)")
    ap.add_argument("--out", default="benchmarks/results/trak_ensemble.json")
    ap.add_argument("--book-csv", help="also write the book's table here (with the record beside it as .json), "
                                       "e.g. book/attribution/trak_ensemble.csv (two tables: _stability, _harm)")
    a = ap.parse_args(argv)

    run = RunDir(a.run)
    cfg = run.config()
    cohort = run.cohort()
    images = run.images(cohort["row"])
    finding = a.finding or run.findings()[0]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_trak_"))
    dev = str(training.resolve_device(cfg.device))
    tr_rows, tr_y, _ = training.task_rows(cohort, finding, "train")
    n = len(tr_rows)
    chosen = run.stage_dir("05_d3m") / "chosen_k.parquet"
    k = (int(pd.read_parquet(chosen).query("finding == @finding and method == 'd3m'")["k"].iloc[0])
         if chosen.exists() else int(round(0.05 * n)))
    gt = planted_ground_truth(run, cfg.synthetic_ground_truth)
    flags = trak_stage.planted_flags(cohort, tr_rows, gt, finding) if gt is not None else None
    kinds = [c for c in (flags.columns if flags is not None else []) if c != "row"]
    last = [int(cfg.epochs_anchor)]
    settings = grid.Settings.from_config(cfg)
    print(f"{finding}: {n} training images, k = {k}; models {a.models}; work in {work}", flush=True)

    # -- subset models of both ensembles and the LDS models, one grid wave ------------------------
    M = max(a.models)
    ens = {"A": (0, 0), "B": (1, 1)}    # (trak_seed, anchor seed)
    tasks, dirs = [], {}
    for e, (ts, seed) in ens.items():
        for m, mask in enumerate(attribution.ensemble_subsets(n, M, a.fraction, ts, seed)):
            tcfg = training.TrainConfig.from_params(cfg.values, seed=attribution.ensemble_seed(ts, seed, m), device=dev)
            out = work / e / f"model{m:02d}"
            dirs.setdefault(e, []).append(out)
            tasks.append(grid.Task(f"{e}/{m}", "d3m_lib.stages.trak:ensemble_model",
                                   dict(cfg=tcfg, images=images, rows=tr_rows[mask], y=tr_y[mask], epochs=last,
                                        out_dir=out)))
    targets, y_t = trak_stage.lds_targets(cfg, cohort, finding, a.lds_targets)
    lds_masks = attribution.lds_subsets(n, a.lds_models, a.fraction, cfg.trak_seed)
    tcfg0 = training.TrainConfig.from_params(cfg.values, seed=0, device=dev)
    for j, mask in enumerate(lds_masks):
        tasks.append(grid.Task(f"lds/{j}", "d3m_lib.stages.trak:lds_subset_model",
                               dict(cfg=tcfg0, images=images, rows=tr_rows[mask], y=tr_y[mask], targets=targets,
                                    out_dir=work / "lds" / f"model{j:02d}")))
    t0 = time.time()
    res = grid.run_tasks(tasks, desc="subset models", settings=settings, progress=True)
    train_s = {t.key: r.seconds for t, r in zip(tasks, res)}
    print(f"trained {len(tasks)} models in {time.time() - t0:.0f} s", flush=True)
    margins = iter([(2 * y_t - 1) * np.load(work / "lds" / f"model{j:02d}" / "margins.npy")
                    for j in range(a.lds_models)])

    rows = []
    variants = [("anchor", None)] + [(f"M={m}", m) for m in a.models]
    lds_m = [next(margins) for _ in range(a.lds_models)]
    for name, m in variants:
        A, feat, scores_lds = {}, {}, None
        for e, (ts, seed) in ens.items():
            tcfg = training.TrainConfig.from_params(cfg.values, seed=seed, device=dev)
            anchor_dir = run.model_dir("03_baseline", finding, seed)
            ck = ({ep: anchor_dir / f"epoch_{ep:02d}.pt" for ep in cfg.trak_checkpoints} if m is None
                  else attribution.ensemble_checkpoints(dirs[e][:m], last))
            sc = _scorer(cohort, images, tcfg, cfg, finding, work / "trak" / f"{name}_{e}", ck, projector_seed=ts)
            A[e], feat[e] = _alignment(sc, run, cohort, cfg, finding, seed)
            if e == "A":
                scores_lds = sc.scores(targets, exp_name="lds")
        it = iter(lds_m)
        lds = attribution.lds(scores_lds, lambda mask: next(it), n_models=a.lds_models, subset_fraction=a.fraction,
                              seed=cfg.trak_seed, n_boot=1000, ci_level=0.95)
        lowA, lowB = np.argsort(A["A"], kind="stable")[:k], np.argsort(A["B"], kind="stable")[:k]
        rec = dict(variant=name, models=m or 1, lds=lds["lds"], lds_lo=lds["lo"], lds_hi=lds["hi"],
                   spearman_ab=float(spearmanr(A["A"], A["B"]).statistic),
                   removed_overlap=len(np.intersect1d(lowA, lowB)) / k,
                   train_s=round(sum(train_s[f"{e}/{j}"] for e in ens for j in range(m or 0)) / 2, 1),
                   featurize_s=round((feat["A"] + feat["B"]) / 2, 1))
        for kind in kinds:
            f = flags[kind].to_numpy()
            if f.any():
                rec[f"auroc_{kind}"] = float(np.mean([metrics.metric_value("auroc", f.astype(int), prob=-A[e])
                                                      for e in ens]))
                rec[f"precision_{kind}"] = float(f[lowA].mean())
                rec[f"base_rate_{kind}"] = float(f.mean())
        rows.append(rec)
        print(" ".join(f"{kk}={v:.3f}" if isinstance(v, float) else f"{kk}={v}" for kk, v in rec.items()), flush=True)

    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    out = dict(benchmark="trak_ensemble", date=str(date.today()), machine=platform.platform(),
               processor=platform.processor() or platform.machine(), python=sys.version.split()[0],
               run=str(Path(a.run).resolve()), finding=finding, n_train=n, k=k, fraction=a.fraction,
               lds_models=a.lds_models, lds_targets=len(targets), checkpoints_anchor=list(cfg.trak_checkpoints),
               grid_workers=settings.workers, threads_per_worker=settings.threads, rows=rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    if a.book_csv:   # the attribution-quality page's table
        Path(a.book_csv).parent.mkdir(parents=True, exist_ok=True)
        for part in ("stability", "harm"):
            attribution.ensemble_quality_table(out, part).to_csv(
                Path(a.book_csv).with_name(f"{Path(a.book_csv).stem}_{part}.csv"), index=False)
        Path(a.book_csv).with_suffix(".json").write_text(json.dumps(out, indent=1))
        print(f"wrote {a.book_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
