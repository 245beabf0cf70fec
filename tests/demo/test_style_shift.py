"""``benchmarks/style_shift.py``: the digits drawn otherwise, and the check on a shipped demo backbone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from style_shift import main, shrink, thin  # noqa: E402  (a benchmark script, not a package module)


def test_shrink_centres_the_digit_in_a_black_frame() -> None:
    x = torch.ones(2, 3, 32, 32)
    out = shrink(x, 0.5)
    assert out[..., 8:24, 8:24].min() > 0.99  # the 16-px digit, centred
    assert out.sum() == pytest.approx(2 * 3 * 16 * 16, rel=1e-4)  # nothing outside it


def test_thin_narrows_a_bar_by_a_pixel_each_side() -> None:
    x = torch.zeros(1, 3, 32, 32)
    x[..., 12:17] = 1.0  # a vertical bar 5 px wide
    assert int((thin(x)[0, 0, 16] > 0.5).sum()) == 3


def test_check_scores_each_way_of_drawing(capsys) -> None:
    results = main(["--backbones", "digits_simclr_cnn"])
    r = results["digits_simclr_cnn"]
    assert list(r) == ["clean", "zoom", "thin", "both"]
    assert r["clean"] >= 90.0  # the shipped CNN's probe on clean val digits
    assert r["both"] < r["clean"]  # a shifted drawing costs something
    assert "digits_simclr_cnn" in capsys.readouterr().out
