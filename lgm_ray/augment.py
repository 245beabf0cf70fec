"""Differentiable per-sample augmentation, recomputable from its parameters.

The paper applies, to real and synthetic views alike: horizontal flip (p 0.5), a random resized
crop to ``crop_res`` (scale (0.08, 1), ratio (3/4, 4/3)) done as an affine grid sample, and
Gaussian noise N(0.5, 0.2²) added with p 0.5 (DESIGN §1). ``"none"`` only resizes to ``crop_res``.

The parameters of every view are drawn up front (:func:`sample_params`) from a given generator and
applied separately (:func:`apply`). That lets the two-pass step recompute a micro-batch's views
exactly, and lets a class shard pick its own views out of the global draw, so that the views of an
image never depend on how the work was split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("standard", "none")


@dataclass(frozen=True)
class AugSpec:
    """What augmentation to apply. Defaults are the paper's."""

    mode: str = "standard"
    crop_res: int = 224
    flip_p: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    noise_p: float = 0.5
    noise_mean: float = 0.5
    noise_std: float = 0.2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown augmentation mode {self.mode!r}; choose one of {MODES}")
        if self.crop_res < 1:
            raise ValueError(f"crop_res must be ≥ 1, got {self.crop_res}")


@dataclass
class AugParams:
    """Per-view parameters: an affine crop/flip ``theta`` (N×2×3), a noise flag and a noise seed."""

    theta: torch.Tensor
    noise_on: torch.Tensor
    noise_seed: torch.Tensor

    def __len__(self) -> int:
        return self.theta.shape[0]

    def select(self, idx: torch.Tensor | slice) -> AugParams:
        return AugParams(self.theta[idx], self.noise_on[idx], self.noise_seed[idx])


def sample_params(n: int, spec: AugSpec, generator: torch.Generator) -> AugParams:
    """Draw parameters for ``n`` views from ``generator`` (on the CPU, so any device agrees)."""
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    noise_on = torch.zeros(n, dtype=torch.bool)
    noise_seed = torch.randint(0, 2**62, (n,), generator=generator, dtype=torch.long)
    if spec.mode == "none":
        return AugParams(theta, noise_on, noise_seed)
    flip = torch.rand(n, generator=generator) < spec.flip_p
    area = torch.empty(n).uniform_(spec.scale[0], spec.scale[1], generator=generator)
    log_r = torch.empty(n).uniform_(math.log(spec.ratio[0]), math.log(spec.ratio[1]), generator=generator)
    r = torch.exp(log_r)
    # Crop width and height as fractions of the image side; clamped to the image like
    # torchvision's fallback when the drawn box does not fit.
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    u = torch.rand(n, 2, generator=generator)
    cx = (2 * u[:, 0] - 1) * (1 - w)
    cy = (2 * u[:, 1] - 1) * (1 - h)
    theta[:, 0, 0] = torch.where(flip, -w, w)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    noise_on = torch.rand(n, generator=generator) < spec.noise_p
    return AugParams(theta, noise_on, noise_seed)


def _noise(params: AugParams, spec: AugSpec, shape: tuple[int, int, int], device, dtype) -> torch.Tensor:
    """Per-view Gaussian noise, each view from its own seed so a view's noise is recomputable alone."""
    out = torch.zeros((len(params), *shape), device=device, dtype=dtype)
    for i in torch.nonzero(params.noise_on).flatten().tolist():
        g = torch.Generator().manual_seed(int(params.noise_seed[i]))
        out[i] = (torch.randn(shape, generator=g) * spec.noise_std + spec.noise_mean).to(device, dtype)
    return out


def apply(x: torch.Tensor, params: AugParams, spec: AugSpec) -> torch.Tensor:
    """Augment images ``x`` (N×3×H×W, one per row of ``params``) to N×3×crop×crop, differentiably."""
    if x.shape[0] != len(params):
        raise ValueError(f"{x.shape[0]} images but {len(params)} augmentation parameter rows")
    size = (x.shape[0], x.shape[1], spec.crop_res, spec.crop_res)
    if spec.mode == "none":
        if x.shape[-1] == spec.crop_res and x.shape[-2] == spec.crop_res:
            return x
        return F.interpolate(x, size=size[2:], mode="bilinear", align_corners=False)
    theta = params.theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(size), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if bool(params.noise_on.any()):
        y = y + _noise(params, spec, size[1:], x.device, x.dtype)
    return y


def augment(x: torch.Tensor, spec: AugSpec, generator: torch.Generator) -> torch.Tensor:
    """Draw fresh parameters and apply them: the one-call form for the probe's training."""
    return apply(x, sample_params(x.shape[0], spec, generator), spec)
