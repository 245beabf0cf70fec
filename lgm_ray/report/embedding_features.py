"""The backbone features of a saved distilled set and of a split's real images, for the embedding maps.

:func:`set_features` is the one function behind :mod:`lgm_ray.report.embedding`'s maps that loads a backbone
and reads features: the split's through :class:`lgm_ray.evaluate.feature_cache.FeatureSource` and the sweep's
feature cache (a file read inside a sweep), the distilled images' through the same backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_UNCACHED_IMAGES = 20_000  # compute a split's features on the fly only up to this many images


@dataclass
class SetFeatures:
    """A set's backbone features and the real features of a split, from one backbone object."""

    real_features: Any
    real_labels: Any
    syn_features: Any
    class_names: list[str]
    num_classes: int
    backbone: str
    split: str
    cache_hit: bool


class FeaturesUnavailable(RuntimeError):
    """The features cannot be had here (no shards, no weights, not cached and too large to compute)."""


def set_features(payload: dict, shards_root: str | Path, *, backbone: str | None = None, split: str = "test",
                 cache_dir: str | Path | None = None, device: str = "cpu", weights: str | None = None,
                 max_uncached: int | None = MAX_UNCACHED_IMAGES, sources: dict | None = None) -> SetFeatures:
    """Features of a saved set's images and of a split's real images, by the set's own backbone.

    The split's features come from the feature cache that the evaluations filled (same backbone
    weights, preprocessing and normalisation: :func:`lgm_ray.evaluate.protocol.synset_settings`), so inside a
    sweep this reads a file; the distilled images go through the backbone as the real test images do
    (resize + centre crop).

    Args:
        payload: the loaded ``synset.pt``.
        shards_root: the shards the set was distilled from.
        backbone: default: the one the set was distilled with (``payload["backbone"]``).
        split: ``test`` (default) or ``val``.
        cache_dir: the feature cache (a sweep's ``feature_cache/``).
        device: where the backbone runs.
        weights: a local weights file (default: the set's config's ``weights`` for its own backbone).
        max_uncached: refuse (:class:`FeaturesUnavailable`) to compute a split of more images than
            this when it is not cached (``None``: no limit).
        sources: a dict this function keeps its backbones in between calls (several sets of one
            backbone then load it once).

    Raises:
        FeaturesUnavailable: the shards are missing, the backbone's weights are not available, or
            the split is not cached and larger than ``max_uncached``.
    """
    import torch

    from lgm_ray.evaluate.baselines import image_features
    from lgm_ray.evaluate.feature_cache import feature_description, feature_key

    name, env = _source(payload, shards_root, backbone, cache_dir, device, weights, sources)
    shards = env.shards
    desc = feature_description(env.fingerprint, shards, split, resize=env.real_res, crop=env.crop_res)
    n_split = sum(shards.manifest["counts"].get(split, ()))
    if n_split == 0:
        raise FeaturesUnavailable(f"shards {shards_root} have no {split!r} split")
    if max_uncached is not None and n_split > max_uncached and env.cache.load(feature_key(desc), desc) is None:
        raise FeaturesUnavailable(
            f"the {split} features of {name} on {shards_root} ({n_split} images) are not in the feature cache "
            f"{env.cache.root}; computing them here is slow: raise max_uncached, or evaluate the set first")
    real = env.features(split)
    images = payload["images"].float()
    syn = image_features(env.backbone, images, env.real_res, env.crop_res, device)
    names = list(payload.get("class_names") or shards.manifest.get("class_names") or
                 [str(c) for c in range(shards.num_classes)])
    return SetFeatures(real.features, real.labels, syn.to(torch.float32), names, int(shards.num_classes), name,
                       split, real.hit)


def _source(payload: dict, shards_root: str | Path, backbone: str | None, cache_dir: str | Path | None,
            device: str, weights: str | None, sources: dict | None):
    """The backbone's name and its :class:`~lgm_ray.evaluate.feature_cache.FeatureSource` on the shards, with
    the set's own settings (:func:`lgm_ray.evaluate.protocol.synset_settings`, else the evaluation's defaults);
    kept in ``sources`` between calls."""
    from lgm_ray.evaluate.config import EvalConfig
    from lgm_ray.evaluate.feature_cache import EvaluationInputError, FeatureSource
    from lgm_ray.evaluate.protocol import open_shards, synset_settings

    cfg = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    name = backbone or payload.get("backbone") or cfg.get("backbone")
    if not name:
        raise FeaturesUnavailable("the set does not name its backbone; pass backbone=")
    defaults = EvalConfig()
    settings = {"real_res": defaults.real_res, "crop_res": defaults.crop_res,
                "normalization": defaults.normalization, **synset_settings(payload, name)}
    if weights is None and name == (payload.get("backbone") or cfg.get("backbone")):
        weights = cfg.get("weights")
    memo = (name, weights, str(shards_root), tuple(sorted(settings.items())), str(device), str(cache_dir))
    env = sources.get(memo) if sources is not None else None
    if env is None:
        if not shards_root:
            raise FeaturesUnavailable("the set's config names no shards")
        try:
            env = FeatureSource(name, open_shards(shards_root), weights=weights, device=device, cache_dir=cache_dir,
                                **settings)
        except (EvaluationInputError, OSError, RuntimeError, ValueError) as exc:
            raise FeaturesUnavailable(f"{type(exc).__name__}: {exc}") from None
        if sources is not None:
            sources[memo] = env
    return name, env
