"""NIH ChestX-ray14 reader: the real 1,000-image sample and small bad-input fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from d3m_lib.cohort import TABLE_COLUMNS
from d3m_lib.nih import (NIH_TO_CHEXPERT, UNAVAILABLE, age_band_labels, build_nih_cohort,
                         nih_labels, patient_split)

# the repo's checkout sits beside shared/ (here and in CI); D3M_NIH_SAMPLE overrides
SAMPLE = Path(os.environ.get("D3M_NIH_SAMPLE",
                             Path(__file__).resolve().parents[2] / "shared/data/nih-cxr14-sample"))
needs_sample = pytest.mark.skipif(not (SAMPLE / "Data_Entry_2017_v2020.csv").exists(),
                                  reason="NIH sample not on this machine")


@needs_sample
def test_real_sample_counts_and_split():
    res = build_nih_cohort(SAMPLE, group="sex", seed=0)
    t = res.table
    assert list(t.columns) == TABLE_COLUMNS
    assert len(t) == 1000 and t["subject_id"].nunique() == 264
    assert t["group"].value_counts().to_dict() == {"Female": 509, "Male": 491}
    assert t["view"].value_counts().to_dict() == {"PA": 637, "AP": 363}
    assert t["row"].tolist() == list(range(1000))
    assert all((SAMPLE / p).is_file() for p in t["path"])
    # patient-disjoint, all three splits present, reproducible from the seed
    assert (t.groupby("subject_id")["split"].nunique() == 1).all()
    assert set(t["split"]) == {"train", "validate", "test"}
    again = build_nih_cohort(SAMPLE, group="sex", seed=0).table
    assert again["split"].tolist() == t["split"].tolist()
    other = build_nih_cohort(SAMPLE, group="sex", seed=1).table
    assert other.set_index("image_id")["split"].ne(t.set_index("image_id")["split"]).any()
    assert res.flow["dropped_images"].sum() == 0 and len(res.exclusions) == 0


@needs_sample
def test_real_sample_label_mapping():
    raw = pd.read_csv(SAMPLE / "Data_Entry_2017_v2020.csv")
    t = build_nih_cohort(SAMPLE).table.set_index("image_id").loc[raw["Image Index"]]

    def has(lab):
        return raw["Finding Labels"].str.split("|").apply(lambda xs: lab in xs).to_numpy()

    # counts from the sample's README
    assert t["No Finding"].sum() == 499 and t["Pleural Effusion"].sum() == 170
    assert t["Lung Opacity"].sum() == 162 and t["Cardiomegaly"].sum() == 83
    assert (t["Lung Lesion"].to_numpy() == (has("Mass") | has("Nodule"))).all()
    for f in UNAVAILABLE:
        assert t[f].isna().all()
    assert set(UNAVAILABLE) == {"Enlarged Cardiomediastinum", "Fracture", "Support Devices"}


@needs_sample
def test_real_sample_age_bands():
    t = build_nih_cohort(SAMPLE, group="age_band", age_bands=(40, 60, 80)).table
    assert set(t["group"]) <= {"<40", "40-59", "60-79", "80+"}
    raw = pd.read_csv(SAMPLE / "Data_Entry_2017_v2020.csv").set_index("Image Index")
    age = raw.loc[t["image_id"], "Patient Age"].to_numpy()
    assert ((t["group"] == "80+").to_numpy() == (age >= 80)).all()
    assert ((t["group"] == "<40").to_numpy() == (age < 40)).all()


def _fixture(tmp_path, rows, layout="flat", missing=()):
    head = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
            "Patient Gender", "View Position", "OriginalImage[Width", "Height]"]
    pd.DataFrame(rows, columns=head).to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    d = tmp_path / ("images" if layout == "flat" else "images_001/images")
    d.mkdir(parents=True)
    for r in rows:
        if r[0] not in missing:
            (d / r[0]).write_bytes(b"")
    return tmp_path


ROWS = [
    ("00000001_000.png", "Effusion|Mass", 0, 1, 57, "M", "PA", 2048, 2048),
    ("00000001_001.png", "No Finding", 1, 1, 58, "M", "PA", 2048, 2048),
    ("00000002_000.png", "Hernia", 0, 2, 30, "F", "AP", 2048, 2048),
    ("00000003_000.png", "Infiltration", 0, 3, 70, "X", "PA", 2048, 2048),
    ("00000004_000.png", "Nodule", 0, 4, 70, "F", "LL", 2048, 2048),
] + [(f"000000{p:02d}_000.png", "No Finding", 0, p, 40, "F", "PA", 2048, 2048)
     for p in range(5, 14)]  # enough patients for every split


def test_exclusions_counted_and_release_layout(tmp_path):
    nih = _fixture(tmp_path, ROWS, layout="release", missing=("00000002_000.png",))
    res = build_nih_cohort(nih, group="sex")
    assert dict(zip(res.flow["step"], res.flow["dropped_images"])) == {
        "label file": 0, "frontal view": 1, "image on disk": 1, "group known": 1}
    t = res.table.set_index("image_id")
    assert {"00000001_000.png", "00000001_001.png"} <= set(t.index) and len(t) == 11
    assert not {"00000002_000.png", "00000003_000.png", "00000004_000.png"} & set(t.index)
    assert t.loc["00000001_000.png", "path"] == "images_001/images/00000001_000.png"
    r0 = t.loc["00000001_000.png"]
    assert r0["Pleural Effusion"] == 1 and r0["Lung Lesion"] == 1 and r0["No Finding"] == 0
    assert set(res.exclusions["reason"].str[:20]) == {"View Position not PA", "listed in the label ",
                                                      "Patient Gender not M"}


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="Data_Entry_2017_v2020.csv"):
        build_nih_cohort(tmp_path)
    nih = _fixture(tmp_path, ROWS)
    df = pd.read_csv(nih / "Data_Entry_2017_v2020.csv")
    df.drop(columns=["Patient Gender"]).to_csv(nih / "Data_Entry_2017_v2020.csv", index=False)
    with pytest.raises(ValueError, match="Patient Gender"):
        build_nih_cohort(nih)
    df.loc[0, "Finding Labels"] = "Effusion|Dragons"
    df.to_csv(nih / "Data_Entry_2017_v2020.csv", index=False)
    with pytest.raises(ValueError, match="Dragons"):
        build_nih_cohort(nih)
    with pytest.raises(ValueError, match="nih_group"):
        build_nih_cohort(nih, group="race")


def test_patient_split_properties():
    pats = pd.Series([str(i) for i in range(100)])
    s = patient_split(pats, (0.6, 0.2, 0.2), seed=3)
    assert s.value_counts().to_dict() == {"train": 60, "validate": 20, "test": 20}
    assert s.equals(patient_split(pats, (0.6, 0.2, 0.2), seed=3))
    with pytest.raises(ValueError, match="split_fractions"):
        patient_split(pats, (0.5, 0.2, 0.2))


def test_label_map_and_bands():
    out = nih_labels(pd.Series(["Infiltration|Pleural_Thickening", "Emphysema"]))
    assert out.loc[0, "Lung Opacity"] == 1 and out.loc[0, "Pleural Other"] == 1
    assert out.loc[1].drop(list(UNAVAILABLE)).sum() == 0 and np.isnan(out.loc[1, "Fracture"])
    assert NIH_TO_CHEXPERT["Effusion"] == "Pleural Effusion"
    assert age_band_labels((40, 60)) == ["<40", "40-59", "60+"]
    with pytest.raises(ValueError):
        age_band_labels((60, 40))


# -- damaged inputs ------------------------------------------------------------------

from d3m_lib.cohort import InputError  # noqa: E402


def test_lower_case_view_accepted_and_said(tmp_path):
    rows = [r if r[0] != "00000001_000.png" else (*r[:6], "pa", *r[7:]) for r in ROWS]
    res = build_nih_cohort(_fixture(tmp_path, rows), group="sex")
    assert "00000001_000.png" in set(res.table["image_id"]) and set(res.table["view"]) <= {"PA", "AP"}
    assert "1 written in another case" in res.flow.set_index("step").loc["frontal view", "reason"]
    assert "View Position" in res.notes[0]


def test_age_that_is_not_a_number_is_named(tmp_path):
    rows = [r if r[0] != "00000002_000.png" else (*r[:4], "ninety", *r[5:]) for r in ROWS]
    with pytest.raises(InputError, match=r"Data_Entry_2017_v2020\.csv, column 'Patient Age': 1 value\(s\) "
                                         r"are not numbers \(line 4: 'ninety'\)"):
        build_nih_cohort(_fixture(tmp_path, rows), group="sex")


def test_empty_label_file_is_named(tmp_path):
    nih = _fixture(tmp_path, ROWS)
    (nih / "Data_Entry_2017_v2020.csv").write_bytes(b"")
    with pytest.raises(InputError, match=r"Data_Entry_2017_v2020\.csv is empty"):
        build_nih_cohort(nih)


def test_no_image_found_is_named(tmp_path):
    nih = _fixture(tmp_path, ROWS, missing=[r[0] for r in ROWS])
    with pytest.raises(InputError, match=r"step 'image on disk' dropped all 13 .*no image of "
                                         r"Data_Entry_2017_v2020\.csv was found under .*images"):
        build_nih_cohort(nih)


def test_too_few_patients_for_every_split_is_named(tmp_path):
    nih = _fixture(tmp_path, ROWS[:5])  # two patients kept
    with pytest.raises(InputError, match=r"Data_Entry_2017_v2020\.csv \(split drawn by nih\.patient_split "
                                         r"over 2 patients.*no kept image is in split\(s\)"):
        build_nih_cohort(nih, group="sex")
