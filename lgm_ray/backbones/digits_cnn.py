"""A tiny self-supervised CNN backbone for scikit-learn's digits, shipped with its weights.

Tests and the offline demo need a frozen backbone that needs no download and whose features still
mean something. ``DigitsCNN`` is a 4-block convolutional network (conv3×3 + BatchNorm + ReLU, widths
32/64/128/256, 2×2 max-pooling between blocks), global average pooling, a linear projection to
``feature_dim`` and a final ``LayerNorm`` — like the ViTs of the paper, whose features end in a
LayerNorm; the matching objective is a cosine and blind to scale, so a normalised output matters.

The shipped weights (``lgm_ray/weights/digits_simclr_cnn.pt``, a plain ``state_dict``) were
pre-trained by ``scripts/pretrain_digits_cnn.py --seed 0`` (the SimCLR loop the three demo backbones
share, ``scripts/simclr_digits.py``; Chen et al., *A Simple Framework for Contrastive Learning of
Visual Representations*, ICML 2020) on the digits train split at 32×32, validation images held out,
without labels. The SimCLR projection head was discarded; it is not part of the file.

Inputs are expected normalised with ``DIGITS_CNN_MEAN`` / ``DIGITS_CNN_STD``: ``(x - mean) / std``
for ``x`` in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lgm_ray.backbones.registry import register_build
from lgm_ray.backbones.shipped import DIGITS_MEAN, DIGITS_STD, WEIGHTS_DIR, load_shipped

DIGITS_CNN_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
DIGITS_CNN_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
DIGITS_CNN_WEIGHTS: Path = WEIGHTS_DIR / "digits_simclr_cnn.pt"
PRETRAIN_SCRIPT = "scripts/pretrain_digits_cnn.py"


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),  # BatchNorm carries the bias
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """4-block CNN → global average pool → linear → LayerNorm.

    Args:
        feature_dim: size of the output feature vector.
        widths: channels of the four conv blocks.

    Attributes:
        feature_dim: size of the output feature vector.
    """

    def __init__(
        self, feature_dim: int = 128, widths: tuple[int, int, int, int] = (32, 64, 128, 256)
    ) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        layers: list[nn.Module] = []
        in_ch = 3
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers.append(_conv_block(in_ch, width))
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(in_ch, feature_dim)
        self.norm = nn.LayerNorm(feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of images.

        Args:
            x: float N×3×H×W, already normalised with ``DIGITS_CNN_MEAN`` / ``DIGITS_CNN_STD``;
                H = W ≥ 16 (three 2× poolings leave at least 2×2 before the global pool).

        Returns:
            N×feature_dim LayerNorm-normalised features.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DigitsCNN expects N×3×H×W input, got shape {tuple(x.shape)}")
        h = self.features(x).mean(dim=(2, 3))
        return self.norm(self.proj(h))


def load_digits_cnn(weights_path: str | Path | None = None) -> DigitsCNN:
    """Build a ``DigitsCNN`` and load the SimCLR-pre-trained weights, in eval mode.

    Args:
        weights_path: a ``state_dict`` file; default the shipped ``lgm_ray/weights/digits_simclr_cnn.pt``.

    Returns:
        The model in eval mode.

    Raises:
        BackboneWeightsError: the weights file is missing or unreadable (never a silent random
            initialisation).
    """
    path = Path(weights_path) if weights_path is not None else DIGITS_CNN_WEIGHTS
    return load_shipped(DigitsCNN(), path, name="digits_simclr_cnn", script=PRETRAIN_SCRIPT)


@register_build(
    name="digits_simclr_cnn", feature_dim=128, mean=DIGITS_MEAN, std=DIGITS_STD, resolution=32,
    source="lgm_ray", weights_id="lgm_ray/backbones/weights/digits_simclr_cnn.pt (shipped)", ends_in_norm=True,
    input_grid=8,
    description="4-block CNN pre-trained by lgm_ray with SimCLR on the digits train split (offline demo/tests)",
)
def build(pretrained: bool, weights: str | None, img_size: int | None) -> nn.Module:
    """The registry's builder of ``digits_simclr_cnn``: the shipped weights, or the bare architecture."""
    return load_digits_cnn(weights) if pretrained else DigitsCNN()
