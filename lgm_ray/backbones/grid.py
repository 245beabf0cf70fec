"""Seeing every image on the grid a demo backbone was trained on.

scikit-learn's digits (the UCI optical digits) were made by counting the set pixels of a 32×32 bitmap
in 4×4 blocks: each image *is* an 8×8 grid of block averages. lgm_ray upsamples them bilinearly to
32 px (:mod:`lgm_ray.shards.digits`), so the demo backbones were pre-trained on images that are bilinear
upsamplings of 8×8 grids and nothing finer. Handwriting from elsewhere (MNIST's 28 px, a scan) has
detail below that grid — sharp stroke edges inside a 4×4 patch — that no weight ever saw.

:class:`GridProjection` brings any input to those images: the 8×8 block averages (area resampling,
as the UCI forms were reduced) and back to 32 px by the same bilinear upsampling, with the one 8×8
correction ``(D U)⁻¹`` that makes the map a projection: an image that already is a bilinear
upsampling of an 8×8 grid — every digits image — comes out unchanged, so the features of
digits images do not move (augmented crops and synthetic images, which are not on the grid, do),
while finer detail is replaced by what the digits' own acquisition would have kept. The map is
linear and keeps constant images constant, so it commutes with the per-channel normalisation, and
gradients pass through it to the synthetic images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _upsample_matrix(grid: int, side: int) -> torch.Tensor:
    """``side×grid``: 1-D bilinear upsampling (``align_corners=False``), as ``F.interpolate`` does it."""
    basis = torch.eye(grid, dtype=torch.float64).view(grid, 1, grid)
    return F.interpolate(basis, size=side, mode="linear", align_corners=False).view(grid, side).T


def _block_mean_matrix(grid: int, side: int) -> torch.Tensor:
    """``grid×side``: 1-D area resampling, as ``F.adaptive_avg_pool1d`` does it."""
    basis = torch.eye(side, dtype=torch.float64).view(side, 1, side)
    return F.adaptive_avg_pool1d(basis, grid).view(side, grid).T


class GridProjection(nn.Module):
    """Images of any side → ``side``×``side`` images that are bilinear upsamplings of a ``grid`` grid.

    Args:
        grid: the coarse grid the weights saw (8 for the digits).
        side: the output side (the backbone's native resolution, 32 for the demo backbones).
    """

    def __init__(self, grid: int = 8, side: int = 32) -> None:
        super().__init__()
        if not 0 < grid <= side:
            raise ValueError(f"GridProjection needs 0 < grid <= side, got grid {grid}, side {side}")
        self.grid, self.side = grid, side
        correction = torch.linalg.inv(_block_mean_matrix(grid, side) @ _upsample_matrix(grid, side))
        # Not in the state_dict: weight files stay the networks' own; the feature cache keys on the
        # spec's input_grid instead (lgm_ray.evaluate.feature_cache.backbone_fingerprint).
        self.register_buffer("correction", correction.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×C×H×W (any H, W ≥ grid) → N×C×side×side."""
        if x.ndim != 4 or min(x.shape[-2:]) < self.grid:
            raise ValueError(f"GridProjection expects N×C×H×W images of side ≥ {self.grid}, "
                             f"got shape {tuple(x.shape)}")
        c = self.correction.to(x.dtype)
        z = c @ F.adaptive_avg_pool2d(x, self.grid) @ c.T
        return F.interpolate(z, size=(self.side, self.side), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, side={self.side}"
