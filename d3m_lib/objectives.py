"""An arm's training objective: which training images it uses, how often, and with what loss.

A method's select hook (:mod:`d3m_lib.methods`) returns a kept mask (plain ERM on the kept
images) or a :class:`Plan`. Every retrained arm continues from the same anchor for the same
optimizer steps (:func:`d3m_lib.training.continue_training`); a plan changes only

- ``kept``: images removed (D3M, the controls, the loss filter);
- ``repeats``: how often an image appears in each pass (JTT's upsampling of the error set);
- ``weights``: a per-image loss weight, mean 1 over the kept images (reweighting, RWG);
- ``dro_groups`` and ``dro_eta``: GroupDRO's groups and the step size of its online group weights;
- ``dfr_c``: DFR, which trains no weights by SGD: the last layer of continued ERM is refitted by
  L1 logistic regression on group-balanced subsamples of half the validation patients
  (:func:`dfr`), for every C in the grid at once.

:func:`batch_loss` is the one loss of a continuation step.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

DFR_SUBSAMPLES = 10   # the DFR paper averages the last layer over 10 group-balanced subsamples


@dataclass
class Plan:
    """How one arm trains on the finding's training images (arrays: one entry per training image)."""

    kept: np.ndarray
    repeats: np.ndarray | None = None
    weights: np.ndarray | None = None
    dro_groups: np.ndarray | None = None
    dro_eta: float = 0.0
    dfr_c: tuple | None = None

    def __post_init__(self):
        self.kept = np.asarray(self.kept, dtype=bool)
        n = len(self.kept)
        for name in ("repeats", "weights", "dro_groups"):
            v = getattr(self, name)
            if v is not None and np.shape(v) != (n,):
                raise ValueError(f"plan field {name!r} has shape {np.shape(v)}, expected ({n},)")
        if self.repeats is not None:
            self.repeats = np.asarray(self.repeats, dtype=np.int64)
            if (self.repeats < 1).any():
                raise ValueError("plan repeats must be >= 1 (remove an image with kept=False)")
        if self.weights is not None:
            self.weights = np.asarray(self.weights, dtype=np.float64)
            if not np.isfinite(self.weights).all() or (self.weights <= 0).any():
                raise ValueError("plan weights must be finite and positive")
        if self.dro_groups is not None:
            self.dro_groups = np.asarray(self.dro_groups, dtype=np.int64)

    @property
    def plain(self) -> bool:
        """Plain ERM on the kept images (no repeats, weights, group loss or last-layer refit)."""
        return self.repeats is None and self.weights is None and self.dro_groups is None and self.dfr_c is None

    def positions(self) -> np.ndarray:
        """Positions (into the training images) of one pass: kept images, each ``repeats`` times."""
        reps = self.kept.astype(np.int64) * (1 if self.repeats is None else self.repeats)
        return np.repeat(np.arange(len(self.kept)), reps)

    def signature(self) -> str:
        """A hash of everything that changes the trained model (the grid's resume key)."""
        h = hashlib.sha256(np.packbits(self.kept).tobytes() + len(self.kept).to_bytes(8, "little"))
        if not self.plain:
            for v in (self.repeats, self.weights, self.dro_groups):
                h.update(b"-" if v is None else np.ascontiguousarray(v).tobytes())
            h.update(json.dumps([self.dro_eta, list(self.dfr_c or ())]).encode())
        return h.hexdigest()


def as_plan(selected, n: int, name: str) -> Plan:
    """A select hook's answer (a kept mask or a :class:`Plan`) as a :class:`Plan` over ``n`` images."""
    plan = selected if isinstance(selected, Plan) else Plan(
        np.asarray(selected.to_numpy() if isinstance(selected, pd.Series) else selected, dtype=bool))
    if plan.kept.shape != (n,):
        raise ValueError(f"method {name!r}: kept mask has shape {plan.kept.shape}, expected ({n},)")
    return plan


# -- group x label cells, the unit of RWG, GroupDRO and DFR -------------------------------------
def cells(groups, y) -> np.ndarray:
    """Integer code of each image's (group, label) cell, codes in sorted cell order."""
    key = pd.Series(np.asarray(groups).astype(str)) + "|" + pd.Series(np.asarray(y).astype(int).astype(str))
    return pd.factorize(key, sort=True)[0].astype(np.int64)


def inverse_cell_weights(groups, y) -> np.ndarray:
    """RWG: weight of each image proportional to 1 / (size of its group x label cell), mean 1."""
    c = cells(groups, y)
    w = 1.0 / np.bincount(c)[c]
    return w / w.mean()


# -- the loss of one continuation step ----------------------------------------------------------
class GroupDRO:
    """Sagawa et al. (2020), Algorithm 1: q_g <- q_g exp(eta * loss_g), normalised; loss = sum_g q_g loss_g.

    ``loss_g`` is the batch mean of group ``g`` (0 for a group absent from the batch, as in the
    authors' code). Starts uniform.
    """

    def __init__(self, n_groups: int, eta: float):
        self.q = torch.full((int(n_groups),), 1.0 / int(n_groups))
        self.eta = float(eta)

    def __call__(self, per_example: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        n = len(self.q)
        count = torch.bincount(g, minlength=n).float()
        loss_g = torch.zeros(n, dtype=per_example.dtype).index_add_(0, g, per_example) / count.clamp(min=1)
        with torch.no_grad():
            self.q = self.q * torch.exp(self.eta * loss_g.detach())
            self.q = self.q / self.q.sum()
        return (self.q * loss_g).sum()


def batch_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
               weights: torch.Tensor | None = None, dro: GroupDRO | None = None,
               groups: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of one batch: the mean, the ``weights``-weighted mean (RWG) or GroupDRO's."""
    logits = logits.float().reshape(y.shape)
    target = y * (1 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else y
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if dro is not None:
        return dro(per.cpu(), groups.cpu()).to(per.device)
    if weights is not None:
        return (per * weights.to(per.device, per.dtype)).mean()
    return per.mean()


# -- DFR ------------------------------------------------------------------------------------------
def dfr_halves(rows, subjects, seed) -> tuple[np.ndarray, np.ndarray]:
    """DFR's two disjoint halves of the validation images, split by patient: (fit, tune) boolean masks.

    Patients are shuffled by ``seed`` (an int or a tuple of ints); the first half of them is fitted on.
    """
    subjects = np.asarray(subjects).astype(str)
    if len(subjects) != len(rows):
        raise ValueError(f"{len(rows)} validation rows but {len(subjects)} patient ids")
    pats = np.unique(subjects)
    if len(pats) < 2:
        raise ValueError("DFR needs at least 2 validation patients to split into a fitting and a tuning half")
    perm = np.random.default_rng(np.random.SeedSequence(list(np.atleast_1d(seed)))).permutation(pats)
    fit = np.isin(subjects, perm[: len(pats) // 2])
    return fit, ~fit


def _balanced_subsample(c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions of an equal number of images from every cell present (the smallest cell's size)."""
    present = np.unique(c)
    m = min(int((c == k).sum()) for k in present)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(c == k), m, replace=False) for k in present]))


def _l1_argument() -> dict:
    import sklearn

    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}   # 1.8 deprecates `penalty`


_L1 = _l1_argument()


def fit_last_layer(X: np.ndarray, y, groups, C: float, seed, n_subsamples: int = DFR_SUBSAMPLES
                   ) -> tuple[np.ndarray, float]:
    """DFR's last layer: L1 logistic regression at strength ``C`` on standardised ``X``, fitted on
    ``n_subsamples`` group x label balanced subsamples and averaged (coefficients, intercept)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y).astype(int)
    c = cells(groups, y)
    if len(np.unique(y)) < 2:
        raise ValueError("DFR's fitting half has only one label; it needs positives and negatives")
    rng = np.random.default_rng(np.random.SeedSequence(list(np.atleast_1d(seed))))
    coefs, icpts = [], []
    for _ in range(int(n_subsamples)):
        pos = _balanced_subsample(c, rng)
        lr = LogisticRegression(C=float(C), solver="liblinear", max_iter=1000,   # liblinear shuffles: seed it
                                random_state=int(rng.integers(2 ** 31)), **_L1)
        lr.fit(X[pos], y[pos])
        coefs.append(lr.coef_[0])
        icpts.append(lr.intercept_[0])
    return np.mean(coefs, axis=0), float(np.mean(icpts))


@torch.no_grad()
def features(model: torch.nn.Module, cfg, images: np.ndarray, rows) -> np.ndarray:
    """Penultimate-layer features (the input of the model's last linear layer) of cache ``rows``."""
    from . import models, training

    body = models.body(model).eval()
    ds = training.MemmapBatches(images, np.asarray(rows, dtype=np.int64), None, cfg)
    n = len(ds)
    batches = np.array_split(np.arange(n), max(1, -(-n // cfg.eval_batch_size)))
    device = next(model.parameters()).device
    return torch.cat([body(xb.to(device)).float().cpu() for xb, _ in training._loader(ds, batches, cfg, device)]
                     ).numpy()


def dfr(cfg, images: np.ndarray, erm_checkpoint, fit, tune, te, grid_c, out_dir, stream_seed) -> dict:
    """DFR (Kirichenko et al. 2023), a grid task: last layer of ``erm_checkpoint`` refitted on ``fit``.

    ``fit``, ``tune``, ``te``: ``(rows, y, groups)`` of the fitting half of validation, the tuning half
    and the test set (:func:`dfr_halves`; DFR never fits on ``tune`` or ``te``). For every C in
    ``grid_c`` writes ``preds_validate_C<i>.parquet`` (the tuning half) and ``preds_test_C<i>.parquet``.
    """
    from . import training

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = training.load_model(cfg, erm_checkpoint)
    X = {k: features(model, cfg, images, part[0]) for k, part in (("fit", fit), ("tune", tune), ("test", te))}
    mu, sd = X["fit"].mean(0), X["fit"].std(0) + 1e-8
    X = {k: (v - mu) / sd for k, v in X.items()}
    info = {"n_fit": len(fit[0]), "n_tune": len(tune[0]), "C": list(map(float, grid_c))}
    for i, C in enumerate(grid_c):
        w, b = fit_last_layer(X["fit"], fit[1], fit[2], C, [*np.atleast_1d(stream_seed), i])
        for split, key, part in (("validate", "tune", tune), ("test", "test", te)):
            training.predictions_frame(part[0], split, part[2], part[1], X[key] @ w + b).to_parquet(
                out / f"preds_{split}_C{i}.parquet")
    (out / "dfr.json").write_text(json.dumps(info))
    return info


def stream(*parts) -> tuple[int, ...]:
    """An entropy tuple from ints and names (names hashed by crc32): one random stream per use."""
    return tuple(int(p) if not isinstance(p, str) else zlib.crc32(p.encode()) for p in parts)
