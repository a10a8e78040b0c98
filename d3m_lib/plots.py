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
_METHOD_COLORS = _COLORS + list(plt.get_cmap("tab20").colors[1::2])   # 20 distinct colours for the arms


METHOD_ORDER = _methods.order()  # the registry's order (d3m_lib.methods)


def method_colors(methods) -> dict:
    """One fixed colour per method: the same method has the same colour in every figure."""
    names = list(METHOD_ORDER) + [m for m in methods if m not in METHOD_ORDER]
    return {m: _METHOD_COLORS[names.index(m) % len(_METHOD_COLORS)] for m in methods}


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
    many = len(methods) > 6   # many arms: taller rows and the legend beside the axes
    fig, ax = plt.subplots(figsize=(7, (0.12 * len(methods) if many else 0.55) * len(groups) + 1.4))
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
    if many:
        ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
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
    if len(methods) > 6:   # many arms: the legend beside the axes, never over the bars
        ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8, frameon=False, ncol=min(len(methods), 3))
    fig.tight_layout()
    return fig


def tradeoff_plot(alternatives: pd.DataFrame, title: str = ""):
    """Worst-group accuracy (y) against mean accuracy (x), one point per arm with both intervals
    (:meth:`d3m_lib.analysis.MethodComparison.alternatives` rows of one finding)."""
    methods = ordered_methods(alternatives["method"])
    colors = method_colors(methods)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for m in methods:
        d = alternatives[alternatives["method"] == m]
        ax.errorbar(d["acc"], d["wga"], xerr=_errors(d, "acc", "acc_lo", "acc_hi"),
                    yerr=_errors(d, "wga", "wga_lo", "wga_hi"), fmt="o", color=colors[m], capsize=2, ms=5,
                    label=_methods.label(m), elinewidth=0.8)
    ax.set_xlabel("mean accuracy (all test images)")
    ax.set_ylabel("worst-group accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def headline_plot(change: pd.DataFrame, title: str = "", xlabel: str = "change in worst-group accuracy vs ERM",
                  seeds: pd.DataFrame | None = None):
    """One panel row per finding, one marker per method: paired change with its interval, 0 dashed.

    ``change``: columns finding, method, change, lo, hi (e.g.
    :meth:`d3m_lib.analysis.MethodComparison.wga_change`). ``seeds``: each seed's change (columns
    finding, method, change), drawn as small grey dots on the row. Built without pyplot.
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
        if seeds is not None:
            sv = seeds.loc[(seeds["finding"].astype(str) == f) & (seeds["method"] == m), "change"].to_numpy()
            jitter = np.linspace(-0.12, 0.12, len(sv)) if len(sv) > 1 else np.zeros(len(sv))
            ax.plot(sv, yi + jitter, "o", color="0.55", ms=2.5, alpha=0.8, zorder=1,
                    label="one seed" if (yi == y[0]) else None)
        ax.errorbar(d["change"], [yi], xerr=_errors(d, "change", "lo", "hi"), fmt="o", color=colors[m],
                    capsize=3, ms=5, zorder=2)
    if seeds is not None and len(seeds):
        ax.legend(loc="lower right", fontsize=8, frameon=False)
    names = [_methods.label(m) for _, m in rows]
    ax.set_yticks(y, [f"{f}: {n}" if len(findings) > 1 else n for (f, _), n in zip(rows, names)])
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


# The book's body text and content column at 1280 px (what d3m_lib.book_check measures): image-grid
# captions are drawn so that, scaled into that column, they are at least as large as the text.
BOOK_BODY_PX = 16
BOOK_COLUMN_PX = 690
MAX_GRID_COLS = 6


def caption_points(width_in: float, dpi: float | None = None) -> float:
    """Font size (pt) whose glyphs show at ``BOOK_BODY_PX`` once a ``width_in`` inch figure is fitted
    into the book's column (shrunk when wider than it, as the browser does)."""
    dpi = float(dpi or plt.rcParams["figure.dpi"])
    scale = min(1.0, BOOK_COLUMN_PX / (width_in * dpi))
    return BOOK_BODY_PX * 72.0 / (dpi * scale)


def image_grid(images, captions, policy, ncols: int = 8, title: str = "", cell: float = 1.3):
    """Images in a grid with a caption under each; a placeholder if the policy forbids images.

    ``images``: sequence of 2-D uint8 arrays; ``captions``: one string each
    (e.g. label, group, score). At most ``MAX_GRID_COLS`` columns; captions are as large
    as the book's body text once the figure is fitted into its column, wrapped
    to the width of their image.
    """
    import textwrap

    if not policy.may_show_images():
        return placeholder(f"{title + ': ' if title else ''}images hidden: credentialed data "
                           f"({len(captions)} images; set publish_images to show them)")
    n = len(images)
    if n != len(captions):
        raise ValueError(f"image_grid: {n} images but {len(captions)} captions")
    if n == 0:
        return placeholder(f"{title + ': ' if title else ''}no images to show")
    ncols = min(ncols, n, MAX_GRID_COLS)
    nrows = int(np.ceil(n / ncols))
    fs = caption_points(cell * ncols) * 1.1          # a margin for the tight bounding box
    per_line = max(6, int(cell * 72 / (0.6 * fs)))   # characters that fit under one image
    caps = ["\n".join(textwrap.fill(part, per_line) or " " for part in str(c).split("\n")) for c in captions]
    lines = max(c.count("\n") + 1 for c in caps)
    cap_in = lines * fs * 1.35 / 72
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, nrows * (cell + cap_in) + (0.5 if title else 0.1)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, im, cap in zip(axes.ravel(), images, caps):
        ax.imshow(np.asarray(im), cmap="gray", vmin=0, vmax=255)
        ax.set_title(cap, fontsize=fs)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, max(20, int(cell * ncols * 72 / (0.6 * fs))))), fontsize=fs)
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


def metric_heatmap(matrix: pd.DataFrame, label: str, title: str = "", fmt: str = ".2f"):
    """A row x column table of one quantity (e.g. finding x group) as an annotated heatmap."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(1.1 * matrix.shape[1] + 3, 0.4 * matrix.shape[0] + 1.5))
    sns.heatmap(matrix.astype(float), annot=True, fmt=fmt, cmap="viridis", cbar_kws={"label": label}, ax=ax)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def loss_curves(history: pd.DataFrame, title: str = ""):
    """Training and validation loss per epoch from a training ``history`` table."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(history["epoch"], history["train_loss"], marker="o", label="train loss")
    if "val_loss" in history:
        ax.plot(history["epoch"], history["val_loss"], marker="o", label="validate loss")
    ax.set_xlabel("epoch")
    ax.legend(frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def learning_curves(history: pd.DataFrame, anchor_epoch: int):
    """Train (solid) and validation (dotted) loss per seed, one panel per finding, learning rate
    below; a dashed line at the anchor epoch. ``history``: stage 03's ``history`` table."""
    findings = list(dict.fromkeys(history["finding"]))
    fig, axes = plt.subplots(2, len(findings), figsize=(5 * len(findings), 4.4), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [3, 1]})
    many = history["seed"].nunique() > 4   # a legend entry per seed would not fit: one colour, two entries
    for j, f in enumerate(findings):
        top, bottom = axes[0][j], axes[1][j]
        for i, (s, h) in enumerate(history[history["finding"] == f].groupby("seed", sort=True)):
            c = _COLORS[0 if many else i % len(_COLORS)]
            first = not many or i == 0
            kw = dict(alpha=0.5, lw=0.8) if many else {}
            top.plot(h["epoch"], h["train_loss"], color=c, **kw,
                     label=("train, every seed" if many else f"train, seed {s}") if first else None)
            if "val_loss" in h:
                top.plot(h["epoch"], h["val_loss"], color=c, ls=":", **kw,
                         label=("validate, every seed" if many else f"validate, seed {s}") if first else None)
            bottom.plot(h["epoch"], h["lr"], color=c, marker=".", **kw)
        for ax in (top, bottom):
            ax.axvline(anchor_epoch, color="grey", ls="--", lw=0.8)
        top.set_title(f)
        top.set_ylabel("loss")
        bottom.set_ylabel("lr (epoch end)")
        bottom.set_xlabel("epoch")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def anchor_group_losses(losses: pd.DataFrame, title: str = "Anchor validation loss per group, by seed"):
    """Each seed's validation loss per group at the anchor (dots) and their mean (bar): the spread
    of D3M's group weights. ``losses``: finding, seed, group, loss."""
    findings = list(dict.fromkeys(losses["finding"]))
    fig, axes = plt.subplots(1, len(findings), figsize=(5 * len(findings), 3.2), squeeze=False)
    for ax, f in zip(axes[0], findings):
        d = losses[losses["finding"] == f]
        groups = sorted(d["group"].unique())
        x = {g: i for i, g in enumerate(groups)}
        ax.bar(range(len(groups)), [d.loc[d["group"] == g, "loss"].mean() for g in groups], color="0.85")
        for i, (s, ds) in enumerate(d.groupby("seed", sort=True)):
            ax.plot([x[g] for g in ds["group"]], ds["loss"], ls="", marker="o", ms=4,
                    color=_COLORS[i % len(_COLORS)], label=f"seed {s}")
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("validation loss (BCE)")
        ax.set_title(f)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def tau_boxes(tau: pd.DataFrame, title: str = ""):
    """Distribution of ``tau(g)_i`` over training images, one box per validation group."""
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.boxplot([tau[g].to_numpy() for g in tau.columns], showfliers=False)
    ax.set_xticks(range(1, tau.shape[1] + 1), tau.columns, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("tau(g)_i")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def attribution_examples(examples: pd.DataFrame, images, policy, title: str = ""):
    """Each target image, then its most helpful (+) and most harmful (-) training images in score
    order; ``examples``: stage 04's ``examples`` table; hidden like :func:`image_grid`."""
    ims, caps = [], []
    per_target = examples.groupby("target", sort=False)
    for t, d in per_target:
        first = d.iloc[0]
        ims.append(images[int(t)])
        caps.append(f"target y={first['target_y']} {str(first['target_group'])[:10]}")
        for _, r in d.sort_values(["direction", "rank"], ascending=[True, True]).iterrows():
            ims.append(images[int(r["row"])])
            caps.append(f"{r['direction']} y={r['y']} {str(r['group'])[:10]}")
    ncols = 1 + int(per_target.size().max()) if len(examples) else 1
    return image_grid(ims, caps, policy, ncols=ncols, title=title)


def influence_grids(influential: pd.DataFrame, targets: pd.DataFrame, images, policy, title: str = "") -> list:
    """Per target and direction, the target image and its strongest training images by TRAK score.

    ``influential``: rows target, target_row, direction, rank, train_row, score, group, y
    (:class:`d3m_lib.stages.errors.FindingErrors`); ``targets``: row, group, y, prob.
    Captions give group, label ``y`` and score ``s``. One placeholder when the policy hides images.
    """
    if not policy.may_show_images():
        return [placeholder(f"{title + ': ' if title else ''}{len(targets)} x 2 image grids hidden: credentialed "
                            "data (set publish_images to show them)")]
    figs = []
    for j, t in enumerate(targets.itertuples()):
        for direction in ("positive", "negative"):
            d = influential[(influential["target"] == j) & (influential["direction"] == direction)]
            d = d.sort_values("rank")
            caps = [f"TARGET {str(t.group)[:12]}\ny={int(t.y)} p={t.prob:.2f}"] + [
                f"{str(g)[:12]}\ny={y:.0f} s={s:.2g}" for g, y, s in zip(d["group"], d["y"], d["score"])]
            ims = [images[int(t.row)]] + [images[int(r)] for r in d["train_row"]]
            figs.append(image_grid(ims, caps, policy, ncols=len(ims),
                                   title=f"{title + ': ' if title else ''}target {j + 1}, strongest {direction} "
                                         "scores"))
    return figs


def removed_kept_figure(rk: dict, policy, title: str = ""):
    """Mean removed and kept images per label and their difference (removed − kept, scaled to ±127.5 around
    mid-grey), from :func:`d3m_lib.analysis.removed_vs_kept_means`; hidden like :func:`image_grid`."""
    d = np.asarray(rk["difference"], dtype=float)
    scaled = {"difference (removed - kept)": 127.5 + 127.5 * d / max(float(np.abs(d).max()), 1e-9)}
    return mean_images({**rk["means"], **scaled}, policy, title=title)


def removal_curve(curve: pd.DataFrame, chosen: pd.DataFrame | None = None, title: str = ""):
    """Worst-group accuracy against the number of training images removed (stage 05's ``curve``).

    One panel per split (validate, test); one line per method (mean over every seed,
    k = 0 is continued ERM); dashed verticals: the k each method chose on validation;
    dotted grey: the heuristic's count (images with ``A_i < 0``); dash-dotted black: the
    oracle's count (planted harmful images, synthetic data only).
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
            if "oracle_k" in chosen and pd.notna(chosen["oracle_k"].iloc[0]):
                ax.axvline(chosen["oracle_k"].iloc[0], color="black", ls="-.", lw=1.0, label="planted (oracle) count")
        ax.set_xlabel("training images removed (k)")
        ax.set_title(f"{split}")
    axes[0][0].set_ylabel("worst-group accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
