"""Loading a sweep for the report: its trials, baselines and spec, from a sweep folder or from MLflow.

:mod:`lgm_ray.report.build` reads a sweep either way; this module turns both sources into one :class:`Sweep`
(the trials in the spec's order) so that the figures (:mod:`lgm_ray.report.figures`) and the page
(:mod:`lgm_ray.report.page`) never see where the data came from. It also holds the data behind the
tables: the long results frame (:func:`results`) and our numbers beside the paper's
(:func:`paper_comparison`) — frames computed from the sweep, with no rendering, kept next to the data
they read rather than in the HTML module that draws them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lgm_ray.common.errors import InputError

RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"
POINTS_FILE = "trials.json"


class ReportError(InputError):
    """A report that cannot be built from what was given; the message names the problem and the fix."""


# ---------------------------------------------------------------- the sweep, from a folder or MLflow


@dataclass
class Trial:
    """One grid point as the report sees it.

    Attributes:
        key: the grid point's name (its folder, its MLflow child run's ``lgm_ray.trial_key``).
        dataset, backbone, ablation, seed: the point (``ablation`` is its label, ``default`` for none).
        status: ``finished``, ``failed`` or ``unfinished``.
        run_dir: a folder holding its ``synset.pt``, ``grid.png``, ``grids/``, ``config.yaml``.
        result: its ``result.json`` (evaluations, summary with the per-step losses), when finished.
        error: the last line of its error, when failed.
        run_id: its MLflow child run, when known.
    """

    key: str
    dataset: str
    backbone: str
    ablation: str
    seed: int
    status: str
    run_dir: Path | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.backbone} · {self.ablation} · seed {self.seed}"


@dataclass
class Sweep:
    """Everything the report reads, whatever the source."""

    name: str
    spec: dict[str, Any]
    trials: list[Trial]
    baselines: list[dict[str, Any]]
    source: str
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    cache_dir: Path | None = None

    @property
    def datasets(self) -> list[str]:
        named = list((self.spec.get("datasets") or {}).keys())
        return named + sorted({t.dataset for t in self.trials} - set(named))

    @property
    def eval_backbones(self) -> list[str]:
        named = list(self.spec.get("eval_backbones") or [])
        seen = {b for t in self.trials if t.result for b in t.result.get("evals", {})}
        return named + sorted(seen - set(named))

    @property
    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.status == "finished"]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def ablation_labels(spec: dict[str, Any]) -> list[str]:
    """The labels of the spec's ablation points, in the spec's order (``default`` for none)."""
    from lgm_ray.sweep.spec import ablation_label

    return [ablation_label(p or {}) for p in spec.get("ablations") or [{}]]


def _point_of(key: str, cfg: dict[str, Any], spec: dict[str, Any]) -> tuple[str, str, str, int]:
    """dataset, backbone, ablation label and seed of a trial with no result, from its config and the spec."""
    from lgm_ray.sweep.spec import ablation_label

    datasets = spec.get("datasets") or {}
    dataset = next((n for n, d in datasets.items() if (d or {}).get("shards") == cfg.get("shards")),
                   key.split("-")[0])
    ablation = next((ablation_label(p) for p in spec.get("ablations") or [] if p and
                     all(cfg.get(k) == v for k, v in p.items())), "default")
    return dataset, str(cfg.get("backbone", "?")), ablation, int(cfg.get("seed", 0))


def _trial(key: str, run_dir: Path, spec: dict[str, Any], status: str | None = None,
           error: str | None = None, run_id: str | None = None, grid_point: dict | None = None) -> Trial:
    from lgm_ray.sweep.spec import ablation_label

    result = json.loads((run_dir / RESULT_FILE).read_text()) if (run_dir / RESULT_FILE).is_file() else None
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    if error is None and (run_dir / ERROR_FILE).is_file():
        error = _last_line((run_dir / ERROR_FILE).read_text())
    if result is not None:
        point = (result["dataset"], result["backbone"], result.get("ablation") or "default", int(result["seed"]))
    elif grid_point is not None:
        point = (grid_point["dataset"], grid_point["backbone"], ablation_label(grid_point.get("ablation") or {}),
                 int(grid_point.get("seed", 0)))
    else:
        point = _point_of(key, cfg or {}, spec)
    status = status or ("finished" if result else "failed" if error else "unfinished")
    return Trial(key, *point, status=status, run_dir=run_dir, result=result, error=error, run_id=run_id,
                 config=cfg or {})


def _order(sweep: Sweep) -> None:
    spec = sweep.spec
    ds = sweep.datasets
    bb = list(spec.get("backbones") or [])
    ab = ablation_labels(spec)

    def rank(values: list, v) -> int:
        return values.index(v) if v in values else len(values)

    sweep.trials.sort(key=lambda t: (rank(ds, t.dataset), rank(ab, t.ablation), rank(bb, t.backbone), t.backbone,
                                     t.seed, t.key))


def load_sweep_dir(path: str | Path) -> Sweep:
    """A sweep folder as :mod:`lgm_ray.sweep.driver` writes it."""
    root = Path(path)
    if not (root / "spec.yaml").is_file():
        raise ReportError(f"{root} is not a sweep folder (no spec.yaml): give storage/NAME of a sweep, "
                          f"or an MLflow experiment name")
    spec = yaml.safe_load((root / "spec.yaml").read_text()) or {}
    state = json.loads((root / "sweep_state.json").read_text()) if (root / "sweep_state.json").is_file() else {}
    # the grid (trials.json, written by the sweep's driver), then any other run folder
    points = json.loads((root / POINTS_FILE).read_text()) if (root / POINTS_FILE).is_file() else {}
    keys = list(points) + [d.parent.name for d in sorted(root.glob("*/run")) if d.is_dir() and d.parent.name
                           not in points]
    trials = [_trial(k, root / k / "run", spec, grid_point=points.get(k)) for k in keys]
    baselines = [json.loads(f.read_text()) for f in sorted((root / "baselines").glob("*.json"))]
    sweep = Sweep(spec.get("name") or root.name, spec, trials, baselines, str(root), state.get("tracking_uri"),
                  state.get("experiment_id"), state.get("parent_run_id"), root / "feature_cache")
    _order(sweep)
    return sweep


TRIAL_ARTIFACTS = ("result.json", "synset.pt", "grid.png", "config.yaml", "grids")


def load_mlflow(experiment: str, tracking_uri: str, work_dir: str | Path, parent_run: str | None = None) -> Sweep:
    """A sweep from MLflow: the experiment's newest sweep parent run (or ``parent_run``) and its children.

    The trials' artifacts (``result.json``, ``synset.pt``, ``grid.png``, ``config.yaml``, ``grids/``)
    are downloaded under ``work_dir``; baselines are read from their child runs' tags and metrics.
    """
    from mlflow import MlflowClient

    from lgm_ray.results.tracking import KEY_TAG, KIND_TAG, Tracker

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        try:
            exp = client.get_experiment(experiment)
        except Exception:  # noqa: BLE001 - an unknown id is reported below
            exp = None
    if exp is None:
        raise ReportError(f"{experiment!r} is neither a sweep folder nor an MLflow experiment at {tracking_uri}; "
                          f"give storage/NAME of a sweep, or pass the right --tracking-uri")
    if parent_run is None:
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ReportError(f"MLflow experiment {exp.name!r} has no sweep run (tag {KIND_TAG} = sweep); "
                              f"run `python -m lgm_ray.sweep SPEC` first")
        parent_run = runs[0].info.run_id
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {}
    if any(a.path == "spec.yaml" for a in client.list_artifacts(parent_run)):
        spec = yaml.safe_load(Path(client.download_artifacts(parent_run, "spec.yaml", str(work))).read_text()) or {}
    trials, baselines = [], []
    for run in Tracker(tracking_uri).children(exp.experiment_id, parent_run):
        tags, kind = run.data.tags, run.data.tags.get(KIND_TAG)
        if kind == "baseline" and run.info.status == "FINISHED":
            baselines.append({"dataset": tags.get("dataset"), "baseline": tags.get("baseline"),
                              "backbone": tags.get("eval_backbone"), **run.data.metrics})
        elif kind == "trial":
            key = tags.get(KEY_TAG) or run.info.run_name
            run_dir = work / "trials" / key
            run_dir.mkdir(parents=True, exist_ok=True)
            have = {a.path for a in client.list_artifacts(run.info.run_id)}
            for name in TRIAL_ARTIFACTS:
                if name in have:
                    client.download_artifacts(run.info.run_id, name, str(run_dir))
            status = {"FINISHED": None, "FAILED": "failed"}.get(run.info.status, "unfinished")
            error = _last_line(tags["error"]) if tags.get("error") else None
            t = _trial(key, run_dir, spec, status=status, error=error, run_id=run.info.run_id)
            if t.status == "finished" and t.result is None:
                t.status = "unfinished"
            trials.append(t)
    sweep = Sweep(spec.get("name") or exp.name, spec, trials, baselines, f"{tracking_uri} · experiment {exp.name}",
                  tracking_uri, exp.experiment_id, parent_run)
    _order(sweep)
    return sweep


# ---------------------------------------------------------------- the data behind the tables


def results(sweep: Sweep):
    """The long results frame (:func:`lgm_ray.results.tables.results_frame`) of the finished trials and baselines.

    Baseline rows take the mean and std as recorded (a baseline child run in MLflow holds no per-seed values).
    """
    import pandas as pd

    from lgm_ray.results.tables import METRIC_FIELDS, results_frame

    frame = results_frame([t.result for t in sweep.finished], [])
    rows = [{"dataset": b["dataset"], "training_set": b["baseline"], "distill_backbone": "", "ablation": "",
             "eval_backbone": b["backbone"], **{m: float(b.get(m, float("nan"))) for m in METRIC_FIELDS},
             "n_values": len(b.get("top1_per_seed") or []) or None} for b in sweep.baselines]
    if rows:
        frame = pd.concat([frame, pd.DataFrame(rows, columns=frame.columns)], ignore_index=True)
    return frame


def paper_rows(paper: Any) -> tuple[list[str], dict[str, list[float]]] | None:
    """The columns and rows of the spec's ``paper`` field, or ``None`` when it has no such form.

    Rows whose length differs from the columns' are left out.
    """
    if not isinstance(paper, dict) or not isinstance(paper.get("columns"), list):
        return None
    rows = {str(k): v for k, v in paper.items() if k != "columns" and isinstance(v, list)
            and len(v) == len(paper["columns"])}
    return [str(c) for c in paper["columns"]], rows


def paper_comparison(paper: Any, means, ablation) -> Any:
    """Ours beside the paper's numbers, for the table the spec's ``paper`` field names.

    ``paper``: ``{columns: [...], ROW: [values], ...}``. Columns ``[same-model, cross-model]`` name the
    ablation table (rows: ablation labels); otherwise a cross-model table (columns: evaluation
    backbones and ``avg``; row ``distilled``: each column the set distilled with that backbone —
    our same-model diagonal; other rows: the baselines).

    Returns:
        DataFrame ``table, row, column, ours, paper, delta`` (``ours`` NaN where the sweep has no such
        cell), or ``None`` when ``paper`` has no such form.
    """
    import pandas as pd

    parsed = paper_rows(paper)
    if parsed is None:
        return None
    cols, rows = parsed
    out = []
    is_ablation = set(cols) == {"same-model", "cross-model"}

    def cell(frame, row: str, col: str) -> float:
        if frame is None or col not in frame.columns:
            return float("nan")
        hits = [r for r in frame.index if r == row or r.startswith(row + " [default]")]
        return float(frame.loc[hits[0], col]) if hits else float("nan")

    for row, values in rows.items():
        ours_row = {}
        for col in cols:
            if is_ablation:
                ours_row[col] = cell(ablation, row, col)
            elif row == "distilled" and col != "avg":
                ours_row[col] = cell(means, f"distilled: {col}", col)
            elif col != "avg":
                ours_row[col] = cell(means, row, col)
        if not is_ablation and "avg" in cols:
            got = [ours_row[c] for c in cols if c != "avg"]
            ours_row["avg"] = float(np.mean(got)) if got and not any(math.isnan(v) for v in got) else float("nan")
        for col, p in zip(cols, values, strict=True):
            o = ours_row[col]
            out.append({"table": "ablation" if is_ablation else "cross-model", "row": row, "column": col,
                        "ours": o, "paper": float(p), "delta": o - float(p)})
    return pd.DataFrame(out, columns=["table", "row", "column", "ours", "paper", "delta"])
