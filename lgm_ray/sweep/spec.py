"""What a sweep spec is: its fields, their defaults, and the grid of trials it means (``sweeps/*.yaml``).

A spec is data. It names the datasets (shard folders or URLs), the distillation backbones, the
evaluation backbones, the run settings shared by every trial (any :class:`~lgm_ray.distill.config.DistillConfig`
field), the ablation axes (any ``DistillConfig`` field → a list of values), the distillation seeds,
the baselines, the probe settings, the resources of a trial, where results go and where MLflow is.
Every run field keeps its one default in ``DistillConfig`` and every probe field its one default in
:class:`~lgm_ray.evaluate.config.EvalConfig`; types and choices are read from those, never copied here. The grid is ``datasets × backbones × ablation points × seeds``; each point is one trial
(:meth:`SweepSpec.grid`).

This module holds the classes a spec is made of, which the driver, the trials and the report use.
How a YAML file becomes one, and every check that refuses a bad spec, is in :mod:`lgm_ray.sweep.parse`,
so the schema reads on its own (its entry points: ``load_spec``, ``parse_spec``, ``check_resources``).

Example (``sweeps/demo.yaml`` is the full one)::

    name: demo
    datasets: {digits: {shards: shards/digits, build: digits}}
    backbones: ["digits_*"]           # glob over the backbone registry
    config_file: configs/digits_demo.yaml
    config: {steps: 200}
    ablations: {param: [pyramid, pixel], aug: [standard, none]}   # or a list: [{}, {color: false}]
    baselines: [random, centroids, neighbors, full]
    eval: {epochs: 300, seeds: 3}
    resources: {workers: 0, cpus_per_worker: 1}

Relative paths — ``datasets``' shards, ``config_file``, ``storage``, the run fields that hold a path
(:data:`RUN_PATH_FIELDS`: ``weights``, ``storage_path``, in ``config``, in ``config_file`` and in ablation
points) and a SQLite ``mlflow.tracking_uri`` — are relative to the **working directory** of the command,
as every path on a command line is (not to the spec file's folder: the shipped specs name
``shards/digits`` and ``configs/…`` from the repository's root, where ``make demo`` runs). Parsing makes
each absolute, once; the trials never see a relative path, because Ray's workers run elsewhere. URLs
(``s3://…``) stay as they are.

The command line may change any field before the spec is checked: ``--set KEY=VALUE`` (a dotted key into
the spec, a YAML value; :func:`lgm_ray.sweep.parse.apply_overrides`); the settings are kept in
:attr:`SweepSpec.overrides`.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lgm_ray.common.errors import InputError
from lgm_ray.distill.config import DistillConfig
from lgm_ray.evaluate.config import EvalConfig
from lgm_ray.results.folder import SweepFolder
from lgm_ray.results.labels import ablation_label, point_key


class SpecError(InputError):
    """A sweep spec that cannot run; the message names the field and how to fix it."""


# Run fields the grid sets itself, and the spec field to use instead.
GRID_FIELDS = {
    "backbone": "backbones",
    "shards": "datasets",
    "seed": "seeds",
    "out": "storage (each trial gets its own run folder under it)",
    "device": "resources.gpus_per_worker (a trial runs on cuda when it has GPUs)",
    "workers": "resources.workers",
}
# Run fields that hold a path (made absolute against the working directory when the spec is parsed).
RUN_PATH_FIELDS = ("weights", "storage_path")
# Baselines computed once per (dataset, evaluation backbone); "neighbors" depends on each distilled
# set and runs inside its trial.
SHARED_BASELINES = ("random", "centroids", "full")


# ---------------------------------------------------------------- run fields and probe fields


def run_field_types() -> dict[str, Any]:
    """``DistillConfig`` field → type annotation (the one place run fields are typed)."""
    return typing.get_type_hints(DistillConfig)


def eval_defaults() -> dict[str, Any]:
    """The probe settings a spec's ``eval:`` may set (:attr:`EvalConfig.SWEEP_FIELDS`), with their defaults."""
    return EvalConfig.defaults(EvalConfig.SWEEP_FIELDS)


def run_eval_config(settings: dict[str, Any], run: DistillConfig, **changes: Any) -> EvalConfig:
    """How a run's set (or a baseline next to it) is evaluated: the spec's probe ``settings`` (its
    :meth:`SweepSpec.eval_settings`) plus the run's own :attr:`EvalConfig.RUN_FIELDS` (preprocessing,
    output form, device) from its config, then ``changes``; it is scored as it was distilled."""
    own = {name: getattr(run, name) for name in EvalConfig.RUN_FIELDS}
    return EvalConfig(**{**settings, **own, **changes})


# ---------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Dataset:
    """A dataset of the sweep: a shard set (folder or URL) and, optionally, how to build it when missing.

    Attributes:
        name: short name used in trial names and tables.
        shards: shard folder or URL (``lgm_ray.shards.reader`` format).
        build: a ``python -m lgm_ray.shards build`` source that can make the folder offline
            (``digits``) when it does not exist yet; ``None``: a missing folder is an error.
    """

    name: str
    shards: str
    build: str | None = None


@dataclass
class Resources:
    """What one trial asks of the cluster.

    Attributes:
        workers: 0 distils in the trial's own process; K ≥ 1 on K Ray Train workers (the trial then
            holds no CPU itself: its request rides on top of its workers' placement group).
        cpus_per_worker: CPUs of each worker (of the trial itself when ``workers`` is 0).
        gpus_per_worker: GPUs of each worker (of the trial when ``workers`` is 0). With GPUs and
            ``workers`` ≥ 1 the trial holds one more GPU for its evaluations.
        max_concurrent_trials: at most this many trials at once; default: as many as the cluster holds.
        check: refuse, before any trial starts, a request no node of the cluster (or of its
            autoscaler's node types) can ever place.
    """

    workers: int = 0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int | None = None
    check: bool = True

    def validate(self) -> Resources:
        if self.workers < 0:
            raise SpecError(f"resources.workers = {self.workers}: must be ≥ 0 (0 = in the trial's process)")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise SpecError("resources.cpus_per_worker / gpus_per_worker must be ≥ 0")
        if self.workers == 0 and self.cpus_per_worker == 0 and self.gpus_per_worker == 0:
            raise SpecError(
                "resources: a trial with workers 0 needs cpus_per_worker > 0 (it runs in its "
                "own process and must hold a CPU, or trials pile up on one core)"
            )
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise SpecError(f"resources.max_concurrent_trials = {self.max_concurrent_trials}: must be ≥ 1")
        return self

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def trial_resources(self) -> dict[str, float]:
        """The Tune trial's own request (``tune.with_resources``), on top of its workers'.

        Ray refuses an all-zero request, and a trial holding a CPU its workers need can deadlock
        (docs/design.md §5); ``{"cpu": 0, "memory": 1 MiB}`` is the smallest request Ray accepts.
        """
        if self.workers == 0:
            return {"cpu": self.cpus_per_worker, "gpu": self.gpus_per_worker}
        if self.use_gpu:
            return {"cpu": 0, "gpu": 1}
        return {"cpu": 0, "memory": 1 << 20}

    def bundles(self) -> list[dict[str, float]]:
        """Every resource bundle one trial places (its own, then one per worker), in Ray's names."""
        own = {k.upper() if k != "memory" else k: v for k, v in self.trial_resources().items() if v}
        worker = {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}
        worker = {k: v for k, v in worker.items() if v}
        return [own] + [worker] * self.workers


@dataclass
class Tracking:
    """Where results are logged.

    Attributes:
        tracking_uri: an MLflow tracking URI; ``MLFLOW_TRACKING_URI`` or ``--tracking-uri`` override
            it; default: ``sqlite:///mlflow.db`` in the working directory.
        experiment: the MLflow experiment (default: the spec's ``name``).
    """

    tracking_uri: str | None = None
    experiment: str | None = None


@dataclass(frozen=True)
class TrialPoint:
    """One grid point: everything one trial needs, as plain data (it travels in the Tune config).

    Attributes:
        key: a file-name-safe name unique in the sweep, made from the point (deterministic, so a
            re-run finds the same run folder and checkpoint).
        dataset: the dataset's name.
        backbone: the distillation backbone.
        seed: the distillation seed.
        ablation: the ablation axes' values at this point (``{}`` without ablations).
        config: the ``DistillConfig`` fields this point sets (the rest keep their defaults, and a
            ``preset`` still applies); ``out`` is set by the trial.
    """

    key: str
    dataset: str
    backbone: str
    seed: int
    ablation: dict[str, Any]
    config: dict[str, Any]

    @property
    def ablation_label(self) -> str:
        return ablation_label(self.ablation)

    def resolved(self, **extra: Any) -> DistillConfig:
        """The trial's full run config (defaults, preset and overrides applied, validated)."""
        return DistillConfig.from_dict({**self.config, **extra}, source=f"trial {self.key}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialPoint:
        return cls(**data)


SPEC_KEYS = (
    "name",
    "description",
    "datasets",
    "backbones",
    "eval_backbones",
    "ablation_backbones",
    "config_file",
    "config",
    "ablations",
    "seeds",
    "baselines",
    "eval",
    "resources",
    "storage",
    "mlflow",
    "paper",
)


@dataclass
class SweepSpec:
    """A loaded, validated spec. Build it with :func:`lgm_ray.sweep.parse.load_spec` or :func:`~lgm_ray.sweep.parse.parse_spec`.

    Attributes:
        name: the sweep's name: its folder under ``storage``, its Tune experiment, and the default
            MLflow experiment.
        datasets: the datasets.
        backbones: distillation backbones (registry names; globs such as ``digits_*`` are expanded).
        eval_backbones: evaluation backbones (default: ``backbones``); every distilled set is
            evaluated on each.
        config: run settings shared by every trial (``config_file`` merged under ``config``).
        ablations: the ablation points, each a mapping of ``DistillConfig`` fields (``{}``: none). In
            YAML either axis → values (their product) or a list of points. The first point is the
            reference one: every backbone distils at it.
        ablation_backbones: the backbones that also distil at the other ablation points (default:
            all), so a cross-model sweep can ablate one backbone without multiplying the rest.
        seeds: distillation seeds.
        baselines: real-image baselines (``random``, ``centroids``, ``neighbors``, ``full``).
        eval: probe settings (:attr:`EvalConfig.SWEEP_FIELDS`: ``epochs``, ``seeds``, ``batch``,
            ``full_mode``, ``split``), defaults from :class:`~lgm_ray.evaluate.config.EvalConfig`.
        resources: what a trial asks of the cluster.
        storage: folder holding the sweep's folder (absolute; shared on a multi-node cluster).
        mlflow: tracking URI and experiment.
        description: free text, logged with the parent run.
        paper: free-form record of the numbers the spec should reproduce (logged, not used).
        source: the YAML file it came from.
        overrides: the command line's ``--set KEY=VALUE`` settings applied to that file, in order.
    """

    name: str
    datasets: list[Dataset]
    backbones: list[str]
    eval_backbones: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    ablations: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    ablation_backbones: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    baselines: list[str] = field(default_factory=lambda: ["random", "centroids", "neighbors", "full"])
    eval: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    storage: str = "runs/sweeps"
    mlflow: Tracking = field(default_factory=Tracking)
    description: str = ""
    paper: Any = None
    source: str | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage) / self.name

    @property
    def folder(self) -> SweepFolder:
        """The sweep's folder (every path in it is named by :class:`SweepFolder`)."""
        return SweepFolder(self.sweep_dir)

    def dataset(self, name: str) -> Dataset:
        return next(d for d in self.datasets if d.name == name)

    def base_config(self) -> DistillConfig:
        """The run settings shared by every trial (``DistillConfig`` defaults + ``config``)."""
        return DistillConfig.from_dict(self.config, source="config")

    def eval_settings(self) -> dict[str, Any]:
        """Probe settings (:attr:`EvalConfig.SWEEP_FIELDS`): ``EvalConfig``'s defaults overridden by ``eval``."""
        return {**eval_defaults(), **self.eval}

    @property
    def has_ablations(self) -> bool:
        return self.ablations != [{}]

    def grid(self) -> list[TrialPoint]:
        """Every trial of the sweep: datasets × backbones × ablation points × seeds (the ablation points
        after the first only for ``ablation_backbones``)."""
        points = []
        for ds, backbone, (i, ablation), seed in itertools.product(
            self.datasets, self.backbones, enumerate(self.ablations), self.seeds
        ):
            if i > 0 and self.ablation_backbones is not None and backbone not in self.ablation_backbones:
                continue
            cfg = {
                **self.config,
                **ablation,
                "backbone": backbone,
                "shards": ds.shards,
                "seed": seed,
                "device": "cuda" if self.resources.use_gpu else "cpu",
                "workers": self.resources.workers,
            }
            key = point_key(ds.name, backbone, ablation, seed)
            points.append(TrialPoint(key, ds.name, backbone, seed, ablation, cfg))
        return points

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (every default filled in), as saved with the results."""
        out = dataclasses.asdict(self)
        out["datasets"] = {d.name: {"shards": d.shards, "build": d.build} for d in self.datasets}
        out["config"] = self.base_config().to_dict()
        for k in ("backbone", "shards", "seed", "out", "device"):
            out["config"].pop(k, None)
        out["eval"] = self.eval_settings()
        return out
