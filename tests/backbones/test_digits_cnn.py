"""The shipped DigitsCNN backbone: shapes, normalised output, weights loading, feature quality."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lgm_ray.backbones import BackboneWeightsError
from lgm_ray.backbones.digits_cnn import DIGITS_CNN_MEAN, DIGITS_CNN_STD, DigitsCNN, load_digits_cnn
from lgm_ray.shards.digits import load_digits_split


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(DIGITS_CNN_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DIGITS_CNN_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(_normalize(images[i : i + 512])) for i in range(0, len(images), 512)])


def _probe_top1(model: nn.Module, digits: dict[str, torch.Tensor]) -> float:
    """Test top-1 of a logistic-regression probe fit on frozen train features."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=5000)
    clf.fit(_features(model, digits["train_x"]).numpy(), digits["train_y"].numpy())
    return float(clf.score(_features(model, digits["test_x"]).numpy(), digits["test_y"].numpy()))


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    train_x, train_y = load_digits_split("train", res=32)
    test_x, test_y = load_digits_split("test", res=32)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


@pytest.fixture(scope="module")
def model() -> DigitsCNN:
    return load_digits_cnn()


@pytest.fixture(scope="module")
def trained_top1(model: DigitsCNN, digits: dict[str, torch.Tensor]) -> float:
    return _probe_top1(model, digits)


def test_loads_in_eval_mode(model: DigitsCNN) -> None:
    assert not model.training
    assert all(not m.training for m in model.modules())


@pytest.mark.parametrize("res", [16, 32, 48])
def test_output_shape(model: DigitsCNN, res: int) -> None:
    with torch.no_grad():
        out = model(torch.randn(5, 3, res, res))
    assert out.shape == (5, model.feature_dim) == (5, 128)
    assert torch.isfinite(out).all()


def test_output_is_layernorm_normalised(model: DigitsCNN, digits: dict[str, torch.Tensor]) -> None:
    assert isinstance(model.norm, nn.LayerNorm)
    out = _features(model, digits["test_x"][:64])
    # Undo the LayerNorm's learnt affine; what is left must have zero mean and unit std per sample.
    # Without the LayerNorm the affine-free output would not be standardised, so this still fails.
    core = (out - model.norm.bias) / model.norm.weight
    assert core.mean(dim=1).abs().max() < 1e-3
    assert (core.std(dim=1, unbiased=False) - 1).abs().max() < 1e-2


def test_missing_weights_raise(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(BackboneWeightsError, match="nope.pt") as info:
        load_digits_cnn(missing)
    assert "pretrain_digits_cnn.py" in str(info.value)


def test_linear_probe_reaches_85_percent(trained_top1: float) -> None:
    assert trained_top1 >= 0.85


def test_weights_beat_random_init(trained_top1: float, digits: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    random_top1 = _probe_top1(DigitsCNN().eval(), digits)
    assert trained_top1 - random_top1 >= 0.04, (trained_top1, random_top1)
