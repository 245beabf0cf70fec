"""A small self-supervised ViT for scikit-learn's digits, shipped with its weights.

The paper's backbones are ViTs; the offline demo needs one too, small enough for a CPU. ``DigitsViT``
is timm's ``VisionTransformer`` (Dosovitskiy et al., ICLR 2021) at toy size: 4×4 patches (an 8×8
grid on 32×32 images: one patch per pixel of the 8×8 originals), no class token, average pooling of
the patch tokens and a final ``LayerNorm`` (``fc_norm``, as EVA-02 in timm) — the features end in a
normalisation, as every lgm_ray backbone's. Position embeddings are resampled for other input sides
(timm's ``dynamic_img_size``), so any side divisible by 4 works.

The shipped weights (``lgm_ray/backbones/weights/digits_simclr_vit.pt``, a plain ``state_dict``) were
pre-trained by ``scripts/pretrain_digits_vit.py``: SimCLR on the digits train split (validation
images held out) at 32×32, without labels; the projection head is not part of the file.

Inputs are expected normalised with mean 0.5 / std 0.5 per channel (``x`` in [0, 1]).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lgm_ray.backbones.registry import register_build
from lgm_ray.backbones.shipped import DIGITS_MEAN, DIGITS_STD, WEIGHTS_DIR, load_shipped

NAME = "digits_simclr_vit"
WEIGHTS: Path = WEIGHTS_DIR / "digits_simclr_vit.pt"
PRETRAIN_SCRIPT = "scripts/pretrain_digits_vit.py"
RESOLUTION = 32
PATCH = 4


class DigitsViT(nn.Module):
    """Patch embedding → ``depth`` transformer blocks → mean of the patch tokens → LayerNorm.

    Args:
        dim: token width (= feature dimension).
        depth: number of transformer blocks.
        heads: attention heads per block.
        mlp_ratio: hidden width of the blocks' MLPs, relative to ``dim``.
        img_size: the side the position embeddings are laid out for (others are resampled).

    Attributes:
        feature_dim: size of the output feature vector.
        norm: the final LayerNorm.
    """

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 2, mlp_ratio: float = 2.0,
                 img_size: int = RESOLUTION) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.feature_dim = dim
        self.vit = VisionTransformer(
            img_size=img_size, patch_size=PATCH, embed_dim=dim, depth=depth, num_heads=heads,
            mlp_ratio=mlp_ratio, num_classes=0, class_token=False, global_pool="avg", fc_norm=True,
            dynamic_img_size=True)
        self.norm = self.vit.fc_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of images.

        Args:
            x: float N×3×H×W, normalised (mean 0.5, std 0.5); H and W divisible by 4.

        Returns:
            N×feature_dim LayerNorm-normalised features.
        """
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] % PATCH or x.shape[-2] % PATCH:
            raise ValueError(f"DigitsViT expects N×3×H×W input with H and W divisible by {PATCH}, "
                             f"got shape {tuple(x.shape)}")
        return self.vit(x)


def load_digits_vit(weights_path: str | Path | None = None) -> DigitsViT:
    """A ``DigitsViT`` with the SimCLR weights (default: the shipped file), in eval mode.

    Raises:
        BackboneWeightsError: the file is missing, unreadable or of another architecture.
    """
    return load_shipped(DigitsViT(), weights_path or WEIGHTS, name=NAME, script=PRETRAIN_SCRIPT)


def build(pretrained: bool, weights: str | None, img_size: int | None) -> nn.Module:
    """The registry's builder: ``(pretrained, weights file, img_size) → DigitsViT``.

    ``img_size`` needs no rebuild: the position embeddings are resampled to any input side.
    """
    return load_digits_vit(weights) if pretrained else DigitsViT()


SPEC_FIELDS: dict[str, object] = dict(
    name=NAME, feature_dim=64, mean=DIGITS_MEAN, std=DIGITS_STD, resolution=RESOLUTION, source="lgm_ray",
    weights_id="lgm_ray/backbones/weights/digits_simclr_vit.pt (shipped)", ends_in_norm=True, input_grid=8,
    description="ViT (4×4 patches, 4 blocks, width 64) pre-trained by lgm_ray with SimCLR on the digits "
                "train split (offline demo/tests)",
)

register_build(**SPEC_FIELDS)(build)
