"""Reading and checking a sweep spec: YAML → checked values → :class:`~lgm_ray.sweep.spec.SweepSpec`.

:func:`load_spec` reads a file and applies the command line's ``--set KEY=VALUE`` settings to it
(:func:`apply_overrides`, before any check, so a setting is checked like the file); :func:`parse_spec`
checks every field of the mapping (unknown keys get the nearest valid name; values are checked by
``DistillConfig`` and :class:`~lgm_ray.evaluate.config.EvalConfig`), expands backbone globs against the
registry and ablation axes into points, makes relative paths absolute against the working directory
(:mod:`lgm_ray.sweep.spec` lists them), then checks that every grid point makes a valid
``DistillConfig`` and that the datasets' shards exist and hold the splits the trials read. :func:`check_resources` checks a trial's
request against the nodes of a cluster, which the driver knows only once Ray is up.

Everything a spec can get wrong fails here, before any trial starts, with one message naming the
field and the fix (:class:`~lgm_ray.sweep.spec.SpecError`). What a spec is (its classes, field names
and defaults) is in :mod:`lgm_ray.sweep.spec`; this module holds only how raw YAML becomes one and why
a bad one is refused, so each reads on its own.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import itertools
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lgm_ray.common.errors import InputError
from lgm_ray.common.suggest import did_you_mean
from lgm_ray.distill.config import ConfigError, DistillConfig
from lgm_ray.evaluate.config import EvalConfig
from lgm_ray.results.tracking import absolute_uri
from lgm_ray.sweep.spec import (
    GRID_FIELDS,
    RUN_PATH_FIELDS,
    SPEC_KEYS,
    Dataset,
    Resources,
    SpecError,
    SweepSpec,
    Tracking,
    run_field_types,
)

# ---------------------------------------------------------------- keys and types


def _unknown_keys(data: dict, valid: list[str] | tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in valid:
            raise SpecError(
                f"{where}: unknown key {key!r}{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}"
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
                f"{where}: unknown run field {key!r}{did_you_mean(key, hints)}; "
                f"run fields are those of lgm_ray.distill.config.DistillConfig: {', '.join(hints)}"
            )
        try:
            out[key] = DistillConfig.coerce(key, value, f"{where}.{key}")
        except ConfigError as exc:
            raise SpecError(str(exc)) from None
    return out


def _check_eval(data: Any) -> dict[str, Any]:
    """The spec's ``eval:`` block: only :attr:`EvalConfig.SWEEP_FIELDS`, checked by :class:`EvalConfig`."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"eval must be a mapping of {', '.join(EvalConfig.SWEEP_FIELDS)}")
    try:
        EvalConfig.from_dict(data, allowed=EvalConfig.SWEEP_FIELDS, source="eval")
    except InputError as exc:
        raise SpecError(str(exc)) from None
    return dict(data)


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
                f"{where}: unknown backbone {pat!r}{did_you_mean(pat, known)}; known backbones: {', '.join(known)}"
            )
        out += [h for h in hits if h not in out]
    return out


def _abs(path: str, base: Path) -> str:
    if "://" in path:
        return path
    return str((base / Path(path).expanduser()).resolve())


def _abs_paths(fields: dict[str, Any], base: Path) -> dict[str, Any]:
    """Run fields with every path field (:data:`~lgm_ray.sweep.spec.RUN_PATH_FIELDS`) made absolute."""
    return {k: _abs(v, base) if k in RUN_PATH_FIELDS and isinstance(v, str) else v for k, v in fields.items()}


def _datasets(value: Any, cwd: Path) -> list[Dataset]:
    from lgm_ray.shards.sources import SOURCES

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


def _ablations(value: Any, config: dict[str, Any], cwd: Path) -> list[dict[str, Any]]:
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
        point = _abs_paths(check_run_fields(point, where), cwd)
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


def _check_top(data: Any, source: str | None) -> str:
    """The spec is a mapping of known keys with ``datasets`` and ``backbones``; returns its name."""
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
    return name


def _run_config(data: dict[str, Any], cwd: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared run settings (``config_file`` merged under ``config``) and ``config``'s own overrides."""
    config: dict[str, Any] = {}
    if data.get("config_file") is not None:
        from lgm_ray.distill.config import load_yaml

        file = _abs(str(data["config_file"]), cwd)
        try:
            config.update(load_yaml(file))
        except ConfigError as exc:
            raise SpecError(f"config_file: {exc}") from None
        for k in GRID_FIELDS:
            config.pop(k, None)  # a run config file may name its own data and output; the grid sets them
        config = _abs_paths(check_run_fields(config, f"config_file {file}"), cwd)
    overrides = data.get("config") or {}
    if not isinstance(overrides, dict):
        raise SpecError("config must map run fields (lgm_ray.distill.config.DistillConfig) to values")
    overrides = _abs_paths(check_run_fields(overrides, "config"), cwd)
    config.update(overrides)
    return config, overrides


def _backbone_lists(data: dict[str, Any]) -> tuple[list[str], list[str], list[str] | None]:
    """Distillation, evaluation and ablation backbones, globs expanded against the registry."""
    backbones = expand_backbones(_names(data["backbones"], "backbones"), "backbones")
    eval_backbones = expand_backbones(
        _names(data.get("eval_backbones") or backbones, "eval_backbones"), "eval_backbones"
    )
    if data.get("ablation_backbones") is None:
        return backbones, eval_backbones, None
    ablation_backbones = expand_backbones(
        _names(data["ablation_backbones"], "ablation_backbones"), "ablation_backbones"
    )
    outside = [b for b in ablation_backbones if b not in backbones]
    if outside:
        raise SpecError(f"ablation_backbones: {outside} are not distillation backbones ({backbones})")
    return backbones, eval_backbones, ablation_backbones


def _seeds(value: Any) -> list[int]:
    seeds = [value] if isinstance(value, int) else value
    if not isinstance(seeds, list) or not seeds or not all(_type_ok(s, int) for s in seeds):
        raise SpecError(f"seeds = {seeds!r}: give a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"seeds = {seeds!r} lists a seed twice")
    return list(seeds)


def _baselines(value: Any) -> list[str]:
    from lgm_ray.evaluate.baselines import BASELINES

    baselines = [] if value is None else value
    if not isinstance(baselines, list):
        raise SpecError("baselines must be a list (possibly empty)")
    for b in baselines:
        if b not in BASELINES:
            raise SpecError(
                f"baselines: unknown baseline {b!r}{did_you_mean(b, BASELINES)}; "
                f"choose from {', '.join(BASELINES)}"
            )
    return list(baselines)


def _storage(value: Any, cwd: Path) -> str:
    if not isinstance(value, str) or "://" in value:
        raise SpecError(
            f"storage = {value!r}: give a folder (on a multi-node cluster, a shared one "
            f"such as an NFS/EFS mount, see cluster.yaml)"
        )
    return _abs(value, cwd)


def _tracking(data: Any, cwd: Path) -> Tracking:
    tracking = _build(Tracking, data, "mlflow")
    if tracking.tracking_uri:
        tracking.tracking_uri = absolute_uri(tracking.tracking_uri, cwd)
    return tracking


def parse_spec(
    data: dict[str, Any],
    *,
    source: str | None = None,
    cwd: str | Path | None = None,
    check_paths: bool = True,
    overrides: list[str] | tuple[str, ...] = (),
) -> SweepSpec:
    """Validate a spec mapping and resolve it.

    Args:
        data: the YAML's mapping (with any ``--set`` already applied: :func:`apply_overrides`).
        source: the file it came from (for messages and the default name).
        cwd: base of relative paths (default: the working directory).
        check_paths: check that the datasets' shard folders exist (or can be built) and open.
        overrides: the ``--set`` settings ``data`` holds (applied already), recorded in the spec.

    Raises:
        SpecError: naming the field and the fix.
    """
    from lgm_ray.evaluate.baselines import BASELINES

    cwd = Path(cwd or Path.cwd())
    name = _check_top(data, source)
    config, config_overrides = _run_config(data, cwd)
    # A point's values override config_file's; a key a point does not set keeps config_file's value
    # (a list point {} is the config file's own run, not the defaults).
    ablations = _ablations(data.get("ablations"), config_overrides, cwd)
    backbones, eval_backbones, ablation_backbones = _backbone_lists(data)
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
        seeds=_seeds(data.get("seeds", [0])),
        baselines=_baselines(data.get("baselines", list(BASELINES))),
        eval=_check_eval(data.get("eval")),
        resources=_build(Resources, data.get("resources"), "resources").validate(),
        storage=_storage(data.get("storage", "runs/sweeps"), cwd),
        mlflow=_tracking(data.get("mlflow"), cwd),
        description=description,
        paper=data.get("paper"),
        source=source,
        overrides=list(overrides),
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
    """Every dataset's shards exist and open (or can be built offline on demand): the manifest reads, every
    local shard it lists is there at its size, and the splits the trials read (``train`` and the probe's
    ``eval.split``) are in it. Bytes damaged inside a shard are found only when a trial reads them."""
    from lgm_ray.shards.format import ShardError, is_local
    from lgm_ray.shards.locate import is_pattern
    from lgm_ray.shards.reader import ShardSet

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
            shards = ShardSet(ds.shards)
            for split in dict.fromkeys(("train", spec.eval_settings()["split"])):
                shards.count(split)
        except (ShardError, OSError, ValueError) as exc:
            raise SpecError(f"datasets.{ds.name}: {exc}") from None


def load_spec(
    path: str | Path,
    *,
    cwd: str | Path | None = None,
    check_paths: bool = True,
    overrides: list[str] | tuple[str, ...] = (),
) -> SweepSpec:
    """Read a spec file, apply the command line's ``--set KEY=VALUE`` ``overrides`` to it
    (:func:`apply_overrides`), and validate the result (see :func:`parse_spec`)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise SpecError(f"{path} must hold a mapping of spec fields ({', '.join(SPEC_KEYS)})")
    data = apply_overrides(data or {}, overrides)
    return parse_spec(data, source=str(path), cwd=cwd, check_paths=check_paths, overrides=overrides)


# ---------------------------------------------------------------- --set KEY=VALUE


def _section_keys(section: str, data: dict[str, Any]) -> list[str] | None:
    """The keys valid directly under a spec section (``None``: any key, e.g. ``paper``)."""
    fields = {
        "config": list(run_field_types()),
        "eval": list(EvalConfig.SWEEP_FIELDS),
        "resources": [f.name for f in dataclasses.fields(Resources)],
        "mlflow": [f.name for f in dataclasses.fields(Tracking)],
        "datasets": [str(k) for k in data.get("datasets") or {}] if isinstance(data.get("datasets"), dict) else [],
        "ablations": list(run_field_types()),
    }
    return fields.get(section)


def _check_override_key(parts: list[str], data: dict[str, Any], item: str) -> None:
    """The dotted key of ``--set`` names a spec field (with the nearest valid name when it does not)."""
    where = f"--set {item}"
    if parts[0] not in SPEC_KEYS:
        raise SpecError(f"{where}: unknown spec key {parts[0]!r}{did_you_mean(parts[0], SPEC_KEYS)}; "
                        f"spec keys: {', '.join(SPEC_KEYS)}")
    if len(parts) == 1:
        return
    section = parts[0]
    if section == "ablations" and isinstance(data.get("ablations"), list):
        raise SpecError(f"{where}: this spec lists its ablation points; set them whole, e.g. "
                        f"--set 'ablations=[{{}}, {{color: false}}]'")
    valid = _section_keys(section, data)
    if valid is None and section != "paper":
        raise SpecError(f"{where}: {section!r} is a single value, not a mapping; use --set {section}=VALUE")
    if valid is not None and parts[1] not in valid:
        what = "dataset" if section == "datasets" else "key"
        raise SpecError(f"{where}: unknown {section} {what} {parts[1]!r}{did_you_mean(parts[1], valid)}; "
                        f"valid: {', '.join(valid) or '(none)'}")
    if section == "datasets" and len(parts) > 2 and (len(parts) > 3 or parts[2] not in ("shards", "build")):
        raise SpecError(f"{where}: a dataset has the keys shards and build{did_you_mean(parts[2], ('shards', 'build'))}")
    if section not in ("datasets", "paper") and len(parts) > 2:
        raise SpecError(f"{where}: {'.'.join(parts[:2])} is a single value; use --set {'.'.join(parts[:2])}=VALUE")


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of the spec mapping ``data`` with each ``KEY=VALUE`` of ``overrides`` set, in order.

    ``KEY`` is dotted into the spec (``config.steps``, ``eval.epochs``, ``resources.workers``,
    ``datasets.digits.shards``, ``storage``); ``VALUE`` is read as YAML (``20`` an integer, ``false`` a
    boolean, ``[0, 1]`` a list, ``/tmp/x`` text). A missing section is created. The result is checked
    like the file itself (:func:`parse_spec`).

    Raises:
        SpecError: a setting without ``=``, a value that is not YAML, or a key that names no spec field
            (with the nearest valid one).
    """
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise SpecError(f"--set {item!r}: give KEY=VALUE with a dotted KEY, e.g. --set config.steps=20")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"--set {item}: the value is not valid YAML ({' '.join(str(exc).split())})") from None
        _check_override_key(parts, out, item)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and parts[0] == "datasets" and i == 1:
                child = node[part] = {"shards": child}  # `digits: PATH` is short for {shards: PATH}
            elif not isinstance(child, dict):
                raise SpecError(f"--set {item}: {'.'.join(parts[: i + 1])} is not a mapping in the spec")
            node = child
        node[parts[-1]] = value
    return out


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
    _check_each_bundle_fits(bundles, nodes, where)
    trials = _trials_side_by_side(bundles, nodes)
    if trials == 0:
        total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
        raise SpecError(
            f"resources: one trial needs {resources.workers} workers × "
            f"{{CPU: {resources.cpus_per_worker}, GPU: {resources.gpus_per_worker}}} plus "
            f"{bundles[0]} of its own, more than {where} holds ({total}); lower "
            f"resources.workers or the per-worker request"
        )
    return trials


def _check_each_bundle_fits(bundles: list[dict[str, float]], nodes: list[dict[str, float]], where: str) -> None:
    """Each bundle alone (the trial's own, then a worker's) fits on some node."""
    for i, bundle in enumerate(bundles):
        if not any(_fits(bundle, n) for n in nodes):
            what = "the trial itself" if i == 0 else "one worker"
            biggest = {k: max(n.get(k, 0.0) for n in nodes) for k in bundle}
            raise SpecError(
                f"resources: {what} asks for {bundle}, but no node of {where} has that much (largest: "
                f"{biggest}); lower resources.cpus_per_worker / gpus_per_worker, or add such nodes"
            )


def _trials_side_by_side(bundles: list[dict[str, float]], nodes: list[dict[str, float]], cap: int = 4096) -> int:
    """How many whole trials (all their bundles) fit on the nodes at once, placed first-fit (at most ``cap``)."""
    left = [dict(n) for n in nodes]
    trials = 0
    while trials < cap:
        trial_left = [dict(n) for n in left]
        for bundle in bundles:
            node = next((n for n in trial_left if _fits(bundle, n)), None)
            if node is None:
                return trials
            for k, v in bundle.items():
                node[k] -= v
        left = trial_left
        trials += 1
    return trials
