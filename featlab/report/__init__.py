"""Paper figures, tables and the run report (design.md): what joins the analyses with the heads.

Built so far: :mod:`featlab.report.tables`, the per-point property table and the predictors of a
sweep's gains. The figures and the run report are not built yet (see figures/README.md).
"""
