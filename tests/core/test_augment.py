"""Differentiable augmentation: recomputable from its parameters, per sample, and as specified."""

from __future__ import annotations

import math

import pytest
import torch

import lgm_ray.core.augment as augment_module
from lgm_ray.core.augment import (
    AugParams,
    AugSpec,
    _mix64,
    apply,
    augment,
    normal_from_seeds,
    sample_params,
    view_noise,
)


def test_views_are_recomputed_exactly_from_their_parameters():
    spec = AugSpec(crop_res=12)
    x = torch.rand(6, 3, 16, 16)
    params = sample_params(6, spec, torch.Generator().manual_seed(0))
    whole = apply(x, params, spec)
    assert whole.shape == (6, 3, 12, 12)
    part = apply(x[2:5], params.select(slice(2, 5)), spec)
    assert torch.equal(part, whole[2:5])
    again = sample_params(6, spec, torch.Generator().manual_seed(0))
    assert torch.equal(apply(x, again, spec), whole)


def test_parameters_follow_the_distributions():
    spec = AugSpec(crop_res=8)
    p = sample_params(20000, spec, torch.Generator().manual_seed(1))
    flip = p.theta[:, 0, 0] < 0
    assert abs(float(flip.float().mean()) - 0.5) < 0.02
    assert abs(float(p.noise_on.float().mean()) - 0.5) < 0.02
    area = p.theta[:, 0, 0].abs() * p.theta[:, 1, 1]
    assert float(area.min()) >= 0.08 - 1e-6 and float(area.max()) <= 1.0 + 1e-6
    # the crop window stays inside the image
    assert float((p.theta[:, 0, 2].abs() + p.theta[:, 0, 0].abs()).max()) <= 1 + 1e-6
    assert float((p.theta[:, 1, 2].abs() + p.theta[:, 1, 1]).max()) <= 1 + 1e-6


def test_flip_alone_mirrors_the_image():
    spec = AugSpec(crop_res=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0, noise_p=0.0)
    x = torch.rand(2, 3, 8, 8)
    y = augment(x, spec, torch.Generator().manual_seed(0))
    assert torch.allclose(y, x.flip(-1), atol=1e-5)


def test_noise_has_the_papers_mean_and_std():
    spec = AugSpec(crop_res=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, noise_p=1.0)
    x = torch.zeros(4, 3, 32, 32)
    y = augment(x, spec, torch.Generator().manual_seed(0))
    assert abs(float(y.mean()) - 0.5) < 0.02
    assert abs(float(y.std()) - 0.2) < 0.02


def test_none_mode_only_resizes_and_is_differentiable():
    spec = AugSpec(mode="none", crop_res=8)
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    y = augment(x, spec, torch.Generator())
    assert torch.equal(y, x)
    y2 = augment(x, AugSpec(mode="none", crop_res=4), torch.Generator())
    assert y2.shape == (3, 3, 4, 4)
    y2.sum().backward()
    # halving bilinearly samples between four pixels with equal weights
    assert torch.allclose(x.grad, torch.full_like(x, 0.25))


def test_standard_mode_is_differentiable_per_sample():
    spec = AugSpec(crop_res=8)
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    y = augment(x, spec, torch.Generator().manual_seed(2))
    y[1].sum().backward()
    assert float(x.grad[1].abs().sum()) > 0
    assert float(x.grad[0].abs().sum()) == 0 and float(x.grad[2].abs().sum()) == 0


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="augmentation mode"):
        AugSpec(mode="heavy")
    with pytest.raises(ValueError, match="padding 'border'.*reflection.*zeros"):
        AugSpec(padding="border")
    with pytest.raises(ValueError, match="zoom_out"):
        AugSpec(zoom_out="yes")


# ------------------------------------------------------------------ the additive noise


def _splitmix64_finaliser(z: int) -> int:
    """The published splitmix64 mix on Python's unbounded ints, reduced mod 2⁶⁴."""
    m = 2**64
    z %= m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % m
    return z ^ (z >> 31)


def test_noise_hash_is_splitmix64_with_wrapping_int64():
    values = [0, 1, -1, 12345, 2**62 - 1, -(2**63), 2**63 - 1, 0x0123456789ABCDEF]
    got = _mix64(torch.tensor(values, dtype=torch.long)).tolist()
    assert [g % 2**64 for g in got] == [_splitmix64_finaliser(v) for v in values]


def _normal_reference(seed: int, j: int) -> float:
    """Element ``j`` of seed's row as :func:`normal_from_seeds` documents it, in Python floats."""
    gamma = 0x9E3779B97F4A7C15
    h = _splitmix64_finaliser(_splitmix64_finaliser(seed + gamma) + (j // 2 + 1) * gamma)
    top = h >> 40
    t = top - 2**24 if top >= 2**23 else top
    u1, u2 = (t + 2**23 + 1) / 2**24, (h & 0xFFFFFF) / 2**24
    r = math.sqrt(-2 * math.log(u1))
    return r * (math.cos(2 * math.pi * u2) if j % 2 == 0 else math.sin(2 * math.pi * u2))


def test_noise_values_follow_the_documented_algorithm():
    seeds = [0, 7, 2**62 - 5, 123456789]
    z = normal_from_seeds(torch.tensor(seeds), 1001)
    for i, seed in enumerate(seeds):
        for j in (0, 1, 2, 3, 500, 999, 1000):
            assert abs(float(z[i, j]) - _normal_reference(seed, j)) < 1e-5


def test_noise_of_a_view_depends_on_its_seed_alone(monkeypatch):
    seeds = torch.tensor([5, 6, 7, 2**61 + 3, 0, 99])
    whole = normal_from_seeds(seeds, 301)  # odd: the last Box-Muller pair is cut
    assert whole.shape == (6, 301) and whole.dtype == torch.float32
    for block in (7, 400):  # blocks that split rows, and blocks of several whole rows
        monkeypatch.setitem(augment_module._BLOCK_PAIRS, "cpu", block)
        assert torch.equal(normal_from_seeds(seeds, 301), whole)
    monkeypatch.undo()
    for idx in ([3], [5, 0, 2], [1, 4]):
        assert torch.equal(normal_from_seeds(seeds[idx], 301), whole[idx])
    assert torch.equal(normal_from_seeds(seeds, 300), whole[:, :300])  # the length cuts, never shifts
    # the same through the augmentation parameters: any sharding of the views gives the same noise
    spec = AugSpec(crop_res=6)
    params = sample_params(40, spec, torch.Generator().manual_seed(3))
    full = view_noise(params, spec, (3, 6, 6), "cpu", torch.float32)
    for shard in (torch.arange(0, 40, 3), torch.tensor([39, 1, 17]), torch.arange(20, 40)):
        assert torch.equal(view_noise(params.select(shard), spec, (3, 6, 6), "cpu", torch.float32), full[shard])


def test_noise_is_standard_normal_and_independent_across_views():
    z = normal_from_seeds(torch.arange(64), 20000)  # consecutive seeds: the hardest case for a hash
    assert abs(float(z.mean())) < 0.005 and abs(float(z.std()) - 1) < 0.005
    assert abs(float((z.abs() < 1).float().mean()) - 0.6827) < 0.005
    assert abs(float((z.abs() > 3).float().mean()) - 0.0027) < 0.001
    corr = torch.corrcoef(z)
    off = corr[~torch.eye(64, dtype=torch.bool)]
    assert float(off.abs().max()) < 0.04  # ~5 standard errors of a zero correlation at n = 20000
    # within a view: neighbouring elements (one Box-Muller pair, and across pairs) uncorrelated too
    assert abs(float(torch.corrcoef(torch.stack([z[:, 0::2].flatten(), z[:, 1::2].flatten()]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([z[:, 1:-1:2].flatten(), z[:, 2::2].flatten()]))[0, 1])) < 0.01


def test_noise_mean_std_and_only_on_flagged_views():
    spec = AugSpec(crop_res=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, noise_p=0.5)
    x = torch.zeros(400, 3, 16, 16)
    params = sample_params(400, spec, torch.Generator().manual_seed(4))
    y = apply(x, params, spec)
    on = params.noise_on
    assert 150 < int(on.sum()) < 250
    assert torch.equal(y[~on], x[~on])
    assert abs(float(y[on].mean()) - 0.5) < 0.005 and abs(float(y[on].std()) - 0.2) < 0.005
    # the noise does not depend on the images' dtype beyond rounding
    y64 = apply(x.double(), params, spec)
    assert y64.dtype == torch.float64 and torch.allclose(y64.float(), y, atol=1e-6)


def test_noise_flag_and_seed_travel_with_the_view():
    spec = AugSpec(crop_res=4, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    eye = torch.zeros(2, 2, 3)
    eye[:, 0, 0] = eye[:, 1, 1] = 1.0
    a = AugParams(eye, torch.tensor([True, True]), torch.tensor([10, 11]))
    b = AugParams(eye, torch.tensor([True, True]), torch.tensor([11, 10]))
    x = torch.zeros(2, 3, 4, 4)
    assert torch.equal(apply(x, a, spec), apply(x, b, spec).flip(0))
    assert not torch.equal(apply(x, a, spec)[0], apply(x, a, spec)[1])


# ------------------------------------------------------------------ paper-exact crop options


def _zoom_out_fraction(scale: tuple[float, float], ratio: tuple[float, float]) -> float:
    """P(crop width > 1 or height > 1) for area ~ U(scale), log r ~ U(log ratio), w = √(area·r).

    Width and height cannot both exceed 1 (area ≤ 1), and log r is symmetric, so the answer is
    2·P(area·r > 1) = 2/(2a) ∫₀ᵃ P(area > e^-t) dt with a = log(max ratio); for area ~ U(s0, 1)
    and e^-a ≥ s0 that is (1/a) ∫₀ᵃ (1 − e^-t)/(1 − s0) dt = (a − (1 − e^-a)) / (a·(1 − s0)).
    """
    lo, hi = scale
    a = math.log(ratio[1])
    assert math.isclose(-math.log(ratio[0]), a) and math.exp(-a) >= lo and hi == 1.0
    return (a - (1 - math.exp(-a))) / (a * (hi - lo))


def test_zoom_out_crops_exceed_the_image_as_often_as_the_reference():
    expected = _zoom_out_fraction((0.08, 1.0), (3 / 4, 4 / 3))
    assert 0.14 < expected < 0.145  # "about 14% of crops"
    p = sample_params(40000, AugSpec(crop_res=8, zoom_out=True), torch.Generator().manual_seed(5))
    w, h = p.theta[:, 0, 0].abs(), p.theta[:, 1, 1]
    frac = float(((w > 1) | (h > 1)).float().mean())
    assert abs(frac - expected) < 0.01  # standard error 0.0017
    side = torch.maximum(w, h)
    assert float(side.max()) <= math.sqrt(4 / 3) + 1e-6 and float(side.max()) > 1.1
    # a window larger than the image holds all of it along that side
    assert float((p.theta[:, 0, 2].abs() - (w - 1).abs()).max()) <= 1e-6
    assert float((w * h).max()) <= 1 + 1e-6  # the area is still drawn from the scale range
    clamped = sample_params(40000, AugSpec(crop_res=8), torch.Generator().manual_seed(5))
    assert float(clamped.theta[:, 0, 0].abs().max()) <= 1.0 and float(clamped.theta[:, 1, 1].max()) <= 1.0


@pytest.mark.parametrize("padding", ["zeros", "reflection"])
def test_zero_padding_puts_exact_zeros_outside_the_image(padding):
    crop, side = 32, 16
    spec = AugSpec(crop_res=crop, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), flip_p=0.0, noise_p=0.0,
                   zoom_out=True, padding=padding)
    x = torch.rand(3, 3, side, side) + 0.5  # no pixel is zero
    params = sample_params(3, spec, torch.Generator().manual_seed(6))
    w, cx = params.theta[:, 0, 0], params.theta[:, 0, 2]
    assert float(w.min()) > 1.15  # √(4/3): wider than the image
    y = apply(x, params, spec)
    # where each output column samples the input (normalised coordinates, align_corners=False)
    u = (2 * torch.arange(crop) + 1) / crop - 1
    x_in = w[:, None] * u[None] + cx[:, None]  # views × columns
    outside = x_in.abs() >= 1 + 1 / side  # bilinear weight of every image pixel is zero there
    inside = x_in.abs() <= 1 - 1 / side
    assert int(outside.sum()) > 0 and int(inside.sum()) > 0
    cols_out = outside[:, None, None, :].expand_as(y)
    cols_in = inside[:, None, None, :].expand_as(y)
    if padding == "zeros":
        assert torch.equal(y[cols_out], torch.zeros_like(y[cols_out]))
    else:
        assert float(y[cols_out].min()) >= 0.5
    assert float(y[cols_in].min()) >= 0.5
