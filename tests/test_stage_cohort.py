"""Stage 01 without papermill: a tiny synthetic cohort through ``stages.cohort.run``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from d3m_lib import cohort as cohortmod
from d3m_lib import config, synthetic
from d3m_lib.constants import FINDINGS
from d3m_lib.rundir import RunDir, StaleArtifactError, open_stage
from d3m_lib.stages import cohort as stage01

TINY = dict(synthetic_n_patients=150, synthetic_image_size=16, image_size=16, cohort_min_group_n=3,
            cache_workers=1)


def _run(run_dir, **params):
    RunDir(run_dir).write_config(config.resolve({**TINY, **params}))
    return stage01.run(open_stage("01_cohort", run_dir))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage01") / "run"
    return run_dir, _run(run_dir)


def test_artifacts_and_summary(default_run):
    run_dir, res = default_run
    run = RunDir(run_dir)
    d = run.stage_dir("01_cohort")
    for f in ("cohort.parquet", "flow.csv", "exclusions.parquet", "unreadable.csv", "image_cache/images_16.u8",
              "synthetic/synthetic_spec.json"):
        assert (d / f).exists(), f
    m = run.manifest("01_cohort")
    assert m["complete"] and run.problems("01_cohort") == []
    s = m["summary"]
    assert s["data"] == {"dataset": "mimic", "synthetic": True}
    assert s["synthetic_dir"] == "01_cohort/synthetic"          # relative: the run folder can move
    assert s["terminal"] == res.terminal.splitlines() and s["terminal"][0].startswith("Cohort: ")
    assert s["n_images"] == len(res.table) == len(run.cohort()) == res.glue["n_images"]
    assert s["groups"] == res.group_order and res.noun == "race"
    assert not run.policy().credentialed and res.policy.may_show_images()
    # the ground truth is found where the summary says the generator wrote it
    gt = synthetic.planted_ground_truth(run)
    assert gt is not None and len(gt) and set(gt["dicom_id"]) <= set(pd.read_parquet(d / "exclusions.parquet")[
        "image_id"]) | set(res.table["image_id"])
    pd.testing.assert_frame_equal(run.cohort(), res.table.reset_index(drop=True))


def test_tables_add_up(default_run):
    _, res = default_run
    t, flow = res.table, res.flow
    assert int(flow["images"].iloc[-1]) == len(t)
    assert res.glue["n_images_listed"] - res.glue["n_excluded_images"] == len(t)
    assert res.counts["all images"].sum() == len(t) and list(res.counts.index) == res.group_order
    assert sum(res.glue[f"n_images_{s}"] for s in ("train", "validate", "test")) == len(t)
    assert res.demographics["patients"].sum() == t["subject_id"].nunique() == res.glue["n_patients"]
    assert res.demographics["female_share"].between(0, 1).all()
    assert list(res.prevalence_matrix.index) == list(FINDINGS)
    assert list(res.prevalence_matrix.columns) == res.group_order
    cardio = t[t["Cardiomegaly"].notna()]
    g = res.group_order[0]
    assert res.prevalence_matrix.loc["Cardiomegaly", g] == pytest.approx(
        cardio.loc[cardio["group"] == g, "Cardiomegaly"].mean())
    # two example images per group, as the models see them
    assert res.examples.groupby("group").size().le(stage01.EXAMPLES_PER_GROUP).all()
    assert set(res.examples["group"]) == set(res.group_order)
    assert all(im.shape == (16, 16) and im.dtype == np.uint8 for im in res.example_images)
    assert "SYNTHETIC" in res.source and res.glue["data_source"] == res.source
    assert "patient_race" in res.group_rule or "admissions" in res.group_rule
    assert res.label_map is None and "negative" in res.labels_note


def test_unreadable_images_excluded_and_synthetic_dir_outside_the_run(tmp_path):
    data = tmp_path / "data"
    synthetic.generate(data, n_jobs=1, progress=False, n_patients=TINY["synthetic_n_patients"],
                       image_size=TINY["synthetic_image_size"], seed=0)
    cxr = data / synthetic.CXR_DIR
    meta = pd.read_csv(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
    labelled = set(pd.read_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str)["study_id"])
    frontal = meta[meta["ViewPosition"].eq("PA") & meta["study_id"].isin(labelled)].head(3)
    broken = cohortmod.image_relpath(frontal["subject_id"], frontal["study_id"], frontal["dicom_id"])
    for p in broken:
        (cxr / p).write_bytes(b"not a jpeg")
    run_dir = tmp_path / "run"
    res = _run(run_dir, mimic_cxr_dir=str(cxr), mimic_iv_dir=str(data / synthetic.IV_DIR),
               max_unreadable_share=0.05)
    assert "reused from an earlier run" in res.source
    step = res.flow[res.flow["step"] == cohortmod.UNREADABLE_STEP]
    assert int(step["dropped_images"].iloc[0]) == 3 == res.glue["n_failed_images"]
    unreadable = pd.read_csv(run_dir / "01_cohort" / "unreadable.csv", dtype=str)
    assert set(unreadable["image_id"]) == set(frontal["dicom_id"])
    assert not set(frontal["dicom_id"]) & set(res.table["image_id"])
    assert "unreadable images: 3" in res.terminal
    reason = step["reason"].iloc[0]                  # published: no path of this machine in it
    assert "listed in 01_cohort/unreadable.csv" in reason and str(tmp_path) not in reason
    s = RunDir(run_dir).manifest("01_cohort")["summary"]
    assert s["synthetic_dir"] == str(data.resolve())           # outside the run: absolute
    # resuming: the same cohort; the cache decodes again only the three that failed
    again = stage01.run(open_stage("01_cohort", run_dir))
    pd.testing.assert_frame_equal(again.table, res.table)
    assert "3 decoded in this run" in again.cache_note


def _external_data(tmp_path):
    data = tmp_path / "data"
    synthetic.generate(data, n_jobs=1, progress=False, n_patients=TINY["synthetic_n_patients"],
                       image_size=TINY["synthetic_image_size"], seed=0)
    cxr = data / synthetic.CXR_DIR
    return cxr, dict(mimic_cxr_dir=str(cxr), mimic_iv_dir=str(data / synthetic.IV_DIR))


def test_restoring_unreadable_files_as_the_error_says_fixes_the_run(tmp_path):
    """The image cache decodes failed rows again, so a byte-exact restore is enough."""
    cxr, where = _external_data(tmp_path)
    run_dir = tmp_path / "run"
    first = _run(run_dir, **where)
    victims = first.table["path"].head(5).tolist()
    saved = {p: (cxr / p).read_bytes() for p in victims}
    for p in victims:
        (cxr / p).write_bytes(b"broken")
    with pytest.raises(cohortmod.InputError, match="Restore these files"):
        stage01.run(open_stage("01_cohort", run_dir))
    for p, b in saved.items():
        (cxr / p).write_bytes(b)
    res = stage01.run(open_stage("01_cohort", run_dir))
    assert res.glue["n_failed_images"] == 0 and set(victims) <= set(res.table["path"])
    assert RunDir(run_dir).problems("01_cohort", full=True) == []


def test_changed_inputs_are_named_and_a_rerun_recomputes_stage_01(tmp_path):
    """Half the CheXpert rows and 20 JPEGs deleted after stage 01 -> refused, then recomputed."""
    cxr, where = _external_data(tmp_path)
    run_dir = tmp_path / "run"
    first = _run(run_dir, **where)
    run = RunDir(run_dir)
    assert run.problems("01_cohort", full=True) == []
    chex = cxr / "mimic-cxr-2.0.0-chexpert.csv.gz"
    labels = pd.read_csv(chex, dtype=str)
    labels.iloc[: len(labels) // 2].to_csv(chex, index=False)
    gone = first.table["path"].tail(20).tolist()
    for p in gone:
        (cxr / p).unlink()
    probs = run.problems("01_cohort", full=True)
    assert any(f"input {chex} was changed" in p for p in probs)
    assert any("20 input image(s) changed" in p and "(removed)" in p for p in probs)
    with pytest.raises(StaleArtifactError, match="chexpert.csv.gz was changed"):
        run.cohort()
    res = stage01.run(open_stage("01_cohort", run_dir))                 # the re-run recomputes
    assert len(res.table) < len(first.table) and not set(gone) & set(res.table["path"])
    assert run.problems("01_cohort", full=True) == [] and len(run.cohort()) == len(res.table)
    assert run.images(run.cohort()["row"]).shape[0] >= len(res.table)


def test_missing_inputs_are_refused_before_any_work(tmp_path):
    with pytest.raises(config.ConfigError, match="mimic_cxr_dir' must be set for real MIMIC"):
        _run(tmp_path / "a", synthetic=False)
    with pytest.raises(ValueError, match="mimic_cxr_dir must end in"):
        _run(tmp_path / "b", mimic_cxr_dir=str(tmp_path / "elsewhere"))
    assert RunDir(tmp_path / "b").manifest("01_cohort")["complete"] is False
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "b" / "01_cohort" / "synthetic").exists()


def test_texts_for_nih_name_the_group(tmp_path):
    cfg = config.resolve({"dataset": "nih", "nih_dir": str(tmp_path), "nih_group": "age_band"})
    assert "compares groups by **age band**" in stage01.group_rule_text(cfg)
    assert stage01.data_source(cfg, False).startswith("REAL NIH") and "age band" in stage01.data_source(cfg, False)
    assert "by **sex**" in stage01.group_rule_text(cfg.with_overrides({"nih_group": "sex"}))
    real = config.resolve({"synthetic": False, "mimic_cxr_dir": str(tmp_path), "mimic_iv_dir": str(tmp_path)})
    assert "credentialed" in stage01.data_source(real, False)


def test_flow_check_and_demographics_without_sex_or_age():
    flow = pd.DataFrame({"step": ["listed", "a", "b"], "images": [10, 8, 5], "dropped_images": [0, 2, 2]})
    with pytest.raises(ValueError, match="at step 'b'"):
        stage01.check_flow(flow)
    stage01.check_flow(flow.assign(dropped_images=[0, 2, 3]))
    demo = stage01.demographics(pd.DataFrame({"subject_id": ["1", "2", "3"], "group": ["A", "A", "B"]}), ["B", "A"])
    assert list(demo.index) == ["B", "A"] and list(demo["patients"]) == [1, 2]
    assert demo["median_age"].isna().all()
    json.dumps(demo.to_dict())  # plain values
