"""analysis.py on constructed predictions with known answers, and a fake run folder.

``build_fake_run`` writes a run folder in the formats of ARCHITECTURE.md
(cohort, image cache, a real saved TRAK state of a tiny random model, the D3M
stage's predictions / selections / alignment, a planted ground truth file) with
random but structured data. test_privacy.py and test_explorer.py reuse it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from d3m_lib import analysis, config
from d3m_lib.analysis import OVERALL, MethodComparison, removed_summary, weighted_metric
from d3m_lib.constants import FINDINGS, RACE_GROUPS
from d3m_lib.rundir import RunDir

FAKE_FINDINGS = ("Cardiomegaly", "No Finding")
FAKE_METHODS = ("erm", "base", "d3m", "random", "balanced", "auto_d3m")
FAKE_SEEDS = (0, 1)
FAKE_PX = 16


# -- the fake run folder -------------------------------------------------------
def _fake_cohort(rng, n=360):
    split = np.array(["train"] * 220 + ["validate"] * 60 + ["test"] * (n - 280))
    groups = rng.choice(RACE_GROUPS, size=n, p=[0.1, 0.2, 0.1, 0.05, 0.05, 0.5])
    subj = rng.choice(np.arange(10_000_000, 19_999_999), size=n // 2, replace=False)
    subject = np.repeat(subj, 2)[:n]
    study = rng.choice(np.arange(50_000_000, 59_999_999), size=n, replace=False)
    dicom = ["-".join(f"{v:08x}" for v in rng.integers(0, 2**32, 5)) for _ in range(n)]
    df = pd.DataFrame({
        "image_id": dicom, "subject_id": subject.astype(str), "study_id": study.astype(str),
        "path": [f"files/p{str(s)[:2]}/p{s}/s{st}/{d}.jpg" for s, st, d in zip(subject, study, dicom)],
        "split": split, "group": groups, "view": rng.choice(["PA", "AP"], size=n)})
    for f in FINDINGS:
        lab = (rng.random(n) < 0.35).astype(float)
        lab[rng.random(n) < 0.05] = np.nan
        df[f] = lab
    df["row"] = np.arange(n)
    return df


def _write_image_cache(cohort, cache_dir, px, rng):
    from d3m_lib import image_cache

    f = image_cache.cache_files(cache_dir, px)
    f["images"].parent.mkdir(parents=True, exist_ok=True)
    n = len(cohort)
    yy, xx = np.mgrid[0:px, 0:px]
    base = 60 + 120 * np.exp(-(((xx - px / 2) / (px / 3)) ** 2 + ((yy - px / 2) / (px / 2.5)) ** 2))
    imgs = base[None] + rng.normal(0, 25, (n, px, px)) + 40 * cohort["Cardiomegaly"].fillna(0).to_numpy()[:, None, None]
    mm = np.memmap(f["images"], dtype=np.uint8, mode="w+", shape=(n, px, px))
    mm[:] = np.clip(imgs, 0, 255).astype(np.uint8)
    mm.flush()
    np.save(f["done"], np.ones(n, dtype=bool))
    f["meta"].write_text(json.dumps(dict(n=n, image_size=px, paths_sha256=image_cache.paths_hash(
        list(cohort["path"])), version=image_cache.CACHE_VERSION, complete=True, n_failed=0)))


def _fake_predictions(cohort, rng):
    # Skill (logit scale) per group: one group is clearly worse; d3m helps it most.
    skill = {g: 2.0 - 0.4 * i for i, g in enumerate(sorted(RACE_GROUPS))}
    bonus = {"erm": 0.0, "base": -0.3, "d3m": 0.4, "random": 0.0, "balanced": 0.1, "auto_d3m": 0.3}
    recs = []
    for f in FAKE_FINDINGS:
        ev = cohort[cohort["split"].isin(["validate", "test"]) & cohort[f].notna()]
        y = ev[f].to_numpy().astype(int)
        for m in FAKE_METHODS:
            for s in FAKE_SEEDS:
                k = np.array([skill[g] for g in ev["group"]]) + bonus[m]
                logit = (2 * y - 1) * k + rng.normal(0, 1.2, len(y))
                prob = 1 / (1 + np.exp(-logit))
                recs.append(pd.DataFrame({
                    "finding": f, "method": m, "seed": s, "split": ev["split"].to_numpy(),
                    "row": ev["row"].to_numpy(), "group": ev["group"].to_numpy(), "y": y,
                    "logit": logit, "prob": prob, "threshold": 0.5, "pred": (prob >= 0.5).astype(int)}))
    return pd.concat(recs, ignore_index=True)


def _fake_selections(cohort, rng):
    recs, align = [], []
    for f in FAKE_FINDINGS:
        tr = cohort[(cohort["split"] == "train") & cohort[f].notna()]
        for s in FAKE_SEEDS:
            score = rng.normal(0, 1, len(tr)) + 0.8 * (tr["group"] == "White").to_numpy()
            a = pd.DataFrame({"finding": f, "seed": s, "row": tr["row"].to_numpy(), "score": score})
            for g in RACE_GROUPS:
                a[f"tau_{g}"] = rng.normal(0, 1, len(tr))
            align.append(a)
            for m in ("d3m", "random", "balanced", "auto_d3m"):
                kept = score >= np.quantile(score, 0.15) if m in ("d3m", "auto_d3m") else rng.random(len(tr)) >= 0.15
                recs.append(pd.DataFrame({"finding": f, "method": m, "seed": s,
                                          "row": tr["row"].to_numpy(), "kept": kept}))
    return pd.concat(recs, ignore_index=True), pd.concat(align, ignore_index=True)


def _fake_trak(run, cohort, finding, seed):
    """A genuine saved TRAK state of a tiny random ResNet-9, written by attribution's own
    ``baseline_scorer`` in the run folder's layout (what notebook 04 leaves behind)."""
    from types import SimpleNamespace

    import torch

    from d3m_lib import attribution, image_cache, models

    ck = run.path / "03_baseline" / finding.replace(" ", "_") / f"seed{seed}" / "epoch_05.pt"
    if not ck.exists():   # written while stage 03 is open (build_fake_run): a finished stage's files stay put
        ck.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        torch.save(models.build_model("resnet9", num_outputs=1, width=4).state_dict(), ck)
    images = image_cache.open_cache(run.path / "01_cohort" / "image_cache", FAKE_PX)
    cfg = SimpleNamespace(arch="resnet9", width=4, image_size=FAKE_PX, norm_mean=0.0, norm_std=1.0)
    sc = attribution.baseline_scorer(run.path, finding, seed, cohort, images, cfg, [5], proj_dim=16,
                                     lambda_reg=0.0, batch_size=128, projector_seed=0)
    sc.featurize()


def write_fake_cohort_stage(run: RunDir, cfg, root: Path, px: int, rng) -> tuple[pd.DataFrame, Path]:
    """Config and a finished stage 01 (fake cohort, image cache) recorded as synthetic; (cohort, data dir)."""
    run.write_config(cfg)
    data = root / "data" / "mimic-cxr-jpg"
    data.mkdir(parents=True)
    st = run.begin("01_cohort", cfg)
    cohort = _fake_cohort(rng)
    cohort.to_parquet(st.path("cohort.parquet"), index=False)
    _write_image_cache(cohort, st.dir / "image_cache", px, rng)
    # what notebook 01 records for a synthetic cohort: where the generator wrote it
    st.finish({"data": {"dataset": "mimic", "synthetic": True}, "synthetic": True,
               "synthetic_dir": str(data.parent)})
    return cohort, data


def write_tiny_run_to_02(root: Path, params: dict, finding: str, px: int, n_planted: int = 12):
    """Stages 01 and 02 of a tiny fake cohort for training tests: ``n_planted`` training images of
    ``finding`` recorded as planted label flips, and ``finding`` chosen by the scan. Returns (run, cfg)."""
    rng = np.random.default_rng(0)
    run = RunDir(root / "run")
    cfg = config.resolve(params)
    cohort, data = write_fake_cohort_stage(run, cfg, root, px, rng)
    tr = cohort[(cohort["split"] == "train") & cohort[finding].notna()]
    gt = tr.sample(n_planted, random_state=0)
    pd.DataFrame({"dicom_id": gt["image_id"], "finding": finding, "kind": "label_flip", "split": "train"}
                 ).to_csv(data.parent / "planted_ground_truth.csv.gz", index=False)
    st = run.begin("02_scan", cfg)
    st.path("chosen_findings.json").write_text(f'["{finding}"]')
    st.finish()
    return run, cfg


def restamp(run_dir, name: str) -> None:
    """Record again the file hashes of a finished stage whose files a test edited on purpose."""
    from d3m_lib import rundir

    run = RunDir(run_dir)
    m = run.manifest(name)
    m["files"] = rundir.snapshot_files(run.stage_dir(name))
    m["content"] = rundir.content_hash(m["files"])
    run._write_manifest(name, m)


def build_fake_run(root: Path, seed: int = 0, with_trak: bool = True, trak_seeds: tuple = ()) -> dict:
    """Write a fake run folder under ``root``; returns paths and tables.

    ``trak_seeds``: training seeds with a TRAK state (default: the first of ``FAKE_SEEDS``).
    """
    trak_seeds = tuple(trak_seeds) or (FAKE_SEEDS[0],)
    rng = np.random.default_rng(seed)
    run = RunDir(root / "run")
    cfg = config.resolve({"image_size": FAKE_PX, "width": 4, "min_group_n": 5, "n_boot": 50,
                          "n_targets": 2, "n_top": 4, "trak_models": 0, "trak_checkpoints": [5]})
    cohort, data = write_fake_cohort_stage(run, cfg, root, FAKE_PX, rng)
    gt_rows = cohort[cohort["split"] == "train"].sample(30, random_state=seed)
    gt = pd.DataFrame({"dicom_id": gt_rows["image_id"], "subject_id": gt_rows["subject_id"],
                       "study_id": gt_rows["study_id"], "split": "train",
                       "kind": np.where(np.arange(30) % 2 == 0, "shortcut", "label_flip"),
                       "finding": np.where(np.arange(30) % 3 == 0, "No Finding", "Cardiomegaly")})
    gt.to_csv(data.parent / "planted_ground_truth.csv.gz", index=False)
    run.begin("02_scan", cfg).finish()   # (nearly) empty upstream stages: 04 and 05 require them
    st = run.begin("03_baseline", cfg)
    if with_trak:   # the anchor checkpoints TRAK reads, inside stage 03 before it finishes (content hashes)
        import torch

        from d3m_lib import models
        for f in FAKE_FINDINGS:
            for s in trak_seeds:
                torch.manual_seed(s)
                torch.save(models.build_model("resnet9", num_outputs=1, width=4).state_dict(),
                           st.path(f.replace(" ", "_"), f"seed{s}", "epoch_05.pt"))
    st.finish()
    st = run.begin("04_trak", cfg)
    if with_trak:
        for f in FAKE_FINDINGS:
            _fake_trak(run, cohort, f, FAKE_SEEDS[0])
        for s in trak_seeds[1:]:   # further seeds: the first finding only
            _fake_trak(run, cohort, FAKE_FINDINGS[0], s)
    st.finish()
    st = run.begin("05_d3m", cfg)
    preds = _fake_predictions(cohort, rng)
    sel, align = _fake_selections(cohort, rng)
    preds.to_parquet(st.path("predictions.parquet"), index=False)
    sel.to_parquet(st.path("selections.parquet"), index=False)
    align.to_parquet(st.path("alignment.parquet"), index=False)
    st.finish()
    return dict(run_dir=run.path, mimic_cxr_dir=data, cohort=cohort, predictions=preds,
                selections=sel, ground_truth=gt)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    return build_fake_run(tmp_path_factory.mktemp("fake"), with_trak=False)


# -- constructed predictions with known answers ------------------------------------
def _constructed():
    """Two groups, two methods, two seeds; known accuracies.

    Group A (10 test images), group B (10). ERM: A 8/10 right, B 5/10 (both seeds).
    D3M: A 7/10, B 8/10 in seed 0; A 7/10, B 6/10 in seed 1.
    """
    rows = np.arange(20)
    groups = np.array(["A"] * 10 + ["B"] * 10)
    y = np.tile([1, 0], 10)

    def preds(n_right_a, n_right_b):
        right = np.zeros(20, bool)
        right[:n_right_a] = True
        right[10:10 + n_right_b] = True
        return np.where(right, y, 1 - y)

    recs = []
    for method, seed, (a, b) in [("erm", 0, (8, 5)), ("erm", 1, (8, 5)), ("d3m", 0, (7, 8)), ("d3m", 1, (7, 6))]:
        p = preds(a, b)
        prob = np.where(p == 1, 0.8, 0.2)
        recs.append(pd.DataFrame({"finding": "F", "method": method, "seed": seed, "split": "test", "row": rows,
                                  "group": groups, "y": y, "logit": 0.0, "prob": prob, "threshold": 0.5,
                                  "pred": p}))
    preds_df = pd.concat(recs, ignore_index=True)
    # training rows 100..129: A = 100..109, B = 110..129; d3m removes 2 of A and 5 of B (seed 0),
    # 4 of A and 3 of B (seed 1)
    cohort = pd.DataFrame({"row": np.arange(100, 130), "group": ["A"] * 10 + ["B"] * 20, "split": "train",
                           "image_id": [f"img{i:06d}" for i in range(30)], "F": np.tile([1.0, 0.0], 15)})
    sel = []
    for seed, ra, rb in [(0, 2, 5), (1, 4, 3)]:
        kept = np.ones(30, bool)
        kept[:ra] = False
        kept[10:10 + rb] = False
        sel.append(pd.DataFrame({"finding": "F", "method": "d3m", "seed": seed, "row": np.arange(100, 130),
                                 "kept": kept}))
    return preds_df, pd.concat(sel, ignore_index=True), cohort


def test_source_table_known_values():
    preds, sel, cohort = _constructed()
    mc = MethodComparison(preds, sel, cohort, n_boot=300, seed=1)
    t = mc.source_table("F").set_index("group")
    assert list(t.index) == ["A", "B", OVERALL]
    assert t.loc["A", "erm"] == pytest.approx(0.8)
    assert t.loc["B", "erm"] == pytest.approx(0.5)
    assert t.loc["A", "d3m"] == pytest.approx(0.7)
    assert t.loc["B", "d3m"] == pytest.approx(0.7)  # (0.8 + 0.6) / 2
    assert t.loc[OVERALL, "erm"] == pytest.approx(0.65)
    assert t.loc["A", "change"] == pytest.approx(-0.1)
    assert t.loc["B", "change"] == pytest.approx(0.2)
    assert t.loc[OVERALL, "change"] == pytest.approx(0.05)
    # change in n: mean removed over seeds: A (2+4)/2 = 3, B (5+3)/2 = 4
    assert t.loc["A", "change_n"] == -3 and t.loc["B", "change_n"] == -4 and t.loc[OVERALL, "change_n"] == -7
    assert t.loc["A", "n_train"] == 10 and t.loc["B", "n_train"] == 20 and t.loc["A", "n"] == 10
    for m in ("erm", "d3m", "change"):
        lo, hi = (f"{m}_lo", f"{m}_hi") if m != "change" else ("change_lo", "change_hi")
        assert ((t[lo] <= t[m] + 1e-12) & (t[m] <= t[hi] + 1e-12)).all()


def test_paired_change_is_exact_when_models_agree_on_a_group():
    preds, sel, cohort = _constructed()
    mc = MethodComparison(preds, n_boot=200, seed=0)
    # seed-1 d3m on group A equals ERM except one image: within a seed the paired
    # difference of every resample is (d3m - erm) on the same images.
    same = preds.copy()
    same.loc[same["method"] == "d3m", "pred"] = same.loc[same["method"] == "erm", "pred"].to_numpy()
    ch = MethodComparison(same, n_boot=200).change("F", "d3m").set_index("group")
    assert (ch[["change", "change_lo", "change_hi"]].abs() < 1e-12).all().all()
    # the unchanged d3m models, by contrast, have a non-degenerate interval for B
    ch2 = mc.change("F", "d3m").set_index("group")
    assert ch2.loc["B", "change_lo"] < ch2.loc["B", "change"] < ch2.loc["B", "change_hi"]


def test_per_group_interval_combines_seed_spread():
    preds, _, _ = _constructed()
    pg = MethodComparison(preds, n_boot=400, seed=3).per_group("F", metric="accuracy").set_index(["method", "group"])
    # d3m group B: seeds 0.8 and 0.6 -> the pooled interval must cover both seed values' neighbourhoods
    assert pg.loc[("d3m", "B"), "value"] == pytest.approx(0.7)
    assert pg.loc[("d3m", "B"), "seed_sd"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert pg.loc[("d3m", "B"), "lo"] < 0.6 and pg.loc[("d3m", "B"), "hi"] > 0.8
    assert pg.loc[("erm", "A"), "n"] == 10 and pg.loc[("erm", "A"), "n_pos"] == 5


def test_worst_group_picks_minimum():
    preds, _, _ = _constructed()
    w = MethodComparison(preds, n_boot=200).worst_group_table().set_index("method")
    assert w.loc["erm", "worst_group"] == "B" and w.loc["erm", "wga"] == pytest.approx(0.5)
    # d3m: seed 0 min(0.7, 0.8) = 0.7 (A), seed 1 min(0.7, 0.6) = 0.6 (B) -> mean of minima 0.65
    assert w.loc["d3m", "wga"] == pytest.approx(0.65)
    assert (w["lo"] <= w["wga"]).all() and (w["wga"] <= w["hi"]).all()
    assert analysis.best_method(w.reset_index(), "F") == "d3m"


def test_min_group_n_excludes_small_groups():
    preds, _, _ = _constructed()
    extra = preds[preds["group"] == "A"].copy()
    extra = extra[extra["row"] < 3]
    extra["row"] += 1000
    extra["group"] = "C"
    extra["pred"] = 1 - extra["y"]  # group C: 3 images, all wrong
    p = pd.concat([preds, extra], ignore_index=True)
    assert MethodComparison(p, n_boot=50).worst_group_table().set_index("method").loc["erm", "wga"] == 0.0
    w = MethodComparison(p, n_boot=50, min_group_n=5).worst_group_table().set_index("method")
    assert w.loc["erm", "wga"] == pytest.approx(0.5) and w.loc["erm", "excluded_groups"] == "C"


def test_metrics_match_fairlearn_based_group_metrics():
    from d3m_lib import metrics

    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    prob = np.round(rng.random(n), 2)  # ties on purpose
    pred = (prob >= 0.4).astype(int)
    groups = rng.choice(["a", "b", "c"], n)
    ref = metrics.group_metrics(y, prob, pred, groups, n_boot=0).set_index(["group", "metric"])
    df = pd.DataFrame({"finding": "F", "method": "erm", "seed": 0, "split": "test", "row": np.arange(n),
                       "group": groups, "y": y, "logit": 0.0, "prob": prob, "pred": pred})
    mc = MethodComparison(df, n_boot=10)
    for metric in ("accuracy", "fpr", "fnr", "auroc"):
        pg = mc.per_group("F", metric=metric).set_index("group")
        for g in ("a", "b", "c"):
            assert pg.loc[g, "value"] == pytest.approx(ref.loc[(g, metric), "value"])
        assert pg.loc[OVERALL, "value"] == pytest.approx(ref.loc[(metrics.ALL, metric), "value"])


def test_weighted_metric_equals_explicit_resample():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 40)
    prob = np.round(rng.random(40), 1)
    pred = prob >= 0.5
    idx = rng.integers(0, 40, 40)
    w = np.bincount(idx, minlength=40)[None, :]
    from sklearn.metrics import roc_auc_score
    assert weighted_metric("auroc", y, pred, prob, w)[0] == pytest.approx(roc_auc_score(y[idx], prob[idx]))
    assert weighted_metric("accuracy", y, pred, prob, w)[0] == pytest.approx((pred[idx] == y[idx]).mean())
    neg = y[idx] == 0
    assert weighted_metric("fpr", y, pred, prob, w)[0] == pytest.approx(pred[idx][neg].mean())


def test_bad_input_is_named():
    preds, _, _ = _constructed()
    with pytest.raises(ValueError, match="lacks column"):
        MethodComparison(preds.drop(columns="pred"))
    with pytest.raises(ValueError, match="duplicated"):
        MethodComparison(pd.concat([preds, preds.iloc[:1]]))
    short = preds[~((preds["method"] == "d3m") & (preds["seed"] == 1) & (preds["row"] == 0))]
    with pytest.raises(ValueError, match="other images"):
        MethodComparison(short).per_group("F")
    with pytest.raises(KeyError, match="No Finding"):
        MethodComparison(preds).underdiagnosis()


def test_forest_and_underdiagnosis_on_fake_run(fake_run):
    mc = MethodComparison(fake_run["predictions"], fake_run["selections"], fake_run["cohort"], n_boot=100)
    fd = mc.forest_data("Cardiomegaly")
    assert set(fd["method"]) == set(FAKE_METHODS) - {"erm"}
    assert ((fd["change_lo"] <= fd["change"] + 1e-12) & (fd["change"] <= fd["change_hi"] + 1e-12)).all()
    ud = mc.underdiagnosis()
    assert set(ud["metric"]) == {"fpr"}
    defined = ud["note"] == ""
    assert ud.loc[defined, "value"].between(0, 1).all() and ud.loc[~defined, "value"].isna().all()
    assert (ud.loc[~defined, "n_pos"] == ud.loc[~defined, "n"]).all()
    st = mc.source_table("No Finding", "random")
    assert (st["change_n"] <= 0).all()
    w = mc.worst_group_table()
    assert len(w) == len(FAKE_FINDINGS) * len(FAKE_METHODS)


def test_removed_summary_counts_and_precision_recall():
    preds, sel, cohort = _constructed()
    gt = pd.DataFrame({"dicom_id": ["img000000", "img000001", "img000010", "img000029", "img000005"],
                       "finding": ["F", "F", "F", "F", "G"],
                       "kind": ["label_flip", "label_flip", "shortcut", "shortcut", "label_flip"]})
    rs = removed_summary(sel, cohort, gt)
    bg = rs.by_group.set_index("group")
    assert bg.loc["A", "removed"] == 3 and bg.loc["B", "removed"] == 4
    assert bg.loc["A", "removed_rate"] == pytest.approx(0.3)
    assert bg["share_of_removed"].sum() == pytest.approx(1.0)
    assert rs.by_finding["removed"].iloc[0] == 7
    # labels alternate 1, 0 from row 100: seed 0 removes rows 100,101 (A) + 110..114 (B): 1,0,1,0,1,0,1
    bl = rs.by_label.set_index("label")
    assert bl.loc["positive", "removed"] == pytest.approx((4 + 4) / 2)
    pl = rs.planted.set_index("kind")
    # label_flip planted in F: img000000, img000001 (rows 100, 101): removed in both seeds
    assert pl.loc["label_flip", "n_planted"] == 2 and pl.loc["label_flip", "recall"] == 1.0
    assert pl.loc["label_flip", "precision"] == pytest.approx(np.mean([2 / 7, 2 / 7]))
    # shortcut: img000010 (row 110, removed both seeds), img000029 (row 129, never removed)
    assert pl.loc["shortcut", "recall"] == pytest.approx(0.5)
    assert pl.loc["shortcut", "base_rate"] == pytest.approx(2 / 30)


def test_removed_summary_when_a_scenario_plants_nothing():
    """The `null` scenario's ground truth is empty: every kind gets a row with 0 planted images."""
    preds, sel, cohort = _constructed()
    empty = pd.DataFrame({"dicom_id": [], "finding": [], "kind": []})
    pl = removed_summary(sel, cohort, empty).planted
    assert set(pl["kind"]) == {"label_flip", "shortcut"}
    assert (pl["n_planted"] == 0).all() and (pl["base_rate"] == 0).all()
    assert (pl["precision"] == 0).all() and pl["recall"].isna().all()
    flips_only = pd.DataFrame({"dicom_id": ["img000000"], "finding": ["F"], "kind": ["label_flip"]})
    pl = removed_summary(sel, cohort, flips_only).planted.set_index("kind")
    assert pl.loc["shortcut", "n_planted"] == 0 and pl.loc["label_flip", "n_planted"] == 1


def test_patients_from_the_cohort_and_paired_table(fake_run):
    preds, cohort = fake_run["predictions"], fake_run["cohort"]
    mc = MethodComparison(preds, cohort=cohort[["row", "group", "split", "subject_id"]], n_boot=100)
    assert mc.cluster_unit == "patient"
    with pytest.warns(UserWarning, match="not patients"):
        assert MethodComparison(preds, cohort=cohort[["row", "group", "split"]], n_boot=10).cluster_unit == "image"
    pt = mc.paired_table(pairs=[("d3m", "random"), ("erm", "erm"), ("oracle", "erm")])
    assert list(pt["a"]) == ["d3m", "erm"] * 2  # oracle was not run: its pair is left out
    same = pt[pt["a"] == pt["b"]]
    assert (same[["diff", "lo", "hi"]].to_numpy() == 0).all() and not same["excludes_zero"].any()
    w = mc.worst_group_table().set_index(["finding", "method"])
    d = pt[pt["a"] == "d3m"].set_index("finding")
    for f in d.index:  # the paired point equals the difference of the two worst-group points
        assert d.loc[f, "diff"] == pytest.approx(w.loc[(f, "d3m"), "wga"] - w.loc[(f, "random"), "wga"])
    ch = mc.change(FAKE_FINDINGS[0], "d3m", "erm")
    assert ((ch["change_lo"] >= -1) & (ch["change_hi"] <= 1)).all()


def test_best_method_ties_follow_the_registry_order():
    wga = pd.DataFrame({"finding": "F", "method": ["random", "d3m", "erm"], "wga": [0.7, 0.7, 0.6]})
    assert analysis.best_method(wga, "F") == "d3m"
    wide = analysis.wga_wide(wga.assign(lo=0.5, hi=0.8))
    assert list(wide.columns) == ["arm", "F"] and list(wide["arm"]) == ["ERM", "D3M", "random"]
    assert wide["F"].iloc[0] == "0.600 [0.500, 0.800]"


def test_removed_vs_kept_means_known_answer_in_chunks():
    """Chunked sums give the same means and region as the whole stack: each image is its row number."""
    n = 7
    images = np.stack([np.full((4, 4), float(r)) for r in range(n)])
    images[:, 0, 0] += np.arange(n) * 10.0       # one pixel where removed and kept differ most
    cohort = pd.DataFrame({"row": np.arange(n), "Edema": [1.0, 0.0, 1.0, 0.0, 1.0, None, 0.0]})
    sel = pd.DataFrame({"finding": "Edema", "method": "d3m", "seed": 0, "row": np.arange(n),
                        "kept": [False, False, True, True, True, True, True]})
    whole = analysis.removed_vs_kept_means(images, sel, cohort, "Edema", top_fraction=1 / 16)
    parts = analysis.removed_vs_kept_means(images, sel, cohort, "Edema", top_fraction=1 / 16, chunk=2)
    # removed rows 0, 1 (mean 0.5), kept rows 2..6 (mean 4): difference -3.5, pixel (0, 0) -38.5
    assert whole["difference"][1, 1] == pytest.approx(-3.5)
    assert whole["difference"][0, 0] == pytest.approx(-38.5)
    assert whole["region"].sum() == 1 and whole["region"][0, 0]
    for k, v in whole["means"].items():
        np.testing.assert_allclose(parts["means"][k], v)
    assert whole["means"]["removed, positive"][1, 1] == 0.0
    assert whole["means"]["kept, positive"][1, 1] == pytest.approx(3.0)    # rows 2, 4
    pd.testing.assert_frame_equal(whole["region_table"], parts["region_table"])
