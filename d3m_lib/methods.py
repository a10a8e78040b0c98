"""The one registry of the study's arms: name, label, description, labels needed, order, select hook.

Tables, plots, parameter validation and prose read from :data:`REGISTRY`
(``plots.METHOD_ORDER`` is :func:`order`). An arm's ``select`` hook is what the
D3M stage calls to decide how an arm trains:

    select(ctx: SelectionContext) -> np.ndarray | objectives.Plan

a kept mask (bool, one per ctx.train_rows, True = keep; plain ERM on the kept images) or a
:class:`~d3m_lib.objectives.Plan` (repeats, loss weights, GroupDRO, DFR's last-layer refit).
Arms without a hook (``base``) are not retrained. The count-matched arms read the count of the
arm they match from ``ctx.n_removed[<that arm>]``, so the stage runs the arm they copy first
(:func:`run_order`). An arm's hyperparameters (``grid``: name -> the parameter holding its
grid) are chosen on validation worst-group accuracy averaged over seeds, like D3M's k; the
hook reads the value in ``ctx.hp``.

``group_labels`` is the most an arm needs: ``training`` (the group of every training and
validation image), ``validation`` (validation images only: D3M weighs validation groups, and
every tuned arm picks its hyperparameters on validation worst-group accuracy) or ``none``.
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
    d3m_cells_kept: np.ndarray | None = None       # D3M with race x label groups, at D3M's count
    n_removed: dict = field(default_factory=dict)
    train_image_ids: np.ndarray | None = None
    planted_ids: set | None = None
    dataset: str = "synthetic"
    train_y: np.ndarray | None = None
    anchor_train_logit: np.ndarray | None = None   # the anchor's logits on the training images
    anchor_threshold: float = 0.5                  # the anchor's threshold (chosen on validation)
    hp: dict = field(default_factory=dict)         # the arm's hyperparameters (its grid point)


GROUP_LABELS = ("none", "validation", "training")   # increasing need


@dataclass(frozen=True)
class Method:
    """One arm of the comparison."""

    name: str
    label: str
    description: str
    order: float
    group_labels: str = "none"     # the most it needs: none, validation, training (GROUP_LABELS)
    needs_ground_truth: bool = False
    needs_trak: bool = False
    count_from: str | None = None  # removes as many images as this arm
    drawn: bool = False            # a random control: random_draws draws per seed, each its own training
    grid: tuple = ()               # ((hyperparameter, config parameter holding its grid), ...)
    paper: str = ""                # the method's source
    default: bool = True           # run when ``methods`` is null (the demo's arms)
    anchor_losses: bool = False    # reads the anchor's logits on the training images
    trainer: str = "sgd"           # sgd: a continuation from the anchor; dfr: continued ERM's last layer refitted
    select: Callable[[SelectionContext], "np.ndarray | object"] | None = None

    @property
    def retrained(self) -> bool:
        return self.select is not None

    @property
    def needs_group_labels(self) -> bool:
        """Whether the arm needs the group of every *training* image."""
        return self.group_labels == "training"

    def settings(self, values: dict) -> list[dict]:
        """Every grid point (``{hyperparameter: value}``) from the run's parameter ``values``; ``[{}]`` without
        a grid."""
        import itertools

        names = [h for h, _ in self.grid]
        return [dict(zip(names, combo)) for combo in itertools.product(*(values[p] for _, p in self.grid))]


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


def _need(ctx: SelectionContext, name: str, *attrs: str) -> None:
    missing = [a for a in attrs if getattr(ctx, a) is None]
    if missing:
        raise ValueError(f"method {name!r} needs {', '.join(missing)} from the stage")


def _loss_filter(ctx: SelectionContext) -> np.ndarray:
    """Remove the k training images with the highest anchor loss, k = D3M's count (ties: the first)."""
    _need(ctx, "loss_filter", "train_y", "anchor_train_logit")
    if "d3m" not in ctx.n_removed:
        raise ValueError("method 'loss_filter' removes as many images as 'd3m'; select 'd3m' first")
    from .d3m import image_losses

    loss = image_losses(ctx.train_y, ctx.anchor_train_logit)
    kept = np.ones(len(loss), bool)
    kept[np.argsort(-loss, kind="stable")[: ctx.n_removed["d3m"]]] = False
    return kept


def _oracle_k(ctx: SelectionContext):
    """D3M's count drawn from the planted images (all of them, then random others, if D3M removes more)."""
    why = oracle_refusal(ctx.dataset, ctx.planted_ids is not None)
    if why:
        raise ValueError(why.replace("'oracle'", "'oracle_k'"))
    if "d3m" not in ctx.n_removed:
        raise ValueError("method 'oracle_k' removes as many images as 'd3m'; select 'd3m' first")
    planted = ~_oracle(ctx)
    k = ctx.n_removed["d3m"]
    rng = np.random.default_rng(np.random.SeedSequence([ctx.removal_seed, ctx.seed, zlib.crc32(b"oracle_k")]))
    p, o = np.flatnonzero(planted), np.flatnonzero(~planted)
    drop = np.concatenate([rng.choice(p, min(k, len(p)), replace=False),
                           rng.choice(o, max(0, k - len(p)), replace=False)]).astype(int)
    kept = np.ones(len(planted), bool)
    kept[drop] = False
    return kept


def _train_groups(ctx: SelectionContext, name: str) -> np.ndarray:
    _need(ctx, name, "train_groups", "train_y")
    return ctx.train_groups


def _rwg(ctx: SelectionContext):
    from .objectives import Plan, inverse_cell_weights

    return Plan(np.ones(len(ctx.train_rows), bool),
                weights=inverse_cell_weights(_train_groups(ctx, "rwg"), ctx.train_y))


def _group_dro(ctx: SelectionContext):
    from .objectives import Plan, cells

    return Plan(np.ones(len(ctx.train_rows), bool), dro_groups=cells(_train_groups(ctx, "group_dro"), ctx.train_y),
                dro_eta=float(ctx.hp["eta"]))


def jtt_errors(ctx: SelectionContext) -> np.ndarray:
    """JTT's error set: training images the anchor misclassifies at its validation-chosen threshold."""
    _need(ctx, "jtt", "train_y", "anchor_train_logit")
    prob = 1.0 / (1.0 + np.exp(-np.asarray(ctx.anchor_train_logit, float)))
    return (prob >= ctx.anchor_threshold).astype(int) != np.asarray(ctx.train_y).astype(int)


def _jtt(ctx: SelectionContext):
    from .objectives import Plan

    return Plan(np.ones(len(ctx.train_rows), bool), repeats=np.where(jtt_errors(ctx), int(ctx.hp["lam"]), 1))


def _dfr(ctx: SelectionContext):
    from .objectives import Plan

    return Plan(np.ones(len(ctx.train_rows), bool), dfr_c=(float(ctx.hp["C"]),))


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("erm", "ERM", "continued ERM: the anchor trained on with every training image", 0,
           select=_keep_all),
    Method("base", "anchor", "the anchor model itself (epochs_anchor), before any continuation", 1),
    Method("d3m", "D3M", "D3M: removes the training images whose TRAK alignment with the worst groups' "
           "validation loss is negative (or the k lowest)", 2, group_labels="validation", needs_trak=True,
           paper="Jain et al. 2024", select=_given("d3m_kept", "d3m")),
    Method("d3m_cells", "D3M (race × label)", "D3M weighing race x label groups (the D3M paper's (class, "
           "attribute) groups) instead of the run's d3m_groups, removing as many images as D3M", 2.5,
           group_labels="validation", needs_trak=True, count_from="d3m", paper="Jain et al. 2024",
           select=_given("d3m_cells_kept", "d3m_cells")),
    Method("random", "random", "removes as many training images as D3M, uniformly at random", 3,
           count_from="d3m", drawn=True, select=_count_matched("d3m", "random")),
    Method("balanced", "group-balanced", "subsamples every group to the smallest group's size "
           "(needs the group of every training image)", 4, group_labels="training", default=False,
           select=_balanced),
    Method("auto_d3m", "Auto-D3M", "D3M with pseudo-groups found from TRAK scores instead of group labels", 5,
           needs_trak=True, paper="Jain et al. 2024", select=_given("auto_d3m_kept", "auto_d3m")),
    Method("auto_random", "random (Auto-D3M count)", "removes as many training images as Auto-D3M, "
           "uniformly at random", 6, count_from="auto_d3m", drawn=True,
           select=_count_matched("auto_d3m", "auto_random")),
    Method("loss_filter", "loss filter", "removes the training images with the highest anchor loss, as many as "
           "D3M: a label-noise filter that needs no attribution", 7, count_from="d3m", anchor_losses=True,
           select=_loss_filter),
    Method("rwg", "RWG", "reweights the loss of every training image by 1 / size of its group x label cell", 8,
           group_labels="training", paper="Idrissi et al. 2022", select=_rwg),
    Method("group_dro", "GroupDRO", "minimises the worst group x label cell's loss with online group weights "
           "(step size eta)", 9, group_labels="training", grid=(("eta", "group_dro_eta_grid"),),
           paper="Sagawa et al. 2020", default=False, select=_group_dro),
    Method("jtt", "JTT", "upsamples the training images the anchor misclassifies by lambda", 10,
           group_labels="validation", grid=(("lam", "jtt_lambda_grid"),), paper="Liu et al. 2021", default=False,
           anchor_losses=True, select=_jtt),
    Method("dfr", "DFR", "refits continued ERM's last layer on group x label balanced subsamples of half the "
           "validation patients (L1, strength C chosen on the other half)", 11, group_labels="validation",
           grid=(("C", "dfr_c_grid"),), paper="Kirichenko et al. 2023", trainer="dfr", select=_dfr),
    Method("oracle", "oracle", "removes exactly the planted harmful training images (synthetic data only): "
           "the ceiling D3M is measured against", 12, needs_ground_truth=True, select=_oracle),
    Method("oracle_k", "oracle (D3M count)", "removes as many training images as D3M, drawn from the planted "
           "harmful ones (synthetic data only): perfect ranking at D3M's budget", 13, needs_ground_truth=True,
           count_from="d3m", default=False, select=_oracle_k),
)}


def draws(name: str, random_draws: int) -> int:
    """How many selections (each its own training) an arm gets per seed: ``random_draws`` for a
    count-matched random control, 1 for every other arm."""
    return int(random_draws) if REGISTRY[name].drawn else 1


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


def for_data(methods, dataset: str, group_labels: str = "training") -> list[str]:
    """The arms a run retrains: ``methods`` as given, or (None) every default arm the data allows
    (the oracle only on synthetic data, where the planted ground truth exists; arms needing training
    group labels only when ``group_labels`` is ``training``)."""
    if methods is not None:
        return list(methods)
    return [m for m in selectable() if REGISTRY[m].default
            and not (REGISTRY[m].needs_ground_truth and dataset != "synthetic")
            and GROUP_LABELS.index(REGISTRY[m].group_labels) <= GROUP_LABELS.index(group_labels)]


def labels_refusal(name: str, group_labels: str) -> str:
    """Why arm ``name`` cannot run with the group labels a run has ("" when it can)."""
    need = REGISTRY[name].group_labels
    if GROUP_LABELS.index(need) <= GROUP_LABELS.index(group_labels):
        return ""
    what = {"training": "the protected group of every training image (and of every validation image)",
            "validation": "the protected group of every validation image"}[need]
    return (f"method {name!r} needs {need} group labels: {what}; this run has "
            f"{'none' if group_labels == 'none' else group_labels + ' group labels only'} "
            f"(parameter 'group_labels' = {group_labels!r}). Drop {name!r} from `methods`.")


def run_order(methods) -> list[str]:
    """``methods`` with every count-matched arm after the arm it copies."""
    ms = list(order(methods))
    return [m for m in ms if REGISTRY[m].count_from is None] + [m for m in ms if REGISTRY[m].count_from]


def validate(methods, dataset: str = "synthetic", has_ground_truth: bool = True,
             group_labels: str = "training") -> list[str]:
    """Problems with a ``methods`` parameter (empty when fine), in the wording of config errors."""
    errs = []
    bad = [m for m in methods if m not in REGISTRY or not REGISTRY[m].retrained or m == "erm"]
    if bad:
        errs.append(f"parameter 'methods': unknown or not selectable {bad}; choose from {', '.join(selectable())}")
    for m in methods:
        src = REGISTRY[m].count_from if m in REGISTRY else None
        if src and src not in methods:
            errs.append(f"parameter 'methods': {m!r} removes as many images as {src!r}, so it needs {src!r}")
    for m in methods:
        if m in REGISTRY and REGISTRY[m].needs_ground_truth:
            why = oracle_refusal(dataset, has_ground_truth)
            if why:
                errs.append(why.replace("'oracle'", repr(m)))
        if m in REGISTRY:
            why = labels_refusal(m, group_labels)
            if why:
                errs.append(why)
    return errs


def describe() -> pd.DataFrame:
    """The registry as a table (for the book's methods section)."""
    return pd.DataFrame([dict(method=m.name, label=m.label, description=m.description, source=m.paper,
                              group_labels=m.group_labels, training_group_labels=m.needs_group_labels,
                              ground_truth=m.needs_ground_truth, trak=m.needs_trak, count_from=m.count_from or "",
                              tuned=", ".join(f"{h} ({p})" for h, p in m.grid), default=m.default,
                              retrained=m.retrained)
                         for m in (REGISTRY[n] for n in order())])
