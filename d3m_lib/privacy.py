"""What a run may publish, redaction of identifiers, and a scanner of executed notebooks.

MIMIC-CXR and MIMIC-IV are credentialed data (PhysioNet data use agreement):
patient, study and image identifiers and the images themselves must not leave
the credentialed environment. A credentialed run's notebooks therefore show
aggregate numbers only, unless the run's parameters explicitly allow
identifiers (``publish_identifiers``) or images (``publish_images``), e.g. for
a private report inside the credentialed environment.

:func:`scan_notebook_outputs` checks the executed notebooks of a run after the
fact: it looks for every subject, study and image id of the cohort table in
every output (text, HTML, Markdown, JSON, glued values, widget state, markdown
cells) and, when images are not allowed, for outputs that look like patient
images (grayscale photographs rather than charts, see :func:`looks_like_xray`).
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ID_COLUMNS = ("image_id", "subject_id", "study_id", "path", "dicom_id", "hadm_id")
# Identifiers shorter than this are not searched for (they would match ordinary numbers);
# MIMIC's subject and study ids have 8 digits and its dicom ids 44 characters.
MIN_ID_LENGTH = 6
_TOKEN_PATTERNS = (re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*"), re.compile(r"[A-Za-z0-9]+"),
                   re.compile(r"\d+"))


@dataclass(frozen=True)
class Policy:
    """What a run may show: identifiers, images. Build with :meth:`from_params`."""

    credentialed: bool
    publish_identifiers: bool = False
    publish_images: bool = False

    @classmethod
    def from_params(cls, dataset: str, synthetic: bool, credentialed: bool | str = "auto",
                    publish_identifiers: bool = False, publish_images: bool = False) -> "Policy":
        """``credentialed="auto"``: True for real MIMIC (``dataset == "mimic"`` and not synthetic)."""
        if dataset not in ("mimic", "nih"):
            raise ValueError(f"parameter 'dataset' must be 'mimic' or 'nih', got {dataset!r}")
        if credentialed == "auto":
            cred = dataset == "mimic" and not bool(synthetic)
        elif isinstance(credentialed, bool):
            cred = credentialed
        else:
            raise ValueError(f"parameter 'credentialed' must be true, false or 'auto', got {credentialed!r}")
        for name, v in (("publish_identifiers", publish_identifiers), ("publish_images", publish_images)):
            if not isinstance(v, bool):
                raise ValueError(f"parameter '{name}' must be true or false, got {v!r}")
        return cls(cred, publish_identifiers, publish_images)

    def may_show_ids(self) -> bool:
        return not self.credentialed or self.publish_identifiers

    def may_show_images(self) -> bool:
        return not self.credentialed or self.publish_images

    def redact(self, df: pd.DataFrame) -> pd.DataFrame:
        """``df`` without identifier columns (and index levels) unless ids may be shown."""
        if self.may_show_ids():
            return df
        out = df.drop(columns=[c for c in df.columns if c in ID_COLUMNS])
        names = [n for n in out.index.names if n in ID_COLUMNS]
        if names:
            out = out.reset_index(level=names, drop=True) if len(names) < out.index.nlevels \
                else out.reset_index(drop=True)
        return out

    def describe(self) -> str:
        """One sentence for the notebooks: what this run shows."""
        if not self.credentialed:
            return "Open data: identifiers and images may be shown."
        ids = "identifiers are shown" if self.publish_identifiers else "no identifiers are shown"
        imgs = "images are shown" if self.publish_images else "no patient images are shown"
        return f"Credentialed data: {ids}; {imgs} (aggregate numbers only otherwise)."


@dataclass(frozen=True)
class ScanFinding:
    """One place in an executed notebook that shows what the policy forbids."""

    notebook: str
    cell: int
    where: str  # e.g. "output 0 text/html", "markdown", "metadata.widgets"
    kind: str  # "identifier" or "image"
    detail: str

    def __str__(self) -> str:
        return f"{self.notebook} cell {self.cell} ({self.where}): {self.kind} {self.detail}"


def cohort_identifiers(cohort: pd.DataFrame) -> set[str]:
    """Every identifier string of the cohort table that the scanner looks for."""
    ids: set[str] = set()
    for c in ("image_id", "subject_id", "study_id", "dicom_id", "hadm_id"):
        if c in cohort.columns:
            ids.update(str(v) for v in cohort[c].dropna().astype(str))
    return {i for i in ids if len(i) >= MIN_ID_LENGTH}


def _ids_in_text(text: str, ids: set[str]) -> set[str]:
    found = set()
    for pat in _TOKEN_PATTERNS:
        found.update(t for t in pat.findall(text) if t in ids)
    return found


def looks_like_xray(png: bytes, min_fraction: float = 0.04, min_levels: int = 48) -> bool:
    """Whether a PNG shows photograph-like grayscale content (e.g. chest X-rays).

    Charts are white or coloured; their gray pixels are thin antialiased text
    and lines. X-ray images fill *areas* with many distinct mid-gray levels. A
    pixel counts when it and its 8 neighbours are mid-gray (R = G = B within 3,
    value in 16..239; this erosion drops strokes of text and lines). Flags the
    image when at least ``min_fraction`` of its pixels count and they take at
    least ``min_levels`` distinct values.
    """
    from PIL import Image

    im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = im[..., 0], im[..., 1], im[..., 2]
    gray = (abs(r - g) <= 3) & (abs(g - b) <= 3) & (r >= 16) & (r <= 239)
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return False
    core = gray[1:-1, 1:-1].copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            core &= gray[1 + dy:gray.shape[0] - 1 + dy, 1 + dx:gray.shape[1] - 1 + dx]
    if core.mean() < min_fraction:
        return False
    return len(np.unique(r[1:-1, 1:-1][core])) >= min_levels


def _strings(obj):
    """All strings inside a JSON-like object."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def scan_notebook(nb_path: str | Path, ids: set[str], allow_ids: bool = False,
                  allow_images: bool = False) -> list[ScanFinding]:
    """Identifiers and patient images that one executed notebook shows."""
    import nbformat

    nb_path = Path(nb_path)
    nb = nbformat.read(nb_path, as_version=4)
    name = nb_path.name
    out: list[ScanFinding] = []

    def check_text(cell, where, text):
        if allow_ids:
            return
        for i in sorted(_ids_in_text(text, ids)):
            out.append(ScanFinding(name, cell, where, "identifier", i))

    for ci, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            check_text(ci, "markdown", cell.source)
            for att in (cell.get("attachments") or {}).values():
                for mime, data in att.items():
                    if mime.startswith("image/") and not allow_images:
                        out.append(ScanFinding(name, ci, "markdown attachment", "image", mime))
            continue
        for oi, o in enumerate(cell.get("outputs", [])):
            if o.get("output_type") == "stream":
                check_text(ci, f"output {oi} stream", o.get("text", ""))
            elif o.get("output_type") == "error":
                check_text(ci, f"output {oi} error", "\n".join(o.get("traceback", [])) + o.get("evalue", ""))
            for mime, data in (o.get("data") or {}).items():
                where = f"output {oi} {mime}"
                if mime in ("image/png", "image/jpeg"):
                    if not allow_images:
                        raw = base64.b64decode(data if isinstance(data, str) else "".join(data))
                        if looks_like_xray(raw):
                            out.append(ScanFinding(name, ci, where, "image", "grayscale image content"))
                elif mime.startswith("image/svg") or not mime.startswith("image/"):
                    text = data if isinstance(data, str) else json.dumps(data)
                    check_text(ci, where, text)
                    if mime.startswith("image/svg") and not allow_images and "<image" in text:
                        out.append(ScanFinding(name, ci, where, "image", "embedded raster in SVG"))
            check_text(ci, f"output {oi} metadata", json.dumps(o.get("metadata", {})))
    widgets = nb.metadata.get("widgets")
    if widgets:
        check_text(-1, "metadata.widgets", "\n".join(_strings(widgets)))
    return out


def scan_notebook_outputs(executed_dir: str | Path, cohort_table: pd.DataFrame | str | Path,
                          allow_ids: bool = False, allow_images: bool = False) -> list[ScanFinding]:
    """Scan every ``*.ipynb`` in ``executed_dir`` for cohort identifiers and patient images.

    ``cohort_table``: the cohort DataFrame or the path of ``cohort.parquet``.
    Returns the findings (empty when the notebooks are clean). The runner
    calls this after a credentialed run and fails when anything is found.
    """
    executed_dir = Path(executed_dir)
    if not executed_dir.is_dir():
        raise FileNotFoundError(f"executed notebooks folder {executed_dir} does not exist")
    cohort = cohort_table if isinstance(cohort_table, pd.DataFrame) else pd.read_parquet(cohort_table)
    ids = cohort_identifiers(cohort)
    if not ids and not allow_ids:
        raise ValueError("the cohort table has no identifier columns "
                         f"({', '.join(ID_COLUMNS)}) of at least {MIN_ID_LENGTH} characters to scan for")
    findings: list[ScanFinding] = []
    for nb in sorted(executed_dir.glob("*.ipynb")):
        findings.extend(scan_notebook(nb, ids, allow_ids, allow_images))
    return findings
