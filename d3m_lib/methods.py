"""The one registry of the study's arms: name, table label, description, needs, order, select hook.

Tables, plots, parameter validation and prose read from :data:`REGISTRY`
(``plots.METHOD_ORDER`` is :func:`order`). An arm's ``select`` hook is what the
D3M stage calls to decide which training images an arm keeps:

    select(ctx: SelectionContext) -> np.ndarray   # bool, one per ctx.train_rows, True = keep

Arms without a hook (``base``) are not retrained. The count-matched controls
read the count of the arm they match from ``ctx.n_removed[<that arm>]``, so the
stage runs the arm they copy first (:func:`run_order`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class SelectionContext:
    """What a select hook may use. Fields an arm does not need may stay None.

    train_rows : cohort rows of the finding's training images.
    train_groups : their protected group (only arms with ``needs_group_labels`` read it).
    seed : the training seed of the model the selection is for.
    draw : which draw of a count-matched random control (0 .. ``random_draws`` - 1; 0 otherwise).
    removal_seed : the run's ``removal_seed``. Random selections (the count-matched controls and
        group balancing) draw from ``(removal_seed, seed, [draw,] crc32(arm name))``: every
        seed, draw and arm has its own stream, and no statistics seed moves them.
    d3m_kept, auto_d3m_kept : kept masks the stage computed from TRAK scores.
    n_removed : images removed by arms already selected, e.g. ``{"d3m": 812}``.
    train_image_ids : image ids of the training rows (the oracle matches them).
    planted_ids : image ids of the planted harmful images of this finding
        (synthetic ground truth); None on data without one.
    dataset : ``"synthetic"``, ``"mimic"`` or ``"nih"`` (the oracle refuses all but synthetic).
    """

    train_rows: np.ndarray
    train_groups: np.ndarray | None = None
    seed: int = 0
    draw: int = 0
    removal_seed: int = 0
    d3m_kept: np.ndarray | None = None
    auto_d3m_kept: np.ndarray | None = None
    n_removed: dict = field(default_factory=dict)
    train_image_ids: np.ndarray | None = None
    planted_ids: set | None = None
    dataset: str = "synthetic"


@dataclass(frozen=True)
class Method:
    """One arm of the comparison."""

    name: str
    label: str
    description: str
    order: int
    needs_group_labels: bool = False
    needs_ground_truth: bool = False
    needs_trak: bool = False
    count_from: str | None = None  # removes as many images as this arm
    select: Callable[[SelectionContext], np.ndarray] | None = None

    @property
    def retrained(self) -> bool:
        return self.select is not None


def _as_mask(kept, ctx: SelectionContext, name: str) -> np.ndarray:
    kept = np.asarray(kept.to_numpy() if isinstance(kept, pd.Series) else kept, dtype=bool)
    if kept.shape != (len(ctx.train_rows),):
        raise ValueError(f"method {name!r}: kept mask has shape {kept.shape}, expected ({len(ctx.train_rows)},)")
    return kept


def _keep_all(ctx: SelectionContext) -> np.ndarray:
    return np.ones(len(ctx.train_rows), dtype=bool)


def _given(attr: str, name: str):
    def select(ctx: SelectionContext) -> np.ndarray:
        kept = getattr(ctx, attr)
        if kept is None:
            raise ValueError(f"method {name!r}: the stage must compute `{attr}` (from the TRAK scores) first")
        return _as_mask(kept, ctx, name)
    return select


def _count_matched(source: str, name: str):
    def select(ctx: SelectionContext) -> np.ndarray:
        from .controls import random_removal

        if source not in ctx.n_removed:
            raise ValueError(f"method {name!r} removes as many images as {source!r}; select {source!r} first "
                             f"(known counts: {sorted(ctx.n_removed)})")
        # each control and draw has its own stream: equal counts remove different images
        stream = (ctx.removal_seed, ctx.seed, ctx.draw, zlib.crc32(name.encode()))
        return _as_mask(random_removal(ctx.train_rows, ctx.n_removed[source], seed=stream), ctx, name)
    return select


def _balanced(ctx: SelectionContext) -> np.ndarray:
    from .controls import group_balanced

    if ctx.train_groups is None:
        raise ValueError("method 'balanced' needs the group of every training image (train_groups)")
    stream = (ctx.removal_seed, ctx.seed, zlib.crc32(b"balanced"))
    return _as_mask(group_balanced(ctx.train_rows, ctx.train_groups, seed=stream), ctx, "balanced")


def oracle_refusal(dataset: str, has_ground_truth: bool) -> str:
    """Why the oracle arm cannot run here ("" when it can)."""
    if dataset != "synthetic":
        return (f"method 'oracle' removes exactly the planted harmful training images, which exist only in "
                f"synthetic data; dataset {dataset!r} has no ground truth. Drop 'oracle' from `methods`.")
    if not has_ground_truth:
        return ("method 'oracle' needs the synthetic ground-truth file (planted_ground_truth.csv.gz); "
                "none was found for this run")
    return ""


def _oracle(ctx: SelectionContext) -> np.ndarray:
    why = oracle_refusal(ctx.dataset, ctx.planted_ids is not None)
    if why:
        raise ValueError(why)
    if ctx.train_image_ids is None:
        raise ValueError("method 'oracle' needs the training images' ids (train_image_ids)")
    ids = np.asarray(ctx.train_image_ids).astype(str)
    return ~np.isin(ids, np.asarray(sorted(map(str, ctx.planted_ids))))


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("erm", "ERM", "continued ERM: the anchor trained on with every training image", 0,
           select=_keep_all),
    Method("base", "anchor", "the anchor model itself (epochs_anchor), before any continuation", 1),
    Method("d3m", "D3M", "D3M: removes the training images whose TRAK alignment with the worst groups' "
           "validation loss is negative (or the k lowest)", 2, needs_group_labels=False, needs_trak=True,
           select=_given("d3m_kept", "d3m")),
    Method("random", "random", "removes as many training images as D3M, uniformly at random", 3,
           count_from="d3m", select=_count_matched("d3m", "random")),
    Method("balanced", "group-balanced", "subsamples every group to the smallest group's size "
           "(needs the group of every training image)", 4, needs_group_labels=True, select=_balanced),
    Method("auto_d3m", "Auto-D3M", "D3M with pseudo-groups found from TRAK scores instead of group labels", 5,
           needs_trak=True, select=_given("auto_d3m_kept", "auto_d3m")),
    Method("auto_random", "random (Auto-D3M count)", "removes as many training images as Auto-D3M, "
           "uniformly at random", 6, count_from="auto_d3m", select=_count_matched("auto_d3m", "auto_random")),
    Method("oracle", "oracle", "removes exactly the planted harmful training images (synthetic data only): "
           "the ceiling D3M is measured against", 7, needs_ground_truth=True, select=_oracle),
)}
# Validation-set group labels: D3M and Auto-D3M use groups (or pseudo-groups) on validation only;
# needs_group_labels says whether an arm needs the group of *training* images.


def draws(name: str, random_draws: int) -> int:
    """How many selections (each its own training) an arm gets per seed: ``random_draws`` for a
    count-matched random control, 1 for every other arm."""
    return int(random_draws) if REGISTRY[name].count_from is not None else 1


def get(name: str) -> Method:
    """The registry entry of ``name``, with a suggestion for a misspelling."""
    if name not in REGISTRY:
        import difflib

        hint = difflib.get_close_matches(name, list(REGISTRY), n=1)
        raise KeyError(f"unknown method {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                       + f"; known: {', '.join(order())}")
    return REGISTRY[name]


def order(methods=None) -> tuple[str, ...]:
    """Registry names in table order; with ``methods``, those in registry order, then any others."""
    names = tuple(sorted(REGISTRY, key=lambda m: REGISTRY[m].order))
    if methods is None:
        return names
    seen = list(dict.fromkeys(methods))
    return tuple([m for m in names if m in seen] + [m for m in seen if m not in REGISTRY])


def label(name: str) -> str:
    """Label for tables and legends (the name itself for an unregistered method)."""
    return REGISTRY[name].label if name in REGISTRY else name


def selectable() -> tuple[str, ...]:
    """Arms a run may list in its ``methods`` parameter (retrained arms other than ERM, always run)."""
    return tuple(m for m in order() if REGISTRY[m].retrained and m != "erm")


def for_data(methods, dataset: str) -> list[str]:
    """The arms a run retrains: ``methods`` as given, or (None) every selectable arm the data allows
    (the oracle only on synthetic data, where the planted ground truth exists)."""
    if methods is not None:
        return list(methods)
    return [m for m in selectable() if not (REGISTRY[m].needs_ground_truth and dataset != "synthetic")]


def run_order(methods) -> list[str]:
    """``methods`` with every count-matched arm after the arm it copies."""
    ms = list(order(methods))
    return [m for m in ms if REGISTRY[m].count_from is None] + [m for m in ms if REGISTRY[m].count_from]


def validate(methods, dataset: str = "synthetic", has_ground_truth: bool = True) -> list[str]:
    """Problems with a ``methods`` parameter (empty when fine), in the wording of config errors."""
    errs = []
    bad = [m for m in methods if m not in REGISTRY or not REGISTRY[m].retrained or m == "erm"]
    if bad:
        errs.append(f"parameter 'methods': unknown or not selectable {bad}; choose from {', '.join(selectable())}")
    for m in methods:
        src = REGISTRY[m].count_from if m in REGISTRY else None
        if src and src not in methods:
            errs.append(f"parameter 'methods': {m!r} removes as many images as {src!r}, so it needs {src!r}")
    if "oracle" in methods:
        why = oracle_refusal(dataset, has_ground_truth)
        if why:
            errs.append(why)
    return errs


def describe() -> pd.DataFrame:
    """The registry as a table (for the book's methods section)."""
    return pd.DataFrame([dict(method=m.name, label=m.label, description=m.description,
                              training_group_labels=m.needs_group_labels, ground_truth=m.needs_ground_truth,
                              trak=m.needs_trak, count_from=m.count_from or "", retrained=m.retrained)
                         for m in (REGISTRY[n] for n in order())])
