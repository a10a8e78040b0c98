"""Stage 05 of the demo on the training grid: 1 worker at 2 threads, 1 worker at 1 thread, 2 workers at 1 thread.

Needs a run folder whose stages 01-04 are finished: ``--run`` (stage 05 is recomputed in
it for each configuration: its folder is deleted first), or none, and then the demo's
stages 01-04 are computed into a new folder (``python -m d3m_lib run <params> --to 04``;
``--from-run`` copies them from another run instead). Each configuration runs stage 05
in this process (:func:`d3m_lib.stages.d3m.run`, the call notebook 05 makes) with
``grid_workers`` and ``grid_threads_per_worker`` overridden; the driver's own work
(scores, Auto-D3M, reading predictions) keeps torch's default threads in every
configuration. Prints seconds and the ratio to the first configuration, checks that the
two 1-thread configurations wrote byte-identical predictions, and writes JSON.
``--slice N`` times only N of stage 05's trainings (random 10% removals of the first
finding, through the grid) under each configuration: the same comparison in minutes.

    PYTHONPATH=. python benchmarks/bench_grid.py --out benchmarks/results/grid.json
    PYTHONPATH=. python benchmarks/bench_grid.py --run runs/demo      # reuse a demo run's stages 01-04
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ((1, 2), (2, 1), (1, 1))   # (grid_workers, grid_threads_per_worker); the first is the reference


def prepare(params: str, run_dir: Path, from_run: Path | None) -> None:
    """Stages 01-04 of ``params`` in ``run_dir`` (copied from ``from_run`` when given)."""
    if from_run is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "01_cohort", "02_scan", "03_baseline", "04_trak"):
            src = from_run / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, run_dir / name)
        return
    proc = subprocess.run([sys.executable, "-m", "d3m_lib", "run", params, "--run-dir", str(run_dir), "--to", "04"])
    if proc.returncode != 0:
        raise SystemExit(f"stages 01-04 failed (exit {proc.returncode}); see the output above")


def stage05(run_dir: Path, workers: int, threads: int) -> dict:
    """Stage 05 from scratch with this grid; seconds, tasks and the predictions' hash."""
    from d3m_lib.rundir import open_stage
    from d3m_lib.stages import d3m

    shutil.rmtree(run_dir / "05_d3m", ignore_errors=True)
    stage = open_stage("05_d3m", run_dir, overrides={"grid_workers": workers, "grid_threads_per_worker": threads})
    t0 = time.perf_counter()
    res = d3m.run(stage)
    seconds = time.perf_counter() - t0
    m = json.loads((run_dir / "05_d3m" / "manifest.json").read_text())
    digest = hashlib.sha256((run_dir / "05_d3m" / "predictions.parquet").read_bytes()).hexdigest()
    return {"workers": workers, "threads": threads, "seconds": round(seconds, 1),
            "tasks": m["summary"].get("tasks"), "retrain_seconds": round(float(res.arms["seconds"].sum()), 1),
            "predictions_sha256": digest}


CITED_IMG_S = {"bf16": 3992.0, "fp32": 1862.0}   # ResNet-50, 224 px, batch 256, one H100 (book/performance.md)


def mimic_budget(params: str = "params/mimic.yaml", n_train: int = 240_000, findings: int | None = None,
                 gpus=(1, 8, 32), img_s: dict | None = None) -> list[dict]:
    """Grid tasks per stage of ``params`` and their GPU-hours and wall hours on 1, 8, 32 GPUs, on paper.

    A task's cost is counted in passes over ``n_train`` images ("epochs"): the scan model
    ``scan_epochs``; per finding and seed the anchor ``epochs_anchor`` then continued ERM
    ``epochs_more``; every retrained model of stage 05 ``epochs_more`` (the equal step budget);
    an LDS subset model ``epochs_anchor x trak_lds_subset_fraction``. TRAK featurizing (not a
    grid task; sharded by ``trak_ray_workers``) is counted as one pass per checkpoint, at
    training speed. Evaluation passes and data loading are left out. Wall time: the grid
    runs ``ceil(tasks / GPUs)`` rounds of each wave (stage 03: anchors, then continuations;
    stage 05: the curve, then the arms); featurizing shards perfectly.
    """
    from d3m_lib import config, methods

    cfg = config.resolve(config.read_params_file(params) | {"mimic_cxr_dir": None, "mimic_iv_dir": None,
                                                            "synthetic": True, "device": "cpu"})
    img_s = img_s or CITED_IMG_S
    f = findings or (len(cfg.findings) if cfg.findings else cfg.scan_top_k)
    s = len(cfg.seeds)
    arms = methods.for_data(cfg.methods, "mimic")
    per_seed = sum(methods.draws(m, cfg.random_draws) for m in arms)
    curve = 2 if "auto_d3m" in arms else 1
    ea, em = cfg.epochs_anchor, cfg.epochs_more
    # (stage, tasks, waves: [(tasks, epochs per task)])
    plan = [("02 scan model", [(1, cfg.scan_epochs)]),
            ("03 anchor + continued ERM", [(f * s, ea), (f * s, em)]),
            ("04 TRAK featurizing (not grid tasks)", [("shard", len(cfg.trak_checkpoints) * f * s)]),
            ("05 removal curve", [(curve * len(cfg.d3m_k_grid) * f * s, em)]),
            ("05 arms, fresh at the chosen k", [(per_seed * f * s, em)])]
    if cfg.trak_lds:
        plan.insert(3, ("04 LDS subset models", [(cfg.trak_lds_models, ea * cfg.trak_lds_subset_fraction)]))
    rows = []
    for stage, waves in plan:
        epochs = sum(n if t == "shard" else t * n for t, n in waves)
        tasks = sum(0 if t == "shard" else t for t, _ in waves)
        row = {"stage": stage, "tasks": tasks, "epochs": epochs}
        for prec, rate in img_s.items():
            epoch_s = n_train / rate
            row[f"gpu_h_{prec}"] = epochs * epoch_s / 3600
            for g in gpus:
                wall = sum(n * epoch_s / g if t == "shard" else -(-t // g) * n * epoch_s for t, n in waves)
                row[f"wall_h_{prec}_{g}gpu"] = wall / 3600
        rows.append(row)
    total = {"stage": "total", **{k: sum(r[k] for r in rows) for k in rows[0] if k != "stage"}}
    return rows + [total]


def retrain_slice(run_dir: Path, n_tasks: int, workers: int, threads: int) -> dict:
    """``n_tasks`` of stage 05's trainings (random kept masks at 10% removal, first finding, seeds in
    turn, continued ERM's step budget) through the grid with this configuration; seconds."""
    import numpy as np

    from d3m_lib import grid, training
    from d3m_lib.rundir import RunDir

    run = RunDir(run_dir)
    cfg = run.config()
    cohort = run.cohort()
    images = run.images(cohort["row"])
    finding = run.findings()[0]
    tr, va, te = (training.task_rows(cohort, finding, s) for s in ("train", "validate", "test"))
    out = Path(tempfile.mkdtemp(prefix="bench-grid-slice-"))
    tasks = []
    for i in range(n_tasks):
        seed = cfg.seeds[i % len(cfg.seeds)]
        tcfg = training.TrainConfig.from_params(cfg.values, seed=seed, device="cpu")
        kept = np.random.default_rng(i).random(len(tr[0])) >= 0.1
        anchor = run.model_dir("03_baseline", finding, seed) / f"epoch_{cfg.epochs_anchor:02d}.pt"
        tasks.append(grid.Task(f"t{i}", "d3m_lib.training:retrain",
                               dict(cfg=tcfg, images=images, rows=tr[0][kept], y=tr[1][kept], anchor=anchor,
                                    out_dir=out / f"t{i}", va=va, te=te,
                                    steps=training.continuation_steps(tcfg, len(tr[0])))))
    t0 = time.perf_counter()
    grid.run_tasks(tasks, settings=grid.Settings(workers=workers, threads=threads))
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(b"".join((out / f"t{i}" / "preds_test.parquet").read_bytes()
                                     for i in range(n_tasks))).hexdigest()
    shutil.rmtree(out)
    return {"workers": workers, "threads": threads, "seconds": round(seconds, 1), "tasks": n_tasks,
            "predictions_sha256": digest}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--run", type=Path, help="a run folder with stages 01-04 finished (stage 05 is recomputed)")
    ap.add_argument("--from-run", type=Path, help="copy stages 01-04 from this run into a new folder")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument("--configs", default=",".join(f"{w}x{t}" for w, t in CONFIGS),
                    help="workers x threads to time, in this order (ratios are to the first)")
    ap.add_argument("--slice", type=int, default=0, help="time only this many of stage 05's trainings "
                    "(random 10%% removals, through the grid) instead of the whole stage")
    ap.add_argument("--mimic-budget", action="store_true", help="only print the MIMIC budget on paper "
                    "(params/mimic.yaml at the cited H100 throughput) and exit")
    a = ap.parse_args(argv)
    if a.mimic_budget:
        import pandas as pd

        table = pd.DataFrame(mimic_budget())
        print(table.round(2).to_string(index=False))
        return {"mimic_budget": table.to_dict("records")}
    run_dir = a.run
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="bench-grid-")) / "run"
        prepare(a.params, run_dir, a.from_run)
    rows = []
    for workers, threads in (tuple(int(x) for x in c.split("x")) for c in a.configs.split(",")):
        load = os.getloadavg()[0]
        r = retrain_slice(run_dir, a.slice, workers, threads) if a.slice else stage05(run_dir, workers, threads)
        r["load_before"] = round(load, 2)
        rows.append(r)
        if a.out:   # what has finished so far
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps({"configs": rows, "partial": True}, indent=2))
        print(f"{'slice' if a.slice else 'stage 05'}, {workers} worker(s) x {threads} thread(s): {r['seconds']:.1f} s "
              f"({r['tasks']} tasks; load average before: {load:.2f})", flush=True)
    ref = rows[0]["seconds"]
    for r in rows:
        r["speedup_vs_first"] = round(ref / r["seconds"], 2)
    one = {(r["workers"], r["threads"]): r["predictions_sha256"] for r in rows}
    same = one.get((1, 1)) == one.get((2, 1))
    print("\n".join(f"{r['workers']} x {r['threads']}: {r['seconds']:7.1f} s   x{r['speedup_vs_first']:.2f}"
                    for r in rows))
    if (1, 1) in one and (2, 1) in one:
        print(f"1 worker x 1 thread and 2 workers x 1 thread wrote {'identical' if same else 'DIFFERENT'} "
              "predictions")
    else:
        same = None
    out = {"configs": rows, "identical_1x1_2x1": same, "run": str(run_dir), "cpus": os.cpu_count(),
           "machine": platform.machine(), "python": platform.python_version()}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
