"""Cohort building from a hand-made MIMIC-CXR-JPG + MIMIC-IV copy in the real file layout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from d3m_lib.cohort import (TABLE_COLUMNS, apply_label_policy, build_mimic_cohort,
                            counts_by_group_split, prevalence_by_group)
from d3m_lib.constants import FINDINGS

# dicom_id, subject_id, study_id, ViewPosition, split (None: no split row), on disk
IMAGES = [
    ("d1", "10000001", "50000001", "PA", "train", True),
    ("d2", "10000001", "50000001", "LATERAL", "train", True),   # not frontal
    ("d3", "10000002", "50000002", "AP", "train", True),
    ("d4", "10000002", "50000003", "AP", "train", True),        # study without CheXpert row
    ("d5", "10000003", "50000004", "PA", "validate", True),     # patient without admission
    ("d6", "11000004", "50000005", "PA", "test", True),
    ("d7", "11000004", "50000005", "AP", None, True),           # no split row
    ("d8", "12000005", "50000006", "PA", "test", False),        # file absent
    ("d9", "10000001", "50000007", "", "train", True),          # blank view
    ("d10", "10000006", "50000008", "PA", "validate", True),
]
ADMISSIONS = [  # subject_id, hadm_id, admittime, race
    ("10000001", "20000001", "2150-01-01 10:00:00", "WHITE"),
    ("10000002", "20000002", "2150-01-01 10:00:00", "BLACK/AFRICAN AMERICAN"),
    ("11000004", "20000003", "2150-01-01 10:00:00", "ASIAN - CHINESE"),
    ("11000004", "20000004", "2151-01-01 10:00:00", "UNKNOWN"),
    ("12000005", "20000005", "2150-01-01 10:00:00", "HISPANIC/LATINO - DOMINICAN"),
    ("19999999", "20000006", "2150-01-01 10:00:00", "OTHER"),  # no images
    ("10000006", "20000008", "2150-01-01 10:00:00", "WHITE"),
]


def _labels_row(subject, study, **vals):
    row = {"subject_id": subject, "study_id": study}
    row.update({f: 0.0 for f in FINDINGS})
    row.update({k.replace("_", " "): v for k, v in vals.items()})
    return row


def make_mimic(root, images=IMAGES, admissions=ADMISSIONS, edit=None):
    """Write the fixture; ``edit(name, df) -> df`` may alter any table before it is written."""
    cxr, hosp = root / "mimic-cxr-jpg", root / "mimiciv" / "hosp"
    hosp.mkdir(parents=True)
    cxr.mkdir(parents=True)
    edit = edit or (lambda name, df: df)
    meta = pd.DataFrame([dict(dicom_id=d, subject_id=s, study_id=st, PerformedProcedureStepDescription="CHEST",
                              ViewPosition=v, Rows=8, Columns=8) for d, s, st, v, _, _ in images])
    split = pd.DataFrame([dict(dicom_id=d, study_id=st, subject_id=s, split=sp)
                          for d, s, st, _, sp, _ in images if sp is not None])
    chex = pd.DataFrame([
        _labels_row("10000001", "50000001", Atelectasis=1.0, Cardiomegaly=-1.0, Edema=np.nan),
        _labels_row("10000002", "50000002", Pleural_Effusion=1.0),
        _labels_row("10000003", "50000004", No_Finding=1.0),
        _labels_row("11000004", "50000005", Cardiomegaly=1.0),
        _labels_row("12000005", "50000006", Edema=1.0),
        _labels_row("10000001", "50000007"),
        _labels_row("10000006", "50000008", Edema=1.0),
    ])
    adm = pd.DataFrame(admissions, columns=["subject_id", "hadm_id", "admittime", "race"])
    pats = pd.DataFrame({"subject_id": sorted({s for _, s, *_ in images} | {a[0] for a in admissions}),
                         "gender": "F", "anchor_age": 60, "anchor_year": 2150})
    for name, df, folder in [("mimic-cxr-2.0.0-metadata.csv.gz", meta, cxr),
                             ("mimic-cxr-2.0.0-split.csv.gz", split, cxr),
                             ("mimic-cxr-2.0.0-chexpert.csv.gz", chex, cxr),
                             ("admissions.csv.gz", adm, hosp), ("patients.csv.gz", pats, hosp)]:
        df = edit(name, df)
        if df is not None:
            df.to_csv(folder / name, index=False)
    for d, s, st, _, _, disk in images:
        if disk:
            p = cxr / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), 100, np.uint8)).save(p)
    return cxr, root / "mimiciv"


def flow_steps(res):
    return dict(zip(res.flow["step"], res.flow["images"]))


def test_cohort_table_flow_and_exclusions(tmp_path):
    cxr, iv = make_mimic(tmp_path)
    res = build_mimic_cohort(cxr, iv)
    t = res.table
    assert list(t.columns) == TABLE_COLUMNS
    assert t["image_id"].tolist() == ["d1", "d3", "d5", "d10", "d6"]  # train, train, validate x2, test
    assert t["split"].tolist() == ["train", "train", "validate", "validate", "test"]
    assert t["row"].tolist() == [0, 1, 2, 3, 4]
    assert t["group"].tolist() == ["White", "Black or African American", "Unknown", "White", "Asian"]
    assert set(t["view"]) <= {"PA", "AP"}
    for c in ["image_id", "subject_id", "study_id", "path", "split", "group", "view"]:
        assert all(isinstance(v, str) for v in t[c])
    assert all(t[f].dtype == float for f in FINDINGS)
    assert t["path"].iloc[0] == "files/p10/p10000001/s50000001/d1.jpg"
    assert all((cxr / p).is_file() for p in t["path"])

    assert flow_steps(res) == {"metadata": 10, "frontal view": 8, "in official split": 7,
                               "CheXpert labels": 6, "image on disk": 5}
    # kept + dropped at each step = kept at the step before
    imgs, dropped = res.flow["images"].to_numpy(), res.flow["dropped_images"].to_numpy()
    assert (imgs[1:] + dropped[1:] == imgs[:-1]).all() and dropped[0] == 0
    assert res.flow["patients"].iloc[0] == 6 and res.flow["patients"].iloc[-1] == 5
    ex = res.exclusions.set_index("image_id")["step"].to_dict()
    assert ex == {"d2": "frontal view", "d9": "frontal view", "d7": "in official split",
                  "d4": "CheXpert labels", "d8": "image on disk"}
    assert len(res.exclusions) == res.flow["dropped_images"].sum()
    assert len(res.patients) == 5 and set(res.patients["sex"]) == {"Female"}


def test_check_images_off_keeps_absent_file(tmp_path):
    res = build_mimic_cohort(*make_mimic(tmp_path), check_images=False)
    assert "d8" in set(res.table["image_id"]) and "image on disk" not in set(res.flow["step"])


def test_missing_race_policies(tmp_path):
    cxr, iv = make_mimic(tmp_path)
    keep = build_mimic_cohort(cxr, iv, missing_race="unknown")
    assert keep.table.set_index("image_id").loc["d5", "group"] == "Unknown"
    assert keep.patients.set_index("subject_id").loc["10000003", "race_rule"] == "no_admission"
    drop = build_mimic_cohort(cxr, iv, missing_race="exclude")
    assert "d5" not in set(drop.table["image_id"])
    last = drop.flow.iloc[-1]
    assert last["step"] == "race recorded" and last["dropped_images"] == 1 and last["images"] == 4
    assert drop.exclusions.set_index("image_id").loc["d5", "step"] == "race recorded"
    # the Asian patient's later UNKNOWN admission does not override the recorded race
    assert drop.table.set_index("image_id").loc["d6", "group"] == "Asian"


def test_label_policy_three_modes():
    row = pd.DataFrame([_labels_row("1", "2", Atelectasis=1.0, Cardiomegaly=-1.0, Edema=np.nan)])
    neg = apply_label_policy(row, "negative").iloc[0]
    pos = apply_label_policy(row, "positive").iloc[0]
    drop = apply_label_policy(row, "drop").iloc[0]
    for r in (neg, pos, drop):
        assert r["Atelectasis"] == 1.0 and r["Edema"] == 0.0 and r["Fracture"] == 0.0
    assert neg["Cardiomegaly"] == 0.0 and pos["Cardiomegaly"] == 1.0 and np.isnan(drop["Cardiomegaly"])
    with pytest.raises(ValueError, match="uncertain_labels"):
        apply_label_policy(row, "maybe")


def test_label_policy_in_cohort_and_all_uncertain_image_dropped(tmp_path):
    def edit(name, df):
        if "chexpert" in name:
            df.loc[df["study_id"] == "50000004", list(FINDINGS)] = -1.0  # every finding uncertain
        return df
    cxr, iv = make_mimic(tmp_path, edit=edit)
    res = build_mimic_cohort(cxr, iv, uncertain_labels="drop")
    d1 = res.table.set_index("image_id").loc["d1"]
    assert np.isnan(d1["Cardiomegaly"]) and d1["Atelectasis"] == 1.0 and d1["Edema"] == 0.0
    assert "d5" not in set(res.table["image_id"])
    assert res.flow.iloc[-1]["step"] == "usable label" and res.flow.iloc[-1]["dropped_images"] == 1
    pos = build_mimic_cohort(cxr, iv, uncertain_labels="positive").table.set_index("image_id")
    assert pos.loc["d1", "Cardiomegaly"] == 1.0 and (pos.loc["d5", list(FINDINGS)] == 1.0).all()


@pytest.mark.parametrize("name", ["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-split.csv.gz",
                                  "mimic-cxr-2.0.0-chexpert.csv.gz", "admissions.csv.gz",
                                  "patients.csv.gz"])
def test_missing_file_is_named(tmp_path, name):
    cxr, iv = make_mimic(tmp_path, edit=lambda n, df: None if n == name else df)
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        build_mimic_cohort(cxr, iv)


def test_plain_csv_accepted(tmp_path):
    cxr, iv = make_mimic(tmp_path)
    gz = cxr / "mimic-cxr-2.0.0-split.csv.gz"
    pd.read_csv(gz, dtype=str).to_csv(cxr / "mimic-cxr-2.0.0-split.csv", index=False)
    gz.unlink()
    assert len(build_mimic_cohort(cxr, iv).table) == 5


def test_missing_columns_listed(tmp_path):
    cxr, iv = make_mimic(tmp_path, edit=lambda n, df: df.drop(columns=["ViewPosition", "study_id"])
                         if "metadata" in n else df)
    with pytest.raises(ValueError, match=r"metadata.*\['study_id', 'ViewPosition'\]"):
        build_mimic_cohort(cxr, iv)


def test_missing_finding_column(tmp_path):
    cxr, iv = make_mimic(tmp_path, edit=lambda n, df: df.drop(columns=["Fracture"])
                         if "chexpert" in n else df)
    with pytest.raises(ValueError, match=r"chexpert.*Fracture"):
        build_mimic_cohort(cxr, iv)


def test_ethnicity_column_of_mimic_iv_1_accepted(tmp_path):
    cxr, iv = make_mimic(tmp_path, edit=lambda n, df: df.rename(columns={"race": "ethnicity"})
                         if n == "admissions.csv.gz" else df)
    assert build_mimic_cohort(cxr, iv).table["group"].tolist()[0] == "White"


def test_unknown_race_string(tmp_path):
    adm = ADMISSIONS + [("19999998", "20000007", "2150-01-01 10:00:00", "MARTIAN")]
    cxr, iv = make_mimic(tmp_path, admissions=adm)
    with pytest.raises(ValueError, match=r"admissions\.csv\.gz.*MARTIAN"):
        build_mimic_cohort(cxr, iv)


def test_duplicate_dicom_id(tmp_path):
    cxr, iv = make_mimic(tmp_path, edit=lambda n, df: pd.concat([df, df.iloc[[0]]])
                         if "metadata" in n else df)
    with pytest.raises(ValueError, match=r"metadata.*duplicate.*dicom_id"):
        build_mimic_cohort(cxr, iv)


def test_duplicate_chexpert_study(tmp_path):
    cxr, iv = make_mimic(tmp_path, edit=lambda n, df: pd.concat([df, df.iloc[[1]]])
                         if "chexpert" in n else df)
    with pytest.raises(ValueError, match=r"chexpert.*duplicate.*subject_id.*study_id"):
        build_mimic_cohort(cxr, iv)


def test_patient_in_two_splits(tmp_path):
    def edit(name, df):
        if "split" in name:
            df.loc[df["dicom_id"] == "d9", "split"] = "test"  # patient 10000001 also in train
        return df
    cxr, iv = make_mimic(tmp_path, edit=edit)
    with pytest.raises(ValueError, match=r"split.*1 patient\(s\) appear in more than one split"):
        build_mimic_cohort(cxr, iv)


def test_unknown_split_name(tmp_path):
    def edit(name, df):
        if "split" in name:
            df.loc[df["dicom_id"] == "d1", "split"] = "val"
        return df
    with pytest.raises(ValueError, match=r"'split'.*val"):
        build_mimic_cohort(*make_mimic(tmp_path, edit=edit))


@pytest.mark.parametrize("bad", ["2.0", "yes"])
def test_label_values_outside_allowed(tmp_path, bad):
    def edit(name, df):
        if "chexpert" in name:
            df["Edema"] = df["Edema"].astype(object)
            df.loc[0, "Edema"] = bad
        return df
    with pytest.raises(ValueError, match=r"chexpert.*'Edema'.*outside"):
        build_mimic_cohort(*make_mimic(tmp_path, edit=edit))


def test_metadata_and_split_disagree(tmp_path):
    def edit(name, df):
        if "split" in name:
            df.loc[df["dicom_id"] == "d3", "study_id"] = "59999999"
        return df
    with pytest.raises(ValueError, match="disagree"):
        build_mimic_cohort(*make_mimic(tmp_path, edit=edit))


def test_bad_parameters(tmp_path):
    cxr, iv = make_mimic(tmp_path)
    with pytest.raises(ValueError, match="missing_race"):
        build_mimic_cohort(cxr, iv, missing_race="guess")
    with pytest.raises(ValueError, match="race_rule"):
        build_mimic_cohort(cxr, iv, race_rule="vote")


def test_summaries(tmp_path):
    t = build_mimic_cohort(*make_mimic(tmp_path)).table
    c = counts_by_group_split(t)
    assert c.loc["White", "train"] == 1 and c.loc["Unknown", "validate"] == 1
    assert c["all images"].sum() == len(t) and c["patients"].sum() == t["subject_id"].nunique()
    p = prevalence_by_group(t).set_index(["finding", "group"])
    assert p.loc[("Cardiomegaly", "Asian"), "prevalence"] == 1.0
    assert p.loc[("Cardiomegaly", "White"), "positives"] == 0
    assert p.loc[("No Finding", "Unknown"), "n"] == 1
