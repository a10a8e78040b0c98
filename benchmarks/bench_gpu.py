"""The GPU path in one script: training step, TRAK featurizing, and a MIMIC-shaped slice end to end.

Everything runs through d3m_lib's own code, on the device given:

(a) **training step**: images/s of ``training._sgd_step`` (the step every training call
    takes: autocast, channels_last on CUDA, masked BCE, SGD) with the model and optimizer
    of ``training._model_and_optimizer``, ResNet-50 at 224 px, batch 64 and 256, fp32
    against bf16 autocast (on CUDA the library always uses bf16 + channels_last; "fp32" is
    the same step with its autocast switched off), fed from batches already on the device
    (the ceiling) and through ``training._loader`` from a memory-mapped uint8 cache
    (``MemmapBatches``, pinned memory on CUDA). Peak GPU memory per configuration.
(b) **featurizing**: ``attribution.TrakScorer`` with the factorized featurizer against
    traker's default path (per-example gradients; ``CudaProjector`` when ``fast_jl`` imports
    on CUDA, otherwise traker's ``BasicProjector``: the JSON says which), on the slice's
    anchor checkpoints and training images, at equal projection dimension: images/s of
    featurizing, and the Spearman correlation of the D3M alignment scores ``A_i`` (and of
    each group's ``tau``) between the two paths.
(c) **a MIMIC-shaped slice**: a synthetic cohort (``d3m_lib.synthetic``) written at the
    training size, then the study's stage functions with one params dict (``config.resolve``,
    ``RunDir``, ``stages.<name>.run``): 01 cohort + image cache, 03 anchor (+ one epoch of
    continued ERM), 04 TRAK over 3 anchor checkpoints, 05 D3M with one retrained arm
    (plus the removal curve's models at one share), 06 evaluation. Stage 02 is not run: the finding is
    named. Per stage: wall time, peak host memory (this process and its children, sampled),
    peak GPU memory (``torch.cuda.max_memory_allocated``), and a LINEAR EXTRAPOLATION to
    240,000 training and 20,000 validation images (labelled so in the table and the JSON).

Prints a table, writes JSON (``--out``; default ``benchmarks/results/gpu_<device>[_tiny].json``)
and the same table as text beside it. The JSON is rewritten after every part, so a run
stopped by a time limit keeps what it finished. Each part's failure is recorded and the
next part still runs.

    PYTHONPATH=. python benchmarks/bench_gpu.py --device cuda          # the H100 run
    PYTHONPATH=. python benchmarks/bench_gpu.py --device cpu --tiny    # CI sizes (tests/test_bench_gpu.py)
    bash benchmarks/run_gpu_bench.sh     # on a GPU machine without network: traker, fast_jl for the card, then this
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")   # no progress bars (read when tqdm is imported): the table is the output

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from d3m_lib import attribution, config, d3m, models, training  # noqa: E402
from d3m_lib.rundir import RunDir  # noqa: E402

FINDING = "Pleural Effusion"
TARGET_TRAIN, TARGET_VAL = 240_000, 20_000   # the MIMIC scale the slice is extrapolated to
ANCHORS = {"train_bf16_b256_img_s": 3992.0, "train_fp32_b256_img_s": 1862.0, "traker_cuda_projector_img_s": 203.0}

# full: the GPU figures; tiny: CPU/CI sizes (the numbers mean nothing)
# (--tiny runs ResNet-50 in (a) only: the slice and (b) use a width-4 ResNet-9 at 16 px, because ResNet-50
# through every stage takes minutes on 2 shared CPU cores; --slice-arch resnet50 runs it anyway)
SIZES = {
    "full": dict(arch="resnet50", slice_arch="resnet50", width=8, slice_px=224, px=224, batches=[64, 256],
                 steps=10, warmup=3, n_patients=2600,
                 epochs_anchor=3, epochs_more=1, trak_proj_dim=2048, trak_batch_size=64, batch_size=64,
                 feat_images=1024, feat_proj_dim=512, n_boot=200, min_group_n=15, cohort_min_group_n=20,
                 cache_workers=8, k_share=0.05),
    "tiny": dict(arch="resnet50", slice_arch="resnet9", width=4, slice_px=16, px=32, batches=[8, 16], steps=2,
                 warmup=1, n_patients=80, epochs_anchor=3, epochs_more=1, trak_proj_dim=16, trak_batch_size=32,
                 batch_size=32, feat_images=32, feat_proj_dim=8, n_boot=10, min_group_n=3, cohort_min_group_n=3,
                 cache_workers=1, k_share=0.1),
}


# ------------------------------------------------------------------ machine, memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def fast_jl_status() -> dict:
    try:
        import fast_jl  # noqa: F401
        from importlib.metadata import version
        try:
            v = version("fast_jl")
        except Exception:
            v = None
        return {"importable": True, "version": v}
    except Exception as exc:   # ImportError, or a build for another architecture
        return {"importable": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def machine(device: torch.device) -> dict:
    """Card, driver, torch, date: what every figure of this file is quoted with."""
    import trak

    info = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type, "platform": platform.platform(), "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "traker": getattr(trak, "__version__", None), "fast_jl": fast_jl_status(), "git_commit": _git_commit(),
        "card": None, "driver": None,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(card=torch.cuda.get_device_name(device), driver=_nvidia_smi("driver_version"),
                    gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), capability=f"{p.major}.{p.minor}",
                    bf16_supported=torch.cuda.is_bf16_supported(),
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def _rss_bytes() -> int:
    """Resident memory of this process and all its children (psutil when present)."""
    try:
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for c in me.children(recursive=True):
            with contextlib.suppress(Exception):
                total += c.memory_info().rss
        return total
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Wall time, peak host memory (sampled, process + children) and peak GPU memory of a block."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device, self.interval = device, interval
        self.seconds = self.host_peak_mib = self.gpu_peak_mib = None

    def __enter__(self) -> "Peak":
        self._stop = threading.Event()
        self._peak = _rss_bytes()

        def sample():
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, _rss_bytes())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.host_peak_mib = round(max(self._peak, _rss_bytes()) / 2 ** 20, 1)
        if self.device.type == "cuda":
            self.gpu_peak_mib = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)

    def record(self) -> dict:
        return {"seconds": round(self.seconds, 3), "host_peak_mib": self.host_peak_mib,
                "gpu_peak_mib": self.gpu_peak_mib}


# ------------------------------------------------------------------ (a) training step
@contextlib.contextmanager
def precision(name: str):
    """``bf16``: the library's step as it is; ``fp32``: the same step with its autocast switched off."""
    if name == "bf16":
        yield
        return
    original = training._autocast
    training._autocast = lambda device: contextlib.nullcontext()
    try:
        yield
    finally:
        training._autocast = original


def train_step_rate(arch: str, px: int, batch: int, steps: int, warmup: int, device: torch.device,
                    prec: str, source: str, images: np.ndarray, num_workers: int) -> dict:
    """Images/s of ``steps`` library training steps after ``warmup`` untimed ones."""
    torch.manual_seed(0)
    cfg = training.TrainConfig(arch=arch, image_size=px, batch_size=batch, device=device.type,
                               num_workers=num_workers)
    n = len(images)
    rows = np.arange(n)
    y = (np.arange(n) % 2).astype(np.float32)
    ds = training.MemmapBatches(images, rows, y, cfg)
    batches = []
    e = 0
    while len(batches) < steps + warmup:
        batches += [b for b in training.epoch_batches(n, batch, 0, e) if len(b) == batch]
        e += 1
    batches = batches[:steps + warmup]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with precision(prec):
        model, opt = training._model_and_optimizer(cfg, 1, device, None, 0.01)
        model.train()
        if source == "memmap":
            feed = iter(training._loader(ds, batches, cfg, device))
        else:
            xb, yb = ds[batches[0]]
            fixed = (training._to(xb, device), yb.to(device))
            feed = iter([fixed] * len(batches))
        for _ in range(warmup):
            training._sgd_step(model, opt, *next(feed), 0.01, cfg, device)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            training._sgd_step(model, opt, *next(feed), 0.01, cfg, device)   # returns float(loss): syncs
        _sync(device)
        secs = time.perf_counter() - t0
    return dict(arch=arch, px=px, batch=batch, precision=prec,
                channels_last=device.type == "cuda", source=source, steps=steps,
                seconds=round(secs, 3), img_per_s=round(steps * batch / secs, 1),
                gpu_peak_mib=round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
                if device.type == "cuda" else None)


def part_training(a, sz: dict, device: torch.device, work: Path) -> dict:
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    n = max(sz["batches"]) * (sz["steps"] + sz["warmup"])
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"images_{sz['px']}.u8"      # the image cache's own file format
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, sz["px"], sz["px"]))
    rng = np.random.default_rng(0)
    for s in range(0, n, 256):
        mm[s:s + 256] = rng.integers(0, 256, mm[s:s + 256].shape, dtype=np.uint8)
    mm.flush()
    del mm
    images = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, sz["px"], sz["px"]))
    rows = []
    for batch in sz["batches"]:
        for prec in precisions:
            for source in ("in_memory", "memmap"):
                try:
                    r = train_step_rate(sz["arch"], sz["px"], batch, sz["steps"], sz["warmup"], device, prec,
                                        source, images, a.num_workers)
                except torch.cuda.OutOfMemoryError as exc:   # recorded; the other configurations still run
                    r = dict(arch=sz["arch"], px=sz["px"], batch=batch, precision=prec, source=source,
                             error=f"out of memory: {str(exc)[:200]}")
                rows.append(r)
                print(f"  train {r['arch']} {r['px']}px b{batch:<4d} {prec} {source:9s} "
                      f"{r.get('img_per_s', 'n/a')} img/s", flush=True)
    notes = []
    if device.type != "cuda":
        notes.append("bf16 autocast and channels_last are CUDA-only in d3m_lib: on the CPU only fp32 is timed")
    return {"rows": rows, "num_workers": a.num_workers, "images_in_memmap": n, "notes": notes}


# ------------------------------------------------------------------ (c) the slice
def slice_params(sz: dict, device: torch.device, data: Path) -> dict:
    from d3m_lib import synthetic

    p = dict(dataset="mimic", synthetic=True, synthetic_n_patients=sz["n_patients"],
             synthetic_image_size=sz["slice_px"], image_size=sz["slice_px"], synthetic_seed=0,
             mimic_cxr_dir=str(data / synthetic.CXR_DIR), mimic_iv_dir=str(data / synthetic.IV_DIR),
             cache_workers=sz["cache_workers"], cohort_min_group_n=sz["cohort_min_group_n"],
             arch=sz["slice_arch"], width=sz["width"], batch_size=sz["batch_size"],
             lr=0.001 if sz["slice_arch"] == "resnet50" else 0.2,
             weight_decay=1e-4, device=device.type, seeds=[0], epochs_anchor=sz["epochs_anchor"],
             epochs_more=sz["epochs_more"], findings=[FINDING], min_group_n=sz["min_group_n"],
             min_group_pos=1, trak_checkpoints=list(range(max(1, sz["epochs_anchor"] - 2), sz["epochs_anchor"] + 1)),
             trak_proj_dim=sz["trak_proj_dim"], trak_batch_size=sz["trak_batch_size"], trak_featurizer="factorized",
             methods=["d3m"], d3m_selection="negative", d3m_k_grid=[sz["k_share"]], n_boot=sz["n_boot"],
             credentialed=False)
    # parameters that only some versions of the configuration know (kept off where absent)
    optional = {"grid_workers": 1, "primary_contrast": ["d3m", "erm"]}
    p.update({k: v for k, v in optional.items() if k in config.BY_NAME})
    return p


def part_slice(a, sz: dict, device: torch.device, work: Path, state: dict, rec: dict) -> dict:
    """Fills ``rec`` as it goes (so a failure keeps the stages that finished) and returns it."""
    from d3m_lib import synthetic
    from d3m_lib.stages import baseline as st_baseline
    from d3m_lib.stages import cohort as st_cohort
    from d3m_lib.stages import compare as st_compare
    from d3m_lib.stages import d3m as st_d3m
    from d3m_lib.stages import trak as st_trak

    data = work / "synthetic"
    stages = rec.setdefault("stages", {})
    info = rec
    with Peak(device) as pk:
        gen = synthetic.generate(data, n_jobs=1 if a.tiny else None, progress=False, n_patients=sz["n_patients"],
                                 image_size=sz["slice_px"], seed=0)
    stages["generate"] = pk.record() | {"what": "write the synthetic JPEGs (synthetic data only; not extrapolated)"}
    params = slice_params(sz, device, data)
    cfg = config.resolve(params)
    tcfg = training.TrainConfig.from_params(cfg.values, seed=0)
    run = RunDir(work / "run")
    state.update(run=run, cfg=cfg, params=params)

    def stage(name, fn, what):
        with Peak(device) as pk:
            res = fn(run.begin(name, cfg))
        stages[name] = pk.record() | {"what": what}
        print(f"  slice {name:12s} {stages[name]['seconds']:8.1f} s  host {pk.host_peak_mib} MiB"
              + (f"  gpu {pk.gpu_peak_mib} MiB" if pk.gpu_peak_mib is not None else ""), flush=True)
        return res

    stage("01_cohort", st_cohort.run, "cohort table and image cache (decode every JPEG once)")
    cohort = run.cohort()
    counts = cohort[cohort[FINDING].notna()].groupby("split").size().to_dict()
    n_train, n_val, n_test = (int(counts.get(s, 0)) for s in ("train", "validate", "test"))
    n_all = len(cohort)
    st = run.begin("02_scan", cfg)      # the finding is named: the scan is not part of the slice
    st.path("chosen_findings.json").write_text(json.dumps([FINDING]))
    st.finish()
    stage("03_baseline", st_baseline.run,
          f"anchor ({tcfg.epochs_anchor} epochs) and continued ERM ({tcfg.epochs_more} epoch), predictions")
    state["anchor_done"] = True
    stage("04_trak", st_trak.run, f"TRAK over anchor checkpoints {cfg.trak_checkpoints} (factorized, "
                                  f"p = {cfg.trak_proj_dim}), group scores of the validation images")
    res05 = stage("05_d3m", st_d3m.run, "alignment scores, one retrained arm (d3m) and the removal curve's "
                                        "models at its one share (retrainings_05 continuations in all)")
    stage("06_per_race", st_compare.run, "evaluation: per-group tables, worst-group accuracy, bootstrap")
    curve = res05.curve
    retrainings = len(res05.arms) + (len(curve.loc[curve["k"] > 0, ["method", "k"]].drop_duplicates())
                                     if len(curve) else 0)
    info.update(n_patients=sz["n_patients"], cohort_images=n_all,
                generator={k: v for k, v in gen.items() if not isinstance(v, (dict, list))},
                n_train=n_train, n_validate=n_val, n_test=n_test, retrainings_05=retrainings,
                params={k: v for k, v in params.items() if k not in ("mimic_cxr_dir", "mimic_iv_dir")})
    # linear extrapolation: each stage scales with the images it mostly works on
    scale = {"01_cohort": (TARGET_TRAIN + TARGET_VAL) / max(n_train + n_val, 1),
             "03_baseline": TARGET_TRAIN / max(n_train, 1), "04_trak": TARGET_TRAIN / max(n_train, 1),
             "05_d3m": TARGET_TRAIN / max(n_train, 1), "06_per_race": TARGET_VAL / max(n_val, 1)}
    basis = {"01_cohort": "train + validate images (test grows in the same ratio)",
             "03_baseline": "training images", "04_trak": "training images", "05_d3m": "training images",
             "06_per_race": "validation images"}
    for name, f in scale.items():
        stages[name]["extrapolated_s"] = round(stages[name]["seconds"] * f, 1)
        stages[name]["extrapolation_basis"] = basis[name]
        stages[name]["scale"] = round(f, 2)
    total = sum(stages[n]["extrapolated_s"] for n in scale)
    info["extrapolation"] = {
        "LINEAR_EXTRAPOLATION": True, "to_train": TARGET_TRAIN, "to_validate": TARGET_VAL,
        "total_s": round(total, 1), "total_h": round(total / 3600, 2),
        "image_cache_gib": round((TARGET_TRAIN + TARGET_VAL) * sz["slice_px"] ** 2 / 2 ** 30, 1),  # arithmetic
        "caveat": ("an extrapolation, not a measurement: each stage's time times the ratio of its image "
                   "count, for this slice's configuration (1 finding, 1 seed, the epochs and arms above); "
                   "params/mimic.yaml multiplies the training stages by its findings x seeds and epochs, "
                   "and fixed costs (start-up, calibration) are scaled too, so small slices overestimate"),
    }
    state.update(n_train=n_train, n_val=n_val)
    return rec


# ------------------------------------------------------------------ (b) featurizers
def part_featurize(a, sz: dict, device: torch.device, work: Path, state: dict) -> dict:
    from scipy import stats

    run, cfg = state["run"], state["cfg"]
    cohort = run.cohort()
    images = run.images(cohort["row"])
    tr_all = training.task_rows(cohort, FINDING, "train")[0]
    tr = tr_all[:sz["feat_images"]] if sz["feat_images"] else tr_all
    va_rows, va_y, va_groups = training.task_rows(cohort, FINDING, "validate")
    labels = cohort.set_index("row")[FINDING].dropna()
    bdir = run.model_dir("03_baseline", FINDING, 0)
    ckpts = {int(e): bdir / f"epoch_{int(e):02d}.pt" for e in cfg.trak_checkpoints}
    pv = pd.read_parquet(bdir / f"preds_validate_epoch{cfg.epochs_anchor:02d}.parquet").set_index("row").loc[va_rows]
    gl = d3m.group_losses(pv["y"].to_numpy(), pv["logit"].to_numpy(), va_groups)
    p = min(sz["feat_proj_dim"], len(tr) - 1)
    out, A, taus = {}, {}, {}
    for kind in attribution.FEATURIZERS:
        try:   # one path failing (e.g. out of GPU memory) keeps the other's figures
            sc = attribution.TrakScorer(lambda: models.build_model(cfg.arch, 1, width=cfg.width),
                                        work / f"feat_{kind}", images, tr, labels, ckpts, proj_dim=p,
                                        device=device.type, projector_seed=0, batch_size=cfg.trak_batch_size,
                                        transform=training.to_tensor, featurizer=kind)
            projector = type(sc.traker.projector).__name__.lstrip("_")
            with Peak(device) as pk:
                sc.featurize()
            feat = pk.record()
            with Peak(device) as pk2:
                tau = sc.group_scores(va_rows, va_groups, exp_name="validate")
        except Exception:
            out[kind] = {"error": traceback.format_exc()}
            print(f"  featurize {kind} FAILED:\n{out[kind]['error']}", file=sys.stderr, flush=True)
            continue
        taus[kind] = tau
        A[kind] = d3m.alignment_scores(tau, gl, "softmax", 1.0).to_numpy()
        n_img = len(tr) * len(ckpts)
        out[kind] = {"projector": projector if kind == "traker" else "factorized Kronecker (d3m_lib.featurize)",
                     "featurize": feat, "img_per_s": round(n_img / feat["seconds"], 1),
                     "score_targets": pk2.record()}
        print(f"  featurize {kind:10s} ({out[kind]['projector']}) {out[kind]['img_per_s']} img/s", flush=True)
    res = {"arch": cfg.arch, "px": cfg.image_size, "checkpoints": sorted(ckpts), "n_train": int(len(tr)),
           "n_validate": int(len(va_rows)), "proj_dim": p, "batch_size": cfg.trak_batch_size, "paths": out,
           "traker_projector": out["traker"].get("projector", "failed")}
    if len(A) == 2:
        res.update(factorized_over_traker=round(out["factorized"]["img_per_s"] / out["traker"]["img_per_s"], 2),
                   A_spearman=float(stats.spearmanr(A["factorized"], A["traker"]).statistic),
                   tau_spearman={g: float(stats.spearmanr(taus["factorized"][g], taus["traker"][g]).statistic)
                                 for g in taus["factorized"].columns})
    return res


# ------------------------------------------------------------------ table, main
def table(res: dict) -> str:
    m = res["machine"]
    lines = [f"bench_gpu.py ({res['sizes']}) on {m['card'] or m['cpu']} ({m['device']}), driver {m['driver']}, "
             f"torch {m['torch']}, {m['date_utc']}"]
    a = res.get("training")
    if a and "rows" in a:
        lines += ["", "(a) training step, images/s (d3m_lib's _sgd_step)"]
        df = pd.DataFrame(a["rows"])
        cols = [c for c in ("batch", "precision", "source", "img_per_s", "gpu_peak_mib", "error") if c in df]
        lines.append(df[cols].to_string(index=False))
        for n in a.get("notes", []):
            lines.append(f"note: {n}")
        if m["device"] == "cuda":
            get = {(r["batch"], r["precision"], r["source"]): r.get("img_per_s") for r in a["rows"]}
            b = 256   # the batch of the anchors
            for prec, key in (("bf16", "train_bf16_b256_img_s"), ("fp32", "train_fp32_b256_img_s")):
                v = get.get((b, prec, "in_memory"))
                if v:
                    lines.append(f"{prec} batch {b} in memory: {v / ANCHORS[key]:.2f}x the anchor "
                                 f"{ANCHORS[key]:,.0f} img/s")
    f = res.get("featurize")
    if f and "paths" in f:
        lines += ["", f"(b) featurizing {f['arch']} {f['px']} px, {f['n_train']} images x {len(f['checkpoints'])} "
                      f"checkpoints, p = {f['proj_dim']}"]
        for k, v in f["paths"].items():
            if "error" in v:
                lines.append(f"  {k:10s} FAILED: {v['error'].strip().splitlines()[-1]}")
            else:
                lines.append(f"  {k:10s} {v['img_per_s']:10.1f} img/s   projector: {v['projector']}")
        if "A_spearman" in f:
            lines.append(f"  factorized / traker = {f['factorized_over_traker']}x; Spearman of A_i between the "
                         f"paths = {f['A_spearman']:.3f}")
        if "factorized_over_train_bf16_b64" in f:
            lines.append(f"  factorized / bf16 training step (batch 64, in memory) = "
                         f"{f['factorized_over_train_bf16_b64']}x (target >= 0.5)")
        if f["traker_projector"].startswith(("Cuda", "ChunkedCuda")) and "img_per_s" in f["paths"]["traker"]:
            ref = ANCHORS["traker_cuda_projector_img_s"]
            lines.append(f"  traker with CudaProjector: {f['paths']['traker']['img_per_s'] / ref:.2f}x the anchor "
                         f"{ref:.0f} img/s")
    c = res.get("slice")
    if c and c.get("stages"):
        lines += ["", f"(c) MIMIC-shaped slice ({FINDING}, one seed)"]
        if "n_train" in c:
            lines.append(f"    {c['n_train']} train / {c['n_validate']} validate / {c['n_test']} test images, "
                         f"{c['params']['arch']} at {c['params']['image_size']} px, {c['retrainings_05']} "
                         f"continuations in 05")
        df = pd.DataFrame(c["stages"]).T
        cols = [x for x in ("seconds", "host_peak_mib", "gpu_peak_mib", "extrapolated_s") if x in df]
        lines.append(df[cols].to_string())
        ex = c.get("extrapolation")
        if ex:
            lines.append(f"    extrapolated_s is a LINEAR EXTRAPOLATION to {TARGET_TRAIN:,} training and "
                         f"{TARGET_VAL:,} validation images, not a measurement; total (01, 03-06) "
                         f"{ex['total_s']:,.0f} s = {ex['total_h']} h; the image cache of those images at "
                         f"{c['params']['image_size']} px holds {ex.get('image_cache_gib')} GiB (arithmetic)")
    for part in ("training", "featurize", "slice"):
        if res.get(part, {}).get("error"):
            lines.append(f"\n{part} FAILED: {res[part]['error'].splitlines()[-1]}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="CPU/CI sizes (32 px, batches 8 and 16, 150 patients)")
    ap.add_argument("--parts", nargs="+", default=["training", "slice", "featurize"],
                    choices=("training", "slice", "featurize"), help="featurize needs slice (its checkpoints)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (the table goes beside it as .txt)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the memmap feed")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 with --tiny, as two threads on a shared "
                         "2-core machine run an order of magnitude slower)")
    for k in ("px", "slice_px", "n_patients", "feat_images", "trak_proj_dim", "feat_proj_dim", "steps"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"override the size {k}")
    ap.add_argument("--slice-arch", choices=models.ARCHS, default=None, help="architecture of (b) and (c)")
    a = ap.parse_args(argv)
    if a.threads or a.tiny:
        torch.set_num_threads(a.threads or 1)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA GPU")
    sizes = "tiny" if a.tiny else "full"
    sz = dict(SIZES[sizes])
    sz.update({k: getattr(a, k) for k in ("px", "slice_px", "n_patients", "feat_images", "trak_proj_dim",
                                          "feat_proj_dim", "steps", "slice_arch") if getattr(a, k) is not None})
    out = a.out or REPO / "benchmarks" / "results" / f"gpu_{device.type}{'_tiny' if a.tiny else ''}.json"
    res = {"machine": machine(device), "sizes": sizes, "size_params": sz, "anchors": ANCHORS,
           "argv": sys.argv[1:] if argv is None else list(argv)}
    t_all = time.perf_counter()

    def save():
        res["total_seconds"] = round(time.perf_counter() - t_all, 1)
        res["peak_rss_self_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2, default=str))
        out.with_suffix(".txt").write_text(table(res) + "\n")

    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="bench_gpu_")
    work = a.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    state: dict = {}
    print(f"bench_gpu: {sizes} sizes on {res['machine']['card'] or res['machine']['cpu']} ({device.type}); "
          f"scratch {work}", flush=True)
    try:
        for part in ("training", "slice", "featurize"):
            if part not in a.parts:
                continue
            if part == "featurize" and not state.get("anchor_done"):
                res[part] = {"error": "skipped: needs the slice's checkpoints (--parts slice featurize)"}
                continue
            t0 = time.perf_counter()
            try:
                if part == "training":
                    res[part] = part_training(a, sz, device, work / "train")
                elif part == "slice":
                    res[part] = {}
                    part_slice(a, sz, device, work / "slice", state, res[part])
                else:
                    res[part] = part_featurize(a, sz, device, work / "featurize", state)
            except Exception:
                res[part] = {**(res.get(part) if part == "slice" else {}), "error": traceback.format_exc()}
                print(f"  {part} FAILED:\n{res[part]['error']}", file=sys.stderr, flush=True)
            res[part]["part_seconds"] = round(time.perf_counter() - t0, 1)
            if part == "featurize" and "paths" in res[part] and device.type == "cuda":
                rows = res.get("training", {}).get("rows", [])
                ref = next((r.get("img_per_s") for r in rows if r.get("batch") == 64 and r.get("precision") == "bf16"
                            and r.get("source") == "in_memory"), None)
                if ref:
                    res[part]["factorized_over_train_bf16_b64"] = round(
                        res[part]["paths"]["factorized"]["img_per_s"] / ref, 3)
            save()
    finally:
        save()
        if tmp is not None:
            tmp.cleanup()
    print()
    print(table(res))
    print(f"\nwrote {out} and {out.with_suffix('.txt')}")
    return res


if __name__ == "__main__":
    main()
