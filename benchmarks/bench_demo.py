"""The demo end to end: wall time per notebook and for the book, against the 10-minute budget.

Runs ``python -m d3m_lib run <params> --book`` into a new run folder (never an existing
one: the timing must include every stage) and reads each notebook's time from the run
record (``run.json``: ``notebooks[].seconds``). Peak memory is the largest resident set
size of the runner and its kernels (``getrusage`` of the children). ``--from-run`` only
reads a finished run's record instead (the book's time is then unknown).

    PYTHONPATH=. python benchmarks/bench_demo.py --out benchmarks/results/demo.json
    PYTHONPATH=. python benchmarks/bench_demo.py --from-run runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 600.0


def notebook_seconds(run_dir: Path) -> list[dict]:
    """``[{notebook, seconds, status}]`` from a run's ``run.json``."""
    record = Path(run_dir) / "run.json"
    if not record.is_file():
        raise FileNotFoundError(f"{record}: no run record (is {run_dir} a run folder?)")
    rows = json.loads(record.read_text()).get("notebooks") or []
    return [{"notebook": r["notebook"], "seconds": r.get("seconds"), "status": r.get("status")} for r in rows]


def run_demo(params: str, run_dir: Path) -> tuple[float, int]:
    """Wall seconds of the whole run (book included) and peak RSS (bytes) of its processes."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "d3m_lib", "run", params, "--run-dir", str(run_dir), "--book"])
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the run failed (exit {proc.returncode}); see its output above")
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--from-run", type=Path, help="read this finished run's record instead of running")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    wall = peak = None
    if a.from_run is not None:
        run_dir = a.from_run
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="bench-demo-")) / "run"
        wall, peak = run_demo(a.params, run_dir)
    rows = notebook_seconds(run_dir)
    nb_total = sum(r["seconds"] or 0.0 for r in rows)
    print(f"{'notebook':<22}{'seconds':>9}  status")
    for r in rows:
        print(f"{r['notebook']:<22}{(r['seconds'] or float('nan')):>9.1f}  {r['status']}")
    print(f"{'notebooks, total':<22}{nb_total:>9.1f}")
    if wall is not None:
        print(f"{'book and checks':<22}{wall - nb_total:>9.1f}")
        print(f"{'wall, end to end':<22}{wall:>9.1f}  ({wall / BUDGET_S:.0%} of the {BUDGET_S / 60:.0f}-minute budget)")
        print(f"peak resident memory of the run's processes: {peak / 2 ** 30:.2f} GiB")
    out = {"params": a.params, "run_dir": str(run_dir), "notebooks": rows, "notebooks_seconds": nb_total,
           "wall_seconds": wall, "budget_seconds": BUDGET_S, "peak_rss_bytes": peak,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "date": time.strftime("%Y-%m-%d")}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=2))
        print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
