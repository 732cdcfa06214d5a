"""Paper figures, tables and the run report (design.md). Not built yet: see figures/README.md."""
