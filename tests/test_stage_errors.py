"""Stage 07 (stages.errors.run) on the fake run of test_analysis, with a second seed's TRAK state."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from test_analysis import FAKE_FINDINGS, build_fake_run

from d3m_lib import attribution, plots
from d3m_lib.privacy import Policy
from d3m_lib.rundir import open_stage
from d3m_lib.stages import errors


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    # a second seed, another random model (written with stage 04, whose files are hashed when it finishes)
    d = build_fake_run(tmp_path_factory.mktemp("err"), with_trak=True, trak_seeds=(0, 1))
    stage = open_stage("07_error_analysis", d["run_dir"])
    before = _digest(stage.run.stage_dir("04_trak"))
    res = errors.run(stage)
    return stage, res, before, d


def test_reads_trak_without_writing_it(result):
    stage, _, before, _ = result
    assert _digest(stage.run.stage_dir("04_trak")) == before


def test_worst_group_errors_with_the_seeds_own_scores(result):
    stage, res, _, _ = result
    cfg = stage.cfg
    for f in FAKE_FINDINGS:
        e = res.errors[f]
        assert e.seed == 0   # the first seed with a TRAK state
        assert len(e.targets) == cfg.n_targets and (e.targets["group"] == e.worst_group).all()
        assert (e.targets["pred"] != e.targets["y"]).all()
        inf = e.influential
        assert len(inf) == 2 * cfg.n_top * len(e.targets)
        pos = inf[(inf["target"] == 0) & (inf["direction"] == "positive")]["score"].to_numpy()
        neg = inf[(inf["target"] == 0) & (inf["direction"] == "negative")]["score"].to_numpy()
        assert (np.diff(pos) <= 0).all() and (np.diff(neg) >= 0).all() and pos[0] >= neg[0]
        sc = attribution.load_scorer(errors.trak_dir(stage.run, f, 0))
        s = np.asarray(sc.scores(e.targets["row"].to_numpy()[:1]))[:, 0]
        assert pos[0] == pytest.approx(s.max()) and neg[0] == pytest.approx(s.min())
        shares = e.composition.groupby("direction")["share"].sum()
        assert np.allclose(shares, 1.0)
        assert f"the worst race group of ERM is {e.worst_group}" in e.sentence


def test_scorer_for_loads_that_seeds_state(result):
    stage, res, _, _ = result
    open_scorer = errors.scorer_for(stage.run)
    rows = res.errors[FAKE_FINDINGS[0]].targets["row"].to_numpy()[:1]
    s0 = np.asarray(open_scorer(FAKE_FINDINGS[0], 0).scores(rows))
    s1 = np.asarray(open_scorer(FAKE_FINDINGS[0], 1).scores(rows))
    assert s0.shape == s1.shape and not np.allclose(s0, s1)   # two seeds, two models, two sets of scores
    with pytest.raises(FileNotFoundError):
        open_scorer(FAKE_FINDINGS[1], 1)


def test_removed_and_planted(result):
    stage, res, _, d = result
    assert res.planted is not None and {"label_flip", "shortcut"} <= set(res.planted["kind"])
    assert ((res.planted["precision_min"] <= res.planted["precision"] + 1e-12)
            & (res.planted["precision"] <= res.planted["precision_max"] + 1e-12)).all()
    assert res.quotes["ea_planted_summary"].startswith("D3M's removals")
    assert "auto" not in res.quotes["ea_planted_summary"].lower()   # the page quotes D3M and its random control
    assert res.numbers["ea_d3m_removed"] > 0 and 0 < res.numbers["ea_most_removed_rate"] <= 1
    assert set(k[1] for k in res.means) == {"d3m", "auto_d3m"}
    for name in ("targets", "influential", "composition", "removed_by_group", "planted_recovery"):
        assert stage.path(f"{name}.csv").is_file(), name
    assert "image_id" not in stage.path("targets.csv").read_text().splitlines()[0]
    view = errors.planted_view(res)
    assert list(view["arm"])[:2] == ["D3M", "D3M"]


def test_grids_and_the_explorer(result):
    stage, res, _, _ = result
    e = res.errors[FAKE_FINDINGS[0]]
    figs = plots.influence_grids(e.influential, e.targets, res.images, Policy(False))
    assert len(figs) == 2 * len(e.targets)
    hidden = plots.influence_grids(e.influential, e.targets, res.images, Policy(True))
    assert len(hidden) == 1
    for fig in figs + hidden:
        plots.plt.close(fig)
    still = errors.explorer_panel(stage, res)   # no widget frontend under pytest: the still figure
    assert errors.explorer_note(still)
    plots.plt.close(still)


def test_ground_truth_found_from_summary_data(result):
    stage, _, _, _ = result
    m = stage.run.manifest("01_cohort")
    m["summary"].pop("synthetic", None)   # what stage 01 records: the facts live under summary.data
    stage.run._write_manifest("01_cohort", m)
    gt = errors.ground_truth(stage.run)
    assert gt is not None and {"label_flip", "shortcut"} <= set(gt["kind"])


def test_planted_harm_auroc_of_the_scores_stage_05_used(result):
    stage, res, _, d = result
    t = res.score_harm
    assert t is not None and set(t["score"]) >= {errors.SCORES["score"], errors.SCORES["tau_mean"]}
    assert "all" in set(t["kind"]) and ((t["lo"] <= t["value"]) & (t["value"] <= t["hi"])).all()
    assert stage.path("score_harm_auroc.csv").is_file()
    v = errors.score_harm_view(t)
    assert len(v) == len(t) and v["AUROC [CI]"].str.contains(r"\[").all()
    assert "note" in errors.score_harm_view(None).columns
