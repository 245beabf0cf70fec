"""The sweep folder: every path a sweep writes under ``storage/NAME/``, named once.

::

    spec.yaml             the resolved spec
    trials.json           every grid point (key → dataset, backbone, ablation, seed, run fields)
    sweep_state.json      tracking URI, MLflow experiment and parent run (``--resume`` reopens them)
    timing.json           seconds spent on the shared baselines and on the trials
    driver_error.txt      the traceback of the last run of the driver that stopped on an unexpected error
    <trial key>/          Ray Tune's trial folder, named after the grid point …
      run/                … holding the trial's run folder (:class:`~lgm_ray.distill.run_folder.RunFolder`)
    baselines/            one JSON per (dataset, evaluation backbone, baseline)
    feature_cache/        frozen-backbone features of the shards
    tables/               the result tables (Markdown, Parquet, heatmap PNG)
    report/               the HTML report

The sweep driver, its trials, the MLflow logger, the report and the tests reach these paths through
:class:`SweepFolder` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lgm_ray.common.atomic import write_text
from lgm_ray.distill.run_folder import RunFolder


class SweepFolder:
    """The paths of one sweep folder and the reading and writing of its small files."""

    SPEC = "spec.yaml"
    POINTS = "trials.json"
    STATE = "sweep_state.json"
    TIMING = "timing.json"
    DRIVER_ERROR = "driver_error.txt"
    BASELINES = "baselines"
    FEATURE_CACHE = "feature_cache"
    TABLES = "tables"
    REPORT = "report"
    RUN = "run"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"SweepFolder({str(self.root)!r})"

    # -------------------------------------------------------------- paths
    @property
    def spec(self) -> Path:
        return self.root / self.SPEC

    @property
    def points(self) -> Path:
        return self.root / self.POINTS

    @property
    def state(self) -> Path:
        return self.root / self.STATE

    @property
    def timing(self) -> Path:
        return self.root / self.TIMING

    @property
    def driver_error(self) -> Path:
        return self.root / self.DRIVER_ERROR

    @property
    def baselines(self) -> Path:
        return self.root / self.BASELINES

    @property
    def feature_cache(self) -> Path:
        return self.root / self.FEATURE_CACHE

    @property
    def tables(self) -> Path:
        return self.root / self.TABLES

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    def trial_dir(self, key: str) -> Path:
        """Ray Tune's folder of the trial of grid point ``key``."""
        return self.root / key

    def run(self, key: str) -> RunFolder:
        """The run folder of grid point ``key``: a function of the point alone, so a re-run finds its checkpoint."""
        return RunFolder(self.trial_dir(key) / self.RUN)

    def runs(self) -> dict[str, RunFolder]:
        """Every grid point's run folder (key → :class:`RunFolder`, in ``trials.json``'s order), made or not."""
        return {key: self.run(key) for key in self.read_points()}

    def baseline_file(self, dataset: str, backbone: str, kind: str) -> Path:
        """Where one shared baseline's result is kept: its presence means done (skipped on resume)."""
        return self.baselines / f"{dataset}__{backbone}__{kind}.json"

    # -------------------------------------------------------------- the small files
    def is_sweep(self) -> bool:
        return self.spec.is_file()

    def is_empty(self) -> bool:
        """Whether nothing is here yet (no folder, or an empty one): a new sweep may start here."""
        return not self.root.is_dir() or not any(self.root.iterdir())

    def is_started(self) -> bool:
        """Whether a sweep has started here: anything beyond the spec, the grid and a driver's error, which
        a sweep writes before it opens its MLflow runs (a new start rewrites them: nothing depends on them)."""
        if self.is_empty():
            return False
        return any(p.name not in (self.SPEC, self.POINTS, self.DRIVER_ERROR) for p in self.root.iterdir())

    def write_driver_error(self, text: str) -> Path:
        write_text(self.driver_error, text)
        return self.driver_error

    def write_spec(self, resolved: dict[str, Any]) -> None:
        write_text(self.spec, yaml.safe_dump(resolved, sort_keys=False))

    def read_spec(self) -> dict[str, Any]:
        return (yaml.safe_load(self.spec.read_text()) or {}) if self.spec.is_file() else {}

    def write_points(self, points: dict[str, dict[str, Any]]) -> None:
        """Every grid point, key → point (``TrialPoint.to_dict()``)."""
        write_text(self.points, json.dumps(points, indent=1))

    def read_points(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.points.read_text()) if self.points.is_file() else {}

    def write_state(self, state: dict[str, Any]) -> None:
        write_text(self.state, json.dumps(state))

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.state.read_text()) if self.state.is_file() else {}

    def write_timing(self, timing: dict[str, Any]) -> None:
        write_text(self.timing, json.dumps(timing))

    def read_timing(self) -> dict[str, Any]:
        return json.loads(self.timing.read_text()) if self.timing.is_file() else {}

    def write_baseline(self, dataset: str, backbone: str, kind: str, result: dict[str, Any]) -> Path:
        path = self.baseline_file(dataset, backbone, kind)
        write_text(path, json.dumps(result, default=str))
        return path

    def read_baseline(self, dataset: str, backbone: str, kind: str) -> dict[str, Any] | None:
        """One shared baseline's result, or None when it has not been computed yet."""
        path = self.baseline_file(dataset, backbone, kind)
        return json.loads(path.read_text()) if path.is_file() else None

    def read_baselines(self) -> list[dict[str, Any]]:
        """Every shared baseline's result, in file-name order."""
        return [json.loads(f.read_text()) for f in sorted(self.baselines.glob("*.json"))] if self.baselines.is_dir() else []
