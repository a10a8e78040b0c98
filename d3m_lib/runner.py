"""Run the study's notebooks with papermill, and build the book from what they executed.

``run`` resolves and checks the whole configuration first (``d3m_lib.config``),
then plans every stage against the run folder (``d3m_lib.rundir``): a stage whose
fingerprint is already current is kept, one that a sibling run folder holds
with the same fingerprint is linked from there, the others are computed. The
plan is printed and recorded in ``run.json``. Each notebook receives only
``run_dir`` and reads the run's ``config.json``. ``build_book`` refuses a run
whose stages are missing, stale or outdated, then builds with warnings as errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import config as cfgmod
from .config import Config, ConfigError
from .rundir import (LOCK_ENV, STAGES, RunBusyError, RunDir, acquire_lock, code_version as library_version,
                     expected_fingerprints, lock_is_held)

REPO_ROOT = Path(__file__).resolve().parent.parent
KERNEL = "python3"
BOOK_FILES = ("_config.yml", "_toc.yml")
BOOK_DIRS = ("book",)


class RunnerError(RuntimeError):
    """A problem the user can fix: bad parameters, a failed notebook, a missing file."""


# -- notebooks -------------------------------------------------------------------
def default_notebooks_dir() -> Path:
    """``$D3M_NOTEBOOKS`` if set, else the repository's ``notebooks/``."""
    return Path(os.environ.get("D3M_NOTEBOOKS", REPO_ROOT / "notebooks"))


@dataclass(frozen=True)
class Notebook:
    stage: str
    path: Path

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def number(self) -> int:
        return int(self.stage[:2])


def study_notebooks(notebooks_dir: str | Path | None = None) -> list[Notebook]:
    """The notebook of every stage, each with a ``parameters`` cell that declares ``run_dir``."""
    import nbformat
    import papermill

    nb_dir = Path(notebooks_dir or default_notebooks_dir())
    out = []
    for spec in STAGES.values():
        p = nb_dir / spec.notebook
        if not p.is_file():
            raise RunnerError(f"stage {spec.name} needs the notebook {p}, which does not exist")
        nb = nbformat.read(p, as_version=4)
        if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
            raise RunnerError(f"{p.name} has no cell tagged 'parameters'; papermill needs one")
        if "run_dir" not in papermill.inspect_notebook(str(p)):
            raise RunnerError(f"{p.name} does not declare run_dir in its parameters cell")
        out.append(Notebook(spec.name, p))
    return out


def source_hash(path: Path) -> str:
    """Hash of a notebook's cell types and sources (outputs and metadata ignored)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    blob = json.dumps([(c.cell_type, c.source) for c in nb.cells])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _nb_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text()).get("metadata", {})
    except (OSError, json.JSONDecodeError):
        return {}


def _exception_flag(executed: Path) -> bool:
    return bool(_nb_meta(executed).get("papermill", {}).get("exception"))


def select(first: int | None, last: int | None) -> list[str]:
    """Stages numbered ``first..last`` (inclusive; ``None`` = open end)."""
    lo, hi = first if first is not None else 1, last if last is not None else len(STAGES)
    chosen = [s for s in STAGES.values() if lo <= s.number <= hi]
    if not chosen:
        raise RunnerError(f"no stage numbered in --from {first} --to {last}; stages are 1..{len(STAGES)}")
    return [s.name for s in chosen]


# -- provenance ----------------------------------------------------------------
def code_version(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Git commit and dirty flag (when in a checkout) and the library's content hash."""
    out: dict[str, Any] = {"library": library_version()}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                       text=True, check=True).stdout.strip()
        out["dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                                           text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = "unknown"
    return out


def package_versions() -> dict[str, str | None]:
    """Versions of the packages a result depends on (``None`` when not installed)."""
    from . import __version__

    out: dict[str, str | None] = {"d3m_lib": __version__, "python": platform.python_version()}
    for dist in ("torch", "torchvision", "traker", "fairlearn", "numpy", "pandas",
                 "papermill", "jupyter-book", "myst-nb"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def check_kernel(name: str = KERNEL) -> str:
    """The interpreter the notebooks' kernel runs; warns when it is not this one."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel as exc:
        raise RunnerError(f"no Jupyter kernel named {name!r}: run "
                          f"'{sys.executable} -m ipykernel install --sys-prefix'") from exc
    exe = spec.argv[0]
    if exe in ("python", "python3", "python3.11") or "{" in exe:  # jupyter_client uses sys.executable
        return sys.executable
    if Path(exe).resolve() != Path(sys.executable).resolve():
        print(f"warning: kernel {name!r} ({spec.resource_dir}) runs {exe}, not {sys.executable}; "
              f"the notebooks may see other packages")
    return exe


def run_status(run: RunDir) -> str | None:
    """The status in ``run.json``; a run recorded as running whose lock is free was interrupted."""
    if not run.run_json.exists():
        return None
    try:
        status = json.loads(run.run_json.read_text()).get("status")
    except json.JSONDecodeError:
        return "unreadable"
    if status == "running" and not lock_is_held(run.path):
        return "interrupted"
    return status


# -- privacy -------------------------------------------------------------------
def privacy_scan(run: RunDir, cfg: Config) -> dict:
    """Scan a credentialed run's executed notebooks for identifiers and patient images."""
    from .privacy import scan_notebook_outputs

    policy = run.policy(cfg)
    if not policy.credentialed:
        return {"scanned": False, "credentialed": False}
    if policy.publish_identifiers and policy.publish_images:
        return {"scanned": False, "credentialed": True,
                "reason": "publish_identifiers and publish_images are both true"}
    cohort = run.stage_dir("01_cohort") / "cohort.parquet"
    if not cohort.exists():
        raise RunnerError(f"credentialed run: cannot scan the notebooks without {cohort}")
    found = scan_notebook_outputs(run.path / "executed", cohort, allow_ids=policy.publish_identifiers,
                                  allow_images=policy.publish_images)
    if found:
        shown = "\n".join(f"  {f}" for f in found[:20])
        more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
        raise RunnerError(f"credentialed run: executed notebooks show what this run may not "
                          f"publish ({len(found)} found):\n{shown}{more}")
    return {"scanned": True, "credentialed": True, "findings": 0}


# -- planning -------------------------------------------------------------------------
def _executed_ok(run: RunDir, stage: str, fp: str, src_hash: str | None) -> bool:
    ex = run.executed(stage)
    if not ex.exists() or _exception_flag(ex):
        return False
    meta = _nb_meta(ex).get("d3m", {})
    return meta.get("fingerprint") == fp and (src_hash is None or meta.get("source") == src_hash)


def find_source(target: RunDir, stage: str, fp: str) -> RunDir | None:
    """A sibling run folder holding ``stage`` current with fingerprint ``fp``."""
    parent = target.path.parent
    if not parent.is_dir():
        return None
    for d in sorted(parent.iterdir()):
        if d == target.path or not (d / stage / "manifest.json").is_file():
            continue
        other = RunDir(d)
        try:
            m = other.manifest(stage)
        except (OSError, json.JSONDecodeError):
            continue
        if m.get("fingerprint") == fp and other.state(stage, fp) == "current" \
                and _executed_ok(other, stage, fp, None):
            return other
    return None


def plan(cfg: Config, target: RunDir, chosen: Sequence[str], notebooks: Sequence[Notebook],
         replace: bool = False) -> list[dict]:
    """What happens to each stage: ``keep``, ``link`` (from a sibling run) or ``compute``."""
    fps = expected_fingerprints(cfg)
    src = {nb.stage: source_hash(nb.path) for nb in notebooks}
    steps, computing = [], set()
    needed = {u for c in chosen for u in _upstream_closure(c)}
    for name, spec in STAGES.items():
        fp = fps[name]
        state = target.state(name, fp)
        upstream_changes = any(u in computing for u in spec.needs)
        if state == "current" and not upstream_changes and _executed_ok(target, name, fp, src[name]):
            steps.append(dict(stage=name, action="keep", reason="current", fingerprint=fp))
            continue
        source = None if upstream_changes else find_source(target, name, fp)
        if source is not None and (name not in chosen or
                                   _executed_ok(source, name, fp, src[name])):
            steps.append(dict(stage=name, action="link", reason=f"same fingerprint in {source.path}",
                              source=str(source.path), fingerprint=fp))
            continue
        if name not in chosen:
            if name in needed and state != "current":
                why = {"missing": "it has not been run", "incomplete": "it did not finish",
                       "stale": "; ".join(target.problems(name))}.get(state) or target.why_outdated(name, cfg)
                raise RunnerError(f"stage {name} is needed by the selected stages but is not current in "
                                  f"{target.path} ({why}); include it (--from {spec.number})")
            steps.append(dict(stage=name, action="skip", reason=state if state != "current" else
                              "not selected", fingerprint=fp))
            continue
        if state == "missing":
            reason = "not computed yet"
        elif state == "incomplete":
            reason = "resuming an interrupted stage" if (target.manifest(name) or {}).get(
                "fingerprint") == fp else "did not finish"
        elif state == "current" and upstream_changes:
            reason = "an upstream stage is recomputed"
        elif state == "current":
            ex = target.executed(name)
            reason = ("its notebook changed" if ex.exists() and _nb_meta(ex).get("d3m", {}).get("fingerprint") == fp
                      else "the stage is current but its notebook was not executed into this run folder "
                           "(it resumes from the stage's files)")
        elif state == "stale":
            reason = "; ".join(dict.fromkeys(target.problems(name)))
        else:
            reason = target.why_outdated(name, cfg)
        old = target.manifest(name)
        if old is not None and old.get("params") != cfg.for_stage(name) and not replace:
            raise RunnerError(f"stage {name} in {target.path} holds results for other parameters "
                              f"({target.why_outdated(name, cfg)})")
        computing.add(name)
        steps.append(dict(stage=name, action="compute", reason=reason, fingerprint=fp))
    return steps


def _upstream_closure(name: str) -> set[str]:
    out: set[str] = set()
    for u in STAGES[name].needs:
        out |= {u} | _upstream_closure(u)
    return out


def print_plan(steps: Sequence[dict], target: RunDir) -> None:
    print(f"plan for {target.path}:")
    for s in steps:
        what = {"keep": "keep   ", "link": "reuse  ", "compute": "compute", "skip": "skip   "}[s["action"]]
        print(f"  {s['stage']:<18} {what}  {s['reason']}", flush=True)


# -- running -------------------------------------------------------------------
def _kernel_env(token: str) -> dict[str, str]:
    """Environment of the kernels: this d3m_lib first on PYTHONPATH, and the run's lock token."""
    env = dict(os.environ)
    parts = [str(REPO_ROOT)] + [str(Path(p).resolve()) for p in
                                env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env[LOCK_ENV] = token
    return env


def execute_notebook(src: Path, out: Path, parameters: Mapping[str, Any], progress: bool = False) -> None:
    """papermill, with the failing cell and exception named in a ``RunnerError``."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out.parent.mkdir(parents=True, exist_ok=True)
    failure = None
    try:
        papermill.execute_notebook(str(src), str(out), parameters=dict(parameters), kernel_name=KERNEL,
                                   cwd=str(src.parent), progress_bar=progress)
    except PapermillExecutionError as exc:
        first_line = next((ln for ln in str(exc.source).splitlines() if ln.strip()), "")
        failure = (f"notebook {src.stem} failed in cell In [{exc.exec_count}] "
                   f"(cell index {exc.cell_index}, starting {first_line.strip()[:80]!r}): "
                   f"{exc.ename}: {exc.evalue}")
    except Exception as exc:  # kernel death, timeout, unreadable notebook ...
        failure = f"notebook {src.stem} could not be executed: {type(exc).__name__}: {exc}"
    if failure is None and (not out.exists() or _exception_flag(out)):
        failure = f"notebook {src.stem} recorded an exception (papermill.exception is set)"
    if failure:
        raise RunnerError(f"{failure}\n  executed copy with the traceback: {out}")


def _stamp(executed: Path, stage: str, fp: str, src: str) -> None:
    """Record in the executed notebook which stage fingerprint and notebook source it shows."""
    nb = json.loads(executed.read_text())
    nb.setdefault("metadata", {})["d3m"] = {"stage": stage, "fingerprint": fp, "source": src}
    executed.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def _print_stage_report(run: RunDir, stage: str) -> None:
    """Lines a stage left for the terminal in its manifest (``summary.terminal``)."""
    lines = ((run.manifest(stage) or {}).get("summary") or {}).get("terminal") or []
    for ln in lines:
        print(f"  {ln}", flush=True)


def resolve_config(params_file: str | Path | None, overrides: Mapping[str, Any],
                   base: Path) -> tuple[Config, Any]:
    """The checked configuration of a run, and the run_dir the file names (if any)."""
    values = cfgmod.read_params_file(params_file) if params_file is not None else {}
    values.update(dict(overrides))
    run_dir = values.pop("run_dir", None)
    return cfgmod.resolve(values, base=base), run_dir


def run(params_file: str | Path | None, *, run_dir: str | Path | None = None,
        overrides: Mapping[str, Any] = (), first: int | None = None, last: int | None = None,
        notebooks_dir: str | Path | None = None, progress: bool = False, replace: bool = False) -> Path:
    """Check the configuration, plan, execute the stages to compute; return the run folder.

    Every parameter name and value is checked before anything is written. A run
    folder configured with other parameters is never changed unless ``replace``.
    """
    base = Path.cwd()
    try:
        cfg, yaml_run_dir = resolve_config(params_file, overrides, base)
    except ConfigError as exc:
        raise RunnerError(str(exc)) from None
    run_dir = run_dir or yaml_run_dir or (Path("runs") / Path(params_file).stem if params_file else None)
    if run_dir is None:
        raise RunnerError("give a parameter file or --run-dir")
    target = RunDir(base / run_dir)
    chosen = select(first, last)
    notebooks = study_notebooks(notebooks_dir)
    kernel_python = check_kernel()

    try:
        old_cfg = target.config()
    except ConfigError as exc:
        raise RunnerError(str(exc)) from None
    if old_cfg is None and target.path.exists() and any(target.stage_dir(s).exists() for s in STAGES):
        raise RunnerError(f"{target.path} has stage folders but no config.json (made by an older "
                          f"d3m_lib); choose a new --run-dir")
    changed = {k: v for k, v in (cfg.diff(old_cfg).items() if old_cfg else [])
               if cfgmod.BY_NAME[k].kind == "stage"}
    if changed and not replace:
        said = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise RunnerError(f"{target.path} holds a run with other parameters ({said}). Nothing was changed.\n"
                          f"  keep it: choose a new folder, e.g. --run-dir {target.path.parent.name}/"
                          f"{target.path.name}-2 (unchanged stages are linked, not recomputed)\n"
                          f"  or overwrite it in place: add --replace")
    check_writable(target.path)
    try:
        lock = acquire_lock(target.path, "python -m d3m_lib run")
    except RunBusyError as exc:
        raise RunnerError(str(exc)) from None
    except OSError as exc:
        raise RunnerError(write_error(target.path, exc)) from None
    try:
        return _run_locked(cfg, target, chosen, notebooks, params_file, kernel_python, lock, replace,
                           progress)
    finally:
        lock.release()


MIN_FREE_BYTES = 200 * 2 ** 20   # a run folder's disk with less free space is refused before work


def write_error(folder: Path, exc: OSError) -> str:
    """One line for a run folder that cannot be written (read-only, full, no permission)."""
    what = exc.strerror or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename and Path(str(exc.filename)) != Path(folder) else ""
    return (f"cannot write to the run folder {folder}: {what}{where}. Free space on its disk, make it "
            f"writable, or choose another --run-dir")


def check_writable(folder: Path) -> None:
    """Refuse, in one line, a run folder that is read-only or on a (nearly) full disk."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise RunnerError(f"cannot write to the run folder {folder}: {probe} is read-only. Make it "
                          f"writable, or choose another --run-dir")
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES:
        raise RunnerError(f"cannot write to the run folder {folder}: its disk has {free / 2 ** 20:.0f} MiB "
                          f"free (at least {MIN_FREE_BYTES // 2 ** 20} MiB needed). Free space, or choose "
                          f"another --run-dir")


def check_against_cohort(run: RunDir, cfg: Config) -> None:
    """Parameters that stage 01's cohort bounds, checked once it is known (before the stages that need them).

    ``trak_proj_dim`` must lie below the number of training images (TRAK's projected
    features of the training set would be rank-deficient otherwise); stage 04 refuses it too.
    """
    import pandas as pd

    f = run.stage_dir("01_cohort") / "cohort.parquet"
    if not f.is_file():
        return
    n_train = int((pd.read_parquet(f, columns=["split"])["split"] == "train").sum())
    if cfg.trak_proj_dim >= n_train:
        raise RunnerError(f"parameter 'trak_proj_dim' = {cfg.trak_proj_dim}: must be below the number of "
                          f"training images, and this run's cohort (stage 01) has {n_train:,} in train (a "
                          f"finding's task may have fewer); stage 04 would refuse it. Choose a smaller value, "
                          f"e.g. -p trak_proj_dim={max(1, min(256, n_train // 4))}")


def _read_record(run: RunDir) -> dict:
    """The run's ``run.json`` ({} when absent or unreadable)."""
    try:
        rec = json.loads(run.run_json.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _run_locked(cfg, target, chosen, notebooks, params_file, kernel_python, lock, replace, progress):
    # we hold the lock: a record still saying "running" belongs to a run that died
    previous = run_status(target)
    if previous in ("interrupted", "running"):
        print(f"note: the previous run in {target.path} was interrupted")
        rec = json.loads(target.run_json.read_text())
        rec["status"] = "interrupted"
        _write_json(target.run_json, rec)
    steps = plan(cfg, target, chosen, notebooks, replace)
    print_plan(steps, target)
    by_stage = {nb.stage: nb for nb in notebooks}
    prev = _read_record(target)
    history = prev.pop("history", []) + ([prev] if prev else [])   # every earlier call, oldest first
    record: dict[str, Any] = {
        "params_file": str(Path(params_file).resolve()) if params_file else None,
        "config": cfg.to_dict(), "plan": steps, "selected": chosen, "code_version": code_version(),
        "versions": package_versions(), "kernel_python": kernel_python,
        "host": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine()},
        "started_at": _now(), "status": "running", "notebooks": [], "history": history,
    }
    # notebooks: how each stage of this folder was computed, kept stages with their earlier timings
    earlier = {e["notebook"]: e for e in prev.get("notebooks", []) if e.get("status") == "complete"}
    target.path.mkdir(parents=True, exist_ok=True)
    _write_json(target.run_json, record)
    target.write_config(cfg)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old_handler = signal.signal(signal.SIGTERM, on_term)
    saved_env = dict(os.environ)
    os.environ.update(_kernel_env(lock.token))
    entry: dict[str, Any] = {}
    try:
        for step in steps:
            name = step["stage"]
            nb_name = by_stage[name].name
            if step["action"] == "keep" and nb_name in earlier:
                record["notebooks"].append({**earlier[nb_name], "action": "keep"})
            if step["action"] == "link":
                target.adopt(name, RunDir(step["source"]))
                theirs = {e["notebook"]: e for e in _read_record(RunDir(step["source"])).get("notebooks", [])}
                record["notebooks"].append({**theirs.get(nb_name, {"notebook": nb_name, "status": "complete"}),
                                            "action": "link", "linked_from": step["source"]})
            if step["action"] == "compute":
                old = target.manifest(name)
                if old is not None and old.get("params") != cfg.for_stage(name):  # replace: asked for
                    shutil.rmtree(target.stage_dir(name))
                    marked = target.mark_stale(name, f"{name} was replaced")
                    print(f"[{name}] replacing in place (--replace)"
                          + (f"; marked stale: {', '.join(marked)}" if marked else ""), flush=True)
                nb = by_stage[name]
                entry = {"notebook": nb.name, "started_at": _now(), "status": "running", "action": "compute"}
                record["notebooks"].append(entry)
                _write_json(target.run_json, record)
                print(f"[{nb.name}] running ...", flush=True)
                t0 = time.perf_counter()
                out = target.executed(name)
                try:
                    execute_notebook(nb.path, out, {"run_dir": str(target.path)}, progress)
                except RunnerError as exc:
                    entry.update(status="failed", error=str(exc), finished_at=_now())
                    raise
                m = target.manifest(name) or {}
                if m.get("code") and m.get("code") != record["code_version"]["library"]:
                    entry.update(status="failed", finished_at=_now())
                    raise RunnerError(f"the library code changed while this run was in progress (stage {name} "
                                      f"ran with code {m.get('code')}, the run started with "
                                      f"{record['code_version']['library']}); start the run again")
                if not m.get("complete") or m.get("fingerprint") != step["fingerprint"]:
                    entry.update(status="failed", finished_at=_now())
                    raise RunnerError(f"notebook {nb.name} finished but stage {name} is not complete with "
                                      f"this run's configuration (fingerprint {m.get('fingerprint')} != "
                                      f"{step['fingerprint']}); see {out}")
                _stamp(out, name, step["fingerprint"], source_hash(nb.path))
                entry.update(status="complete", finished_at=_now(),
                             seconds=round(time.perf_counter() - t0, 2))
                _write_json(target.run_json, record)
                print(f"[{nb.name}] done in {entry['seconds']:.1f} s", flush=True)
                _print_stage_report(target, name)
            if name == "01_cohort" and any(st["action"] == "compute" and st["stage"] == "04_trak" for st in steps):
                check_against_cohort(target, cfg)   # before any later stage runs
        record["privacy"] = privacy_scan(target, cfg)
    except KeyboardInterrupt:
        if entry.get("status") == "running":
            entry.update(status="interrupted", finished_at=_now())
        record.update(status="interrupted", finished_at=_now())
        _write_json(target.run_json, record)
        raise
    except RunnerError as exc:
        record.update(status="failed", finished_at=_now(), error=str(exc))
        _write_json(target.run_json, record)
        raise
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        os.environ.clear()
        os.environ.update(saved_env)
    problems = stage_problems(target, cfg, notebooks)
    record.update(status="complete" if not problems else "partial", finished_at=_now(),
                  not_current=problems)
    _write_json(target.run_json, record)
    if problems:
        print("not every stage is current in this run folder (the book needs all of them):")
        for p in problems:
            print(f"  {p}")
    return target.path


def _execute_here(run: RunDir) -> str:
    """The command that executes a run's notebooks into its own executed/ with its own configuration."""
    return (f"to execute the notebooks into this run folder (finished stages resume from their files): "
            f"python -m d3m_lib run {run.config_file} --run-dir {run.path}")


def stage_problems(run: RunDir, cfg: Config, notebooks: Sequence[Notebook]) -> list[str]:
    """Why each stage would not belong in this run's book (empty: every stage is current)."""
    fps = expected_fingerprints(cfg)
    out = []
    seen: dict = {}     # each stage's files are read once
    for nb in notebooks:
        name, fp = nb.stage, fps[nb.stage]
        state = run.state(name, fp, full=True, _seen=seen)   # every file read again: what is published
        if state == "missing":
            out.append(f"{name}: not run")
        elif state == "incomplete":
            out.append(f"{name}: did not finish")
        elif state == "stale":
            out.append(f"{name}: stale ({'; '.join(dict.fromkeys(run.problems(name, True, seen)))})")
        elif state == "outdated":
            out.append(f"{name}: outdated ({run.why_outdated(name, cfg)})")
        elif not run.executed(name).exists():
            out.append(f"{name}: its notebook was not executed into {run.path / 'executed'} (it ran elsewhere, "
                       f"e.g. with papermill or in JupyterLab); {_execute_here(run)}")
        elif _exception_flag(run.executed(name)):
            out.append(f"{name}: its executed notebook recorded an exception")
        elif _nb_meta(run.executed(name)).get("d3m", {}).get("fingerprint") != fp:
            out.append(f"{name}: the executed notebook shows another computation of this stage; "
                       f"{_execute_here(run)}")
    return out


# -- book ------------------------------------------------------------------------
def assemble_book(run_dir: str | Path, *, notebooks_dir: str | Path | None = None,
                  book_root: str | Path = REPO_ROOT, study: bool = True) -> Path:
    """Copy the book pages and the executed notebooks into ``<run_dir>/book_src``.

    For a study run (``study=True``) every stage must be current: refused otherwise,
    naming each stage and why. ``study=False`` builds any folder of numbered
    notebooks executed into ``<run_dir>/executed`` (used by the tests of the book).
    """
    run = RunDir(run_dir)
    root = Path(book_root)
    if study:
        try:
            cfg = run.config()
        except ConfigError as exc:
            raise RunnerError(str(exc)) from None
        if cfg is None:
            raise RunnerError(f"cannot build the book from {run.path}: no config.json (not a run folder)")
        notebooks = study_notebooks(notebooks_dir)
        status = run_status(run)
        problems = stage_problems(run, cfg, notebooks)
        if status in ("running",):
            problems.insert(0, "a run is still writing this folder")
        if problems:
            raise RunnerError(f"cannot build the book from {run.path}:\n"
                              + "\n".join(f"  {p}" for p in problems))
        try:
            privacy_scan(run, cfg)   # the notebooks may have been re-run since
        except RunnerError:
            raise
        names = [nb.path.name for nb in notebooks]
    else:
        names = sorted(p.name for p in Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
        missing = [n for n in names if not (run.path / "executed" / n).exists()]
        if missing:
            raise RunnerError(f"cannot build the book from {run.path}:\n"
                              + "\n".join(f"  {n[:-6]}: not executed in this run" for n in missing))
    src = run.path / "book_src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in BOOK_FILES:
        if not (root / name).is_file():
            raise RunnerError(f"book file {root / name} is missing")
        shutil.copy2(root / name, src / name)
    for name in BOOK_DIRS:
        if not (root / name).is_dir():
            raise RunnerError(f"book folder {root / name} is missing")
        shutil.copytree(root / name, src / name)
    (src / "notebooks").mkdir()
    for n in names:
        fold_code(run.path / "executed" / n, src / "notebooks" / n)
    substitutions = {"group_noun": book_group_noun(run.config() if study else _maybe_config(run))}
    _set_substitutions(src / "_config.yml", substitutions)
    write_headline_figure(run, src / "book" / "_generated" / "headline.png")
    return src


# Cells whose input the book never shows at all (papermill's injected parameters repeat run_dir).
_REMOVE_INPUT = {"injected-parameters"}


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def fold_code(executed: Path, out: Path) -> int:
    """Copy an executed notebook for the book: code folded, no live widgets.

    Every code cell gets the ``hide-input`` tag: the reader sees the outputs and
    opens the code with a click (cells already tagged to be hidden or removed
    keep their tags). Widget outputs (tqdm.auto progress bars, the explorer) are
    dropped with the saved widget state: a static page cannot run them, and
    MyST-NB would load the widget manager from a CDN. Returns the cells folded.
    """
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    nb.metadata.pop("widgets", None)
    folded = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = [o for o in (_for_readers(o) for o in cell.get("outputs", [])
                                    if WIDGET_VIEW not in o.get("data", {})) if o is not None]
        tags = list(cell.metadata.get("tags", []))
        if any(t.startswith(("hide-", "remove-")) for t in tags):
            continue
        tags.append("remove-input" if _REMOVE_INPUT & set(tags) else "hide-input")
        cell.metadata["tags"] = tags
        folded += 1
    nbformat.write(nb, out)
    return folded


def _for_readers(output):
    """An output as the book shows it, or None to drop it.

    Progress bars (tqdm frames on stderr) are dropped: a static page cannot animate them
    and the executed notebook keeps them. HTML tables write missing values as "–",
    whole-number columns as integers (``27`` for ``27.000``) and `code` in cells as code.
    Nothing else is changed: a warning stays and fails the book's check.
    """
    from .book_check import PROGRESS

    if output.get("output_type") == "stream" and output.get("name") == "stderr":
        lines = [ln for ln in str(output.get("text", "")).replace("\r", "\n").split("\n")
                 if ln.strip() and not PROGRESS.search(ln)]
        if not lines:
            return None
        output["text"] = "\n".join(lines) + "\n"
        return output
    data = output.get("data", {})
    for key in [k for k in data if k.endswith("text/html")]:   # glued tables too (application/papermill.record/)
        html = "".join(data[key]) if isinstance(data[key], list) else str(data[key])
        if "<table" in html:
            data[key] = readable_tables(html)
    return output


_TABLE = re.compile(r"<table\b.*?</table>", re.S)
_ROW = re.compile(r"(<tr\b[^>]*>)(.*?)(</tr>)", re.S)
_CELL = re.compile(r"(<(t[dh])\b[^>]*>)(.*?)(</\2>)", re.S)
_MISSING_CELL = {"NaN", "nan", "&lt;NA&gt;", "<NA>", "NaT", "None"}
_WHOLE = re.compile(r"^-?[\d,]+\.0+$")


def readable_tables(html: str) -> str:
    """HTML tables with "–" for missing values, integers for whole-number columns, `x` as code."""
    def table(m):
        t = m.group(0)
        cut = t.find("</thead>")
        head, body = (t[:cut], t[cut:]) if cut >= 0 else ("", t)
        rows = [[c.group(3).strip() for c in _CELL.finditer(r.group(2))] for r in _ROW.finditer(body)]
        ncol = max((len(r) for r in rows), default=0)
        whole = set()
        for j in range(ncol):
            vals = [r[j] for r in rows if j < len(r) and r[j] and r[j] not in _MISSING_CELL]
            if len(vals) >= 2 and all(_WHOLE.match(v) for v in vals):
                whole.add(j)

        def cell_text(j, v):
            if v in _MISSING_CELL:
                return "–"
            if j in whole and _WHOLE.match(v):
                return f"{int(round(float(v.replace(',', '')))):,}"
            return re.sub(r"`([^`<>]+)`", r"<code>\1</code>", v)

        def row(r):
            cells = iter(range(10 ** 6))
            inner = _CELL.sub(lambda c: c.group(1) + cell_text(next(cells), c.group(3).strip()) + c.group(4),
                              r.group(2))
            return r.group(1) + inner + r.group(3)
        head = _ROW.sub(lambda r: r.group(1) + re.sub(r"`([^`<>]+)`", r"<code>\1</code>", r.group(2))
                        + r.group(3), head)
        return head + _ROW.sub(row, body)
    return _TABLE.sub(table, html)


def _maybe_config(run: RunDir):
    try:
        return run.config()
    except ConfigError:
        return None


def book_group_noun(cfg) -> str:
    """The noun the book's pages use for the run's groups (``group`` without a configuration)."""
    from .book import group_noun

    return group_noun(cfg) if cfg is not None else "group"


def _set_substitutions(config_yml: Path, values: Mapping[str, str]) -> None:
    """Add MyST substitutions (``{{ group_noun }}`` in a page) to a book's ``_config.yml``."""
    import yaml

    conf = yaml.safe_load(config_yml.read_text()) or {}
    subs = conf.setdefault("parse", {}).setdefault("myst_substitutions", {})
    subs.update(values)
    exts = conf["parse"].setdefault("myst_enable_extensions", [])
    if "substitution" not in exts:
        exts.append("substitution")
    config_yml.write_text("# assembled by d3m_lib.runner.assemble_book\n" + yaml.safe_dump(conf, sort_keys=False))


def write_headline_figure(run: RunDir, out: Path) -> Path | None:
    """The Results page's headline figure, from notebook 06's saved tables; None when absent.

    Per finding and method, the paired change against ERM with its interval:
    of worst-group accuracy when 06 saved ``wga_change.csv``
    (:meth:`~d3m_lib.analysis.MethodComparison.wga_change`), otherwise of
    accuracy on ERM's worst group (``forest.csv`` and ``worst_group.csv``).
    """
    import pandas as pd

    from . import analysis, plots

    d06 = run.stage_dir("06_per_race")
    if (d06 / "wga_change.csv").is_file():
        change = pd.read_csv(d06 / "wga_change.csv")
        xlabel, title = ("change in worst-group accuracy vs ERM (paired)",
                         "Worst-group accuracy: change against ERM")
    elif (d06 / "forest.csv").is_file() and (d06 / "worst_group.csv").is_file():
        change = analysis.headline_from_forest(pd.read_csv(d06 / "forest.csv"),
                                               pd.read_csv(d06 / "worst_group.csv"))
        xlabel, title = ("change in accuracy on ERM's worst group vs ERM (paired)",
                         "Accuracy on ERM's worst group: change against ERM")
    else:
        return None
    change = change[~change["method"].isin(["erm", "base"])]  # base: the anchor model, selects nothing
    if change.empty:
        return None
    seeds = None
    if (d06 / "paired_seeds.csv").is_file():  # each seed's change against ERM: dots beside the intervals
        d = pd.read_csv(d06 / "paired_seeds.csv")
        d = d[(d["b"] == "erm") & d["a"].isin(change["method"])]
        seeds = pd.DataFrame({"finding": d["finding"], "method": d["a"], "change": d["diff"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = plots.headline_plot(change, title=title, xlabel=xlabel, seeds=seeds)
    fig.savefig(out, dpi=120)
    return out


def build_book(run_dir: str | Path, *, out: str | Path | None = None,
               notebooks_dir: str | Path | None = None, book_root: str | Path = REPO_ROOT,
               study: bool = True, check: bool = True) -> Path:
    """Build the Jupyter Book of a run with warnings as errors; return the path of index.html.

    The HTML lands in ``<out>/_build/html`` (``out`` defaults to ``<run_dir>/book``).
    With ``check``, every page is then opened in headless Chromium
    (:func:`check_built_book`); a problem fails the build.
    """
    run_path = Path(run_dir).resolve()
    src = assemble_book(run_path, notebooks_dir=notebooks_dir, book_root=book_root, study=study)
    out_path = Path(out).resolve() if out else run_path / "book"
    cmd = [sys.executable, "-c",
           "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(src), "--path-output", str(out_path), "--all",
           "--warningiserror", "--nitpick", "--keep-going"]
    print(f"building the book: jupyter-book build {src} --path-output {out_path} "
          f"--all --warningiserror --nitpick --keep-going", flush=True)
    env = dict(os.environ)  # the build imports d3m_lib.sphinx_ext: this checkout's
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
        [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log = out_path / "build.log"
    out_path.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                    if "WARNING" in ln or "ERROR" in ln]
        shown = "\n".join(warnings[:30]) or (proc.stdout + proc.stderr)[-3000:]
        raise RunnerError(f"jupyter-book build failed (warnings are errors); full log in {log}:\n"
                          f"{shown}")
    index = out_path / "_build" / "html" / "index.html"
    if not index.exists():
        raise RunnerError(f"jupyter-book reported success but {index} is missing; see {log}")
    if check:
        check_built_book(index.parent, toc=src / "_toc.yml", shots=out_path / "screenshots")
    return index


def check_built_book(html_dir: Path, *, toc: Path | None = None, shots: Path | None = None) -> None:
    """Open every page in headless Chromium (:mod:`d3m_lib.book_check`); raise on any problem.

    Without Chromium or Playwright it prints why and returns, unless
    ``REQUIRE_CHROMIUM=1``, where that is an error too.
    """
    from .book_check import BrowserMissing, check_book

    print(f"checking every page in headless Chromium (screenshots in {shots}) ...", flush=True)
    try:
        problems = check_book(html_dir, toc=toc, shots=shots)
    except BrowserMissing as exc:
        if os.environ.get("REQUIRE_CHROMIUM") == "1":
            raise RunnerError(f"cannot check the book in a browser: {exc} (REQUIRE_CHROMIUM=1)") from None
        print(f"warning: the book was not checked in a browser: {exc}", flush=True)
        return
    if problems:
        raise RunnerError(f"the book at {html_dir} has {len(problems)} problems in the browser:\n"
                          + "\n".join(f"  {p}" for p in problems))
    print("every page passes the browser check", flush=True)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    try:
        return cfgmod.parse_overrides(items)
    except ConfigError as exc:
        raise RunnerError(str(exc)) from None

