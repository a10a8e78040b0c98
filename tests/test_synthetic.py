"""The synthetic MIMIC generator: layout, columns, quirks, planted biases, determinism."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from d3m_lib import race, synthetic
from d3m_lib.constants import FINDINGS, RACE_GROUPS

TINY = dict(n_patients=120, image_size=48)
CXR = "mimic-cxr-jpg"
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                    "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                    "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                    "PatientOrientationCodeSequence_CodeMeaning"]
ADMISSIONS_COLUMNS = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                      "admission_location", "discharge_location", "insurance", "language",
                      "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag"]
PATIENTS_COLUMNS = ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "a"
    summary = synthetic.generate(out, progress=False, **TINY)
    t = {
        "out": out, "summary": summary,
        "md": pd.read_csv(out / CXR / "mimic-cxr-2.0.0-metadata.csv.gz"),
        "cx": pd.read_csv(out / CXR / "mimic-cxr-2.0.0-chexpert.csv.gz"),
        "sp": pd.read_csv(out / CXR / "mimic-cxr-2.0.0-split.csv.gz"),
        "adm": pd.read_csv(out / "mimiciv/hosp/admissions.csv.gz"),
        "pat": pd.read_csv(out / "mimiciv/hosp/patients.csv.gz"),
        "gt": pd.read_csv(out / synthetic.GROUND_TRUTH_FILE),
        "ev": pd.read_csv(out / synthetic.EVAL_MARKERS_FILE),
    }
    t["group"] = race.race_for_subjects(t["pat"]["subject_id"], t["adm"]).set_index("subject_id")["group"]
    return t


def _path(row):
    s = str(row.subject_id)
    return f"files/p{s[:2]}/p{s}/s{row.study_id}/{row.dicom_id}.jpg"


def test_layout_and_ids(tiny):
    md, out = tiny["md"], tiny["out"]
    for row in md.itertuples():
        assert (out / CXR / _path(row)).is_file()
    n_jpg = len(list((out / CXR / "files").rglob("*.jpg")))
    assert n_jpg == len(md)
    assert md["subject_id"].astype(str).str.fullmatch(r"1\d{7}").all()
    assert md["study_id"].astype(str).str.fullmatch(r"5\d{7}").all()
    assert md["dicom_id"].str.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}").all()
    assert md["dicom_id"].is_unique
    img = Image.open(out / CXR / _path(next(md.itertuples())))
    assert img.mode == "L" and img.size == (48, 48)
    assert (md["Rows"] == 48).all() and (md["Columns"] == 48).all()
    assert (out / synthetic.COMPLETE_FILE).is_file()


def test_columns_exactly_as_mimic(tiny):
    assert list(tiny["md"].columns) == METADATA_COLUMNS
    assert list(tiny["cx"].columns) == ["subject_id", "study_id", *FINDINGS]
    assert list(tiny["sp"].columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert list(tiny["adm"].columns) == ADMISSIONS_COLUMNS
    assert list(tiny["pat"].columns) == PATIENTS_COLUMNS
    assert list(tiny["gt"].columns) == ["dicom_id", "subject_id", "study_id", "split", "kind", "finding"]


def test_label_values_and_race_vocabulary(tiny):
    vals = tiny["cx"][list(FINDINGS)].stack(future_stack=True)
    assert vals.isna().any()
    assert set(vals.dropna().unique()) <= {1.0, 0.0, -1.0}
    assert set(tiny["adm"]["race"]) <= set(race.MIMIC_RACE_STRINGS)
    assert tiny["cx"]["study_id"].is_unique


def test_quirks_present(tiny):
    md, cx, adm, pat = tiny["md"], tiny["cx"], tiny["adm"], tiny["pat"]
    views = md["ViewPosition"]
    assert {"PA", "AP", "LATERAL", "LL"} <= set(views.dropna())
    assert views.isna().any()
    assert (md.groupby("study_id").size() > 1).any()
    assert not set(md["study_id"]) <= set(cx["study_id"])          # studies without a CheXpert row
    assert (cx[list(FINDINGS)] == -1.0).any().any()                  # uncertain labels
    per = race.patient_race(adm)
    assert (per["n_distinct_groups"] > 1).any()                      # conflicting race
    assert not set(pat["subject_id"]) <= set(adm["subject_id"])      # patients without admission
    assert set(md["subject_id"]) == set(pat["subject_id"])


def test_split_patient_disjoint_every_group_in_validate(tiny):
    sp, md = tiny["sp"], tiny["md"]
    assert set(sp["split"]) == {"train", "validate", "test"}
    assert (sp.groupby("subject_id")["split"].nunique() == 1).all()
    assert sorted(sp["dicom_id"]) == sorted(md["dicom_id"])
    frontal = md[md["ViewPosition"].isin(["PA", "AP"])].merge(sp[["dicom_id", "split"]])
    val = frontal[frontal["split"] == "validate"]
    assert set(val["subject_id"].map(tiny["group"])) == set(RACE_GROUPS)


def test_ground_truth_train_only_and_in_the_right_groups(tiny):
    gt, sp, group = tiny["gt"], tiny["sp"], tiny["group"]
    assert set(gt["kind"]) == {"shortcut", "label_flip"}
    assert set(gt["dicom_id"]) <= set(sp["dicom_id"])
    splits = gt["dicom_id"].map(sp.set_index("dicom_id")["split"])
    assert (splits == "train").all() and (gt["split"] == "train").all()
    g = gt["subject_id"].map(group)
    p = synthetic.DEFAULTS
    assert (g[gt["kind"] == "shortcut"] == p["shortcut_group"]).all()
    assert (g[gt["kind"] == "label_flip"] == p["label_flip_group"]).all()
    ev = tiny["ev"]
    assert len(ev) and (ev["split"] != "train").all()
    assert set(ev["subject_id"].map(group)) <= set(p["shortcut_eval_groups"])


def test_shortcut_marker_follows_label_and_is_drawn(tiny):
    md, cx, gt, sp, group, out = tiny["md"], tiny["cx"], tiny["gt"], tiny["sp"], tiny["group"], tiny["out"]
    tr = md.merge(sp[["dicom_id", "split"]]).merge(cx, on=["subject_id", "study_id"])
    tr = tr[(tr["split"] == "train") & (tr["subject_id"].map(group) == synthetic.DEFAULTS["shortcut_group"])]
    f = "Support Devices"
    marked = set(gt[(gt["kind"] == "shortcut") & (gt["finding"] == f)]["dicom_id"])
    has = tr["dicom_id"].isin(marked)
    p = synthetic.DEFAULTS
    assert abs(has[tr[f] == 1.0].mean() - p["shortcut_p_pos"]) < 0.15
    assert has[tr[f].isna() | (tr[f] == 0.0)].mean() <= p["shortcut_p_neg"] + 0.05
    # the marker is a bright square at its documented slot
    mx, my = synthetic.MARKER_SLOTS[f]
    col, row = int((mx + 1) / 2 * 48), int((my + 1) / 2 * 48)
    vals = {d: np.asarray(Image.open(out / CXR / _path(r)))[row, col]
            for d, r in zip(tr["dicom_id"], tr.itertuples())}
    on = [v for d, v in vals.items() if d in marked]
    off = [v for d, v in vals.items() if d not in marked]
    assert np.mean(on) > 200 and np.mean(off) < 100


def test_eval_markers_follow_their_label_rates(tiny):
    """Validate/test markers of the eval groups: P(marker | positive) and P(marker | other) as set."""
    md, cx, sp, group, ev = tiny["md"], tiny["cx"], tiny["sp"], tiny["group"], tiny["ev"]
    p = synthetic.DEFAULTS
    im = md.merge(sp[["dicom_id", "split"]]).merge(cx, on=["subject_id", "study_id"], how="left")
    im = im[(im["split"] != "train") & im["subject_id"].map(group).isin(p["shortcut_eval_groups"])]
    f = "Support Devices"
    has = im["dicom_id"].isin(set(ev.loc[ev["finding"] == f, "dicom_id"]))
    pos = im[f] == 1.0
    assert pos.sum() >= 5 and (~pos).sum() >= 5
    assert abs(has[pos].mean() - p["shortcut_eval_p_pos"]) < 0.25
    assert abs(has[~pos].mean() - p["shortcut_eval_p_neg"]) < 0.25

def test_cue_visible_in_generated_images(tiny):
    """Cardiomegaly widens the heart: pixels just beyond a normal heart's image-right edge are brighter."""
    md, cx, out = tiny["md"], tiny["cx"], tiny["out"]
    fr = md[md["ViewPosition"].isin(["PA", "AP"])].merge(cx, on=["subject_id", "study_id"])
    region = lambda r: np.asarray(Image.open(out / CXR / _path(r)), dtype=float)[28:31, 34:37].mean()  # noqa: E731
    pos = [region(r) for r in fr[fr["Cardiomegaly"] == 1.0].itertuples()]
    neg = [region(r) for r in fr[fr["Cardiomegaly"].isna() | (fr["Cardiomegaly"] == 0.0)].itertuples()]
    assert len(pos) >= 5
    # at full strength the cue lifts this region by > 40 grey levels; it scales with cue_strength
    assert np.mean(pos) - np.mean(neg) > 40 * synthetic.DEFAULTS["cue_strength"]


@pytest.mark.parametrize("finding", [f for f in FINDINGS if f != "No Finding"])
def test_every_cue_survives_downscaling_to_24px(finding):
    st = np.zeros(len(FINDINGS))
    st[FINDINGS.index(finding)] = 1.0
    off = np.zeros(len(FINDINGS), dtype=bool)
    for view in ("PA", "AP"):
        a = synthetic.render_image(64, view, st, off, False, seed=5)
        b = synthetic.render_image(64, view, np.zeros(len(FINDINGS)), off, False, seed=5)
        small = [np.asarray(Image.fromarray(x).resize((24, 24), Image.BILINEAR), dtype=float) for x in (a, b)]
        assert np.abs(small[0] - small[1]).max() > 30, (finding, view)
    assert set(synthetic.FINDING_CUES) == set(FINDINGS)


def test_labels_match_chexpert_statistics():
    lab = synthetic.draw_labels(40000, np.random.default_rng(3))
    for f in FINDINGS:
        if f == "No Finding":
            continue
        r = synthetic.LABEL_RATES.loc[f]
        assert (lab[f] == 1.0).mean() == pytest.approx(r["positive"], abs=0.01), f
        assert (lab[f] == -1.0).mean() == pytest.approx(r["uncertain"], abs=0.01), f
        assert lab[f].isna().mean() == pytest.approx(r["blank"], abs=0.015), f
    both = ((lab["Lung Opacity"] == 1.0) & (lab["Support Devices"] == 1.0)).mean()
    assert both == pytest.approx(synthetic.COPOSITIVE.loc["Lung Opacity", "Support Devices"], abs=0.015)
    others = [f for f in FINDINGS if f not in ("No Finding", "Support Devices")]
    nf = lab["No Finding"] == 1.0
    assert not lab.loc[nf, others].isin([1.0, -1.0]).any().any()
    assert nf.any()


def test_embedded_statistics_match_shared_files():
    d = Path(__file__).resolve().parents[2] / "shared/data/label-statistics"
    if not d.exists():
        pytest.skip("shared label statistics not on this machine")
    rates = pd.read_csv(d / "chexpert_frontal_label_rates.csv").set_index("finding")
    pd.testing.assert_frame_equal(rates.loc[list(FINDINGS)], synthetic.LABEL_RATES, check_dtype=False)
    co = pd.read_csv(d / "chexpert_frontal_positive_cooccurrence.csv", index_col=0)
    np.testing.assert_allclose(co.loc[list(FINDINGS), list(FINDINGS)].to_numpy(),
                               synthetic.COPOSITIVE.to_numpy())


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != synthetic.COMPLETE_FILE}


def test_deterministic_for_a_seed_and_seed_matters(tiny, tmp_path):
    b = tmp_path / "b"
    synthetic.generate(b, progress=False, n_jobs=1, **TINY)
    fa, fb = _files(tiny["out"]), _files(b)
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []
    c = tmp_path / "c"
    synthetic.generate(c, progress=False, seed=1, **TINY)
    meta = f"{CXR}/mimic-cxr-2.0.0-metadata.csv.gz"
    assert _files(c)[meta] != fa[meta]


def test_idempotent_and_refuses_other_spec(tiny, tmp_path):
    again = synthetic.generate(tiny["out"], progress=False, **TINY)
    assert again["reused"] is True and again["images"] == tiny["summary"]["images"]
    with pytest.raises(ValueError, match="seed"):
        synthetic.generate(tiny["out"], progress=False, seed=9, **TINY)
    spec = json.loads((tiny["out"] / synthetic.SPEC_FILE).read_text())
    assert spec["params"]["seed"] == 0 and set(spec["finding_cues"]) == set(FINDINGS)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        synthetic.generate(other, progress=False, **TINY)
    with pytest.raises(TypeError, match="n_patient"):
        synthetic.generate(tmp_path / "x", n_patient=5)
    with pytest.raises(ValueError, match="shortcut_findings"):
        synthetic.generate(tmp_path / "y", shortcut_findings=["Cardiomegally"], **TINY)
    with pytest.raises(ValueError, match="shortcut_eval_p_neg=1.5"):
        synthetic.generate(tmp_path / "z", shortcut_eval_p_neg=1.5, **TINY)


def test_device_difference_is_off_by_default_and_can_be_switched_on(tiny, tmp_path):
    """The default plants only harm that removal can undo; hardware_group turns the device difference on."""
    assert synthetic.DEFAULTS["hardware_group"] is None and tiny["summary"]["hardware_images"] == 0
    on = synthetic.generate(tmp_path / "hw", progress=False, hardware_group="Black or African American",
                            hardware_prob=1.0, **TINY)
    md = tiny["md"]
    black = md["subject_id"].map(tiny["group"]).eq("Black or African American").sum()
    assert on["hardware_images"] == black > 0


def _tables(scenario, n_patients=400):
    p = synthetic._normalise({"n_patients": n_patients, "image_size": 24, **synthetic.scenario_params(scenario)})
    t = synthetic._cohort_tables(p)
    markers = np.array([j[4].any() for j in t["jobs"]])
    hardware = np.array([j[5] for j in t["jobs"]])
    return t, markers, hardware


def test_scenarios_plant_what_they_say():
    t, markers, hardware = _tables("null")
    assert t["ground_truth"].empty and not markers.any() and not hardware.any() and t["eval_flips"].empty
    t, markers, hardware = _tables("flips_only")
    assert set(t["ground_truth"]["kind"]) == {"label_flip"} and not markers.any() and not hardware.any()
    t, markers, hardware = _tables("shortcut_only")
    assert set(t["ground_truth"]["kind"]) == {"shortcut"} and markers.any() and not hardware.any()
    assert t["counts"]["planted_label_flips"] == 0
    t, markers, hardware = _tables("non_removable")
    assert t["ground_truth"].empty and not markers.any() and hardware.any()
    t, markers, hardware = _tables("realistic")
    assert set(t["ground_truth"]["kind"]) == {"shortcut", "label_flip"} and hardware.any()
    assert set(t["eval_flips"]["split"]) == {"validate", "test"}     # evaluation labels are noisy too
    assert (t["ground_truth"]["split"] == "train").all()           # the oracle removes training images only
    ev = t["eval_markers"]
    assert (ev["split"] == "train").any()   # the evaluation-time marker is also seen in training
    # ... and those training markers are not listed as planted harm
    gt = t["ground_truth"]
    shortcut = set(zip(gt.loc[gt["kind"] == "shortcut", "dicom_id"], gt.loc[gt["kind"] == "shortcut", "finding"]))
    assert not set(zip(ev.loc[ev["split"] == "train", "dicom_id"], ev.loc[ev["split"] == "train", "finding"])) \
        & shortcut


def test_planted_scenario_is_the_default_and_unchanged():
    a, _, _ = _tables("planted")
    p = synthetic._normalise({"n_patients": 400, "image_size": 24})
    b = synthetic._cohort_tables(p)
    pd.testing.assert_frame_equal(a["ground_truth"], b["ground_truth"])
    assert a["eval_flips"].empty and (a["eval_markers"]["split"] != "train").all()
    with pytest.raises(ValueError, match="unknown synthetic scenario 'nul'"):
        synthetic.scenario_params("nul")
    with pytest.raises(ValueError, match="label_flip_splits"):
        synthetic._normalise({"label_flip_splits": ["training"]})
    table = synthetic.scenario_table()
    assert list(table["scenario"]) == list(synthetic.SCENARIOS)
