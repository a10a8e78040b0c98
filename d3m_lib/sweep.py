"""Does the testbed test D3M? The same study design on every synthetic scenario, and one table of answers.

``python -m d3m_lib sweep PARAMS.yaml [--scenarios planted,null,...] [--run-root runs/sweep]`` runs the
study of ``PARAMS.yaml`` once per scenario of :data:`d3m_lib.synthetic.SCENARIOS`
(``synthetic_scenario``), each in its own run folder ``<run-root>/<scenario>`` (resumable like any
run), then :func:`summarize` reads every run's own artifacts into one row per scenario:

* the oracle's gain over ERM, D3M − random (the primary contrast) and D3M − ERM, each with the
  interval of its mean over seeds (``06_per_race/paired.csv``);
* the primary contrast's verdict and the run's minimum detectable effect;
* D3M's precision for each planted mechanism against its base rate (``07_error_analysis/
  planted_recovery.csv``);
* whether any arm was claimed better than ERM (primary contrast by its interval, secondary ones by
  Holm), so that a claim under ``null`` is visible;
* under ``null``, the claim rate of the primary contrast over disjoint sub-studies of the run's seeds
  (:func:`claim_rate`): a design whose intervals hold their level claims in about 5% of them.

The table is written as CSV and JSON (with machine, date and commit) for the book's appendix.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import conclusions, synthetic
from . import methods as _methods
from .constants import PLANTED_KINDS

MECHANISMS = PLANTED_KINDS


def _row(paired: pd.DataFrame, finding: str, a: str, b: str) -> dict:
    r = paired[(paired["finding"] == finding) & (paired["a"] == a) & (paired["b"] == b)]
    if r.empty:
        return dict(diff=np.nan, lo=np.nan, hi=np.nan)
    return r.iloc[0][["diff", "lo", "hi"]].astype(float).to_dict()


def _text(d: dict) -> str:
    return conclusions.interval_text(d["diff"], d["lo"], d["hi"], signed=True)


def _claimed_vs_erm(paired: pd.DataFrame, alpha: float) -> list[str]:
    """Arms claimed better than ERM by the run's rule (primary: interval; secondary: Holm)."""
    out = []
    for r in paired[paired["b"] == "erm"].itertuples():
        ok = r.lo > 0 and (r.role == "primary" or (np.isfinite(r.p_holm) and r.p_holm < alpha))
        if ok:
            out.append(f"{_methods.label(r.a)} ({r.finding})")
    return out


def claim_rate(run_dir, seeds_per_study: int = 3, max_studies: int = 500) -> dict:
    """Share of sub-studies of ``seeds_per_study`` seeds whose primary contrast is claimed.

    The sub-studies are every combination of the run's seeds of that size (at most ``max_studies``,
    taken in order); each is analysed as its own study (the run's bootstrap settings, two-level interval
    of the mean over its seeds). A claim is an interval that excludes 0, in either direction. The
    sub-studies share seeds, so they are not independent: ``disjoint`` also counts the claims of the
    disjoint ones (seeds cut in order).
    """
    from itertools import combinations

    from .analysis import MethodComparison
    from .rundir import RunDir

    rd = RunDir(run_dir)
    cfg = rd.config()
    pred = pd.read_parquet(rd.require("05_d3m") / "predictions.parquet")
    cohort = rd.cohort(columns=["row", "group", "split", "subject_id"])
    seeds = sorted(int(s) for s in pred["seed"].unique())
    a, b = cfg.primary_contrast
    subs = list(combinations(seeds, seeds_per_study))[:max_studies]
    disjoint = {tuple(seeds[i:i + seeds_per_study]) for i in range(0, len(seeds) - seeds_per_study + 1,
                                                                    seeds_per_study)}
    claims = {}
    for sub in subs:
        mc = MethodComparison(pred[pred["seed"].isin(sub)], None, cohort, n_boot=cfg.n_boot,
                              ci_level=cfg.ci_level, seed=cfg.stats_seed, min_group_n=cfg.min_group_n)
        d = mc.engine(mc.findings[0], "test").paired_worst_ci(a, b)
        claims[sub] = bool(d["lo"] > 0 or d["hi"] < 0)
    n = len(claims)
    return dict(studies=n, seeds_per_study=seeds_per_study, claimed=int(sum(claims.values())),
                rate=(sum(claims.values()) / n) if n else float("nan"),
                disjoint_studies=len(disjoint), disjoint_claimed=int(sum(claims[d] for d in disjoint if d in claims)))


def summarize(run_dirs: dict[str, Path]) -> pd.DataFrame:
    """One row per scenario from each run's own artifacts (module docstring)."""
    from .rundir import RunDir

    rows = []
    for scenario, path in run_dirs.items():
        rd = RunDir(path)
        cfg = rd.config()
        paired = pd.read_csv(rd.require("06_per_race") / "paired.csv")
        summary = (rd.manifest("06_per_race") or {}).get("summary", {})
        prim = summary.get("primary", {})
        f = prim.get("finding") or str(paired["finding"].iloc[0])
        a, b = cfg.primary_contrast
        rec = dict(scenario=scenario, finding=f, seeds=len(cfg.seeds))
        for x, y in (("oracle", "erm"), (a, b), ("d3m", "erm")):
            name = f"{_methods.label(x)} − {_methods.label(y)}"
            d = _row(paired, f, x, y)
            rec[name] = _text(d)
            rec[f"{name} lo"], rec[f"{name} hi"] = d["lo"], d["hi"]
        rec["verdict"] = summary.get("verdict", "")
        rec["mde"] = prim.get("mde")
        pr = rd.stage_dir("07_error_analysis") / "planted_recovery.csv"
        planted = pd.read_csv(pr) if pr.is_file() else pd.DataFrame(columns=["finding", "method", "kind"])
        for kind in MECHANISMS:
            r = planted[(planted["finding"] == f) & (planted["method"] == "d3m") & (planted["kind"] == kind)]
            rec[f"D3M precision: {kind.replace('_', ' ')}"] = (
                "not planted" if len(r) and not r["base_rate"].iloc[0] > 0 else
                f"{r['precision'].iloc[0]:.3f} (base {r['base_rate'].iloc[0]:.3f})"
                if len(r) and math.isfinite(r["precision"].iloc[0]) else "–")
        claimed = _claimed_vs_erm(paired, 1 - cfg.ci_level)
        rec["claimed better than ERM"] = ", ".join(claimed) or "none"
        rows.append(rec)
    return pd.DataFrame(rows)


def _finished_seconds(run_dir: Path) -> float:
    """Seconds a finished run's notebooks took (its run.json); refuses a run that has not finished."""
    rec = run_dir / "run.json"
    if not rec.is_file():
        raise FileNotFoundError(f"{run_dir}: no run.json; run the sweep without --no-run first")
    r = json.loads(rec.read_text())
    if r.get("status") != "complete":
        raise ValueError(f"{run_dir}: its run has status {r.get('status')!r}, not complete")
    return round(sum(float(n.get("seconds") or 0) for n in r.get("notebooks", [])), 1)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The whole table: the interval columns as text, the numeric bounds left out."""
    return table[[c for c in table.columns if not c.endswith((" lo", " hi"))]]


def book_tables(record: dict) -> dict[str, pd.DataFrame]:
    """The appendix's tables from a sweep's JSON record, narrow enough for the book's column:
    ``effects`` (the three contrasts, the verdict and MDE), ``mechanisms`` (D3M's precision per planted
    mechanism, the claims against ERM, the wall time) and ``null`` (the null scenario's claim rate)."""
    t = pd.DataFrame(record["table"])
    contrast = [c for c in t.columns if " − " in c and not c.endswith((" lo", " hi"))]
    effects = t[["scenario", *contrast, "verdict"]].assign(
        MDE=[f"{m:.3f}" if m is not None and math.isfinite(m) else "–" for m in t["mde"]],
        seeds=t["seeds"])
    mech = [c for c in t.columns if c.startswith("D3M precision")]
    mechanisms = t[["scenario", *mech, "claimed better than ERM"]].assign(
        minutes=[f"{x / 60:.1f}" for x in t["seconds"]])
    out = {"effects": effects, "mechanisms": mechanisms}
    c = record.get("null_claim_rate")
    if c:
        out["null"] = pd.DataFrame([{"null run": c["run"], "seeds per sub-study": c["seeds_per_study"],
                                     "sub-studies": c["studies"], "claimed": c["claimed"],
                                     "claim rate": f"{c['rate']:.1%}",
                                     "disjoint sub-studies claimed": f"{c['disjoint_claimed']} of "
                                                                     f"{c['disjoint_studies']}"}])
    return out


def write_tables(record: dict, folder) -> list[Path]:
    """Write :func:`book_tables` as ``scenario_<name>.csv`` in ``folder`` (the appendix reads them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, t in book_tables(record).items():
        paths.append(folder / f"scenario_{name}.csv")
        t.to_csv(paths[-1], index=False)
    return paths


def run_sweep(params_file, scenarios, run_root, overrides=None, progress: bool = False,
              null_seeds: int = 0, execute: bool = True) -> dict:
    """Run the study of ``params_file`` on each scenario and summarize; returns the record written.

    The null scenario's claim rate is taken over sub-studies with the design's number of seeds: of the
    null run itself, or (``null_seeds`` > 0) of a second null run with seeds ``0 .. null_seeds − 1`` in
    ``<run_root>/null-claims``, so that a small design still gets many sub-studies. ``execute=False``
    runs nothing: it tabulates the run folders already under ``run_root`` (each must have finished).
    """
    from .rundir import code_version
    from .runner import resolve_config, run

    run_root = Path(run_root)
    unknown = [s for s in scenarios if s not in synthetic.SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {', '.join(synthetic.SCENARIOS)}")
    per_study = len(resolve_config(params_file, {**(overrides or {}), "synthetic_scenario": "null"},
                                   Path.cwd())[0].seeds)
    if null_seeds and null_seeds < 2 * per_study:
        raise ValueError(f"null_seeds = {null_seeds}: give at least twice the design's {per_study} seeds, or 0")
    dirs, seconds = {}, {}

    def one(name, over):
        if not execute:
            seconds[name] = _finished_seconds(run_root / name)
            return run_root / name
        t0 = time.time()
        out = run(params_file, run_dir=run_root / name, overrides={**(overrides or {}), **over}, progress=progress)
        seconds[name] = round(time.time() - t0, 1)
        return out

    for s in scenarios:
        dirs[s] = one(s, {"synthetic_scenario": s})
    table = summarize(dirs)
    table["seconds"] = table["scenario"].map(seconds)
    record = {"params": str(params_file), "overrides": dict(overrides or {}), "scenarios": list(scenarios),
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                         f"{__import__('os').cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d"), "code_version": code_version(),
              "runs_commit": {name: (json.loads((Path(d) / "run.json").read_text()).get("code_version") or {})
                              .get("commit") for name, d in dirs.items()},
              "table": json.loads(table.to_json(orient="records"))}
    if "null" in dirs:
        source = dirs["null"]
        if null_seeds:
            source = one("null-claims", {"synthetic_scenario": "null", "seeds": list(range(null_seeds))})
        record["null_claim_rate"] = {**claim_rate(source, per_study), "run": Path(source).name}
    record["seconds"] = seconds
    run_root.mkdir(parents=True, exist_ok=True)
    display_table(table).to_csv(run_root / "scenario_sweep.csv", index=False)
    (run_root / "scenario_sweep.json").write_text(json.dumps(record, indent=1))
    write_tables(record, run_root)
    return record
