"""Evaluate a training set (distilled, or a real-image baseline) with the paper's linear probe.

The paper's evaluation protocol for one training set on one backbone: :func:`evaluate` (with
:func:`evaluate_synset` and :func:`evaluate_baseline`) trains a fresh linear head on the frozen
backbone's features of the set's images, augmented afresh every epoch, and tests it on a held-out
split of the shards (``split="test"``, the default, or ``"val"``: choices are made on ``val``,
``test`` is measured once at the end); see :mod:`lgm_ray.evaluate.probe` for the protocol
(docs/design.md §1) and :mod:`lgm_ray.evaluate.baselines` for the real-image baselines.

**Settings and inputs.** Every setting (epochs, seeds, batch, split, full mode, ipc, device,
normalisation, resolutions, raw output) comes from one :class:`~lgm_ray.evaluate.config.EvalConfig`
(its defaults when none is given); what is evaluated (the set and its metadata, the baseline, weights
files, the selection backbone, the cache folder) are keyword inputs.

**A set is evaluated with its own settings.** A set written by ``python -m lgm_ray.distill`` carries
its run's config: the real images' resize side ``real_res``, the backbone's input side ``crop_res``
and the input ``normalization`` it was distilled with come from there (:func:`synset_settings`; the
images' own side is reported as ``syn_res``): ``cfg.replace(**synset_settings(payload, name))``. The
command's flag that overrides one of them says so (:func:`resolve_settings`). On another backbone than
the one it was distilled with, a set keeps its resolutions, but its normalisation does not apply: that
backbone gets its own (``native``). A set without a config (the reference's format) and the baselines
use the config's values (by default 256 / 224 / native).

This module evaluates on one backbone, in this process, and never touches Ray: inside a Ray Tune
trial it runs in the trial's own process, on its own resources. One set on several backbones (as Ray
tasks or not) is :mod:`lgm_ray.evaluate.cross_model`, and the command ``python -m lgm_ray.evaluate`` is
:mod:`lgm_ray.evaluate.__main__`; both build on this module, which stays readable apart from where an
evaluation is scheduled.

Class checks: labels outside the shards' classes, ``class_names`` or ``num_classes`` that differ from
the manifest's are errors (the set was distilled from other data). A set with no image of some
class only *warns*: the head still has a row for every class and is tested on the full held-out
split, so the number stays comparable, and a partial set (e.g. one class shard) is a legitimate
thing to inspect.

Held-out and train-split features are cached on disk (:mod:`lgm_ray.evaluate.feature_cache`, ``cache_dir``).

Bad input (an unknown backbone, a bad setting, a missing file or split, …) raises
:class:`~lgm_ray.evaluate.feature_cache.EvaluationInputError` (an
:class:`~lgm_ray.common.errors.InputError`), whose message names the fix; the command prints it as one
line and exits with status 2. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lgm_ray.common.errors import InputError
from lgm_ray.common.suggest import did_you_mean
from lgm_ray.core.synset import validate_synset
from lgm_ray.evaluate import baselines as bl
from lgm_ray.evaluate import probe as probe
from lgm_ray.evaluate.config import EVAL_SPLITS, EvalConfig
from lgm_ray.evaluate.feature_cache import (
    EvaluationInputError,
    FeatureSource,
    MissingInputError,
    check_backbone,
    check_device,
)

__all__ = [
    "EvaluationInputError", "check_split", "evaluate", "evaluate_baseline", "evaluate_synset", "open_shards",
    "resolve_settings", "synset_settings",
]

log = logging.getLogger(__name__)

FULL_EPOCHS = 100  # the reference's full-dataset probe: 100 epochs at batch 128
FULL_BATCH = 128
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
    """The settings (:attr:`EvalConfig.SET_FIELDS`) a saved set fixes for an evaluation on ``backbone_name``.

    ``real_res`` and ``crop_res`` come from the set's config (``payload["config"]``, a
    :meth:`lgm_ray.distill.config.DistillConfig.to_dict`) whatever the evaluation backbone: they are the
    set's resolution. ``normalization`` (and ``raw_output``, when set) come from it only when
    ``backbone_name`` is the backbone the set was distilled with (``payload["backbone"]``, else the
    config's): another backbone is fed its own mean/std. Settings the file does not hold are left out
    (a reference-format set holds none), so the caller's config applies.

    Use: ``evaluate_synset(p["images"], p["labels"], name, shards, cfg.replace(**synset_settings(p, name)))``.
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


def setting_flag(name: str) -> str:
    """The command's flag of an :class:`EvalConfig` field: ``crop_res`` → ``--crop-res``."""
    return "--" + name.replace("_", "-")


def resolve_settings(payload: dict | None, backbone_name: str, flags: dict[str, Any],
                     source: str = "the set") -> tuple[dict[str, Any], list[str]]:
    """The set's settings to evaluate with: a flag, else the set's value (:func:`synset_settings`), else the default.

    Args:
        payload: the loaded set, or ``None`` (a baseline).
        backbone_name: the evaluation backbone.
        flags: :attr:`EvalConfig.SET_FIELDS` (``normalization``, ``real_res``, ``crop_res``,
            ``raw_output``) → the flag's value, ``None`` (or absent) when not given.
        source: how to name the set in notes (its path).

    Returns:
        ``(settings, notes)``: every one of :attr:`EvalConfig.SET_FIELDS`, and one note per flag whose
        value differs from the set's, naming the flag, the file's value and the value used.
    """
    from_set = synset_settings(payload, backbone_name) if payload is not None else {}
    defaults = EvalConfig.defaults(EvalConfig.SET_FIELDS)
    used: dict[str, Any] = {}
    notes: list[str] = []
    for key in EvalConfig.SET_FIELDS:
        given = flags.get(key)
        if given is None:
            used[key] = from_set.get(key, defaults[key])
            continue
        used[key] = given
        if key in from_set and from_set[key] != given:
            notes.append(f"{setting_flag(key)} {given} overrides {key}={from_set[key]} of {source} "
                         f"(evaluating on {backbone_name}): using {given}")
    return used, notes


# ---------------------------------------------------------------- one evaluation: its parts


@dataclass
class _Plan:
    """How the probes of one evaluation train: ``fit(k, seed) → head`` and what the result reports of it."""

    fit: Callable[[int, int], nn.Module]
    n_train: int
    epochs: int
    batch: int
    extra: dict = field(default_factory=dict)


def _checked_config(cfg: EvalConfig | None) -> EvalConfig:
    """``cfg`` (default :class:`EvalConfig`), validated; a bad setting is an :class:`EvaluationInputError`."""
    if cfg is None:
        return EvalConfig()
    if not isinstance(cfg, EvalConfig):
        raise TypeError(f"cfg must be an EvalConfig, got {type(cfg).__name__}")
    try:
        return cfg.validate("EvalConfig")
    except InputError as exc:
        raise EvaluationInputError(str(exc)) from None


def _check_inputs(backbone_name: str, shards_root: str | Path, cfg: EvalConfig, *, images, labels,
                  baseline: str | None, class_names, num_classes, select_backbone: str | None):
    """Every input check that needs no model, in order; returns the opened shards."""
    if baseline is not None and baseline not in bl.BASELINES:
        raise EvaluationInputError(f"unknown baseline {baseline!r}{did_you_mean(baseline, bl.BASELINES)}; "
                                   f"choose one of {', '.join(bl.BASELINES)}")
    if baseline in (None, "neighbors") and images is None:
        raise EvaluationInputError(
            "--baseline neighbors needs --synset (the distilled set whose images' nearest real neighbours "
            "it picks)" if baseline else "nothing to evaluate: give a synthetic set (--synset) or --baseline"
        )
    check_backbone(backbone_name)
    if select_backbone is not None:
        check_backbone(select_backbone)
    check_device(cfg.device)
    shards = open_shards(shards_root)
    check_split(shards, cfg.split)
    if baseline in ("random", "centroids") and min(shards.manifest["counts"]["train"]) < cfg.ipc:
        raise EvaluationInputError(f"ipc={cfg.ipc}: some class of {shards.root} has only "
                                   f"{min(shards.manifest['counts']['train'])} train images; lower --ipc")
    if images is not None and baseline in (None, "neighbors"):
        validate_synset({"images": images, "labels": labels})
        bl.check_synset_classes(labels, shards, class_names=class_names, num_classes=num_classes)
    return shards


def _full_plan(env: FeatureSource, cfg: EvalConfig) -> _Plan:
    """The ``full`` baseline: the whole train split, on cached features (fast) or streamed (reference)."""
    shards, epochs, batch = env.shards, cfg.epochs or FULL_EPOCHS, cfg.batch or FULL_BATCH
    if cfg.full_mode == "fast":
        train = env.features("train")

        def fit(k: int, seed: int) -> nn.Module:
            return probe.train_probe_on_features(
                train.features, train.labels, num_classes=shards.num_classes, seed=seed, epochs=epochs,
                batch=batch, device=cfg.device)

        return _Plan(fit, len(train.labels), epochs, batch, {"full_mode": cfg.full_mode})
    n_train = shards.count("train")

    def chunks():
        for x, y, _ in shards.iter_split("train", resize=cfg.real_res, crop=cfg.real_res):
            yield x, y

    def fit(k: int, seed: int) -> nn.Module:
        return probe.train_probe_on_stream(
            chunks, n_train, env.backbone, feature_dim=env.backbone.feature_dim, num_classes=shards.num_classes,
            seed=seed, epochs=epochs, batch=batch, crop_res=cfg.crop_res, device=cfg.device)

    return _Plan(fit, n_train, epochs, batch, {"full_mode": cfg.full_mode})


def _selection_source(env: FeatureSource, select_backbone: str | None, select_weights: str | None,
                      cache_dir: str | Path | None) -> FeatureSource:
    """The backbone whose centre-crop features pick centroids / neighbours: the evaluation one by default."""
    if select_backbone in (None, env.backbone.name) and select_weights is None:
        return env
    return FeatureSource(select_backbone or env.backbone.name, env.shards, weights=select_weights,
                         normalization=env.normalization, device=env.device, real_res=env.real_res,
                         crop_res=env.crop_res, cache_dir=cache_dir)


def _training_sets(env: FeatureSource, cfg: EvalConfig, baseline: str | None, images, labels, *,
                   select_backbone: str | None, select_weights: str | None,
                   cache_dir: str | Path | None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """The image sets the probes train on (seed ``k`` on set ``k mod len``) and what to report of their choice."""
    shards = env.shards
    if baseline is None:
        return [(images.float(), labels.long())], {}
    if baseline == "random":
        sets = [bl.select_random(shards, k, ipc=cfg.ipc, real_res=cfg.real_res) for k in range(cfg.seeds)]
        return sets, {"selection_seeds": list(range(cfg.seeds))}
    sel = _selection_source(env, select_backbone, select_weights, cache_dir)
    train = sel.features("train")
    query = (bl.image_features(sel.backbone, images, cfg.real_res, cfg.crop_res, cfg.device)
             if baseline == "neighbors" else None)
    idx = bl.select_indices(baseline, train.features, train.labels, shards.num_classes, ipc=cfg.ipc,
                            query=query, query_labels=labels)
    sets = [bl.select_by_indices(shards, train.keys, train.labels, idx, real_res=cfg.real_res)]
    extra = {"select_backbone": sel.backbone.name, "selected_keys": [train.keys[i] for i in idx.tolist()]}
    if sel is not env:
        extra["select_feature_cache"] = dict(sel.cache_hits)
    return sets, extra


def _images_plan(env: FeatureSource, cfg: EvalConfig, sets: list[tuple[torch.Tensor, torch.Tensor]],
                 extra: dict) -> _Plan:
    """Probes on small image sets: augmented every epoch, features through the backbone."""
    epochs = cfg.epochs or probe.DEFAULT_EPOCHS
    n_train = len(sets[0][1])
    batch = cfg.batch or probe.default_batch(n_train)

    def fit(k: int, seed: int) -> nn.Module:
        x, y = sets[k % len(sets)]
        return probe.train_probe_on_images(
            x, y, env.backbone, feature_dim=env.backbone.feature_dim, num_classes=env.shards.num_classes,
            seed=seed, epochs=epochs, batch=batch, crop_res=cfg.crop_res, device=cfg.device)

    return _Plan(fit, n_train, epochs, batch, extra)


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


# ---------------------------------------------------------------- one evaluation


def evaluate(
    backbone_name: str,
    shards_root: str | Path,
    cfg: EvalConfig | None = None,
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    baseline: str | None = None,
    class_names: list[str] | None = None,
    num_classes: int | None = None,
    weights: str | None = None,
    cache_dir: str | Path | None = None,
    select_backbone: str | None = None,
    select_weights: str | None = None,
) -> dict:
    """One evaluation: a training set (``images``/``labels``, or ``baseline``) on one backbone.

    Runs in this process (never Ray): safe inside a Ray Tune trial.

    Args:
        backbone_name: the evaluation backbone (a registry name).
        shards_root: the shards folder whose ``cfg.split`` scores the probe (and whose train split the
            baselines draw from).
        cfg: every setting (:class:`~lgm_ray.evaluate.config.EvalConfig`; default its defaults):
            ``epochs``, ``seeds``, ``batch``, ``split``, ``full_mode``, ``ipc``, ``device``,
            ``normalization``, ``real_res``, ``crop_res``, ``raw_output``. For a distilled set, give the
            set's own: ``cfg.replace(**synset_settings(payload, backbone_name))``.
        images, labels: the distilled set (N×3×H×W in [0, 1], N); required unless ``baseline`` is
            ``random``, ``centroids`` or ``full``; ``neighbors`` finds their nearest real images.
        baseline: ``None`` (evaluate ``images``) or one of ``random``, ``centroids``, ``neighbors``,
            ``full`` (:mod:`lgm_ray.evaluate.baselines`).
        class_names, num_classes: the set's metadata, checked against the manifest when given.
        weights: a local weights file for the evaluation backbone.
        cache_dir: feature cache folder (default ``$LGM_RAY_CACHE`` or ``~/.cache/lgm_ray/features``).
        select_backbone, select_weights: backbone whose centre-crop features pick ``centroids`` /
            ``neighbors`` (default: the evaluation backbone).

    Returns:
        A JSON-able dict: ``top1_mean``, ``top1_std``, ``top5_mean``, ``top5_std`` (percent,
        population std over seeds), ``top1_per_seed``, ``top5_per_seed``, ``seeds``, ``topk``,
        ``split``, ``n_eval`` (held-out images), ``n_train``, ``backbone``, ``baseline``,
        ``training_set``, ``epochs``, ``batch``, ``lr``, ``num_classes``, ``normalization``,
        ``real_res``, ``crop_res``, ``syn_res`` (the set's image side, ``None`` for baselines that use
        no set), ``device``, ``shards``, ``feature_cache`` (split → whether it was a cache hit),
        ``wall_s``, and per baseline ``selection_seeds`` / ``selected_keys`` / ``select_backbone`` /
        ``select_feature_cache`` / ``full_mode``.

    Raises:
        EvaluationInputError: bad input (a bad setting, unknown backbone or baseline, missing shards or
            split, a set of the wrong form or from other data, …); the message names the fix.
        lgm_ray.core.synset.SynsetFileError: ``images``/``labels`` are not a synthetic set.
        BackboneWeightsError: the backbone's weights are not available.
        lgm_ray.shards.format.ShardError: damaged shards.
    """
    t0 = time.perf_counter()
    cfg = _checked_config(cfg)
    shards = _check_inputs(backbone_name, shards_root, cfg, images=images, labels=labels, baseline=baseline,
                           class_names=class_names, num_classes=num_classes, select_backbone=select_backbone)
    env = FeatureSource(backbone_name, shards, weights=weights, normalization=cfg.normalization,
                        device=cfg.device, real_res=cfg.real_res, crop_res=cfg.crop_res, cache_dir=cache_dir,
                        raw_output=cfg.raw_output)
    if baseline == "full":
        plan = _full_plan(env, cfg)
    else:
        sets, extra = _training_sets(env, cfg, baseline, images, labels, select_backbone=select_backbone,
                                     select_weights=select_weights, cache_dir=cache_dir)
        plan = _images_plan(env, cfg, sets, extra)
    scores = _run_seeds(env, plan.fit, cfg.seeds, cfg.split)
    syn_res = int(images.shape[-1]) if images is not None and baseline in (None, "neighbors") else None
    return {
        "backbone": backbone_name, "baseline": baseline, "training_set": baseline or "distilled",
        "split": cfg.split, "n_train": plan.n_train, "epochs": plan.epochs, "batch": plan.batch,
        "lr": probe.probe_lr(plan.batch), **scores, "num_classes": shards.num_classes, "real_res": cfg.real_res,
        "crop_res": cfg.crop_res, "syn_res": syn_res, "normalization": cfg.normalization,
        "device": str(cfg.device), "shards": str(shards_root), **plan.extra,
        "feature_cache": dict(env.cache_hits), "wall_s": round(time.perf_counter() - t0, 3),
    }


def evaluate_synset(images: torch.Tensor, labels: torch.Tensor, backbone_name: str, shards_root: str | Path,
                    cfg: EvalConfig | None = None, **inputs: Any) -> dict:
    """Evaluate a distilled set on one backbone with the reference protocol, in this process.

    ``cfg``: the settings, as :func:`evaluate`; give the set's own
    (``cfg.replace(**synset_settings(payload, backbone_name))``). ``inputs`` are :func:`evaluate`'s
    other keyword inputs (``class_names``, ``num_classes``, ``weights``, ``cache_dir``). Never starts
    Ray or Ray tasks.
    """
    return evaluate(backbone_name, shards_root, cfg, images=images, labels=labels, **inputs)


def evaluate_baseline(baseline: str, backbone_name: str, shards_root: str | Path, cfg: EvalConfig | None = None,
                      **inputs: Any) -> dict:
    """Evaluate a real-image baseline on one backbone, in this process (see :func:`evaluate`).

    ``cfg``: the settings, as :func:`evaluate` (``ipc``, ``full_mode``, ``seeds``, …). ``inputs`` are
    :func:`evaluate`'s keyword inputs (``images``/``labels`` for ``neighbors``, ``weights``,
    ``select_backbone``, ``select_weights``, ``cache_dir``, …). Never starts Ray or Ray tasks.
    """
    return evaluate(backbone_name, shards_root, cfg, baseline=baseline, **inputs)
