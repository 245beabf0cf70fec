"""Hub backbones: the loaders of the paper's pretrained networks and their registry entries.

This module holds what knows the outside world's weights: the build functions of DINOv2 and EVA-02
(timm, weights on the Hugging Face hub), CLIP (open_clip) and MoCo-v3 (the official ``torch.hub``
checkpoint, converted onto timm's ViT-B/16), the offline-error detection they share, and
:func:`register_hub_families`, which adds their :class:`~lgm_ray.backbones.registry.BackboneSpec` records to the
registry. It lives apart from :mod:`lgm_ray.backbones.registry` (the registry and the frozen
:class:`~lgm_ray.backbones.frozen.Backbone` wrapper), which needs none of the hubs' ids, caches, error types or
checkpoint layouts.

Pretrained weights come from the libraries' own hub caches or from a local file (``weights=``). With
neither, a pretrained name fails at once with :class:`~lgm_ray.backbones.registry.BackboneWeightsError` naming
the backbone, what it needed and how to provide it — it never falls back to random weights.

Each registration runs when this module is imported (:mod:`lgm_ray.backbones` imports it); it
imports the registry, never the other way round.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lgm_ray.backbones.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    BackboneWeightsError,
    BuildFn,
    get_spec,
    register_backbone,
    register_build,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MOCOV3_VITB_URL = "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"


def _missing_weights(name: str, needed: str, how: str, cause: BaseException | None = None) -> BackboneWeightsError:
    """The error of a pretrained backbone whose weights are neither cached nor downloadable.

    Args:
        name: the backbone's registry name.
        needed: which weights, and where they would come from.
        how: the fix (pre-fill the cache, or pass a local file).
        cause: the hub library's own error, named in the message.
    """

    return BackboneWeightsError(
        f"backbone {name!r} needs pretrained weights {needed}, which are neither in the local cache nor "
        f"downloadable here{f' ({type(cause).__name__})' if cause else ''}. {how} lgm_ray never runs a "
        f"pretrained backbone with random weights."
    )


def _registered_resolution(name: str) -> int:
    """The native input side the registry records for ``name`` (the default ``img_size``)."""

    return get_spec(name).resolution


# ---------------------------------------------------------------- timm (DINOv2, EVA-02, MoCo-v3 arch)


def _timm_builder(name: str, model_id: str) -> BuildFn:
    """A build function for timm model ``model_id`` registered as ``name``, without a classifier head.

    Args:
        name: the registry name (for its resolution and the error message).
        model_id: timm's model name with its pretrained tag, e.g. ``vit_base_patch14_dinov2.lvd142m``.
    """

    def build(pretrained: bool, weights: str | None, img_size: int | None) -> nn.Module:
        import timm

        kwargs = {"num_classes": 0, "img_size": img_size or _registered_resolution(name)}
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
    """Whether a hub download failed for want of a network or cache (not for a real bug)."""
    names = {type(e).__name__ for e in _causes(exc)}
    offline = {
        "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "URLError",
        "ConnectTimeout", "ReadTimeout", "ConnectError", "MaxRetryError", "NameResolutionError",
        "gaierror", "HfHubHTTPError", "RepositoryNotFoundError",
    }
    return bool(names & offline) or "offline" in str(exc).lower() or "internet" in str(exc).lower()


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the chain of exceptions behind it (``__cause__`` or ``__context__``), each once."""
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
    """A build function for open_clip's ``arch`` with pretrained weights ``tag``, image tower only.

    Args:
        name: the registry name (for its resolution and the error message).
        arch: open_clip's architecture name, e.g. ``"ViT-B-32"``.
        tag: open_clip's pretrained tag, e.g. ``"openai"``.
    """

    def build(pretrained: bool, weights: str | None, img_size: int | None) -> nn.Module:
        import open_clip

        size = img_size or _registered_resolution(name)
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


def _mocov3_state_dict(ckpt: dict[str, Any]) -> dict[str, Any]:
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


def _mocov3_build(pretrained: bool, weights: str | None, img_size: int | None) -> nn.Module:
    """The registry's builder of ``mocov3_vitb16``: timm's ViT-B/16 holding the official checkpoint's encoder.

    The checkpoint comes from ``weights``, else the ``torch.hub`` cache, else a download; its
    position embeddings are resampled when ``img_size`` is not 224.

    Raises:
        BackboneWeightsError: the checkpoint is unavailable, or is not a MoCo-v3 ViT-B one.
    """
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


# ---------------------------------------------------------------- the registry entries


def register_hub_families() -> None:
    """Register the paper's backbones: MoCo-v3, and a record per size of DINOv2, EVA-02 and CLIP.

    Several sizes share one builder factory. This module calls it once, at the end of its
    import; a second call raises ``ValueError`` (registry names are unique).
    """
    register_build(
        name="mocov3_vitb16", feature_dim=768, mean=IMAGENET_MEAN, std=IMAGENET_STD, resolution=224,
        source="torch.hub", weights_id=MOCOV3_VITB_URL, ends_in_norm=True,
        description="MoCo-v3 ViT-B/16 (300 epochs, the official checkpoint the paper used)",
    )(_mocov3_build)
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


register_hub_families()
