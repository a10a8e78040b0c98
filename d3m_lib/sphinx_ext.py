"""Sphinx extension of the study's book: glued figures on every page, tables that fit.

- MyST-NB pastes a figure glued in another notebook (``{glue:}`` with ``:doc:``)
  as ``_images/<sha256 of the PNG>.png`` but copies that file only when the
  source notebook displayed the very same bytes. After a successful HTML build,
  :func:`write_glued_images` writes every glued image of every notebook under
  exactly that name (the scheme of ``myst_nb.ext.glue.crossref``), so a pasted
  figure loads on any page. ``d3m_lib.book_check`` verifies it in a browser.
- Each page loads every script once: sphinx-thebe's inline configuration is
  registered twice by a Jupyter Book build, which declares ``const THEBE_JS_URL``
  twice (a script error in every page).
- ``d3m.css`` gives wide output tables their own horizontal scroll and a
  compact font.

Enabled in ``_config.yml`` (``sphinx.extra_extensions``).
"""

from __future__ import annotations

import hashlib
import json
from binascii import a2b_base64
from mimetypes import guess_extension
from pathlib import Path

STATIC = Path(__file__).resolve().parent / "book_static"
IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif")


def glued_images(glue_cache_dir: str | Path) -> dict[str, bytes]:
    """``{file name: bytes}`` of every image glued in the notebooks whose glue caches are here.

    A glue cache is MyST-NB's ``<doc>.glue.json`` (key -> output bundle). The
    name is the one MyST-NB's cross-page glue links to.
    """
    out: dict[str, bytes] = {}
    for cache in sorted(Path(glue_cache_dir).rglob("*.glue.json")):
        for output in json.loads(cache.read_text()).values():
            data = output.get("data", {}) if isinstance(output, dict) else {}
            for mime in IMAGE_MIMES:
                if mime in data:
                    raw = a2b_base64(data[mime])
                    ext = guess_extension(mime) or "." + mime.rsplit("/")[-1]
                    ext = ".jpeg" if ext == ".jpe" else ext
                    out[hashlib.sha256(raw).hexdigest() + ext] = raw
    return out


def write_glued_images(app, exception) -> None:
    """``build-finished``: write the glued images into the HTML output's image folder."""
    if exception is not None or app.builder.format != "html":
        return
    cache_dir = getattr(app.env, "mystnb_config", None)
    cache_dir = getattr(cache_dir, "output_folder", None)
    if not cache_dir:
        return
    images = Path(app.outdir) / app.builder.imagedir
    images.mkdir(parents=True, exist_ok=True)
    for name, raw in glued_images(cache_dir).items():
        target = images / name
        if not target.exists():
            target.write_bytes(raw)


def dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    """``html-page-context``: drop repeated script entries (same file or same inline body)."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        attrs = getattr(js, "attributes", {}) or {}
        name = getattr(js, "filename", js) or ""  # inline scripts: None or "" (same script)
        key = (str(name), tuple(sorted((k, str(v)) for k, v in attrs.items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    scripts[:] = kept


def _add_static(app) -> None:
    app.config.html_static_path.append(str(STATIC))


def setup(app):
    app.connect("builder-inited", _add_static)
    app.add_css_file("d3m.css")
    app.connect("build-finished", write_glued_images)
    app.connect("html-page-context", dedupe_scripts, priority=100)  # before handlers that end the event
    return {"parallel_read_safe": True, "parallel_write_safe": True}
