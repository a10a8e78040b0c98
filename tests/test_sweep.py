"""The scenario sweep's table and claim rate, and the power command, on the smoke run's artifacts."""

from __future__ import annotations

import pandas as pd
import pytest

from d3m_lib import sweep
from d3m_lib.__main__ import main


@pytest.mark.smoke
def test_summary_reads_each_runs_artifacts(smoke_run):
    run_dir, _ = smoke_run
    t = sweep.summarize({"planted": run_dir})
    assert list(t["scenario"]) == ["planted"] and t["finding"].iloc[0] == "Cardiomegaly"
    paired = pd.read_csv(run_dir / "06_per_race" / "paired.csv")
    r = paired[(paired["a"] == "d3m") & (paired["b"] == "random")].iloc[0]
    assert t["D3M − random lo"].iloc[0] == pytest.approx(r["lo"])
    assert t["verdict"].iloc[0] in ("supported", "contradicted", "smaller than delta", "inconclusive")
    assert "D3M precision: label flip" in t.columns
    assert not any(c.endswith(" lo") for c in sweep.display_table(t).columns)
    c = sweep.claim_rate(run_dir, seeds_per_study=1)
    assert c["studies"] == 1 and c["claimed"] in (0, 1)


@pytest.mark.smoke
def test_power_command(smoke_run, capsys):
    run_dir, _ = smoke_run
    assert main(["power", str(run_dir)]) == 0
    assert "needs at least two seeds" in capsys.readouterr().out   # the smoke run has one seed
    assert main(["power", str(run_dir), "--effect", "2"]) == 1
    assert "--effect 2.0" in capsys.readouterr().err


def test_sweep_refuses_unknown_scenarios(tmp_path):
    with pytest.raises(ValueError, match="unknown scenario"):
        sweep.run_sweep("params/smoke.yaml", ["nul"], tmp_path)


@pytest.mark.smoke
def test_sweep_tabulates_finished_runs_without_running_them(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    (tmp_path / "planted").symlink_to(run_dir, target_is_directory=True)
    rec = sweep.run_sweep("params/smoke.yaml", ["planted"], tmp_path, execute=False)
    assert [r["scenario"] for r in rec["table"]] == ["planted"] and rec["table"][0]["seconds"] > 0
    assert (tmp_path / "scenario_sweep.csv").is_file() and (tmp_path / "scenario_sweep.json").is_file()
    with pytest.raises(FileNotFoundError, match="no run.json"):
        sweep.run_sweep("params/smoke.yaml", ["null"], tmp_path, execute=False)
    with pytest.raises(ValueError, match="at least twice"):
        sweep.run_sweep("params/smoke.yaml", ["null"], tmp_path, null_seeds=1, execute=False)


def test_the_appendix_tables_are_the_committed_sweep_record():
    """book/sweep holds the sweep the appendix reports: its CSV tables are exactly what the JSON record gives,
    every scenario is in it, and the null scenario's claim rate is there."""
    import json
    from pathlib import Path

    from d3m_lib import synthetic

    data = Path(__file__).resolve().parents[1] / "book" / "sweep"
    record = json.loads((data / "scenario_sweep.json").read_text())
    assert [r["scenario"] for r in record["table"]] == list(synthetic.SCENARIOS)
    assert record["null_claim_rate"]["studies"] >= 20
    for name, t in sweep.book_tables(record).items():
        pd.testing.assert_frame_equal(pd.read_csv(data / f"scenario_{name}.csv", dtype=str, keep_default_na=False),
                                      t.astype(str), check_dtype=False)
    page = (data.parent / "testbed.md").read_text()
    for name in ("effects", "mechanisms", "null"):
        assert f"sweep/scenario_{name}.csv" in page
