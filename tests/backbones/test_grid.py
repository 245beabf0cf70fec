"""GridProjection: every input seen on the digits' 8×8 grid, digits images unchanged.

The demo backbones' weights saw only bilinear upsamplings of 8×8 grids; the projection must leave
those exactly as they are (else the digits figures move), remove what is finer (else another set's
sharp strokes reach weights that never saw any), keep constants (so it commutes with the
normalisation), and let gradients through to the synthetic images.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lgm_ray.backbones import create_backbone, get_spec
from lgm_ray.backbones.grid import GridProjection
from lgm_ray.evaluate.feature_cache import backbone_fingerprint
from lgm_ray.shards.digits import load_digits_split

DEMO = ("digits_simclr_cnn", "digits_simclr_vit", "digits_simclr_mixer")


def test_digits_images_pass_unchanged() -> None:
    x, _ = load_digits_split("test", res=32)
    assert (GridProjection(8, 32)(x) - x).abs().max() < 1e-5


def test_finer_detail_is_replaced_and_the_map_is_a_projection() -> None:
    g = GridProjection(8, 32)
    bar = torch.zeros(1, 1, 32, 32)
    bar[..., 13:15, :] = 1.0  # a 2-px stroke, sharper than any 4×4 block average can hold
    y = g(bar)
    assert (y - bar).abs().max() > 0.3  # the sharp edge is gone …
    assert (g(y) - y).abs().max() < 1e-5  # … and what is left is on the grid: applying it again is a no-op
    assert torch.allclose(y.mean(), bar.mean(), atol=1e-3)  # the ink is kept, spread over the 4×4 blocks


def test_any_side_maps_to_the_native_side_and_constants_stay() -> None:
    g = GridProjection(8, 32)
    for side in (8, 28, 32, 64):
        c = torch.full((2, 3, side, side), 0.3)
        y = g(c)
        assert y.shape == (2, 3, 32, 32)
        assert (y - 0.3).abs().max() < 1e-5
    with pytest.raises(ValueError, match="side ≥ 8"):
        g(torch.zeros(1, 3, 4, 4))


def test_the_8x8_block_averages_are_kept_at_any_side() -> None:
    # what the UCI forms recorded of a 32×32 bitmap is its 4×4 block averages: an image of any side
    # keeps its 8×8 area averages through the projection; a plain bilinear resize to 32 px does not
    g = GridProjection(8, 32)
    for side in (28, 32, 40):
        sharp = (torch.rand(3, 1, side, side) > 0.7).float()  # a binary "bitmap", detail at every pixel
        blocks = F.adaptive_avg_pool2d(sharp, 8)
        assert (F.adaptive_avg_pool2d(g(sharp), 8) - blocks).abs().max() < 1e-5
        if side == 32:
            assert (g(sharp) - sharp).abs().max() > 0.3  # the pixels themselves are not kept
        else:
            resized = F.interpolate(sharp, size=(32, 32), mode="bilinear", align_corners=False)
            assert (F.adaptive_avg_pool2d(resized, 8) - blocks).abs().max() > 0.02


@pytest.mark.parametrize("name", DEMO)
def test_demo_backbones_see_inputs_on_the_grid(name: str) -> None:
    assert get_spec(name).input_grid == 8
    bb = create_backbone(name)
    digits, _ = load_digits_split("test", res=32)
    x = digits[:4]
    plain = bb.model((x - 0.5) / 0.5)
    assert torch.allclose(bb(x), plain, atol=1e-4)  # digits: as if there were no projection
    noise = torch.rand(4, 3, 32, 32)
    assert not torch.allclose(bb(noise), bb.model((noise - 0.5) / 0.5), atol=1e-3)  # finer detail: changed
    assert torch.allclose(bb(noise), bb.model((bb.grid(noise) - 0.5) / 0.5), atol=1e-5)
    # gradients reach the input, and only through the grid: detail below it gets none
    syn = x.clone().requires_grad_(True)
    bb(syn).square().sum().backward()
    assert syn.grad.abs().max() > 0
    checker = torch.ones(32, 32)
    checker[::2] *= -1
    checker[:, ::2] *= -1  # a ±1 pixel checkerboard: every 4×4 block averages to zero
    assert abs(float((syn.grad * checker).sum())) < 1e-4 * float(syn.grad.abs().sum())


def test_hub_backbones_feed_inputs_as_they_are_and_the_cache_key_sees_the_grid() -> None:
    assert get_spec("dinov2_vitb14").input_grid is None
    bb = create_backbone("digits_simclr_cnn")
    with_grid = backbone_fingerprint(bb)
    assert with_grid["input_grid"] == 8
    bb.spec = dataclasses.replace(bb.spec, input_grid=None)
    assert backbone_fingerprint(bb) != with_grid  # cached features of the other input form are not reused
