"""Backbone registry: name → builder, feature dimension, input normalisation, native resolution.

This module holds the registry (keyword-only :class:`BackboneSpec` records, :func:`register_backbone`,
the :func:`register_build` decorator on a build function — timm's ``@register_model`` pattern — and the
lookups), the frozen :class:`Backbone` wrapper with :func:`create_backbone`, and the registrations of the
offline demo backbones. The hub loaders of the paper's backbones (timm, open_clip, the MoCo-v3
checkpoint) live in :mod:`lgm_ray.backbones_hub`, whose :func:`~lgm_ray.backbones_hub.register_hub_families`
runs at the end of this module's import, so the registry always holds them.

Every backbone is wrapped in :class:`Backbone`, which takes images in [0, 1], normalises them,
returns float features that end in a normalisation layer (the paper's ViTs end in a LayerNorm; a
model that does not gets a parameter-free LayerNorm appended, since the matching objective is a
cosine and blind to the features' scale), and is frozen once, here (eval mode, no parameter grads).
A backbone whose weights only saw upsamplings of a coarse grid (``input_grid``: the demo backbones, on
the digits' 8×8) first projects every input onto such images (:mod:`lgm_ray.models.grid`).
``raw_output=True`` skips that added LayerNorm: the reference implementation feeds CLIP's raw
projection, and the paper's columns are reproduced with it.

Pretrained weights come from the libraries' own hub caches (timm / Hugging Face, open_clip,
``torch.hub``), from a local file (``weights=``) or, for the demo backbones, from the files shipped
in ``lgm_ray/weights/``. A pretrained backbone whose weights are missing fails at once with
:class:`BackboneWeightsError` naming the backbone, what it needed and how to provide it — it never
falls back to random weights. ``pretrained=False`` builds the architecture alone (tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import torch
import torch.nn.functional as F
from torch import nn

from lgm_ray.backbones_hub import register_hub_families
from lgm_ray.models.grid import GridProjection

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsError(RuntimeError):
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
            (:class:`lgm_ray.models.grid.GridProjection`); ``None`` (the hub backbones) feeds inputs as
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


class Backbone(nn.Module):
    """A frozen feature extractor: images in [0, 1] (N×3×H×W) → float features (N×D).

    Args:
        spec: the registry's record.
        model: the built network (normalised images → features).
        mean, std: input normalisation; default the spec's.
        raw_output: skip the parameter-free LayerNorm added to a model whose output is not a
            normalisation layer's (no effect on one that is).
    """

    def __init__(
        self,
        spec: BackboneSpec,
        model: nn.Module,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        *,
        raw_output: bool = False,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.feature_dim = spec.feature_dim
        self.resolution = spec.resolution
        self.raw_output = raw_output
        self.adds_norm = not spec.ends_in_norm and not raw_output
        self.model = model
        self.grid = None if spec.input_grid is None else GridProjection(spec.input_grid, spec.resolution)
        self.register_buffer("mean", torch.tensor(mean or spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std or spec.std).view(1, 3, 1, 1))
        # Frozen once, here: the backbone never trains, only passes gradients to its inputs.
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> Backbone:
        # Stay in eval mode whatever a caller asks: BatchNorm statistics and dropout must not move.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is not None:
            x = self.grid(x)
        z = self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        if self.adds_norm:
            z = F.layer_norm(z, z.shape[-1:])
        return z


def create_backbone(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    normalization: str = "native",
    raw_output: bool = False,
    device: str | torch.device = "cpu",
) -> Backbone:
    """Build a registered backbone, frozen.

    Args:
        name: a registry name (:func:`list_backbones`).
        pretrained: load pretrained weights (from ``weights`` or the hub cache); ``False`` builds
            the architecture only, for tests.
        weights: a local weights file to load instead of the hub.
        img_size: input side the model is built for (ViT position embeddings); default its
            ``resolution``.
        normalization: ``"native"`` (the weights' own mean/std) or ``"imagenet"`` (what the
            reference implementation feeds every backbone, CLIP included).
        raw_output: ``True`` returns the model's own output without the parameter-free LayerNorm
            lgm_ray appends to backbones that do not end in a normalisation layer (CLIP's
            projection: the reference feeds it raw); no effect on backbones that do.
        device: where to put it.
    """
    spec = get_spec(name)
    if weights is not None:
        weights = str(weights)
        if not Path(weights).is_file():
            raise BackboneWeightsError(
                f"backbone {name!r}: weights file {weights!r} does not exist; give the path of a "
                f"downloaded copy of {spec.weights_id}"
            )
    if normalization not in ("native", "imagenet"):
        raise ValueError(f"normalization must be 'native' or 'imagenet', got {normalization!r}")
    if not isinstance(raw_output, bool):
        raise ValueError(f"raw_output must be True or False, got {raw_output!r}")
    model = spec.build(pretrained or weights is not None, weights, img_size)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalization == "imagenet" else (None, None)
    return Backbone(spec, model, mean, std, raw_output=raw_output).to(device)


# ---------------------------------------------------------------- the offline demo backbones


@register_build(
    name="digits_simclr_cnn", feature_dim=128, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resolution=32,
    source="lgm_ray", weights_id="lgm_ray/weights/digits_simclr_cnn.pt (shipped)", ends_in_norm=True, input_grid=8,
    description="4-block CNN pre-trained by lgm_ray with SimCLR on the digits train split (offline demo/tests)",
)
def _digits_cnn_build(pretrained: bool, weights: str | None, img_size: int | None) -> nn.Module:
    """The registry's builder of ``digits_simclr_cnn``: the shipped weights, or the bare architecture."""
    from lgm_ray.models.digits_cnn import DigitsCNN, load_digits_cnn

    if not pretrained:
        return DigitsCNN()
    return load_digits_cnn(weights)


def _register_demo_families() -> None:
    """The shipped ViT and MLP-mixer demo backbones (the CNN is registered above), like the hub ones."""
    from lgm_ray.models import digits_mixer, digits_vit

    for module in (digits_vit, digits_mixer):
        register_build(**module.SPEC_FIELDS)(module.build)


# Filled here, once the registry above exists: register_hub_families imports the registry's names
# when it runs (lgm_ray.backbones_hub never imports this module at its own load, so no cycle).
register_hub_families()
_register_demo_families()
