"""Backbones: the registry, the frozen wrapper, and every registered model.

The registry (:mod:`~lgm_ray.backbones.registry`) imports no model; each model module registers itself
when imported, as timm's ``@register_model`` does, and this package's import brings them all in:
the paper's backbones (:mod:`~lgm_ray.backbones.hub`) and the offline demo networks
(:mod:`~lgm_ray.backbones.digits_cnn`, :mod:`~lgm_ray.backbones.digits_vit`,
:mod:`~lgm_ray.backbones.digits_mixer`, weights in ``weights/``).
"""

from lgm_ray.backbones import digits_cnn, digits_mixer, digits_vit, hub  # noqa: F401 - each registers itself
from lgm_ray.backbones.frozen import NORMALIZATIONS, Backbone, create_backbone
from lgm_ray.backbones.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    BackboneWeightsError,
    get_spec,
    list_backbones,
    register_backbone,
    register_build,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATIONS", "Backbone", "BackboneSpec", "BackboneWeightsError",
    "create_backbone", "get_spec", "list_backbones", "register_backbone", "register_build",
]
