"""An ipywidgets explorer of per-group errors, thresholds and influential training images.

Whenever a live frontend runs the kernel (JupyterLab, Notebook), :func:`show`
returns a panel: pick a finding, method, seed and group; move the decision
threshold and the per-group accuracy, false positive rate and false negative
rate update live; pick a misclassified target image and see it beside the
training images with the strongest positive (most helpful) and negative (most
harmful) TRAK scores of that seed. The panel opens on the worst group. In the
static book (papermill runs have no widget frontend) :func:`show` draws a still
figure of the same metrics against the threshold, per group.

The panel writes no file. Its figures are built with ``matplotlib.figure.Figure``
(no pyplot) and shown as PNG bytes, so a kernel that handles widget messages on
subshells (JupyterLab 4.6 ``commsOverSubshells``) cannot flush a half-drawn
figure.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import pandas as pd

from . import metrics, plots
from .analysis import OVERALL

HOW_TO_INTERACT = ("The explorer is live in JupyterLab: open notebooks/07_error_analysis.ipynb there and "
                   "run it (only run_dir needs setting). In the book it is a still figure.")


def live_frontend() -> bool:
    """True when a notebook frontend with widgets (JupyterLab, Notebook 7) runs this cell.

    Such a frontend sends the cell's id with each execute request (the
    ``cellId`` metadata) and, once ipywidgets is imported, opens the
    ``jupyter.widget.control`` comm; papermill and nbclient do neither.
    """
    try:
        from IPython import get_ipython
        from ipywidgets import Widget
    except ImportError:
        return False
    if getattr(Widget, "_control_comm", None) is not None:
        return True
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None:
        return False
    try:
        parent = kernel.get_parent()
    except Exception:  # noqa: BLE001 - an older ipykernel: no way to tell, so no live panel
        return False
    return bool(((parent or {}).get("metadata") or {}).get("cellId"))


def threshold_metrics(y, prob, groups, threshold: float) -> pd.DataFrame:
    """Accuracy, FPR and FNR per group (and overall) at ``threshold`` (pred = prob >= t).

    :func:`threshold_curves` at that one threshold. Columns: group, accuracy, fpr, fnr, n.
    """
    return threshold_curves(y, prob, groups, [threshold])[["group", "accuracy", "fpr", "fnr", "n"]]


def threshold_curves(y, prob, groups, thresholds=None) -> pd.DataFrame:
    """The metric engine's :func:`d3m_lib.metrics.threshold_curves`, with the overall row named
    as in the comparison tables (``analysis.OVERALL``). Columns: threshold, group, accuracy,
    fpr, fnr, balanced_accuracy, n, n_pos."""
    out = metrics.threshold_curves(y, prob, groups, thresholds)
    out["group"] = out["group"].replace({metrics.ALL: OVERALL})
    return out.reset_index(drop=True)


def _model_preds(predictions: pd.DataFrame, finding: str, method: str, seed: int | None,
                 split: str) -> pd.DataFrame:
    p = predictions
    sub = p[(p["finding"] == finding) & (p["method"] == method) & (p["split"] == split)]
    if sub.empty:
        raise KeyError(f"no predictions for finding '{finding}', method '{method}', split '{split}'")
    if seed is None:
        seed = int(sub["seed"].min())
    sub = sub[sub["seed"] == seed]
    if sub.empty:
        raise KeyError(f"no predictions of seed {seed} for '{finding}'/'{method}'/'{split}'")
    return sub.sort_values("row").reset_index(drop=True)


class Explorer:
    """The widget panel. ``Explorer(...).widget`` is the ipywidgets box to display.

    Args:
        predictions: ``05_d3m/predictions.parquet``.
        policy: a :class:`~d3m_lib.privacy.Policy` (images and identifiers).
        images: cache-row-indexable uint8 images (the image cache), or None.
        cohort: the cohort table (group and labels of training rows), or None.
        scorer_for: ``(finding, seed) -> scorer`` with ``.scores(rows)`` and
            ``.train_rows``: the TRAK state of that finding *and seed*, opened
            read-only (e.g. ``attribution.load_scorer`` on
            ``04_trak/<finding>/seed<seed>``). Called once per pair, then cached.
        split: evaluation split shown; n_top: training images per direction.
    """

    def __init__(self, predictions: pd.DataFrame, policy, images=None, cohort: pd.DataFrame | None = None,
                 scorer_for: Callable | None = None, split: str = "test", n_top: int = 8):
        import ipywidgets as w

        self.predictions = predictions
        self.policy, self.images, self.cohort = policy, images, cohort
        self.scorer_for, self.split, self.n_top = scorer_for, split, int(n_top)
        self._scorers: dict = {}
        findings = list(dict.fromkeys(predictions["finding"].astype(str)))
        wide = {"description_width": "initial"}
        self.finding = w.Dropdown(options=findings, description="finding", style=wide)
        self.method = w.Dropdown(description="method", style=wide)
        self.seed = w.Dropdown(description="seed (model and TRAK scores)", style=wide)
        self.group = w.Dropdown(description="group", style=wide)
        self.threshold = w.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.01, description="threshold",
                                       continuous_update=False, readout_format=".2f")
        self.target = w.Dropdown(description="misclassified target", style=wide,
                                 layout=w.Layout(width="auto", min_width="22em"))
        self.metrics_html = w.HTML()
        self.status = w.HTML()
        self.images_out = w.Output()
        self.show_button = w.Button(description="show most helpful and most harmful training images",
                                    layout=w.Layout(width="auto"), button_style="primary")
        self.metrics: pd.DataFrame | None = None
        self._preds: pd.DataFrame | None = None
        self._updating = False
        self.finding.observe(lambda _: self._guarded(self._on_finding), names="value")
        for wd in (self.method, self.seed):
            wd.observe(lambda _: self._guarded(self._on_model), names="value")
        self.group.observe(lambda _: self._guarded(self._on_targets), names="value")
        self.threshold.observe(lambda _: self._guarded(self._on_threshold), names="value")
        self.show_button.on_click(lambda _: self.show_influential())
        self.widget = w.VBox([w.HBox([self.finding, self.method, self.seed]),
                              w.HBox([self.group, self.threshold]), self.metrics_html,
                              w.HBox([self.target, self.show_button]), self.status, self.images_out])
        self.widget.add_class("d3m-explorer")
        self._guarded(self._on_finding)

    # -- callbacks ------------------------------------------------------------
    def _guarded(self, fn) -> None:
        """Run a callback unless another one is already updating the widgets."""
        if self._updating:
            return
        self._updating = True
        try:
            fn()
        finally:
            self._updating = False

    @staticmethod
    def _set_options(dropdown, options, value=None) -> None:
        options = list(options)
        values = [o[1] if isinstance(o, tuple) else o for o in options]
        keep = value if value in values else dropdown.value if dropdown.value in values else \
            (values[0] if values else None)
        if list(dropdown.options) != options:
            dropdown.options = options
        dropdown.value = keep

    def _on_finding(self) -> None:
        p = self.predictions[self.predictions["finding"] == self.finding.value]
        self._set_options(self.method, dict.fromkeys(p["method"].astype(str)))
        self._on_model()

    def _on_model(self) -> None:
        p = self.predictions
        sub = p[(p["finding"] == self.finding.value) & (p["method"] == self.method.value)]
        self._set_options(self.seed, sorted(int(s) for s in sub["seed"].unique()))
        self._preds = _model_preds(p, self.finding.value, self.method.value, self.seed.value, self.split)
        self.threshold.value = float(self._preds["threshold"].iloc[0]) if "threshold" in self._preds else 0.5
        self._update_metrics()
        groups = sorted(self._preds["group"].astype(str).unique())
        self._set_options(self.group, groups, value=self.worst_group())
        self._on_targets()

    def worst_group(self) -> str | None:
        """The group with the lowest accuracy at the current threshold."""
        if self.metrics is None:
            return None
        m = self.metrics[self.metrics["group"] != OVERALL]
        return None if m.empty else str(m.sort_values(["accuracy", "group"]).iloc[0]["group"])

    def _update_metrics(self) -> None:
        d = self._preds
        self.metrics = threshold_metrics(d["y"], d["prob"], d["group"], self.threshold.value)
        worst = self.worst_group()
        table = self.metrics.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0)
        self.metrics_html.value = (f"<p>{self.finding.value}, {self.method.value}, seed {self.seed.value}, "
                                   f"threshold {self.threshold.value:.2f}: worst group <b>{worst}</b></p>"
                                   + table)

    def _on_threshold(self) -> None:
        self._update_metrics()
        self._on_targets()

    def _on_targets(self) -> None:
        d = self._preds
        if d is None or self.group.value is None:
            return
        pred = d["prob"].to_numpy() >= self.threshold.value
        wrong = d[(pred != d["y"].astype(bool).to_numpy()) & (d["group"] == self.group.value).to_numpy()].copy()
        wrong["confidence"] = (wrong["prob"] - self.threshold.value).abs()
        wrong = wrong.sort_values(["confidence", "row"], ascending=[False, True])
        opts = [(f"row {int(r.row)}: y={int(r.y)}, p={r.prob:.2f}", int(r.row)) for r in wrong.itertuples()]
        self.target.options = opts
        self.target.value = opts[0][1] if opts else None
        self.status.value = (f"{len(opts)} misclassified {self.split} images in group {self.group.value}"
                             if opts else f"no misclassified {self.split} image in group {self.group.value} "
                             "at this threshold")

    # -- influential images ---------------------------------------------------------
    def scorer(self, finding: str, seed: int):
        """The TRAK scorer of ``finding`` and ``seed`` (opened once, then cached)."""
        if self.scorer_for is None:
            raise ValueError("no TRAK scorer given to the explorer")
        key = (str(finding), int(seed))
        if key not in self._scorers:
            self._scorers[key] = self.scorer_for(*key)
        return self._scorers[key]

    def influential(self, target_row: int) -> dict:
        """Training rows with the strongest positive / negative TRAK score on one target.

        Scores come from the TRAK state of the selected finding and seed.
        """
        scorer = self.scorer(self.finding.value, self.seed.value)
        s = np.asarray(scorer.scores([int(target_row)])).reshape(-1)
        order = np.argsort(s, kind="stable")
        rows = np.asarray(scorer.train_rows)
        return {"positive": (rows[order[::-1][:self.n_top]], s[order[::-1][:self.n_top]]),
                "negative": (rows[order[:self.n_top]], s[order[:self.n_top]])}

    def influence_figure(self, target_row: int):
        """Target image beside its most helpful (top row) and most harmful (bottom row) training images."""
        inf = self.influential(target_row)
        coh = self.cohort.set_index("row")
        t = self._preds.set_index("row").loc[int(target_row)]
        target_cap = f"TARGET {str(t['group'])[:12]}\ny={int(t['y'])} p={float(t['prob']):.2f}"
        rows_caps = {}
        for kind, (rows, scores) in inf.items():
            rows_caps[kind] = [(int(r), f"{str(coh.loc[r, 'group'])[:12]}\n"
                                        f"y={coh.loc[r, self.finding.value]:.0f} s={sc:.2g}")
                               for r, sc in zip(rows, scores)]
        return influence_grid(self.images[int(target_row)], target_cap,
                              {"most helpful": [(self.images[r], c) for r, c in rows_caps["positive"]],
                               "most harmful": [(self.images[r], c) for r, c in rows_caps["negative"]]},
                              title=f"{self.finding.value}, seed {self.seed.value}: "
                                    f"TRAK scores on row {int(target_row)}")

    def show_influential(self) -> None:
        from IPython.display import Image, display

        with self.images_out:
            self.images_out.clear_output(wait=True)
            if self.target.value is None:
                print("no misclassified image of this group at this threshold")
                return
            if not self.policy.may_show_images():
                print("images hidden: credentialed data (set publish_images to show them)")
                return
            if self.scorer_for is None or self.images is None or self.cohort is None:
                print("influential images need the TRAK scorer, the image cache and the cohort table")
                return
            try:
                png = figure_png(self.influence_figure(self.target.value))
            except FileNotFoundError as exc:
                print(f"no TRAK scores for {self.finding.value!r}, seed {self.seed.value}: {exc}")
                return
            display(Image(data=png, format="png"))


def figure_png(fig, dpi: int = 110) -> bytes:
    """PNG bytes of a figure (works for a pyplot-free ``Figure``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def influence_grid(target, target_caption: str, rows: dict, title: str = "", cell: float = 1.3):
    """A pyplot-free figure: the target in the first column, one row of images per entry of ``rows``.

    ``rows``: ``{row title: [(image, caption), ...]}``. Safe to draw on any thread.
    """
    from matplotlib.figure import Figure

    ncols = 1 + max((len(v) for v in rows.values()), default=0)
    nrows = max(len(rows), 1)
    fig = Figure(figsize=(cell * ncols, cell * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(np.asarray(target), cmap="gray", vmin=0, vmax=255)
    axes[0, 0].set_title(target_caption, fontsize=6, color="C3")
    for i, (name, items) in enumerate(rows.items()):
        axes[i, 1].text(-0.05, 0.5, name, transform=axes[i, 1].transAxes, rotation=90, ha="right",
                        va="center", fontsize=7)
        for j, (im, cap) in enumerate(items):
            axes[i, j + 1].imshow(np.asarray(im), cmap="gray", vmin=0, vmax=255)
            axes[i, j + 1].set_title(cap, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def still_figure(predictions: pd.DataFrame, finding: str, method: str, split: str = "test"):
    """Accuracy, FPR and FNR per group against the threshold, averaged over seeds."""
    p = predictions
    sub = p[(p["finding"] == finding) & (p["method"] == method) & (p["split"] == split)]
    if sub.empty:
        raise KeyError(f"no predictions for finding '{finding}', method '{method}', split '{split}'")
    curves = []
    for _, d in sub.groupby("seed"):
        curves.append(threshold_curves(d["y"], d["prob"], d["group"]))
    c = pd.concat(curves).groupby(["threshold", "group"], as_index=False)[["accuracy", "fpr", "fnr"]].mean()
    thr = float(sub["threshold"].mean()) if "threshold" in sub else None
    return plots.threshold_curves(c, thr, title=f"{finding}, {method} ({split}; mean over seeds; "
                                                "dotted: the chosen threshold)")


def show(predictions: pd.DataFrame, policy, finding: str, method: str = "erm", *,
         interactive: bool | None = None, **explorer_kwargs):
    """The live panel or a still figure (the book).

    ``interactive``: None (default) means live whenever a widget frontend is
    connected (:func:`live_frontend`); True or False forces one or the other.
    Returns the ipywidgets box, or the matplotlib figure of :func:`still_figure`.
    """
    if interactive is None:
        interactive = live_frontend()
    if interactive:
        ex = Explorer(predictions, policy, **explorer_kwargs)
        if finding not in ex.finding.options:
            raise KeyError(f"no predictions for finding '{finding}'")
        ex.finding.value = finding
        if method in ex.method.options:
            ex.method.value = method
        return ex.widget
    return still_figure(predictions, finding, method, explorer_kwargs.get("split", "test"))
