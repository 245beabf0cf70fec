"""The on-disk feature cache (lgm_ray.evaluate.feature_cache): reused, keyed by everything that made the
features, atomic, and never fatal when damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from eval_helpers import BACKBONE, FAST, summary

import lgm_ray.evaluate.feature_cache as fc
from lgm_ray import backbones
from lgm_ray.evaluate import protocol as ev


def test_cache_is_reused_and_invalidated(digits_shards, real_set, random_weights, tmp_path, count_extractions):
    images, labels, _ = real_set
    cache = tmp_path / "cache"
    kw = {"cache_dir": str(cache)}
    first = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, FAST, **kw)
    assert first["feature_cache"] == {"test": False} and len(count_extractions) == 1
    second = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, FAST, **kw)
    assert second["feature_cache"] == {"test": True} and len(count_extractions) == 1  # nothing recomputed
    assert summary(second) == summary(first)  # same inputs, same numbers
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob(".*"))  # no temp files left

    cfg = FAST.replace(epochs=1, seeds=1)  # only the cache matters from here on
    other_crop = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, cfg.replace(crop_res=28), **kw)
    assert other_crop["feature_cache"] == {"test": False} and len(count_extractions) == 2
    other_weights = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, cfg, weights=random_weights, **kw)
    assert other_weights["feature_cache"] == {"test": False} and len(count_extractions) == 3

    copy = tmp_path / "digits_copy"
    shutil.copytree(digits_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["name"] = "digits-copy"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    other_manifest = ev.evaluate_synset(images, labels, BACKBONE, str(copy), cfg, **kw)
    assert other_manifest["feature_cache"] == {"test": False} and len(count_extractions) == 4
    assert len(list(cache.glob("*.npz"))) == 4


def test_cache_key_holds_package_versions_and_the_weights_content(digits_shards, real_set, tmp_path,
                                                                 count_extractions, monkeypatch):
    images, labels, _ = real_set
    cfg, kw = FAST.replace(epochs=1, seeds=1), {"cache_dir": str(tmp_path / "cache")}
    ev.evaluate_synset(images, labels, BACKBONE, digits_shards, cfg, **kw)
    assert len(count_extractions) == 1
    # The same weights from another file: the key hashes the weights' content, not their path.
    same = tmp_path / "same_weights.pt"
    torch.save(backbones.create_backbone(BACKBONE).model.state_dict(), same)
    r = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, cfg, weights=str(same), **kw)
    assert r["feature_cache"] == {"test": True} and len(count_extractions) == 1
    # Another version of any of the packages that compute features: recomputed.
    real_versions = fc.package_versions()
    for package in ("torch", "timm", "open_clip", "lgm_ray"):
        monkeypatch.setattr(fc, "package_versions", lambda p=package: {**real_versions, p: "0.0.0-other"})
        r = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, cfg, **kw)
        assert r["feature_cache"] == {"test": False}
    assert len(count_extractions) == 5


def test_package_versions_come_from_the_installed_distributions(monkeypatch):
    import importlib.metadata as md

    real_version = md.version

    def version(dist: str) -> str:
        if dist == "open_clip_torch":
            raise md.PackageNotFoundError(dist)
        return real_version(dist)

    monkeypatch.setattr(fc.importlib.metadata, "version", version)
    v = fc.package_versions()
    assert v == {"torch": real_version("torch"), "timm": real_version("timm"), "open_clip": "absent",
                 "lgm_ray": real_version("lgm_ray")}


def test_weights_digest_sees_every_byte_and_the_normalisation():
    bb = backbones.create_backbone(BACKBONE)
    base = fc.backbone_fingerprint(bb)
    assert base["weights_sha256"] == fc.state_dict_digest(bb)
    nudged = backbones.create_backbone(BACKBONE)
    with torch.no_grad():
        p = next(nudged.model.parameters())
        p.view(-1)[-1] = torch.nextafter(p.view(-1)[-1], torch.tensor(float("inf")))  # one ulp of one weight
    assert fc.state_dict_digest(nudged) != base["weights_sha256"]
    imagenet = fc.backbone_fingerprint(backbones.create_backbone(BACKBONE, normalization="imagenet"), "imagenet")
    assert imagenet["weights_sha256"] != base["weights_sha256"]  # its mean/std buffers are hashed too


@pytest.mark.parametrize("damage", ["truncated", "garbage", "another_description"])
def test_a_damaged_cache_file_is_recomputed_not_fatal(damage, digits_shards, real_set, tmp_path, count_extractions):
    images, labels, _ = real_set
    cache = tmp_path / "cache"
    cfg, kw = FAST.replace(epochs=2, seeds=1), {"cache_dir": str(cache)}
    first = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, cfg, **kw)
    (entry,) = cache.glob("*.npz")
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00not a numpy file" * 10)
    else:  # a valid entry of other features (another crop) sitting under this key
        ev.evaluate_synset(images, labels, BACKBONE, digits_shards, cfg.replace(crop_res=28), **kw)
        (other,) = set(cache.glob("*.npz")) - {entry}
        shutil.copyfile(other, entry)
    n = len(count_extractions)
    match = "holds features of another description" if damage == "another_description" else "is unreadable"
    with pytest.warns(UserWarning, match=match):
        again = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, cfg, **kw)
    assert again["feature_cache"] == {"test": False} and len(count_extractions) == n + 1
    assert summary(again) == summary(first)
    healed = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, cfg, **kw)  # rewritten: a hit again
    assert healed["feature_cache"] == {"test": True} and len(count_extractions) == n + 1


def test_cache_writes_are_atomic_with_unique_temp_names(tmp_path, monkeypatch):
    cache = fc.FeatureCache(tmp_path)
    replaced: list[tuple[Path, Path]] = []
    real_replace = fc.os.replace

    def spy(src, dst):
        replaced.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(fc.os, "replace", spy)
    for value in (1.0, 2.0):  # two writers of one key, as two concurrent Ray tasks would be
        cache.store("k", torch.full((3, 2), value), torch.arange(3), ["a", "b", "c"], {"x": 1})
    (src1, dst1), (src2, dst2) = replaced
    assert src1 != src2 and src1.parent == dst1.parent == tmp_path and dst1 == dst2 == tmp_path / "k.npz"
    loaded = cache.load("k", {"x": 1})
    assert loaded.hit and torch.equal(loaded.features, torch.full((3, 2), 2.0))  # the last writer's, whole
    assert fc.feature_key({"a": 1, "b": 2}) == fc.feature_key({"b": 2, "a": 1}) != fc.feature_key({"a": 1, "b": 3})


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LGM_RAY_CACHE", str(tmp_path / "c"))
    assert fc.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LGM_RAY_CACHE")
    assert fc.default_cache_dir() == Path.home() / ".cache" / "lgm_ray" / "features"
