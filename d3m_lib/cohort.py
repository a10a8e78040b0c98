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
problem, and the line and column where one applies), applies the exclusion steps
in a fixed order and counts every dropped image in a flow table; the excluded
images themselves are listed with their step and reason in ``exclusions``. A
step that would leave no image, or a split without images, stops the build.

After the image cache is built, ``finalize`` drops the images the cache could
not decode (``exclude_unreadable``), checks that at least two groups are large
enough to compare (``check_groups``) and collects warnings;
``terminal_summary`` renders the cohort for the terminal. Output format:
ARCHITECTURE.md, "Cohort table".
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field, replace
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
SEX_CODES = {"F": "Female", "M": "Male"}

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
    ``notes``: how the inputs were read where that is not obvious (e.g. view codes
    accepted in lower case). ``warnings``: problems that did not stop the build
    (``finalize``); each starts with ``WARNING:``. ``diagnostics``: counts that
    explain a failed group check (admissions rows, blank race cells, patients
    without an admission).
    """

    table: pd.DataFrame
    flow: pd.DataFrame
    exclusions: pd.DataFrame
    patients: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)
    dims: pd.DataFrame | None = None   # image_id, Rows, Columns from the metadata (MIMIC), for exclude_bad_sizes


# -- reading files ------------------------------------------------------------

class InputError(ValueError):
    """An input file or parameter the study cannot use; the message names the file (and row/column)."""


def find_csv(folder: str | Path, name: str, what: str) -> Path:
    """``folder/name.gz`` (as PhysioNet ships it) or ``folder/name``.

    FileNotFoundError if neither exists; InputError if both do: the study reads
    exactly one file, and an edited ``.csv`` beside the ``.csv.gz`` must not be
    ignored silently, so the user has to remove the one not meant.
    """
    folder = Path(folder)
    gz, plain = folder / f"{name}.gz", folder / name
    if gz.is_file() and plain.is_file():
        raise InputError(
            f"{what}: both {gz} and {plain} exist. The study reads exactly one of them "
            f"(it would read the .gz and ignore your .csv): delete or move the one you do not mean")
    for p in (gz, plain):
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{what} not found: expected {gz} (or {plain})")


def _line(i: int) -> int:
    """File line of data row ``i`` (0-based) of a csv with one header line."""
    return int(i) + 2


def _non_utf8_message(path: Path) -> str:
    """Where a csv(.gz) holds bytes that are not UTF-8: line, column and value of the first few cells."""
    # Latin-1 decodes any byte; a cell is valid UTF-8 iff its Latin-1 text re-encodes and decodes as UTF-8.
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="latin-1")
    hits = []
    for c in [str(c) for c in raw.columns]:
        try:
            c.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            hits.append((-1, "(header)", c))
    for c in raw.columns:
        s = raw[c]
        for i, v in s[s.str.contains(r"[^\x00-\x7f]", regex=True)].items():
            try:
                v.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:
                hits.append((int(i), str(c), v))
    hits.sort(key=lambda h: h[0])

    def show(v: str) -> str:
        b = sorted({f"0x{ord(ch):02x}" for ch in v if ord(ch) > 0x7f})
        return f"{v!r} (byte(s) {', '.join(b)})"
    where = "; ".join(f"line {_line(i) if i >= 0 else 1}, column '{c}': {show(v)}"
                      for i, c, v in hits[:5])
    return (f"{path}: {len(hits)} cell(s) are not valid UTF-8 ({where}"
            f"{'; ...' if len(hits) > 5 else ''}). MIMIC's files are UTF-8; this one was probably "
            f"re-saved in another encoding (e.g. Latin-1 by a spreadsheet): restore the original file")


def _unreadable_message(path: Path, e: BaseException) -> str:
    """Why a csv(.gz) could not be decompressed or read, naming the file."""
    if path.suffix == ".gz":
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head != b"\x1f\x8b":  # the gzip magic number
            return (f"{path} is named .gz but is not gzip-compressed (it starts with {head!r}). "
                    f"If it is the plain CSV, rename it to {path.with_suffix('').name}")
        return (f"{path} is a damaged gzip file ({type(e).__name__}: {e}); the download was "
                f"probably cut off: download it again")
    return f"{path} cannot be read ({type(e).__name__}: {e})"


def read_table(path: Path) -> pd.DataFrame:
    """A csv(.gz) with every column as string, blank cells NaN.

    Errors name the file: InputError for a file that is empty, not gzip though
    named .gz, a cut-off gzip, or not UTF-8 (with line, column and value).
    """
    path = Path(path)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except UnicodeDecodeError:
        raise InputError(_non_utf8_message(path)) from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty (not even a header line); the download or copy is "
                         f"incomplete: fetch the file again") from None
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(_unreadable_message(path, e)) from e


def read_csv(path: Path, required: list[str], what: str, rename: dict | None = None) -> pd.DataFrame:
    """``read_table``, then ValueError listing missing required columns or blank ids."""
    df = read_table(path)
    if rename:
        df = df.rename(columns={k: v for k, v in rename.items()
                                if k in df.columns and v not in df.columns})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path.name} ({what}) lacks required column(s) {missing}; "
                         f"found columns {list(df.columns)}")
    for c in required:
        if c.endswith("_id") and df[c].isna().any():
            lines = [_line(i) for i in np.flatnonzero(df[c].isna())[:5]]
            raise InputError(f"{path.name}: column '{c}' has {int(df[c].isna().sum())} blank row(s) "
                             f"(line(s) {lines})")
    return df


def bad_values(df: pd.DataFrame, col: str, bad: pd.Series, fname: str, expected: str) -> None:
    """InputError naming file, column, count, and line and value of the first few rows where ``bad``."""
    bad = np.asarray(bad, dtype=bool)
    if bad.any():
        idx = np.flatnonzero(bad)
        ex = ", ".join(f"line {_line(i)}: {df[col].iloc[i]!r}" for i in idx[:5])
        raise InputError(f"{fname}, column '{col}': {len(idx)} value(s) are not {expected} "
                         f"({ex}{', ...' if len(idx) > 5 else ''})")


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
    """Applies exclusion steps to an image frame and records counts and excluded rows.

    A step that leaves no image raises InputError (an empty cohort is never
    passed on), with the step's reason and ``hint`` (which file to look at).
    """

    def __init__(self, df: pd.DataFrame, first_step: str, reason: str, hint: str = ""):
        if not len(df):
            raise InputError(f"no image to start from: {reason} is empty (header only){hint}")
        self.df = df
        self.rows: list[dict] = []
        self.excluded: list[pd.DataFrame] = []
        self._record(first_step, 0, reason)

    def _record(self, step: str, dropped: int, reason: str) -> None:
        self.rows.append(dict(step=step, images=len(self.df), studies=self.df["study_id"].nunique(),
                              patients=self.df["subject_id"].nunique(), dropped_images=dropped,
                              reason=reason))

    def keep(self, mask: pd.Series | np.ndarray, step: str, reason: str, hint: str = "") -> None:
        """Keep rows where ``mask`` is True; the others are excluded at ``step``."""
        mask = np.asarray(mask, dtype=bool)
        if len(mask) and not mask.any():
            raise InputError(f"empty cohort: step '{step}' dropped all {len(mask):,} remaining "
                             f"images ({reason}){hint}")
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


# Every ViewPosition MIMIC-CXR-JPG holds (and NIH's PA/AP); anything else is counted and warned about.
KNOWN_VIEWS = ("PA", "AP", "LATERAL", "LL", "AP AXIAL", "AP LLD", "AP RLD", "PA LLD", "PA RLD", "LAO",
               "RAO", "LPO", "RPO", "SWIMMERS", "XTABLE LATERAL", "LATERAL DECUBITUS")


def frontal_views(df: pd.DataFrame, col: str, fname: str, src_col: str) -> tuple[str, str]:
    """Upper-case view codes in ``df[col]`` in place; the frontal step's reason and a note.

    MIMIC ships ``PA``/``AP``; ``pa``/``ap`` (any case, surrounding spaces) are
    accepted as the same views, counted, and said so in the flow table and notes.
    """
    v = df[col].astype("string").str.strip()
    up = v.str.upper()
    recased = int((up.isin(FRONTAL_VIEWS) & (v != up)).fillna(False).sum())
    df[col] = up.astype(object).where(up.notna(), None)
    reason = f"{src_col} not PA or AP (lateral, other or blank)"
    notes = []
    if recased:
        reason += f"; {recased:,} written in another case (e.g. 'pa', 'ap') accepted as PA/AP"
        notes.append(f"{fname}: {recased:,} {src_col} value(s) written in another case than PA/AP "
                     f"(e.g. 'pa', 'ap') were accepted as frontal views")
    unknown = v[up.notna() & (v != "") & ~up.isin(KNOWN_VIEWS)]
    if len(unknown):
        top = unknown.value_counts().head(5)
        said = ", ".join(f"{k!r} {int(n):,}" for k, n in top.items())
        reason += f"; {len(unknown):,} with a value no MIMIC/NIH view has ({said})"
        notes.append(f"WARNING: {fname}: {len(unknown):,} {src_col} value(s) are no known view ({said}"
                     f"{', ...' if unknown.nunique() > 5 else ''}); they were dropped as not PA/AP. If they "
                     f"are frontal images written another way, correct the file")
    return reason, "\n".join(notes)


def check_splits(table: pd.DataFrame, where: str, why=None) -> None:
    """InputError unless every split (train, validate, test) keeps at least one image.

    ``where`` names the file the split comes from; ``why(split)`` may say why one is empty.
    """
    n = table["split"].value_counts()
    empty = [s for s in SPLITS if not n.get(s, 0)]
    if empty:
        reasons = "; ".join(why(s) for s in empty) if why else ""
        per = ", ".join(f"{s}: {int(n.get(s, 0))}" for s in SPLITS)
        raise InputError(f"{where}: no kept image is in split(s) {empty} "
                         f"(kept images per split: {{{per}}})"
                         f"{'; ' + reasons if reasons else ''}. The study trains on train, chooses "
                         f"thresholds on validate and reports on test: it needs all three")


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

def mimic_input_files(mimic_cxr_dir: str | Path, mimic_iv_dir: str | Path) -> list[Path]:
    """The five CSV files ``build_mimic_cohort`` reads (those that exist)."""
    cxr, hosp = Path(mimic_cxr_dir), Path(mimic_iv_dir) / "hosp"
    out = []
    for folder, name in ((cxr, METADATA), (cxr, CHEXPERT), (cxr, SPLIT), (hosp, ADMISSIONS), (hosp, PATIENTS)):
        out += [f for f in (folder / f"{name}.gz", folder / name) if f.is_file()]
    return out


def build_mimic_cohort(mimic_cxr_dir: str | Path, mimic_iv_dir: str | Path,
                       uncertain_labels: str = "negative", race_rule: str = "mode_recent",
                       missing_race: str = "unknown", check_images: bool = True,
                       progress: bool = False) -> CohortResult:
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

    View codes are compared case-insensitively (``pa`` is PA; counted in the
    flow reason and ``notes``). ``patients.csv``: gender must be F/M and
    anchor_age a whole number 0-120, as MIMIC-IV ships them; anything else
    stops the build naming line and value (a silent NaN would bias the
    demographics). ``diagnostics`` records admissions rows, blank race cells and
    patients without an admission, for ``check_groups``.

    Raises FileNotFoundError (missing file, with the expected path) or
    ValueError (missing columns, duplicate ids, unknown race strings, label
    values outside {1, 0, -1, blank}, a patient in two splits, ids that
    disagree between metadata and split file); the subclass InputError for a
    file that is empty, not gzip though named .gz, a cut gzip, not UTF-8, a
    ``.csv`` beside its ``.csv.gz``, bad gender/age values, a step that leaves
    no image, or a split (train/validate/test) without images.
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
    # MIMIC-IV records gender as F/M and anchor_age as an integer (91 for 89+); anything
    # else means an edited or foreign file: stop rather than turn it into NaN.
    bad_values(pat, "gender", ~pat["gender"].isin(list(SEX_CODES)), f_pat.name,
               f"one of {sorted(SEX_CODES)} as in MIMIC-IV")
    age = pd.to_numeric(pat["anchor_age"], errors="coerce")
    bad_values(pat, "anchor_age", ~(age.between(0, 120) & (age == age.round())), f_pat.name,
               "whole ages 0-120 as in MIMIC-IV")

    df = meta.rename(columns={"dicom_id": "image_id", "ViewPosition": "view"})
    dims = None
    if {"Rows", "Columns"} <= set(meta.columns):
        dims = pd.DataFrame({"image_id": meta["dicom_id"], "Rows": pd.to_numeric(meta["Rows"], errors="coerce"),
                             "Columns": pd.to_numeric(meta["Columns"], errors="coerce")})
    df = df[["image_id", "subject_id", "study_id", "view"]]
    flow = Flow(df, "metadata", f"all images in {f_meta.name}", hint=f" ({f_meta})")

    view_reason, view_note = frontal_views(flow.df, "view", f_meta.name, "ViewPosition")
    notes = [n for n in view_note.split("\n") if n and not n.startswith("WARNING:")]
    view_warnings = [n for n in view_note.split("\n") if n.startswith("WARNING:")]
    flow.keep(flow.df["view"].isin(FRONTAL_VIEWS), "frontal view", view_reason,
              hint=f"; ViewPosition values in {f_meta.name}: "
                   f"{flow.df['view'].value_counts(dropna=False).head(8).to_dict()}")

    sp = split.set_index("dicom_id")
    has = flow.df["image_id"].isin(sp.index)
    flow.keep(has, "in official split", f"no row in {f_split.name}",
              hint=f": no dicom_id of {f_meta.name} is in {f_split} ({len(split):,} rows)")
    s = sp.loc[flow.df["image_id"]]
    clash = (s["subject_id"].to_numpy() != flow.df["subject_id"].to_numpy()) | \
            (s["study_id"].to_numpy() != flow.df["study_id"].to_numpy())
    if clash.any():
        raise ValueError(f"{f_split.name} and {f_meta.name} disagree on subject_id/study_id "
                         f"for {int(clash.sum())} dicom_id(s)")
    flow.df["split"] = s["split"].to_numpy()

    key = pd.MultiIndex.from_frame(flow.df[["subject_id", "study_id"]])
    lab_key = pd.MultiIndex.from_frame(labels[["subject_id", "study_id"]])
    flow.keep(key.isin(lab_key), "CheXpert labels", f"study has no row in {f_chex.name}",
              hint=f": no (subject_id, study_id) of {f_meta.name} is in {f_chex} "
                   f"({len(labels):,} rows)")

    flow.df["path"] = image_relpath(flow.df["subject_id"], flow.df["study_id"], flow.df["image_id"])
    if check_images:
        from tqdm.auto import tqdm

        # the slow step at MIMIC's size (one stat per listed image): a progress bar
        paths = tqdm(flow.df["path"], desc="image files on disk", unit="img", disable=not progress,
                     leave=False, mininterval=1.0)
        on_disk = np.fromiter((os.path.isfile(cxr / p) for p in paths), bool, count=len(flow.df))
        flow.keep(on_disk, "image on disk", "listed in the metadata but the JPEG file is absent",
                  hint=f": e.g. {cxr / flow.df['path'].iloc[0]} does not exist. Is mimic_cxr_dir "
                       f"the folder that holds files/p10 ... files/p19 and {f_meta.name}?")

    rc = race.race_for_subjects(flow.df["subject_id"].unique(), adm, source=f_adm.name,
                                rule=race_rule, missing=missing_race)
    rc = rc.set_index("subject_id")
    flow.df["group"] = flow.df["subject_id"].map(rc["group"])
    n_at_race = int(len(rc))
    no_adm = int((rc["race_rule"] == "no_admission").sum())
    diagnostics = dict(admissions_file=str(f_adm), admissions_rows=int(len(adm)),
                       admissions_blank_race=int(adm["race"].isna().sum()),
                       patients_at_race_step=n_at_race, patients_without_admission=no_adm)
    if missing_race == "exclude":
        flow.keep(flow.df["group"].notna(), "race recorded",
                  f"patient has no admission in {f_adm.name} (missing_race='exclude')",
                  hint=f": none of the {n_at_race:,} patients has an admission in {f_adm} "
                       f"({len(adm):,} rows). Is mimic_iv_dir the MIMIC-IV that goes with "
                       f"this MIMIC-CXR copy?")

    lab = apply_label_policy(labels, uncertain_labels)
    flow.df = flow.df.merge(lab[["subject_id", "study_id", *FINDINGS]],
                            on=["subject_id", "study_id"], how="left", validate="many_to_one")
    if uncertain_labels == "drop":
        flow.keep(flow.df[list(FINDINGS)].notna().any(axis=1), "usable label",
                  "every finding uncertain (-1) and uncertain_labels='drop'",
                  hint=f" (in {f_chex.name})")

    table = finalize_table(flow.df)
    given = split["split"].value_counts()
    gone = flow.exclusions()
    gone = gone.assign(split=gone["image_id"].map(sp["split"]))

    def why(s: str) -> str:
        if not given.get(s):
            return f"{f_split.name} has no row with split '{s}'"
        by = gone[gone["split"] == s]["step"].value_counts()
        steps = ", ".join(f"'{k}' {int(v):,}" for k, v in by.items())
        absent = (f"; {int(by['image on disk']):,} of them have no JPEG file under {cxr / 'files'}"
                  if by.get("image on disk", 0) else "")
        return f"all {given[s]:,} '{s}' images of {f_split.name} were excluded (by step: {steps}){absent}"
    check_splits(table, f_split.name, why=why)
    pats = rc.loc[table["subject_id"].unique(), ["group", "race_rule"]].reset_index()
    p = pat.set_index("subject_id")
    # Patients with images but no row in patients.csv keep sex/age NaN, counted in a note.
    pats["sex"] = pats["subject_id"].map(p["gender"]).map(SEX_CODES)
    pats["age"] = pd.to_numeric(pats["subject_id"].map(p["anchor_age"]))
    no_row = int(pats["sex"].isna().sum())
    if no_row:
        notes.append(f"{f_pat.name}: {no_row:,} of {len(pats):,} kept patients have no row; their "
                     f"sex and age are unrecorded in the demographics")
    if dims is not None:
        dims = dims[dims["image_id"].isin(set(table["image_id"]))].reset_index(drop=True)
    return CohortResult(table, flow.table(), flow.exclusions(), pats, notes=notes, warnings=view_warnings,
                        diagnostics=diagnostics, dims=dims)


# -- after the image cache: unreadable images, groups, the terminal summary -------

UNREADABLE_STEP = "image readable"
# Steps that drop images by the study's design, not because data are missing:
# lateral views are about a third of MIMIC-CXR's images.
DESIGN_STEPS = ("frontal view",)


def exclude_unreadable(result: CohortResult, cache_report, max_share: float = 0.01,
                       list_path: str | Path | None = None) -> CohortResult:
    """Drop the images the image cache could not decode, as absent images are dropped.

    ``cache_report``: the ``image_cache.CacheReport`` of ``build_cache`` over
    ``[image_root / p for p in result.table["path"]]`` (table order). Its failed
    images (garbage, truncated or 0-byte files) leave the table at the flow step
    ``"image readable"`` (always added, also with 0 dropped, so the count is
    shown whatever its size), with a row each in ``exclusions``.

    Design: the cache is decoded once, before this step, and never rewritten
    (377k images take hours to decode; a second pass only to find broken files
    would double that). The kept rows therefore keep their cache ``row``: the
    table's ``row`` stays a valid index into the cache but is no longer
    0..N-1 without gaps. ``image_cache.open_cache(..., rows=table["row"])``
    checks this, and refuses rows listed as unreadable.

    List file: ``list_path`` (written: ``image_id, subject_id, study_id, row,
    path, error``) or else the cache's ``failed_<px>.csv``. If more than
    ``max_share`` of the images are unreadable, raises InputError naming the
    count and the list file (after writing it).
    """
    t = result.table
    if UNREADABLE_STEP in set(result.flow["step"]):
        raise ValueError("exclude_unreadable was already applied to this cohort")
    if cache_report.n != len(t):
        raise ValueError(f"the image cache holds {cache_report.n:,} images but the cohort table "
                         f"{len(t):,}: build the cache from this table's paths, in its order")
    failed = cache_report.failed
    pos = failed["index"].astype(int).to_numpy() if len(failed) else np.zeros(0, int)
    rel = t["path"].iloc[pos].to_numpy()
    mismatch = [p for p, r in zip(failed["path"].astype(str), rel)
                if not Path(p).as_posix().endswith(str(r))]
    if mismatch:
        raise ValueError(f"the cache's failed images (e.g. {mismatch[0]}) are not the table's "
                         f"images at those positions: the cache was built from another table")
    list_file = Path(list_path) if list_path is not None else cache_report.failed_path
    if list_path is not None:
        lst = t.iloc[pos][["image_id", "subject_id", "study_id", "row", "path"]].copy()
        lst["error"] = failed["error"].astype(str).to_numpy()
        list_file.parent.mkdir(parents=True, exist_ok=True)
        lst.to_csv(list_file, index=False)
    n, k = len(t), len(pos)
    where = f"listed in {list_file}" if list_file is not None else "listed in the exclusions"
    if k > max_share * n:
        raise InputError(f"{k:,} of {n:,} images ({k / n:.1%}) could not be read (damaged, "
                         f"truncated, 0-byte or not images), more than max_unreadable_share="
                         f"{max_share:g}; {where}. Restore these files (download them again), or "
                         f"raise max_unreadable_share to exclude them and go on")
    flow = Flow.__new__(Flow)  # continue the recorded flow with the table as it stands
    flow.df, flow.rows, flow.excluded = t, result.flow.to_dict("records"), []
    mask = np.ones(n, dtype=bool)
    mask[pos] = False
    # the flow table is published and linked into other runs: it names the list by its place in the
    # run folder (01_cohort/unreadable.csv), never by this machine's absolute path
    shown = f"listed in {list_file.parent.name}/{list_file.name}" if list_file is not None else where
    flow.keep(mask, UNREADABLE_STEP,
              f"image file could not be decoded (damaged, truncated, 0 bytes or not an image); "
              f"{shown}", hint=f"; {where}")
    table = flow.df  # rows keep their cache row numbers
    check_splits(table, f"after excluding the unreadable images {where}")
    ex = pd.concat([result.exclusions, flow.exclusions()], ignore_index=True)[EXCLUSION_COLUMNS]
    pats = result.patients
    if len(pats):
        pats = pats[pats["subject_id"].isin(set(table["subject_id"]))].reset_index(drop=True)
    return CohortResult(table, flow.table(), ex.astype(str), pats, notes=list(result.notes),
                        warnings=list(result.warnings), diagnostics=dict(result.diagnostics), dims=result.dims)


SIZE_STEP = "image size"
MIN_IMAGE_PX = 8        # a side shorter than this is no chest X-ray (e.g. a 1 x 1 placeholder)
MAX_SHRINK = 64         # a side more than 64 times shorter than the metadata's Rows/Columns: another image


def exclude_bad_sizes(result: CohortResult, dims) -> CohortResult:
    """Drop images whose stored size cannot be the X-ray the metadata describes (flow step ``image size``).

    ``dims``: (N, 2) width and height of each cache row's file (``CacheReport.dims``). An
    image is excluded when a side is under ``MIN_IMAGE_PX`` px, or, where the metadata
    gives ``Rows``/``Columns``, more than ``MAX_SHRINK`` times shorter than they say. The
    size is not compared exactly: MIMIC-CXR-JPG keeps the DICOM size (e.g. 3056 x 2544),
    but resized copies of it (512 or 224 px) are common and legitimate, and the synthetic
    generator writes small JPEGs whose Rows/Columns say their own size. The step is always
    added (also with 0 dropped) so that the count is shown.
    """
    t = result.table
    if SIZE_STEP in set(result.flow["step"]):
        raise ValueError("exclude_bad_sizes was already applied to this cohort")
    wh = np.asarray(dims)[t["row"].to_numpy()]
    w, h = wh[:, 0].astype(float), wh[:, 1].astype(float)
    bad = (w < MIN_IMAGE_PX) | (h < MIN_IMAGE_PX)
    meta = ""
    if result.dims is not None and len(result.dims):
        d = result.dims.set_index("image_id").reindex(t["image_id"])
        rows, cols = d["Rows"].to_numpy(dtype=float), d["Columns"].to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            bad |= (w * MAX_SHRINK < cols) | (h * MAX_SHRINK < rows)
        meta = f" or more than {MAX_SHRINK} times smaller than the metadata's Rows x Columns"
    reason = f"image file is under {MIN_IMAGE_PX} px on a side{meta}: not the X-ray the metadata lists"
    ex = ""
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        ex = f" (e.g. row {int(t['row'].iloc[i])}: {int(w[i])} x {int(h[i])} px)"
    flow = Flow.__new__(Flow)
    flow.df, flow.rows, flow.excluded = t, result.flow.to_dict("records"), []
    flow.keep(~bad, SIZE_STEP, reason, hint=ex)
    table = flow.df
    check_splits(table, "after excluding images of the wrong size")
    exc = pd.concat([result.exclusions, flow.exclusions()], ignore_index=True)[EXCLUSION_COLUMNS]
    pats = result.patients
    if len(pats):
        pats = pats[pats["subject_id"].isin(set(table["subject_id"]))].reset_index(drop=True)
    notes = list(result.notes)
    if bad.any():
        notes.append(f"{int(bad.sum()):,} image(s) excluded at step '{SIZE_STEP}': {reason}{ex}")
    return replace(result, table=table, flow=flow.table(), exclusions=exc.astype(str), patients=pats,
                   notes=notes)


def _group_failure_reason(result: CohortResult) -> str:
    """Why a cohort has fewer than two usable groups, from ``result.diagnostics`` (MIMIC)."""
    d = result.diagnostics
    if not d:
        return "too few images per group"
    f = d["admissions_file"]
    if d["admissions_rows"] == 0:
        return f"{f} has no rows: no patient has a recorded race, so every patient is Unknown"
    if d["admissions_blank_race"] == d["admissions_rows"]:
        return (f"the race column of {f} is empty (all {d['admissions_rows']:,} rows blank), "
                f"so every patient is Unknown")
    if d["patients_at_race_step"] and d["patients_without_admission"] == d["patients_at_race_step"]:
        return (f"no admission in {f} matched any X-ray patient (0 of "
                f"{d['patients_at_race_step']:,} subject_ids): is mimic_iv_dir the MIMIC-IV that "
                f"goes with this MIMIC-CXR copy?")
    return "too few images per group"


def check_groups(result: CohortResult, min_group_n: int = 20,
                 max_missing_race_share: float = 0.5,
                 ignore_groups: tuple[str, ...] = ("Unknown",)) -> list[str]:
    """Stop a study about groups that has no groups to compare; return warnings.

    A group is usable when it has at least ``min_group_n`` labelled images (at
    least one finding not NaN) in train and in validate. Groups in
    ``ignore_groups`` do not count: Unknown means race not recorded, and "White
    against Unknown" is not a racial gap. Fewer than two usable groups raise
    InputError saying why (e.g. no admission matched any X-ray patient, the race
    column is empty) and listing the labelled images per group and split.

    Returns ``WARNING:`` lines: more than ``max_missing_race_share`` of the
    patients reaching the race step have no MIMIC-IV admission. Default 0.5: a
    share that high means a partial or mismatched MIMIC-IV copy rather than
    patients who were never admitted, yet it stays clear of the ordinary share.
    """
    t = result.table
    lab = t[list(FINDINGS)].notna().any(axis=1)
    c = pd.crosstab(t.loc[lab, "group"], t.loc[lab, "split"]).reindex(
        columns=list(SPLITS), fill_value=0)
    usable = [g for g in c.index if g not in ignore_groups
              and c.loc[g, "train"] >= min_group_n and c.loc[g, "validate"] >= min_group_n]
    if len(usable) < 2:
        sizes = ", ".join(f"{g} {c.loc[g, 'train']}/{c.loc[g, 'validate']}" for g in c.index) or "none"
        raise InputError(
            f"the study compares groups but only {len(usable)} group(s) {usable} reach "
            f"min_group_n={min_group_n} labelled images in both train and validate"
            f"{f' (not counting {list(ignore_groups)})' if ignore_groups else ''}: "
            f"{_group_failure_reason(result)}. Labelled images per group (train/validate): {sizes}")
    out = []
    d = result.diagnostics
    if d.get("patients_at_race_step"):
        share = d["patients_without_admission"] / d["patients_at_race_step"]
        if share > max_missing_race_share:
            out.append(f"WARNING: {share:.1%} of the patients ({d['patients_without_admission']:,} "
                       f"of {d['patients_at_race_step']:,}) have no admission in "
                       f"{Path(d['admissions_file']).name} (race never recorded), more than "
                       f"max_missing_race_share={max_missing_race_share:g}; is the MIMIC-IV copy "
                       f"complete and the one that goes with this MIMIC-CXR copy?")
    return out


def drop_warnings(flow: pd.DataFrame, max_drop_share: float = 0.10) -> list[str]:
    """A ``WARNING:`` line when the steps after the design steps drop more than ``max_drop_share``.

    The share is of the images entering those steps (for MIMIC: the frontal
    images), so the lateral views, dropped by design, never trigger it.
    """
    steps = flow.iloc[1:]
    design = steps["step"].isin(DESIGN_STEPS).to_numpy()
    last_design = int(np.flatnonzero(design)[-1]) + 1 if design.any() else 0
    base = int(flow["images"].iloc[last_design])
    data = steps[~design]
    lost = int(data["dropped_images"].sum())
    if not base or lost <= max_drop_share * base:
        return []
    by = data[data["dropped_images"] > 0].sort_values("dropped_images", ascending=False)
    what = ", ".join(f"'{s}' {int(k):,} ({r})" for s, k, r in
                     zip(by["step"], by["dropped_images"], by["reason"]))
    after = f"left after step '{flow['step'].iloc[last_design]}'" if last_design else "listed"
    return [f"WARNING: {lost:,} of {base:,} images ({lost / base:.1%}) {after} were dropped, "
            f"more than max_drop_share={max_drop_share:g}: {what}"]


def terminal_summary(table: pd.DataFrame, flow: pd.DataFrame, patients: pd.DataFrame | None = None,
                     notes=(), warnings=(), max_drop_share: float = 0.10) -> str:
    """The cohort in a few lines for the terminal; warnings are lines starting ``WARNING:``.

    Kept and dropped images, studies and patients; images dropped per step;
    unreadable images (whatever their number, or "not checked" without the
    ``image readable`` step); images and patients per group and split; then
    ``notes`` and every warning (``warnings`` plus ``drop_warnings(flow,
    max_drop_share)``, each once).
    """
    first, last = flow.iloc[0], flow.iloc[-1]

    def kept(col: str) -> str:
        a, b = int(last[col]), int(first[col])
        return f"{a:,} of {b:,} {col} kept ({b - a:,} dropped)"

    lines = [f"Cohort: {kept('images')}; {kept('studies')}; {kept('patients')}"]
    drops = flow.iloc[1:]
    lines.append("  dropped per step: " + (", ".join(
        f"{s} {int(k):,}" for s, k in zip(drops["step"], drops["dropped_images"])) or "none"))
    if UNREADABLE_STEP in set(flow["step"]):
        r = flow[flow["step"] == UNREADABLE_STEP].iloc[0]
        lines.append(f"  unreadable images: {int(r['dropped_images']):,} (excluded"
                     f"{'; ' + r['reason'].split('; ', 1)[1] if '; ' in r['reason'] else ''})")
    else:
        lines.append("  unreadable images: not checked (cohort.exclude_unreadable not applied)")
    n = table["split"].value_counts()
    lines.append("  images per split: " + ", ".join(f"{s} {int(n.get(s, 0)):,}" for s in SPLITS))
    c = pd.crosstab(table["group"], table["split"]).reindex(columns=list(SPLITS), fill_value=0)
    pat = table.groupby("group")["subject_id"].nunique()
    lines.append(f"  groups ({len(c)}): images (train / validate / test), patients")
    w = max((len(str(g)) for g in c.index), default=0)
    for g in c.index:
        per = " / ".join(f"{int(v):,}" for v in c.loc[g])
        lines.append(f"    {str(g):<{w}}  {int(c.loc[g].sum()):>8,} ({per}), {int(pat[g]):,} patients")
    lines += [f"  note: {x}" for x in notes]
    seen = []
    for x in [*warnings, *drop_warnings(flow, max_drop_share)]:
        if x not in seen:
            seen.append(x)
    lines += seen
    return "\n".join(lines)


def finalize(result: CohortResult, cache_report=None, *, max_unreadable_share: float = 0.01,
             unreadable_list: str | Path | None = None, min_group_n: int = 20,
             max_missing_race_share: float = 0.5, max_drop_share: float = 0.10) -> CohortResult:
    """The checks that need the image cache, in order; the cohort the study may use.

    ``exclude_unreadable`` (skipped when ``cache_report`` is None), then
    ``check_groups``; ``warnings`` gets the group and drop warnings. Print
    ``terminal_summary(r.table, r.flow, r.patients, r.notes, r.warnings, max_drop_share)``.
    """
    if cache_report is not None:
        result = exclude_unreadable(result, cache_report, max_unreadable_share, unreadable_list)
        if getattr(cache_report, "dims", None) is not None:
            result = exclude_bad_sizes(result, cache_report.dims)
    drops = drop_warnings(result.flow, max_drop_share)
    try:
        groups = check_groups(result, min_group_n, max_missing_race_share)
    except InputError as exc:   # name the cause first: images that were missing or broken
        if drops:
            raise InputError(f"{drops[0].removeprefix('WARNING: ')}. As a result, {exc}") from None
        raise
    warns = [*result.warnings, *groups, *drops]
    return replace(result, warnings=list(dict.fromkeys(warns)))


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
