"""The pipeline layer: one module per stage, each with ``run(stage, progress=False) -> Result``.

- :mod:`~d3m_lib.stages.cohort`   (01) the cohort table, image cache, flow of exclusions
- :mod:`~d3m_lib.stages.scan`     (02) the discrepancy scan and the chosen findings
- :mod:`~d3m_lib.stages.baseline` (03) anchor and continued ERM models
- :mod:`~d3m_lib.stages.trak`     (04) TRAK state and group alignment inputs
- :mod:`~d3m_lib.stages.d3m`      (05) selections and retrained arms
- :mod:`~d3m_lib.stages.compare`  (06) the per-group comparison of the arms
- :mod:`~d3m_lib.stages.errors`   (07) error analysis of the worst group

``run`` does all of a stage's computation, writes only into ``stage.dir`` and
ends with ``stage.finish(summary)``; a notebook opens the stage, calls ``run``
once and shows the result's tables and figures.
"""

__all__ = ["cohort", "scan", "baseline", "trak", "d3m", "compare", "errors"]
