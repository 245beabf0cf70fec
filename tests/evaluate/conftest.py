"""The evaluation tests' sets, weights, shards and spies (the digits shards come from tests/conftest.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import BACKBONE, TWIN, save_set

from lgm_ray import backbones
from lgm_ray.backbones import registry
from lgm_ray.backbones.digits_cnn import DigitsCNN
from lgm_ray.evaluate import feature_cache as fc


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """A feature cache shared by the tests that do not count what it holds."""
    return str(tmp_path_factory.mktemp("feature_cache"))


@pytest.fixture(scope="module")
def real_set(shards):
    """The first train image of every class, with its key: a stand-in for a distilled set."""
    images, keys = [], []
    for c in range(shards.num_classes):
        x, k = shards.class_images(c, resize=32, crop=32)
        images.append(x[0])
        keys.append(k[0])
    return torch.stack(images), torch.arange(shards.num_classes), keys


@pytest.fixture(scope="module")
def synset_file(real_set, tmp_path_factory) -> str:
    """Distilled at 32 px with 32 px crops (the demo's settings, which are not the 256/224 defaults)."""
    images, labels, _ = real_set
    return save_set(tmp_path_factory.mktemp("synset") / "set.pt", images, labels, backbone=BACKBONE,
                    real_res=32, crop_res=32, syn_res=32)


@pytest.fixture(scope="module")
def odd_set_file(real_set, tmp_path_factory) -> str:
    """24 px images distilled with crop 28 and ImageNet normalisation: every setting off its default."""
    images, labels, _ = real_set
    small = F.interpolate(images, size=(24, 24), mode="bilinear", align_corners=False).clamp(0, 1)
    return save_set(tmp_path_factory.mktemp("odd_set") / "odd.pt", small, labels, backbone=BACKBONE,
                    real_res=32, crop_res=28, syn_res=24, normalization="imagenet")


@pytest.fixture(scope="session")
def val_shards(tmp_path_factory) -> str:
    """Digits shards with a validation split held out of train (20 % of each class)."""
    from lgm_ray.shards.__main__ import main as shards_main

    out = tmp_path_factory.mktemp("digits_val") / "digits"
    assert shards_main(["build", "digits", "--out", str(out), "--val-fraction", "0.2"]) == 0
    return str(out)


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> str:
    """Other weights for the same architecture: a randomly initialised DigitsCNN."""
    path = tmp_path_factory.mktemp("weights") / "digits_cnn_random.pt"
    torch.manual_seed(123)
    torch.save(DigitsCNN().state_dict(), path)
    return str(path)


@pytest.fixture
def twin(monkeypatch) -> str:
    """Register the demo backbone a second time, under another name, for this test only."""
    monkeypatch.setitem(registry._REGISTRY, TWIN, dataclasses.replace(backbones.get_spec(BACKBONE), name=TWIN))
    return TWIN


@pytest.fixture
def count_extractions(monkeypatch):
    """Count every pass of a backbone over a whole split (the work the cache must save)."""
    calls: list[int] = []
    real = fc.extract_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fc, "extract_features", counting)
    return calls


@pytest.fixture
def built_backbones(monkeypatch):
    """Record how every backbone of an evaluation is built: (name, normalization, img_size)."""
    built: list[tuple[str, str, int]] = []
    real = fc.create_backbone

    def spy(name, **kw):
        built.append((name, kw["normalization"], kw["img_size"]))
        return real(name, **kw)

    monkeypatch.setattr(fc, "create_backbone", spy)
    return built
