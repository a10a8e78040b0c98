"""An ipywidgets explorer of per-group errors, thresholds and influential training images.

In JupyterLab (notebook 07 with ``interactive = True``) :func:`show` returns a
panel: pick a finding, method, seed and group; move the decision threshold and
the per-group accuracy, false positive rate and false negative rate update
live; pick a misclassified target image and see the training images with the
strongest positive and negative TRAK scores on it. In the static book
(papermill runs have no widget frontend) :func:`show` draws a still figure of
the same metrics against the threshold, per group.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from . import plots
from .analysis import OVERALL

HOW_TO_INTERACT = ("For the live panel, open notebooks/07_error_analysis.ipynb in JupyterLab, "
                   "set `interactive = True` in its parameters cell and run it.")


def threshold_metrics(y, prob, groups, threshold: float) -> pd.DataFrame:
    """Accuracy, FPR and FNR per group (and Overall) at ``threshold`` (pred = prob >= t).

    Uses fairlearn's ``MetricFrame``. Columns: group, accuracy, fpr, fnr, n.
    """
    from fairlearn.metrics import MetricFrame, count, false_negative_rate, false_positive_rate
    from sklearn.metrics import accuracy_score

    y = np.asarray(y).astype(int)
    pred = (np.asarray(prob, dtype=float) >= threshold).astype(int)
    mf = MetricFrame(metrics={"accuracy": accuracy_score, "fpr": false_positive_rate,
                              "fnr": false_negative_rate, "n": count},
                     y_true=y, y_pred=pred, sensitive_features=pd.Series(np.asarray(groups, dtype=str), name="group"))
    out = mf.by_group.reset_index()
    overall = mf.overall.to_dict()
    overall["group"] = OVERALL
    out = pd.concat([out, pd.DataFrame([overall])], ignore_index=True)
    out["n"] = out["n"].astype(int)
    return out[["group", "accuracy", "fpr", "fnr", "n"]]


def threshold_curves(y, prob, groups, thresholds=None) -> pd.DataFrame:
    """Accuracy, FPR, FNR per group (and Overall) on a grid of thresholds (vectorised).

    Columns: threshold, group, accuracy, fpr, fnr, n.
    """
    t = np.linspace(0, 1, 101) if thresholds is None else np.asarray(thresholds, dtype=float)
    y = np.asarray(y).astype(bool)
    prob = np.asarray(prob, dtype=float)
    groups = np.asarray(groups, dtype=str)
    frames = []
    for g in sorted(np.unique(groups)) + [OVERALL]:
        m = np.ones(len(y), bool) if g == OVERALL else groups == g
        yy, pp = y[m], prob[m]
        pred = pp[None, :] >= t[:, None]  # thresholds x images
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = (pred == yy[None, :]).mean(1)
            fpr = (pred & ~yy[None, :]).sum(1) / (~yy).sum()
            fnr = (~pred & yy[None, :]).sum(1) / yy.sum()
        frames.append(pd.DataFrame({"threshold": t, "group": g, "accuracy": acc, "fpr": fpr,
                                    "fnr": fnr, "n": int(m.sum())}))
    return pd.concat(frames, ignore_index=True)


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
            ``.train_rows`` (e.g. ``attribution.load_scorer`` on ``04_trak``), or None.
        split: evaluation split shown; n_top: training images per direction.
    """

    def __init__(self, predictions: pd.DataFrame, policy, images=None, cohort: pd.DataFrame | None = None,
                 scorer_for: Callable | None = None, split: str = "test", n_top: int = 8):
        import ipywidgets as w

        self.predictions = predictions
        self.policy, self.images, self.cohort = policy, images, cohort
        self.scorer_for, self.split, self.n_top = scorer_for, split, int(n_top)
        findings = list(dict.fromkeys(predictions["finding"].astype(str)))
        self.finding = w.Dropdown(options=findings, description="finding")
        self.method = w.Dropdown(description="method")
        self.seed = w.Dropdown(description="seed")
        self.group = w.Dropdown(description="group")
        self.threshold = w.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.01, description="threshold",
                                       continuous_update=False, readout_format=".2f")
        self.target = w.Dropdown(description="target")
        self.metrics_html = w.HTML()
        self.images_out = w.Output()
        self.show_button = w.Button(description="influential training images")
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
                              w.HBox([self.target, self.show_button]), self.images_out])
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
    def _set_options(dropdown, options) -> None:
        options = list(options)
        keep = dropdown.value if dropdown.value in options else (options[0] if options else None)
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
        self._set_options(self.group, sorted(self._preds["group"].astype(str).unique()))
        self.threshold.value = float(self._preds["threshold"].iloc[0]) if "threshold" in self._preds else 0.5
        self._on_threshold()

    def _on_threshold(self) -> None:
        d = self._preds
        self.metrics = threshold_metrics(d["y"], d["prob"], d["group"], self.threshold.value)
        self.metrics_html.value = self.metrics.to_html(index=False, float_format=lambda v: f"{v:.3f}",
                                                       border=0)
        self._on_targets()

    def _on_targets(self) -> None:
        d = self._preds
        if d is None or self.group.value is None:
            return
        pred = d["prob"].to_numpy() >= self.threshold.value
        wrong = d[(pred != d["y"].astype(bool).to_numpy()) & (d["group"] == self.group.value).to_numpy()]
        opts = [(f"row {int(r.row)}: y={int(r.y)}, p={r.prob:.2f}", int(r.row)) for r in wrong.itertuples()]
        self.target.options = opts
        self.target.value = opts[0][1] if opts else None

    # -- influential images ---------------------------------------------------------
    def influential(self, target_row: int) -> dict:
        """Training rows with the strongest positive / negative TRAK score on one target."""
        if self.scorer_for is None:
            raise ValueError("no TRAK scorer given to the explorer")
        scorer = self.scorer_for(self.finding.value, self.seed.value)
        s = np.asarray(scorer.scores([int(target_row)])).reshape(-1)
        order = np.argsort(s)
        rows = np.asarray(scorer.train_rows)
        return {"positive": (rows[order[::-1][:self.n_top]], s[order[::-1][:self.n_top]]),
                "negative": (rows[order[:self.n_top]], s[order[:self.n_top]])}

    def show_influential(self) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        self.images_out.clear_output()
        with self.images_out:
            if self.target.value is None:
                print("no misclassified image of this group at this threshold")
                return
            if self.scorer_for is None or self.images is None or self.cohort is None:
                print("influential images need the TRAK scorer, the image cache and the cohort table")
                return
            inf = self.influential(self.target.value)
            coh = self.cohort.set_index("row")
            for kind, (rows, scores) in inf.items():
                caps = [f"{coh.loc[r, 'group']}\ny={coh.loc[r, self.finding.value]:.0f} s={sc:.2g}"
                        for r, sc in zip(rows, scores)]
                fig = plots.image_grid([self.images[int(r)] for r in rows], caps, self.policy,
                                       title=f"strongest {kind} TRAK scores")
                display(fig)
                plt.close(fig)


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
         interactive: bool = False, **explorer_kwargs):
    """The live panel (``interactive=True``, JupyterLab) or a still figure (the book).

    Returns the ipywidgets box, or the matplotlib figure of :func:`still_figure`.
    """
    if interactive:
        ex = Explorer(predictions, policy, **explorer_kwargs)
        if finding not in ex.finding.options:
            raise KeyError(f"no predictions for finding '{finding}'")
        ex.finding.value = finding
        if method in ex.method.options:
            ex.method.value = method
        return ex.widget
    return still_figure(predictions, finding, method, explorer_kwargs.get("split", "test"))
