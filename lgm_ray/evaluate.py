"""Evaluate a training set (distilled, or a real-image baseline) with the paper's linear probe.

``python -m lgm_ray.evaluate --synset SET.pt --backbone NAME --shards shards/NAME`` trains a fresh
linear head on the frozen backbone's features of the set's images, augmented afresh every epoch,
and tests it on a held-out split of the shards (``--split test``, the default, or ``--split val``:
choices are made on ``val``, ``test`` is measured once at the end); see :mod:`lgm_ray.probe` for the
protocol (DESIGN §1) and :mod:`lgm_ray.baselines` for ``--baseline``.

**A set is evaluated with its own settings.** A set written by ``python -m lgm_ray.distill`` carries
its run's config: the real images' resize side ``real_res``, the backbone's input side ``crop_res``
and the input ``normalization`` it was distilled with come from there (:func:`synset_settings`;
the images' own side is reported as ``syn_res``). A flag that overrides one of them says so on
stderr. Cross-model (``--backbone a,b,c``): every backbone gets the set's resolutions, and the set's
normalisation applies only to the backbone it was distilled with; the others get their own
(``native``) unless ``--normalization`` asks otherwise. A set without a config (the reference's
format) and the baselines use the defaults (256 / 224 / native) unless flags say otherwise.

Several backbones run as parallel Ray tasks with ``--ray`` (or, from Python, see
:func:`evaluate_cross_model`), sequentially otherwise, with the same numbers either way. The
one-backbone functions (:func:`evaluate`, :func:`evaluate_synset`, :func:`evaluate_baseline`) never
touch Ray: inside a Ray Tune trial they run in the trial's own process, on its own resources.

Class checks: labels outside the shards' classes, ``class_names`` or ``num_classes`` that differ from
the manifest's are errors (the set was distilled from other data). A set with no image of some
class only *warns*: the head still has a row for every class and is tested on the full held-out
split, so the number stays comparable, and a partial set (e.g. one class shard) is a legitimate
thing to inspect.

Held-out and train-split features are cached on disk (:mod:`lgm_ray.feature_cache`, ``--cache-dir``).

Bad input (an unknown backbone, a missing file or split, …) raises
:class:`~lgm_ray.feature_cache.EvaluationInputError`; the command prints it as one line and exits
with status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lgm_ray import baselines as bl
from lgm_ray import probe
from lgm_ray.backbones import BackboneWeightsError, list_backbones
from lgm_ray.feature_cache import (
    EvaluationInputError,
    FeatureSource,
    MissingInputError,
    check_backbone,
    check_device,
)

__all__ = [
    "EVAL_SPLITS", "EvaluationInputError", "evaluate", "evaluate_baseline", "evaluate_cross_model",
    "evaluate_synset", "main", "synset_settings",
]

log = logging.getLogger(__name__)

FULL_MODES = ("fast", "reference")
FULL_EPOCHS = 100  # the reference's full-dataset probe: 100 epochs at batch 128
FULL_BATCH = 128
EVAL_SPLITS = ("val", "test")  # the held-out splits a probe is scored on
NORMALIZATIONS = ("native", "imagenet")
# The settings a distilled set fixes, their defaults for sets without a config, and their flags.
DEFAULT_SETTINGS: dict[str, Any] = {"normalization": "native", "real_res": 256, "crop_res": 224}
SETTING_FLAGS = {"normalization": "--normalization", "real_res": "--real-res", "crop_res": "--crop-res"}
_SPLIT_FIX = {
    "val": "hold one out of train with `python -m lgm_ray.shards build SOURCE --out DIR --val-fraction 0.1`, "
           "or score on --split test",
    "test": "build the shards with a test split (`--test-fraction 0.1`), or score on --split val",
}


def open_shards(root: str | Path):
    """Open a shards folder, with an error that says how to build one when it is missing."""
    from lgm_ray.shards_index import is_pattern
    from lgm_ray.shards_stream import is_local

    root = str(root)
    if is_local(root) and not is_pattern(root) and not root.endswith(".json") and not Path(root).is_dir():
        raise MissingInputError(
            f"shards folder {root!r} does not exist; build it first, e.g. "
            f"`python -m lgm_ray.shards build digits --out {root}`, or pass the right --shards"
        )
    from lgm_ray.shards import ShardSet

    return ShardSet(root)


def check_split(shards, split: str) -> None:
    """Raise an :class:`EvaluationInputError` unless ``split`` is a held-out split the shards hold."""
    if split not in EVAL_SPLITS:
        raise EvaluationInputError(f"split {split!r}: a probe is scored on one of {', '.join(EVAL_SPLITS)}")
    counts = shards.manifest["counts"]
    if sum(counts.get(split, ())) == 0:
        have = ", ".join(s for s, c in counts.items() if sum(c)) or "none"
        raise EvaluationInputError(
            f"shards {shards.root} have no {split!r} split (non-empty splits: {have}); {_SPLIT_FIX[split]}"
        )


# ---------------------------------------------------------------- the set's own settings


def synset_settings(payload: dict, backbone_name: str) -> dict[str, Any]:
    """The probe settings a saved set fixes for an evaluation on ``backbone_name``.

    ``real_res`` and ``crop_res`` come from the set's config (``payload["config"]``, a
    :meth:`lgm_ray.config.DistillConfig.to_dict`) whatever the evaluation backbone: they are the
    set's resolution. ``normalization`` comes from it only when ``backbone_name`` is the backbone the
    set was distilled with (``payload["backbone"]``, else the config's): another backbone is fed its
    own mean/std. Settings the file does not hold are left out (a reference-format set holds none),
    so a caller's defaults apply.

    Use: ``evaluate_synset(p["images"], p["labels"], name, shards, **synset_settings(p, name))``.
    """
    cfg = payload.get("config")
    cfg = cfg if isinstance(cfg, dict) else {}
    out: dict[str, Any] = {k: int(cfg[k]) for k in ("real_res", "crop_res") if cfg.get(k) is not None}
    distilled_with = payload.get("backbone") or cfg.get("backbone")
    if cfg.get("normalization") is not None and backbone_name == distilled_with:
        out["normalization"] = str(cfg["normalization"])
    if cfg.get("raw_output") and backbone_name == distilled_with:  # the reference preset's CLIP features
        out["raw_output"] = True
    return out


def resolve_settings(payload: dict | None, backbone_name: str, flags: dict[str, Any],
                     source: str = "the set") -> tuple[dict[str, Any], list[str]]:
    """The settings to evaluate with: a flag, else the set's value (:func:`synset_settings`), else the default.

    Args:
        payload: the loaded set, or ``None`` (a baseline).
        backbone_name: the evaluation backbone.
        flags: ``normalization`` / ``real_res`` / ``crop_res`` → the flag's value, ``None`` when not given.
        source: how to name the set in notes (its path).

    Returns:
        ``(settings, notes)``: one note per flag whose value differs from the set's, naming the
        flag, the file's value and the value used.
    """
    from_set = synset_settings(payload, backbone_name) if payload is not None else {}
    used: dict[str, Any] = {}
    notes: list[str] = []
    for key, flag in SETTING_FLAGS.items():
        given = flags.get(key)
        if given is None:
            used[key] = from_set.get(key, DEFAULT_SETTINGS[key])
            continue
        used[key] = given
        if key in from_set and from_set[key] != given:
            notes.append(f"{flag} {given} overrides {key}={from_set[key]} of {source} "
                         f"(evaluating on {backbone_name}): using {given}")
    if from_set.get("raw_output"):
        used["raw_output"] = True
    return used, notes


# ---------------------------------------------------------------- one evaluation


def _run_seeds(env: FeatureSource, fit: Callable[[int, int], nn.Module], n_seeds: int, split: str) -> dict:
    """Train one probe per seed (``fit(k, seed) → head``), score each on ``split``, and summarise."""
    held_out = env.features(split)
    seeds = probe.eval_seeds(n_seeds)
    top1, top5, topk = [], [], 1
    for k, seed in enumerate(seeds):
        scores = probe.score_head(fit(k, seed), held_out.features, held_out.labels)
        top1.append(scores["top1"])
        top5.append(scores["top5"])
        topk = scores["topk"]
        log.info("%s seed %d: %s top-1 %.2f  top-%d %.2f", env.backbone.name, seed, split, top1[-1], topk,
                 top5[-1])
    m1, s1 = probe.summarize(top1)
    m5, s5 = probe.summarize(top5)
    return {"seeds": seeds, "top1_per_seed": top1, "top5_per_seed": top5, "top1_mean": m1, "top1_std": s1,
            "top5_mean": m5, "top5_std": s5, "topk": topk, "n_eval": len(held_out.labels)}


def _selection_source(env: FeatureSource, select_backbone: str | None, select_weights: str | None,
                      cache_dir: str | Path | None) -> FeatureSource:
    """The backbone whose centre-crop features pick centroids / neighbours: the evaluation one by default."""
    if select_backbone in (None, env.backbone.name) and select_weights is None:
        return env
    return FeatureSource(select_backbone or env.backbone.name, env.shards, weights=select_weights,
                         normalization=env.normalization, device=env.device, real_res=env.real_res,
                         crop_res=env.crop_res, cache_dir=cache_dir)


def evaluate(
    backbone_name: str,
    shards_root: str | Path,
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    baseline: str | None = None,
    class_names: list[str] | None = None,
    num_classes: int | None = None,
    epochs: int | None = None,
    seeds: int = 5,
    batch: int | None = None,
    device: str = "cpu",
    weights: str | None = None,
    normalization: str = "native",
    real_res: int = 256,
    crop_res: int = 224,
    raw_output: bool = False,
    split: str = "test",
    cache_dir: str | Path | None = None,
    full_mode: str = "fast",
    select_backbone: str | None = None,
    select_weights: str | None = None,
    ipc: int = 1,
) -> dict:
    """One evaluation: a training set (``images``/``labels``, or ``baseline``) on one backbone.

    Runs in this process (never Ray): safe inside a Ray Tune trial.

    Args:
        backbone_name: the evaluation backbone (a registry name).
        shards_root: the shards folder whose ``split`` scores the probe (and whose train split the
            baselines draw from).
        images, labels: the distilled set (N×3×H×W in [0, 1], N); required unless ``baseline`` is
            ``random``, ``centroids`` or ``full``; ``neighbors`` finds their nearest real images.
        baseline: ``None`` (evaluate ``images``) or one of ``random``, ``centroids``, ``neighbors``,
            ``full`` (:mod:`lgm_ray.baselines`).
        class_names, num_classes: the set's metadata, checked against the manifest when given.
        epochs: probe epochs; default 1,000 (100 for ``full``).
        seeds: probe seeds ``3407 + k``, ``k < seeds`` (``random`` uses selection seed ``k`` too).
        batch: probe batch; default ``min(100, n)`` (128 for ``full``). The learning rate follows it.
        device: ``cpu`` or ``cuda``.
        weights: a local weights file for the evaluation backbone.
        normalization: ``native`` or ``imagenet`` (the reference's choice for every backbone). For a
            distilled set, pass the set's own (:func:`synset_settings`).
        real_res, crop_res: real images are resized to ``real_res``; the backbone sees ``crop_res``
            crops (centre crops on the held-out split). For a distilled set, pass the set's own.
        split: the held-out split that scores the probe: ``"test"`` or ``"val"`` (make choices on
            ``val``; measure ``test`` once at the end).
        cache_dir: feature cache folder (default ``$LGM_RAY_CACHE`` or ``~/.cache/lgm_ray/features``).
        full_mode: ``fast`` (head on cached centre-crop features, no augmentation) or ``reference``
            (augmented, features recomputed every epoch, as the reference).
        select_backbone, select_weights: backbone whose centre-crop features pick ``centroids`` /
            ``neighbors`` (default: the evaluation backbone).
        ipc: images per class of the ``random`` and ``centroids`` baselines.

    Returns:
        A JSON-able dict: ``top1_mean``, ``top1_std``, ``top5_mean``, ``top5_std`` (percent,
        population std over seeds), ``top1_per_seed``, ``top5_per_seed``, ``seeds``, ``split``,
        ``n_eval`` (held-out images), ``n_train``, ``backbone``, ``baseline``, ``training_set``,
        ``epochs``, ``batch``, ``lr``, ``normalization``, ``real_res``, ``crop_res``, ``syn_res`` (the
        set's image side, ``None`` for baselines that use no set), ``feature_cache`` (split → whether it
        was a cache hit), ``wall_s``, and per baseline ``selection_seeds`` / ``selected_keys`` /
        ``select_backbone`` / ``full_mode``.

    Raises:
        EvaluationInputError: bad input (unknown backbone or baseline, missing shards or split, a set
            of the wrong form or from other data, …); the message names the fix.
        BackboneWeightsError: the backbone's weights are not available.
        lgm_ray.shards.ShardError: damaged shards.
    """
    t0 = time.perf_counter()
    if baseline is not None and baseline not in bl.BASELINES:
        raise EvaluationInputError(f"unknown baseline {baseline!r}; choose one of {', '.join(bl.BASELINES)}")
    if baseline in (None, "neighbors") and images is None:
        raise EvaluationInputError(
            "--baseline neighbors needs --synset (the distilled set whose images' nearest real neighbours "
            "it picks)" if baseline else "nothing to evaluate: give a synthetic set (--synset) or --baseline"
        )
    if full_mode not in FULL_MODES:
        raise EvaluationInputError(f"unknown full mode {full_mode!r}; choose one of {', '.join(FULL_MODES)}")
    if normalization not in NORMALIZATIONS:
        raise EvaluationInputError(f"unknown normalization {normalization!r}; choose one of "
                                   f"{', '.join(NORMALIZATIONS)}")
    for name, value in (("seeds", seeds), ("ipc", ipc), ("real_res", real_res), ("crop_res", crop_res),
                        ("epochs", epochs), ("batch", batch)):
        if value is not None and value < 1:
            raise EvaluationInputError(f"{name} must be ≥ 1, got {value}")
    check_backbone(backbone_name)
    if select_backbone is not None:
        check_backbone(select_backbone)
    check_device(device)
    shards = open_shards(shards_root)
    check_split(shards, split)
    if baseline in ("random", "centroids") and min(shards.manifest["counts"]["train"]) < ipc:
        raise EvaluationInputError(f"ipc={ipc}: some class of {shards.root} has only "
                                   f"{min(shards.manifest['counts']['train'])} train images; lower --ipc")
    if images is not None and baseline in (None, "neighbors"):
        bl.checked_synset({"images": images, "labels": labels})
        bl.check_synset_classes(labels, shards, class_names=class_names, num_classes=num_classes)
    env = FeatureSource(backbone_name, shards, weights=weights, normalization=normalization, device=device,
                        real_res=real_res, crop_res=crop_res, cache_dir=cache_dir, raw_output=raw_output)
    extra: dict = {}
    if baseline == "full":
        epochs, used_batch = epochs or FULL_EPOCHS, batch or FULL_BATCH
        extra["full_mode"] = full_mode
        if full_mode == "fast":
            train = env.features("train")
            n_train = len(train.labels)

            def fit(k: int, seed: int):
                return probe.train_probe_on_features(
                    train.features, train.labels, num_classes=shards.num_classes, seed=seed,
                    epochs=epochs, batch=used_batch, device=device)
        else:
            n_train = shards.count("train")

            def chunks():
                for x, y, _ in shards.iter_split("train", resize=real_res, crop=real_res):
                    yield x, y

            def fit(k: int, seed: int):
                return probe.train_probe_on_stream(
                    chunks, n_train, env.backbone, feature_dim=env.backbone.feature_dim,
                    num_classes=shards.num_classes, seed=seed, epochs=epochs, batch=used_batch,
                    crop_res=crop_res, device=device)
    else:
        if baseline is None:
            sets = [(images.float(), labels.long())]
        elif baseline == "random":
            sets = [bl.select_random(shards, k, ipc=ipc, real_res=real_res) for k in range(seeds)]
            extra["selection_seeds"] = list(range(seeds))
        else:
            sel = _selection_source(env, select_backbone, select_weights, cache_dir)
            train = sel.features("train")
            query = (bl.image_features(sel.backbone, images, real_res, crop_res, device)
                     if baseline == "neighbors" else None)
            idx = bl.select_indices(baseline, train.features, train.labels, shards.num_classes, ipc=ipc,
                                    query=query, query_labels=labels)
            sets = [bl.select_by_indices(shards, train.keys, train.labels, idx, real_res=real_res)]
            extra["select_backbone"] = sel.backbone.name
            extra["selected_keys"] = [train.keys[i] for i in idx.tolist()]
            if sel is not env:
                extra["select_feature_cache"] = dict(sel.cache_hits)
        epochs = epochs or probe.DEFAULT_EPOCHS
        n_train = len(sets[0][1])
        used_batch = batch or probe.default_batch(n_train)

        def fit(k: int, seed: int):
            x, y = sets[k % len(sets)]
            return probe.train_probe_on_images(
                x, y, env.backbone, feature_dim=env.backbone.feature_dim, num_classes=shards.num_classes,
                seed=seed, epochs=epochs, batch=used_batch, crop_res=crop_res, device=device)

    scores = _run_seeds(env, fit, seeds, split)
    syn_res = int(images.shape[-1]) if images is not None and baseline in (None, "neighbors") else None
    return {
        "backbone": backbone_name, "baseline": baseline, "training_set": baseline or "distilled",
        "split": split, "n_train": n_train, "epochs": epochs, "batch": used_batch,
        "lr": probe.probe_lr(used_batch), **scores, "num_classes": shards.num_classes, "real_res": real_res,
        "crop_res": crop_res, "syn_res": syn_res, "normalization": normalization, "device": str(device),
        "shards": str(shards_root), **extra, "feature_cache": dict(env.cache_hits),
        "wall_s": round(time.perf_counter() - t0, 3),
    }


def evaluate_synset(images: torch.Tensor, labels: torch.Tensor, backbone_name: str, shards_root: str | Path,
                    *, epochs: int = probe.DEFAULT_EPOCHS, seeds: int = 5, **kwargs: Any) -> dict:
    """Evaluate a distilled set on one backbone with the reference protocol, in this process.

    ``kwargs`` are :func:`evaluate`'s other keyword arguments (``split``, ``normalization``,
    ``real_res``, ``crop_res``, ``device``, ``weights``, ``batch``, ``cache_dir``, ``class_names``,
    ``num_classes``). Give the set's own settings: ``**synset_settings(payload, backbone_name)``.
    Never starts Ray or Ray tasks.
    """
    return evaluate(backbone_name, shards_root, images=images, labels=labels, epochs=epochs, seeds=seeds,
                    **kwargs)


def evaluate_baseline(baseline: str, backbone_name: str, shards_root: str | Path, **kwargs: Any) -> dict:
    """Evaluate a real-image baseline on one backbone, in this process (see :func:`evaluate`).

    ``kwargs`` are :func:`evaluate`'s keyword arguments (``images``/``labels`` for ``neighbors``,
    ``split``, ``epochs``, ``seeds``, ``ipc``, ``full_mode``, ``select_backbone``, ``cache_dir``, …).
    Never starts Ray or Ray tasks.
    """
    return evaluate(backbone_name, shards_root, baseline=baseline, **kwargs)


# ---------------------------------------------------------------- cross-model, Ray or not


def _evaluate_task(backbone_name: str, shards_root: str, images, labels, kwargs: dict) -> dict:
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


def _inside_ray_worker(ray) -> bool:
    """Whether this process is a Ray actor or task in a placement group (a Tune trial, a Train worker)."""
    ctx = ray.get_runtime_context()
    return ctx.get_actor_id() is not None or ctx.get_placement_group_id() is not None


def _uses_ray(parallel: bool | None) -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to learn that it is not running
    up = bool(ray is not None and ray.is_initialized())
    if parallel is None:
        return up and not _inside_ray_worker(ray)
    if parallel and not up:
        raise EvaluationInputError(
            "parallel=True evaluates every backbone as a Ray task, but Ray is not initialised in this "
            "process; call ray.init() first (the command line's --ray does), or pass parallel=False")
    return bool(parallel)


def _task_options(ray, num_gpus: float) -> dict:
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
            only (:func:`synset_settings`).
        raw_output: one for all or a list aligned with ``backbones`` (a reference-preset set's
            backbone: :func:`synset_settings`).
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
    p = argparse.ArgumentParser(prog="python -m lgm_ray.evaluate", description=__doc__.split("\n\n")[0])
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
    from lgm_ray.shards import ShardError

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


if __name__ == "__main__":
    sys.exit(main())
