"""Backbone registry: name → builder, feature dimension, input normalisation, native resolution.

Keyword-only :class:`BackboneSpec` records, :func:`register_backbone`, the :func:`register_build`
decorator on a build function (timm's ``@register_model`` pattern) and the lookups. The registry
imports no model: each model module registers itself when imported (:mod:`lgm_ray.backbones.hub` —
the paper's backbones from timm, open_clip and the MoCo-v3 checkpoint — and the three demo networks),
and :mod:`lgm_ray.backbones` imports them all, so any import of the package fills the registry.
The frozen wrapper every caller gets lives in :mod:`lgm_ray.backbones.frozen`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from torch import nn

from lgm_ray.common.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsError(InputError):
    """Pretrained weights for a backbone are not available (no cache, no file, no network)."""


BuildFn: TypeAlias = Callable[[bool, str | None, int | None], nn.Module]
"""``(pretrained, weights_file, img_size) → nn.Module`` mapping normalised images to features."""


@dataclass(frozen=True, kw_only=True)
class BackboneSpec:
    """What the registry knows of a backbone.

    Attributes:
        name: registry name, e.g. ``"dinov2_vitb14"``.
        feature_dim: size of the feature vector.
        mean, std: input normalisation the weights were trained with.
        resolution: native input side (the paper feeds 224×224 crops to every ViT).
        source: ``"timm"``, ``"open_clip"``, ``"torch.hub"`` or ``"lgm_ray"``.
        weights_id: where pretrained weights come from (hub id, URL or shipped file).
        ends_in_norm: whether the model's own output is already a normalisation layer's.
        build: ``(pretrained, weights_file, img_size) → nn.Module`` mapping images to features.
        description: one line for listings.
        input_grid: for weights trained on images that are upsamplings of a coarser grid (the demo
            backbones: the digits' 8×8), that grid: every input is first projected onto such images
            (:class:`lgm_ray.backbones.grid.GridProjection`); ``None`` (the hub backbones) feeds inputs as
            they are.

    Fields are keyword-only, so a registration reads as the table it is.
    """

    name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resolution: int
    source: str
    weights_id: str
    ends_in_norm: bool
    build: BuildFn
    description: str = ""
    input_grid: int | None = None


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def register_build(**fields: object) -> Callable[[BuildFn], BuildFn]:
    """Decorator: register the decorated build function as a backbone with these spec fields.

    ``@register_build(name="x", feature_dim=…, …)`` over ``def build(pretrained, weights, img_size)``
    is ``register_backbone(BackboneSpec(name="x", …, build=build))``; the function is returned as is.
    """

    def wrap(build: BuildFn) -> BuildFn:
        register_backbone(BackboneSpec(build=build, **fields))
        return build

    return wrap


def list_backbones() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The record of backbone ``name``.

    Raises:
        KeyError: ``name`` is not registered; the message lists the known names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}") from None
