"""Command line: ``python -m d3m_lib run | book | params | status | power | sweep | demo-data``."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

import pandas as pd

from . import config, synthetic
from .config import ConfigError
from .rundir import RunBusyError, RunDir, StaleArtifactError
from .runner import RunnerError, build_book, parse_overrides, run, run_status, stage_problems, study_notebooks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m d3m_lib",
                                description="Run the D3M chest X-ray study and build its book.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="execute notebooks/NN_*.ipynb with papermill",
                       description="Execute the numbered notebooks in order into "
                                   "<run_dir>/executed/, recording <run_dir>/run.json.")
    r.add_argument("params", help="YAML file of parameters (params/*.yaml)")
    r.add_argument("--run-dir", help="run folder (default: runs/<name of the YAML file>)")
    r.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override one parameter; the value is read as YAML, e.g. -p seeds=[0,1]")
    r.add_argument("--from", dest="first", type=int, metavar="NN",
                   help="first notebook number to run")
    r.add_argument("--to", dest="last", type=int, metavar="NN", help="last notebook number to run")
    r.add_argument("--notebooks", help="folder of NN_*.ipynb notebooks (default: notebooks/ "
                                       "of the repository, or $D3M_NOTEBOOKS)")
    r.add_argument("--replace", action="store_true",
                   help="the run folder holds other parameters: overwrite the stages that change, in "
                        "place (without it such a run is refused and nothing is changed)")
    r.add_argument("--book", action="store_true", help="build the book after a successful run")
    r.add_argument("--progress", action="store_true", help="show papermill's per-cell progress bar")

    b = sub.add_parser("book", help="build the Jupyter Book from a run's executed notebooks")
    b.add_argument("run_dir", help="run folder holding executed/")
    b.add_argument("--out", help="output folder (default: <run_dir>/book); HTML in <out>/_build/html")
    b.add_argument("--notebooks", help="folder of the source notebooks (default as for run)")

    sub.add_parser("params", help="list every parameter: default, allowed values, stages, meaning")
    st = sub.add_parser("status", help="state of each stage of a run folder (exit 1 unless all current)",
                        description="Check each stage of a run folder: finished, current with its "
                                    "configuration, its files and inputs as they were written.")
    st.add_argument("run_dir")
    st.add_argument("--notebooks", help="folder of the source notebooks (default as for run)")
    pw = sub.add_parser("power", help="minimum detectable effect of a finished run's primary contrast",
                        description="Between-seed and test-sampling variance of the pre-specified primary "
                                    "contrast (d3m_lib.power), its minimum detectable effect at 80%% power "
                                    "(two-sided), and with --effect the seeds and test patients it needs.")
    pw.add_argument("run_dir")
    pw.add_argument("--effect", type=float, help="effect to detect, e.g. 0.05: print the seeds needed per "
                                                 "test-set size")

    sw = sub.add_parser("sweep", help="run one study design on every synthetic scenario and tabulate the answers",
                        description="Runs PARAMS once per synthetic_scenario into <run-root>/<scenario>, then "
                                    "writes <run-root>/scenario_sweep.csv and .json (d3m_lib.sweep).")
    sw.add_argument("params", help="YAML file of parameters (params/*.yaml)")
    sw.add_argument("--scenarios", default=",".join(synthetic.SCENARIOS),
                    help="comma-separated scenarios (default: all)")
    sw.add_argument("--run-root", default="runs/sweep", help="folder of the per-scenario run folders")
    sw.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                    help="override one parameter of every run (read as YAML)")
    sw.add_argument("--null-seeds", type=int, default=0,
                    help="also run the null scenario with this many seeds (0, 1, ...; into <run-root>/null-claims) "
                         "and take the claim rate over its sub-studies of the design's seed count (default: "
                         "the null run's own seeds)")

    sw.add_argument("--no-run", action="store_true",
                    help="run nothing: tabulate the finished run folders already under --run-root")

    d = sub.add_parser("demo-data", help="write a synthetic MIMIC-CXR-JPG + MIMIC-IV copy",
                       description="Write a synthetic cohort in MIMIC's file layout, with planted "
                                   "biases recorded beside it (d3m_lib.synthetic).")
    synthetic.add_cli_arguments(d)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            run_path = run(args.params, run_dir=args.run_dir, overrides=parse_overrides(args.param),
                           first=args.first, last=args.last, notebooks_dir=args.notebooks,
                           progress=args.progress, replace=args.replace)
            print(f"run finished: {run_path} (record in {run_path / 'run.json'})")
            if args.book:
                index = build_book(run_path, notebooks_dir=args.notebooks)
                print(f"book: {index}")
        elif args.command == "book":
            index = build_book(args.run_dir, out=args.out, notebooks_dir=args.notebooks)
            print(f"book: {index}")
        elif args.command == "params":
            print(config.describe())
        elif args.command == "status":
            r = RunDir(args.run_dir)
            cfg = r.config()
            if cfg is None:
                raise RunnerError(f"{r.path} has no config.json: not a run folder")
            print(f"{r.path}: run {run_status(r) or 'never started by the runner'}")
            problems = stage_problems(r, cfg, study_notebooks(args.notebooks))
            print("\n".join(f"  {p}" for p in problems) or "  every stage is current")
            return 1 if problems else 0     # scripts can test it: not every stage is current
        elif args.command == "power":
            from . import power

            if args.effect is not None and not 0 < args.effect < 1:
                raise RunnerError(f"--effect {args.effect}: must lie strictly between 0 and 1")
            print(power.from_run(args.run_dir).text(args.effect))
        elif args.command == "sweep":
            from . import sweep

            record = sweep.run_sweep(args.params, [s for s in args.scenarios.split(",") if s],
                                     args.run_root, parse_overrides(args.param),
                                     null_seeds=args.null_seeds, execute=not args.no_run)
            print(sweep.display_table(pd.DataFrame(record["table"])).to_string(index=False))
            if "null_claim_rate" in record:
                c = record["null_claim_rate"]
                print(f"null: primary contrast claimed in {c['claimed']} of {c['studies']} sub-studies of "
                      f"{c['seeds_per_study']} seeds ({c['disjoint_claimed']} of {c['disjoint_studies']} disjoint "
                      "ones)")
        elif args.command == "demo-data":
            try:
                synthetic.main(args)
            except (ValueError, TypeError, OSError) as exc:
                raise RunnerError(f"demo-data: {exc}") from exc
    except (RunnerError, ConfigError, RunBusyError, StaleArtifactError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:   # a read-only or full run folder: one line, not a traceback
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        from .runner import write_error

        folder = getattr(args, "run_dir", None) or getattr(args, "out", None) or "."
        print(f"error: {write_error(Path(folder).resolve(), exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
