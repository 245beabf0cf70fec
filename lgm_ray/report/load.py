"""Loading a sweep for the report: its trials, baselines and spec, from a sweep folder or from MLflow.

:mod:`lgm_ray.report.build` reads a sweep either way; this module turns both sources into one :class:`Sweep`
(the trials in the spec's order) so that the frames (:mod:`lgm_ray.report.frames`), the figures
(:mod:`lgm_ray.report.figures`) and the page (:mod:`lgm_ray.report.page`) never see where the data came from.

Every file is reached through its owner: the sweep folder through
:class:`~lgm_ray.results.folder.SweepFolder`, each trial's run folder through
:class:`~lgm_ray.distill.run_folder.RunFolder` (a trial downloaded from MLflow lands in a run folder of its own,
its error tag as its ``error.txt``), and the points' names through :mod:`lgm_ray.results.labels`.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lgm_ray.common.errors import InputError
from lgm_ray.distill.config import load_yaml
from lgm_ray.distill.run_folder import RunFolder
from lgm_ray.results.folder import SweepFolder
from lgm_ray.results.labels import ablation_label, point_key

# What a trial's MLflow child run holds of its run folder (:func:`lgm_ray.sweep.mlflow_runs.log_trial_result`).
TRIAL_ARTIFACTS = (RunFolder.RESULT, RunFolder.SYNSET, RunFolder.GRID, RunFolder.CONFIG, RunFolder.GRIDS)


class ReportError(InputError):
    """A report that cannot be built from what was given; the message names the problem and the fix."""


@dataclass
class Trial:
    """One grid point as the report sees it.

    Attributes:
        key: the grid point's name (its folder, its MLflow child run's ``lgm_ray.trial_key``).
        dataset, backbone, ablation, seed: the point (``ablation`` is its label, ``default`` for none).
        status: ``finished``, ``failed`` or ``unfinished``.
        run: its run folder (``synset.pt``, ``grid.png``, ``grids/``, ``config.yaml``, ``result.json``).
        result: its ``result.json`` (evaluations, summary with the per-step losses), when finished.
        error: the last line of its error, when failed.
        run_id: its MLflow child run, when known.
        config: its ``config.yaml`` (empty when there is none).
    """

    key: str
    dataset: str
    backbone: str
    ablation: str
    seed: int
    status: str
    run: RunFolder | None = None
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


def ablation_labels(spec: dict[str, Any]) -> list[str]:
    """The labels of the spec's ablation points, in the spec's order (``default`` for none)."""
    return [ablation_label(p or {}) for p in spec.get("ablations") or [{}]]


# ---------------------------------------------------------------- one trial


def _point_of(key: str, cfg: dict[str, Any], spec: dict[str, Any]) -> tuple[str, str, str, int]:
    """dataset, backbone, ablation label and seed of a trial with no result: the spec's grid point whose key
    it is, else from its config and the spec."""
    datasets = spec.get("datasets") or {}
    for ds, backbone, ablation, seed in itertools.product(datasets, spec.get("backbones") or [],
                                                           spec.get("ablations") or [{}], spec.get("seeds") or [0]):
        if point_key(ds, backbone, ablation or {}, seed) == key:
            return ds, backbone, ablation_label(ablation or {}), int(seed)
    dataset = next((n for n, d in datasets.items() if (d or {}).get("shards") == cfg.get("shards")),
                   key.split("-")[0])
    ablation = next((ablation_label(p) for p in spec.get("ablations") or [] if p and
                     all(cfg.get(k) == v for k, v in p.items())), "default")
    return dataset, str(cfg.get("backbone", "?")), ablation, int(cfg.get("seed", 0))


def _trial(key: str, run: RunFolder, spec: dict[str, Any], status: str | None = None, run_id: str | None = None,
           grid_point: dict | None = None, tagged: tuple[str, str, str, int] | None = None) -> Trial:
    """The trial of grid point ``key`` from its run folder; its point from its result, else the sweep's grid
    (``trials.json``), else its MLflow child run's tags (``tagged``), else its key, config and the spec."""
    result = run.read_result()
    cfg = load_yaml(run.config) if run.config.is_file() else {}
    error = run.last_error_line()
    if result is not None:
        point = (result["dataset"], result["backbone"], result.get("ablation") or "default", int(result["seed"]))
    elif tagged is not None:
        point = tagged
    elif grid_point is not None:
        point = (grid_point["dataset"], grid_point["backbone"], ablation_label(grid_point.get("ablation") or {}),
                 int(grid_point.get("seed", 0)))
    else:
        point = _point_of(key, cfg, spec)
    status = status or ("finished" if result else "failed" if error else "unfinished")
    return Trial(key, *point, status=status, run=run, result=result, error=error, run_id=run_id, config=cfg)


def _order(sweep: Sweep) -> None:
    spec = sweep.spec
    ds = sweep.datasets
    bb = list(spec.get("backbones") or [])
    ab = ablation_labels(spec)

    def rank(values: list, v) -> int:
        return values.index(v) if v in values else len(values)

    sweep.trials.sort(key=lambda t: (rank(ds, t.dataset), rank(ab, t.ablation), rank(bb, t.backbone), t.backbone,
                                     t.seed, t.key))


# ---------------------------------------------------------------- a sweep folder


def load_sweep_dir(path: str | Path) -> Sweep:
    """A sweep folder as :mod:`lgm_ray.sweep.driver` writes it (:class:`~lgm_ray.results.folder.SweepFolder`)."""
    folder = SweepFolder(path)
    if not folder.is_sweep():
        raise ReportError(f"{folder.root} is not a sweep folder (no {SweepFolder.SPEC}): give storage/NAME of a "
                          f"sweep, or an MLflow experiment name")
    spec, state, points = folder.read_spec(), folder.read_state(), folder.read_points()
    # the grid (written by the sweep's driver), then any other trial folder holding a run folder
    others = [d.name for d in sorted(folder.root.iterdir())
              if d.name not in points and folder.run(d.name).root.is_dir()]
    trials = [_trial(k, folder.run(k), spec, grid_point=points.get(k)) for k in [*points, *others]]
    sweep = Sweep(spec.get("name") or folder.root.name, spec, trials, folder.read_baselines(), str(folder.root),
                  state.get("tracking_uri"), state.get("experiment_id"), state.get("parent_run_id"),
                  folder.feature_cache)
    _order(sweep)
    return sweep


# ---------------------------------------------------------------- MLflow


def _experiment(client, experiment: str, tracking_uri: str):
    """The MLflow experiment of that name (or id)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        try:
            exp = client.get_experiment(experiment)
        except Exception:  # noqa: BLE001 - an unknown id is reported below
            exp = None
    if exp is None:
        raise ReportError(f"{experiment!r} is neither a sweep folder nor an MLflow experiment at {tracking_uri}; "
                          f"give storage/NAME of a sweep, or pass the right --tracking-uri")
    return exp


def _newest_sweep(client, exp) -> str:
    """The experiment's newest sweep parent run."""
    from lgm_ray.results.tracking import KIND_TAG

    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ReportError(f"MLflow experiment {exp.name!r} has no sweep run (tag {KIND_TAG} = sweep); "
                          f"run `python -m lgm_ray.sweep SPEC` first")
    return runs[0].info.run_id


def _spec_of(client, parent_run: str, work: Path) -> dict[str, Any]:
    """The sweep's ``spec.yaml``, as logged to its parent run (empty when it was not)."""
    if not any(a.path == SweepFolder.SPEC for a in client.list_artifacts(parent_run)):
        return {}
    client.download_artifacts(parent_run, SweepFolder.SPEC, str(work))
    return SweepFolder(work).read_spec()


def _download_trial(client, run, work: Path, spec: dict[str, Any]) -> Trial:
    """A trial's child run as a run folder under ``work``: its artifacts, and its error tag as ``error.txt``."""
    from lgm_ray.results.tracking import KEY_TAG

    key = run.data.tags.get(KEY_TAG) or run.info.run_name
    folder = RunFolder(work / "trials" / key)
    folder.root.mkdir(parents=True, exist_ok=True)
    have = {a.path for a in client.list_artifacts(run.info.run_id)}
    for name in TRIAL_ARTIFACTS:
        if name in have:
            client.download_artifacts(run.info.run_id, name, str(folder.root))
    if run.data.tags.get("error"):
        folder.write_error(run.data.tags["error"])
    status = {"FINISHED": None, "FAILED": "failed"}.get(run.info.status, "unfinished")
    tags = run.data.tags  # the grid point, as the sweep's MLflow logger tags every trial's child run
    tagged = ((tags["dataset"], tags["distill_backbone"], tags["ablation"], int(tags["seed"]))
              if {"dataset", "distill_backbone", "ablation", "seed"} <= set(tags) else None)
    t = _trial(key, folder, spec, status=status, run_id=run.info.run_id, tagged=tagged)
    if t.status == "finished" and t.result is None:
        t.status = "unfinished"
    return t


def _baseline(run) -> dict[str, Any]:
    """A baseline child run as the baseline's record (mean and std as logged; no per-seed values)."""
    tags = run.data.tags
    return {"dataset": tags.get("dataset"), "baseline": tags.get("baseline"), "backbone": tags.get("eval_backbone"),
            **run.data.metrics}


def load_mlflow(experiment: str, tracking_uri: str, work_dir: str | Path, parent_run: str | None = None) -> Sweep:
    """A sweep from MLflow: the experiment's newest sweep parent run (or ``parent_run``) and its children.

    The trials' artifacts (``result.json``, ``synset.pt``, ``grid.png``, ``config.yaml``, ``grids/``)
    are downloaded into run folders under ``work_dir``; baselines are read from their child runs' tags and
    metrics.
    """
    from mlflow import MlflowClient

    from lgm_ray.results.tracking import KIND_TAG, Tracker

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = _experiment(client, experiment, tracking_uri)
    parent_run = parent_run or _newest_sweep(client, exp)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec = _spec_of(client, parent_run, work)
    trials, baselines = [], []
    for run in Tracker(tracking_uri).children(exp.experiment_id, parent_run):
        kind = run.data.tags.get(KIND_TAG)
        if kind == "baseline" and run.info.status == "FINISHED":
            baselines.append(_baseline(run))
        elif kind == "trial":
            trials.append(_download_trial(client, run, work, spec))
    sweep = Sweep(spec.get("name") or exp.name, spec, trials, baselines, f"{tracking_uri} · experiment {exp.name}",
                  tracking_uri, exp.experiment_id, parent_run)
    _order(sweep)
    return sweep
