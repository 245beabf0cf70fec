"""A sweep spec: YAML → validated dataclasses → the grid of trials (``sweeps/*.yaml``).

A spec is data. It names the datasets (shard folders or URLs), the distillation backbones, the
evaluation backbones, the run settings shared by every trial (any :class:`~lgm_ray.config.DistillConfig`
field), the ablation axes (any ``DistillConfig`` field → a list of values), the distillation seeds,
the baselines, the probe settings, the resources of a trial, where results go and where MLflow is.
Every run field keeps its one default in ``DistillConfig`` and every probe field its one default in
the signature of :func:`lgm_ray.evaluate.evaluate`; types and choices are read from those, never
copied here. The grid is ``datasets × backbones × ablation points × seeds``; each point is one trial.

Everything a spec can get wrong fails in :func:`load_spec` / :func:`check_resources` before any trial
starts, with one message naming the field and the fix (unknown keys get the nearest valid name).

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

Relative paths (``datasets``, ``config_file``, ``storage``) are relative to the working directory of
the command, as every path on a command line is; they are made absolute here, because Ray's workers
run elsewhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
import itertools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lgm_ray.config import ConfigError, DistillConfig


class SpecError(ValueError):
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
# Probe settings a spec may set (those of them lgm_ray.evaluate.evaluate takes); their defaults and
# types come from evaluate's signature.
EVAL_CANDIDATES = ("epochs", "seeds", "batch", "full_mode", "split")
# Baselines computed once per (dataset, evaluation backbone); "neighbors" depends on each distilled
# set and runs inside its trial.
SHARED_BASELINES = ("random", "centroids", "full")


def suggest(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the nearest valid name, or ``''``."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_keys(data: dict, valid: list[str] | tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in valid:
            raise SpecError(
                f"{where}: unknown key {key!r}{suggest(str(key), valid)}; valid keys: {', '.join(valid)}"
            )


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (the basic types a YAML file can hold)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_type(value: Any, hint: Any, where: str) -> None:
    """Raise :class:`SpecError` unless ``value`` fits ``hint``."""
    if not _type_ok(value, hint):
        raise SpecError(f"{where} = {value!r}: expected {_type_name(hint)}, got {type(value).__name__}")


def _build(cls: type, data: Any, where: str):
    """A dataclass from a mapping: unknown keys (with a suggestion) and types checked from ``cls``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{where} must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
    names = [f.name for f in dataclasses.fields(cls)]
    _unknown_keys(data, names, where)
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        check_type(value, hints[key], f"{where}.{key}")
    return cls(**data)


# ---------------------------------------------------------------- run fields and probe fields


def run_field_types() -> dict[str, Any]:
    """``DistillConfig`` field → type annotation (the one place run fields are typed)."""
    return typing.get_type_hints(DistillConfig)


def check_run_fields(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Check keys and value types of ``DistillConfig`` overrides (refusing the fields the grid sets);
    return them coerced to the fields' types (by ``DistillConfig.coerce``, the one place that does it)."""
    hints = run_field_types()
    out = {}
    for key, value in data.items():
        if key in GRID_FIELDS:
            raise SpecError(f"{where}: {key!r} is set by the sweep grid; use {GRID_FIELDS[key]} instead")
        if key not in hints:
            raise SpecError(
                f"{where}: unknown run field {key!r}{suggest(str(key), list(hints))}; "
                f"run fields are those of lgm_ray.config.DistillConfig: {', '.join(hints)}"
            )
        coerce = getattr(DistillConfig, "coerce", None)
        if coerce is None:
            check_type(value, hints[key], f"{where}.{key}")
            out[key] = value
            continue
        try:
            out[key] = coerce(key, value, f"{where}.{key}")
        except ConfigError as exc:
            raise SpecError(str(exc)) from None
    return out


def eval_defaults() -> dict[str, Any]:
    """The probe settings a spec may override, with their defaults from ``evaluate``'s signature."""
    from lgm_ray.evaluate import evaluate

    params = inspect.signature(evaluate).parameters
    return {name: params[name].default for name in EVAL_CANDIDATES if name in params}


def _check_eval(data: Any) -> dict[str, Any]:
    from lgm_ray.evaluate import FULL_MODES, evaluate

    if data is None:
        return {}
    fields_ = tuple(eval_defaults())
    if not isinstance(data, dict):
        raise SpecError(f"eval must be a mapping of {', '.join(fields_)}")
    _unknown_keys(data, fields_, "eval")
    hints = typing.get_type_hints(evaluate)
    for key, value in data.items():
        check_type(value, hints[key], f"eval.{key}")
    for key in ("epochs", "seeds", "batch"):
        if data.get(key) is not None and data[key] < 1:
            raise SpecError(f"eval.{key} = {data[key]!r}: must be ≥ 1")
    if "full_mode" in data and data["full_mode"] not in FULL_MODES:
        raise SpecError(f"eval.full_mode = {data['full_mode']!r}: choose one of {', '.join(FULL_MODES)}")
    return dict(data)


# ---------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Dataset:
    """A dataset of the sweep: a shard set (folder or URL) and, optionally, how to build it when missing.

    Attributes:
        name: short name used in trial names and tables.
        shards: shard folder or URL (``lgm_ray.shards`` format).
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
        (DESIGN §5); ``{"cpu": 0, "memory": 1 MiB}`` is the smallest request Ray accepts.
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


def ablation_label(ablation: dict[str, Any]) -> str:
    """``param=pixel, aug=none``; ``default`` for the point with no ablation axes."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in ablation.items()) or "default"


def _fmt(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


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
    """A loaded, validated spec. Build it with :func:`load_spec` or :func:`parse_spec`.

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
        eval: probe settings (``epochs``, ``seeds``, ``batch``, ``full_mode``), defaults from
            :func:`lgm_ray.evaluate.evaluate`.
        resources: what a trial asks of the cluster.
        storage: folder holding the sweep's folder (absolute; shared on a multi-node cluster).
        mlflow: tracking URI and experiment.
        description: free text, logged with the parent run.
        paper: free-form record of the numbers the spec should reproduce (logged, not used).
        source: the YAML file it came from.
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

    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage) / self.name

    def dataset(self, name: str) -> Dataset:
        return next(d for d in self.datasets if d.name == name)

    def base_config(self) -> DistillConfig:
        """The run settings shared by every trial (``DistillConfig`` defaults + ``config``)."""
        return DistillConfig.from_dict(self.config, source="config")

    def eval_kwargs(self) -> dict[str, Any]:
        """Probe settings: ``evaluate``'s defaults overridden by the spec's ``eval``."""
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
            }
            if "workers" in run_field_types():
                cfg["workers"] = self.resources.workers
            parts = [ds.name, backbone, *(f"{k}={_fmt(v)}" for k, v in ablation.items()), f"seed{seed}"]
            key = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(parts))
            points.append(TrialPoint(key, ds.name, backbone, seed, ablation, cfg))
        return points

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (every default filled in), as saved with the results."""
        out = dataclasses.asdict(self)
        out["datasets"] = {d.name: {"shards": d.shards, "build": d.build} for d in self.datasets}
        out["config"] = self.base_config().to_dict()
        for k in ("backbone", "shards", "seed", "out", "device"):
            out["config"].pop(k, None)
        out["eval"] = self.eval_kwargs()
        return out


# ---------------------------------------------------------------- parsing


def _names(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where} must be a list of names")
    if not value:
        raise SpecError(f"{where} is empty: name at least one")
    return value


def expand_backbones(patterns: list[str], where: str) -> list[str]:
    """Registry names for a list of names / globs; an unknown name lists the known ones."""
    from lgm_ray.backbones import list_backbones

    known = list_backbones()
    out: list[str] = []
    for pat in patterns:
        hits = fnmatch.filter(known, pat) if any(c in pat for c in "*?[") else [pat] if pat in known else []
        if not hits:
            raise SpecError(
                f"{where}: unknown backbone {pat!r}{suggest(pat, known)}; known backbones: {', '.join(known)}"
            )
        out += [h for h in hits if h not in out]
    return out


def _abs(path: str, base: Path) -> str:
    if "://" in path:
        return path
    return str((base / Path(path).expanduser()).resolve())


def _datasets(value: Any, cwd: Path) -> list[Dataset]:
    from lgm_ray.shards_build import SOURCES

    if not isinstance(value, dict) or not value:
        raise SpecError("datasets must map a name to a shards folder/URL, e.g. {digits: shards/digits}")
    out = []
    for name, entry in value.items():
        where = f"datasets.{name}"
        if isinstance(entry, str):
            entry = {"shards": entry}
        if not isinstance(entry, dict):
            raise SpecError(f"{where} must be a shards path or a mapping {{shards: PATH, build: SOURCE}}")
        _unknown_keys(entry, ("shards", "build"), where)
        if not isinstance(entry.get("shards"), str):
            raise SpecError(f"{where}.shards: give the shard folder or URL")
        build = entry.get("build")
        if build is not None and build != "digits":
            raise SpecError(
                f"{where}.build = {build!r}: only offline sources can be built on demand "
                f"('digits'); build others first with `python -m lgm_ray.shards build` "
                f"(sources: {', '.join(SOURCES)})"
            )
        out.append(Dataset(str(name), _abs(entry["shards"], cwd), build))
    return out


def _ablations(value: Any, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The ablation points: a mapping axis → values is their product; a list names each point."""
    if value is None:
        return [{}]
    if isinstance(value, dict):
        for axis, values in value.items():
            if isinstance(values, list) and not values:
                raise SpecError(f"ablations.{axis} has no values: give at least one, or remove the axis")
        axes = {axis: values if isinstance(values, list) else [values] for axis, values in value.items()}
        points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    elif isinstance(value, list):
        if not value:
            raise SpecError("ablations is an empty list: name at least one point ({} is the unablated run)")
        points = value
    else:
        raise SpecError(
            "ablations must map a run field to its values ({param: [pyramid, pixel]}, a grid) or "
            "list the points ([{}, {color: false}, {param: pixel}])"
        )
    out: list[dict[str, Any]] = []
    for i, point in enumerate(points):
        where = "ablations" if isinstance(value, dict) else f"ablations[{i}]"
        if not isinstance(point, dict):
            raise SpecError(f"{where} must be a mapping of run fields, e.g. {{color: false}}")
        point = check_run_fields(point, where)
        for axis in point:
            if axis in config:
                raise SpecError(f"ablations.{axis}: {axis!r} is also set in config; keep it in one place")
        if point in out:
            raise SpecError(
                f"{where}: the point {point} is listed twice"
                if isinstance(value, list)
                else f"ablations.{next(iter(point))} lists a value twice"
            )
        out.append(point)
    return out


def parse_spec(
    data: dict[str, Any],
    *,
    source: str | None = None,
    cwd: str | Path | None = None,
    check_paths: bool = True,
) -> SweepSpec:
    """Validate a spec mapping and resolve it.

    Args:
        data: the YAML's mapping.
        source: the file it came from (for messages and the default name).
        cwd: base of relative paths (default: the working directory).
        check_paths: check that the datasets' shard folders exist (or can be built) and open.

    Raises:
        SpecError: naming the field and the fix.
    """
    cwd = Path(cwd or Path.cwd())
    where = source or "spec"
    if not isinstance(data, dict):
        raise SpecError(f"{where} must hold a mapping of spec fields ({', '.join(SPEC_KEYS)})")
    _unknown_keys(data, SPEC_KEYS, where)
    for required in ("datasets", "backbones"):
        if required not in data:
            raise SpecError(f"{where}: missing {required!r}")
    name = data.get("name") or (Path(source).stem if source else None)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SpecError(f"name = {name!r}: give a name of letters, digits, '_', '.', '-'")

    config: dict[str, Any] = {}
    if data.get("config_file") is not None:
        from lgm_ray.config import load_yaml

        file = _abs(str(data["config_file"]), cwd)
        try:
            config.update(load_yaml(file))
        except ConfigError as exc:
            raise SpecError(f"config_file: {exc}") from None
        for k in GRID_FIELDS:
            config.pop(k, None)  # a run config file may name its own data and output; the grid sets them
        config = check_run_fields(config, f"config_file {file}")
    overrides = data.get("config") or {}
    if not isinstance(overrides, dict):
        raise SpecError("config must map run fields (lgm_ray.config.DistillConfig) to values")
    overrides = check_run_fields(overrides, "config")
    config.update(overrides)
    # A point's values override config_file's; a key a point does not set keeps config_file's value
    # (a list point {} is the config file's own run, not the defaults).
    ablations = _ablations(data.get("ablations"), overrides)

    backbones = expand_backbones(_names(data["backbones"], "backbones"), "backbones")
    eval_backbones = expand_backbones(
        _names(data.get("eval_backbones") or backbones, "eval_backbones"), "eval_backbones"
    )
    ablation_backbones = None
    if data.get("ablation_backbones") is not None:
        ablation_backbones = expand_backbones(
            _names(data["ablation_backbones"], "ablation_backbones"), "ablation_backbones"
        )
        outside = [b for b in ablation_backbones if b not in backbones]
        if outside:
            raise SpecError(f"ablation_backbones: {outside} are not distillation backbones ({backbones})")
    seeds = data.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or not all(_type_ok(s, int) for s in seeds):
        raise SpecError(f"seeds = {seeds!r}: give a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"seeds = {seeds!r} lists a seed twice")
    from lgm_ray.baselines import BASELINES

    baselines = data.get("baselines", list(BASELINES))
    baselines = [] if baselines is None else baselines
    if not isinstance(baselines, list):
        raise SpecError("baselines must be a list (possibly empty)")
    for b in baselines:
        if b not in BASELINES:
            raise SpecError(
                f"baselines: unknown baseline {b!r}{suggest(str(b), BASELINES)}; "
                f"choose from {', '.join(BASELINES)}"
            )
    storage = data.get("storage", "runs/sweeps")
    if not isinstance(storage, str) or "://" in storage:
        raise SpecError(
            f"storage = {storage!r}: give a folder (on a multi-node cluster, a shared one "
            f"such as an NFS/EFS mount, see cluster.yaml)"
        )
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpecError("description must be text")
    spec = SweepSpec(
        name=name,
        datasets=_datasets(data["datasets"], cwd),
        backbones=backbones,
        eval_backbones=eval_backbones,
        config=config,
        ablations=ablations,
        ablation_backbones=ablation_backbones,
        seeds=list(seeds),
        baselines=list(baselines),
        eval=_check_eval(data.get("eval")),
        resources=_build(Resources, data.get("resources"), "resources").validate(),
        storage=_abs(storage, cwd),
        mlflow=_build(Tracking, data.get("mlflow"), "mlflow"),
        description=description,
        paper=data.get("paper"),
        source=source,
    )
    _check_points(spec)
    if check_paths:
        check_datasets(spec)
    return spec


def _check_points(spec: SweepSpec) -> None:
    """Every grid point must make a valid ``DistillConfig`` (choices and ranges are checked there)."""
    seen: set[str] = set()
    for point in spec.grid():
        try:
            point.resolved()
        except (ConfigError, TypeError) as exc:
            m = re.search(r"config field '(\w+)'", str(exc))
            name = m.group(1) if m else None
            where = f"ablations.{name}" if name in point.ablation else f"config.{name}" if name else "config"
            raise SpecError(f"{where}: {exc}") from None
        if point.key in seen:
            raise SpecError(
                f"two grid points share the name {point.key!r}; make the ablation values distinct"
            )
        seen.add(point.key)


def check_datasets(spec: SweepSpec) -> None:
    """Every dataset's shards exist and open (or can be built offline on demand)."""
    from lgm_ray.shards import ShardError, ShardSet
    from lgm_ray.shards_index import is_pattern
    from lgm_ray.shards_stream import is_local

    for ds in spec.datasets:
        # A folder must hold a manifest (or be built); patterns and manifest files are opened as they are.
        plain_folder = is_local(ds.shards) and not is_pattern(ds.shards) and not ds.shards.endswith(".json")
        if (plain_folder and not (Path(ds.shards) / "manifest.json").is_file()
                and not any(Path(ds.shards).glob("**/*.tar"))):
            if ds.build:
                continue  # built by the driver before the sweep starts
            raise SpecError(
                f"datasets.{ds.name}: no shard set at {ds.shards!r} (no manifest.json); build it, e.g. "
                f"`python -m lgm_ray.shards build digits --out {ds.shards}`, or fix the path"
            )
        try:
            ShardSet(ds.shards)
        except (ShardError, OSError, ValueError) as exc:
            raise SpecError(f"datasets.{ds.name}: {exc}") from None


def load_spec(path: str | Path, *, cwd: str | Path | None = None, check_paths: bool = True) -> SweepSpec:
    """Read and validate a spec file (see :func:`parse_spec`)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    return parse_spec(data or {}, source=str(path), cwd=cwd, check_paths=check_paths)


# ---------------------------------------------------------------- resources


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in bundle.items())


def check_resources(resources: Resources, nodes: list[dict[str, float]], where: str = "the cluster") -> int:
    """Fail if no placement of one trial exists; else return how many trials the nodes hold at once.

    Args:
        resources: the spec's request.
        nodes: each node's total resources in Ray's names (``CPU``, ``GPU``, ``memory``), e.g. from
            ``ray.nodes()`` plus the autoscaler's node types.
        where: how to name ``nodes`` in the message.

    Raises:
        SpecError: a bundle no node can hold, or more than all nodes together hold.
    """
    bundles = resources.bundles()
    for i, bundle in enumerate(bundles):
        if not any(_fits(bundle, n) for n in nodes):
            what = "the trial itself" if i == 0 else "one worker"
            biggest = {k: max(n.get(k, 0.0) for n in nodes) for k in bundle}
            raise SpecError(
                f"resources: {what} asks for {bundle}, but no node of {where} has that much (largest: "
                f"{biggest}); lower resources.cpus_per_worker / gpus_per_worker, or add such nodes"
            )
    left = [dict(n) for n in nodes]
    trials = 0
    while True:  # first-fit: how many whole trials fit side by side
        trial_left = [dict(n) for n in left]
        for bundle in bundles:
            node = next((n for n in trial_left if _fits(bundle, n)), None)
            if node is None:
                if trials == 0:
                    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
                    raise SpecError(
                        f"resources: one trial needs {resources.workers} workers × "
                        f"{{CPU: {resources.cpus_per_worker}, GPU: {resources.gpus_per_worker}}} plus "
                        f"{bundles[0]} of its own, more than {where} holds ({total}); lower "
                        f"resources.workers or the per-worker request"
                    )
                return trials
            for k, v in bundle.items():
                node[k] -= v
        left = trial_left
        trials += 1
        if trials >= 4096:
            return trials
