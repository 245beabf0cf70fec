"""How a sweep's grid points are named: the ablation label the tables and the report show, and the trial
key its folder and MLflow run are named after.

Both are functions of the point alone, declared once here: the sweep (:mod:`lgm_ray.sweep.spec`) names its
points with them, and the report (:mod:`lgm_ray.report.load`) names the points of a finished sweep's
``spec.yaml`` with the same functions, without importing the sweep.
"""

from __future__ import annotations

import re
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9_.=-]+")


def format_value(value: Any) -> str:
    """A run-field value as a label shows it: ``true`` / ``false`` for booleans (as YAML writes them)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def ablation_label(ablation: dict[str, Any]) -> str:
    """``param=pixel, aug=none``; ``default`` for the point with no ablation axes."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in ablation.items()) or "default"


def point_key(dataset: str, backbone: str, ablation: dict[str, Any], seed: int) -> str:
    """A file-name-safe key of one grid point, e.g. ``digits-digits_simclr_cnn-param=pixel-seed0``.

    Deterministic, so a re-run finds the same trial folder, run folder and checkpoint.
    """
    parts = [dataset, backbone, *(f"{k}={format_value(v)}" for k, v in ablation.items()), f"seed{seed}"]
    return _UNSAFE.sub("_", "-".join(parts))
