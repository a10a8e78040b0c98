"""benchmarks/bench_gpu.py runs end to end on the CPU at --tiny sizes (the CI form of the GPU script).

One subprocess (about a minute on 2 cores): (a) ResNet-50 training steps from memory and from a
memmap, (c) the synthetic slice through stages 01 and 03-06, (b) both featurizers on the slice's
anchor checkpoints. No timing is asserted; the JSON's shape and the table are.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_bench_gpu_tiny_runs_on_the_cpu_and_writes_json_and_table(tmp_path):
    out = tmp_path / "gpu_cpu_tiny.json"
    env = {**os.environ, "D3M_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--device", "cpu", "--tiny",
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    m = res["machine"]
    assert m["device"] == "cpu" and m["card"] is None and m["torch"] and m["date_utc"]
    assert res["sizes"] == "tiny"

    rows = res["training"]["rows"]
    assert {(r["batch"], r["source"]) for r in rows} == {(8, "in_memory"), (8, "memmap"),
                                                          (16, "in_memory"), (16, "memmap")}
    assert all(r["arch"] == "resnet50" and r["precision"] == "fp32" and r["img_per_s"] > 0 for r in rows)

    sl = res["slice"]
    assert "error" not in sl, sl.get("error")
    assert {"generate", "01_cohort", "03_baseline", "04_trak", "05_d3m", "06_per_race"} <= set(sl["stages"])
    for name in ("01_cohort", "03_baseline", "04_trak", "05_d3m", "06_per_race"):
        st = sl["stages"][name]
        assert st["seconds"] > 0 and st["host_peak_mib"] > 0 and st["gpu_peak_mib"] is None
        assert st["extrapolated_s"] >= st["seconds"]
    ex = sl["extrapolation"]
    assert ex["LINEAR_EXTRAPOLATION"] and ex["to_train"] == 240_000 and ex["to_validate"] == 20_000
    assert sl["n_train"] > 0 and sl["retrainings_05"] >= 1

    feat = res["featurize"]
    assert "error" not in feat, feat.get("error")
    assert feat["traker_projector"] == "BasicProjector"   # no fast_jl on the CPU
    assert feat["paths"]["factorized"]["img_per_s"] > 0 and feat["paths"]["traker"]["img_per_s"] > 0
    assert math.isfinite(feat["A_spearman"]) and len(feat["checkpoints"]) == 3

    text = out.with_suffix(".txt").read_text()
    assert "LINEAR EXTRAPOLATION" in text and "(a) training step" in text and "(b) featurizing" in text
    assert "FAILED" not in text
