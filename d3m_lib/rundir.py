"""One run = one folder: stage outputs, their manifests, and the stale-artifact guard.

Every notebook writes into ``<run_dir>/<stage>/`` and nowhere else. A stage's
*fingerprint* is a hash of the parameters it consumed and of the fingerprints of
the stages it read. Re-running a stage with other parameters clears its folder
(saying which parameters changed); a later stage that reads an upstream stage
whose fingerprint moved on since it was computed gets a ``StaleArtifactError``
instead of silently reusing old artifacts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

MANIFEST = "manifest.json"


class StaleArtifactError(RuntimeError):
    """An upstream stage changed (or never finished) after this stage read it."""


def fingerprint(params: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """Stable hash of a stage's parameters and of the fingerprints it read."""
    blob = json.dumps({"params": params, "upstream": dict(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Stage:
    """A stage in progress: where to write, and what it read."""

    run: "RunDir"
    name: str
    params: dict
    upstream: dict = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def dir(self) -> Path:
        return self.run.path / self.name

    def path(self, *parts: str) -> Path:
        """A path inside this stage's folder (parents are created)."""
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        """Mark the stage complete; later stages may now read it."""
        manifest = self.run.manifest(self.name) or {}
        manifest.update(complete=True, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                        summary=dict(summary or {}))
        self.run._write_manifest(self.name, manifest)


class RunDir:
    """The folder of one run. ``RunDir(path).begin(stage, params, needs)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    # -- manifests ---------------------------------------------------------
    def manifest(self, name: str) -> dict | None:
        f = self.path / name / MANIFEST
        return json.loads(f.read_text()) if f.exists() else None

    def _write_manifest(self, name: str, manifest: Mapping[str, Any]) -> None:
        f = self.path / name / MANIFEST
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        tmp.replace(f)

    # -- reading upstream --------------------------------------------------
    def require(self, name: str) -> Path:
        """Folder of a finished stage whose own inputs are still current.

        Raises ``StaleArtifactError`` naming the stage when it is missing,
        unfinished, or was computed from an upstream stage that has since been
        re-run with other parameters.
        """
        m = self.manifest(name)
        if m is None:
            raise StaleArtifactError(f"stage '{name}' has not been run in {self.path}; run it first")
        if not m.get("complete"):
            raise StaleArtifactError(f"stage '{name}' in {self.path} did not finish; re-run it")
        for up, fp in m.get("upstream", {}).items():
            um = self.manifest(up)
            if um is None or um.get("fingerprint") != fp or not um.get("complete"):
                raise StaleArtifactError(
                    f"stage '{name}' was computed from an earlier version of stage '{up}' "
                    f"(re-run since, or unfinished); re-run '{name}' and the stages after it")
        return self.path / name

    # -- writing a stage ---------------------------------------------------
    def begin(self, name: str, params: Mapping[str, Any], needs: Iterable[str] = ()) -> Stage:
        """Start (or resume) a stage.

        Same fingerprint as what is on disk: files are kept, so an interrupted
        stage can resume. Other fingerprint: the old folder is cleared, and the
        parameters that changed are printed.
        """
        upstream = {}
        for up in needs:
            self.require(up)
            upstream[up] = self.manifest(up)["fingerprint"]
        params = json.loads(json.dumps(dict(params), default=str))
        fp = fingerprint(params, upstream)
        old = self.manifest(name)
        d = self.path / name
        if old is not None and old.get("fingerprint") != fp:
            changed = sorted(k for k in set(params) | set(old.get("params", {}))
                             if params.get(k) != old.get("params", {}).get(k))
            why = f"parameters changed: {', '.join(changed)}" if changed else "an upstream stage changed"
            print(f"[{name}] clearing outputs of an earlier run ({why})")
            shutil.rmtree(d)
        elif old is None and d.exists() and any(d.iterdir()):
            print(f"[{name}] clearing files without a manifest in {d}")
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        resumed = old is not None and old.get("fingerprint") == fp
        self._write_manifest(name, {
            "stage": name, "fingerprint": fp, "params": params, "upstream": upstream,
            "complete": False, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "resumed": resumed,
        })
        return Stage(self, name, params, upstream, fp)
