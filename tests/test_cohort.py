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


# -- damaged inputs: one thing broken per case ------------------------------------

import gzip  # noqa: E402

from d3m_lib import image_cache  # noqa: E402
from d3m_lib.cohort import (InputError, check_groups, exclude_unreadable, finalize,  # noqa: E402
                            terminal_summary)


def test_plain_csv_named_gz_is_named(tmp_path):
    cxr, iv = make_mimic(tmp_path)
    f = cxr / "mimic-cxr-2.0.0-split.csv.gz"
    pd.read_csv(f, dtype=str).to_csv(f, index=False, compression=None)
    with pytest.raises(InputError, match=r"split\.csv\.gz is named \.gz but is not gzip.*rename it to "
                                         r"mimic-cxr-2\.0\.0-split\.csv"):
        build_mimic_cohort(cxr, iv)


def test_cut_gzip_is_named(tmp_path):
    cxr, iv = make_mimic(tmp_path)
    f = cxr / "mimic-cxr-2.0.0-metadata.csv.gz"
    f.write_bytes(f.read_bytes()[:-12])
    with pytest.raises(InputError, match=r"metadata\.csv\.gz is a damaged gzip file.*download it again"):
        build_mimic_cohort(cxr, iv)


def test_latin1_byte_names_file_line_and_column(tmp_path):
    cxr, iv = make_mimic(tmp_path)
    f = iv / "hosp" / "admissions.csv.gz"
    adm = pd.read_csv(f, dtype=str)
    adm.loc[2, "race"] = "ASIAN - CHIN\xc9SE"  # data row 2 = line 4
    adm.to_csv(f, index=False, encoding="latin-1")
    with pytest.raises(InputError, match=r"admissions\.csv\.gz: 1 cell\(s\) are not valid UTF-8 "
                                         r"\(line 4, column 'race': 'ASIAN - CHINÉSE' \(byte\(s\) 0xc9\)\)"):
        build_mimic_cohort(cxr, iv)


def test_empty_gzip_is_named(tmp_path):
    cxr, iv = make_mimic(tmp_path)
    with gzip.open(iv / "hosp" / "patients.csv.gz", "wb"):
        pass
    with pytest.raises(InputError, match=r"patients\.csv\.gz is empty"):
        build_mimic_cohort(cxr, iv)


def test_header_only_metadata_is_named(tmp_path):
    cxr, iv = make_mimic(tmp_path, edit=lambda n, df: df.iloc[:0] if "metadata" in n else df)
    with pytest.raises(InputError, match=r"no image to start from: all images in "
                                         r"mimic-cxr-2\.0\.0-metadata\.csv\.gz is empty"):
        build_mimic_cohort(cxr, iv)


def test_edited_csv_beside_gz_is_not_ignored(tmp_path):
    cxr, iv = make_mimic(tmp_path)
    pd.read_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv.gz").to_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv",
                                                                index=False)
    with pytest.raises(InputError, match=r"both .*chexpert\.csv\.gz and .*chexpert\.csv exist"):
        build_mimic_cohort(cxr, iv)


@pytest.mark.parametrize("col,value", [("gender", "X"), ("anchor_age", "ninety"), ("anchor_age", "")])
def test_patients_gender_and_age_never_silently_nan(tmp_path, col, value):
    def edit(name, df):
        if name == "patients.csv.gz":
            df[col] = df[col].astype(object)
            df.loc[3, col] = value  # line 5
        return df
    with pytest.raises(InputError, match=rf"patients\.csv\.gz, column '{col}': 1 value\(s\) are not "
                                         rf".*\(line 5: "):
        build_mimic_cohort(*make_mimic(tmp_path, edit=edit))


def test_all_images_absent_names_the_step_and_a_path(tmp_path):
    images = [(*im[:5], False) for im in IMAGES]
    cxr, iv = make_mimic(tmp_path, images=images)
    with pytest.raises(InputError, match=r"empty cohort: step 'image on disk' dropped all 6 .*"
                                         r"e\.g\. .*files/p10/p10000001/s50000001/d1\.jpg does not "
                                         r"exist.*metadata\.csv\.gz"):
        build_mimic_cohort(cxr, iv)


def test_no_frontal_image_names_the_file_and_values(tmp_path):
    images = [(*im[:3], "LATERAL", *im[4:]) for im in IMAGES]
    with pytest.raises(InputError, match=r"step 'frontal view' dropped all 10 .*ViewPosition values "
                                         r"in mimic-cxr-2\.0\.0-metadata\.csv\.gz: \{'LATERAL': 10\}"):
        build_mimic_cohort(*make_mimic(tmp_path, images=images))


def test_lower_case_views_accepted_and_said(tmp_path):
    images = [(*im[:3], im[3].lower(), *im[4:]) for im in IMAGES]
    res = build_mimic_cohort(*make_mimic(tmp_path, images=images))
    assert res.table["image_id"].tolist() == ["d1", "d3", "d5", "d10", "d6"]
    assert set(res.table["view"]) == {"PA", "AP"}
    reason = res.flow.set_index("step").loc["frontal view", "reason"]
    assert "8 written in another case" in reason  # the 8 frontal images, d1 ... d10
    assert res.notes and "accepted as frontal views" in res.notes[0]


@pytest.mark.parametrize("gone", ["validate", "test"])
def test_missing_split_is_named(tmp_path, gone):
    cxr, iv = make_mimic(tmp_path, edit=lambda n, df: df[df["split"] != gone] if "split" in n else df)
    with pytest.raises(InputError, match=rf"mimic-cxr-2\.0\.0-split\.csv\.gz: no kept image is in split\(s\) "
                                         rf"\['{gone}'\].*has no row with split '{gone}'"):
        build_mimic_cohort(cxr, iv)


def test_split_emptied_by_exclusions_says_so(tmp_path):
    images = [(*im[:5], False) if im[4] == "test" else im for im in IMAGES]
    with pytest.raises(InputError, match=r"\['test'\].*all 2 'test' images of .*split\.csv\.gz "
                                         r"were excluded"):
        build_mimic_cohort(*make_mimic(tmp_path, images=images))


# -- unreadable images ---------------------------------------------------------------

def _damage(path, kind):
    if kind == "garbage":
        path.write_bytes(b"\xff\xd8\xff this is not a JPEG")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(path, quality=95)
        path.write_bytes(path.read_bytes()[:400])
    else:
        path.write_bytes(b"")


def _cohort_and_cache(tmp_path, damaged=("d3",), kind="garbage"):
    cxr, iv = make_mimic(tmp_path)
    res = build_mimic_cohort(cxr, iv)
    for d in damaged:
        _damage(cxr / res.table.set_index("image_id").loc[d, "path"], kind)
    rep = image_cache.build_cache([cxr / p for p in res.table["path"]], tmp_path / "cache", 4,
                                  workers=1, progress=False)
    return res, rep


@pytest.mark.parametrize("kind", ["garbage", "truncated", "zero_bytes"])
def test_unreadable_image_excluded_counted_and_listed(tmp_path, kind):
    res, rep = _cohort_and_cache(tmp_path, kind=kind)
    assert rep.n_failed == 1
    out = exclude_unreadable(res, rep, max_share=0.5, list_path=tmp_path / "unreadable.csv")
    assert out.table["image_id"].tolist() == ["d1", "d5", "d10", "d6"]
    assert out.table["row"].tolist() == [0, 2, 3, 4]  # the cache's rows, d3's row 1 left out
    last = out.flow.iloc[-1]
    assert last["step"] == "image readable" and last["dropped_images"] == 1 and last["images"] == 4
    assert "unreadable.csv" in last["reason"]
    assert out.exclusions.set_index("image_id").loc["d3", "step"] == "image readable"
    assert len(out.exclusions) == out.flow["dropped_images"].sum()
    lst = pd.read_csv(tmp_path / "unreadable.csv", dtype=str)
    assert lst["image_id"].tolist() == ["d3"] and lst["row"].tolist() == ["1"]
    assert lst["error"].str.len().min() > 0
    # the cache is indexed by the kept rows; the unreadable row and len(table) are refused
    mm = image_cache.open_cache(tmp_path / "cache", 4, rows=out.table["row"])
    assert all(int(mm[r].max()) == 100 for r in out.table["row"])
    with pytest.raises(RuntimeError, match=r"could not be read.*\[1\].*failed_4\.csv"):
        image_cache.open_cache(tmp_path / "cache", 4, rows=res.table["row"])
    with pytest.raises(RuntimeError, match=r"holds 5 images, expected 4 \(1 of them unreadable.*rows="):
        image_cache.open_cache(tmp_path / "cache", 4, expected_n=len(out.table))


def test_unreadable_share_above_threshold_stops(tmp_path):
    res, rep = _cohort_and_cache(tmp_path)
    with pytest.raises(InputError, match=r"1 of 5 images \(20\.0%\) could not be read.*"
                                         r"max_unreadable_share=0\.01; listed in .*failed_4\.csv"):
        exclude_unreadable(res, rep)  # default 1%


def test_unreadable_count_reported_when_zero(tmp_path):
    res, rep = _cohort_and_cache(tmp_path, damaged=())
    out = exclude_unreadable(res, rep)
    assert out.flow.iloc[-1]["step"] == "image readable" and out.flow.iloc[-1]["dropped_images"] == 0
    assert "unreadable images: 0 (excluded" in terminal_summary(out.table, out.flow)
    assert "unreadable images: not checked" in terminal_summary(res.table, res.flow)


def test_unreadable_emptying_a_split_is_named(tmp_path):
    res, rep = _cohort_and_cache(tmp_path, damaged=("d6",))
    with pytest.raises(InputError, match=r"after excluding the unreadable images listed in .*failed_4\.csv: "
                                         r"no kept image is in split\(s\) \['test'\]"):
        exclude_unreadable(res, rep, max_share=0.5)


def test_cache_of_another_table_refused(tmp_path):
    res, rep = _cohort_and_cache(tmp_path)
    other = res.table.iloc[::-1].reset_index(drop=True)
    from d3m_lib.cohort import CohortResult
    with pytest.raises(ValueError, match="built from another table"):
        exclude_unreadable(CohortResult(other, res.flow, res.exclusions), rep, max_share=0.5)


# -- groups --------------------------------------------------------------------------

def _two_group_images():
    # a Black patient in validate as well, so White and Black each have train and validate images
    return IMAGES + [("d11", "10000007", "50000009", "PA", "validate", True)]


def _two_group_edit(name, df):
    if "chexpert" in name:
        df = pd.concat([df, pd.DataFrame([_labels_row("10000007", "50000009")])], ignore_index=True)
    return df


def _two_group_adm():
    return ADMISSIONS + [("10000007", "20000009", "2150-01-01 10:00:00", "BLACK/AFRICAN")]


def test_finalize_end_to_end(tmp_path):
    cxr, iv = make_mimic(tmp_path, images=_two_group_images(), admissions=_two_group_adm(),
                         edit=_two_group_edit)
    res = build_mimic_cohort(cxr, iv)
    _damage(cxr / res.table.set_index("image_id").loc["d1", "path"], "truncated")
    # d1 is White's only train image: excluding it leaves one usable group
    rep = image_cache.build_cache([cxr / p for p in res.table["path"]], tmp_path / "c", 4,
                                  workers=1, progress=False)
    with pytest.raises(InputError, match=r"only 1 group\(s\) \['Black or African American'\] reach "
                                         r"min_group_n=1 .*White 0/1"):
        finalize(res, rep, max_unreadable_share=0.5, min_group_n=1)
    ok = finalize(res, None, min_group_n=1)
    assert ok.warnings and ok.warnings[0].startswith("WARNING: 3 of 9 images")  # 8 frontal + d11


def test_groups_need_two_usable_groups(tmp_path):
    res = build_mimic_cohort(*make_mimic(tmp_path, images=_two_group_images(),
                                         admissions=_two_group_adm(), edit=_two_group_edit))
    assert check_groups(res, min_group_n=1) == []
    with pytest.raises(InputError, match=r"only 0 group\(s\) \[\] reach min_group_n=2 .*"
                                         r"too few images per group.*White 1/1"):
        check_groups(res, min_group_n=2)


@pytest.mark.parametrize("case,why", [
    ("empty", r"admissions\.csv\.gz has no rows"),
    ("no_overlap", r"no admission in .*admissions\.csv\.gz matched any X-ray patient \(0 of 5"),
    ("blank_race", r"the race column of .*admissions\.csv\.gz is empty \(all 7 rows blank\)"),
])
def test_no_race_groups_says_why(tmp_path, case, why):
    def edit(name, df):
        if name == "admissions.csv.gz":
            if case == "empty":
                return df.iloc[:0]
            if case == "no_overlap":
                df["subject_id"] = df["subject_id"].str.replace("^1", "9", regex=True)
            if case == "blank_race":
                df["race"] = np.nan
        return df
    res = build_mimic_cohort(*make_mimic(tmp_path, edit=edit))
    assert set(res.table["group"]) == {"Unknown"}
    with pytest.raises(InputError, match=why):
        check_groups(res, min_group_n=1)


def test_missing_race_share_warns(tmp_path):
    adm = [a for a in ADMISSIONS if a[0] in ("10000001", "10000006")]  # 2 of 6 patients
    res = build_mimic_cohort(*make_mimic(tmp_path, images=_two_group_images(), admissions=adm,
                                         edit=_two_group_edit))
    w = check_groups(res, min_group_n=1, ignore_groups=())
    assert len(w) == 1 and w[0].startswith("WARNING: 66.7% of the patients (4 of 6) have no admission "
                                           "in admissions.csv.gz")
    assert check_groups(res, min_group_n=1, max_missing_race_share=0.7, ignore_groups=()) == []


# -- the terminal summary ------------------------------------------------------------

def test_terminal_summary_and_partial_download_warning(tmp_path):
    # a partial download: 4 of the 9 frontal images are missing
    images = [(*im[:5], False) if im[0] in ("d1", "d5") else im for im in IMAGES]
    images += [("d12", "12000005", "50000006", "PA", "test", False)]
    res = build_mimic_cohort(*make_mimic(tmp_path, images=images))
    s = terminal_summary(res.table, res.flow, res.patients, res.notes, max_drop_share=0.10)
    lines = s.splitlines()
    assert lines[0].startswith("Cohort: 3 of 11 images kept (8 dropped);")
    assert "patients kept" in lines[0] and "studies kept" in lines[0]
    assert "image on disk 4" in s and "unreadable images: not checked" in s
    assert "images per split: train 1, validate 1, test 1" in s
    assert any(x.strip().startswith("Asian") and "1 (0 / 0 / 1), 1 patients" in x for x in lines)
    warn = [x for x in lines if x.startswith("WARNING:")]
    assert len(warn) == 1 and "6 of 9 images (66.7%)" in warn[0] and "'image on disk' 4" in warn[0]
    assert not [x for x in terminal_summary(res.table, res.flow, max_drop_share=0.7).splitlines()
                if x.startswith("WARNING")]


def test_lateral_views_never_count_as_a_large_drop(tmp_path):
    res = build_mimic_cohort(*make_mimic(tmp_path))
    # 5 of 10 listed images dropped, 2 of them laterals/blank: 3 of 8 frontal = 37.5%
    s = terminal_summary(res.table, res.flow, max_drop_share=0.4)
    assert "WARNING" not in s
    assert "3 of 8 images (37.5%)" in terminal_summary(res.table, res.flow, max_drop_share=0.3)


def test_patient_without_patients_row_is_counted(tmp_path):
    cxr, iv = make_mimic(tmp_path, edit=lambda n, df: df[df["subject_id"] != "10000003"]
                         if n == "patients.csv.gz" else df)
    res = build_mimic_cohort(cxr, iv)
    assert res.patients.set_index("subject_id")["sex"].isna().sum() == 1
    assert any(n.startswith("patients.csv.gz: 1 of 5 kept patients have no row") for n in res.notes)


# -- causes named before their consequences ---------------------------------

def test_unknown_view_positions_are_counted_and_warned_about(tmp_path):
    images = IMAGES + [("d12", "10000001", "50000001", "1", "train", True), ("d13", "10000001", "50000001", "1",
                                                                           "train", True)]
    res = build_mimic_cohort(*make_mimic(tmp_path, images=images))
    reason = res.flow.set_index("step").loc["frontal view", "reason"]
    assert "2 with a value no MIMIC/NIH view has ('1' 2)" in reason
    assert len(res.warnings) == 1 and "2 ViewPosition value(s) are no known view ('1' 2)" in res.warnings[0]
    assert "WARNING: mimic-cxr-2.0.0-metadata.csv.gz: 2 ViewPosition" in terminal_summary(
        res.table, res.flow, res.patients, res.notes, res.warnings)
    # MIMIC's own non-frontal codes are no surprise
    assert build_mimic_cohort(*make_mimic(tmp_path / "plain")).warnings == []


def test_missing_files_are_named_as_the_cause_of_an_emptied_split(tmp_path):
    images = [(*im[:5], False) if im[4] == "train" else im for im in IMAGES]
    with pytest.raises(InputError, match=r"all 5 'train' images of .*split\.csv\.gz were excluded \(by step: "
                                         r".*'image on disk' 2.*\); 2 of them have no JPEG file under"):
        build_mimic_cohort(*make_mimic(tmp_path, images=images))


def test_missing_files_are_named_before_the_group_check(tmp_path):
    images = [(*im[:5], False) if im[0] in ("d1", "d9") else im for im in _two_group_images()]
    res = build_mimic_cohort(*make_mimic(tmp_path, images=images, admissions=_two_group_adm(),
                                         edit=_two_group_edit))
    with pytest.raises(InputError, match=r"^\d+ of \d+ images .* were dropped.*'image on disk' 2.*"
                                         r"As a result, the study compares groups but only 1 group"):
        finalize(res, None, min_group_n=1)


def test_images_far_smaller_than_their_metadata_are_excluded_and_counted(tmp_path):
    def edit(name, df):
        if "metadata" in name:   # d12's metadata says 4096 x 4096
            df.loc[df["dicom_id"] == "d12", ["Rows", "Columns"]] = 4096
        return _two_group_edit(name, df)
    extra = [("d12", "10000001", "50000007", "PA", "train", True)]
    cxr, iv = make_mimic(tmp_path, images=_two_group_images() + extra, admissions=_two_group_adm(), edit=edit)
    res = build_mimic_cohort(cxr, iv)
    Image.fromarray(np.full((1, 1), 100, np.uint8)).save(cxr / res.table.set_index("image_id").loc["d5", "path"])
    small = res.table.set_index("image_id").loc["d12", "path"]
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(cxr / small)     # 4096 / 16 = 256 times smaller
    rep = image_cache.build_cache([cxr / p for p in res.table["path"]], tmp_path / "c", 4, workers=1,
                                  progress=False)
    assert rep.dims[res.table["image_id"].tolist().index("d5")].tolist() == [1, 1]
    out = finalize(res, rep, min_group_n=1, max_drop_share=1.0)
    step = out.flow.set_index("step").loc["image size"]
    assert step["dropped_images"] == 2 and "under 8 px on a side" in step["reason"]
    assert set(out.exclusions.set_index("image_id").loc[["d5", "d12"], "step"]) == {"image size"}
    assert any("2 image(s) excluded at step 'image size'" in n for n in out.notes)
    # the metadata's own size (the synthetic layout), or a plain resize, is kept
    ok = build_mimic_cohort(*make_mimic(tmp_path / "ok", images=_two_group_images(), admissions=_two_group_adm(),
                                        edit=_two_group_edit))
    rep = image_cache.build_cache([tmp_path / "ok" / "mimic-cxr-jpg" / p for p in ok.table["path"]],
                                  tmp_path / "c2", 4, workers=1, progress=False)
    assert finalize(ok, rep, min_group_n=1, max_drop_share=1.0).flow.set_index("step").loc[
        "image size", "dropped_images"] == 0
