"""Control selections a sceptical reviewer asks for: random removal, balanced subsampling.

Each returns a kept mask (bool Series indexed by training row, True = keep) and is
deterministic for a seed. Random removal takes out as many images as D3M did, so any
gain of D3M over it comes from *which* images it removed. Group- and label-balanced
subsampling need labels on the training images (group balancing needs the protected
group of every training image, which D3M itself never uses).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _mask(train_rows, keep_pos: np.ndarray) -> pd.Series:
    kept = np.zeros(len(train_rows), dtype=bool)
    kept[keep_pos] = True
    return pd.Series(kept, index=pd.Index(np.asarray(train_rows), name="row"), name="kept")


def random_removal(train_rows, n_remove: int, seed: int | tuple[int, ...]) -> pd.Series:
    """Remove ``n_remove`` training images uniformly at random (``seed``: a seed or a seed sequence)."""
    n = len(train_rows)
    if not 0 <= int(n_remove) <= n:
        raise ValueError(f"random_removal: n_remove={n_remove} not in [0, {n}]")
    rng = np.random.default_rng(seed)
    drop = rng.choice(n, size=int(n_remove), replace=False)
    return _mask(train_rows, np.setdiff1d(np.arange(n), drop))


def _balanced(train_rows, labels, seed: int | tuple[int, ...], what: str) -> pd.Series:
    labels = np.asarray(labels, dtype=object)
    if len(labels) != len(train_rows):
        raise ValueError(f"{what}: {len(train_rows)} rows but {len(labels)} labels")
    if pd.isna(labels).any():
        raise ValueError(f"{what}: {int(pd.isna(labels).sum())} training images have no label")
    rng = np.random.default_rng(seed)
    values, counts = np.unique(labels.astype(str), return_counts=True)
    m = counts.min()
    keep = [rng.choice(np.flatnonzero(labels.astype(str) == v), size=m, replace=False)
            for v in values]
    return _mask(train_rows, np.sort(np.concatenate(keep)))


def group_balanced(train_rows, train_groups, seed: int | tuple[int, ...]) -> pd.Series:
    """Subsample every group to the smallest group's size (needs training group labels)."""
    return _balanced(train_rows, train_groups, seed, "group_balanced")


def label_balanced(train_rows, train_labels, seed: int) -> pd.Series:
    """Subsample each class (0/1) to the smaller class's size."""
    return _balanced(train_rows, train_labels, seed, "label_balanced")
