"""Read NIH ChestX-ray14 into the cohort table (group = sex or age band).

NIH ChestX-ray14 is public without credentials, so it is the real-data check of
the pipeline for readers without MIMIC access. Input: ``<nih_dir>/Data_Entry_2017_v2020.csv``
(NIH's header: ``Image Index, Finding Labels, Follow-up #, Patient ID, Patient
Age, Patient Gender, View Position, ...``) and the PNGs, either flat under
``<nih_dir>/images/`` or in the full release's ``images_001/images/ ...`` folders.

Differences from MIMIC, and how they are bridged:

- Labels: NIH's 14 labels are text-mined from reports, with no "uncertain"
  value; they are mapped to the CheXpert findings by ``NIH_TO_CHEXPERT``
  (each choice documented there). CheXpert findings that no NIH label maps to
  are all-NaN columns: they have no task on NIH.
- Split: NIH ships only a train/test list, no validation split. This module
  draws its own seeded, patient-disjoint split (``patient_split``).
- Group: NIH has no race field. ``group="sex"`` (Female/Male) or
  ``group="age_band"`` (the patient's age at that image, binned by ``age_bands``).
- ``subject_id`` = Patient ID, ``study_id`` = image stem (each NIH image is its
  own study), ``image_id`` = Image Index.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .cohort import (CohortResult, Flow, InputError, bad_values, check_splits, finalize_table,
                     frontal_views, read_table)
from .constants import FINDINGS, FRONTAL_VIEWS, SPLITS

LABEL_FILE = "Data_Entry_2017_v2020.csv"

# NIH label -> CheXpert finding (None: no CheXpert counterpart, the label is ignored).
NIH_TO_CHEXPERT: dict[str, str | None] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Pneumothorax": "Pneumothorax",
    "Pneumonia": "Pneumonia",
    # CheXpert's "Lung Lesion" covers masses and nodules (its mention list names both).
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    # "Infiltration" is NIH's word for a parenchymal opacity; the closest CheXpert
    # finding is the umbrella "Lung Opacity". One-to-one: an image positive only for
    # Consolidation or Edema is NOT made positive for Lung Opacity.
    "Infiltration": "Lung Opacity",
    # The CheXpert labeller files pleural thickening under "Pleural Other".
    "Pleural_Thickening": "Pleural Other",
    # No CheXpert finding: emphysema, fibrosis (parenchymal) and hiatal hernia.
    "Emphysema": None,
    "Fibrosis": None,
    "Hernia": None,
    # NIH "No Finding" = none of NIH's 14 labels (CheXpert: none of its findings except
    # Support Devices). Close, not identical: an image with only Emphysema is
    # "No Finding" = 0 here.
    "No Finding": "No Finding",
}

# CheXpert findings that no NIH label maps to: all-NaN on NIH.
UNAVAILABLE = tuple(f for f in FINDINGS if f not in set(NIH_TO_CHEXPERT.values()))

REQUIRED = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
            "Patient Gender", "View Position"]
SEX = {"F": "Female", "M": "Male"}


def nih_labels(finding_labels: pd.Series, where: str = LABEL_FILE) -> pd.DataFrame:
    """The 14 CheXpert finding columns from NIH's ``Finding Labels`` ('|'-separated).

    Mapped findings are 1.0 / 0.0; findings in ``UNAVAILABLE`` are NaN. An NIH
    label not in ``NIH_TO_CHEXPERT`` raises ValueError naming it.
    """
    parts = finding_labels.fillna("").astype(str).str.split("|")
    seen = {x.strip() for p in parts for x in p}
    unknown = sorted(seen - set(NIH_TO_CHEXPERT))
    if unknown:
        raise ValueError(f"{where}, column 'Finding Labels': unknown NIH label(s) {unknown}; "
                         f"known: {sorted(NIH_TO_CHEXPERT)}")
    out = pd.DataFrame(index=finding_labels.index)
    for f in FINDINGS:
        out[f] = np.nan if f in UNAVAILABLE else 0.0
    for i, p in zip(finding_labels.index, parts):
        for x in p:
            f = NIH_TO_CHEXPERT[x.strip()]
            if f is not None:
                out.at[i, f] = 1.0
    return out


def patient_split(patients: pd.Series, fractions=(0.7, 0.1, 0.2), seed: int = 0) -> pd.Series:
    """Seeded patient-disjoint split: patient id -> train / validate / test.

    The sorted unique patient ids are shuffled with ``numpy.random.default_rng(seed)``
    and cut by ``fractions`` of *patients* (image shares follow only roughly,
    since patients have different numbers of images).
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"split_fractions={tuple(fractions)}: need three non-negative "
                         f"fractions (train, validate, test) summing to 1")
    ids = np.array(sorted(pd.unique(patients.astype(str))))
    ids = ids[np.random.default_rng(seed).permutation(len(ids))]
    cut = np.round(np.cumsum(fr)[:2] * len(ids)).astype(int)
    names = np.empty(len(ids), dtype=object)
    names[:cut[0]], names[cut[0]:cut[1]], names[cut[1]:] = SPLITS
    return pd.Series(names, index=ids, name="split")


def age_band_labels(age_bands) -> list[str]:
    """Names of the bands cut at ``age_bands`` edges, e.g. (40, 60, 80) -> <40, 40-59, 60-79, 80+."""
    e = list(age_bands)
    if not e or any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"age_bands={tuple(e)}: need increasing integer ages")
    return [f"<{e[0]}"] + [f"{a}-{b - 1}" for a, b in zip(e, e[1:])] + [f"{e[-1]}+"]


def find_images(nih_dir: Path) -> dict[str, str]:
    """Image name -> path relative to ``nih_dir``, from ``images/`` and ``images_*/images/``."""
    found: dict[str, str] = {}
    dirs = [nih_dir / "images"] + sorted(nih_dir.glob("images_*/images")) + \
        sorted(d for d in nih_dir.glob("images_*") if d.is_dir())
    for d in dirs:
        if not d.is_dir():
            continue
        rel = d.relative_to(nih_dir).as_posix()
        with os.scandir(d) as it:
            for e in it:
                if e.is_file() and e.name not in found:
                    found[e.name] = f"{rel}/{e.name}"
    return found


def build_nih_cohort(nih_dir: str | Path, group: str = "sex", age_bands=(40, 60, 80),
                     split_fractions=(0.7, 0.1, 0.2), seed: int = 0,
                     check_images: bool = True) -> CohortResult:
    """Build the cohort table from NIH ChestX-ray14.

    Flow steps: all rows of the label file; frontal views (PA/AP: the release
    has only these, the step guards against other files); image file found
    (``check_images``); group known (sex M/F, or an age in 0-120 for age bands).
    Split: ``patient_split(seed)`` over the patients kept.
    """
    if group not in ("sex", "age_band"):
        raise ValueError(f"nih_group={group!r}: expected 'sex' or 'age_band'")
    nih_dir = Path(nih_dir)
    f = nih_dir / LABEL_FILE
    if not f.is_file():
        raise FileNotFoundError(f"NIH ChestX-ray14 label file not found: expected {f}")
    raw = read_table(f)
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise InputError(f"{f.name} lacks required column(s) {missing}; found {list(raw.columns)}")
    d = raw["Image Index"].duplicated(keep=False)
    if d.any():
        raise InputError(f"{f.name}: {int(d.sum())} rows share a duplicate 'Image Index', "
                         f"e.g. {raw.loc[d, 'Image Index'].head(3).tolist()}")
    # A blank age is counted as unknown (age-band groups drop it in the flow); a
    # non-number such as 'ninety' means an edited file: stop, naming line and value.
    age = pd.to_numeric(raw["Patient Age"], errors="coerce")
    bad_values(raw, "Patient Age", age.isna() & raw["Patient Age"].notna(), f.name, "numbers")

    df = pd.DataFrame({
        "image_id": raw["Image Index"].str.strip(),
        "subject_id": raw["Patient ID"].str.strip().str.replace(r"\.0$", "", regex=True),
        "view": raw["View Position"].str.strip(),
        "sex": raw["Patient Gender"].str.strip().map(SEX),
        "age": age,
    })
    df["study_id"] = df["image_id"].str.replace(r"\.[^.]+$", "", regex=True)
    df = pd.concat([df, nih_labels(raw["Finding Labels"], f.name)], axis=1)
    flow = Flow(df, "label file", f"all rows of {f.name}", hint=f" ({f})")
    view_reason, view_note = frontal_views(flow.df, "view", f.name, "View Position")
    notes = [n for n in view_note.split("\n") if n]
    flow.keep(flow.df["view"].isin(FRONTAL_VIEWS), "frontal view",
              view_reason.replace(" (lateral, other or blank)", ""),
              hint=f"; View Position values in {f.name}: "
                   f"{flow.df['view'].value_counts(dropna=False).head(8).to_dict()}")

    found = find_images(nih_dir) if check_images else {}
    flow.df["path"] = flow.df["image_id"].map(found) if check_images else "images/" + flow.df["image_id"]
    if check_images:
        flow.keep(flow.df["path"].notna(), "image on disk",
                  "listed in the label file but no file under images/ or images_*/images/",
                  hint=f": no image of {f.name} was found under {nih_dir / 'images'} or "
                       f"{nih_dir / 'images_*/images'}")

    if group == "sex":
        flow.df["group"] = flow.df["sex"]
        flow.keep(flow.df["group"].notna(), "group known", "Patient Gender not M or F",
                  hint=f" (column 'Patient Gender' of {f.name})")
    else:
        ok = flow.df["age"].between(0, 120)
        flow.keep(ok, "group known", "Patient Age blank or outside 0-120",
                  hint=f" (column 'Patient Age' of {f.name})")
        edges = [-np.inf, *age_bands, np.inf]
        flow.df["group"] = pd.cut(flow.df["age"], edges, right=False,
                                  labels=age_band_labels(age_bands)).astype(str)

    sp = patient_split(flow.df["subject_id"], split_fractions, seed)
    flow.df["split"] = flow.df["subject_id"].map(sp)
    table = finalize_table(flow.df)
    check_splits(table, f"{f.name} (split drawn by nih.patient_split over "
                        f"{len(sp):,} patients, fractions {tuple(split_fractions)})")
    other_sex = int(flow.df["sex"].isna().sum())
    if other_sex:  # only reachable with age-band groups; group="sex" drops them in the flow
        notes.append(f"{f.name}: {other_sex:,} kept image(s) have a Patient Gender other than M/F; "
                     f"their sex is unrecorded in the demographics")
    pats = flow.df.sort_values("age").groupby("subject_id", sort=True).agg(
        group=("group", "first"), sex=("sex", "first"), age=("age", "first")).reset_index()
    return CohortResult(table, flow.table(), flow.exclusions(), pats, notes=notes)
