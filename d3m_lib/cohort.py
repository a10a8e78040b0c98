"""Read MIMIC-CXR-JPG + MIMIC-IV (real or synthetic) into the cohort table.

Inputs, as PhysioNet ships them (``.csv.gz``; a plain ``.csv`` of the same
name is accepted too):

- ``<mimic_cxr_dir>/mimic-cxr-2.0.0-metadata.csv.gz``: one row per image
  (``dicom_id, subject_id, study_id, ViewPosition, ...``);
- ``<mimic_cxr_dir>/mimic-cxr-2.0.0-chexpert.csv.gz``: one row per study
  (``subject_id, study_id`` + the 14 findings, ``1.0`` / ``0.0`` / ``-1.0`` / blank);
- ``<mimic_cxr_dir>/mimic-cxr-2.0.0-split.csv.gz``: ``dicom_id, study_id,
  subject_id, split`` (``train`` / ``validate`` / ``test``, patient-disjoint);
- images at ``<mimic_cxr_dir>/files/p<first 2 digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg``;
- ``<mimic_iv_dir>/hosp/admissions.csv.gz`` (``subject_id, hadm_id, admittime,
  race``; MIMIC-IV 1.0 called the column ``ethnicity``, accepted as well) and
  ``<mimic_iv_dir>/hosp/patients.csv.gz`` (``subject_id, gender, anchor_age``).

``build_mimic_cohort`` validates these files (errors name the file and the
problem), applies the exclusion steps in a fixed order and counts every dropped
image in a flow table; the excluded images themselves are listed with their step
and reason in ``exclusions``. Output format: ARCHITECTURE.md, "Cohort table".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .constants import FINDINGS, FRONTAL_VIEWS, SPLITS

METADATA = "mimic-cxr-2.0.0-metadata.csv"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"
SPLIT = "mimic-cxr-2.0.0-split.csv"
ADMISSIONS = "admissions.csv"
PATIENTS = "patients.csv"

UNCERTAIN_POLICIES = ("negative", "positive", "drop")
MISSING_RACE_POLICIES = ("unknown", "exclude")

TABLE_COLUMNS = ["image_id", "subject_id", "study_id", "path", "split", "group", "view",
                 *FINDINGS, "row"]
FLOW_COLUMNS = ["step", "images", "studies", "patients", "dropped_images", "reason"]
EXCLUSION_COLUMNS = ["image_id", "subject_id", "study_id", "step", "reason"]


@dataclass
class CohortResult:
    """The cohort table, the flow of exclusions, and the excluded images.

    ``patients``: one row per kept patient with ``subject_id, group`` and, where
    the source has them, ``sex``, ``age`` and ``race_rule`` (the branch of the
    per-patient race rule that decided); for demographic summaries only.
    """

    table: pd.DataFrame
    flow: pd.DataFrame
    exclusions: pd.DataFrame
    patients: pd.DataFrame = field(default_factory=pd.DataFrame)


# -- reading files ------------------------------------------------------------

def find_csv(folder: str | Path, name: str, what: str) -> Path:
    """``folder/name.gz`` (as PhysioNet ships it) or ``folder/name``; FileNotFoundError otherwise."""
    folder = Path(folder)
    for p in (folder / f"{name}.gz", folder / name):
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{what} not found: expected {folder / (name + '.gz')} (or {folder / name})")


def read_csv(path: Path, required: list[str], what: str, rename: dict | None = None) -> pd.DataFrame:
    """Read a csv(.gz) with every column as string; ValueError listing missing required columns."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    if rename:
        df = df.rename(columns={k: v for k, v in rename.items()
                                if k in df.columns and v not in df.columns})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path.name} ({what}) lacks required column(s) {missing}; "
                         f"found columns {list(df.columns)}")
    for c in required:
        if c.endswith("_id") and df[c].isna().any():
            raise ValueError(f"{path.name}: column '{c}' has {int(df[c].isna().sum())} blank row(s)")
    return df


def _norm_id(s: pd.Series) -> pd.Series:
    """Ids as plain strings (``'10000032'``, also when a tool wrote ``'10000032.0'``)."""
    s = s.astype(str).str.strip()
    return s.str.replace(r"\.0$", "", regex=True)


def _dups(df: pd.DataFrame, cols: list[str], fname: str) -> None:
    d = df.duplicated(cols, keep=False)
    if d.any():
        ex = df.loc[d, cols].drop_duplicates().head(3).to_dict("records")
        raise ValueError(f"{fname}: {int(d.sum())} rows share a duplicate {tuple(cols)} "
                         f"(e.g. {ex}); each must appear once")


def read_chexpert_labels(path: Path) -> pd.DataFrame:
    """The CheXpert label file as floats (1, 0, -1, NaN for blank); ValueError on any other value."""
    df = read_csv(path, ["subject_id", "study_id", *FINDINGS], "CheXpert labels per study")
    df["subject_id"], df["study_id"] = _norm_id(df["subject_id"]), _norm_id(df["study_id"])
    _dups(df, ["subject_id", "study_id"], path.name)
    for f in FINDINGS:
        v = pd.to_numeric(df[f], errors="coerce")
        bad = (v.isna() & df[f].notna()) | ~(v.isna() | v.isin([1.0, 0.0, -1.0]))
        if bad.any():
            raise ValueError(f"{path.name}, column '{f}': {int(bad.sum())} value(s) outside "
                             f"{{1, 0, -1, blank}}, e.g. {sorted(set(df.loc[bad, f]))[:5]}")
        df[f] = v.astype(float)
    return df


def apply_label_policy(labels: pd.DataFrame, uncertain_labels: str = "negative") -> pd.DataFrame:
    """Map raw CheXpert values to the study's labels.

    Blank (not mentioned) -> 0.0; 1 -> 1.0; 0 -> 0.0; uncertain -1 -> 0.0
    (``"negative"``, U-Zeros), 1.0 (``"positive"``, U-Ones) or NaN (``"drop"``:
    the image leaves that finding's task only).
    """
    if uncertain_labels not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain_labels={uncertain_labels!r}: expected one of {UNCERTAIN_POLICIES}")
    out = labels.copy()
    u = {"negative": 0.0, "positive": 1.0, "drop": np.nan}[uncertain_labels]
    for f in FINDINGS:
        v = out[f].astype(float)
        out[f] = v.fillna(0.0).mask(v == -1.0, u)
    return out


def image_relpath(subject_id: pd.Series, study_id: pd.Series, dicom_id: pd.Series) -> pd.Series:
    """``files/p1X/p<subject_id>/s<study_id>/<dicom_id>.jpg`` as MIMIC-CXR-JPG lays images out."""
    return ("files/p" + subject_id.str[:2] + "/p" + subject_id + "/s" + study_id + "/"
            + dicom_id + ".jpg")


# -- flow bookkeeping -----------------------------------------------------------

class Flow:
    """Applies exclusion steps to an image frame and records counts and excluded rows."""

    def __init__(self, df: pd.DataFrame, first_step: str, reason: str):
        self.df = df
        self.rows: list[dict] = []
        self.excluded: list[pd.DataFrame] = []
        self._record(first_step, 0, reason)

    def _record(self, step: str, dropped: int, reason: str) -> None:
        self.rows.append(dict(step=step, images=len(self.df), studies=self.df["study_id"].nunique(),
                              patients=self.df["subject_id"].nunique(), dropped_images=dropped,
                              reason=reason))

    def keep(self, mask: pd.Series | np.ndarray, step: str, reason: str) -> None:
        """Keep rows where ``mask`` is True; the others are excluded at ``step``."""
        mask = np.asarray(mask, dtype=bool)
        gone = self.df.loc[~mask, ["image_id", "subject_id", "study_id"]].copy()
        gone["step"], gone["reason"] = step, reason
        self.excluded.append(gone)
        self.df = self.df.loc[mask].reset_index(drop=True)
        self._record(step, int((~mask).sum()), reason)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=FLOW_COLUMNS)

    def exclusions(self) -> pd.DataFrame:
        ex = [e for e in self.excluded if len(e)]
        if not ex:
            return pd.DataFrame({c: pd.Series(dtype=str) for c in EXCLUSION_COLUMNS})
        return pd.concat(ex, ignore_index=True)[EXCLUSION_COLUMNS].astype(str)


def finalize_table(df: pd.DataFrame) -> pd.DataFrame:
    """Cohort-table column order and types, sorted by (split, subject_id, study_id, image_id), row 0..N-1."""
    df = df.copy()
    df["_s"] = df["split"].map({s: i for i, s in enumerate(SPLITS)})
    df = df.sort_values(["_s", "subject_id", "study_id", "image_id"], kind="mergesort")
    df = df.drop(columns="_s").reset_index(drop=True)
    for c in ["image_id", "subject_id", "study_id", "path", "split", "group", "view"]:
        df[c] = df[c].astype(str)
    for f in FINDINGS:
        df[f] = df[f].astype(float)
    df["row"] = np.arange(len(df), dtype=np.int64)
    return df[TABLE_COLUMNS]


# -- the MIMIC cohort -------------------------------------------------------------

def build_mimic_cohort(mimic_cxr_dir: str | Path, mimic_iv_dir: str | Path,
                       uncertain_labels: str = "negative", race_rule: str = "mode_recent",
                       missing_race: str = "unknown", check_images: bool = True) -> CohortResult:
    """Build the cohort table from MIMIC-CXR-JPG and MIMIC-IV.

    Steps, in order, each counted in ``flow`` (images, studies, patients kept
    and images dropped): all images in the metadata file; frontal views only
    (``ViewPosition`` PA or AP; lateral, other and blank views dropped); images
    with a row in the official split file; images whose study has a CheXpert
    row; image files present on disk (``check_images``); patients with a race
    group (``missing_race="exclude"`` drops patients who have no MIMIC-IV
    admission; with ``"unknown"`` they are kept in group Unknown, as are patients
    whose admissions record only UNKNOWN / UNABLE TO OBTAIN / DECLINED); images
    with at least one usable label (only ``uncertain_labels="drop"`` can leave
    an image with none).

    Race: one group per patient by ``d3m_lib.race.race_for_subjects`` with rule
    ``race_rule``. Labels: ``apply_label_policy``. The official split is used as
    given, after checking that it is patient-disjoint.

    Raises FileNotFoundError (missing file, with the expected path) or
    ValueError (missing columns, duplicate ids, unknown race strings, label
    values outside {1, 0, -1, blank}, a patient in two splits, ids that
    disagree between metadata and split file).
    """
    from . import race  # imported here: race.py owns the race mapping and rule

    if missing_race not in MISSING_RACE_POLICIES:
        raise ValueError(f"missing_race={missing_race!r}: expected one of {MISSING_RACE_POLICIES}")
    if uncertain_labels not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain_labels={uncertain_labels!r}: expected one of {UNCERTAIN_POLICIES}")
    if race_rule not in race.PATIENT_RULES:
        raise ValueError(f"race_rule={race_rule!r}: expected one of {race.PATIENT_RULES}")
    cxr, hosp = Path(mimic_cxr_dir), Path(mimic_iv_dir) / "hosp"
    f_meta = find_csv(cxr, METADATA, "MIMIC-CXR-JPG image metadata")
    f_chex = find_csv(cxr, CHEXPERT, "MIMIC-CXR-JPG CheXpert labels")
    f_split = find_csv(cxr, SPLIT, "MIMIC-CXR-JPG official split")
    f_adm = find_csv(hosp, ADMISSIONS, "MIMIC-IV admissions (race per admission)")
    f_pat = find_csv(hosp, PATIENTS, "MIMIC-IV patients")

    meta = read_csv(f_meta, ["dicom_id", "subject_id", "study_id", "ViewPosition"],
                    "image metadata")
    for c in ("dicom_id", "subject_id", "study_id"):
        meta[c] = _norm_id(meta[c])
    _dups(meta, ["dicom_id"], f_meta.name)
    labels = read_chexpert_labels(f_chex)
    split = read_csv(f_split, ["dicom_id", "study_id", "subject_id", "split"], "official split")
    for c in ("dicom_id", "subject_id", "study_id"):
        split[c] = _norm_id(split[c])
    _dups(split, ["dicom_id"], f_split.name)
    bad = ~split["split"].isin(SPLITS)
    if bad.any():
        raise ValueError(f"{f_split.name}, column 'split': values {sorted(set(split.loc[bad, 'split'].astype(str)))} "
                         f"are not among {SPLITS}")
    per_patient = split.groupby("subject_id")["split"].nunique()
    if (per_patient > 1).any():
        raise ValueError(f"{f_split.name}: {int((per_patient > 1).sum())} patient(s) appear in more "
                         f"than one split (the official split is patient-disjoint); "
                         f"the file is corrupt or not MIMIC's")
    adm = read_csv(f_adm, ["subject_id", "race", "admittime"], "admissions",
                   rename={"ethnicity": "race"})
    adm["subject_id"] = _norm_id(adm["subject_id"])
    # Every string in the file must be known, not only those of the patients kept.
    race.map_race_column(adm["race"], f"{f_adm.name}, column 'race'")
    pat = read_csv(f_pat, ["subject_id", "gender", "anchor_age"], "patients")
    pat["subject_id"] = _norm_id(pat["subject_id"])
    _dups(pat, ["subject_id"], f_pat.name)

    df = meta.rename(columns={"dicom_id": "image_id", "ViewPosition": "view"})
    df = df[["image_id", "subject_id", "study_id", "view"]]
    flow = Flow(df, "metadata", f"all images in {f_meta.name}")

    flow.keep(flow.df["view"].isin(FRONTAL_VIEWS), "frontal view",
              "ViewPosition not PA or AP (lateral, other or blank)")

    sp = split.set_index("dicom_id")
    has = flow.df["image_id"].isin(sp.index)
    flow.keep(has, "in official split", f"no row in {f_split.name}")
    s = sp.loc[flow.df["image_id"]]
    clash = (s["subject_id"].to_numpy() != flow.df["subject_id"].to_numpy()) | \
            (s["study_id"].to_numpy() != flow.df["study_id"].to_numpy())
    if clash.any():
        raise ValueError(f"{f_split.name} and {f_meta.name} disagree on subject_id/study_id "
                         f"for {int(clash.sum())} dicom_id(s)")
    flow.df["split"] = s["split"].to_numpy()

    key = pd.MultiIndex.from_frame(flow.df[["subject_id", "study_id"]])
    lab_key = pd.MultiIndex.from_frame(labels[["subject_id", "study_id"]])
    flow.keep(key.isin(lab_key), "CheXpert labels", f"study has no row in {f_chex.name}")

    flow.df["path"] = image_relpath(flow.df["subject_id"], flow.df["study_id"], flow.df["image_id"])
    if check_images:
        on_disk = np.fromiter((os.path.isfile(cxr / p) for p in flow.df["path"]), bool,
                              count=len(flow.df))
        flow.keep(on_disk, "image on disk", "listed in the metadata but the JPEG file is absent")

    rc = race.race_for_subjects(flow.df["subject_id"].unique(), adm, source=f_adm.name,
                                rule=race_rule, missing=missing_race)
    rc = rc.set_index("subject_id")
    flow.df["group"] = flow.df["subject_id"].map(rc["group"])
    if missing_race == "exclude":
        flow.keep(flow.df["group"].notna(), "race recorded",
                  f"patient has no admission in {f_adm.name} (missing_race='exclude')")

    lab = apply_label_policy(labels, uncertain_labels)
    flow.df = flow.df.merge(lab[["subject_id", "study_id", *FINDINGS]],
                            on=["subject_id", "study_id"], how="left", validate="many_to_one")
    if uncertain_labels == "drop":
        flow.keep(flow.df[list(FINDINGS)].notna().any(axis=1), "usable label",
                  "every finding uncertain (-1) and uncertain_labels='drop'")

    table = finalize_table(flow.df)
    pats = rc.loc[table["subject_id"].unique(), ["group", "race_rule"]].reset_index()
    p = pat.set_index("subject_id")
    pats["sex"] = pats["subject_id"].map(p["gender"]).map({"F": "Female", "M": "Male"})
    pats["age"] = pd.to_numeric(pats["subject_id"].map(p["anchor_age"]), errors="coerce")
    return CohortResult(table, flow.table(), flow.exclusions(), pats)


# -- summaries for the notebook -----------------------------------------------------

def counts_by_group_split(table: pd.DataFrame) -> pd.DataFrame:
    """Images per group and split, with all splits, patients, and each group's share of images."""
    c = pd.crosstab(table["group"], table["split"]).reindex(columns=list(SPLITS), fill_value=0)
    c["all images"] = c.sum(axis=1)
    c["patients"] = table.groupby("group")["subject_id"].nunique()
    c["share of images"] = (c["all images"] / c["all images"].sum()).round(4)
    c.index.name = "group"
    c.columns.name = None
    return c


def prevalence_by_group(table: pd.DataFrame, findings=FINDINGS) -> pd.DataFrame:
    """Per finding and group: ``n`` labelled images (non-NaN), ``positives``, ``prevalence``.

    Findings that are NaN everywhere (not in the source data) get n = 0 and NaN prevalence.
    """
    rows = []
    for f in findings:
        for g, sub in table.groupby("group", sort=True):
            v = sub[f].dropna()
            rows.append(dict(finding=f, group=g, n=len(v), positives=int((v == 1).sum()),
                             prevalence=float(v.mean()) if len(v) else np.nan))
    return pd.DataFrame(rows)
