"""The SimCLR views of the demo backbones' pre-training (``scripts/simclr_digits.py``): crop range, zoom-out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from simclr_digits import augment  # noqa: E402  (a script, not a package module)


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
