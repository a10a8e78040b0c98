"""D3M (Data Debiasing with Datamodels): group alignment scores, selection, Auto-D3M.

Jain, Hamidieh, Georgiev, Ilyas, Ghassemi, Madry (2024), "Improving subgroup robustness
via data selection". From TRAK scores ``T[i, z]`` of training image ``i`` on validation
image ``z``, the group coefficient is ``tau(g)_i = mean_{z in g} T[i, z]`` and the group
alignment score weights groups by the base model's validation loss ``l_g``:

- ``weighting="softmax"`` (the source study):
  ``A_i = sum_g exp(beta l_g) tau(g)_i / sum_g' exp(beta l_g')``
- ``weighting="linear"`` (the public D3M code): ``A_i = mean_g l_g tau(g)_i``

Images with negative alignment pull the margins of high-loss groups down; D3M removes
them (``A_i < 0``) or the ``k`` lowest. Group labels are used on validation images only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

WEIGHTINGS = ("softmax", "linear")
RULES = ("negative", "k_lowest")
SELECTIONS = ("validated_k",) + RULES   # validated_k: k_lowest with k chosen on validation (stage 05)


def image_losses(y, logits) -> np.ndarray:
    """Binary cross-entropy of each image's logit against its 0/1 label (numerically stable)."""
    margin = (2 * np.asarray(y, dtype=np.float64) - 1) * np.asarray(logits, dtype=np.float64)
    return np.logaddexp(0.0, -margin)


def group_losses(y, logits, groups) -> pd.Series:
    """Mean binary cross-entropy of a model's logits per group (index = group, sorted)."""
    y = np.asarray(y, dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    groups = np.asarray(groups, dtype=object)
    if not (len(y) == len(logits) == len(groups)):
        raise ValueError(f"group_losses: lengths differ (y {len(y)}, logits {len(logits)}, "
                         f"groups {len(groups)})")
    if np.isnan(y).any() or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("group_losses: y must be 0/1 without NaN")
    return pd.Series(image_losses(y, logits)).groupby(groups).mean().sort_index().rename("loss")


GROUPINGS = ("race", "race_x_label")


def d3m_groups(groups, y, how: str = "race") -> np.ndarray:
    """The groups D3M weighs: ``race`` (the protected group) or ``race_x_label``.

    ``race_x_label`` crosses the group with the 0/1 label (``"Black | y=1"``), as the
    D3M paper's (class, attribute) groups: the weighting can then aim at, say, the
    positive images of one group (underdiagnosis).
    """
    groups = np.asarray(groups).astype(str)
    if how == "race":
        return groups
    if how != "race_x_label":
        raise ValueError(f"d3m_groups={how!r}; expected one of {GROUPINGS}")
    y = np.asarray(y, dtype=np.float64)
    if len(y) != len(groups) or np.isnan(y).any():
        raise ValueError("d3m_groups: race_x_label needs a 0/1 label for every image")
    return np.array([f"{g} | y={int(v)}" for g, v in zip(groups, y)], dtype=object)


def group_weights(group_loss: pd.Series, weighting: str = "softmax", beta: float = 1.0) -> pd.Series:
    """The weight of each group in ``A_i`` (index = group): softmax of ``beta l_g``, or ``l_g / G``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"d3m_weighting={weighting!r}; expected one of {WEIGHTINGS}")
    l = group_loss.to_numpy(dtype=np.float64)
    if weighting == "softmax":
        z = beta * l
        w = np.exp(z - z.max())
        w = w / w.sum()
    else:
        w = l / len(l)
    return pd.Series(w, index=group_loss.index, name="weight")


def alignment_scores(tau: pd.DataFrame, group_loss: pd.Series, weighting: str = "softmax",
                     beta: float = 1.0) -> pd.Series:
    """Group alignment score ``A_i`` per training image (index of ``tau``).

    ``tau``: training images x groups (``tau(g)_i``); ``group_loss``: validation loss
    ``l_g`` of the base model per group. ``softmax`` is the source study's weighting
    (``beta = 1`` there); ``linear`` is the public D3M code's ``mean_g l_g tau(g)_i``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"d3m_weighting={weighting!r}; expected one of {WEIGHTINGS}")
    missing = [g for g in tau.columns if g not in group_loss.index]
    if missing:
        raise KeyError(f"no validation loss for groups {missing} (tau columns {list(tau.columns)})")
    w = group_weights(group_loss.loc[list(tau.columns)], weighting, beta).to_numpy()
    return pd.Series(tau.to_numpy(dtype=np.float64) @ w, index=tau.index, name="score")


def group_tau(train_factor, val_grads: np.ndarray, groups, train_rows) -> pd.DataFrame:
    """``tau(g)_i = mean_{z in g} T[i, z]`` from factored scores ``T = M G^T``, for any grouping.

    ``train_factor``: ``M`` or its row blocks (as :func:`auto_d3m_per_class`); ``val_grads``:
    ``G`` (``n_val x k``); ``groups``: one label per validation image. Columns sorted.
    """
    G = np.asarray(val_grads, dtype=np.float64)
    groups = np.asarray(groups).astype(str)
    if len(groups) != len(G):
        raise ValueError(f"{len(G)} validation gradients but {len(groups)} group labels")
    names = sorted(set(groups))
    means = np.stack([G[groups == g].mean(axis=0) for g in names], axis=1)
    tau = np.zeros((len(train_rows), len(names)))
    n = 0
    for s0, b in _factor_blocks(train_factor):
        tau[s0:s0 + len(b)] = np.asarray(b, dtype=np.float64) @ means
        n += len(b)
    if n != len(train_rows):
        raise ValueError(f"train_factor has {n} rows but train_rows {len(train_rows)}")
    return pd.DataFrame(tau, index=pd.Index(np.asarray(train_rows), name="row"), columns=names)


def weighting_table(tau: pd.DataFrame, group_loss: pd.Series, k: int, reference: pd.Series,
                    planted=None, betas=(0.0, 1.0, 5.0, 20.0)) -> pd.DataFrame:
    """How the weighting changes the selection, without retraining.

    One row per setting (softmax at each of ``betas``, then linear): the weight of
    each group (``w_<group>`` columns), ``changed``, the share of the ``k`` removed
    images that differ from ``reference`` (the run's own removed set, a kept mask),
    and, with ``planted`` (bool per training image), the precision and recall of the
    ``k`` lowest against the planted harmful images.
    """
    ref_removed = ~np.asarray(reference, dtype=bool)
    rows = []
    for weighting, beta in [("softmax", float(b)) for b in betas] + [("linear", float("nan"))]:
        w = group_weights(group_loss.loc[list(tau.columns)], weighting, 1.0 if weighting == "linear" else beta)
        removed = ~select(alignment_scores(tau, group_loss, weighting, beta if beta == beta else 1.0),
                          "k_lowest", k).to_numpy()
        rec = {"weighting": weighting, "beta": beta, "k": int(k),
               "changed": float((removed & ~ref_removed).sum() / max(int(removed.sum()), 1))}
        rec.update({f"w_{g}": float(v) for g, v in w.items()})
        if planted is not None:
            p = np.asarray(planted, dtype=bool)
            hit = int((removed & p).sum())
            rec.update(precision=hit / max(int(removed.sum()), 1), recall=hit / max(int(p.sum()), 1),
                       n_planted=int(p.sum()))
        rows.append(rec)
    return pd.DataFrame(rows)


def select(scores: pd.Series, rule: str = "negative", k: int | None = None) -> pd.Series:
    """Kept mask (True = keep) over training images.

    ``negative``: drop every image with ``A_i < 0``; ``k_lowest``: drop the ``k`` lowest
    (ties broken by position, so the count is exact).
    """
    if rule not in RULES:
        raise ValueError(f"d3m_selection={rule!r}; expected one of {RULES}")
    if scores.isna().any():
        raise ValueError(f"{int(scores.isna().sum())} alignment scores are NaN")
    if rule == "negative":
        return (scores >= 0).rename("kept")
    if k is None or not 0 <= int(k) <= len(scores):
        raise ValueError(f"d3m_k={k} must be an integer in [0, {len(scores)}] for rule k_lowest")
    order = np.argsort(scores.to_numpy(), kind="stable")
    kept = np.ones(len(scores), dtype=bool)
    kept[order[:int(k)]] = False
    return pd.Series(kept, index=scores.index, name="kept")


@dataclass
class AutoD3MResult:
    """Pseudo-groups of the validation images and the D3M selection they lead to."""

    pseudo_groups: np.ndarray  # per validation image, "pseudo_0"/"pseudo_1"
    tau: pd.DataFrame
    group_loss: pd.Series
    scores: pd.Series
    kept: pd.Series
    explained_variance_ratio: float


def pseudo_groups(val_scores: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, float]:
    """Split validation images in two by their TRAK score vectors (no group labels).

    ``val_scores``: ``n_train x n_val``. Each validation image is a vector over training
    images; after centring, ``pca`` takes the sign of its projection on the top principal
    component, ``kmeans`` runs 2-means on the top 10 principal components. Returns labels
    ``pseudo_0``/``pseudo_1`` and the top component's share of variance.
    """
    X = np.asarray(val_scores, dtype=np.float64).T
    X = X - X.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(X, full_matrices=False)
    evr = float(s[0] ** 2 / np.sum(s ** 2)) if np.sum(s ** 2) > 0 else 0.0
    if method == "pca":
        lab = (u[:, 0] * s[0] > 0).astype(int)
    elif method == "kmeans":
        pcs = u[:, :10] * s[:10]
        lab = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(pcs)
    else:
        raise ValueError(f"auto_d3m method={method!r}; expected 'pca' or 'kmeans'")
    return np.array([f"pseudo_{v}" for v in lab], dtype=object), evr


def auto_d3m(val_scores: np.ndarray, train_rows, y_val, logits_val, *, method: str = "pca",
             weighting: str = "softmax", beta: float = 1.0, rule: str = "negative",
             k: int | None = None, seed: int = 0) -> AutoD3MResult:
    """Auto-D3M: D3M with pseudo-groups found from TRAK scores instead of group labels.

    As in the D3M paper's Auto-D3M: per-validation-image TRAK scores are reduced with PCA
    and the top component splits the validation set into two pseudo-groups; D3M then runs
    with those groups (loss per pseudo-group, tau per pseudo-group, alignment, selection).
    Needs the full ``n_train x n_val`` score matrix: fine at demo size; at MIMIC scale
    score a random subsample of validation targets.
    """
    S = np.asarray(val_scores, dtype=np.float64)
    if S.shape != (len(train_rows), len(y_val)):
        raise ValueError(f"val_scores shape {S.shape} != (n_train={len(train_rows)}, "
                         f"n_val={len(y_val)})")
    groups, evr = pseudo_groups(S, method=method, seed=seed)
    names = sorted(set(groups))
    tau = pd.DataFrame({g: S[:, groups == g].mean(axis=1) for g in names},
                       index=pd.Index(np.asarray(train_rows), name="row"))
    gl = group_losses(y_val, logits_val, groups)
    scores = alignment_scores(tau, gl, weighting=weighting, beta=beta)
    return AutoD3MResult(groups, tau, gl, scores, select(scores, rule=rule, k=k), evr)


def _factor_blocks(train_factor):
    """Row blocks ``(start, block)`` of ``M``: an array, or a callable returning a generator."""
    if callable(train_factor):
        yield from train_factor()
    else:
        M = np.asarray(train_factor)
        for s in range(0, len(M), 65536):
            yield s, M[s:s + 65536]


def auto_d3m_per_class(train_factor, val_grads: np.ndarray, train_rows, y_val, logits_val, *,
                       weighting: str = "softmax", beta: float = 1.0, rule: str = "negative",
                       k: int | None = None) -> AutoD3MResult:
    """The D3M paper's Auto-D3M from factored scores ``S = M G^T``, without ``S``.

    Per class: each validation image's score vector over training images (a column of
    ``S``) is L2-normalised, a one-component PCA is fitted on that class's vectors and the
    sign of the projection splits the class in two; D3M then runs with the two
    pseudo-groups of every class (``y<c>_a``/``y<c>_b``).

    The score vectors ``M g_z`` lie in the span of ``M``'s ``k`` columns, so everything is
    computed in ``k`` coordinates: with ``K = M^T M = V L V^T`` the map ``g -> g V L^1/2``
    preserves inner products of score vectors, norms included. Memory: ``K`` and its
    eigenvectors (``2 * 8 k^2`` bytes), ``G`` and its coordinates (``2 * 8 n_val k``),
    ``tau`` (``8 n_train * groups``) and one block of ``M`` at a time; never
    ``n_train x n_val``.

    Args:
        train_factor: ``M`` (``n_train x k``), or a callable returning ``(start, block)``
            row blocks of it (``TrakScorer.score_factors``).
        val_grads: ``G`` (``n_val x k``).
    """
    G = np.asarray(val_grads, dtype=np.float64)
    y = np.asarray(y_val, dtype=np.float64)
    if len(G) != len(y):
        raise ValueError(f"val_grads has {len(G)} rows but y_val {len(y)}")
    kdim = G.shape[1]
    K = np.zeros((kdim, kdim))
    n = 0
    for _, b in _factor_blocks(train_factor):
        b = np.asarray(b, dtype=np.float64)
        K += b.T @ b
        n += len(b)
    if n != len(train_rows):
        raise ValueError(f"train_factor has {n} rows but train_rows {len(train_rows)}")
    lam, V = np.linalg.eigh(K)
    W = G @ (V * np.sqrt(np.clip(lam, 0.0, None)))
    norm = np.linalg.norm(W, axis=1, keepdims=True)
    W = W / np.where(norm > 0, norm, 1.0)
    groups = np.empty(len(y), dtype=object)
    evr = []
    for c in sorted(np.unique(y)):
        idx = np.flatnonzero(y == c)
        Wc = W[idx] - W[idx].mean(axis=0, keepdims=True)
        _, s, vt = np.linalg.svd(Wc, full_matrices=False)
        v = vt[0] * np.sign(vt[0][np.argmax(np.abs(vt[0]))])  # sign fixed: labels reproducible
        groups[idx] = np.where(Wc @ v > 0, f"y{int(c)}_a", f"y{int(c)}_b")
        evr.append(float(s[0] ** 2 / np.sum(s ** 2)) if np.sum(s ** 2) > 0 else 0.0)
    names = sorted(set(groups))
    means = np.stack([G[groups == g].mean(axis=0) for g in names], axis=1)  # k x groups
    tau = np.zeros((len(train_rows), len(names)))
    for s0, b in _factor_blocks(train_factor):
        tau[s0:s0 + len(b)] = np.asarray(b, dtype=np.float64) @ means
    tau = pd.DataFrame(tau, index=pd.Index(np.asarray(train_rows), name="row"), columns=names)
    gl = group_losses(y, logits_val, groups)
    scores = alignment_scores(tau, gl, weighting=weighting, beta=beta)
    return AutoD3MResult(groups, tau, gl, scores, select(scores, rule=rule, k=k), float(np.mean(evr)))
