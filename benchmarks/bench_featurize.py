"""TRAK featurizers: quality against exact-gradient TRAK, and speed against a training step.

Quality (``--quality``): a synthetic cohort (``d3m_lib.synthetic``, planted harm recorded)
and a ResNet-9 small enough (width 1, ~1.7k parameters) that exact, unprojected
per-example gradients fit and ``X^T X`` is invertible (parameters < training images).
Exact TRAK is ``X (X^T X)^+ g * Q`` (pseudo-inverse: dead units give zero gradient columns)
on those gradients (one checkpoint). Each featurizer
runs through ``attribution.TrakScorer`` at the same ``--proj-dim``; the table gives the
Spearman correlation of its D3M alignment scores ``A_i`` (race groups, softmax beta=1, the
base model's group losses) with the exact ones, the mean per-target Spearman of raw
scores, the planted-harm AUROC (low ``A_i`` = harmful) and the LDS with its interval.

Speed (``--speed``): images/s of traker's featurizing (per-example gradients + dense JL
projection), the factorized featurizer, and one SGD training step, on the same batches of
the same model (default the demo's ResNet-9, width 16, 32 px), in one run: one warm-up batch,
then ``--repeats`` interleaved timings of ``--batches`` batches each; medians reported.

    PYTHONPATH=. python benchmarks/bench_featurize.py --out benchmarks/results/featurize.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from d3m_lib import attribution, d3m, image_cache, models, training


def cohort_and_cache(work: Path, n_patients: int, px: int):
    from d3m_lib import cohort, synthetic
    out = work / "synthetic"
    synthetic.generate(out, progress=False, n_patients=n_patients, image_size=max(px, 32), seed=0)
    res = cohort.build_mimic_cohort(out / synthetic.CXR_DIR, out / synthetic.IV_DIR)
    table = res.table
    rep = image_cache.build_cache([out / synthetic.CXR_DIR / p for p in table["path"]],
                                  work / "cache", px, workers=2, progress=False)
    images = image_cache.open_cache(work / "cache", px, expected_n=len(table))
    truth = pd.read_csv(out / synthetic.GROUND_TRUTH_FILE, dtype=str)
    return table, images, truth, rep


def exact_trak(model, images, train_rows, y_train, target_rows, y_target):
    """Exact TRAK scores (one checkpoint): unprojected per-example gradients, float64."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def margin(p, x, y):
        out = torch.func.functional_call(model, (p, buffers), x.unsqueeze(0)).reshape(())
        return (2 * y - 1) * out

    g = torch.func.vmap(torch.func.grad(margin), in_dims=(None, 0, 0))

    def grads(rows, y):
        out = []
        for s in range(0, len(rows), 256):
            x = training.to_tensor(np.stack([images[int(r)] for r in rows[s:s + 256]]))
            d = g(params, x, torch.as_tensor(y[s:s + 256], dtype=torch.float32))
            out.append(torch.cat([d[k].reshape(len(x), -1) for k in params], 1).double())
        return torch.cat(out).numpy()

    X, G = grads(train_rows, y_train), grads(target_rows, y_target)
    x = training.to_tensor(np.stack([images[int(r)] for r in train_rows]))
    with torch.no_grad():
        m = (2 * torch.as_tensor(y_train) - 1) * model(x).reshape(-1)
    q = torch.sigmoid(-m).double().numpy()[:, None]
    phi = X @ np.linalg.pinv(X.T @ X, hermitian=True)  # pseudo-inverse: dead units give zero columns
    return (phi @ G.T) * q, X.shape[1]


def quality(args, work: Path) -> dict:
    table, images, truth, _ = cohort_and_cache(work, args.n_patients, args.quality_px)
    finding = args.finding
    tr, ytr, _ = training.task_rows(table, finding, "train")
    va, yva, gva = training.task_rows(table, finding, "validate")
    cfg = training.TrainConfig(arch="resnet9", width=1, image_size=args.quality_px, batch_size=128,
                               lr=0.2, epochs_anchor=args.epochs, epochs_more=0, device="cpu", seed=0)
    training.train(cfg, images, tr, ytr, (0, args.epochs), work / "model", progress=False)
    ck = work / "model" / f"epoch_{args.epochs:02d}.pt"
    model = training.load_model(cfg, ck).eval()
    n_params = models.count_params(model)
    if n_params >= len(tr):
        raise SystemExit(f"{n_params} parameters >= {len(tr)} training images: X^T X is singular")
    logits_va = training.predict(ck, cfg, images, va)
    gl = d3m.group_losses(yva, logits_va, gva)
    t0 = time.perf_counter()
    S_exact, D = exact_trak(model, images, tr, ytr, va, yva)
    t_exact = time.perf_counter() - t0
    names = sorted(set(gva))

    def alignment(S):
        tau = pd.DataFrame({g: S[:, gva == g].mean(1) for g in names}, index=tr)
        return d3m.alignment_scores(tau, gl, "softmax", 1.0).to_numpy()

    planted = set(truth.loc[truth["finding"] == finding, "dicom_id"])
    harm = table.set_index("row").loc[tr, "image_id"].isin(planted).to_numpy()
    labels = pd.Series(np.r_[ytr, yva], index=np.r_[tr, va])
    A_exact = alignment(S_exact)
    rows = {"exact": {"A_spearman_vs_exact": 1.0, "score_spearman_vs_exact": 1.0,
                      "harm_auroc": float(roc_auc_score(harm, -A_exact)) if harm.any() else None,
                      "seconds": t_exact, "dim": D}}
    S_by = {"exact": S_exact}
    for kind in attribution.FEATURIZERS:
        t0 = time.perf_counter()
        sc = attribution.TrakScorer(lambda: models.build_model("resnet9", 1, width=1), work / f"trak_{kind}",
                                    images, tr, labels, {args.epochs: ck}, proj_dim=args.proj_dim,
                                    projector_seed=0, batch_size=128, transform=training.to_tensor,
                                    featurizer=kind)
        S = sc.scores(va, exp_name="val")
        secs = time.perf_counter() - t0
        A = alignment(S)
        per_t = [stats.spearmanr(S[:, j], S_exact[:, j]).statistic for j in range(S.shape[1])]
        rows[kind] = {"A_spearman_vs_exact": float(stats.spearmanr(A, A_exact).statistic),
                      "score_spearman_vs_exact": float(np.nanmean(per_t)),
                      "harm_auroc": float(roc_auc_score(harm, -A)) if harm.any() else None,
                      "seconds": secs, "dim": args.proj_dim}
        S_by[kind] = S
    if args.lds_models:
        rng = np.random.default_rng(1)
        tgt = rng.choice(len(va), size=min(args.lds_targets, len(va)), replace=False)
        margins_cache = {}

        def subset_margins(mask):
            key = mask.tobytes()
            if key not in margins_cache:
                d = work / f"lds{len(margins_cache)}"
                training.train(cfg, images, tr[mask], ytr[mask], (0, args.epochs), d, progress=False)
                lg = training.predict(d / f"epoch_{args.epochs:02d}.pt", cfg, images, va[tgt])
                margins_cache[key] = (2 * yva[tgt] - 1) * lg
            return margins_cache[key]

        for kind, S in S_by.items():
            r = attribution.lds(S[:, tgt], subset_margins, n_models=args.lds_models, seed=0, n_boot=500)
            rows[kind].update(lds=r["lds"], lds_lo=r["lo"], lds_hi=r["hi"])
    return {"finding": finding, "n_train": int(len(tr)), "n_validate": int(len(va)),
            "n_planted_train": int(harm.sum()), "n_params": int(n_params), "proj_dim": args.proj_dim,
            "px": args.quality_px, "epochs": args.epochs, "lds_models": args.lds_models, "methods": rows}


def speed(args) -> dict:
    torch.manual_seed(0)
    px, B = args.speed_px, args.batch
    model = models.build_model(args.arch, 1, width=args.width).eval()
    n = max(B * (args.batches + 1), args.proj_dim_speed + 1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, px, px), dtype=np.uint8)
    labels = pd.Series(rng.integers(0, 2, n).astype(float))
    batches = [(training.to_tensor(images[s:s + B]), torch.as_tensor(labels.to_numpy()[s:s + B],
                                                                       dtype=torch.float32))
               for s in range(0, B * (args.batches + 1), B)]
    runners = {}
    tmp = tempfile.TemporaryDirectory()
    for kind in attribution.FEATURIZERS:
        sc = attribution.TrakScorer(lambda: models.build_model(args.arch, 1, width=args.width),
                                    Path(tmp.name) / kind, images, np.arange(n), labels,
                                    {0: model.state_dict()}, proj_dim=args.proj_dim_speed,
                                    batch_size=B, transform=training.to_tensor, featurizer=kind)
        sc.plan_for(0)
        sc._use_checkpoint(0)

        def run(x, y, t=sc.traker):  # what TRAKer.featurize computes, without the store write
            t.projector.project(t.gradient_computer.compute_per_sample_grad([x, y]), model_id=0)
            t.gradient_computer.compute_loss_grad([x, y])
        runners[kind] = run
    m = models.build_model(args.arch, 1, width=args.width).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.binary_cross_entropy_with_logits(m(x).reshape(-1), y).backward()
        opt.step()
    runners["train_step"] = step
    for fn in runners.values():  # warm-up (oneDNN picks kernels per shape)
        fn(*batches[0])
    times = {k: [] for k in runners}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
        for k, fn in runners.items():
            t0 = time.perf_counter()
            for x, y in batches[1:]:
                fn(x, y)
            times[k].append(time.perf_counter() - t0)
    tmp.cleanup()
    out = {k: B * (len(batches) - 1) / float(np.median(v)) for k, v in times.items()}
    return {"arch": args.arch, "width": args.width, "px": px, "batch": B, "batches": args.batches,
            "repeats": args.repeats,
            "proj_dim": args.proj_dim_speed, "images_per_s": out,
            "factorized_over_traker": out["factorized"] / out["traker"],
            "factorized_over_train_step": out["factorized"] / out["train_step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/featurize.json")
    ap.add_argument("--no-quality", dest="quality", action="store_false")
    ap.add_argument("--no-speed", dest="speed", action="store_false")
    ap.add_argument("--n-patients", type=int, default=2000)
    ap.add_argument("--quality-px", type=int, default=16)
    ap.add_argument("--finding", default="Pleural Effusion")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--proj-dim", type=int, default=256)
    ap.add_argument("--lds-models", type=int, default=0, help="subset models for LDS (0: skip)")
    ap.add_argument("--lds-targets", type=int, default=100)
    ap.add_argument("--arch", default="resnet9")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--speed-px", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--proj-dim-speed", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    res = {"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.speed:
        res["speed"] = speed(args)
        s = res["speed"]
        print(f"\nSpeed ({s['arch']} width {s['width']}, {s['px']} px, batch {s['batch']}, p={s['proj_dim']}, "
              f"{res['threads']} threads): images/s")
        print(pd.Series(s["images_per_s"]).round(1).to_string())
        print(f"factorized / traker = {s['factorized_over_traker']:.1f}x; "
              f"factorized / training step = {s['factorized_over_train_step']:.2f}x")
    if args.quality:
        with tempfile.TemporaryDirectory() as tmp:
            res["quality"] = q = quality(args, Path(tmp))
        print(f"\nQuality ({q['finding']}, n_train={q['n_train']}, n_val={q['n_validate']}, "
              f"{q['n_params']} params, p={q['proj_dim']}, planted harmful train images {q['n_planted_train']}):")
        print(pd.DataFrame(q["methods"]).T.round(3).to_string())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=float))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
