"""benchmarks/bench_demo.py reads per-notebook times from a run record (no timing asserted)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_demo  # noqa: E402


def test_reads_the_run_record_and_writes_json(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"notebooks": [
        {"notebook": "01_cohort", "seconds": 10.5, "status": "complete"},
        {"notebook": "02_discrepancy_scan", "seconds": 2.0, "status": "complete"}]}))
    out = bench_demo.main(["--from-run", str(run), "--out", str(tmp_path / "b.json")])
    assert out["notebooks_seconds"] == pytest.approx(12.5) and out["wall_seconds"] is None
    assert json.loads((tmp_path / "b.json").read_text())["notebooks"][0]["notebook"] == "01_cohort"
    assert "02_discrepancy_scan" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no run record"):
        bench_demo.notebook_seconds(tmp_path)
