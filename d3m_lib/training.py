"""Training with the study's 5 + 10 epoch schedule, checkpoints and predictions.

The schedule, as in the source study:

1. **anchor**: train epochs 1..``epochs_anchor`` (5) from scratch on all
   training rows under the anchor's own schedule (:func:`lr_at`: warm-up, then
   decay to 0 at the last anchor epoch); keep ``epoch_05.pt``. TRAK
   featurizes these checkpoints.
2. **continue**: :func:`continue_training` starts from ``epoch_05.pt`` with a
   fresh optimizer and takes a fixed number of optimizer steps (ERM's count,
   ``epochs_more * ceil(n_train / batch_size)``) under its own warm-restart
   schedule (:func:`continue_lr_at`). Continued ERM makes this call on all
   training rows; D3M and the controls make it on their kept rows, drawn in
   reshuffled passes until the budget is spent (:func:`continuation_batches`).
   Every arm therefore gets the same steps and learning rates and differs only
   in the rows it is given.

``train(cfg, ..., epochs=(5, 15), init_checkpoint=...)`` still trains by
epochs under :func:`lr_at` (the anchor's schedule); the study's continuation
is :func:`continue_training`.

On CPU training is deterministic (same seed -> identical checkpoints): the
shuffling of epoch ``e`` depends only on ``(seed, e)``, initialisation on
``seed``, and deterministic algorithms are switched on for the duration of
the call. On CUDA it uses bf16 autocast and channels_last (fast, not bitwise
reproducible).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from .models import build_model

SCHEDULES = ("triangle", "cosine", "constant")

# Input normalisation: pixels scaled to [0, 1], then (x - NORM_MEAN) / NORM_STD.
NORM_MEAN, NORM_STD = 0.5, 0.25


def to_tensor(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, px, px)`` -> normalised float ``(B, 1, px, px)``: the model input of training.

    ``attribution`` uses this so that TRAK sees the images exactly as training did.
    """
    x = torch.as_tensor(np.asarray(images_u8), dtype=torch.float32).unsqueeze(1).div_(255.0)
    return (x - NORM_MEAN) / NORM_STD


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the stage manifest).

    lr_schedule:
      ``triangle`` -- linear warm-up from 0 to ``lr`` over ``warmup_epochs``,
      then linear decay to 0 (the DAWNBench/TRAK ResNet-9 recipe); ``cosine`` --
      same warm-up, cosine decay; ``constant`` -- ``lr`` throughout.
    anchor_anneal: True (default): the anchor call (epochs 1..``epochs_anchor``)
      has its own warm-up and decay, reaching 0 at epoch ``epochs_anchor``, so
      the anchor checkpoint is a converged model, not a point halfway down the
      full-horizon curve. False: the anchor follows the single curve over
      ``epochs_anchor + epochs_more`` epochs (the earlier behaviour, where the
      anchor still has about 70% of the peak rate). See :func:`lr_at`.
    augment: random horizontal shift by up to 2 px and brightness jitter
      (off by default; chest X-rays are not left/right symmetric, so no flips).
    stream: the batch-order stream of the continuation (:func:`continuation_batches`).
      0 (default): every arm's test model and continued ERM; the removal curve's models use
      another stream, so a model chosen on validation is never the one evaluated on test.
    """

    arch: str = "resnet9"
    width: int = 16
    image_size: int = 32
    batch_size: int = 128
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    lr_schedule: str = "triangle"
    warmup_epochs: float = 1.0
    epochs_anchor: int = 5
    anchor_anneal: bool = True
    epochs_more: int = 10
    device: str = "auto"
    seed: int = 0
    pretrained: str | None = None
    num_workers: int = 0
    augment: bool = False
    eval_batch_size: int = 512
    stream: int = 0

    @property
    def total_epochs(self) -> int:
        return int(self.epochs_anchor) + int(self.epochs_more)

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "TrainConfig":
        """Build from a notebook's parameters, ignoring keys that are not config fields."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in {**params, **overrides}.items() if k in names}
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu. ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"parameter `device` must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("parameter `device` is 'cuda' but no CUDA GPU is available; use 'auto' or 'cpu'")
    return torch.device(device)


def lr_at(cfg: TrainConfig, epoch_progress: float) -> float:
    """Learning rate at fractional epoch ``epoch_progress`` in [0, total_epochs].

    ``p = epoch_progress``, ``A = epochs_anchor``, ``T = epochs_anchor +
    epochs_more``, ``w = warmup_epochs``, ``lr`` the peak rate.

    **Anchor, 0 <= p <= A, with ``anchor_anneal`` (default).** The first call has
    its own schedule over the anchor epochs: with ``w_A = min(w, A)``, linear
    warm-up ``lr * p / w_A`` for ``p < w_A``, then with ``f = (p - w_A) / (A - w_A)``
    ``lr * (1 - f)`` (``triangle``) or ``lr * (1 + cos(pi f)) / 2`` (``cosine``).
    It is continuous, equals ``lr`` at ``p = w_A`` and **0 at p = A**: the anchor
    checkpoint ``epoch_<A>.pt`` ends an annealed run, so the per-group
    validation losses that weight D3M, and the checkpoints TRAK featurizes, are
    not taken mid-descent. The last batch of epoch ``A`` (``p = A - 1/n_batches``)
    runs at ``lr / (n_batches * (A - w_A))`` (triangle).

    **Everything else** (``anchor_anneal`` false, or ``p > A``): one curve over
    the full horizon ``T``: warm-up ``lr * p / min(w, T)``, then triangle or
    cosine decay to 0 at ``p = T``. For ``p > A`` after an annealed anchor this
    is a warm restart (the continuation starts at the full-horizon curve's
    value at ``A``); the continuation's schedule belongs to
    :func:`continue_training`. With ``epochs_more = 0`` both parts coincide.

    ``constant``: ``lr`` for every ``p``.
    """
    if cfg.lr_schedule not in SCHEDULES:
        raise ValueError(f"parameter `lr_schedule` must be one of {SCHEDULES}, got {cfg.lr_schedule!r}")
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.anchor_anneal and epoch_progress <= cfg.epochs_anchor:
        return _decay(cfg, epoch_progress, float(cfg.epochs_anchor))
    return _decay(cfg, epoch_progress, float(cfg.total_epochs))


def _decay(cfg: TrainConfig, p: float, horizon: float) -> float:
    """Warm-up over ``min(warmup_epochs, horizon)`` then triangle/cosine decay to 0 at ``horizon``."""
    warm = min(cfg.warmup_epochs, horizon)
    if warm > 0 and p < warm:
        return cfg.lr * p / warm
    frac = (p - warm) / max(horizon - warm, 1e-12)
    frac = min(max(frac, 0.0), 1.0)
    if cfg.lr_schedule == "triangle":
        return cfg.lr * (1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


# ---------------------------------------------------------------- data
class MemmapBatches(torch.utils.data.Dataset):
    """Batches of images read from the uint8 cache (N, px, px) by cache row.

    ``dataset[list_of_positions]`` returns ``(x, y)`` for those positions of
    ``rows``: x float32 (B, 1, px, px) scaled to [0, 1] and normalised, y float32.
    Reading a whole batch at once (rows sorted for the memmap) is what makes
    the loader fast.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, y: np.ndarray | None,
                 cfg: TrainConfig, augment: bool = False):
        if images.ndim != 3:
            raise ValueError(f"image cache must be (N, px, px), got shape {images.shape}")
        if images.shape[1] != cfg.image_size or images.shape[2] != cfg.image_size:
            raise ValueError(f"image cache is {images.shape[1]} px but parameter `image_size` is "
                             f"{cfg.image_size}")
        self.images, self.cfg, self.augment = images, cfg, augment
        self.rows = np.asarray(rows, dtype=np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= len(images)):
            raise IndexError(f"rows must lie in 0..{len(images) - 1} (the image cache), got "
                             f"{self.rows.min()}..{self.rows.max()}")
        self.y = None if y is None else np.asarray(y, dtype=np.float32)
        if self.y is not None and len(self.y) != len(self.rows):
            raise ValueError(f"{len(self.rows)} rows but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, pos) -> tuple[torch.Tensor, torch.Tensor]:
        pos = np.atleast_1d(np.asarray(pos, dtype=np.int64))
        r = self.rows[pos]
        order = np.argsort(r, kind="stable")
        x = np.empty((len(r), *self.images.shape[1:]), dtype=np.uint8)
        x[order] = self.images[r[order]]
        xt = torch.from_numpy(x).unsqueeze(1).float().div_(255.0)
        if self.augment:
            xt = _augment(xt, pos)
        xt = (xt - NORM_MEAN) / NORM_STD
        yt = torch.zeros(len(r)) if self.y is None else torch.from_numpy(self.y[pos])
        return xt, yt


def _augment(x: torch.Tensor, pos: np.ndarray) -> torch.Tensor:
    """Shift by up to 2 px and scale brightness by 0.9..1.1; seeded by batch positions."""
    g = torch.Generator().manual_seed(int(np.sum(pos * 2654435761 % (2 ** 31))) % (2 ** 31))
    b, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2, b), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return (out * (0.9 + 0.2 * torch.rand(b, 1, 1, 1, generator=g))).clamp_(0, 1)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, stream: int = 0) -> list[np.ndarray]:
    """Shuffled positions 0..n-1 for epoch ``epoch``, split into near-equal batches.

    Depends only on (n, batch_size, seed, epoch, stream): an epoch's order is the same
    whether or not earlier epochs ran in the same process. ``ceil(n / batch)``
    batches of nearly equal size: every row is used once, and no batch is so
    small that batch norm breaks. ``stream`` 0 is the default order; another stream
    shuffles independently.
    """
    entropy = [seed, epoch] + ([int(stream)] if stream else [])
    g = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
    perm = torch.randperm(n, generator=g).numpy()
    return np.array_split(perm, max(1, math.ceil(n / batch_size)))


def _loader(ds: MemmapBatches, batches: Sequence[np.ndarray], cfg: TrainConfig, device: torch.device):
    return torch.utils.data.DataLoader(ds, sampler=list(batches), batch_size=None,
                                       num_workers=cfg.num_workers,
                                       pin_memory=device.type == "cuda")


# ---------------------------------------------------------------- model / loss
@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Switch on torch's deterministic algorithms for a block, then restore the setting."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def masked_bce(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean binary cross-entropy over the labels that are not NaN (multi-label scan model)."""
    logits = logits.float().reshape(y.shape)
    mask = ~torch.isnan(y)
    target = torch.nan_to_num(y, nan=0.0)
    if label_smoothing:
        target = target * (1 - label_smoothing) + 0.5 * label_smoothing
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def load_model(cfg: TrainConfig, checkpoint: str | Path, num_outputs: int = 1,
               device: torch.device | str | None = None) -> nn.Module:
    """The architecture of ``cfg`` with the weights of a ``epoch_XX.pt`` state_dict, in eval mode."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    model = build_model(cfg.arch, num_outputs=num_outputs, width=cfg.width)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    dev = resolve_device(cfg.device) if device is None else torch.device(device)
    return model.to(dev).eval()


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _check_labels(y: np.ndarray, num_outputs: int) -> np.ndarray:
    y = np.asarray(y, dtype=np.float32)
    if num_outputs == 1:
        y = y.reshape(-1)
        if np.isnan(y).any():
            raise ValueError(f"{int(np.isnan(y).sum())} labels are NaN: a binary task takes only the "
                             "rows whose label is 0/1 (see task_rows)")
    elif y.ndim != 2 or y.shape[1] != num_outputs:
        raise ValueError(f"multi-label y must be (n, {num_outputs}), got shape {y.shape}")
    bad = ~np.isnan(y) & (y != 0) & (y != 1)
    if bad.any():
        raise ValueError(f"labels must be 0, 1 (or NaN for multi-label), found {np.unique(y[bad])[:5]}")
    return y


# ---------------------------------------------------------------- train / predict
def _training_rows(rows, y, num_outputs: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows as int64 and checked labels; at least 2 rows, one label per row."""
    rows = np.asarray(rows, dtype=np.int64)
    y = _check_labels(y, num_outputs)
    if len(rows) != len(y):
        raise ValueError(f"{len(rows)} rows but {len(y)} labels")
    if len(rows) < 2:
        raise ValueError(f"need at least 2 training rows, got {len(rows)}")
    return rows, y


def _model_and_optimizer(cfg: TrainConfig, num_outputs: int, device, checkpoint, lr: float):
    """A model (fresh, or loaded from ``checkpoint``) on ``device`` and a fresh SGD optimizer at ``lr``."""
    if checkpoint is None:
        model = build_model(cfg.arch, num_outputs=num_outputs, width=cfg.width, pretrained=cfg.pretrained)
        model = model.to(device)
    else:
        model = load_model(cfg, checkpoint, num_outputs, device).train()
    if device.type != "cpu":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                          nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return model, opt


def train(cfg: TrainConfig, images: np.ndarray, rows, y, epochs, out_dir: str | Path,
          init_checkpoint: str | Path | None = None, val=None, num_outputs: int = 1,
          progress: bool = True) -> pd.DataFrame:
    """Train epochs ``start+1 .. end`` and save ``out_dir/epoch_{ee:02d}.pt`` after each.

    epochs: ``(start, end)`` or ``range(start + 1, end + 1)`` (1-based epoch
      numbers). ``(0, 5)`` is the anchor call from scratch (or from
      ``cfg.pretrained``); ``(5, 15)`` with ``init_checkpoint=<dir>/epoch_05.pt``
      is the continuation call. Every call starts a fresh SGD optimizer
      (Nesterov momentum) whose learning rate follows :func:`lr_at` over the
      full horizon; ``start > 0`` requires ``init_checkpoint``.
    rows, y: cache rows of the training images and their labels (0/1; for
      ``num_outputs > 1`` an (n, k) array with NaN where a label is missing).
    val: ``(rows, y, groups)`` or None; evaluated after every epoch.

    Returns the history of this call (epoch, lr at the epoch's end,
    train_loss (mean over the epoch's batches), val_loss, val_acc (at
    probability 0.5), val_auroc, val_worst_group_acc) and writes ``history.csv`` in
    ``out_dir``, keeping rows of earlier epochs written there by a previous call.
    """
    from tqdm.auto import tqdm

    start, end = _epoch_span(epochs, cfg)
    if start > 0 and init_checkpoint is None:
        raise ValueError(f"epochs start at {start + 1}: pass init_checkpoint (e.g. epoch_{start:02d}.pt)")
    rows, y = _training_rows(rows, y, num_outputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    cpu = device.type == "cpu"

    with _deterministic(cpu):
        torch.manual_seed(cfg.seed)
        model, opt = _model_and_optimizer(cfg, num_outputs, device, init_checkpoint, lr_at(cfg, start))
        ds = MemmapBatches(images, rows, y, cfg, augment=cfg.augment)
        records = []
        bar = tqdm(range(start + 1, end + 1), desc=f"train {out_dir.name}", disable=not progress,
                   leave=False)
        for epoch in bar:
            model.train()
            batches = epoch_batches(len(rows), cfg.batch_size, cfg.seed, epoch)
            total, count = 0.0, 0
            for b, (xb, yb) in enumerate(_loader(ds, batches, cfg, device)):
                total += _sgd_step(model, opt, xb, yb, lr_at(cfg, epoch - 1 + b / len(batches)), cfg, device)
                count += len(yb)
            rec = {"epoch": epoch, "lr": lr_at(cfg, epoch), "train_loss": total / count}
            if val is not None:
                rec.update(evaluate(model, cfg, images, *val, num_outputs=num_outputs))
            records.append(rec)
            _save_atomic(model.state_dict(), out_dir / f"epoch_{epoch:02d}.pt")
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}")
    hist = pd.DataFrame(records)
    _append_history(out_dir / "history.csv", hist, start)
    return hist


def continuation_steps(cfg: TrainConfig, n_train: int) -> int:
    """The continuation's step budget: what ERM takes over ``epochs_more`` passes of ``n_train`` rows.

    Every arm (continued ERM, D3M, the controls) gets this many optimizer steps,
    whatever its kept count: ``epochs_more * ceil(n_train / batch_size)`` with
    ``n_train`` the finding's full training set.
    """
    return int(cfg.epochs_more) * max(1, math.ceil(int(n_train) / cfg.batch_size))


def continue_lr_at(cfg: TrainConfig, step: float, total_steps: int) -> float:
    """Learning rate of the continuation at ``step`` of ``total_steps`` (a warm restart).

    Independent of the anchor's schedule (:func:`lr_at`): the continuation restarts
    at step 0 with a linear warm-up to ``lr`` over ``warmup_epochs / epochs_more``
    of the budget, then decays to 0 at ``total_steps`` (``triangle``: linearly,
    ``cosine``: cosine) or stays at ``lr`` (``constant``). Same curve for every arm,
    because every arm has the same ``total_steps``.
    """
    if cfg.lr_schedule not in SCHEDULES:
        raise ValueError(f"parameter `lr_schedule` must be one of {SCHEDULES}, got {cfg.lr_schedule!r}")
    if cfg.lr_schedule == "constant":
        return cfg.lr
    total = max(int(total_steps), 1)
    warm = total * min(cfg.warmup_epochs / max(cfg.epochs_more, 1), 1.0)
    if warm > 0 and step < warm:
        return cfg.lr * step / warm
    frac = min(max((step - warm) / max(total - warm, 1e-12), 0.0), 1.0)
    if cfg.lr_schedule == "triangle":
        return cfg.lr * (1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def continuation_batches(n_rows: int, cfg: TrainConfig, steps: int) -> list[np.ndarray]:
    """The sampling rule: ``steps`` batches of positions 0..n_rows-1.

    Reshuffled passes over the kept rows, one after another (pass ``p`` is
    :func:`epoch_batches` of epoch ``epochs_anchor + 1 + p`` in ``cfg.stream``), cut at
    ``steps``: an arm with fewer rows sees each of them more often, the last pass may be
    partial. For all rows of the finding this is exactly ``epochs_more`` epochs.
    """
    out: list[np.ndarray] = []
    p = 0
    while len(out) < steps:
        out.extend(epoch_batches(n_rows, cfg.batch_size, cfg.seed, cfg.epochs_anchor + 1 + p, cfg.stream))
        p += 1
    return out[:steps]


def checkpoint_steps(cfg: TrainConfig, steps: int) -> dict[int, int]:
    """``{epoch: step}``: the continuation saves ``epoch_<anchor+j>.pt`` after ``round(steps j / epochs_more)``."""
    e = max(int(cfg.epochs_more), 1)
    return {cfg.epochs_anchor + j: int(round(steps * j / e)) for j in range(1, e + 1)}


def continue_training(cfg: TrainConfig, images: np.ndarray, rows, y, anchor_checkpoint: str | Path,
                      out_dir: str | Path, val=None, num_outputs: int = 1, progress: bool = True,
                      steps: int | None = None, n_reference: int | None = None, weights=None,
                      dro_groups=None, dro_eta: float = 0.0) -> pd.DataFrame:
    """The second call of the schedule, with an equal step budget for every arm.

    From ``anchor_checkpoint`` (the baseline's ``epoch_05.pt``), a fresh SGD
    optimizer takes ``steps`` optimizer steps (default :func:`continuation_steps`
    of ``n_reference`` rows, itself defaulting to ``len(rows)``) on batches of
    ``rows`` drawn by :func:`continuation_batches`, with the warm-restart
    schedule :func:`continue_lr_at`. Continued ERM passes all training rows; D3M
    and the controls pass their kept rows and ``n_reference`` = all training rows,
    so every arm trains for the same steps with the same learning rates.

    Saves ``epoch_<anchor+j>.pt`` at each 1/epochs_more of the budget (the last,
    ``epoch_<anchor+epochs_more>.pt``, is the final model) and appends one
    history row per checkpoint (``epoch``, ``step``, ``lr``, ``train_loss`` over
    the steps since the previous checkpoint, ``n_rows``, validation metrics) to
    ``history.csv``.

    ``weights`` (a loss weight per row) or ``dro_groups`` (a group code per row, with step size
    ``dro_eta``) change the loss (:func:`d3m_lib.objectives.batch_loss`); neither changes the
    batches, the steps or the learning rates.
    """
    from tqdm.auto import tqdm

    from .objectives import GroupDRO

    rows, y = _training_rows(rows, y, num_outputs)
    if cfg.epochs_more < 1:
        raise ValueError("continue_training needs epochs_more >= 1")
    steps = continuation_steps(cfg, len(rows) if n_reference is None else n_reference) if steps is None \
        else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not Path(anchor_checkpoint).is_file():
        raise FileNotFoundError(f"anchor checkpoint not found: {anchor_checkpoint}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    cpu = device.type == "cpu"
    marks = checkpoint_steps(cfg, steps)
    batches = continuation_batches(len(rows), cfg, steps)
    for name, v in (("weights", weights), ("dro_groups", dro_groups)):
        if v is not None and len(v) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(v)} {name}")
    w_t = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float32))
    g_t = None if dro_groups is None else torch.as_tensor(np.asarray(dro_groups, dtype=np.int64))
    dro = None if g_t is None else GroupDRO(int(g_t.max()) + 1, dro_eta)
    with _deterministic(cpu):
        torch.manual_seed(cfg.seed)
        model, opt = _model_and_optimizer(cfg, num_outputs, device, anchor_checkpoint,
                                          continue_lr_at(cfg, 0, steps))
        ds = MemmapBatches(images, rows, y, cfg, augment=cfg.augment)
        records, total, count, done = [], 0.0, 0, 0

        def save_due():
            nonlocal total, count
            for epoch, at in marks.items():
                if at == done:
                    rec = {"epoch": epoch, "step": done, "lr": continue_lr_at(cfg, done, steps),
                           "train_loss": total / count if count else float("nan"), "n_rows": len(rows)}
                    if val is not None:
                        rec.update(evaluate(model, cfg, images, *val, num_outputs=num_outputs))
                    records.append(rec)
                    _save_atomic(model.state_dict(), out_dir / f"epoch_{epoch:02d}.pt")
                    total, count = 0.0, 0

        save_due()  # a mark at step 0 (fewer steps than epochs_more) saves the anchor itself
        model.train()
        bar = tqdm(total=steps, desc=f"continue {out_dir.name}", disable=not progress, leave=False)
        for pos, (xb, yb) in zip(batches, _loader(ds, batches, cfg, device)):
            obj = None if w_t is None and dro is None else dict(
                weights=None if w_t is None else w_t[pos], dro=dro, groups=None if g_t is None else g_t[pos])
            total += _sgd_step(model, opt, xb, yb, continue_lr_at(cfg, done, steps), cfg, device, obj)
            count += len(yb)
            done += 1
            bar.update(1)
            if done in marks.values():
                save_due()
                model.train()
        bar.close()
    hist = pd.DataFrame(records).sort_values("epoch", kind="stable").reset_index(drop=True)
    _append_history(out_dir / "history.csv", hist, cfg.epochs_anchor)
    return hist


def keep_checkpoints(out_dir: str | Path, epochs) -> None:
    """Delete every ``epoch_*.pt`` in ``out_dir`` but those of ``epochs``."""
    keep = {f"epoch_{int(e):02d}.pt" for e in epochs}
    for f in Path(out_dir).glob("epoch_*.pt"):
        if f.name not in keep:
            f.unlink()


def retrain(cfg: TrainConfig, images: np.ndarray, rows, y, anchor, out_dir: str | Path, va, te,
            steps: int, weights=None, dro_groups=None, dro_eta: float = 0.0) -> None:
    """One retrained arm (a grid task of stage 05): :func:`continue_training` from ``anchor`` on ``rows``.

    ``steps`` optimizer steps in ``cfg.stream``; keeps only the final checkpoint and writes
    ``preds_validate.parquet`` and ``preds_test.parquet`` (``va``, ``te``: :func:`task_rows`
    tuples) into ``out_dir``. The history holds training losses only: the intermediate
    checkpoints are not kept, so they are not evaluated. ``weights``, ``dro_groups``, ``dro_eta``:
    an arm's objective (:mod:`d3m_lib.objectives`), per row.
    """
    out = Path(out_dir)
    continue_training(cfg, images, rows, y, anchor, out, val=None, progress=False, steps=steps, weights=weights,
                      dro_groups=dro_groups, dro_eta=dro_eta)
    keep_checkpoints(out, [cfg.total_epochs])  # the final model only
    model = load_model(cfg, out / f"epoch_{cfg.total_epochs:02d}.pt")
    for split, (r, yy, groups) in (("validate", va), ("test", te)):
        predictions_frame(r, split, groups, yy, predict(model, cfg, images, r)).to_parquet(
            out / f"preds_{split}.parquet")


def _sgd_step(model: nn.Module, opt, xb: torch.Tensor, yb: torch.Tensor, lr: float, cfg: TrainConfig,
              device: torch.device, objective: dict | None = None) -> float:
    """One optimizer step at learning rate ``lr``; returns the batch's summed loss.

    ``objective``: keyword arguments of :func:`d3m_lib.objectives.batch_loss` (weights, dro, groups)."""
    from .objectives import batch_loss

    for group in opt.param_groups:
        group["lr"] = lr
    xb, yb = _to(xb, device), yb.to(device, non_blocking=True)
    with _autocast(device):
        logits = model(xb)
    loss = (masked_bce(logits, yb, cfg.label_smoothing) if objective is None
            else batch_loss(logits, yb, cfg.label_smoothing, **objective))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()) * len(yb)


def _epoch_span(epochs, cfg: TrainConfig) -> tuple[int, int]:
    if isinstance(epochs, range):
        if len(epochs) == 0 or epochs.step != 1:
            raise ValueError(f"epochs must be a non-empty range with step 1, got {epochs}")
        start, end = epochs.start - 1, epochs.stop - 1
    else:
        start, end = (int(e) for e in epochs)
    if not 0 <= start < end <= cfg.total_epochs:
        raise ValueError(f"epochs ({start}, {end}) must satisfy 0 <= start < end <= "
                         f"epochs_anchor + epochs_more = {cfg.total_epochs}")
    return start, end


def _append_history(path: Path, hist: pd.DataFrame, start: int) -> None:
    if path.exists():
        old = pd.read_csv(path)
        hist = pd.concat([old[old["epoch"] <= start], hist], ignore_index=True)
    hist.to_csv(path, index=False)


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


@torch.no_grad()
def predict(model_or_checkpoint, cfg: TrainConfig, images: np.ndarray, rows,
            num_outputs: int = 1) -> np.ndarray:
    """Logits (float32; shape (n,) for one output, (n, k) otherwise) for cache ``rows``, in order."""
    if isinstance(model_or_checkpoint, (str, Path)):
        model = load_model(cfg, model_or_checkpoint, num_outputs=num_outputs)
    else:
        model = model_or_checkpoint
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ds = MemmapBatches(images, np.asarray(rows, dtype=np.int64), None, cfg)
    n = len(ds)
    batches = np.array_split(np.arange(n), max(1, math.ceil(n / cfg.eval_batch_size))) if n else []
    out = []
    for xb, _ in _loader(ds, batches, cfg, device):
        with _autocast(device):
            out.append(model(_to(xb, device)).float().cpu())
    model.train(was_training)
    logits = torch.cat(out).numpy() if out else np.zeros((0, num_outputs), np.float32)
    return logits.reshape(-1) if num_outputs == 1 else logits


def evaluate(model: nn.Module, cfg: TrainConfig, images: np.ndarray, rows, y, groups=None,
             num_outputs: int = 1, min_group_n: int = 1) -> dict:
    """Validation loss, accuracy at probability 0.5, AUROC (mean over outputs with both classes),
    and worst-group accuracy when ``groups`` is given.

    Accuracy, AUROC and worst-group accuracy come from :mod:`d3m_lib.metrics`
    (the study's one engine); with several outputs, accuracy pools every
    labelled (image, output) pair. Worst group: groups with at least
    ``min_group_n`` labelled pairs (the one rule).
    """
    from .metrics import GroupMetrics, metric_value

    y = np.asarray(y, dtype=np.float32).reshape(len(rows), -1)
    logits = predict(model, cfg, images, rows, num_outputs).reshape(len(rows), -1)
    loss = float(masked_bce(torch.tensor(logits), torch.tensor(y)))   # copies: y may be a read-only view
    mask = ~np.isnan(y)
    yl, pl = y[mask].astype(int), (logits[mask] > 0).astype(int)  # prob > 0.5
    acc = metric_value("accuracy", yl, pl) if mask.any() else float("nan")
    aucs = [metric_value("auroc", y[mask[:, k], k], prob=logits[mask[:, k], k]) for k in range(y.shape[1])]
    aucs = [a for a in aucs if np.isfinite(a)]
    rec = {"val_loss": loss, "val_acc": acc, "val_auroc": float(np.mean(aucs)) if aucs else float("nan")}
    if groups is not None:
        g = np.broadcast_to(np.asarray(groups).astype(str)[:, None], y.shape)[mask]
        if mask.any():
            gm = GroupMetrics(yl, logits[mask], pl, g, n_boot=0, min_group_n=min_group_n)
            rec["val_worst_group_acc"] = float(gm.worst("accuracy").loc[0, "value"]) if gm.eligible else float("nan")
        else:
            rec["val_worst_group_acc"] = float("nan")
    return rec


# ---------------------------------------------------------------- cohort helpers
def finding_dirname(finding: str) -> str:
    """A finding's folder name: spaces -> '_'."""
    return finding.replace(" ", "_")


def task_rows(cohort: pd.DataFrame, finding: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, y, groups)`` of one split for one finding's binary task (NaN labels left out)."""
    for col in ("row", "split", "group", finding):
        if col not in cohort.columns:
            raise KeyError(f"cohort table has no column '{col}'")
    sub = cohort[(cohort["split"] == split) & cohort[finding].notna()]
    return (sub["row"].to_numpy(np.int64), sub[finding].to_numpy(np.float32),
            sub["group"].astype(str).to_numpy())


def predictions_frame(rows, split: str, groups, y, logits) -> pd.DataFrame:
    """The predictions table of ARCHITECTURE.md: row, split, group, y, logit, prob."""
    logits = np.asarray(logits, dtype=np.float64)
    return pd.DataFrame({
        "row": np.asarray(rows, dtype=np.int64), "split": split, "group": np.asarray(groups).astype(str),
        "y": np.asarray(y).astype(np.int64), "logit": logits, "prob": 1.0 / (1.0 + np.exp(-logits)),
    })


def baseline_anchor(cfg: TrainConfig, images: np.ndarray, tr, va, out_dir: str | Path,
                    progress: bool = False) -> None:
    """The baseline's first call (a grid task): epochs 1..``epochs_anchor`` from scratch on ``tr``.

    ``tr``, ``va``: :func:`task_rows` tuples ``(rows, y, groups)`` of train and validate. Writes
    ``epoch_01..<A>.pt`` and ``history.csv`` into ``out_dir``.
    """
    train(cfg, images, tr[0], tr[1], (0, cfg.epochs_anchor), out_dir, val=va, progress=progress)


def baseline_rest(cfg: TrainConfig, images: np.ndarray, tr, va, te, out_dir: str | Path,
                  threshold_rule: str = "youden", progress: bool = False) -> dict:
    """The baseline's second part (a grid task after :func:`baseline_anchor`).

    Continued ERM from ``epoch_<A>.pt`` (when ``epochs_more`` > 0), predictions of the anchor
    and the last epoch on validate and test (``preds_<split>_epoch<ee>.parquet``), and each
    one's threshold chosen on validate (``threshold.json``). Returns ``{epoch: threshold}``.
    """
    from .metrics import choose_threshold

    out = Path(out_dir)
    ea, et = cfg.epochs_anchor, cfg.total_epochs
    if cfg.epochs_more > 0:
        continue_training(cfg, images, tr[0], tr[1], out / f"epoch_{ea:02d}.pt", out, val=va,
                          progress=progress)
    thresholds = {}
    for epoch in sorted({ea, et}):
        model = load_model(cfg, out / f"epoch_{epoch:02d}.pt")
        for split, (rows, y, groups) in (("validate", va), ("test", te)):
            predictions_frame(rows, split, groups, y, predict(model, cfg, images, rows)).to_parquet(
                out / f"preds_{split}_epoch{epoch:02d}.parquet")
        pv = pd.read_parquet(out / f"preds_validate_epoch{epoch:02d}.parquet")
        thresholds[str(epoch)] = choose_threshold(pv["y"].to_numpy(), pv["prob"].to_numpy(), threshold_rule)
    info = {"rule": threshold_rule, "split": "validate", "epoch": et, "threshold": thresholds[str(et)],
            "by_epoch": thresholds}
    (out / "threshold.json").write_text(json.dumps(info, indent=2))
    return thresholds


def baseline_files(cfg: TrainConfig) -> dict[str, tuple[str, ...]]:
    """What each part of the baseline writes (its step counts as done only while they exist)."""
    ea, et = cfg.epochs_anchor, cfg.total_epochs
    return {"anchor": (f"epoch_{ea:02d}.pt",),
            "more": (f"epoch_{et:02d}.pt", "threshold.json",
                     *(f"preds_{s}_epoch{e:02d}.parquet" for s in ("validate", "test") for e in sorted({ea, et})))}


def run_baseline(cfg: TrainConfig, images: np.ndarray, cohort: pd.DataFrame, finding: str,
                 out_dir: str | Path, threshold_rule: str = "youden", progress: bool = True,
                 log=None) -> dict:
    """One finding, one seed (``cfg.seed``), in this process: :func:`baseline_anchor` then :func:`baseline_rest`.

    Writes into ``out_dir`` (``03_baseline/<finding>/seed<s>``): epoch_01..15.pt,
    history.csv, preds_{validate,test}_epoch{05,15}.parquet, threshold.json.
    ``log``: a step record (``Stage.steps(...)``, the run folder's resume mechanism);
    with it a finished anchor (``anchor``) or continuation with predictions (``more``) is
    not repeated. This is exact because the continuation always starts from ``epoch_05.pt``
    with a fresh optimizer. Without it everything is computed. Stage 03 runs the same two
    parts as grid tasks (:mod:`d3m_lib.grid`). Returns ``{"resumed": [...], "threshold": ...,
    "thresholds": {epoch: threshold}}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tr, va, te = (task_rows(cohort, finding, s) for s in ("train", "validate", "test"))
    files = baseline_files(cfg)
    resumed = []

    def done(step):
        return log is not None and log.done(step, files=tuple(out / f for f in files[step]))

    if done("anchor"):
        resumed.append("anchor")
    else:
        if log is not None:
            log.forget("more")
        baseline_anchor(cfg, images, tr, va, out, progress=progress)
        if log is not None:
            log.mark("anchor")
    if done("more"):
        resumed.append("more")
        thresholds = json.loads((out / "threshold.json").read_text())["by_epoch"]
    else:
        thresholds = baseline_rest(cfg, images, tr, va, te, out, threshold_rule, progress=progress)
        if log is not None:
            log.mark("more")
    return {"resumed": resumed, "threshold": thresholds[str(cfg.total_epochs)], "thresholds": thresholds}
