"""The pipeline layer: one module per stage, each with ``run(stage, progress=False) -> Result``.

A notebook opens its stage (:func:`d3m_lib.rundir.open_stage`), makes the one
call and shows the tables and figures of the returned ``Result``.
"""
