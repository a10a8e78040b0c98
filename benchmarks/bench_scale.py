"""Cohort building at MIMIC scale: time and peak memory per stage against n.

For each ``--patients`` value, synthetic MIMIC-CXR-JPG + MIMIC-IV tables in MIMIC's layout
(``d3m_lib.synthetic``; no image files: ``check_images=False``) go through the stages:
draw the tables, write the CSVs, the per-patient race rule alone
(``race.patient_race`` on all admissions), and ``cohort.build_mimic_cohort``. MIMIC itself
has about 377,000 images, 65,000 patients and 450,000 admissions. Peak memory is the
largest resident set size sampled every 20 ms during the stage, minus the size before it.

    PYTHONPATH=. python benchmarks/bench_scale.py --patients 6500 65000 --out benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Stage:
    """Wall time and peak resident memory (above the start) of a block."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __enter__(self):
        self.start_rss, self.peak = _rss(), _rss()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak_mib = max(self.peak, _rss()) - self.start_rss
        self.peak_mib /= 2 ** 20


def run(n_patients: int, work: Path) -> list[dict]:
    from d3m_lib import cohort, race, synthetic

    rows = []
    cxr, hosp = work / synthetic.CXR_DIR, work / synthetic.IV_DIR / "hosp"
    cxr.mkdir(parents=True)
    hosp.mkdir(parents=True)
    bar = tqdm(total=4, desc=f"{n_patients:,} patients", leave=False)
    with Stage() as s:
        t = synthetic._cohort_tables(synthetic._normalise({"n_patients": n_patients}))
    counts = {"images": len(t["metadata"]), "patients": n_patients, "admissions": len(t["admissions"])}
    rows.append({"stage": "draw tables", "seconds": s.seconds, "peak_mib": s.peak_mib})
    bar.update()
    with Stage() as s:
        for name, path in (("metadata", cxr / "mimic-cxr-2.0.0-metadata.csv.gz"),
                           ("chexpert", cxr / "mimic-cxr-2.0.0-chexpert.csv.gz"),
                           ("split", cxr / "mimic-cxr-2.0.0-split.csv.gz"),
                           ("admissions", hosp / "admissions.csv.gz"),
                           ("patients", hosp / "patients.csv.gz")):
            synthetic._write_csv(t[name], path)
    rows.append({"stage": "write CSVs", "seconds": s.seconds, "peak_mib": s.peak_mib})
    bar.update()
    adm = t["admissions"]
    del t
    with Stage() as s:
        race.patient_race(adm)
    rows.append({"stage": "race rule", "seconds": s.seconds, "peak_mib": s.peak_mib})
    bar.update()
    with Stage() as s:
        res = cohort.build_mimic_cohort(cxr, work / synthetic.IV_DIR, check_images=False)
    rows.append({"stage": "build_mimic_cohort", "seconds": s.seconds, "peak_mib": s.peak_mib,
                 "cohort_images": int(len(res.table))})
    bar.update()
    bar.close()
    return [{**r, **counts} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, nargs="+", default=[6500, 65000])
    ap.add_argument("--out", default="benchmarks/results/scale.json")
    args = ap.parse_args()
    out = []
    for n in args.patients:
        with tempfile.TemporaryDirectory() as tmp:
            out += run(n, Path(tmp))
    df = pd.DataFrame(out)
    print(df.round(2).to_string(index=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.platform(), "rows": out}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
