"""Backbone registry: architectures, feature sizes, local weight files and the offline error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lgm_ray.backbones import (
    Backbone,
    BackboneSpec,
    BackboneWeightsError,
    create_backbone,
    get_spec,
    list_backbones,
    register_build,
    registry,
)
from lgm_ray.backbones.hub import CLIP_MEAN, CLIP_STD

REAL = [
    "clip_vitb16", "clip_vitb32",
    "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14",
    "eva02_vitt14", "eva02_vits14", "eva02_vitb14", "eva02_vitl14",
    "mocov3_vitb16",
]


def _small_side(name: str) -> int:
    return 28 if name.endswith("14") else 32


def test_registry_lists_the_papers_backbones_and_the_demo():
    assert set(REAL) | {"digits_simclr_cnn"} <= set(list_backbones())
    with pytest.raises(KeyError, match="known backbones: .*dinov2_vitb14"):
        get_spec("dinov2_vitb13")


@pytest.mark.parametrize("name", REAL)
def test_architecture_builds_without_weights_and_gives_its_feature_dim(name):
    side = _small_side(name)
    bb = create_backbone(name, pretrained=False, img_size=side)
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    x = torch.rand(2, 3, side, side, requires_grad=True)
    z = bb(x)
    assert z.shape == (2, get_spec(name).feature_dim)
    # every backbone's output is normalised: a freshly built LayerNorm (its own or the added,
    # parameter-free one) leaves each sample with mean 0 and standard deviation 1
    assert float(z.detach().mean(1).abs().max()) < 1e-4
    assert float((z.detach().std(1, unbiased=False) - 1).abs().max()) < 0.01
    # gradients reach the input through the frozen backbone (a LayerNorm output sums to a constant,
    # so project on a random direction)
    (z * torch.randn_like(z)).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry for the test, so test backbones never leak into other tests."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_specs_are_keyword_only_and_the_decorator_registers(scratch_registry):
    fields = dict(name="test_unnormed", feature_dim=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resolution=4,
                  source="lgm_ray", weights_id="none (test)", ends_in_norm=False)
    with pytest.raises(TypeError):
        BackboneSpec("test_unnormed", 4, (0.0,) * 3, (1.0,) * 3, 4, "lgm_ray", "none", False, lambda *a: None)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))

    @register_build(**fields, description="a linear map, not normalised")
    def build(pretrained: bool, weights: str | None, img_size: int | None) -> nn.Module:
        return net

    assert get_spec("test_unnormed").build is build and "test_unnormed" in list_backbones()
    with pytest.raises(ValueError, match="already registered"):
        register_build(**fields)(build)

    x = torch.rand(3, 3, 4, 4)
    default = create_backbone("test_unnormed", pretrained=False)
    raw = create_backbone("test_unnormed", pretrained=False, raw_output=True)
    assert default.adds_norm and not raw.adds_norm
    with torch.no_grad():
        expected = net(x)
    assert torch.equal(raw(x), expected)
    assert torch.allclose(default(x), nn.functional.layer_norm(expected, (4,)), atol=1e-6)
    assert not torch.allclose(default(x), raw(x), atol=1e-2)
    with pytest.raises(ValueError, match="raw_output"):
        create_backbone("test_unnormed", pretrained=False, raw_output="yes")


def test_clip_raw_projection_skips_only_the_added_layernorm():
    raw = create_backbone("clip_vitb32", pretrained=False, img_size=32, raw_output=True)
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        projection = raw.model((x - mean) / std)
    z = raw(x)
    assert z.shape == (2, 512) and torch.equal(z, projection)
    normed = Backbone(raw.spec, raw.model)(x)  # the default wrapper of the same network
    assert torch.allclose(normed, nn.functional.layer_norm(projection, (512,)), atol=1e-5)
    assert not torch.allclose(normed, z, atol=1e-3)
    # a backbone that ends in its own norm is unchanged by raw_output
    demo = create_backbone("digits_simclr_cnn")
    demo_raw = create_backbone("digits_simclr_cnn", raw_output=True)
    x32 = torch.rand(2, 3, 32, 32)
    assert torch.equal(demo_raw(x32), demo(x32))


def test_backbone_stays_in_eval_mode():
    bb = create_backbone("digits_simclr_cnn")
    bb.train()
    assert not bb.training and not bb.model.training


def test_demo_backbone_normalises_its_inputs():
    bb = create_backbone("digits_simclr_cnn")
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(bb(x), bb.model((bb.grid(x) - 0.5) / 0.5), atol=1e-6)  # on its grid, then normalised
    assert not torch.allclose(bb(x), bb.model(bb.grid(x)), atol=1e-3)


def test_timm_weights_from_a_local_file(tmp_path):
    src = create_backbone("eva02_vitt14", pretrained=False, img_size=28)
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "eva02_tiny.pth"
    torch.save(src.model.state_dict(), path)
    loaded = create_backbone("eva02_vitt14", weights=path, img_size=28)
    x = torch.rand(2, 3, 28, 28)
    assert torch.allclose(loaded(x), src(x), atol=1e-5)


def test_open_clip_weights_from_a_local_file(tmp_path):
    import open_clip

    # OpenAI's weights need QuickGELU: the loaded backbone must be built with it too.
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    path = tmp_path / "clip_b32.pt"
    torch.save(model.state_dict(), path)
    loaded = create_backbone("clip_vitb32", weights=path)
    assert type(loaded.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    x = torch.rand(1, 3, 224, 224)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = torch.nn.functional.layer_norm(model.visual((x - mean) / std), (512,))
    assert torch.allclose(loaded(x), ref, atol=1e-4)


def test_mocov3_official_checkpoint_layout_from_a_local_file(tmp_path):
    import timm

    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32)
    sd = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    sd["module.base_encoder.head.0.weight"] = torch.zeros(4, 768)  # MoCo's projection head: dropped
    sd["module.momentum_encoder.cls_token"] = torch.zeros(1, 1, 768)
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save({"state_dict": sd, "epoch": 300}, path)
    loaded = create_backbone("mocov3_vitb16", weights=path, img_size=32)
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(loaded(x), vit((x - mean) / std), atol=1e-5)
    torch.save({"state_dict": {"module.base_encoder.blocks.0.foo": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(BackboneWeightsError, match="not a MoCo-v3 ViT-B checkpoint"):
        create_backbone("mocov3_vitb16", weights=tmp_path / "bad.pth", img_size=32)


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(BackboneWeightsError, match="nope.pth.*does not exist"):
        create_backbone("dinov2_vits14", weights=tmp_path / "nope.pth")


_OFFLINE = """
import sys
from lgm_ray.backbones import BackboneWeightsError, create_backbone
try:
    create_backbone(sys.argv[1], img_size=int(sys.argv[2]))
except BackboneWeightsError as e:
    print("ERROR:", e)
else:
    print("LOADED")
"""


@pytest.mark.parametrize(
    "name,needle",
    [("dinov2_vits14", "timm/vit_small_patch14_dinov2.lvd142m"), ("eva02_vitb14", "eva02_base_patch14_224"),
     ("clip_vitb16", "ViT-B-16"), ("mocov3_vitb16", "vit-b-300ep.pth.tar")],
)
def test_offline_pretrained_name_fails_clearly_never_random(tmp_path, name, needle):
    env = {**os.environ, "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch"), "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _OFFLINE, name, str(_small_side(name))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert "LOADED" not in out.stdout, out.stdout + out.stderr
    errors = [line for line in out.stdout.splitlines() if line.startswith("ERROR:")]
    assert errors, out.stderr[-2000:]
    msg = errors[0]
    assert name in msg and needle in msg
    assert "weights:" in msg  # how to provide a local file
    assert "never runs a pretrained backbone with random weights" in msg
