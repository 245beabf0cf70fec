"""The frozen backbone every caller gets: :class:`Backbone` and :func:`create_backbone`.

:class:`Backbone` takes images in [0, 1], normalises them, returns float features that end in a
normalisation layer (the paper's ViTs end in a LayerNorm; a model that does not gets a parameter-free
LayerNorm appended, since the matching objective is a cosine and blind to the features' scale), and
is frozen once, here (eval mode, no parameter grads). A backbone whose weights only saw upsamplings
of a coarse grid (``input_grid``: the demo backbones, on the digits' 8×8) first projects every input
onto such images (:mod:`lgm_ray.backbones.grid`). ``raw_output=True`` skips the added LayerNorm: the
reference implementation feeds CLIP's raw projection, and the paper's columns are reproduced with it.

Pretrained weights come from the libraries' own hub caches (timm / Hugging Face, open_clip,
``torch.hub``), from a local file (``weights=``) or, for the demo backbones, from the files shipped
in ``lgm_ray/backbones/weights/``. A pretrained backbone whose weights are missing fails at once with
:class:`~lgm_ray.backbones.registry.BackboneWeightsError` naming the backbone, what it needed and how
to provide it — it never falls back to random weights. ``pretrained=False`` builds the architecture
alone (tests).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lgm_ray.backbones.grid import GridProjection
from lgm_ray.backbones.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    BackboneWeightsError,
    get_spec,
)

NORMALIZATIONS = ("native", "imagenet")


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
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be 'native' or 'imagenet', got {normalization!r}")
    if not isinstance(raw_output, bool):
        raise ValueError(f"raw_output must be True or False, got {raw_output!r}")
    model = spec.build(pretrained or weights is not None, weights, img_size)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalization == "imagenet" else (None, None)
    return Backbone(spec, model, mean, std, raw_output=raw_output).to(device)
