"""A synthetic MIMIC-CXR-JPG + MIMIC-IV copy, in MIMIC's own layout, with planted biases.

``generate(out_dir, ...)`` writes

- ``mimic-cxr-jpg/files/p1X/p<subject_id>/s<study_id>/<dicom_id>.jpg`` (greyscale JPEG),
- ``mimic-cxr-jpg/mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz``,
- ``mimiciv/hosp/{admissions,patients}.csv.gz``,

with MIMIC's columns and quirks (several views per study, blank ViewPosition,
studies without a CheXpert row, uncertain and blank labels, patients whose
admissions disagree on race, patients without any admission). Beside that
layout, and read only by evaluation code:

- ``planted_ground_truth.csv.gz``: the training images that carry a planted
  bias (``kind`` ``shortcut`` or ``label_flip``) and the finding it concerns;
- ``planted_eval_markers.csv.gz``: images that show a shortcut marker that is
  not planted harm: every validate/test marker (placed by group and label, not by
  what the image shows) and, where ``shortcut_train_p_neg`` > 0, the markers on the
  evaluation groups' training negatives;
- ``planted_eval_flips.csv.gz``: validate/test labels flipped (when
  ``label_flip_splits`` names them: evaluation labels as noisy as training ones);
- ``synthetic_spec.json``: every generator parameter, the cue of each finding,
  the marker positions, the counts, the generator version;
- ``.synthetic_complete``: written last; its presence means the folder is whole.

Named settings of these biases are the scenarios of :data:`SCENARIOS` (``planted``
is the default; ``null`` plants nothing; ``realistic`` all three, with noisy
evaluation labels). Planted biases (parameters in ``DEFAULTS``): (a) a *shortcut*: in the training
split, a per-finding marker appears on ``shortcut_p_pos`` of the positive images
of ``shortcut_group`` (``shortcut_p_neg`` of its negative or unlabelled images,
the midpoint of the two on its uncertain ones), so the marker
predicts the label; in validate/test it appears on ``shortcut_eval_p_neg`` of
the images of ``shortcut_eval_groups`` that are not positive (``shortcut_eval_p_pos``
of the positive ones), so a model that learnt the marker calls those negatives
positive; (b) *label errors*: CheXpert labels of training studies of
``label_flip_group`` are flipped (positive -> negative at
``label_flip_pos_rate``, negative/blank -> positive at ``label_flip_neg_rate``);
(c) optionally (off by default: ``hardware_group=None``), a *device difference*:
a share of ``hardware_group``'s images are noisier and lower in contrast. (a)
and (b) are listed in the ground truth, so removing exactly those training
images (the oracle arm) removes the planted harm; (c) is harm no data removal
can undo, which is why the default leaves it out: the testbed should measure
whether D3M finds harm that removal can fix. The group of a patient is the one
``race.race_for_subjects`` assigns by default, i.e. the group the cohort code
sees.

Labels follow the frontal-image label statistics of CheXpert (a Gaussian copula
matching each finding's positive / uncertain / negative / blank rates and the
pairwise co-positive rates). Each finding has a visible cue (``FINDING_CUES``).
Output is a deterministic function of the parameters (CSV files byte for byte,
JPEG bytes for a given Pillow version).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy.optimize import brentq
from scipy.special import ndtr, ndtri

from . import race as race_mod
from .constants import FINDINGS, RACE_GROUPS, SPLITS

GENERATOR_VERSION = "3"
SPEC_FILE = "synthetic_spec.json"
COMPLETE_FILE = ".synthetic_complete"
GROUND_TRUTH_FILE = "planted_ground_truth.csv.gz"
EVAL_MARKERS_FILE = "planted_eval_markers.csv.gz"
EVAL_FLIPS_FILE = "planted_eval_flips.csv.gz"   # validate/test labels flipped (scenario realistic)
CXR_DIR = "mimic-cxr-jpg"
IV_DIR = "mimiciv"

# CheXpert frontal-image label rates (shares of images labelled 1.0 / 0.0 / -1.0 /
# blank), copied from shared/data/label-statistics/chexpert_frontal_label_rates.csv
# (aggregates of the 191,027 frontal images of the CheXpert training labels).
LABEL_RATES = pd.DataFrame(
    [
        ("Atelectasis", 0.1556, 0.0054, 0.1563, 0.6827),
        ("Cardiomegaly", 0.1224, 0.0412, 0.0351, 0.8013),
        ("Consolidation", 0.068, 0.1026, 0.1276, 0.7018),
        ("Edema", 0.26, 0.0833, 0.0619, 0.5948),
        ("Enlarged Cardiomediastinum", 0.0481, 0.0803, 0.0538, 0.8177),
        ("Fracture", 0.0389, 0.0104, 0.0026, 0.948),
        ("Lung Lesion", 0.0369, 0.0041, 0.0058, 0.9533),
        ("Lung Opacity", 0.4932, 0.0264, 0.0232, 0.4572),
        ("No Finding", 0.0889, 0.0, 0.0, 0.9111),
        ("Pleural Effusion", 0.4026, 0.1324, 0.0501, 0.4149),
        ("Pleural Other", 0.0131, 0.0011, 0.0095, 0.9763),
        ("Pneumonia", 0.0245, 0.0098, 0.0837, 0.8821),
        ("Pneumothorax", 0.0926, 0.2503, 0.0142, 0.6429),
        ("Support Devices", 0.561, 0.028, 0.0048, 0.4062),
    ],
    columns=["finding", "positive", "negative", "uncertain", "blank"],
).set_index("finding")

# Share of frontal images positive for both findings of a pair (same source,
# chexpert_frontal_positive_cooccurrence.csv), rows/columns in FINDINGS order.
COPOSITIVE = pd.DataFrame(np.array([
    [0.15558, 0.01774, 0.00937, 0.04486, 0.00684, 0.00565, 0.00438, 0.06609, 0.0, 0.07637, 0.00148, 0.00262, 0.01492, 0.09893],
    [0.01774, 0.12242, 0.00655, 0.05656, 0.00828, 0.00333, 0.00241, 0.06116, 0.0, 0.05497, 0.00118, 0.00204, 0.00369, 0.0744],
    [0.00937, 0.00655, 0.06796, 0.01588, 0.00268, 0.00177, 0.0031, 0.02564, 0.0, 0.03474, 0.00116, 0.00413, 0.00358, 0.03841],
    [0.04486, 0.05656, 0.01588, 0.26004, 0.01056, 0.00488, 0.00406, 0.13762, 0.0, 0.13226, 0.0014, 0.00569, 0.0075, 0.17098],
    [0.00684, 0.00828, 0.00268, 0.01056, 0.04809, 0.00293, 0.00199, 0.02364, 0.0, 0.01806, 0.00072, 0.00065, 0.00366, 0.02669],
    [0.00565, 0.00333, 0.00177, 0.00488, 0.00293, 0.03893, 0.00129, 0.01625, 0.0, 0.01116, 0.00112, 0.00057, 0.00507, 0.01689],
    [0.00438, 0.00241, 0.0031, 0.00406, 0.00199, 0.00129, 0.03685, 0.02159, 0.0, 0.0133, 0.00111, 0.00164, 0.00405, 0.01431],
    [0.06609, 0.06116, 0.02564, 0.13762, 0.02364, 0.01625, 0.02159, 0.49318, 0.0, 0.25004, 0.00723, 0.01684, 0.04412, 0.30462],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.08886, 0.0, 0.0, 0.0, 0.0, 0.03885],
    [0.07637, 0.05497, 0.03474, 0.13226, 0.01806, 0.01116, 0.0133, 0.25004, 0.0, 0.40256, 0.00363, 0.00731, 0.03123, 0.26131],
    [0.00148, 0.00118, 0.00116, 0.0014, 0.00072, 0.00112, 0.00111, 0.00723, 0.0, 0.00363, 0.01311, 0.00044, 0.00105, 0.00561],
    [0.00262, 0.00204, 0.00413, 0.00569, 0.00065, 0.00057, 0.00164, 0.01684, 0.0, 0.00731, 0.00044, 0.02447, 0.00066, 0.00829],
    [0.01492, 0.00369, 0.00358, 0.0075, 0.00366, 0.00507, 0.00405, 0.04412, 0.0, 0.03123, 0.00105, 0.00066, 0.09262, 0.05736],
    [0.09893, 0.0744, 0.03841, 0.17098, 0.02669, 0.01689, 0.01431, 0.30462, 0.03885, 0.26131, 0.00561, 0.00829, 0.05736, 0.56102],
]), index=list(FINDINGS), columns=list(FINDINGS))

# What each finding looks like in a synthetic frontal image ("image left" is the
# patient's right, as on a radiograph). Uncertain (-1.0) studies get the cue at
# ``uncertain_strength`` times the strength of a positive one.
FINDING_CUES: dict[str, str] = {
    "Atelectasis": "bright horizontal plate-like band across the lower image-left lung",
    "Cardiomegaly": "heart silhouette widened by up to 70% (cardiothoracic ratio from ~0.35 to ~0.6)",
    "Consolidation": "dense homogeneous bright patch in the middle of the image-right lung, above the heart",
    "Edema": "bilateral hazy brightening around both hila (butterfly pattern)",
    "Enlarged Cardiomediastinum": "upper mediastinum (above the heart) widened on both sides",
    "Fracture": "small bright oval callus on the image-right lateral chest wall",
    "Lung Lesion": "small round bright nodule in the upper image-right lung",
    "Lung Opacity": "diffuse haze over both upper lung zones",
    "No Finding": "no cue of its own: the absence of the other cues (Support Devices allowed)",
    "Pleural Effusion": "bright fluid with a meniscus filling both costophrenic angles",
    "Pleural Other": "bright pleural thickening along the image-left lateral lung wall",
    "Pneumonia": "several bright mottled blobs in the middle of the image-left lung",
    "Pneumothorax": "very dark image-right lung apex without lung markings, edged by a thin pleural line",
    "Support Devices": "bright line of a central line from the image-right shoulder to the "
                       "mediastinum, with a bright box (pacemaker/port) at its start",
}

# Shortcut markers: one small bright square per finding, in fixed image
# positions on the left (first 7 findings) and right (last 7) border, like the
# laterality letters and tags technologists place on the detector.
MARKER_SLOTS: dict[str, tuple[float, float]] = {
    f: (-0.93 if k < 7 else 0.93, -0.84 + 0.28 * (k % 7)) for k, f in enumerate(FINDINGS)
}
MARKER_HALF = 0.065

VIEWS = ("PA", "AP", "LATERAL", "LL")
_VIEW_META = {  # ViewPosition -> (ViewCodeSequence_CodeMeaning, PatientOrientation..., procedure)
    "PA": ("postero-anterior", "Erect", "CHEST (PA AND LAT)"),
    "AP": ("antero-posterior", "Recumbent", "CHEST (PORTABLE AP)"),
    "LATERAL": ("lateral", "Erect", "CHEST (PA AND LAT)"),
    "LL": ("left lateral", "Erect", "CHEST (PA AND LAT)"),
}

DEFAULTS: dict[str, Any] = dict(
    n_patients=2000,          # ~5,000 frontal images, ~3,000 of them in train
    image_size=64,            # pixels (square JPEGs)
    seed=0,
    split_fractions=(0.5, 0.2, 0.3),  # train/validate/test share of patients (stratified by group)
    extra_studies_mean=1.2,   # studies per patient = 1 + Poisson(this), at most 8
    p_second_frontal=0.1,     # a study has a second frontal image
    p_lateral=0.6,            # a study has a lateral (LATERAL or LL) image
    p_blank_view=0.02,        # an image's ViewPosition is blank
    p_no_chexpert=0.03,       # a study has no row in the CheXpert file
    p_no_admission=0.1,       # a patient has images but no MIMIC-IV admission
    p_race_conflict=0.06,     # a patient's admissions name two different groups
    p_unknown_admission=0.08,  # a later admission records UNKNOWN/UNABLE/DECLINED
    cue_strength=0.35,        # multiplies every finding cue; at 1.0 every finding is near-perfectly
                              # separable and the planted biases leave no per-race gap to study
    uncertain_strength=0.5,   # cue of an uncertain label, relative to a positive one
    # (a) shortcut: in train, markers follow the label in one group only
    shortcut_group="White",
    shortcut_findings=tuple(FINDINGS),
    shortcut_p_pos=0.5,       # P(marker | label 1.0), train images of shortcut_group
    shortcut_p_neg=0.0,       # P(marker | label 0.0 / blank / no row)
    shortcut_eval_groups=("Black or African American",),
    shortcut_eval_p_pos=0.0,  # P(marker | label 1.0), validate/test images of those groups
    shortcut_eval_p_neg=0.8,  # P(marker | any other label), validate/test images of those groups
    shortcut_train_p_neg=0.0,  # P(marker | not positive), *training* images of those groups (realistic: the
                               # evaluation-time marker is also seen in training, at a lower rate)
    # (b) label errors in the CheXpert file, training studies of one group
    label_flip_group="Black or African American",
    label_flip_findings=tuple(FINDINGS),
    label_flip_pos_rate=0.4,  # 1.0 -> 0.0 (missed finding, as in under-diagnosis)
    label_flip_neg_rate=0.05,  # 0.0 or blank -> 1.0
    label_flip_splits=("train",),  # splits whose labels are flipped (realistic: all, so test labels are noisy)
    # (c) acquisition difference (off: None): part of one group's images come from a
    # noisier, lower-contrast device (weaker cues); no removal of training images undoes it
    hardware_group=None,
    hardware_prob=0.7,
    hardware_contrast=0.65,
    hardware_noise=0.05,
)

_SEQ_PARAMS = ("split_fractions", "shortcut_findings", "shortcut_eval_groups", "label_flip_findings",
               "label_flip_splits")

_NO_SHORTCUT = dict(shortcut_group=None, shortcut_eval_groups=(), shortcut_train_p_neg=0.0)
_NO_FLIPS = dict(label_flip_group=None)
_DEVICE = dict(hardware_group="Black or African American")
# Named settings of the testbed (``synthetic_scenario``): overrides of DEFAULTS. The methods page shows
# them as a table (:func:`scenario_table`).
SCENARIOS: dict[str, dict[str, Any]] = {
    "planted": {},
    "null": {**_NO_SHORTCUT, **_NO_FLIPS},
    "flips_only": {**_NO_SHORTCUT},
    "shortcut_only": {**_NO_FLIPS},
    "non_removable": {**_NO_SHORTCUT, **_NO_FLIPS, **_DEVICE},
    "realistic": {**_DEVICE, "shortcut_train_p_neg": 0.3, "label_flip_splits": ("train", "validate", "test")},
}
SCENARIO_TEXT = {
    "planted": "shortcut markers and label flips, both undone by removing the planted training images",
    "null": "nothing planted: no shortcut, no flips, no device difference",
    "flips_only": "label flips in one group's training labels only",
    "shortcut_only": "the shortcut marker only",
    "non_removable": "a noisier, lower-contrast device for part of one group's images: harm no removal undoes",
    "realistic": "all three; the evaluation-time marker also on that group's training negatives (rate 0.3); "
                 "labels flipped in validation and test as in training, as report-derived labels are",
}


def scenario_params(name: str) -> dict[str, Any]:
    """The generator settings of scenario ``name`` (overrides of ``DEFAULTS``)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown synthetic scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return dict(SCENARIOS[name])


def scenario_table() -> pd.DataFrame:
    """One row per scenario: what it plants and its generator settings (overrides of ``DEFAULTS``)."""
    def settings(over):
        if not over:
            return "the defaults of d3m_lib.synthetic.DEFAULTS"
        return "; ".join(f"{k} = {', '.join(v) if isinstance(v, tuple) and v else ('none' if v in ((), None) else v)}"
                         for k, v in over.items())
    return pd.DataFrame([{"scenario": name, "what is planted": SCENARIO_TEXT[name],
                          "generator settings": settings(over)} for name, over in SCENARIOS.items()])


# --------------------------------------------------------------------------- labels
def _copositive_prob(a: float, b: float, rho: float) -> float:
    """P(Z1 > a, Z2 > b) for a standard bivariate normal with correlation rho (fixed quadrature)."""
    x = np.linspace(a, a + 9.0, 4001)
    s = np.sqrt(1.0 - rho * rho)
    f = np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi) * ndtr((rho * x - b) / s)
    return float(np.sum((f[1:] + f[:-1]) * 0.5 * np.diff(x)))


def label_correlation() -> tuple[list[str], np.ndarray]:
    """Latent correlation of the 13 findings other than No Finding that matches the co-positive rates."""
    names = [f for f in FINDINGS if f != "No Finding"]
    thr = ndtri(1.0 - LABEL_RATES.loc[names, "positive"].to_numpy())
    k = len(names)
    corr = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            target = COPOSITIVE.loc[names[i], names[j]]
            lo, hi = -0.95, 0.95
            g = lambda r: _copositive_prob(thr[i], thr[j], r) - target  # noqa: E731
            if g(lo) > 0:
                r = lo
            elif g(hi) < 0:
                r = hi
            else:
                r = brentq(g, lo, hi, xtol=1e-6)
            corr[i, j] = corr[j, i] = r
    # Nearest positive-definite correlation matrix (clip eigenvalues, rescale).
    w, v = np.linalg.eigh(corr)
    corr = (v * np.clip(w, 1e-3, None)) @ v.T
    d = np.sqrt(np.diag(corr))
    return names, corr / np.outer(d, d)


def draw_labels(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """CheXpert-style labels (1.0 / 0.0 / -1.0 / NaN) for ``n`` studies.

    A latent Gaussian per finding: above the positive threshold -> 1.0, in the
    band just below it (of the uncertain rate's mass) -> -1.0, else 0.0 or blank
    in the proportion of the negative and blank rates. No Finding is 1.0 when no
    finding other than Support Devices is positive or uncertain, else blank.
    """
    names, corr = label_correlation()
    z = rng.standard_normal((n, len(names))) @ np.linalg.cholesky(corr).T
    r = LABEL_RATES.loc[names]
    t_pos = ndtri(1.0 - r["positive"].to_numpy())
    t_unc = ndtri(np.clip(1.0 - r["positive"].to_numpy() - r["uncertain"].to_numpy(), 1e-9, 1))
    p_zero = (r["negative"] / (r["negative"] + r["blank"])).to_numpy()
    zero = rng.random((n, len(names))) < p_zero
    lab = np.where(z > t_pos, 1.0, np.where(z > t_unc, -1.0, np.where(zero, 0.0, np.nan)))
    out = pd.DataFrame(lab, columns=names)
    others = [f for f in names if f != "Support Devices"]
    abnormal = (out[others].isin([1.0, -1.0])).any(axis=1)
    out["No Finding"] = np.where(abnormal, np.nan, 1.0)
    return out[list(FINDINGS)]


# --------------------------------------------------------------------------- images
def _soft(d: np.ndarray, eps: float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(d / eps))


def _ellipse(x, y, cx, cy, rx, ry, eps):
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return _soft((1.0 - r) * min(rx, ry), eps)


def _segment(x, y, a, b, half_width, eps):
    ax, ay = a
    bx, by = b
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    d = np.hypot(x - (ax + t * dx), y - (ay + t * dy))
    return _soft(half_width - d, eps)


def _blend(img, mask, value):
    return img * (1.0 - mask) + value * mask


def _smooth_noise(rng, size, cells):
    """Smooth random field in [-1, 1] (bilinear upsampling of a coarse grid)."""
    g = rng.uniform(-1, 1, (cells + 1, cells + 1))
    t = np.linspace(0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def render_image(size: int, view: str, strengths: np.ndarray, markers: np.ndarray,
                 hardware: bool, seed: int, hardware_contrast: float = 0.65,
                 hardware_noise: float = 0.05) -> np.ndarray:
    """One synthetic radiograph as a ``size x size`` uint8 array.

    ``strengths``: cue strength per finding (FINDINGS order, 0 = absent);
    ``markers``: bool per finding, draw that finding's shortcut marker;
    ``hardware``: acquired on the noisier, lower-contrast device. Acquisition
    (rotation, shift, magnification, contrast, noise) is drawn from ``seed``;
    AP views are magnified, the heart more so, as on a portable film.
    """
    rng = np.random.default_rng(seed)
    s = dict(zip(FINDINGS, np.asarray(strengths, dtype=float)))
    eps = 1.2 / size
    u = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    U, V = np.meshgrid(u, u)  # U: image x (left -> right), V: image y (top -> bottom)
    ap = view == "AP"
    ang = np.deg2rad(rng.uniform(-4, 4))
    scale = rng.uniform(1.06, 1.14) if ap else rng.uniform(0.97, 1.03)
    sx, sy = rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.04) + (0.04 if ap else 0.0)
    du, dv = U - sx, V - sy
    x = (du * np.cos(ang) + dv * np.sin(ang)) / scale
    y = (-du * np.sin(ang) + dv * np.cos(ang)) / scale

    img = np.full((size, size), 0.06)
    body = _ellipse(x, y, 0.0, 0.05, 0.86, 1.08, eps)
    img = img + 0.42 * body
    texture = _smooth_noise(rng, size, max(4, size // 6))
    if view in ("LATERAL", "LL"):
        lung = _ellipse(x, y, -0.05, -0.12, 0.55, 0.62, eps) * _soft(0.42 - y, eps)
        img = img - 0.30 * lung * (1 - 0.2 * texture)
        img = _blend(img, _soft(0.09 - np.abs(x - 0.55), eps) * body, 0.74)  # spine
        heart_rx = 0.26 * (1 + 0.4 * s["Cardiomegaly"])
        img = _blend(img, _ellipse(x, y, -0.22, 0.25, heart_rx, 0.24, eps), 0.66)
        fluid = lung * _soft(y - (0.42 - 0.3 * s["Pleural Effusion"]), eps) * _soft(x - 0.1, eps)
        img = _blend(img, fluid, 0.62)
        line = _segment(x, y, (-0.2, -0.95), (-0.1, -0.05), 0.035, eps)
        img = _blend(img, line * min(1.0, s["Support Devices"]), 0.97)
    else:
        yd = 0.40 + 0.22 * x ** 2                     # diaphragm dome
        above = _soft(yd - y, eps)
        lung_l = _ellipse(x, y, -0.38, -0.12, 0.30, 0.62, eps) * above   # image left
        lung_r = _ellipse(x, y, 0.38, -0.12, 0.29, 0.60, eps) * above    # image right
        # Pneumothorax: image-right apex collapses (no markings, darker).
        ptx = s["Pneumothorax"] * lung_r * _soft(-0.38 - y, eps)
        markings = 1 - 0.25 * texture * (1 - np.minimum(ptx * 2, 1))
        lung = np.maximum(lung_l, lung_r)
        img = img - 0.32 * lung * markings
        img = img - 0.14 * ptx
        pleural_line = lung_r * _soft(0.025 - np.abs(y + 0.38), eps) * _soft(x - 0.15, eps)
        img = img + 0.25 * s["Pneumothorax"] * pleural_line
        # Ribs and clavicles.
        ribs = _soft(np.sin(2 * np.pi * (3.1 * y + 0.55 * x ** 2)) - 0.6, 0.15)
        img = img + 0.06 * ribs * lung * (1 - np.minimum(ptx * 2, 1))
        for side in (-1, 1):
            img = img + 0.12 * _segment(x, y, (0.1 * side, -0.70), (0.62 * side, -0.80), 0.03, eps)
        # Mediastinum (wider above the heart with Enlarged Cardiomediastinum), spine, heart.
        w_med = 0.11 + 0.11 * s["Enlarged Cardiomediastinum"] * _soft(0.1 - y, 0.05)
        med = _soft(w_med - np.abs(x), eps) * _soft(y + 0.92, eps) * _soft(0.45 - y, eps)
        img = _blend(img, med, 0.70)
        img = _blend(img, _soft(0.05 - np.abs(x), eps) * body, 0.76)
        heart_rx = 0.30 * (1 + 0.7 * s["Cardiomegaly"]) * (1.1 if ap else 1.0)
        img = _blend(img, _ellipse(x, y, 0.10, 0.24, heart_rx, 0.22, eps), 0.72)
        # Findings in the lungs.
        band = _soft(0.065 - np.abs(y - (0.22 + 0.12 * (x + 0.38))), eps) * lung_l
        img = img + 0.38 * s["Atelectasis"] * band
        img = _blend(img, s["Consolidation"] * _ellipse(x, y, 0.50, -0.08, 0.12, 0.11, eps) * lung_r, 0.62)
        hila = (np.exp(-((x + 0.22) ** 2 + (y + 0.02) ** 2) / (2 * 0.14 ** 2))
                + np.exp(-((x - 0.22) ** 2 + (y + 0.02) ** 2) / (2 * 0.14 ** 2)))
        img = img + 0.40 * s["Edema"] * hila * lung
        img = img + 0.22 * s["Lung Opacity"] * _soft(-0.15 - y, 0.06) * lung
        img = img + 0.45 * s["Lung Lesion"] * _ellipse(x, y, 0.40, -0.40, 0.075, 0.075, eps)
        pn = np.zeros_like(img)
        for _ in range(5):
            cx, cy = -0.38 + rng.uniform(-0.12, 0.12), -0.05 + rng.uniform(-0.15, 0.15)
            r = rng.uniform(0.05, 0.08)
            pn = np.maximum(pn, _ellipse(x, y, cx, cy, r, r, eps))
        img = img + 0.35 * s["Pneumonia"] * pn * lung_l
        wall = _soft(0.055 - np.abs(x + 0.64 + 0.05 * (y + 0.2)), eps) * _soft(0.15 - y, eps) * _soft(y + 0.55, eps)
        img = img + 0.40 * s["Pleural Other"] * wall
        img = img + 0.55 * s["Fracture"] * _ellipse(x, y, 0.72, -0.25, 0.06, 0.09, eps)
        # Pleural effusion: fluid rising laterally (meniscus) from each costophrenic angle.
        for cx in (-0.38, 0.38):
            rel = np.clip((np.abs(x) - 0.1) / 0.6, 0, 1)
            top = yd - 0.33 * s["Pleural Effusion"] * (0.3 + 0.7 * rel ** 2)
            region = _ellipse(x, y, cx, 0.0, 0.34, 0.62, eps) * _soft(y - top, eps) * _soft(yd + 0.04 - y, eps)
            img = _blend(img, region * min(1.0, 1.5 * s["Pleural Effusion"]), 0.6)
        # Support devices: a central line and a port/pacemaker box.
        sd = min(1.0, s["Support Devices"])
        line = _segment(x, y, (0.62, -0.92), (0.06, -0.05), 0.035, eps)
        box = _soft(0.09 - np.abs(x - 0.60), eps) * _soft(0.06 - np.abs(y + 0.76), eps)
        img = _blend(img, np.maximum(line, box) * sd, 0.97)

    # Shortcut markers: fixed in image coordinates (on the detector, not the patient).
    for k, f in enumerate(FINDINGS):
        if markers[k]:
            mx, my = MARKER_SLOTS[f]
            sq = _soft(MARKER_HALF - np.abs(U - mx), eps) * _soft(MARKER_HALF - np.abs(V - my), eps)
            img = _blend(img, sq, 1.0)

    contrast = rng.uniform(0.85, 1.15) * (hardware_contrast if hardware else 1.0)
    noise = rng.uniform(0.015, 0.035) + (hardware_noise if hardware else 0.0)
    img = 0.4 + contrast * (img - 0.4) + rng.uniform(-0.04, 0.04)
    img = img + noise * rng.standard_normal(img.shape)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.9, 1.1)
    return np.round(img * 255).astype(np.uint8)


def _render_chunk(jobs: list[tuple]) -> int:
    """Render and write a list of images (worker side)."""
    for path, size, view, strengths, markers, hardware, seed, hc, hn in jobs:
        arr = render_image(size, view, strengths, markers, hardware, seed, hc, hn)
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=90)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(buf.getvalue())
    return len(jobs)


# --------------------------------------------------------------------------- tables
def _ids(rng, n, start, max_gap):
    """n distinct increasing ids from ``start`` with random gaps."""
    return start + np.cumsum(rng.integers(1, max_gap, n))


def _largest_remainder(total: int, shares: np.ndarray, minimum: int) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``shares``, each at least ``minimum``."""
    want = shares / shares.sum() * total
    n = np.maximum(np.floor(want).astype(int), minimum)
    while n.sum() < total:
        n[np.argmax(want - n)] += 1
    while n.sum() > total:
        n[np.argmax(np.where(n > minimum, n - want, -np.inf))] -= 1
    return n


def _fmt_time(t: np.ndarray) -> np.ndarray:
    return np.char.replace(np.datetime_as_string(t.astype("datetime64[s]"), unit="s"), "T", " ")


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    """gzip CSV with a zero gzip timestamp, so equal content gives equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, compression={"method": "gzip", "mtime": 0})


def _normalise(params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"generate() got unknown parameter(s) {unknown}; known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **params}
    for k in _SEQ_PARAMS:
        p[k] = [p[k]] if isinstance(p[k], str) else list(p[k])
    for k in ("shortcut_findings", "label_flip_findings"):
        bad = [f for f in p[k] if f not in FINDINGS]
        if bad:
            raise ValueError(f"{k}: {bad} are not CheXpert findings; expected names from constants.FINDINGS")
    for k in ("shortcut_group", "label_flip_group", "hardware_group"):
        if p[k] is not None and p[k] not in RACE_GROUPS:
            raise ValueError(f"{k}={p[k]!r}: expected one of {RACE_GROUPS} or None")
    bad = [g for g in p["shortcut_eval_groups"] if g not in RACE_GROUPS]
    if bad:
        raise ValueError(f"shortcut_eval_groups: {bad} not in {RACE_GROUPS}")
    bad = [x for x in p["label_flip_splits"] if x not in SPLITS]
    if bad:
        raise ValueError(f"label_flip_splits: {bad} not in {SPLITS}")
    for k in ("shortcut_p_pos", "shortcut_p_neg", "shortcut_eval_p_pos", "shortcut_eval_p_neg",
              "shortcut_train_p_neg", "label_flip_pos_rate", "label_flip_neg_rate", "hardware_prob"):
        if not 0.0 <= float(p[k]) <= 1.0:
            raise ValueError(f"{k}={p[k]!r}: a probability, expected a number in [0, 1]")
    fr = p["split_fractions"]
    if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1) > 1e-6:
        raise ValueError(f"split_fractions={fr}: need three positive shares (train, validate, test) summing to 1")
    if int(p["n_patients"]) < 30:
        raise ValueError(f"n_patients={p['n_patients']}: need at least 30 (3 per group in every split)")
    if int(p["image_size"]) < 16:
        raise ValueError(f"image_size={p['image_size']}: need at least 16 pixels")
    p["n_patients"], p["image_size"], p["seed"] = int(p["n_patients"]), int(p["image_size"]), int(p["seed"])
    return json.loads(json.dumps(p))


def _cohort_tables(p: dict[str, Any]) -> dict[str, Any]:
    """All tables and per-image drawing instructions; no file is written here."""
    rng = np.random.default_rng([p["seed"], 1])
    n = p["n_patients"]
    strings = np.array(race_mod.MIMIC_RACE_STRINGS)
    shares = np.array([race_mod.RACE_SHARES_PER_MILLE[s] for s in strings])
    groups_of = np.array([race_mod.RACE_TO_GROUP[s] for s in strings])

    # Patients: a fixed number per group (each group at least 3 patients with
    # admissions), the rest without any admission; race strings within a group
    # drawn by their MIMIC shares.
    n_noadm = int(round(p["p_no_admission"] * n))
    g_share = np.array([shares[groups_of == g].sum() for g in RACE_GROUPS])
    per_group = _largest_remainder(n - n_noadm, g_share, 3)
    true_str = []
    for g, k in zip(RACE_GROUPS, per_group):
        idx = np.flatnonzero(groups_of == g)
        true_str += list(rng.choice(strings[idx], size=k, p=shares[idx] / shares[idx].sum()))
    true_str = np.array(true_str + [""] * n_noadm, dtype=object)
    true_str = true_str[rng.permutation(n)]
    subject_ids = _ids(rng, n, 10_000_000, 4000)
    anchor_year = rng.integers(2110, 2187, n)
    gender = np.where(rng.random(n) < 0.52, "M", "F")
    anchor_age = np.clip(np.round(rng.normal(62, 17, n)), 18, 91).astype(int)
    year_groups = np.array(["2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019", "2020 - 2022"])
    dies = rng.random(n) < 0.2
    start = (anchor_year - 1970).astype("datetime64[Y]").astype("datetime64[s]")
    first_day = start + rng.integers(0, 300, n).astype("timedelta64[D]")
    dod = np.where(dies, _fmt_time(first_day + np.timedelta64(3 * 365, "D")).astype(object), None)
    patients = pd.DataFrame({
        "subject_id": subject_ids, "gender": gender, "anchor_age": anchor_age,
        "anchor_year": anchor_year, "anchor_year_group": year_groups[rng.integers(0, 5, n)],
        "dod": [d[:10] if d else None for d in dod],
    })

    # Admissions.
    unknown_strs = np.array(["UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER"])
    known_groups = [g for g in RACE_GROUPS if g != "Unknown"]
    rows = []
    hadm = _ids(rng, int(n * 4), 20_000_000, 3000)
    h = 0
    for i in range(n):
        if not true_str[i]:
            continue
        g = race_mod.RACE_TO_GROUP[true_str[i]]
        k = 1 + min(rng.poisson(0.8), 5)
        races = [true_str[i]] * k
        if g != "Unknown" and rng.random() < p["p_race_conflict"]:
            other = rng.choice([x for x in known_groups if x != g])
            cand = strings[groups_of == other]
            races = [true_str[i], true_str[i], str(rng.choice(cand))]
            races = [races[j] for j in rng.permutation(3)]
        elif g != "Unknown":
            for j in range(1, len(races)):
                if rng.random() < p["p_unknown_admission"]:
                    races[j] = str(rng.choice(unknown_strs))
        t = first_day[i] + np.sort(rng.integers(0, 4 * 365 * 86400, len(races))).astype("timedelta64[s]")
        for j, r in enumerate(races):
            rows.append((subject_ids[i], hadm[h], t[j], r))
            h += 1
    adm = pd.DataFrame(rows, columns=["subject_id", "hadm_id", "t", "race"])
    m = len(adm)
    los = rng.integers(6 * 3600, 12 * 86400, m).astype("timedelta64[s]")
    admit = adm["t"].to_numpy().astype("datetime64[s]")
    ed = rng.random(m) < 0.6
    died = rng.random(m) < 0.04
    admissions = pd.DataFrame({
        "subject_id": adm["subject_id"], "hadm_id": adm["hadm_id"],
        "admittime": _fmt_time(admit), "dischtime": _fmt_time(admit + los),
        "deathtime": np.where(died, _fmt_time(admit + los), None),
        "admission_type": rng.choice(["EW EMER.", "URGENT", "ELECTIVE", "OBSERVATION ADMIT",
                                      "EU OBSERVATION", "DIRECT EMER."], m),
        "admission_location": rng.choice(["EMERGENCY ROOM", "TRANSFER FROM HOSPITAL",
                                          "PHYSICIAN REFERRAL", "WALK-IN/SELF REFERRAL"], m),
        "discharge_location": np.where(died, "DIED", rng.choice(
            np.array(["HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY", None], dtype=object), m)),
        "insurance": rng.choice(["Medicare", "Medicaid", "Other"], m),
        "language": np.where(rng.random(m) < 0.9, "ENGLISH", "?"),
        "marital_status": rng.choice(np.array(["MARRIED", "SINGLE", "WIDOWED", "DIVORCED", None],
                                              dtype=object), m),
        "race": adm["race"],
        "edregtime": np.where(ed, _fmt_time(admit - np.timedelta64(5 * 3600, "s")), None),
        "edouttime": np.where(ed, _fmt_time(admit), None),
        "hospital_expire_flag": died.astype(int),
    })

    # The group every later step (and the cohort code, by default) assigns.
    grp = race_mod.race_for_subjects(subject_ids, admissions, source="synthetic admissions")
    group = grp.set_index("subject_id").loc[subject_ids, "group"].to_numpy().astype(str)

    # Patient-disjoint split, stratified by group (every group in every split).
    split = np.empty(n, dtype=object)
    fr = np.array(p["split_fractions"])
    for g in RACE_GROUPS:
        idx = np.flatnonzero(group == g)
        idx = idx[rng.permutation(len(idx))]
        k = _largest_remainder(len(idx), fr, 1 if len(idx) >= 3 else 0)
        split[idx] = np.repeat(np.array(SPLITS, dtype=object), k)

    # Studies and their labels.
    n_st = 1 + np.minimum(rng.poisson(p["extra_studies_mean"], n), 7)
    st_pat = np.repeat(np.arange(n), n_st)
    S = len(st_pat)
    study_ids = rng.permutation(_ids(rng, S, 50_000_000, 8000))
    labels = draw_labels(S, rng)
    no_row = rng.random(S) < p["p_no_chexpert"]
    st_time = first_day[st_pat] + rng.integers(0, 4 * 365 * 86400, S).astype("timedelta64[s]")

    # Images per study: frontal (PA/AP, AP likelier with devices), maybe a second
    # frontal, maybe a lateral.
    sd_pos = labels["Support Devices"].to_numpy() == 1.0
    n_front = 1 + (rng.random(S) < p["p_second_frontal"])
    has_lat = rng.random(S) < p["p_lateral"]
    views, img_st = [], []
    p_ap = np.where(sd_pos, 0.85, 0.45)
    for j in range(S):
        v = "AP" if rng.random() < p_ap[j] else "PA"
        for _ in range(n_front[j]):
            views.append(v)
            img_st.append(j)
        if has_lat[j]:
            views.append("LATERAL" if rng.random() < 0.8 else "LL")
            img_st.append(j)
    img_st = np.array(img_st)
    views = np.array(views, dtype=object)
    N = len(img_st)
    hexes = rng.integers(0, 2 ** 32, (N, 5), dtype=np.uint64)
    dicom_ids = np.array(["-".join(f"{int(v):08x}" for v in row) for row in hexes], dtype=object)
    if len(set(dicom_ids)) != N:
        raise RuntimeError("dicom_id collision; use another seed")
    blank_view = rng.random(N) < p["p_blank_view"]
    img_pat = st_pat[img_st]

    # Cue strength per study from the *true* labels (before any planted flip).
    lab = labels.to_numpy()
    sev = rng.uniform(0.4, 1.0, lab.shape)
    strengths = np.where(lab == 1.0, sev, np.where(lab == -1.0, p["uncertain_strength"] * sev, 0.0))
    strengths = strengths * p["cue_strength"]
    strengths[:, FINDINGS.index("No Finding")] = 0.0

    # (b) label flips in the CheXpert file: training studies of label_flip_group.
    observed = labels.copy()
    flips = []
    if p["label_flip_group"] is not None:
        st_ok = (group[st_pat] == p["label_flip_group"]) & np.isin(split[st_pat], list(p["label_flip_splits"])) \
            & ~no_row
        for f in p["label_flip_findings"]:
            col = observed[f].to_numpy().copy()
            r = rng.random(S)
            pos = st_ok & (col == 1.0) & (r < p["label_flip_pos_rate"])
            neg = st_ok & (np.isnan(col) | (col == 0.0)) & (r < p["label_flip_neg_rate"])
            col[pos], col[neg] = 0.0, 1.0
            observed[f] = col
            flips += [(j, f) for j in np.flatnonzero(pos | neg)]

    # (a) shortcut markers, per image and finding.
    markers = np.zeros((N, len(FINDINGS)), dtype=bool)
    img_group, img_split = group[img_pat], split[img_pat]
    obs_img = observed.to_numpy()[img_st]
    obs_img[no_row[img_st]] = np.nan
    r = rng.random((N, len(FINDINGS)))
    if p["shortcut_group"] is not None:
        tr = (img_group == p["shortcut_group"]) & (img_split == "train")
        for f in p["shortcut_findings"]:
            k = FINDINGS.index(f)
            prob = np.where(obs_img[:, k] == 1.0, p["shortcut_p_pos"],
                            np.where(obs_img[:, k] == -1.0, 0.5 * (p["shortcut_p_pos"] + p["shortcut_p_neg"]),
                                     p["shortcut_p_neg"]))
            markers[:, k] = tr & (r[:, k] < prob)
    in_eval_group = np.isin(img_group, list(p["shortcut_eval_groups"]))
    ev = in_eval_group & (img_split != "train")
    counter = np.zeros_like(markers)  # markers on the evaluation groups' training negatives: not planted harm
    for f in p["shortcut_findings"]:
        k = FINDINGS.index(f)
        prob = np.where(obs_img[:, k] == 1.0, p["shortcut_eval_p_pos"], p["shortcut_eval_p_neg"])
        markers[:, k] |= ev & (r[:, k] < prob)
        if p["shortcut_train_p_neg"] > 0:
            counter[:, k] = (in_eval_group & (img_split == "train") & (obs_img[:, k] != 1.0)
                             & (r[:, k] < p["shortcut_train_p_neg"]))
    markers |= counter
    hardware = ((img_group == p["hardware_group"]) & (rng.random(N) < p["hardware_prob"])
                if p["hardware_group"] is not None else np.zeros(N, dtype=bool))
    img_seed = rng.integers(0, 2 ** 62, N)

    # MIMIC-CXR-JPG tables.
    sid_img = subject_ids[img_pat]
    stid_img = study_ids[img_st]
    vmeta = np.array([_VIEW_META[v] for v in views], dtype=object)
    t_img = st_time[img_st]
    date = np.datetime_as_string(t_img.astype("datetime64[D]")).astype(object)
    secs = (t_img - t_img.astype("datetime64[D]")).astype(int)
    study_time = (secs // 3600) * 10000 + (secs // 60 % 60) * 100 + secs % 60 + rng.integers(0, 1000, N) / 1000
    size = p["image_size"]
    metadata = pd.DataFrame({
        "dicom_id": dicom_ids, "subject_id": sid_img, "study_id": stid_img,
        "PerformedProcedureStepDescription": vmeta[:, 2],
        "ViewPosition": np.where(blank_view, None, views),
        "Rows": size, "Columns": size,
        "StudyDate": [int(d.replace("-", "")) for d in date],
        "StudyTime": np.round(study_time, 3),
        "ProcedureCodeSequence_CodeMeaning": vmeta[:, 2],
        "ViewCodeSequence_CodeMeaning": np.where(blank_view, None, vmeta[:, 0]),
        "PatientOrientationCodeSequence_CodeMeaning": np.where(blank_view, None, vmeta[:, 1]),
    })
    order = np.lexsort((dicom_ids, stid_img, sid_img))
    metadata = metadata.iloc[order].reset_index(drop=True)
    chexpert = pd.concat([pd.DataFrame({"subject_id": subject_ids[st_pat], "study_id": study_ids}),
                          observed], axis=1)[~no_row]
    chexpert = chexpert.sort_values(["subject_id", "study_id"]).reset_index(drop=True)
    split_df = pd.DataFrame({"dicom_id": dicom_ids, "study_id": stid_img, "subject_id": sid_img,
                             "split": img_split}).iloc[order].reset_index(drop=True)

    # Ground truth (training images only) and validate/test markers.
    gt = []
    eval_flips = []
    for j, f in flips:
        for i in np.flatnonzero(img_st == j):
            row = (dicom_ids[i], sid_img[i], stid_img[i], img_split[i])
            if img_split[i] == "train":
                gt.append(row + ("label_flip", f))
            else:
                eval_flips.append(row + (f,))
    for i, k in zip(*np.nonzero(markers & ~counter)):
        row = (dicom_ids[i], sid_img[i], stid_img[i], img_split[i])
        if img_split[i] == "train":
            gt.append(row + ("shortcut", FINDINGS[k]))
    gt = pd.DataFrame(gt, columns=["dicom_id", "subject_id", "study_id", "split", "kind", "finding"])
    gt = gt.sort_values(["kind", "finding", "subject_id", "study_id", "dicom_id"]).reset_index(drop=True)
    evm = [(dicom_ids[i], sid_img[i], stid_img[i], img_split[i], FINDINGS[k])
           for i, k in zip(*np.nonzero(markers)) if img_split[i] != "train" or counter[i, k]]
    evm = pd.DataFrame(evm, columns=["dicom_id", "subject_id", "study_id", "split", "finding"])
    evm = evm.sort_values(["finding", "subject_id", "study_id", "dicom_id"]).reset_index(drop=True)

    paths = [f"files/p{str(s)[:2]}/p{s}/s{st}/{d}.jpg" for s, st, d in zip(sid_img, stid_img, dicom_ids)]
    jobs = [(paths[i], size, views[i], strengths[img_st[i]], markers[i], bool(hardware[i]),
             int(img_seed[i]), p["hardware_contrast"], p["hardware_noise"]) for i in range(N)]
    frontal = np.isin(views, ["PA", "AP"]) & ~blank_view
    counts = {
        "patients": n, "patients_without_admission": int(n_noadm), "admissions": int(m),
        "studies": int(S), "studies_without_chexpert": int(no_row.sum()), "images": int(N),
        "frontal_images": int(frontal.sum()),
        "patients_conflicting_race": int((grp["n_distinct_groups"] > 1).sum()),
        "frontal_images_by_split_group": {
            s: {g: int((frontal & (img_split == s) & (img_group == g)).sum()) for g in RACE_GROUPS}
            for s in SPLITS},
        "patients_by_split_group": {
            s: {g: int(((split == s) & (group == g)).sum()) for g in RACE_GROUPS} for s in SPLITS},
        "planted_label_flips": int(len(flips)),
        "planted_ground_truth_rows": {k: int(v) for k, v in gt["kind"].value_counts().items()},
        "eval_marker_rows": int(len(evm)),
        "eval_label_flips": int(len(eval_flips)),
        "hardware_images": int(hardware.sum()),
    }
    eval_flips = pd.DataFrame(eval_flips, columns=["dicom_id", "subject_id", "study_id", "split", "finding"])
    return dict(patients=patients, admissions=admissions, metadata=metadata, chexpert=chexpert,
                split=split_df, ground_truth=gt, eval_markers=evm, eval_flips=eval_flips, jobs=jobs, counts=counts)


# --------------------------------------------------------------------------- entry points
def generate(out_dir: str | Path, n_jobs: int | None = None, progress: bool = True,
             **params: Any) -> dict[str, Any]:
    """Write a synthetic MIMIC-CXR-JPG + MIMIC-IV cohort into ``out_dir``; return a summary.

    Parameters are those of ``DEFAULTS`` (``n_patients``, ``image_size``,
    ``seed``, split fractions, quirk rates and the planted-bias parameters).
    ``n_jobs`` (image-writing processes, default all cores) does not change the
    output. If ``out_dir`` already holds a complete cohort made with the same
    parameters, its summary is returned without regenerating; a non-empty
    ``out_dir`` made with other parameters (or holding anything else) is refused
    with a ValueError, never overwritten.
    """
    p = _normalise(params)
    out = Path(out_dir)
    spec_path, done_path = out / SPEC_FILE, out / COMPLETE_FILE
    if out.exists() and any(out.iterdir()):
        if not spec_path.exists():
            raise ValueError(f"{out} is not empty and holds no {SPEC_FILE}: refusing to write a "
                             f"synthetic cohort into it; choose an empty or new folder")
        old = json.loads(spec_path.read_text())
        if old.get("version") != GENERATOR_VERSION or old.get("params") != p:
            changed = sorted(k for k in set(p) | set(old.get("params", {}))
                             if p.get(k) != old.get("params", {}).get(k))
            if old.get("version") != GENERATOR_VERSION:
                changed.append(f"generator version {old.get('version')} -> {GENERATOR_VERSION}")
            raise ValueError(f"{out} holds a synthetic cohort made with other parameters "
                             f"({', '.join(changed)}); refusing to overwrite it: delete the folder "
                             f"or choose another --out")
        if done_path.exists():
            summary = json.loads(done_path.read_text())
            summary["reused"] = True
            return summary
        # Same parameters but unfinished: regenerate everything in place.
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    spec = {"generator": "d3m_lib.synthetic", "version": GENERATOR_VERSION, "params": p,
            "finding_cues": FINDING_CUES, "marker_slots": {f: list(v) for f, v in MARKER_SLOTS.items()},
            "marker_half_size": MARKER_HALF,
            "coordinates": "image x, y in [-1, 1], x left->right, y top->bottom",
            "race_shares_per_mille": race_mod.RACE_SHARES_PER_MILLE,
            "group_rule": "d3m_lib.race.race_for_subjects(rule='mode_recent', missing='unknown')",
            "label_source": "CheXpert frontal label rates and co-positive rates (Gaussian copula)"}
    spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True))

    t = _cohort_tables(p)
    cxr, hosp = out / CXR_DIR, out / IV_DIR / "hosp"
    _write_csv(t["metadata"], cxr / "mimic-cxr-2.0.0-metadata.csv.gz")
    _write_csv(t["chexpert"], cxr / "mimic-cxr-2.0.0-chexpert.csv.gz")
    _write_csv(t["split"], cxr / "mimic-cxr-2.0.0-split.csv.gz")
    _write_csv(t["admissions"], hosp / "admissions.csv.gz")
    _write_csv(t["patients"], hosp / "patients.csv.gz")
    _write_csv(t["ground_truth"], out / GROUND_TRUTH_FILE)
    _write_csv(t["eval_markers"], out / EVAL_MARKERS_FILE)
    _write_csv(t["eval_flips"], out / EVAL_FLIPS_FILE)

    jobs = [(str(cxr / j[0]),) + j[1:] for j in t["jobs"]]
    n_jobs = n_jobs or os.cpu_count() or 1
    chunks = [jobs[i:i + 200] for i in range(0, len(jobs), 200)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="synthetic images", unit="img")
    if n_jobs > 1 and len(chunks) > 1:
        with get_context("forkserver").Pool(n_jobs) as pool:  # no fork of a threaded (torch) parent
            for k in pool.imap_unordered(_render_chunk, chunks):
                bar is not None and bar.update(k)
    else:
        for c in chunks:
            k = _render_chunk(c)
            bar is not None and bar.update(k)
    if bar is not None:
        bar.close()

    spec["counts"] = t["counts"]
    spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True))
    summary = {"out_dir": str(out), "mimic_cxr_dir": str(cxr), "mimic_iv_dir": str(out / IV_DIR),
               "seconds": round(time.perf_counter() - t0, 2), "reused": False, **t["counts"]}
    done_path.write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m d3m_lib demo-data``."""
    parser.add_argument("--out", required=True, help="folder to write the synthetic cohort into")
    parser.add_argument("--n-patients", type=int, default=DEFAULTS["n_patients"])
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"], help="pixels")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--scenario", default="planted", choices=list(SCENARIOS),
                        help="which biases to plant (d3m_lib.synthetic.SCENARIOS)")
    parser.add_argument("--jobs", type=int, default=None, help="image-writing processes (default: all cores)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``generate`` from parsed CLI flags and print its summary."""
    summary = generate(args.out, n_jobs=args.jobs, n_patients=args.n_patients,
                       image_size=args.image_size, seed=args.seed, **scenario_params(args.scenario))
    print(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def planted_ground_truth(run, override: str | Path | None = None) -> pd.DataFrame | None:
    """The planted ground truth of the run's synthetic cohort, or None on real data.

    ``run`` is a ``RunDir``; the cohort's folder comes from stage 01's manifest
    (``summary.synthetic_dir``, relative to the run folder when it lies inside). ``override`` names the file explicitly. A
    synthetic cohort without its ground-truth file is an error, not a silent skip.
    """
    if override:
        path = Path(override)
        if not path.exists():
            raise FileNotFoundError(f"synthetic_ground_truth={str(override)!r} does not exist")
        return pd.read_csv(path, dtype=str)
    summary = (run.manifest("01_cohort") or {}).get("summary", {})
    if not (summary.get("data") or {}).get("synthetic", summary.get("synthetic")):  # what stage 01 read
        return None
    path = run.path / summary["synthetic_dir"] / GROUND_TRUTH_FILE  # relative to the run (or absolute)
    if not path.exists():
        raise FileNotFoundError(f"the run's cohort is synthetic but {path} is missing; "
                                "re-run notebook 01 or pass synthetic_ground_truth")
    return pd.read_csv(path, dtype=str)
