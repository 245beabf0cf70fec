"""One training set on several evaluation backbones, as Ray tasks or in turn; and the evaluation command.

:func:`evaluate_cross_model` runs the one-backbone protocol (:func:`lgm_ray.evaluate.evaluate`) once
per evaluation backbone: as parallel Ray tasks from a driver where Ray is up, one after the other in
this process otherwise (inside a Ray Tune trial or a Ray Train worker, to stay within its
resources), with the same numbers either way. Where an evaluation runs is a scheduling question, not
part of what it measures, so it lives apart from the protocol: this module depends on
:mod:`lgm_ray.evaluate`, never the reverse.

The command ``python -m lgm_ray.evaluate --synset SET.pt --backbone NAME[,NAME…] --shards
shards/NAME`` is :func:`main` here (``lgm_ray/evaluate.py`` only hands its ``__main__`` over): it is
the dispatch's front end. It checks the inputs, resolves every backbone's settings
(:func:`lgm_ray.evaluate.resolve_settings`: a flag that overrides one of the set's own says so on
stderr), runs the backbones as Ray tasks with ``--ray`` (``ray.init()``: a local Ray, or the cluster
that ``RAY_ADDRESS`` names), sequentially otherwise, and prints one table row per backbone.
Cross-model (``--backbone a,b,c``): every backbone gets the set's resolutions, and the set's
normalisation applies only to the backbone it was distilled with; the others get their own
(``native``) unless ``--normalization`` asks otherwise. A set without a config (the reference's
format) and the baselines use the defaults (256 / 224 / native) unless flags say otherwise.

Bad input (an unknown backbone, a missing file or split, …) raises
:class:`~lgm_ray.feature_cache.EvaluationInputError`; the command prints it as one line and exits
with status 2, also when a Ray task raised it. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lgm_ray import baselines as bl
from lgm_ray.backbones import BackboneWeightsError, list_backbones
from lgm_ray.evaluate import (
    EVAL_SPLITS,
    FULL_MODES,
    NORMALIZATIONS,
    check_split,
    evaluate,
    open_shards,
    resolve_settings,
)
from lgm_ray.feature_cache import EvaluationInputError, check_backbone, check_device

__all__ = ["evaluate_cross_model", "main"]

# ---------------------------------------------------------------- cross-model, Ray or not


def _evaluate_task(backbone_name: str, shards_root: str, images: torch.Tensor | None,
                   labels: torch.Tensor | None, kwargs: dict) -> dict:
    """One backbone's evaluation: the body of a Ray task, or one turn of the sequential loop."""
    return evaluate(backbone_name, shards_root, images=images, labels=labels, **kwargs)


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


def evaluate_cross_model(
    backbones: list[str],
    shards_root: str | Path,
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    weights: dict[str, str] | list[str | None] | None = None,
    normalization: str | dict[str, str] | list[str] = "native",
    raw_output: bool | list[bool] = False,
    parallel: bool | None = None,
    gpus_per_task: float | None = None,
    **kwargs: Any,
) -> list[dict]:
    """Evaluate one training set on several backbones; one :func:`evaluate` result per backbone, in order.

    Where it runs (``parallel``):

    * ``False``: one after the other, in this process. Use it inside a Ray Tune trial or a Ray Train
      worker to stay within the trial's resources.
    * ``True``: every backbone is one Ray task (1 CPU, and ``gpus_per_task`` GPUs, default 1 on
      ``device="cuda"``). Ray must be initialised (``ray.init()``); this function never starts it.
      Called from inside a placement group (a trial's), the tasks are scheduled in that group, and an
      error says so when none of its bundles can hold one — they never escape it.
    * ``None`` (default): Ray tasks when Ray is initialised *and* this process is the driver; in a Ray
      actor or a placement-group task (a Tune trial, a Train worker) the same as ``False``.

    The numbers are the same every way: each evaluation depends on its inputs only, and tasks share
    nothing but the atomic feature cache.

    Args:
        backbones: evaluation backbones.
        shards_root, images, labels: as :func:`evaluate`.
        weights: local weights files: a dict backbone name → file, or a list aligned with
            ``backbones`` (so one architecture can appear twice with different weights).
        normalization: one for all, a dict backbone name → normalisation (others ``native``), or a
            list aligned with ``backbones``: a set's own goes to the backbone it was distilled with
            only (:func:`~lgm_ray.evaluate.synset_settings`).
        raw_output: one for all or a list aligned with ``backbones`` (a reference-preset set's
            backbone: :func:`~lgm_ray.evaluate.synset_settings`).
        parallel: see above.
        gpus_per_task: GPUs per Ray task.
        **kwargs: the other options of :func:`evaluate` (``baseline``, ``split``, ``epochs``, ``seeds``,
            ``real_res``, ``crop_res``, ``device``, ``cache_dir``, …).

    Raises:
        EvaluationInputError: as :func:`evaluate`; also ``parallel=True`` without Ray, or inside a
            placement group that cannot hold a task.
    """
    for name in backbones:
        check_backbone(name)
    files = _per_backbone(weights, backbones, "weights")
    norms = _per_backbone(normalization, backbones, "normalization", default="native")
    raws = list(raw_output) if isinstance(raw_output, (list, tuple)) else [bool(raw_output)] * len(backbones)
    jobs = [(name, str(shards_root), {**kwargs, "weights": w, "normalization": nm, "raw_output": raw})
            for name, w, nm, raw in zip(backbones, files, norms, raws, strict=True)]
    if not _uses_ray(parallel):
        return [_evaluate_task(name, root, images, labels, kw) for name, root, kw in jobs]
    import ray

    if gpus_per_task is None:
        gpus_per_task = 1 if str(kwargs.get("device", "cpu")).startswith("cuda") else 0
    task = ray.remote(_evaluate_task).options(**_task_options(ray, gpus_per_task))
    images_ref, labels_ref = ray.put(images), ray.put(labels)
    return ray.get([task.remote(name, root, images_ref, labels_ref, kw) for name, root, kw in jobs])


# ---------------------------------------------------------------- CLI


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


def _parse_weights(values: list[str], backbones: list[str]) -> dict[str, str]:
    """``--weights`` values (``FILE``, or ``NAME=FILE`` with several backbones) → backbone name → file."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if sep and name in list_backbones():
            out[name] = path
        elif len(backbones) == 1:
            out[backbones[0]] = v
        else:
            raise EvaluationInputError(f"--weights {v!r}: with several backbones write NAME=FILE")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lgm_ray.evaluate`` parser; its flags are :func:`evaluate_cross_model`'s options."""
    p = argparse.ArgumentParser(prog="python -m lgm_ray.evaluate", description="Evaluate a training set "
                                "(distilled, or a real-image baseline) with the paper's linear probe.")
    p.add_argument("--synset", help="distilled set (.pt with 'images' and 'labels'); its own settings are used")
    p.add_argument("--backbone", required=True, help="evaluation backbone(s), comma-separated: " +
                   ", ".join(list_backbones()))
    p.add_argument("--shards", required=True, help="shards folder (held-out split scores; train split for baselines)")
    p.add_argument("--split", choices=EVAL_SPLITS, default="test",
                   help="held-out split that scores the probe (default test; make choices on val)")
    p.add_argument("--baseline", choices=bl.BASELINES, help="evaluate a real-image baseline instead")
    p.add_argument("--full-mode", choices=FULL_MODES, default="fast",
                   help="full baseline: 'fast' = head on cached centre-crop features; 'reference' = augmented")
    p.add_argument("--select-backbone", help="backbone whose features pick centroids/neighbors "
                   "(default: the evaluation backbone)")
    p.add_argument("--select-weights", help="local weights file of --select-backbone")
    p.add_argument("--ipc", type=int, default=1, help="images per class of random/centroids (default 1)")
    p.add_argument("--epochs", type=int, help="probe epochs (default 1000; 100 for --baseline full)")
    p.add_argument("--seeds", type=int, default=5, help="probe seeds 3407+k, k < SEEDS (default 5)")
    p.add_argument("--batch", type=int, help="probe batch (default min(100, n); 128 for full); lr = 1e-3·batch/256")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--weights", action="append", default=[], help="local backbone weights: FILE, or NAME=FILE")
    p.add_argument("--normalization", choices=NORMALIZATIONS,
                   help="input mean/std: the weights' own, or ImageNet's (as the reference). Default: the "
                   "set's for the backbone it was distilled with, native otherwise")
    p.add_argument("--real-res", type=int, help="real images' resize side (default: the set's, else 256)")
    p.add_argument("--crop-res", type=int, help="backbone input / centre-crop side (default: the set's, else 224)")
    p.add_argument("--cache-dir", help="feature cache (default $LGM_RAY_CACHE or ~/.cache/lgm_ray/features)")
    p.add_argument("--ray", action="store_true", help="run the backbones as parallel Ray tasks (ray.init())")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    return p


def _prepare(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Check the command's inputs and resolve the settings: ``(evaluate_cross_model kwargs, notes)``."""
    backbones = [b.strip() for b in args.backbone.split(",") if b.strip()]
    if not backbones:
        raise EvaluationInputError(f"--backbone names no backbone; give one or more of {', '.join(list_backbones())}")
    for name in backbones:
        check_backbone(name)
    check_device(args.device)
    shards = open_shards(args.shards)
    check_split(shards, args.split)
    images = labels = payload = None
    meta: dict = {}
    notes: list[str] = []
    if args.synset and args.baseline in (None, "neighbors"):
        payload = bl.load_synset(args.synset)
        images, labels = payload["images"], payload["labels"]
        meta = {k: payload.get(k) for k in ("class_names", "num_classes")}
        with warnings.catch_warnings():  # errors now, before any note; the warning comes with the run
            warnings.simplefilter("ignore")
            bl.check_synset_classes(labels, shards, **meta, source=args.synset)
        if not isinstance(payload.get("config"), dict):
            notes.append(f"{args.synset} holds no distillation config (reference format): evaluating with "
                         "real_res/crop_res/normalization from flags or the defaults 256/224/native")
    flags = {"normalization": args.normalization, "real_res": args.real_res, "crop_res": args.crop_res}
    per_backbone = []
    for name in backbones:
        settings, more = resolve_settings(payload, name, flags, source=args.synset or "the set")
        per_backbone.append(settings)
        notes.extend(more)
    weights = _parse_weights(args.weights, backbones)
    if payload is not None and isinstance(payload.get("config"), dict):
        cfg = payload["config"]
        distilled_with = payload.get("backbone") or cfg.get("backbone")
        if cfg.get("weights") and distilled_with in backbones and distilled_with not in weights:
            notes.append(f"{args.synset} was distilled with {distilled_with} weights {cfg['weights']}; "
                         f"evaluating {distilled_with} with its default weights (pass --weights for the same)")
    # The set's resolution is the same for every backbone; only the normalisation is per backbone.
    kwargs = dict(
        backbones=backbones, shards_root=args.shards, images=images, labels=labels, weights=weights,
        normalization=[s["normalization"] for s in per_backbone],
        raw_output=[bool(s.get("raw_output")) for s in per_backbone], real_res=per_backbone[0]["real_res"],
        crop_res=per_backbone[0]["crop_res"], split=args.split, baseline=args.baseline, epochs=args.epochs,
        seeds=args.seeds, batch=args.batch, device=args.device, cache_dir=args.cache_dir,
        full_mode=args.full_mode, select_backbone=args.select_backbone, select_weights=args.select_weights,
        ipc=args.ipc, **meta)
    return kwargs, list(dict.fromkeys(notes))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; bad input exits with status 2 and one line naming the problem and the fix."""
    from lgm_ray.shards_format import ShardError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started_ray = False
    try:
        kwargs, notes = _prepare(args)
        for note in notes:
            print(f"{parser.prog}: note: {note}", file=sys.stderr)
        if args.ray:
            import ray

            if not ray.is_initialized():
                ray.init()  # a local Ray, or the cluster that RAY_ADDRESS names
                started_ray = True
        results = evaluate_cross_model(**kwargs, parallel=bool(args.ray))
    except (EvaluationInputError, BackboneWeightsError, ShardError) as exc:
        # Only input errors: each is raised by an explicit check whose message names the fix. One
        # raised in a Ray task arrives wrapped (RayTaskError, with the remote traceback): report its cause.
        ray_exceptions = sys.modules.get("ray.exceptions")
        if ray_exceptions is not None and isinstance(exc, ray_exceptions.RayTaskError):
            exc = exc.cause
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(exc).split())}\n")
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    print(format_table(results))
    if args.json:
        out = results[0] if len(results) == 1 else {"cross_model": True, "results": results}
        print(json.dumps(out))
    return 0
