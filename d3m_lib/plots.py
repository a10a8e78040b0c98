"""Figures shared by the notebooks: forest plots, worst-group bars, removal bars, image grids.

Every function returns a matplotlib ``Figure`` and draws only from the tables
that :mod:`d3m_lib.analysis` builds, so a figure shows exactly the numbers of a
table. :func:`image_grid` asks a :class:`~d3m_lib.privacy.Policy` first and draws
a placeholder with a note instead of credentialed images.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import methods as _methods
from .analysis import OVERALL

_COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


METHOD_ORDER = _methods.order()  # the registry's order (d3m_lib.methods)


def method_colors(methods) -> dict:
    """One fixed colour per method: the same method has the same colour in every figure."""
    names = list(METHOD_ORDER) + [m for m in methods if m not in METHOD_ORDER]
    return {m: _COLORS[names.index(m) % len(_COLORS)] for m in methods}


def ordered_methods(methods) -> list:
    """Methods in the registry's order, then any others in order of appearance."""
    return list(_methods.order(methods))


def _errors(df: pd.DataFrame, est: str, lo: str, hi: str) -> np.ndarray:
    return np.vstack([(df[est] - df[lo]).clip(lower=0), (df[hi] - df[est]).clip(lower=0)]).astype(float)


def forest_plot(forest: pd.DataFrame, title: str = "", xlabel: str = "change in accuracy vs ERM",
                ref: float | None = 0.0):
    """One row per group, one marker per method: change with its interval; a line at ``ref``."""
    methods = ordered_methods(forest["method"])
    groups = [g for g in dict.fromkeys(forest["group"]) if g != OVERALL]
    if OVERALL in set(forest["group"]):
        groups.append(OVERALL)
    colors = method_colors(methods)
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(groups) + 1.4))
    step = 0.7 / max(len(methods), 1)
    for j, m in enumerate(methods):
        d = forest[forest["method"] == m].set_index("group").reindex(groups)
        y = np.arange(len(groups))[::-1] - (j - (len(methods) - 1) / 2) * step
        ax.errorbar(d["change"], y, xerr=_errors(d, "change", "change_lo", "change_hi"), fmt="o",
                    color=colors[m], label=_methods.label(m), capsize=2, ms=4)
    labels = []
    n = forest.drop_duplicates("group").set_index("group")["n"] if "n" in forest else None
    for g in groups:
        labels.append(f"{g} (n={int(n[g])})" if n is not None and pd.notna(n.get(g)) else g)
    ax.set_yticks(np.arange(len(groups))[::-1], labels)
    if ref is not None:
        ax.axvline(ref, color="0.4", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def wga_bars(wga: pd.DataFrame, title: str = "Worst-group accuracy"):
    """Worst-group accuracy per finding (x) and method (bars) with intervals."""
    findings = list(dict.fromkeys(wga["finding"]))
    methods = ordered_methods(wga["method"])
    colors = method_colors(methods)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(findings) + 2), 3.6))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        d = wga[wga["method"] == m].set_index("finding").reindex(findings)
        x = np.arange(len(findings)) + (j - (len(methods) - 1) / 2) * width
        ax.bar(x, d["wga"], width, yerr=_errors(d, "wga", "lo", "hi"), color=colors[m], label=_methods.label(m),
               capsize=2, error_kw=dict(lw=0.8))
    ax.set_xticks(np.arange(len(findings)), findings)
    ax.set_ylabel("worst-group accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False, ncol=min(len(methods), 3))
    fig.tight_layout()
    return fig


def headline_plot(change: pd.DataFrame, title: str = "", xlabel: str = "change in worst-group accuracy vs ERM"):
    """One panel row per finding, one marker per method: paired change with its interval, 0 dashed.

    ``change``: columns finding, method, change, lo, hi (e.g.
    :meth:`d3m_lib.analysis.MethodComparison.wga_change`). Built without pyplot.
    """
    from matplotlib.figure import Figure

    findings = list(dict.fromkeys(change["finding"].astype(str)))
    methods = ordered_methods(change["method"])
    colors = method_colors(methods)
    rows = [(f, m) for f in findings for m in methods
            if ((change["finding"].astype(str) == f) & (change["method"] == m)).any()]
    fig = Figure(figsize=(7, 0.38 * len(rows) + 1.3), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))[::-1]
    for yi, (f, m) in zip(y, rows):
        d = change[(change["finding"].astype(str) == f) & (change["method"] == m)].iloc[[0]]
        ax.errorbar(d["change"], [yi], xerr=_errors(d, "change", "lo", "hi"), fmt="o", color=colors[m],
                    capsize=3, ms=5)
    ax.set_yticks(y, [f"{f}: {m}" if len(findings) > 1 else m for f, m in rows])
    ax.axvline(0, color="0.4", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def per_group_metric_plot(per_group: pd.DataFrame, ylabel: str = "", title: str = ""):
    """Per-group value (e.g. AUROC, FPR) with intervals, methods as colours."""
    forest_like = per_group.rename(columns={"value": "change", "lo": "change_lo", "hi": "change_hi"})
    return forest_plot(forest_like, title=title, xlabel=ylabel or str(per_group["metric"].iloc[0]),
                       ref=None)


def removed_bars(table: pd.DataFrame, by: str, value: str = "removed_rate", title: str = ""):
    """Bars of a :func:`~d3m_lib.analysis.removed_summary` table: ``by`` on x, methods as colours."""
    methods = ordered_methods(table["method"])
    cats = list(dict.fromkeys(table[by]))
    colors = method_colors(methods)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(cats) + 2), 3.4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        d = table[table["method"] == m].set_index(by).reindex(cats)
        ax.bar(np.arange(len(cats)) + (j - (len(methods) - 1) / 2) * width, d[value], width,
               color=colors[m], label=_methods.label(m))
    ax.set_xticks(np.arange(len(cats)), cats, rotation=20, ha="right")
    ax.set_ylabel(value.replace("_", " "))
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def placeholder(note: str, figsize=(6, 1.2)):
    """A figure that only says why nothing is shown."""
    fig, ax = plt.subplots(figsize=figsize)
    ax.axis("off")
    ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True)
    return fig


def image_grid(images, captions, policy, ncols: int = 8, title: str = "", cell: float = 1.3):
    """Images in a grid with a caption under each; a placeholder if the policy forbids images.

    ``images``: sequence of 2-D uint8 arrays; ``captions``: one string each
    (e.g. label, group, score).
    """
    if not policy.may_show_images():
        return placeholder(f"{title + ': ' if title else ''}images hidden: credentialed data "
                           f"({len(captions)} images; set publish_images to show them)")
    n = len(images)
    if n != len(captions):
        raise ValueError(f"image_grid: {n} images but {len(captions)} captions")
    if n == 0:
        return placeholder(f"{title + ': ' if title else ''}no images to show")
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, im, cap in zip(axes.ravel(), images, captions):
        ax.imshow(np.asarray(im), cmap="gray", vmin=0, vmax=255)
        ax.set_title(cap, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def mean_images(means: dict, policy, title: str = ""):
    """Side by side mean images (e.g. removed vs kept per label); hidden like image_grid."""
    caps = list(means)
    return image_grid([np.clip(means[c], 0, 255).astype(np.uint8) for c in caps], caps, policy,
                      ncols=len(caps), title=title, cell=2.0)


def threshold_curves(curves: pd.DataFrame, threshold: float | None = None, title: str = ""):
    """Accuracy, FPR and FNR per group against the decision threshold (one panel each).

    ``curves``: columns threshold, group, accuracy, fpr, fnr (see
    :func:`d3m_lib.explorer.threshold_curves`).
    """
    metrics = ["accuracy", "fpr", "fnr"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), sharex=True)
    for ax, m in zip(axes, metrics):
        for g, d in curves.groupby("group", sort=True):
            ax.plot(d["threshold"], d[m], label=g, lw=1.2, ls="--" if g == OVERALL else "-")
        if threshold is not None:
            ax.axvline(threshold, color="0.3", lw=0.8, ls=":")
        ax.set_title(m)
        ax.set_xlabel("threshold")
        ax.set_ylim(-0.02, 1.02)
    axes[-1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def show(fig) -> None:
    """Display a figure once and close it (so the inline backend does not show it again).

    A widget (the live explorer) is displayed as it is.
    """
    from IPython.display import display

    display(fig)
    if isinstance(fig, plt.Figure):
        plt.close(fig)


def removal_curve(curve: pd.DataFrame, chosen: pd.DataFrame | None = None, title: str = ""):
    """Worst-group accuracy against the number of training images removed (stage 05's ``curve``).

    One panel per split (validate, test); one line per method (mean over the curve's
    seeds, k = 0 is continued ERM); dashed verticals: the k each method chose on
    validation; dotted grey: the heuristic's count (images with ``A_i < 0``).
    """
    splits = [s for s in ("validate", "test") if s in set(curve["split"])]
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.2), squeeze=False, sharey=True)
    ms = ordered_methods(curve["method"].unique())
    colors = method_colors(ms)
    for ax, split in zip(axes[0], splits):
        c = curve[curve["split"] == split]
        for m in ms:
            line = c[c["method"] == m].groupby("k")["wga"].mean().sort_index()
            ax.plot(line.index, line.to_numpy(), "o-", color=colors[m], label=_methods.label(m), ms=4)
        if chosen is not None and len(chosen):
            for _, r in chosen.iterrows():
                if pd.notna(r["k"]) and r["method"] in colors:
                    ax.axvline(r["k"], color=colors[r["method"]], ls="--", lw=0.9)
            ax.axvline(chosen["heuristic_k"].iloc[0], color="grey", ls=":", lw=1.2, label="A_i < 0 count")
        ax.set_xlabel("training images removed (k)")
        ax.set_title(f"{split}")
    axes[0][0].set_ylabel("worst-group accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
