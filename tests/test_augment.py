"""Differentiable augmentation: recomputable from its parameters, per sample, and as specified."""

from __future__ import annotations

import pytest
import torch

from lgm_ray.augment import AugSpec, apply, augment, sample_params


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
    assert x.grad is not None


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
