"""Backbone registry: name → builder, feature dimension, input normalisation, native resolution.

Every backbone is wrapped in :class:`Backbone`, which takes images in [0, 1], normalises them,
returns float features that end in a normalisation layer (the paper's ViTs end in a LayerNorm; a
model that does not gets a parameter-free LayerNorm appended, since the matching objective is a
cosine and blind to the features' scale), and is frozen once, here (eval mode, no parameter grads).
``raw_output=True`` skips that added LayerNorm: the reference implementation feeds CLIP's raw
projection, and the paper's columns are reproduced with it.

The registry is filled with keyword-only :class:`BackboneSpec` records, directly or through the
:func:`register_build` decorator on a build function (timm's ``@register_model`` pattern).

Pretrained weights come from the libraries' own hub caches (timm / Hugging Face, open_clip,
``torch.hub``) or from a local file (``weights=``). With neither, a pretrained name fails at once
with :class:`BackboneWeightsError` naming the backbone, what it needed and how to provide it — it
never falls back to random weights. ``pretrained=False`` builds the architecture alone (tests).
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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
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
        self.register_buffer("mean", torch.tensor(mean or spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std or spec.std).view(1, 3, 1, 1))
        # Frozen once, here: the backbone never trains, only passes gradients to its inputs.
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> Backbone:
        # Stay in eval mode whatever a caller asks: BatchNorm statistics and dropout must not move.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def _missing_weights(name: str, needed: str, how: str, cause: BaseException | None = None) -> BackboneWeightsError:
    return BackboneWeightsError(
        f"backbone {name!r} needs pretrained weights {needed}, which are neither in the local cache nor "
        f"downloadable here{f' ({type(cause).__name__})' if cause else ''}. {how} lgm_ray never runs a "
        f"pretrained backbone with random weights."
    )


# ---------------------------------------------------------------- timm (DINOv2, EVA-02, MoCo-v3 arch)


def _timm_builder(name: str, model_id: str) -> BuildFn:
    def build(pretrained: bool, weights: str | None, img_size: int | None) -> nn.Module:
        import timm

        kwargs = {"num_classes": 0, "img_size": img_size or _REGISTRY[name].resolution}
        if not pretrained:
            return timm.create_model(model_id, pretrained=False, **kwargs)
        if weights is not None:
            return timm.create_model(
                model_id, pretrained=True, pretrained_cfg_overlay={"file": weights}, **kwargs
            )
        hub_id = timm.models.get_pretrained_cfg(model_id).hf_hub_id
        try:
            return timm.create_model(model_id, pretrained=True, **kwargs)
        except Exception as exc:  # huggingface_hub raises several types offline
            if not _looks_offline(exc):
                raise
            raise _missing_weights(
                name,
                f"'{hub_id}' (Hugging Face hub, via timm)",
                f"Pre-fill the cache on a machine with internet (`huggingface-cli download {hub_id}`, "
                f"HF_HOME pointing at it) or pass a local file: `weights: /path/model.safetensors` in the "
                f"config (or `--weights` on the command line).",
                exc,
            ) from exc

    return build


def _looks_offline(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _causes(exc)}
    offline = {
        "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "URLError",
        "ConnectTimeout", "ReadTimeout", "ConnectError", "MaxRetryError", "NameResolutionError",
        "gaierror", "HfHubHTTPError", "RepositoryNotFoundError",
    }
    return bool(names & offline) or "offline" in str(exc).lower() or "internet" in str(exc).lower()


def _causes(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# ---------------------------------------------------------------- open_clip (CLIP)


class _ClipVisual(nn.Module):
    """The image tower of an open_clip model (features after its projection)."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.visual = clip_model.visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def _open_clip_builder(name: str, arch: str, tag: str) -> BuildFn:
    def build(pretrained: bool, weights: str | None, img_size: int | None) -> nn.Module:
        import open_clip

        size = img_size or _REGISTRY[name].resolution
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        # OpenAI's CLIP weights were trained with QuickGELU; loading them from a file path, open_clip
        # cannot know that, so say it here (otherwise the features silently change).
        quick_gelu = bool(cfg.get("quick_gelu", False))
        if not pretrained:
            return _ClipVisual(open_clip.create_model(
                arch, pretrained=None, force_image_size=size, force_quick_gelu=quick_gelu))
        if weights is None:
            try:
                weights = open_clip.pretrained.download_pretrained(cfg)
            except Exception as exc:
                raise _missing_weights(
                    name,
                    f"open_clip '{arch}' / '{tag}' ({cfg.get('hf_hub') or cfg.get('url')})",
                    "Pre-fill open_clip's cache on a machine with internet (e.g. "
                    f"`python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\"`) "
                    "or pass a local file: `weights: /path/open_clip_pytorch_model.bin` in the config.",
                    exc,
                ) from exc
            if not weights:
                raise _missing_weights(name, f"open_clip '{arch}' / '{tag}'", "Pass `weights: FILE`.")
        # require_pretrained turns open_clip's silent random initialisation into an error.
        model = open_clip.create_model(
            arch, pretrained=str(weights), force_image_size=size, force_quick_gelu=quick_gelu,
            require_pretrained=True,
        )
        return _ClipVisual(model)

    return build


# ---------------------------------------------------------------- MoCo-v3 (official checkpoint)

MOCOV3_VITB_URL = "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"


def _mocov3_state_dict(ckpt: dict) -> dict:
    """Map the official MoCo-v3 checkpoint's base encoder onto timm's ``vit_base_patch16_224``."""
    sd = ckpt.get("state_dict", ckpt)
    out = {}
    for key, value in sd.items():
        if key.startswith(("module.momentum_encoder", "module.predictor", "momentum_encoder", "predictor")):
            continue
        k = key
        for prefix in ("module.base_encoder.", "base_encoder."):
            if key.startswith(prefix):
                k = key[len(prefix):]
                break
        if k.startswith("head"):
            continue
        out[k] = value
    return out


@register_build(
    name="mocov3_vitb16", feature_dim=768, mean=IMAGENET_MEAN, std=IMAGENET_STD, resolution=224,
    source="torch.hub", weights_id=MOCOV3_VITB_URL, ends_in_norm=True,
    description="MoCo-v3 ViT-B/16 (300 epochs, the official checkpoint the paper used)",
)
def _mocov3_build(pretrained: bool, weights: str | None, img_size: int | None) -> nn.Module:
    import timm

    size = img_size or 224
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=size)
    if not pretrained:
        return model
    if weights is None:
        filename = Path(MOCOV3_VITB_URL).name
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if cached.is_file():
            weights = str(cached)
        else:
            try:
                ckpt = torch.hub.load_state_dict_from_url(MOCOV3_VITB_URL, map_location="cpu", weights_only=False)
            except Exception as exc:
                raise _missing_weights(
                    "mocov3_vitb16",
                    f"{MOCOV3_VITB_URL} (torch.hub cache: {cached})",
                    f"Download it on a machine with internet and copy it to {cached}, or pass "
                    "`weights: /path/vit-b-300ep.pth.tar` in the config.",
                    exc,
                ) from exc
    if weights is not None:
        ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    sd = _mocov3_state_dict(ckpt)
    if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        grid = model.patch_embed.grid_size
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(grid), num_prefix_tokens=1)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise BackboneWeightsError(
            f"backbone 'mocov3_vitb16': {weights or MOCOV3_VITB_URL} is not a MoCo-v3 ViT-B checkpoint "
            f"(missing keys {missing[:5]}, unexpected keys {unexpected[:5]})"
        )
    return model


# ---------------------------------------------------------------- the offline demo backbones


@register_build(
    name="digits_simclr_cnn", feature_dim=128, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resolution=32,
    source="lgm_ray", weights_id="lgm_ray/weights/digits_simclr_cnn.pt (shipped)", ends_in_norm=True,
    description="4-block CNN pre-trained by lgm_ray with SimCLR on the digits train split (offline demo/tests)",
)
def _digits_cnn_build(pretrained: bool, weights: str | None, img_size: int | None) -> nn.Module:
    from lgm_ray.models.digits_cnn import DigitsCNN, load_digits_cnn

    if not pretrained:
        return DigitsCNN()
    return load_digits_cnn(weights)


def _register_hub_families() -> None:
    """The paper's ViT families, a record per size (several sizes share one builder factory)."""
    vit = "ViT"
    full_size = {"t": "tiny", "s": "small", "b": "base", "l": "large"}
    for size, dim in (("s", 384), ("b", 768), ("l", 1024)):
        name = f"dinov2_vit{size}14"
        model_id = f"vit_{full_size[size]}_patch14_dinov2.lvd142m"
        register_backbone(BackboneSpec(
            name=name, feature_dim=dim, mean=IMAGENET_MEAN, std=IMAGENET_STD, resolution=224,
            source="timm", weights_id=f"timm/{model_id}", ends_in_norm=True,
            build=_timm_builder(name, model_id),
            description=f"DINOv2 {vit}-{size.upper()}/14 (LVD-142M), CLS token after its LayerNorm",
        ))
    for size, dim in (("t", 192), ("s", 384), ("b", 768), ("l", 1024)):
        name = f"eva02_vit{size}14"
        model_id = f"eva02_{full_size[size]}_patch14_224.mim_in22k"
        register_backbone(BackboneSpec(
            name=name, feature_dim=dim, mean=CLIP_MEAN, std=CLIP_STD, resolution=224,
            source="timm", weights_id=f"timm/{model_id}", ends_in_norm=True,
            build=_timm_builder(name, model_id),
            description=f"EVA-02 {vit}-{size.upper()}/14 MIM on ImageNet-22k, mean-pooled + LayerNorm",
        ))
    for patch in (16, 32):
        name = f"clip_vitb{patch}"
        register_backbone(BackboneSpec(
            name=name, feature_dim=512, mean=CLIP_MEAN, std=CLIP_STD, resolution=224,
            source="open_clip", weights_id=f"open_clip ViT-B-{patch} / openai", ends_in_norm=False,
            build=_open_clip_builder(name, f"ViT-B-{patch}", "openai"),
            description=f"CLIP {vit}-B/{patch} image tower (OpenAI weights), projected features",
        ))


def _register_demo_families() -> None:
    """The shipped ViT and MLP-mixer demo backbones (the CNN is registered above), like the hub ones."""
    from lgm_ray.models import digits_mixer, digits_vit

    for module in (digits_vit, digits_mixer):
        register_build(**module.SPEC_FIELDS)(module.build)


_register_hub_families()
_register_demo_families()
