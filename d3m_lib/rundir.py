"""One run = one folder. :class:`RunDir` alone knows its layout, its stages and their state.

Layout::

    config.json                 the run's resolved configuration (d3m_lib.config)
    run.json                    the runner's record: plan, times, versions, status
    .lock                       held (flock) by whoever is writing a stage
    executed/NN_name.ipynb      the notebooks as executed for this run
    <stage>/manifest.json       fingerprint, parameters, upstream fingerprints, complete
    <stage>/...                 the stage's artifacts (each stage writes only here)

A stage's *fingerprint* hashes the parameters it reads, the fingerprints of the
stages it reads (so it covers every upstream stage transitively) and the version
of the library code. :meth:`RunDir.require` refuses a stage that is missing,
unfinished, marked stale, or whose upstream chain has moved on since it ran.

Content: :meth:`Stage.finish` records a hash of every file the stage wrote
(``files`` and their digest ``content`` in the manifest; :func:`snapshot_files`),
and stage 01 records its inputs (:meth:`Stage.record_inputs`: the CSV files'
hashes, the image list with sizes and modification times). A stage also records
the ``content`` of each stage it read (``upstream_content``). ``require``,
``status`` and the book refuse a stage whose files, inputs or upstream content
changed since, naming the file; running the stage again recomputes it.

Nothing is destroyed by surprise: a stage asked to run with *parameters* other
than the ones its folder was made with is written into a new run folder (a
*fork*, :func:`open_stage`) that links the unchanged upstream stages, unless
the caller asks to replace it in place, which marks every later stage stale.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import config as cfgmod
from .config import Config, ConfigError

MANIFEST = "manifest.json"
RUN_DEPENDENT = ("seconds", "featurize_s", "ensemble_train_s", "total_s", "resumed")   # columns no artifact keeps
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
LOCK_ENV = "D3M_RUN_LOCK"      # set by the runner for the kernels it starts: they share its lock
INPUTS_FILE = "inputs.parquet"  # stage 01: the image list with sizes and modification times
# Files larger than this are fingerprinted by size and modification time only, not hashed:
# at MIMIC's size the image cache is ~19 GB (377k x 224 x 224 bytes), which SHA-256 reads in
# ~15-50 s on one core; a checkpoint (ResNet-50, ~94 MB) stays below and is hashed.
HASH_LIMIT = 256 * 2 ** 20
_NOT_ARTIFACTS = (MANIFEST, LOCK_FILE)   # files of a stage folder that are not what it computed
# What a stage recomputed because its inputs changed keeps (it checks them itself): the image
# cache re-decodes the rows whose files changed, and only those (image_cache.build_cache).
KEEP_ON_NEW_INPUTS = {"01_cohort": ("image_cache",)}


@dataclass(frozen=True)
class StageSpec:
    name: str
    notebook: str                 # file name in notebooks/
    needs: tuple[str, ...]        # stages it reads

    @property
    def number(self) -> int:
        return int(self.name[:2])


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("01_cohort", "01_cohort.ipynb", ()),
    StageSpec("02_scan", "02_discrepancy_scan.ipynb", ("01_cohort",)),
    StageSpec("03_baseline", "03_baseline.ipynb", ("01_cohort", "02_scan")),
    StageSpec("04_trak", "04_trak.ipynb", ("01_cohort", "02_scan", "03_baseline")),
    StageSpec("05_d3m", "05_d3m.ipynb", ("01_cohort", "02_scan", "03_baseline", "04_trak")),
    StageSpec("06_per_race", "06_per_race.ipynb", ("01_cohort", "05_d3m")),
    StageSpec("07_error_analysis", "07_error_analysis.ipynb", ("01_cohort", "04_trak", "05_d3m")),
)}
assert all(s in cfgmod.__dict__.values() for s in STAGES), "config and rundir disagree on stage names"
# Modules that orchestrate or present, and change no result: not part of the code version.
# presentation only: the runner, the book build and its browser check
_NOT_RESULTS = {"runner.py", "__main__.py", "sphinx_ext.py", "book_check.py"}


class StaleArtifactError(RuntimeError):
    """A stage that is missing, unfinished, or computed from upstream stages that changed since."""


class RunBusyError(RuntimeError):
    """Another process is writing this run folder."""


def stage_spec(name: str) -> StageSpec:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]


def downstream(name: str) -> list[str]:
    """Every stage that reads ``name``, directly or through others."""
    out: list[str] = []
    for s in STAGES.values():
        if name in s.needs or any(u in out for u in s.needs):
            out.append(s.name)
    return out


def code_version() -> str:
    """Hash of the library's source (the modules that compute results)."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for f in sorted(pkg.rglob("*.py")):
        if f.name in _NOT_RESULTS:
            continue
        h.update(str(f.relative_to(pkg)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(params: Mapping[str, Any], upstream: Mapping[str, str], code: str) -> str:
    """Stable hash of a stage's parameters, the fingerprints it read and the code version."""
    blob = json.dumps({"params": params, "upstream": dict(upstream), "code": code},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expected_fingerprints(cfg: Config, code: str | None = None) -> dict[str, str]:
    """The fingerprint every stage will have when computed from ``cfg`` with this code."""
    code = code or code_version()
    fps: dict[str, str] = {}
    for s in STAGES.values():
        fps[s.name] = fingerprint(cfg.for_stage(s.name), {u: fps[u] for u in s.needs}, code)
    return fps


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# -- content fingerprints ------------------------------------------------------------------
def file_sha256(path: Path, chunk: int = 2 ** 20) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """``size``, ``mtime_ns`` and ``sha256`` (``None`` above :data:`HASH_LIMIT`) of one file."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": file_sha256(path) if st.st_size <= HASH_LIMIT else None}


def _artifact_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.name not in _NOT_ARTIFACTS
                  and not f.name.endswith(".tmp"))


def snapshot_files(folder: Path) -> dict[str, dict]:
    """:func:`file_record` of every file under ``folder`` (the manifest aside), by relative path.

    Cost: one read of every file up to :data:`HASH_LIMIT` (SHA-256, about 1 GB/s); larger
    files cost one ``stat``. At demo size well under a second per stage; at MIMIC's size the
    checkpoints dominate (e.g. 3 findings x 3 seeds x 15 epochs of ResNet-50, ~13 GB: ~15 s).
    """
    return {f.relative_to(folder).as_posix(): file_record(f) for f in _artifact_files(folder)}


def content_hash(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One digest of a stage's files: their paths and hashes (size and mtime where not hashed)."""
    blob = json.dumps({k: v.get("sha256") or f"{v['size']}:{v['mtime_ns']}" for k, v in files.items()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_changed(f: Path, rec: Mapping[str, Any], full: bool = False) -> str | None:
    """``"removed"``, ``"changed"`` or ``None`` (as :func:`file_record` recorded it)."""
    try:
        st = f.stat()
    except OSError:
        return "removed"
    same_stat = st.st_size == rec["size"] and st.st_mtime_ns == rec["mtime_ns"]
    if rec.get("sha256") is None:
        ok = same_stat
    elif same_stat and not full:
        ok = True
    else:
        ok = st.st_size == rec["size"] and file_sha256(f) == rec["sha256"]
    return None if ok else "changed"


def changed_files(folder: Path, recorded: Mapping[str, Mapping[str, Any]], full: bool = False) -> list[str]:
    """Files under ``folder`` that differ from ``recorded`` (:func:`snapshot_files`): each named.

    A file whose size and modification time are as recorded is taken as unchanged unless
    ``full`` (then every hashed file is read again); one whose modification time moved is
    hashed again, so a file only touched or copied is not reported.
    """
    out = []
    for rel, rec in recorded.items():
        what = file_changed(folder / rel, rec, full)
        if what:
            out.append(f"{folder / rel} was {what} after the stage wrote it")
    known = set(recorded)
    out += [f"{f} was added after the stage finished" for f in _artifact_files(folder)
            if f.relative_to(folder).as_posix() not in known]
    return out


def image_list_stats(paths) -> "Any":
    """``path``, ``size``, ``mtime_ns`` of each image (size -1 where the file is absent)."""
    import pandas as pd

    sizes, mtimes = [], []
    for p in paths:
        try:
            st = os.stat(p)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns)
        except OSError:
            sizes.append(-1)
            mtimes.append(-1)
    return pd.DataFrame({"path": [str(p) for p in paths], "size": sizes, "mtime_ns": mtimes})


def _frame_hash(df) -> str:
    h = hashlib.sha256()
    for row in df.itertuples(index=False, name=None):
        h.update(("\t".join(map(str, row)) + "\n").encode())
    return h.hexdigest()


def _portable(path: Path, run_path: Path) -> str:
    """Relative to the run folder when inside it (it moves, or is linked into a fork), else absolute."""
    p, root = Path(path).resolve(), Path(run_path).resolve()
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)


def _located(path: str, run_path: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(run_path) / p


# -- the lock -------------------------------------------------------------------------
_HELD: dict[str, int] = {}   # lock file -> fd, for locks this process holds
# Stage 01's image list is stat'ed again at most this often per process (seconds) by the quick
# check of require(); status, the book and a stage that starts always look again.
INPUT_CHECK_TTL = 30.0
_INPUT_CHECKS: dict[tuple, float] = {}


@dataclass
class Lock:
    path: Path
    fd: int | None
    token: str

    def release(self) -> None:
        if self.fd is not None:
            _HELD.pop(str(self.path), None)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def acquire_lock(run_path: Path, what: str) -> Lock:
    """Hold ``<run>/.lock`` (released when this process ends, however it ends).

    A process started by the holder (a notebook kernel of the runner, which
    inherits ``D3M_RUN_LOCK``) shares the holder's lock.
    """
    f = run_path / LOCK_FILE
    key = str(f)
    if key in _HELD:   # this process holds it already (a notebook cell run again)
        return Lock(f, _HELD[key], "")
    run_path.mkdir(parents=True, exist_ok=True)
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = json.loads(f.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            holder = {}
        if holder.get("token") and holder.get("token") == os.environ.get(LOCK_ENV):
            return Lock(f, None, holder["token"])
        raise RunBusyError(
            f"run folder {run_path} is in use by process {holder.get('pid', '?')} "
            f"({holder.get('what', 'unknown')}, since {holder.get('since', '?')}); wait for it to "
            f"finish or use another run folder") from None
    token = f"{os.getpid()}-{time.time_ns()}"
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "what": what, "since": _now(), "token": token}).encode())
    _HELD[key] = fd
    return Lock(f, fd, token)


def lock_is_held(run_path: Path) -> bool:
    """Whether some process holds the run's lock now."""
    f = run_path / LOCK_FILE
    if not f.exists():
        return False
    if str(f) in _HELD:
        return True
    fd = os.open(f, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# -- the folder -------------------------------------------------------------------------
@dataclass
class Stage:
    """A stage in progress: its configuration, where to write, and what it read."""

    run: "RunDir"
    name: str
    cfg: Config
    params: dict
    upstream: dict = field(default_factory=dict)
    fingerprint: str = ""
    lock: Lock | None = None
    inputs: dict | None = None     # stage 01: what it read from outside the run (record_inputs)

    @property
    def dir(self) -> Path:
        return self.run.stage_dir(self.name)

    def path(self, *parts: str) -> Path:
        """A path inside this stage's folder (parents are created)."""
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def policy(self):
        return self.run.policy(self.cfg)

    def model_dir(self, finding: str, seed: int, *more: str) -> Path:
        """This stage's folder for one model (created)."""
        d = self.run.model_dir(self.name, finding, seed, *more)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def save_table(self, df, filename: str) -> Path:
        """Write a table artifact (``.csv`` or ``.parquet``) without its timing columns.

        Artifacts depend only on the configuration, so re-running a stage reproduces them
        byte for byte; how long a step took (``RUN_DEPENDENT``) stays in the result the
        notebook shows and in ``run.json``.
        """
        out = self.path(filename)
        df = df.drop(columns=[c for c in RUN_DEPENDENT if c in df.columns])
        if out.suffix == ".parquet":
            df.to_parquet(out, index=False)
        else:
            df.to_csv(out, index=False)
        return out

    def steps(self, *prefix: str) -> "StepLog":
        """The stage's record of finished steps (in its manifest), under ``prefix``: how a stage resumes."""
        return StepLog(self, "/".join(prefix))

    def config_table(self):
        """The parameters this stage reads, with their values in this run (shown atop each notebook)."""
        return self.cfg.table(list(self.cfg.for_stage(self.name, kind=None)))

    def record_inputs(self, files, image_root: Path, images) -> dict:
        """Record what the stage read from outside the run: ``files`` (hashed) and ``images``.

        ``images``: paths relative to ``image_root``, listed with size and modification
        time in ``<stage>/inputs.parquet`` (one ``stat`` each: at MIMIC's 377k images about
        1-2 s on a local disk, minutes on a slow network file system); their digest and
        each file's hash go into the manifest (``inputs``) at :meth:`finish`.
        :meth:`RunDir.problems` compares them again.
        """
        root = Path(image_root)
        rel = [str(p) for p in images]
        lst = image_list_stats([root / p for p in rel])
        lst["path"] = rel
        lst.to_parquet(self.path(INPUTS_FILE), index=False)
        run_path = self.run.path
        self.inputs = {
            "files": {_portable(f, run_path): file_record(Path(f)) for f in files},
            "images": {"root": _portable(root, run_path), "n": len(lst), "list": INPUTS_FILE,
                       "sha256": _frame_hash(lst)},
        }
        return self.inputs

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        """Mark the stage complete, with a hash of every file it wrote; later stages may now read it."""
        manifest = self.run.manifest(self.name) or {}
        files = snapshot_files(self.dir)
        manifest.update(complete=True, finished_at=_now(), summary=dict(summary or {}),
                        files=files, content=content_hash(files))
        if self.inputs is not None:
            manifest["inputs"] = self.inputs
        self.run._write_manifest(self.name, manifest)
        if self.lock is not None:
            self.lock.release()


@dataclass
class StepLog:
    """Finished steps of a stage, kept in its manifest (``steps``), the run folder's one resume record.

    ``done(key, signature)`` is true when the step was marked with the same signature (for
    example the kept-row hash of a retrained arm) and the files it names still exist; a stage
    re-run with another fingerprint starts from an empty record, since its folder is recomputed.
    """

    stage: Stage
    prefix: str = ""

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def done(self, key: str, signature: Any = None, files: tuple[Path, ...] = ()) -> bool:
        m = self.stage.run.manifest(self.stage.name) or {}
        rec = m.get("steps", {}).get(self._key(key))
        sig = json.loads(json.dumps(signature, default=str))
        return rec is not None and rec == {"signature": sig} and all(Path(f).exists() for f in files)

    def mark(self, key: str, signature: Any = None) -> None:
        m = self.stage.run.manifest(self.stage.name) or {}
        m.setdefault("steps", {})[self._key(key)] = {"signature": json.loads(json.dumps(signature, default=str))}
        self.stage.run._write_manifest(self.stage.name, m)

    def forget(self, key: str) -> None:
        m = self.stage.run.manifest(self.stage.name) or {}
        if m.get("steps", {}).pop(self._key(key), None) is not None:
            self.stage.run._write_manifest(self.stage.name, m)


class RunDir:
    """The folder of one run and everything known about its layout."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    # -- layout ---------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        return self.path / stage_spec(name).name

    def executed(self, name: str) -> Path:
        return self.path / "executed" / stage_spec(name).notebook

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    # -- configuration ------------------------------------------------------------------
    def config(self) -> Config | None:
        f = self.config_file
        if not f.exists():
            return None
        try:
            return cfgmod.resolve(json.loads(f.read_text()))
        except (json.JSONDecodeError, ConfigError) as exc:
            raise ConfigError(f"{f}: {exc}") from None

    def write_config(self, cfg: Config) -> None:
        _write_json(self.config_file, cfg.to_dict())

    # -- manifests ----------------------------------------------------------------------
    def manifest(self, name: str) -> dict | None:
        f = self.stage_dir(name) / MANIFEST
        return json.loads(f.read_text()) if f.exists() else None

    def _write_manifest(self, name: str, manifest: Mapping[str, Any]) -> None:
        _write_json(self.stage_dir(name) / MANIFEST, manifest)

    def changed_files(self, name: str, full: bool = False) -> list[str]:
        """Files of a finished stage that differ from the hashes its manifest recorded, each named."""
        m = self.manifest(name) or {}
        if "files" not in m:      # made before content fingerprints: nothing to compare
            return []
        return changed_files(self.stage_dir(name), m["files"], full=full)

    def changed_inputs(self, name: str, full: bool = False) -> list[str]:
        """What changed in the inputs a stage recorded (stage 01: CSV files and images), each named."""
        rec = (self.manifest(name) or {}).get("inputs")
        if not rec:
            return []
        out = []
        for f, r in rec.get("files", {}).items():
            what = file_changed(_located(f, self.path), r, full)
            if what:
                out.append(f"input {_located(f, self.path)} was {what} since stage {name} read it")
        img = rec.get("images")
        if img:
            key = (str(self.path), name, img["sha256"])
            if full or _INPUT_CHECKS.get(key, 0.0) < time.monotonic() - INPUT_CHECK_TTL:
                root = _located(img["root"], self.path)
                lst_file = self.stage_dir(name) / img["list"]
                try:
                    import pandas as pd
                    old = pd.read_parquet(lst_file)
                except (OSError, ValueError) as exc:
                    return out + [f"{lst_file} cannot be read ({exc})"]
                now = image_list_stats([root / p for p in old["path"]])
                now["path"] = old["path"].to_numpy()
                if _frame_hash(now) != img["sha256"]:
                    diff = (now["size"].to_numpy() != old["size"].to_numpy()) | \
                           (now["mtime_ns"].to_numpy() != old["mtime_ns"].to_numpy())
                    where = [f"{root / p} ({'removed' if sz < 0 else 'changed'})" for p, sz in
                             zip(now["path"][diff], now["size"][diff])]
                    out.append(f"{int(diff.sum()):,} input image(s) changed since stage {name} read them: "
                               + ", ".join(where[:3]) + (", ..." if len(where) > 3 else ""))
                    _INPUT_CHECKS.pop(key, None)
                else:
                    _INPUT_CHECKS[key] = time.monotonic()
        return out

    def problems(self, name: str, full: bool = False, _seen: dict | None = None) -> list[str]:
        """Why ``name`` may not be read (empty when it may): missing, unfinished, stale, changed.

        Changed: a file the stage wrote, an input it read (stage 01) or the content of a stage it
        read is not what it was. ``full`` reads every hashed file again (the book and ``status``);
        otherwise a file with its recorded size and modification time is taken as unchanged.
        """
        seen = {} if _seen is None else _seen
        if name in seen:
            return seen[name]
        m = self.manifest(name)
        if m is None:
            out = [f"stage {name} has not been run in {self.path}"]
        elif not m.get("complete"):
            out = [f"stage {name} in {self.path} did not finish"]
        elif m.get("stale"):
            out = [f"stage {name} is stale: {m['stale']}"]
        else:
            out = [f"stage {name}: {c}" for c in self.changed_files(name, full)]
            out += [f"stage {name}: {c}" for c in self.changed_inputs(name, full)]
            for up, fp in m.get("upstream", {}).items():
                um = self.manifest(up)
                if um is None or um.get("fingerprint") != fp:
                    out.append(f"stage {name} was computed from an earlier version of stage {up} "
                               f"(re-run since, or removed)")
                elif "upstream_content" in m and m["upstream_content"].get(up) != um.get("content"):
                    out.append(f"stage {name} was computed from other files of stage {up} "
                               f"(re-run or changed since)")
                else:   # the upstream stages' own problems, each said once (not once per path to it)
                    out += [p.split(" (read by ")[0] + f" (read by {name}, directly or through others)"
                            for p in self.problems(up, full, seen)]
        out = list({p.split(" (read by ")[0]: p for p in reversed(out)}.values())[::-1]
        seen[name] = out
        return out

    def require(self, name: str) -> Path:
        """Folder of a finished stage whose whole upstream chain is still current."""
        probs = self.problems(name)
        if probs:
            raise StaleArtifactError("; ".join(dict.fromkeys(probs))
                                     + f". Re-run {name} (and the stages after it).")
        return self.stage_dir(name)

    def state(self, name: str, expected: str | None = None, full: bool = False,
              _seen: dict | None = None) -> str:
        """``missing``, ``incomplete``, ``stale``, ``outdated`` (fingerprint differs) or ``current``.

        ``stale`` covers a stage whose files, inputs or upstream stages changed (:meth:`problems`).
        """
        m = self.manifest(name)
        if m is None:
            return "missing"
        if not m.get("complete"):
            return "incomplete"
        if self.problems(name, full, _seen):
            return "stale"
        if expected is not None and m.get("fingerprint") != expected:
            return "outdated"
        return "current"

    def why_outdated(self, name: str, cfg: Config) -> str:
        """What differs between a stage on disk and ``cfg`` with the current code."""
        m = self.manifest(name) or {}
        now = cfg.for_stage(name)
        changed = sorted(k for k in set(now) | set(m.get("params", {}))
                         if now.get(k) != m.get("params", {}).get(k))
        if changed:
            return "parameters changed: " + ", ".join(
                f"{k} {m.get('params', {}).get(k)!r} -> {now.get(k)!r}" for k in changed)
        if m.get("code") != code_version():
            return "the library code changed since it ran"
        return "an upstream stage changed"

    def mark_stale(self, name: str, why: str) -> list[str]:
        """Mark every later stage present in this folder stale; return their names."""
        marked = []
        for d in downstream(name):
            m = self.manifest(d)
            if m is not None and not m.get("stale"):
                m["stale"] = why
                self._write_manifest(d, m)
                marked.append(d)
        return marked

    # -- what the stages hand each other -------------------------------------------------
    def cohort(self, columns: list[str] | None = None):
        """Stage 01's cohort table (checked current)."""
        import pandas as pd

        return pd.read_parquet(self.require("01_cohort") / "cohort.parquet", columns=columns)

    def images(self, rows=None):
        """Stage 01's image cache (a read-only ``N x px x px`` uint8 memmap), indexed by the cohort's ``row``.

        ``rows``: the cohort's ``row`` column, checked to lie in the cache and to be readable images.
        """
        from .image_cache import open_cache

        m = self.manifest("01_cohort") or {}
        return open_cache(self.require("01_cohort") / "image_cache", m.get("params", {}).get("image_size"),
                          rows=rows)

    def findings(self) -> list[str]:
        """The findings stage 02 chose."""
        return json.loads((self.require("02_scan") / "chosen_findings.json").read_text())

    def model_dir(self, stage: str, finding: str, seed: int, *more: str) -> Path:
        """``<stage>/<finding>/[<more>/]seed<seed>``: where a stage keeps one model's files."""
        return self.stage_dir(stage).joinpath(finding.replace(" ", "_"), *more, f"seed{seed}")

    # -- privacy --------------------------------------------------------------------------
    def policy(self, cfg: Config | None = None):
        """What this run may show, from the data stage 01 actually read; closed when unknown."""
        from .privacy import Policy

        cfg = cfg or self.config() or cfgmod.resolve({})
        facts = ((self.manifest("01_cohort") or {}).get("summary") or {}).get("data")
        if not facts:   # stage 01 has not said what it read: assume credentialed data
            return Policy(True, cfg.publish_identifiers, cfg.publish_images)
        return Policy.from_params(facts["dataset"], facts["synthetic"], cfg.credentialed,
                                  cfg.publish_identifiers, cfg.publish_images)

    # -- writing a stage -------------------------------------------------------------------
    def begin(self, name: str, cfg: Config, lock: Lock | None = None) -> Stage:
        """Start or resume stage ``name`` under ``cfg`` in this folder.

        Same fingerprint as on disk: files are kept (an interrupted stage resumes).
        Another fingerprint because the code or an upstream stage changed: the stage's
        own folder is recomputed. Other *parameters* never reach here (see
        :func:`open_stage`), so a parameter change never clears a stage.
        """
        spec = stage_spec(name)
        upstream, upstream_content = {}, {}
        for up in spec.needs:
            self.require(up)
            um = self.manifest(up)
            upstream[up] = um["fingerprint"]
            upstream_content[up] = um.get("content")
        params = json.loads(json.dumps(cfg.for_stage(name)))
        code = code_version()
        fp = fingerprint(params, upstream, code)
        old = self.manifest(name)
        d = self.stage_dir(name)
        if old is not None and old.get("fingerprint") != fp:
            if old.get("params") != params:
                raise ConfigError(f"stage {name} in {self.path} was made with other parameters "
                                  f"({self.why_outdated(name, cfg)}); refusing to overwrite it")
            print(f"[{name}] recomputing in {d}: "
                  + ("the library code changed since it ran" if old.get("code") != code
                     else "an upstream stage changed since it ran"))
            shutil.rmtree(d)
        elif old is not None and old.get("upstream_content", upstream_content) != upstream_content:
            print(f"[{name}] recomputing in {d}: the files of an upstream stage changed since it ran")
            shutil.rmtree(d)
        elif old is not None and old.get("complete") and any(
                changed := (self.changed_files(name), self.changed_inputs(name, full=True))):
            own, inputs = changed
            print(f"[{name}] recomputing in {d}: " + "; ".join((own + inputs)[:3]))
            keep = {} if own else {k for k in KEEP_ON_NEW_INPUTS.get(name, ()) if (d / k).exists()}
            for child in list(d.iterdir()):
                if child.name not in keep:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            old = None
        elif old is None and d.exists() and any(d.iterdir()):
            raise ConfigError(f"{d} holds files but no {MANIFEST}: not made by this library, or copied "
                              f"by hand; move them away before running stage {name} here")
        d.mkdir(parents=True, exist_ok=True)
        _own_files(d)
        resumed = old is not None and old.get("fingerprint") == fp and d.exists()
        self._write_manifest(name, {
            "stage": name, "fingerprint": fp, "params": params, "upstream": upstream,
            "upstream_content": upstream_content, "code": code,
            "complete": False, "started_at": _now(), "resumed": resumed,
            "steps": (old or {}).get("steps", {}) if resumed else {},
        })
        return Stage(self, name, cfg, params, upstream, fp, lock)

    def adopt(self, name: str, source: "RunDir") -> None:
        """Take a finished stage of another run by hard links (copies across file systems)."""
        src, dst = source.stage_dir(name), self.stage_dir(name)
        if dst.exists():
            shutil.rmtree(dst)

        def link(s, d):
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)

        shutil.copytree(src, dst, copy_function=link)
        # the manifest is this run's own file (not a link): it says where the stage came from; every
        # path in it is relative to the run folder (or outside both runs), never the source's own
        m = json.loads((src / MANIFEST).read_text())
        m["linked_from"] = {"run": str(source.path), "at": _now()}
        (dst / MANIFEST).unlink()
        _write_json(dst / MANIFEST, m)
        ex = source.executed(name)
        if ex.exists():
            self.executed(name).parent.mkdir(parents=True, exist_ok=True)
            if self.executed(name).exists():
                self.executed(name).unlink()
            link(ex, self.executed(name))


def _own_files(folder: Path) -> None:
    """Give this folder its own copy of files it shares by hard link with another run.

    A stage taken from another run (:meth:`RunDir.adopt`) shares its files; a stage
    that resumes here may rewrite them in place, which must never reach the other run.
    """
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink() and f.stat().st_nlink > 1:
            tmp = f.with_name(f.name + ".own")
            shutil.copy2(f, tmp)
            os.replace(tmp, f)


def fork_name(run_path: Path, changed: Mapping[str, Any]) -> Path:
    """A sibling folder named after the changed parameters: ``runs/demo+d3m_beta=2.0``."""
    slug = ",".join(f"{k}={v}" for k, v in sorted(changed.items()))
    slug = re.sub(r"[^A-Za-z0-9._=,-]+", "_", slug)
    if len(slug) > 60:
        slug = slug[:40] + "-" + hashlib.sha256(slug.encode()).hexdigest()[:8]
    return run_path.with_name(f"{run_path.name}+{slug}")


def parameters_of(name: str) -> list[str]:
    """The parameters a stage's notebook lists: those it owns, and the view parameters it reads."""
    return [p.name for p in cfgmod.PARAMS if p.owner == name or (p.kind == "view" and name in p.stages)]


def open_stage(name: str, run_dir: str | Path, overrides: Mapping[str, Any] | None = None,
               replace: bool = False, namespace: Mapping[str, Any] | None = None) -> Stage:
    """What a notebook calls first: the run's configuration plus its overrides, checked.

    A notebook passes its ``namespace`` (``globals()``): the names its parameters
    cell lists (:func:`parameters_of`) are its overrides, and ``None`` means "as this
    run was configured". ``overrides`` gives them explicitly. Overrides are checked
    before anything is written. When they change
    the stage's parameters, the stage goes into a new run folder beside this one
    (printed), which links every upstream stage, unless ``replace`` is true: then
    the stage is overwritten in place and every later stage is marked stale.
    """
    spec = stage_spec(name)
    run = RunDir(run_dir)
    listed = set(parameters_of(name))
    given = {k: v for k, v in (namespace or {}).items() if k in listed and v is not None}
    given.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfgmod.check_names(given, where=f"notebook {spec.notebook}")
    allowed = {p.name for p in cfgmod.PARAMS if name in p.stages}
    foreign = sorted(set(given) - allowed)
    if foreign:
        raise ConfigError(f"stage {name} does not read {', '.join(foreign)}: set them for the whole run "
                          f"(python -m d3m_lib run ... -p NAME=VALUE)")
    base_cfg = run.config()
    if base_cfg is None:
        if run.path.exists() and any(run.stage_dir(s).exists() for s in STAGES):
            raise ConfigError(f"{run.path} has stage folders but no {CONFIG_FILE}: it was made by an "
                              f"older version of d3m_lib; run it again into a new folder")
        base_cfg = cfgmod.resolve({})
    cfg = base_cfg.with_overrides(given, base=Path.cwd())
    changed = {k: v for k, (old, v) in cfg.diff(base_cfg).items() if cfgmod.BY_NAME[k].kind == "stage"}
    earlier = {k: [s for s in cfgmod.BY_NAME[k].stages if STAGES[s].number < spec.number
                   and run.manifest(s) is not None] for k in changed}
    earlier = {k: v for k, v in earlier.items() if v}
    if earlier:
        raise ConfigError("; ".join(f"{k} also shapes {', '.join(v)}, already computed in {run.path}"
                                    for k, v in earlier.items())
                          + f": change it for the whole run instead (python -m d3m_lib run ... "
                            f"--run-dir NEW -p NAME=VALUE)")
    target = run
    if changed and run.manifest(name) is not None and not replace:
        target = RunDir(fork_name(run.path, changed))
        print(f"[{name}] {run.path.name} was configured with "
              + ", ".join(f"{k}={base_cfg[k]!r}" for k in changed)
              + f"; writing this stage to {target.path} instead (the original is kept)")
    lock = acquire_lock(target.path, f"stage {name}")
    try:
        if target is not run:
            existing = target.config()
            if existing is not None and existing.diff(cfg):
                raise ConfigError(f"{target.path} exists with another configuration; "
                                  f"pass a different run_dir")
            for up in _all_upstream(name):
                if target.manifest(up) is None or target.problems(up):
                    run.require(up)
                    target.adopt(up, run)
            print(f"[{name}] linked {', '.join(_all_upstream(name)) or 'nothing'} from {run.path}")
        elif changed and replace:
            marked = target.mark_stale(name, f"{name} was replaced with " + ", ".join(
                f"{k}={v!r}" for k, v in changed.items()))
            old = target.stage_dir(name)
            if old.exists():
                shutil.rmtree(old)
            print(f"[{name}] replacing this stage in place (replace=True)"
                  + (f"; marked stale: {', '.join(marked)}" if marked else ""))
        if target is not run or replace or run.config() is None:
            target.write_config(cfg.with_overrides({k: base_cfg[k] for k in cfg.diff(base_cfg)
                                                    if cfgmod.BY_NAME[k].kind == "view"}))
        stage = target.begin(name, cfg, lock)
    except BaseException:
        lock.release()
        raise
    return stage


def _all_upstream(name: str) -> list[str]:
    out: list[str] = []

    def walk(n):
        for u in STAGES[n].needs:
            walk(u)
            if u not in out:
                out.append(u)
    walk(name)
    return [s for s in STAGES if s in out]
