"""Glue helpers: store values in a notebook so the book's prose can quote them.

Every helper calls ``myst_nb.glue(name, ..., display=False)`` with a value
whose plain-text form myst-nb can format. Quote them in Markdown:

- same notebook: ``{glue:text}`n_images:,d```
- another page:  ``{glue:text}`../notebooks/01_cohort.ipynb::n_images:,d```
  (path relative to the quoting page, with the ``.ipynb`` suffix; a cross-page
  ``glue:text`` must end in a format spec such as ``:s``, ``:.3f`` or ``:,d``)
- tables and figures from another page: a ``{glue:}`` directive with a
  ``:doc:`` option (``{glue:figure}`` only works within its own notebook).
  A figure quoted from another page must also be shown in its own notebook
  (e.g. with ``{glue:figure}``), or its image file is never written.

The helpers return ``None``, so a cell that ends with one displays nothing:
what a page shows is placed by its ``{glue:...}`` references.
"""

from __future__ import annotations

import io
import numbers
from typing import Any

import numpy as np
import pandas as pd

# Every notebook imports this module: the tables it shows keep their whole cell texts (pandas would
# cut them at 50 characters with "...", which the book's check refuses).
pd.set_option("display.max_colwidth", None)


def _plain(value: Any) -> Any:
    """A Python scalar for numpy scalars (their repr, ``np.float64(0.5)``, breaks formatting)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def glue_number(name: str, value: Any) -> None:
    """Glue a number; the quoting page picks the format (``:.3f``, ``:,d``, ``:.1%``)."""
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"glue_number({name!r}): expected a real number, got {type(value).__name__}")
    from myst_nb import glue

    glue(name, value, display=False)


def glue_text(name: str, text: str) -> None:
    """Glue a string (quote it with ``:s``)."""
    if not isinstance(text, str):
        raise TypeError(f"glue_text({name!r}): expected str, got {type(text).__name__}")
    from myst_nb import glue

    glue(name, text, display=False)


def format_interval(est: float, lo: float, hi: float, fmt: str = ".3f") -> str:
    """``0.812 [0.790, 0.834]``: an estimate and its interval in one format."""
    est, lo, hi = (_plain(v) for v in (est, lo, hi))
    return f"{est:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def glue_interval(name: str, est: float, lo: float, hi: float, fmt: str = ".3f") -> None:
    """Glue an estimate with its interval as text, e.g. ``0.812 [0.790, 0.834]``."""
    glue_text(name, format_interval(est, lo, hi, fmt))


def glue_table(name: str, df, *, index: bool = False, float_format: str | None = ".3f") -> None:
    """Glue a DataFrame as an HTML table (numbers rounded by ``float_format``)."""
    import pandas as pd
    from IPython.display import HTML
    from myst_nb import glue

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"glue_table({name!r}): expected a DataFrame, got {type(df).__name__}")
    fmt = (lambda v: f"{v:{float_format}}") if float_format else None
    html = df.to_html(index=index, float_format=fmt, na_rep="", border=0,
                      classes=["table", "dataframe"])
    glue(name, HTML(html), display=False)


def glue_figure(name: str, fig, *, dpi: int = 120, close: bool = True) -> None:
    """Glue a matplotlib figure as a PNG image, whatever the plotting backend; close it."""
    from IPython.display import Image
    from myst_nb import glue

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    glue(name, Image(data=buf.getvalue(), format="png"), display=False)


def group_noun(cfg) -> str:
    """What the protected groups of a run are: ``race`` (MIMIC), ``sex`` or ``age band`` (NIH)."""
    dataset = cfg["dataset"]  # a Config or a dict of its values
    if dataset == "mimic":
        return "race"
    if dataset == "nih":
        group = cfg["nih_group"]
        return {"sex": "sex", "age_band": "age band"}.get(group, str(group).replace("_", " "))
    raise ValueError(f"group_noun: unknown dataset {dataset!r}")


def glue_values(values: dict) -> None:
    """Glue each ``name: value`` of a stage result: strings with :func:`glue_text`, numbers with :func:`glue_number`."""
    for name, value in values.items():
        if isinstance(value, str):
            glue_text(name, value)
        else:
            glue_number(name, value)
