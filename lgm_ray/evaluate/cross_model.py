"""One training set on several evaluation backbones, as Ray tasks or in turn.

:func:`evaluate_cross_model` runs the one-backbone protocol (:func:`lgm_ray.evaluate.protocol.evaluate`) once
per evaluation backbone, with one :class:`~lgm_ray.evaluate.config.EvalConfig` for all of them: as parallel
Ray tasks from a driver where Ray is up, one after the other in this process otherwise (inside a Ray Tune
trial or a Ray Train worker, to stay within its resources), with the same numbers either way. Where an
evaluation runs is a scheduling question, not part of what it measures, so it lives apart from the
protocol: this module depends on :mod:`lgm_ray.evaluate.protocol`, never the reverse.

Per backbone, only what differs between backbones may differ: the weights file, the normalisation and
the raw output (a set's own apply to the backbone it was distilled with only; the others get their
own, ``native``); the resolutions and every probe setting are the config's, the same for all. The
command ``python -m lgm_ray.evaluate`` (:mod:`lgm_ray.evaluate.__main__`) is this function's front end,
and :func:`format_table` its table.

Bad input raises :class:`~lgm_ray.evaluate.feature_cache.EvaluationInputError` (or another
:class:`~lgm_ray.common.errors.InputError`), also when a Ray task raised it: the task's error arrives as
itself, not wrapped. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lgm_ray.common.errors import InputError
from lgm_ray.evaluate.config import EvalConfig
from lgm_ray.evaluate.feature_cache import EvaluationInputError, check_backbone
from lgm_ray.evaluate.protocol import evaluate

__all__ = ["evaluate_cross_model", "format_table"]

# ---------------------------------------------------------------- cross-model, Ray or not


def _evaluate_task(backbone_name: str, shards_root: str, cfg: EvalConfig, images: torch.Tensor | None,
                   labels: torch.Tensor | None, inputs: dict) -> dict:
    """One backbone's evaluation: the body of a Ray task, or one turn of the sequential loop."""
    return evaluate(backbone_name, shards_root, cfg, images=images, labels=labels, **inputs)


def _per_backbone(value: Any, backbones: Sequence[str], what: str, default: Any = None) -> list[Any]:
    """One value per backbone from a scalar, a list aligned with ``backbones`` or a name → value dict."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(backbones):
            raise EvaluationInputError(f"{len(value)} {what} entries for {len(backbones)} backbones")
        return list(value)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(backbones))
        if unknown:
            raise EvaluationInputError(f"{what} given for {unknown}, which are not among the backbones "
                                       f"{list(backbones)}")
        return [value.get(n, default) for n in backbones]
    return [default if value is None else value] * len(backbones)


def _inside_ray_worker(ray: ModuleType) -> bool:
    """Whether this process is a Ray actor or task in a placement group (a Tune trial, a Train worker)."""
    ctx = ray.get_runtime_context()
    return ctx.get_actor_id() is not None or ctx.get_placement_group_id() is not None


def _uses_ray(parallel: bool | None) -> bool:
    """Whether to run as Ray tasks: ``parallel`` as given (``True`` needs Ray up), or decided when ``None``."""
    ray = sys.modules.get("ray")  # never import Ray just to learn that it is not running
    up = bool(ray is not None and ray.is_initialized())
    if parallel is None:
        return up and not _inside_ray_worker(ray)
    if parallel and not up:
        raise EvaluationInputError(
            "parallel=True evaluates every backbone as a Ray task, but Ray is not initialised in this "
            "process; call ray.init() first (the command line's --ray does), or pass parallel=False")
    return bool(parallel)


def _task_options(ray: ModuleType, num_gpus: float) -> dict:
    """Ray task options: 1 CPU (+ GPUs), and inside a placement group (a trial's), pinned to it."""
    opts: dict[str, Any] = {"num_cpus": 1, "num_gpus": num_gpus}
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = get_current_placement_group()
    if pg is None:
        return opts
    need = {"CPU": 1.0, **({"GPU": float(num_gpus)} if num_gpus else {})}
    if not any(all(b.get(r, 0) >= v for r, v in need.items()) for b in pg.bundle_specs):
        raise EvaluationInputError(
            f"parallel=True inside a placement group whose bundles {pg.bundle_specs} cannot hold an evaluation "
            f"task ({need}); pass parallel=False to evaluate in this process, or give the trial such a bundle")
    opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    return opts


def _run_as_ray_tasks(jobs: list[tuple[str, str, EvalConfig, dict]], images: torch.Tensor | None,
                      labels: torch.Tensor | None, gpus_per_task: float) -> list[dict]:
    """Every job as one Ray task; an input error raised in a task is raised here as itself (unwrapped)."""
    import ray

    task = ray.remote(_evaluate_task).options(**_task_options(ray, gpus_per_task))
    images_ref, labels_ref = ray.put(images), ray.put(labels)
    try:
        return ray.get([task.remote(name, root, cfg, images_ref, labels_ref, inputs)
                        for name, root, cfg, inputs in jobs])
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, InputError):
            raise exc.cause from None
        raise


def evaluate_cross_model(
    backbones: list[str],
    shards_root: str | Path,
    cfg: EvalConfig | None = None,
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    weights: dict[str, str] | list[str | None] | None = None,
    normalization: str | dict[str, str] | list[str] | None = None,
    raw_output: bool | dict[str, bool] | list[bool] | None = None,
    parallel: bool | None = None,
    gpus_per_task: float | None = None,
    **inputs: Any,
) -> list[dict]:
    """Evaluate one training set on several backbones; one :func:`evaluate` result per backbone, in order.

    Where it runs (``parallel``):

    * ``False``: one after the other, in this process. Use it inside a Ray Tune trial or a Ray Train
      worker to stay within the trial's resources.
    * ``True``: every backbone is one Ray task (1 CPU, and ``gpus_per_task`` GPUs, default 1 on
      ``cfg.device="cuda"``). Ray must be initialised; this function never starts it. Called from
      inside a placement group (a trial's), the tasks are scheduled in that group, and an error says
      so when none of its bundles can hold one — they never escape it.
    * ``None`` (default): Ray tasks when Ray is initialised *and* this process is the driver; in a Ray
      actor or a placement-group task (a Tune trial, a Train worker) the same as ``False``.

    The numbers are the same every way: each evaluation depends on its inputs only, and tasks share
    nothing but the atomic feature cache.

    Args:
        backbones: evaluation backbones.
        shards_root, images, labels: as :func:`evaluate`.
        cfg: the settings of every evaluation (default :class:`EvalConfig`'s); ``normalization`` and
            ``raw_output`` below override its values per backbone.
        weights: local weights files: a dict backbone name → file, or a list aligned with
            ``backbones`` (so one architecture can appear twice with different weights).
        normalization: per backbone, overriding ``cfg.normalization``: a dict backbone name →
            normalisation (the others keep ``cfg``'s), or a list aligned with ``backbones``; ``None``:
            ``cfg``'s for all. A set's own goes to the backbone it was distilled with only
            (:func:`~lgm_ray.evaluate.protocol.synset_settings`).
        raw_output: per backbone, overriding ``cfg.raw_output``, in the same forms (a reference-preset
            set's backbone: :func:`~lgm_ray.evaluate.protocol.synset_settings`).
        parallel: see above.
        gpus_per_task: GPUs per Ray task.
        **inputs: :func:`evaluate`'s other keyword inputs (``baseline``, ``class_names``,
            ``num_classes``, ``cache_dir``, ``select_backbone``, ``select_weights``).

    Raises:
        EvaluationInputError: as :func:`evaluate`; also ``parallel=True`` without Ray, or inside a
            placement group that cannot hold a task.
    """
    cfg = cfg or EvalConfig()
    for name in backbones:
        check_backbone(name)
    files = _per_backbone(weights, backbones, "weights")
    norms = _per_backbone(normalization, backbones, "normalization", default=cfg.normalization)
    raws = _per_backbone(raw_output, backbones, "raw_output", default=cfg.raw_output)
    jobs = [(name, str(shards_root), cfg.replace(normalization=nm, raw_output=bool(raw)), {**inputs, "weights": w})
            for name, w, nm, raw in zip(backbones, files, norms, raws, strict=True)]
    if not _uses_ray(parallel):
        return [_evaluate_task(name, root, c, images, labels, kw) for name, root, c, kw in jobs]
    if gpus_per_task is None:
        gpus_per_task = 1 if str(cfg.device).startswith("cuda") else 0
    return _run_as_ray_tasks(jobs, images, labels, gpus_per_task)


# ---------------------------------------------------------------- the results as a table


def format_table(results: list[dict]) -> str:
    """A plain-text table, one row per evaluation; it names the split that scored it."""
    head = ("backbone", "training set", "split", "n_train", "epochs", "seeds", "top-1 (%)", "top-k (%)")
    rows = []
    for r in results:
        name = r["training_set"] + (f" ({r['full_mode']})" if r.get("full_mode") else "")
        rows.append((r["backbone"], name, r["split"], str(r["n_train"]), str(r["epochs"]), str(len(r["seeds"])),
                     f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f}",
                     f"{r['top5_mean']:.2f} ± {r['top5_std']:.2f} (k={r['topk']})"))
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])
