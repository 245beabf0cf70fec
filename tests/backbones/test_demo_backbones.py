"""The demo backbones (CNN, ViT, MLP-Mixer): registry entries, normalised frozen output, shipped weights.

Each is used through :func:`lgm_ray.backbones.frozen.create_backbone`, the path users and the distillation
take. The feature-quality check is the issue's own bar: a linear probe on frozen features of the full
digits train split reaches 95 % top-1 on test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lgm_ray.backbones import (
    BackboneWeightsError,
    create_backbone,
    digits_mixer,
    digits_vit,
    get_spec,
    list_backbones,
)
from lgm_ray.backbones.digits_cnn import DIGITS_CNN_WEIGHTS
from lgm_ray.evaluate.legibility import digits_pixel_classifier, legibility
from lgm_ray.shards.digits import load_digits_split

NEW = {"digits_simclr_vit": digits_vit, "digits_simclr_mixer": digits_mixer}
DEMO = ["digits_simclr_cnn", *NEW]


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    train_x, train_y = load_digits_split("train", res=32)
    test_x, test_y = load_digits_split("test", res=32)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


@torch.no_grad()
def _features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([backbone(images[i : i + 256]) for i in range(0, len(images), 256)])


def test_demo_backbones_are_registered_as_three_families() -> None:
    assert set(DEMO) <= set(list_backbones())
    families = {type(create_backbone(n, pretrained=False).model).__name__ for n in DEMO}
    assert families == {"DigitsCNN", "DigitsViT", "DigitsMixer"}
    for name in NEW:
        spec = get_spec(name)
        assert spec.source == "lgm_ray" and spec.resolution == 32 and spec.ends_in_norm
        assert Path(NEW[name].WEIGHTS).parent == Path(digits_vit.__file__).resolve().parent / "weights"


def test_importing_the_registry_alone_registers_them() -> None:
    import subprocess
    import sys

    code = "from lgm_ray.backbones import list_backbones; print(sorted(n for n in list_backbones() if 'digits' in n))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted(DEMO))


@pytest.mark.parametrize("name", DEMO)
def test_shipped_weights_load_offline_frozen_with_the_registered_dim(name: str, digits, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
    backbone = create_backbone(name)
    x = digits["test_x"][:8].clone().requires_grad_(True)
    z = backbone(x)
    assert z.shape == (8, get_spec(name).feature_dim)
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not any(m.training for m in backbone.modules())
    # Frozen, yet the distillation needs gradients w.r.t. the images.
    z.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", DEMO)
def test_output_is_the_models_own_layernorm(name: str, digits) -> None:
    backbone = create_backbone(name)
    assert not backbone.adds_norm  # the model's own LayerNorm, not lgm_ray's fallback
    norm = backbone.model.norm
    assert isinstance(norm, nn.LayerNorm)
    seen = []
    norm.register_forward_hook(lambda mod, inp, out: seen.append(out))
    z = _features(backbone, digits["test_x"][:32])
    assert torch.equal(seen[-1], z)  # the LayerNorm's output is the feature vector, untouched after
    core = (z - norm.bias) / norm.weight  # undo the affine: standardised per sample
    assert core.mean(dim=1).abs().max() < 1e-3
    assert (core.std(dim=1, unbiased=False) - 1).abs().max() < 1e-2


@pytest.mark.parametrize("name", list(NEW))
def test_shipped_weights_are_the_ones_loaded(name: str) -> None:
    state = torch.load(NEW[name].WEIGHTS, map_location="cpu", weights_only=True)
    loaded = create_backbone(name).model.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    untrained = create_backbone(name, pretrained=False).model.state_dict()
    assert any(not torch.equal(state[k], untrained[k]) for k in state if state[k].is_floating_point())


@pytest.mark.parametrize("name", list(NEW))
def test_other_input_sides(name: str) -> None:
    backbone = create_backbone(name)
    for side in (28, 32, 48):
        assert backbone(torch.rand(2, 3, side, side)).shape == (2, get_spec(name).feature_dim)


@pytest.mark.parametrize("name", list(NEW))
def test_missing_weights_is_a_clear_error(name: str, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(BackboneWeightsError, match="nope.pt"):
        create_backbone(name, weights=tmp_path / "nope.pt")
    # The shipped file itself gone (a broken install): the error names it and the script that remakes it.
    monkeypatch.setattr(NEW[name], "WEIGHTS", tmp_path / "gone.pt")
    with pytest.raises(BackboneWeightsError, match="gone.pt") as info:
        create_backbone(name)
    assert NEW[name].PRETRAIN_SCRIPT in str(info.value) and "random weights" in str(info.value)


@pytest.mark.parametrize("name", list(NEW))
def test_corrupt_or_foreign_weights_are_clear_errors(name: str, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(NEW[name].WEIGHTS).read_bytes()[:1000])
    with pytest.raises(BackboneWeightsError, match="cannot read"):
        create_backbone(name, weights=truncated)
    with pytest.raises(BackboneWeightsError, match="does not fit its architecture"):
        create_backbone(name, weights=DIGITS_CNN_WEIGHTS)  # a real state_dict, of another model


@pytest.mark.slow  # 5-fold CV of four C values on 1,150 samples: 40–45 s per backbone on 2 busy cores
@pytest.mark.parametrize("name", DEMO)
def test_linear_probe_on_full_train_reaches_95_percent(name: str, digits) -> None:
    """Logistic regression on frozen features, its C chosen by 5-fold CV on train (never on test)."""
    from sklearn.linear_model import LogisticRegressionCV

    backbone = create_backbone(name)
    clf = LogisticRegressionCV(Cs=[0.1, 1, 10, 100], cv=5, max_iter=5000, scoring="accuracy")
    clf.fit(_features(backbone, digits["train_x"]).numpy(), digits["train_y"].numpy())
    top1 = clf.score(_features(backbone, digits["test_x"]).numpy(), digits["test_y"].numpy())
    assert top1 >= 0.95, (name, top1)


def test_legibility_reads_real_digits_and_rejects_noise(digits) -> None:
    clf = digits_pixel_classifier()
    assert clf.accuracy(digits["test_x"], digits["test_y"]) >= 0.95
    y = digits["test_y"]
    one_each = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(10)])
    real = legibility(digits["test_x"][one_each], y[one_each], clf)
    assert real["legible_classes"] >= 8 and real["num_classes"] == 10
    noise = legibility(torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(10), clf)
    assert noise["legible_classes"] <= 3


def test_legibility_is_not_swayed_by_a_stray_pixel_in_a_corner(digits) -> None:
    """A bright speck where real digits never have ink does not hide the digit from the reader."""
    clf = digits_pixel_classifier()
    y = digits["test_y"]
    one_each = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(10)])
    images = digits["test_x"][one_each].clone()
    assert legibility(images, y[one_each], clf)["legible_classes"] >= 9
    images[:, :, :4, :4] = 1.0  # one 8×8 pixel of the original resolution, in the top-left corner
    assert legibility(images, y[one_each], clf)["legible_classes"] >= 9
