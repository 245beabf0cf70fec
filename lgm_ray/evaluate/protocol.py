"""Evaluate a training set (distilled, or a real-image baseline) with the paper's linear probe.

The paper's evaluation protocol for one training set on one backbone: :func:`evaluate` (with
:func:`evaluate_synset` and :func:`evaluate_baseline`) trains a fresh linear head on the frozen
backbone's features of the set's images, augmented afresh every epoch, and tests it on a held-out
split of the shards (``split="test"``, the default, or ``"val"``: choices are made on ``val``,
``test`` is measured once at the end); see :mod:`lgm_ray.evaluate.probe` for the protocol (DESIGN §1) and
:mod:`lgm_ray.evaluate.baselines` for the real-image baselines.

**A set is evaluated with its own settings.** A set written by ``python -m lgm_ray.distill`` carries
its run's config: the real images' resize side ``real_res``, the backbone's input side ``crop_res``
and the input ``normalization`` it was distilled with come from there (:func:`synset_settings`;
the images' own side is reported as ``syn_res``). A flag that overrides one of them says so
(:func:`resolve_settings`). On another backbone than the one it was distilled with, a set keeps its
resolutions, but its normalisation does not apply: that backbone gets its own (``native``). A set
without a config (the reference's format) and the baselines use the defaults (256 / 224 / native).

This module evaluates on one backbone, in this process, and never touches Ray: inside a Ray Tune
trial it runs in the trial's own process, on its own resources. One set on several backbones (as
Ray tasks or not) and the command ``python -m lgm_ray.evaluate`` are in :mod:`lgm_ray.evaluate.cross_model`,
which builds on this module; the protocol stays readable apart from where it is scheduled.

Class checks: labels outside the shards' classes, ``class_names`` or ``num_classes`` that differ from
the manifest's are errors (the set was distilled from other data). A set with no image of some
class only *warns*: the head still has a row for every class and is tested on the full held-out
split, so the number stays comparable, and a partial set (e.g. one class shard) is a legitimate
thing to inspect.

Held-out and train-split features are cached on disk (:mod:`lgm_ray.evaluate.feature_cache`, ``cache_dir``).

Bad input (an unknown backbone, a missing file or split, …) raises
:class:`~lgm_ray.evaluate.feature_cache.EvaluationInputError`, whose message names the fix; the command
prints it as one line and exits with status 2. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lgm_ray.evaluate import baselines as bl
from lgm_ray.evaluate import probe as probe
from lgm_ray.evaluate.feature_cache import (
    EvaluationInputError,
    FeatureSource,
    MissingInputError,
    check_backbone,
    check_device,
)

__all__ = [
    "EVAL_SPLITS", "EvaluationInputError", "evaluate", "evaluate_baseline", "evaluate_synset", "synset_settings",
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
    from lgm_ray.shards.format import is_local
    from lgm_ray.shards.locate import is_pattern

    root = str(root)
    if is_local(root) and not is_pattern(root) and not root.endswith(".json") and not Path(root).is_dir():
        raise MissingInputError(
            f"shards folder {root!r} does not exist; build it first, e.g. "
            f"`python -m lgm_ray.shards build digits --out {root}`, or pass the right --shards"
        )
    from lgm_ray.shards.reader import ShardSet

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
    :meth:`lgm_ray.distill.config.DistillConfig.to_dict`) whatever the evaluation backbone: they are the
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
            ``full`` (:mod:`lgm_ray.evaluate.baselines`).
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
        lgm_ray.shards.format.ShardError: damaged shards.
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


