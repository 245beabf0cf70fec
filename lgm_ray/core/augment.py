"""Differentiable per-sample augmentation, recomputable from its parameters.

The paper applies, to real and synthetic views alike: horizontal flip (p 0.5), a random resized
crop to ``crop_res`` (scale (0.08, 1), ratio (3/4, 4/3)) done as an affine grid sample, and
Gaussian noise N(0.5, 0.2²) added with p 0.5 (docs/design.md §1). ``"none"`` only resizes to ``crop_res``.

The parameters of every view are drawn up front (:func:`sample_params`) from a given generator and
applied separately (:func:`apply`). That lets the two-pass step recompute a micro-batch's views
exactly, and lets a class shard pick its own views out of the global draw, so that the views of an
image never depend on how the work was split.

The additive noise of a view is a function of that view's seed alone (:func:`normal_from_seeds`: a
counter-based hash, splitmix64 of (seed, element index), turned into normals by Box-Muller). It is
computed on the images' device for all views at once, in plain int64 tensor ops (which wrap like the
hash's unsigned 64-bit arithmetic), so ImageNet-1k's thousands of views per step cost no Python
loop, no CPU draw and no host-to-device copy, and a shard computes exactly its own views' noise.

Paper-exact options (the public reference implementation): ``zoom_out=True`` lets the random
resized crop be larger than the image (no clamp: a side up to √(4/3) ≈ 1.15 of the image, in about
14% of crops with the default scale and ratio), and ``padding="zeros"`` fills what lies outside the
image with zeros instead of reflecting it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lgm_ray.core.defaults import CROP_RES

MODES = ("standard", "none")
PADDINGS = ("reflection", "zeros")


@dataclass(frozen=True)
class AugSpec:
    """What augmentation to apply. Defaults are the paper's."""

    mode: str = "standard"
    crop_res: int = CROP_RES
    flip_p: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    noise_p: float = 0.5
    noise_mean: float = 0.5
    noise_std: float = 0.2
    zoom_out: bool = False  # True: crop sides may exceed the image (the reference), not clamped to it
    padding: str = "reflection"  # what lies outside the image: "reflection" or "zeros" (the reference)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown augmentation mode {self.mode!r}; choose one of {MODES}")
        if self.crop_res < 1:
            raise ValueError(f"crop_res must be ≥ 1, got {self.crop_res}")
        if self.padding not in PADDINGS:
            raise ValueError(f"unknown augmentation padding {self.padding!r}; choose one of {PADDINGS}")
        if not isinstance(self.zoom_out, bool):
            raise ValueError(f"zoom_out must be True or False, got {self.zoom_out!r}")


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
    # Crop width and height as fractions of the image side. By default clamped to the image like
    # torchvision's fallback when the drawn box does not fit; with zoom_out (the reference) a side may
    # exceed 1, the window then holds the whole image along that side and the rest is padding.
    w = torch.sqrt(area * r)
    h = torch.sqrt(area / r)
    if not spec.zoom_out:
        w, h = w.clamp(max=1.0), h.clamp(max=1.0)
    u = torch.rand(n, 2, generator=generator)
    cx = (2 * u[:, 0] - 1) * (1 - w)
    cy = (2 * u[:, 1] - 1) * (1 - h)
    theta[:, 0, 0] = torch.where(flip, -w, w)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    noise_on = torch.rand(n, generator=generator) < spec.noise_p
    return AugParams(theta, noise_on, noise_seed)


# splitmix64's constants (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
# OOPSLA 2014) as the signed int64 values with the same bits.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
# Pairs of normals hashed per block. The block's buffers are reused, so the CPU touches the same
# cache-sized memory again instead of faulting in fresh pages for every temporary; on a GPU (caching
# allocator, launch overhead) larger blocks pay. The block size changes no value.
_BLOCK_PAIRS = {"cpu": 1 << 16}
_BLOCK_PAIRS_DEFAULT = 1 << 22


def _mix64_(z: torch.Tensor, tmp: torch.Tensor, final: bool = True) -> torch.Tensor:
    """splitmix64's finaliser, in place on int64 ``z`` (``tmp``: scratch of the same shape).

    int64 multiplication and xor wrap exactly as uint64 would; torch's ``>>`` on int64 is
    arithmetic, so each shift is masked to make it logical. ``final=False`` stops before the last
    xor-shift round (:func:`normal_from_seeds` reads the bits it needs of that round directly).
    """
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        if mult is None and not final:
            break
        torch.bitwise_right_shift(z, shift, out=tmp)
        tmp.bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(mult)
    return z


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser of int64 bit patterns (not in place)."""
    z = z.clone()
    return _mix64_(z, torch.empty_like(z))


def normal_from_seeds(seeds: torch.Tensor, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normals, ``numel`` per seed, each row a function of its seed alone.

    Elements ``2k`` and ``2k+1`` of a row come from one 64-bit hash ``h = splitmix64(key + (k+1)·γ)``
    of the row's key ``splitmix64(seed + γ)`` (γ the golden-ratio increment). Its top 24 bits, read
    as a signed number t, give ``u1 = (t + 2²³ + 1) / 2²⁴`` in (0, 1]; its low 24 bits b give
    ``u2 = b / 2²⁴``; Box-Muller gives ``√(-2 ln u1)·(cos 2πu2, sin 2πu2)``. Any subset of the seeds,
    on any device, gives the same rows (up to the device's float rounding of log / cos / sin).

    Args:
        seeds: int64 seeds, one per row (any shape; flattened).
        numel: values per row.
        device: where to compute (default: the seeds' device).

    Returns:
        float32 tensor ``len(seeds) × numel``.
    """
    seeds = seeds.reshape(-1).to(device=device or seeds.device, dtype=torch.long)
    dev = seeds.device
    n_rows, pairs = len(seeds), (numel + 1) // 2
    out = torch.empty(n_rows, pairs, 2, device=dev, dtype=torch.float32)
    if n_rows and pairs:
        block = _BLOCK_PAIRS.get(dev.type, _BLOCK_PAIRS_DEFAULT)
        cols = min(pairs, block)
        rows = max(1, block // cols)
        counters = torch.arange(1, pairs + 1, device=dev, dtype=torch.long).mul_(_GOLDEN)
        keys = _mix64(seeds + _GOLDEN)
        size = min(rows, n_rows) * cols
        h, tmp = torch.empty(size, device=dev, dtype=torch.long), torch.empty(size, device=dev, dtype=torch.long)
        r, u, c = (torch.empty(size, device=dev) for _ in range(3))
        for r0 in range(0, n_rows, rows):
            for c0 in range(0, pairs, cols):
                nr, nc = min(rows, n_rows - r0), min(cols, pairs - c0)
                shape = (nr, nc)
                hb, tb = h[: nr * nc].view(shape), tmp[: nr * nc].view(shape)
                rb, ub, cb = (t[: nr * nc].view(shape) for t in (r, u, c))
                torch.add(keys[r0 : r0 + nr, None], counters[c0 : c0 + nc], out=hb)
                _mix64_(hb, tb, final=False)
                # splitmix64's last round, z ^ (z >>> 31), leaves bits 33…63 as they are and sets
                # bits 0…23 to those of z ^ (z >> 31) whatever the shift's sign extension: read
                # both 24-bit fields without the round's shift mask.
                torch.bitwise_right_shift(hb, 40, out=tb)  # top 24 bits, signed: [-2²³, 2²³)
                rb.copy_(tb).add_(2**23 + 1).mul_(2.0**-24).log_().mul_(-2.0).sqrt_()
                torch.bitwise_right_shift(hb, 31, out=tb)
                tb.bitwise_xor_(hb).bitwise_and_(0xFFFFFF)  # low 24 bits of the finished hash
                ub.copy_(tb).mul_(2.0 * math.pi * 2.0**-24)
                dest = out[r0 : r0 + nr, c0 : c0 + nc]
                torch.mul(rb, torch.cos(ub, out=cb), out=dest[..., 0])
                torch.mul(rb, ub.sin_(), out=dest[..., 1])
    return out.view(n_rows, 2 * pairs)[:, :numel]


def view_noise(
    params: AugParams, spec: AugSpec, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """The additive noise of every view (zero where ``noise_on`` is False), on ``device``.

    A view's noise is ``N(noise_mean, noise_std²)`` drawn by :func:`normal_from_seeds` from its own
    ``noise_seed``: recomputable alone, the same for any split of the views.
    """
    out = torch.zeros((len(params), *shape), device=device, dtype=dtype)
    idx = torch.nonzero(params.noise_on.cpu()).flatten()
    if len(idx):
        z = normal_from_seeds(params.noise_seed.cpu()[idx], math.prod(shape), device=out.device)
        out[idx.to(out.device)] = z.mul_(spec.noise_std).add_(spec.noise_mean).view(-1, *shape).to(dtype)
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
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode=spec.padding, align_corners=False)
    if bool(params.noise_on.any()):
        y = y + view_noise(params, spec, size[1:], x.device, x.dtype)
    return y


def augment(x: torch.Tensor, spec: AugSpec, generator: torch.Generator) -> torch.Tensor:
    """Draw fresh parameters and apply them: the one-call form for the probe's training."""
    return apply(x, sample_params(x.shape[0], spec, generator), spec)
