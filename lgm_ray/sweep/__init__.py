"""Sweeps: a YAML spec (datasets × backbones × ablation points × seeds) run as Ray Tune trials, every
result logged to MLflow, the result tables and the report at the end (``python -m lgm_ray.sweep SPEC``).

What a spec is: :mod:`lgm_ray.sweep.spec`; reading and checking one: :mod:`lgm_ray.sweep.parse`; the
driver: :mod:`lgm_ray.sweep.driver` (:func:`run_sweep`, which imports Ray, so it is loaded on first use);
one trial: :mod:`lgm_ray.sweep.trial`; the shared baselines: :mod:`lgm_ray.sweep.baselines`; MLflow from the
driver: :mod:`lgm_ray.sweep.mlflow_runs`. What a sweep leaves behind is read and written by
:mod:`lgm_ray.results`.
"""

from __future__ import annotations

from typing import Any

from lgm_ray.sweep.parse import check_resources, load_spec, parse_spec
from lgm_ray.sweep.spec import Dataset, Resources, SpecError, SweepSpec, TrialPoint

__all__ = ["Dataset", "Resources", "SpecError", "SweepSpec", "TrialPoint", "check_resources", "load_spec",
           "parse_spec", "run_sweep"]


def __getattr__(name: str) -> Any:
    """``run_sweep`` on first use (the driver imports Ray; importing the package does not)."""
    if name == "run_sweep":
        from lgm_ray.sweep.driver import run_sweep

        return run_sweep
    raise AttributeError(f"module 'lgm_ray.sweep' has no attribute {name!r}")
