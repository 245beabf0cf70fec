"""The data behind the report's tables: a loaded sweep handed to the one function that computes them.

:func:`tables` gives :func:`lgm_ray.results.tables.sweep_tables` a :class:`~lgm_ray.report.load.Sweep`'s
spec, finished results, baselines and not-finished trials — the same function the sweep's driver writes
``tables/`` with (through :func:`lgm_ray.results.tables.folder_tables`), so the page and the MLflow
artifacts hold the same numbers. Nothing here computes a number; the tables section
(:mod:`lgm_ray.report.sections.tables`) only renders what comes back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lgm_ray.report.load import Sweep

if TYPE_CHECKING:
    from lgm_ray.results.tables import SweepTables


def tables(sweep: Sweep) -> SweepTables:
    """Every table of the sweep (:func:`lgm_ray.results.tables.sweep_tables`): its finished trials'
    results, its baselines (from MLflow: mean and std as recorded), and its failed and unfinished trials,
    whose cells the tables name."""
    from lgm_ray.results.tables import sweep_tables, trial_state

    missing = [trial_state(t.key, t.dataset, t.backbone, t.ablation, t.seed, t.status, t.error)
               for t in sweep.trials if t.status != "finished"]
    return sweep_tables(sweep.spec, [t.result for t in sweep.finished], sweep.baselines, missing)
