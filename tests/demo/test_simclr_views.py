"""The SimCLR views of the demo backbones' pre-training (``scripts/simclr_digits.py``): crop range, zoom-out, stroke width."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from simclr_digits import augment, vary_stroke  # noqa: E402  (a script, not a package module)


def _covered(min_scale: float, max_scale: float) -> float:
    """Mean brightness in [0, 1] of the views of an all-white image: the share of each view the image covers."""
    white = torch.ones(256, 3, 32, 32)
    views = augment(white, torch.Generator().manual_seed(0), min_scale=min_scale, jitter=0.0, max_scale=max_scale)
    return float((views * 0.5 + 0.5).mean())  # undo the (x - 0.5) / 0.5 normalisation; the noise averages out


def test_crops_inside_the_image_show_it_everywhere_but_the_rotated_corners() -> None:
    assert _covered(0.08, 1.0) > 0.85


@pytest.mark.parametrize("area", [2.0, 4.0])
def test_zoomed_out_views_shrink_the_digit_into_a_black_frame(area: float) -> None:
    # A view of `area` times the image's area shows the image on about 1 / area of it; the rest is black.
    assert _covered(area, area) == pytest.approx(1.0 / area, abs=0.08)


def test_zoom_out_range_mixes_both() -> None:
    inside, mixed = _covered(0.08, 1.0), _covered(0.08, 2.0)
    assert 1.0 / 2.0 < mixed < inside - 0.05


def _bar(width: int, n: int = 64) -> torch.Tensor:
    """n white vertical bars `width` pixels wide, centred on a black 3×32×32 image."""
    x = torch.zeros(n, 3, 32, 32)
    x[..., 16 - width // 2:16 - width // 2 + width] = 1.0
    return x


def test_vary_stroke_widens_or_narrows_each_bar_by_one_pixel_per_side() -> None:
    out = vary_stroke(_bar(3), torch.Generator().manual_seed(0), 1.0)
    widths = (out[:, 0, 16] > 0.5).sum(dim=1)  # bright pixels along the middle row
    assert set(widths.tolist()) == {1, 5}
    thick = int((widths == 5).sum())
    assert 16 <= thick <= 48  # about half of 64 each way


def test_vary_stroke_at_zero_keeps_images_and_draws_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    x = _bar(3)
    assert torch.equal(vary_stroke(x, gen, 0.0), x)
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=torch.Generator().manual_seed(0)))
    # Some images are kept at p < 1.
    widths = (vary_stroke(x, gen, 0.5)[:, 0, 16] > 0.5).sum(dim=1)
    assert {1, 3, 5} == set(widths.tolist())
