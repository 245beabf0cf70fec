"""A small self-supervised MLP-Mixer for scikit-learn's digits, shipped with its weights.

The demo's cross-model table needs a pair of dissimilar models, as CLIP and MoCo are in the paper:
next to a CNN and a ViT, ``DigitsMixer`` has neither convolutions nor attention. It is timm's
``MlpMixer`` (Tolstikhin et al., *MLP-Mixer: An all-MLP Architecture for Vision*, NeurIPS 2021) at
toy size — 4×4 patches on 32×32 images (64 tokens), blocks that mix across tokens then across
channels with MLPs — followed by the average of the tokens and a final ``LayerNorm``: the features
end in a normalisation, as every lgm_ray backbone's.

The token-mixing MLPs are laid out for 64 tokens, so the model is tied to its 32×32 input: other
sides are resized to 32×32 (bilinear, antialiased) inside ``forward``.

The shipped weights (``lgm_ray/backbones/weights/digits_simclr_mixer.pt``, a plain ``state_dict``) were
pre-trained by ``scripts/pretrain_digits_mixer.py``: SimCLR on the digits train split (validation
images held out) at 32×32, without labels; the projection head is not part of the file.

Inputs are expected normalised with mean 0.5 / std 0.5 per channel (``x`` in [0, 1]).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lgm_ray.backbones.registry import register_build
from lgm_ray.backbones.shipped import DIGITS_MEAN, DIGITS_STD, WEIGHTS_DIR, load_shipped

NAME = "digits_simclr_mixer"
WEIGHTS: Path = WEIGHTS_DIR / "digits_simclr_mixer.pt"
PRETRAIN_SCRIPT = "scripts/pretrain_digits_mixer.py"
RESOLUTION = 32
PATCH = 4


class DigitsMixer(nn.Module):
    """Patch embedding → ``depth`` Mixer blocks → LayerNorm → mean of the tokens → LayerNorm.

    Args:
        dim: token width (= feature dimension).
        depth: number of Mixer blocks.
        token_ratio: hidden width of the token-mixing MLPs, relative to ``dim``.
        channel_ratio: hidden width of the channel-mixing MLPs, relative to ``dim``.

    Attributes:
        feature_dim: size of the output feature vector.
        norm: the final LayerNorm.
    """

    def __init__(self, dim: int = 128, depth: int = 6, token_ratio: float = 0.5,
                 channel_ratio: float = 2.0) -> None:
        super().__init__()
        from timm.models.mlp_mixer import MlpMixer

        self.feature_dim = dim
        self.mixer = MlpMixer(num_classes=0, img_size=RESOLUTION, patch_size=PATCH, num_blocks=depth,
                              embed_dim=dim, mlp_ratio=(token_ratio, channel_ratio), global_pool="avg")
        # timm's Mixer averages LayerNorm-ed tokens; the average itself is not normalised.
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of images.

        Args:
            x: float N×3×H×W, normalised (mean 0.5, std 0.5); resized to 32×32 when it is not.

        Returns:
            N×feature_dim LayerNorm-normalised features.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DigitsMixer expects N×3×H×W input, got shape {tuple(x.shape)}")
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.norm(self.mixer(x))


def load_digits_mixer(weights_path: str | Path | None = None) -> DigitsMixer:
    """A ``DigitsMixer`` with the SimCLR weights (default: the shipped file), in eval mode.

    Raises:
        BackboneWeightsError: the file is missing, unreadable or of another architecture.
    """
    return load_shipped(DigitsMixer(), weights_path or WEIGHTS, name=NAME, script=PRETRAIN_SCRIPT)


def build(pretrained: bool, weights: str | None, img_size: int | None) -> nn.Module:
    """The registry's builder: ``(pretrained, weights file, img_size) → DigitsMixer``.

    ``img_size`` needs no rebuild: other input sides are resized to 32×32 in ``forward``.
    """
    return load_digits_mixer(weights) if pretrained else DigitsMixer()


SPEC_FIELDS: dict[str, object] = dict(
    name=NAME, feature_dim=128, mean=DIGITS_MEAN, std=DIGITS_STD, resolution=RESOLUTION, source="lgm_ray",
    weights_id="lgm_ray/backbones/weights/digits_simclr_mixer.pt (shipped)", ends_in_norm=True, input_grid=8,
    description="MLP-Mixer (4×4 patches, 6 blocks, width 128) pre-trained by lgm_ray with SimCLR on the "
                "digits train split (offline demo/tests)",
)

register_build(**SPEC_FIELDS)(build)
