"""Run the numbered notebooks with papermill, and build the book from what they executed.

``run`` executes ``notebooks/NN_*.ipynb`` in order into ``<run_dir>/executed/``,
handing each notebook only the parameters its ``parameters`` cell declares
(plus ``run_dir``), and records ``<run_dir>/run.json``. ``build_book`` copies
the executed notebooks and the book pages into ``<run_dir>/book_src`` and runs
``jupyter-book build`` with warnings as errors.

Relative paths in parameters whose name ends in ``_dir``, ``_path`` or
``_file`` (and ``pretrained``) are resolved against the directory the runner is
started from, because the notebooks execute with their own folder as working
directory.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_RE = re.compile(r"^(\d{2})_([A-Za-z0-9_]+)\.ipynb$")
KERNEL = "python3"
ASSIGN_RE = re.compile(r"^([A-Za-z_]\w*)\s*(?::[^=]*)?=(?!=)", re.M)
PATH_KEY_RE = re.compile(r"(_dir|_path|_file)$|^pretrained$")
BOOK_FILES = ("_config.yml", "_toc.yml")
BOOK_DIRS = ("book",)


class RunnerError(RuntimeError):
    """A problem the user can fix: bad parameters, a failed notebook, a missing file."""


@dataclass(frozen=True)
class Notebook:
    """One numbered notebook and the parameter names its ``parameters`` cell declares."""

    number: int
    path: Path
    declared: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem


# -- notebooks and parameters ------------------------------------------------
def default_notebooks_dir() -> Path:
    """``$D3M_NOTEBOOKS`` if set, else the repository's ``notebooks/``."""
    return Path(os.environ.get("D3M_NOTEBOOKS", REPO_ROOT / "notebooks"))


def discover(notebooks_dir: str | Path) -> list[Notebook]:
    """The ``NN_name.ipynb`` notebooks of a folder, in number order, with their declared parameters."""
    import nbformat
    import papermill

    nb_dir = Path(notebooks_dir)
    if not nb_dir.is_dir():
        raise RunnerError(f"notebooks folder {nb_dir} does not exist")
    found: dict[int, Path] = {}
    for p in sorted(nb_dir.glob("*.ipynb")):
        m = NOTEBOOK_RE.match(p.name)
        if not m:
            continue
        n = int(m.group(1))
        if n in found:
            raise RunnerError(f"two notebooks share number {n:02d}: {found[n].name} and {p.name}")
        found[n] = p
    if not found:
        raise RunnerError(f"no notebooks named NN_name.ipynb in {nb_dir}")
    out = []
    for n, p in sorted(found.items()):
        nb = nbformat.read(p, as_version=4)
        if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
            raise RunnerError(f"{p.name} has no cell tagged 'parameters'; papermill needs one")
        inspected = papermill.inspect_notebook(str(p))
        cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
        lost = [m.group(1) for m in ASSIGN_RE.finditer(cell.source) if m.group(1) not in inspected]
        if lost:
            raise RunnerError(f"{p.name}: papermill cannot read the parameter line(s) for "
                              f"{', '.join(lost)} (a comment containing '=' is a common cause); "
                              f"rewrite them as `name = value  # comment`")
        if "run_dir" not in inspected:
            raise RunnerError(f"{p.name} does not declare run_dir in its parameters cell")
        defaults = {}
        for k, v in inspected.items():
            try:
                defaults[k] = ast.literal_eval(v["default"])
            except (ValueError, SyntaxError, TypeError):
                pass  # not a literal (an expression): no default known to the runner
        out.append(Notebook(n, p, tuple(inspected), defaults))
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["seeds=[0, 1]", "lr=0.1"]`` -> ``{"seeds": [0, 1], "lr": 0.1}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise RunnerError(f"-p expects name=value, got {item!r}")
        try:
            out[name] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise RunnerError(f"-p {name}: value {value!r} is not valid YAML ({exc})") from exc
    return out


def load_params(params_file: str | Path | None, overrides: Mapping[str, Any] = ()) -> dict[str, Any]:
    """Parameters of a YAML file (a flat mapping), then ``overrides`` on top."""
    params: dict[str, Any] = {}
    if params_file is not None:
        f = Path(params_file)
        if not f.is_file():
            raise RunnerError(f"parameter file {f} does not exist")
        try:
            loaded = yaml.safe_load(f.read_text())
        except yaml.YAMLError as exc:
            raise RunnerError(f"parameter file {f} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RunnerError(f"parameter file {f} must hold a mapping of name: value")
        bad = [k for k in loaded if not isinstance(k, str)]
        if bad:
            raise RunnerError(f"parameter file {f}: names must be strings, got {bad}")
        params.update(loaded)
    params.update(dict(overrides))
    return params


def check_known(params: Mapping[str, Any], notebooks: Iterable[Notebook]) -> None:
    """Refuse parameter names that no notebook declares, suggesting close matches."""
    declared = sorted({k for nb in notebooks for k in nb.declared})
    unknown = [k for k in params if k not in declared]
    if not unknown:
        return
    lines = []
    for k in unknown:
        close = difflib.get_close_matches(k, declared, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        lines.append(f"  {k}{hint}")
    raise RunnerError("parameters that no notebook declares:\n" + "\n".join(lines)
                      + f"\nnotebooks declare: {', '.join(declared)}")


def resolve_paths(params: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """Make relative path parameters (``*_dir``, ``*_path``, ``*_file``, ``pretrained``) absolute."""
    out = dict(params)
    for k, v in params.items():
        if PATH_KEY_RE.search(k) and isinstance(v, str) and v and not os.path.isabs(v):
            out[k] = str((base / v).resolve())
    return out


def select(notebooks: Sequence[Notebook], first: int | None, last: int | None) -> list[Notebook]:
    """Notebooks numbered ``first..last`` (inclusive; ``None`` = open end)."""
    lo = first if first is not None else -1
    hi = last if last is not None else 100
    chosen = [nb for nb in notebooks if lo <= nb.number <= hi]
    if not chosen:
        have = ", ".join(f"{nb.number:02d}" for nb in notebooks)
        raise RunnerError(f"no notebook numbered in --from {first} --to {last}; have {have}")
    return chosen


# -- provenance ----------------------------------------------------------------
def code_version(root: Path = REPO_ROOT) -> dict[str, Any] | str:
    """Git commit and dirty flag of the code, or ``"unknown"`` outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return {"commit": commit, "dirty": bool(status.strip())}


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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def report_param_changes(run_json: Path, params: Mapping[str, Any]) -> list[str]:
    """Print (and return) parameter names whose value differs from the previous run.json."""
    if not run_json.exists():
        return []
    try:
        old = json.loads(run_json.read_text()).get("params", {})
    except (json.JSONDecodeError, AttributeError):
        print(f"note: previous {run_json} is unreadable; ignoring it")
        return []
    new = json.loads(json.dumps(dict(params), default=str))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        print(f"parameters differ from the previous run in {run_json.parent}:")
        for k in changed:
            print(f"  {k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}")
        print("stages whose inputs changed will clear and recompute their outputs")
    return changed


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


# -- privacy -------------------------------------------------------------------
POLICY_KEYS = ("dataset", "synthetic", "credentialed", "publish_identifiers", "publish_images")


def effective(params: Mapping[str, Any], notebooks: Sequence[Notebook], key: str) -> Any:
    """A parameter's value in this run: given, else the first declaring notebook's default."""
    if key in params:
        return params[key]
    for nb in notebooks:
        if key in nb.defaults:
            return nb.defaults[key]
    return None


def privacy_scan(run_path: Path, params: Mapping[str, Any], notebooks: Sequence[Notebook]) -> dict:
    """Scan a credentialed run's executed notebooks for identifiers and patient images.

    Raises ``RunnerError`` listing what was found. Runs whose notebooks declare
    no ``dataset`` parameter (not the study's notebooks) are not scanned, and
    the returned record says so.
    """
    from .privacy import Policy, scan_notebook_outputs

    if not any("dataset" in nb.declared for nb in notebooks):
        return {"scanned": False, "reason": "no notebook declares 'dataset'"}
    given = {k: effective(params, notebooks, k) for k in POLICY_KEYS}
    kwargs = {k: v for k, v in given.items() if v is not None}
    try:
        policy = Policy.from_params(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RunnerError(f"privacy parameters: {exc}") from exc
    if not policy.credentialed:
        return {"scanned": False, "credentialed": False}
    if policy.publish_identifiers and policy.publish_images:
        return {"scanned": False, "credentialed": True,
                "reason": "publish_identifiers and publish_images are both true"}
    cohort = run_path / "01_cohort" / "cohort.parquet"
    if not cohort.exists():
        raise RunnerError(f"credentialed run: cannot scan the notebooks without {cohort}")
    found = scan_notebook_outputs(run_path / "executed", cohort,
                                  allow_ids=policy.publish_identifiers,
                                  allow_images=policy.publish_images)
    if found:
        shown = "\n".join(f"  {f}" for f in found[:20])
        more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
        raise RunnerError(f"credentialed run: executed notebooks show what this run may not "
                          f"publish ({len(found)} found):\n{shown}{more}")
    return {"scanned": True, "credentialed": True, "findings": 0}


# -- running -------------------------------------------------------------------
def _exception_flag(executed: Path) -> bool:
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    return bool(nb.metadata.get("papermill", {}).get("exception"))


def _kernel_env() -> dict[str, str]:
    """Environment for the kernels: this d3m_lib first on PYTHONPATH (absolute paths only,
    since kernels start in the notebooks' folder)."""
    env = dict(os.environ)
    parts = [str(REPO_ROOT)] + [str(Path(p).resolve()) for p in
                                env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


def _execute(chosen: Sequence[Notebook], params: Mapping[str, Any], run_path: Path,
             record: dict, progress: bool) -> None:
    """Run the notebooks in order, updating run.json; raise ``RunnerError`` at the first failure."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    run_json = run_path / "run.json"
    for nb in chosen:
        out = run_path / "executed" / nb.path.name
        nb_params = {k: v for k, v in params.items() if k in nb.declared}
        entry = {"notebook": nb.name, "params": sorted(nb_params), "started_at": _now(),
                 "status": "running"}
        record["notebooks"].append(entry)
        _write_json(run_json, record)
        print(f"[{nb.name}] running ...", flush=True)
        t0 = time.perf_counter()
        failure = None
        try:
            papermill.execute_notebook(str(nb.path), str(out), parameters=nb_params,
                                       kernel_name=KERNEL, cwd=str(nb.path.parent),
                                       progress_bar=progress)
        except PapermillExecutionError as exc:
            first_line = next((ln for ln in str(exc.source).splitlines() if ln.strip()), "")
            failure = (f"notebook {nb.name} failed in cell In [{exc.exec_count}] "
                       f"(cell index {exc.cell_index}, starting {first_line.strip()[:80]!r}): "
                       f"{exc.ename}: {exc.evalue}")
        except Exception as exc:  # kernel death, timeout, unreadable notebook ...
            failure = f"notebook {nb.name} could not be executed: {type(exc).__name__}: {exc}"
        if failure is None and (not out.exists() or _exception_flag(out)):
            failure = f"notebook {nb.name} recorded an exception (papermill.exception is set)"
        seconds = round(time.perf_counter() - t0, 2)
        entry.update(finished_at=_now(), seconds=seconds,
                     status="failed" if failure else "complete")
        if failure:
            entry["error"] = failure
            record.update(status="failed", finished_at=_now())
            _write_json(run_json, record)
            raise RunnerError(f"{failure}\n  executed copy with the traceback: {out}\n"
                              f"  later notebooks were not run")
        _write_json(run_json, record)
        print(f"[{nb.name}] done in {seconds:.1f} s", flush=True)


def run(params_file: str | Path | None, *, run_dir: str | Path | None = None,
        overrides: Mapping[str, Any] = (), first: int | None = None, last: int | None = None,
        notebooks_dir: str | Path | None = None, progress: bool = False) -> Path:
    """Execute the selected notebooks in order; return the run folder.

    Raises ``RunnerError`` before anything runs when a parameter is declared by
    no notebook, and stops at the first failing notebook with a message naming
    it, the cell and the exception.
    """
    base = Path.cwd()
    params = load_params(params_file, overrides)
    yaml_run_dir = params.pop("run_dir", None)
    if run_dir is None:
        run_dir = yaml_run_dir
    if run_dir is None:
        if params_file is None:
            raise RunnerError("give a parameter file or --run-dir")
        run_dir = Path("runs") / Path(params_file).stem
    run_path = (base / run_dir).resolve()

    notebooks = discover(notebooks_dir or default_notebooks_dir())
    check_known(params, notebooks)
    chosen = select(notebooks, first, last)
    kernel_python = check_kernel()
    params = resolve_paths(params, base)
    params["run_dir"] = str(run_path)

    run_path.mkdir(parents=True, exist_ok=True)
    (run_path / "executed").mkdir(exist_ok=True)
    run_json = run_path / "run.json"
    report_param_changes(run_json, params)
    record: dict[str, Any] = {
        "params_file": str(Path(params_file).resolve()) if params_file else None,
        "params": params,
        "selected": [nb.name for nb in chosen],
        "code_version": code_version(),
        "versions": package_versions(),
        "kernel_python": kernel_python,
        "host": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                 "machine": platform.machine()},
        "started_at": _now(),
        "status": "running",
        "notebooks": [],
    }
    _write_json(run_json, record)

    saved_env = dict(os.environ)
    os.environ.update(_kernel_env())  # papermill's kernels inherit this environment
    try:
        _execute(chosen, params, run_path, record, progress)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)

    try:
        record["privacy"] = privacy_scan(run_path, params, notebooks)
    except RunnerError as exc:
        record.update(status="failed", finished_at=_now(), privacy={"error": str(exc)})
        _write_json(run_json, record)
        raise
    record.update(status="complete", finished_at=_now())
    _write_json(run_json, record)
    return run_path


# -- book ------------------------------------------------------------------------
def assemble_book(run_dir: str | Path, *, notebooks_dir: str | Path | None = None,
                  book_root: str | Path = REPO_ROOT) -> Path:
    """Copy the book pages and the executed notebooks into ``<run_dir>/book_src``.

    Refuses when a numbered notebook was not executed into this run, or was
    executed with an exception.
    """
    run_path = Path(run_dir).resolve()
    root = Path(book_root)
    notebooks = discover(notebooks_dir or default_notebooks_dir())
    executed = run_path / "executed"
    problems = []
    for nb in notebooks:
        ex = executed / nb.path.name
        if not ex.exists():
            problems.append(f"  {nb.name}: not executed in this run ({ex} missing)")
        elif _exception_flag(ex):
            problems.append(f"  {nb.name}: executed with an exception (see {ex})")
    if problems:
        raise RunnerError(f"cannot build the book from {run_path}:\n" + "\n".join(problems))
    run_json = run_path / "run.json"
    params = json.loads(run_json.read_text()).get("params", {}) if run_json.exists() else {}
    privacy_scan(run_path, params, notebooks)  # the notebooks may have been re-run since

    src = run_path / "book_src"
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
    for nb in notebooks:
        shutil.copy2(executed / nb.path.name, src / "notebooks" / nb.path.name)
    return src


def build_book(run_dir: str | Path, *, out: str | Path | None = None,
               notebooks_dir: str | Path | None = None, book_root: str | Path = REPO_ROOT) -> Path:
    """Build the Jupyter Book of a run with warnings as errors; return the path of index.html.

    The HTML lands in ``<out>/_build/html`` (``out`` defaults to ``<run_dir>/book``).
    """
    run_path = Path(run_dir).resolve()
    src = assemble_book(run_path, notebooks_dir=notebooks_dir, book_root=book_root)
    out_path = Path(out).resolve() if out else run_path / "book"
    cmd = [sys.executable, "-c",
           "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(src), "--path-output", str(out_path), "--all",
           "--warningiserror", "--nitpick", "--keep-going"]
    print(f"building the book: jupyter-book build {src} --path-output {out_path} "
          f"--all --warningiserror --nitpick --keep-going", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
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
    return index
