"""Evaluation end to end on the digits shards and the shipped demo backbone (lgm_ray.evaluate.protocol, lgm_ray.evaluate.cross_model)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lgm_ray.evaluate.feature_cache as fc
from lgm_ray import backbones
from lgm_ray.backbones import registry
from lgm_ray.backbones.digits_cnn import DigitsCNN
from lgm_ray.core.synset import synset_payload
from lgm_ray.distill.config import DistillConfig
from lgm_ray.evaluate import cross_model as cm
from lgm_ray.evaluate import probe as probe
from lgm_ray.evaluate import protocol as ev

BACKBONE = "digits_simclr_cnn"
TWIN = "digits_cnn_twin"  # the demo backbone under a second name: a second backbone for cross-model tests
FAST = {"real_res": 32, "crop_res": 32, "epochs": 10, "seeds": 2}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
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


def _save_set(path: Path, images, labels, **config) -> str:
    """A set as `python -m lgm_ray.distill` saves it: the run's config and backbone in the payload."""
    cfg = DistillConfig(**config).validate().to_dict()
    torch.save(synset_payload(images, labels, class_names=[str(i) for i in range(10)], num_classes=10,
                              config=cfg, backbone=cfg["backbone"]), path)
    return str(path)


@pytest.fixture(scope="module")
def synset_file(real_set, tmp_path_factory) -> str:
    """Distilled at 32 px with 32 px crops (the demo's settings, which are not the 256/224 defaults)."""
    images, labels, _ = real_set
    return _save_set(tmp_path_factory.mktemp("synset") / "set.pt", images, labels, backbone=BACKBONE,
                     real_res=32, crop_res=32, syn_res=32)


@pytest.fixture(scope="module")
def odd_set_file(real_set, tmp_path_factory) -> str:
    """24 px images distilled with crop 28 and ImageNet normalisation: every setting off its default."""
    images, labels, _ = real_set
    small = F.interpolate(images, size=(24, 24), mode="bilinear", align_corners=False).clamp(0, 1)
    return _save_set(tmp_path_factory.mktemp("odd_set") / "odd.pt", small, labels, backbone=BACKBONE,
                     real_res=32, crop_res=28, syn_res=24, normalization="imagenet")


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> str:
    """Digits shards with a validation split held out of train (20 % of each class)."""
    from lgm_ray.shards.__main__ import main as shards_main

    out = tmp_path_factory.mktemp("digits_val") / "digits"
    assert shards_main(["build", "digits", "--out", str(out), "--val-fraction", "0.2"]) == 0
    return str(out)


@pytest.fixture(scope="module")
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


def _summary(r: dict) -> tuple:
    return (r["top1_per_seed"], r["top5_per_seed"], r["top1_mean"], r["top1_std"], r["n_train"])


def _scores_by_hand(images, labels, shards, seed: int, *, epochs: int, res: int = 32, crop: int = 32,
                    split: str = "test", normalization: str = "native") -> dict:
    """One probe seed computed outside lgm_ray.evaluate.protocol: fresh backbone, own feature pass, no cache."""
    bb = backbones.create_backbone(BACKBONE, normalization=normalization)
    feats, y, _ = fc.extract_features(bb, shards.eval_batches(split, resize=res, crop=crop))
    head = probe.train_probe_on_images(images, labels, bb, feature_dim=bb.feature_dim, num_classes=10, seed=seed,
                                       epochs=epochs, batch=len(labels), crop_res=crop)
    return probe.score_head(head, feats, y)


def _cli(capsys, *argv: str) -> tuple[dict, str, str]:
    """Run the command in-process with --json; return (its JSON, stdout, stderr)."""
    assert cm.main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[-1]), out, err


def _notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": note: " in line]


# ---------------------------------------------------------------- the protocol's numbers


def test_cli_numbers_are_the_protocols(digits_shards, shards, synset_file, real_set, cache_dir, capsys):
    out, stdout, err = _cli(capsys, "--synset", synset_file, "--backbone", BACKBONE, "--shards", digits_shards,
                            "--epochs", "10", "--seeds", "2", "--cache-dir", cache_dir)
    assert stdout.splitlines()[0].split()[:4] == ["backbone", "training", "set", "split"]
    assert out["seeds"] == [3407, 3408] and out["n_train"] == 10 and out["n_eval"] == shards.count("test")
    assert out["lr"] == pytest.approx(1e-3 * 10 / 256)  # lr = 1e-3 × batch / 256, batch = min(100, n)
    t1 = torch.tensor(out["top1_per_seed"], dtype=torch.float64)
    assert out["top1_mean"] == pytest.approx(float(t1.mean()))
    assert out["top1_std"] == pytest.approx(float(((t1 - t1.mean()) ** 2).mean().sqrt()))  # population std
    # Each seed's numbers, recomputed outside lgm_ray.evaluate.protocol (seed 3407 + k, the test split, the set):
    images, labels, _ = real_set
    for k, seed in enumerate((3407, 3408)):
        by_hand = _scores_by_hand(images, labels, shards, seed, epochs=10)
        assert (out["top1_per_seed"][k], out["top5_per_seed"][k]) == (by_hand["top1"], by_hand["top5"])
    assert _notes(err) == []  # the set's own settings, no flag overriding them


def test_full_fast_baseline_learns_and_says_its_mode(digits_shards, cache_dir, capsys):
    r, stdout, _ = _cli(capsys, "--baseline", "full", "--backbone", BACKBONE, "--shards", digits_shards,
                        "--real-res", "32", "--crop-res", "32", "--epochs", "10", "--seeds", "2",
                        "--cache-dir", cache_dir)
    assert "full (fast)" in stdout
    assert r["full_mode"] == "fast" and r["n_train"] == 1437 and r["batch"] == 128
    assert r["lr"] == pytest.approx(5e-4)
    assert r["top1_mean"] > 70.0  # frozen SimCLR features of all digits: far above chance (10 %)


def test_full_reference_mode_streams_augmented_images(digits_shards, cache_dir):
    r = ev.evaluate_baseline("full", BACKBONE, digits_shards, full_mode="reference", real_res=32, crop_res=32,
                             epochs=2, seeds=1, cache_dir=cache_dir)
    assert r["full_mode"] == "reference" and r["n_train"] == 1437 and r["epochs"] == 2
    assert r["top1_mean"] > 25.0  # two augmented epochs over 1,437 images (~30 steps): well above chance (10 %)


def test_random_baseline_trains_seed_k_on_selection_k(digits_shards, shards, cache_dir):
    from lgm_ray.evaluate import baselines as bl

    r = ev.evaluate_baseline("random", BACKBONE, digits_shards, cache_dir=cache_dir, **FAST)
    for k in (0, 1):
        images, labels = bl.select_random(shards, k, real_res=32)
        by_hand = _scores_by_hand(images, labels, shards, 3407 + k, epochs=10)
        assert r["top1_per_seed"][k] == by_hand["top1"]


def test_centroids_pick_the_image_nearest_each_class_mean(digits_shards, shards, cache_dir):
    r = ev.evaluate_baseline("centroids", BACKBONE, digits_shards, cache_dir=cache_dir, **FAST)
    assert r["n_train"] == 10 and r["select_backbone"] == BACKBONE
    feats, labels, keys = fc.extract_features(backbones.create_backbone(BACKBONE),
                                              shards.eval_batches("train", resize=32, crop=32))
    expected = []
    for c in range(10):
        members = torch.nonzero(labels == c).flatten()
        d = torch.cdist(feats[members].double(), feats[members].double().mean(0, keepdim=True)).flatten()
        expected.append(keys[members[int(d.argmin())]])
    assert r["selected_keys"] == expected


def test_neighbors_of_real_images_are_the_images_themselves(digits_shards, real_set, cache_dir, random_weights):
    images, labels, keys = real_set
    r = ev.evaluate_baseline("neighbors", BACKBONE, digits_shards, images=images, labels=labels,
                             cache_dir=cache_dir, **FAST)
    assert r["selected_keys"] == keys and r["n_train"] == 10
    other = ev.evaluate_baseline("neighbors", BACKBONE, digits_shards, images=images, labels=labels,
                                 select_weights=random_weights, cache_dir=cache_dir,
                                 **{**FAST, "epochs": 1, "seeds": 1})
    assert other["selected_keys"] == keys  # distance 0 whatever the selection backbone
    assert "select_feature_cache" in other


def test_missing_class_warns_but_evaluates(digits_shards, real_set, cache_dir):
    images, labels, _ = real_set
    keep = labels != 3
    with pytest.warns(UserWarning, match=r"no image of 1 of the 10 classes \(\[3\]\)"):
        r = ev.evaluate_synset(images[keep], labels[keep], BACKBONE, digits_shards, cache_dir=cache_dir,
                               **{**FAST, "epochs": 2, "seeds": 1})
    assert r["n_train"] == 9 and r["num_classes"] == 10


# ---------------------------------------------------------------- the set's own settings


def test_synset_settings_follow_the_file_and_the_backbone():
    payload = {"config": DistillConfig(backbone=BACKBONE, real_res=48, crop_res=40,
                                       normalization="imagenet").to_dict(), "backbone": BACKBONE}
    assert ev.synset_settings(payload, BACKBONE) == {"real_res": 48, "crop_res": 40, "normalization": "imagenet"}
    assert ev.synset_settings(payload, "dinov2_vitb14") == {"real_res": 48, "crop_res": 40}  # its own mean/std
    assert ev.synset_settings({"images": None, "labels": None}, BACKBONE) == {}  # reference format: no config
    used, notes = ev.resolve_settings(payload, BACKBONE, {"crop_res": 36, "real_res": 48}, source="s.pt")
    assert used == {"normalization": "imagenet", "real_res": 48, "crop_res": 36}
    assert notes == [f"--crop-res 36 overrides crop_res=40 of s.pt (evaluating on {BACKBONE}): using 36"]
    used, notes = ev.resolve_settings(None, BACKBONE, {"crop_res": None})  # a baseline: the defaults
    assert used == {"normalization": "native", "real_res": 256, "crop_res": 224} and notes == []


def test_cli_evaluates_with_the_sets_own_settings(digits_shards, shards, odd_set_file, cache_dir, capsys,
                                                  built_backbones, monkeypatch):
    preprocess: list[tuple[str, int, int]] = []
    real = fc.split_features
    monkeypatch.setattr(fc, "split_features", lambda cache, bb, sh, split, **kw: (
        preprocess.append((split, kw["resize"], kw["crop"])), real(cache, bb, sh, split, **kw))[1])
    out, _, err = _cli(capsys, "--synset", odd_set_file, "--backbone", BACKBONE, "--shards", digits_shards,
                       "--epochs", "3", "--seeds", "1", "--cache-dir", cache_dir)
    assert built_backbones == [(BACKBONE, "imagenet", 28)]  # the set's normalisation and crop side
    assert preprocess == [("test", 32, 28)]  # test images: resize to the set's real_res, centre-crop crop_res
    assert (out["normalization"], out["real_res"], out["crop_res"], out["syn_res"]) == ("imagenet", 32, 28, 24)
    assert _notes(err) == []
    payload = torch.load(odd_set_file, weights_only=True)
    explicit = ev.evaluate_synset(payload["images"], payload["labels"], BACKBONE, digits_shards, epochs=3, seeds=1,
                                  normalization="imagenet", real_res=32, crop_res=28, cache_dir=cache_dir)
    assert _summary(out) == _summary(explicit)


def test_a_flag_that_overrides_the_set_says_so(digits_shards, odd_set_file, cache_dir, capsys, built_backbones):
    out, _, err = _cli(capsys, "--synset", odd_set_file, "--backbone", BACKBONE, "--shards", digits_shards,
                       "--crop-res", "32", "--real-res", "32", "--normalization", "native", "--epochs", "1",
                       "--seeds", "1", "--cache-dir", cache_dir)
    assert built_backbones == [(BACKBONE, "native", 32)]
    assert out["crop_res"] == 32 and out["normalization"] == "native"
    notes = _notes(err)
    assert len(notes) == 2  # --real-res 32 equals the set's: no note
    assert f"--normalization native overrides normalization=imagenet of {odd_set_file}" in notes[0]
    assert notes[0].endswith("using native")
    assert f"--crop-res 32 overrides crop_res=28 of {odd_set_file}" in notes[1] and notes[1].endswith("using 32")


def test_cross_model_gives_other_backbones_their_own_normalisation(digits_shards, odd_set_file, cache_dir, capsys,
                                                                   twin, built_backbones):
    out, stdout, err = _cli(capsys, "--synset", odd_set_file, "--backbone", f"{BACKBONE},{twin}",
                            "--shards", digits_shards, "--epochs", "1", "--seeds", "1", "--cache-dir", cache_dir)
    assert built_backbones == [(BACKBONE, "imagenet", 28), (twin, "native", 28)]
    assert [r["normalization"] for r in out["results"]] == ["imagenet", "native"]
    assert {r["crop_res"] for r in out["results"]} == {28} and {r["real_res"] for r in out["results"]} == {32}
    assert len(stdout.splitlines()) == 2 + 2 + 1  # header, rule, one row per backbone, JSON
    assert _notes(err) == []


def test_reference_format_set_uses_flags_or_defaults_and_says_so(digits_shards, real_set, tmp_path, cache_dir,
                                                                 capsys, built_backbones):
    images, labels, _ = real_set
    path = tmp_path / "reference.pt"
    torch.save({"images": images, "labels": labels}, path)
    out, _, err = _cli(capsys, "--synset", str(path), "--backbone", BACKBONE, "--shards", digits_shards,
                       "--real-res", "32", "--crop-res", "32", "--epochs", "1", "--seeds", "1",
                       "--cache-dir", cache_dir)
    assert built_backbones == [(BACKBONE, "native", 32)]
    assert [n.split(": note: ")[1] for n in _notes(err)] == [
        f"{path} holds no distillation config (reference format): evaluating with real_res/crop_res/"
        "normalization from flags or the defaults 256/224/native"]


# ---------------------------------------------------------------- the held-out split


def test_split_val_scores_on_the_validation_split(val_shards, real_set, tmp_path, capsys):
    from lgm_ray.shards.reader import ShardSet

    shards = ShardSet(val_shards)
    images, labels, _ = real_set
    path = _save_set(tmp_path / "set.pt", images, labels, backbone=BACKBONE, real_res=32, crop_res=32)
    cache = str(tmp_path / "cache")
    val, stdout, _ = _cli(capsys, "--synset", path, "--backbone", BACKBONE, "--shards", val_shards, "--split", "val",
                          "--epochs", "3", "--seeds", "1", "--cache-dir", cache)
    assert val["split"] == "val" and val["feature_cache"] == {"val": False}
    assert val["n_eval"] == shards.count("val") != shards.count("test")
    assert stdout.splitlines()[2].split()[2] == "val"  # the table's split column
    assert val["top1_per_seed"][0] == _scores_by_hand(images, labels, shards, 3407, epochs=3, split="val")["top1"]
    test = ev.evaluate_synset(images, labels, BACKBONE, val_shards, epochs=3, seeds=1, real_res=32, crop_res=32,
                              cache_dir=cache)
    assert test["split"] == "test" and test["n_eval"] == shards.count("test")
    assert test["feature_cache"] == {"test": False}  # its own entry, not the val features


# ---------------------------------------------------------------- the feature cache


def test_cache_is_reused_and_invalidated(digits_shards, real_set, random_weights, tmp_path, count_extractions):
    images, labels, _ = real_set
    cache = tmp_path / "cache"
    kw = {**FAST, "cache_dir": str(cache)}
    first = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, **kw)
    assert first["feature_cache"] == {"test": False} and len(count_extractions) == 1
    second = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, **kw)
    assert second["feature_cache"] == {"test": True} and len(count_extractions) == 1  # nothing recomputed
    assert _summary(second) == _summary(first)  # same inputs, same numbers
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob(".*"))  # no temp files left

    kw = {**kw, "epochs": 1, "seeds": 1}  # only the cache matters from here on
    other_crop = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, **{**kw, "crop_res": 28})
    assert other_crop["feature_cache"] == {"test": False} and len(count_extractions) == 2
    other_weights = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, weights=random_weights, **kw)
    assert other_weights["feature_cache"] == {"test": False} and len(count_extractions) == 3

    copy = tmp_path / "digits_copy"
    shutil.copytree(digits_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["name"] = "digits-copy"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    other_manifest = ev.evaluate_synset(images, labels, BACKBONE, str(copy), **kw)
    assert other_manifest["feature_cache"] == {"test": False} and len(count_extractions) == 4
    assert len(list(cache.glob("*.npz"))) == 4


def test_cache_key_holds_package_versions_and_the_weights_content(digits_shards, real_set, tmp_path,
                                                                 count_extractions, monkeypatch):
    images, labels, _ = real_set
    kw = {**FAST, "epochs": 1, "seeds": 1, "cache_dir": str(tmp_path / "cache")}
    ev.evaluate_synset(images, labels, BACKBONE, digits_shards, **kw)
    assert len(count_extractions) == 1
    # The same weights from another file: the key hashes the weights' content, not their path.
    same = tmp_path / "same_weights.pt"
    torch.save(backbones.create_backbone(BACKBONE).model.state_dict(), same)
    r = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, weights=str(same), **kw)
    assert r["feature_cache"] == {"test": True} and len(count_extractions) == 1
    # Another version of any of the packages that compute features: recomputed.
    real_versions = fc.package_versions()
    for package in ("torch", "timm", "open_clip", "lgm_ray"):
        monkeypatch.setattr(fc, "package_versions", lambda p=package: {**real_versions, p: "0.0.0-other"})
        r = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, **kw)
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
    kw = {**FAST, "epochs": 2, "seeds": 1, "cache_dir": str(cache)}
    first = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, **kw)
    (entry,) = cache.glob("*.npz")
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00not a numpy file" * 10)
    else:  # a valid entry of other features (another crop) sitting under this key
        ev.evaluate_synset(images, labels, BACKBONE, digits_shards, **{**kw, "crop_res": 28})
        (other,) = set(cache.glob("*.npz")) - {entry}
        shutil.copyfile(other, entry)
    n = len(count_extractions)
    match = "holds features of another description" if damage == "another_description" else "is unreadable"
    with pytest.warns(UserWarning, match=match):
        again = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, **kw)
    assert again["feature_cache"] == {"test": False} and len(count_extractions) == n + 1
    assert _summary(again) == _summary(first)
    healed = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, **kw)  # rewritten: a hit again
    assert healed["feature_cache"] == {"test": True} and len(count_extractions) == n + 1


def test_train_and_held_out_features_come_from_one_backbone(digits_shards, tmp_path, monkeypatch):
    seen: list[tuple[str, object, dict]] = []
    real_split = fc.split_features

    def spy_split(cache, backbone, shards, split, **kw):
        seen.append((split, backbone, kw["fingerprint"]))
        return real_split(cache, backbone, shards, split, **kw)

    trained_with: list[object] = []
    real_train = probe.train_probe_on_images

    def spy_train(images, labels, backbone, **kw):
        trained_with.append(backbone)
        return real_train(images, labels, backbone, **kw)

    monkeypatch.setattr(fc, "split_features", spy_split)
    monkeypatch.setattr(probe, "train_probe_on_images", spy_train)
    ev.evaluate_baseline("centroids", BACKBONE, digits_shards, cache_dir=str(tmp_path), **{**FAST, "seeds": 1})
    assert sorted(split for split, _, _ in seen) == ["test", "train"]
    models = {id(bb) for _, bb, _ in seen} | {id(bb) for bb in trained_with}
    assert len(models) == 1 and len(trained_with) == 1
    (split0, bb, fp0), (_, _, fp1) = seen
    assert fp0 == fp1 == fc.backbone_fingerprint(bb, "native")  # one fingerprint, of that very model


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


# ---------------------------------------------------------------- Ray: never unasked, never outside the trial


def _fake_ray(*, initialized: bool, actor_id: str | None = None) -> types.ModuleType:
    """A stand-in ``ray`` module: it answers whether Ray is up and where we are, and fails on any use."""
    fake = types.ModuleType("ray")

    def used(*args, **kwargs):
        raise AssertionError("Ray was used")

    fake.is_initialized = lambda: initialized
    fake.get_runtime_context = lambda: types.SimpleNamespace(get_actor_id=lambda: actor_id,
                                                             get_placement_group_id=lambda: None)
    fake.init = fake.remote = fake.put = fake.get = used
    return fake


def test_one_backbone_evaluations_never_use_ray(digits_shards, real_set, cache_dir, monkeypatch):
    images, labels, _ = real_set
    kw = {**FAST, "epochs": 1, "seeds": 1, "cache_dir": cache_dir}
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(initialized=True))  # a driver with Ray up
    ev.evaluate_synset(images, labels, BACKBONE, digits_shards, **kw)
    ev.evaluate_baseline("centroids", BACKBONE, digits_shards, **kw)
    assert len(cm.evaluate_cross_model([BACKBONE], digits_shards, images=images, labels=labels, parallel=False,
                                       **kw)) == 1
    with pytest.raises(AssertionError, match="Ray was used"):  # auto in a driver with Ray up: Ray tasks
        cm.evaluate_cross_model([BACKBONE], digits_shards, images=images, labels=labels, **kw)
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(initialized=True, actor_id="a1"))  # inside a trial
    assert len(cm.evaluate_cross_model([BACKBONE], digits_shards, images=images, labels=labels, **kw)) == 1
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(initialized=False))
    with pytest.raises(ev.EvaluationInputError, match="Ray is not initialised in this process; call ray.init"):
        cm.evaluate_cross_model([BACKBONE], digits_shards, images=images, labels=labels, parallel=True, **kw)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs for this module's Ray tests (started once: it takes seconds)."""
    import ray

    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def two_models(digits_shards, real_set, random_weights, cache_dir):
    """One set on two models (the demo backbone, and its architecture with random weights), in order."""
    images, labels, _ = real_set
    kw = {"images": images, "labels": labels, "weights": [None, random_weights], "cache_dir": cache_dir, **FAST}
    sequential = cm.evaluate_cross_model([BACKBONE, BACKBONE], digits_shards, parallel=False, **kw)
    assert _summary(sequential[0]) != _summary(sequential[1])  # two models, two different results
    return kw, sequential


def test_cross_model_as_ray_tasks_equals_sequential(digits_shards, two_models, local_ray):
    kw, sequential = two_models
    on_ray = cm.evaluate_cross_model([BACKBONE, BACKBONE], digits_shards, **kw)  # auto, from the driver
    assert [_summary(r) for r in on_ray] == [_summary(r) for r in sequential]


@pytest.mark.slow  # an actor and its tasks start Ray workers: ~55 s on 2 busy cores
def test_cross_model_inside_a_trial_stays_in_the_trials_placement_group(digits_shards, two_models, local_ray):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray = local_ray
    kw, sequential = two_models
    # A trial: an actor in a placement group that holds every CPU of this Ray, so a task that escaped
    # the group could never be scheduled (the ray.get below would time out).
    group = placement_group([{"CPU": 2}])
    ray.get(group.ready(), timeout=120)

    @ray.remote(num_cpus=0)
    class Trial:
        def evaluate(self, parallel, forbid_tasks: bool):
            import ray as ray_in_trial

            from lgm_ray.evaluate import cross_model as cm

            if forbid_tasks:
                def no_tasks(*args, **kwargs):
                    raise AssertionError("a Ray task was started")

                ray_in_trial.remote = no_tasks
            return cm.evaluate_cross_model([BACKBONE, BACKBONE], digits_shards, parallel=parallel, **kw)

    try:
        trial = Trial.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group)).remote()
        in_group = ray.get(trial.evaluate.remote(True, False), timeout=300)  # tasks, pinned to the group
        in_process = ray.get(trial.evaluate.remote(None, True), timeout=300)  # auto in a trial: no tasks
    finally:
        remove_placement_group(group)
    for results in (in_group, in_process):
        assert [_summary(r) for r in results] == [_summary(r) for r in sequential]


# ---------------------------------------------------------------- clear errors


def _bad_synset(tmp_path: Path, labels, **extra) -> str:
    path = tmp_path / "bad.pt"
    torch.save(synset_payload(torch.rand(len(labels), 3, 32, 32), torch.tensor(labels), **extra), path)
    return str(path)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_synset", "does not exist; pass the .pt file written by `python -m lgm_ray.distill`"),
        ("not_a_synset", "is not a synthetic set: expected a dict with 'images'"),
        ("missing_shards", "does not exist; build it first, e.g. `python -m lgm_ray.shards build digits"),
        ("damaged_shards", "does not match its manifest"),
        ("unknown_backbone", "unknown backbone 'vit_nope'; use one of the known backbones: "),
        ("split_missing", "have no 'val' split (non-empty splits: train, test); hold one out of train with "
                          "`python -m lgm_ray.shards build SOURCE --out DIR --val-fraction 0.1`"),
        ("neighbors_without_synset", "--baseline neighbors needs --synset"),
        ("labels_outside", "labels [10, 11] outside the shards' classes 0…9; evaluate it against the shards"),
        ("class_names", "class_names differ from the shards manifest's"),
        ("nothing", "nothing to evaluate: give a synthetic set (--synset) or --baseline"),
        ("weights_missing", "weights file"),
    ],
)
def test_bad_inputs_fail_with_one_clear_line(case, expected, digits_shards, tmp_path, capsys):
    args = {"--backbone": BACKBONE, "--shards": digits_shards, "--real-res": "32", "--crop-res": "32"}
    if case == "missing_synset":
        args["--synset"] = str(tmp_path / "nope.pt")
    elif case == "not_a_synset":
        torch.save({"pixels": torch.zeros(2)}, tmp_path / "odd.pt")
        args["--synset"] = str(tmp_path / "odd.pt")
    elif case == "missing_shards":
        args["--baseline"], args["--shards"] = "random", str(tmp_path / "no_shards")
    elif case == "damaged_shards":
        copy = tmp_path / "damaged"
        shutil.copytree(digits_shards, copy)
        tar = copy / "test-000000.tar"
        tar.write_bytes(tar.read_bytes()[:1000])
        args["--baseline"], args["--shards"] = "random", str(copy)
    elif case == "unknown_backbone":
        args["--baseline"], args["--backbone"] = "random", f"{BACKBONE},vit_nope"
    elif case == "split_missing":
        args["--baseline"], args["--split"] = "random", "val"
    elif case == "neighbors_without_synset":
        args["--baseline"] = "neighbors"
    elif case == "labels_outside":
        args["--synset"] = _bad_synset(tmp_path, [0, 10, 11])
    elif case == "class_names":
        args["--synset"] = _bad_synset(tmp_path, list(range(10)), class_names=list("abcdefghij"))
    elif case == "weights_missing":
        args["--baseline"], args["--weights"] = "random", str(tmp_path / "nope_weights.pt")
    argv = [x for kv in args.items() for x in kv] + ["--epochs", "1", "--seeds", "1"]
    with pytest.raises(SystemExit) as exc:
        cm.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("python -m lgm_ray.evaluate: error: ") and expected in line
    if case == "unknown_backbone":
        assert BACKBONE in line  # the known ones are listed


def test_internal_errors_are_not_dressed_up_as_usage_errors(digits_shards, synset_file, cache_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(probe, "train_probe_on_images", broken)
    with pytest.raises(ValueError, match="an internal bug"):  # a traceback, not exit status 2
        cm.main(["--synset", synset_file, "--backbone", BACKBONE, "--shards", digits_shards, "--epochs", "1",
                 "--seeds", "1", "--cache-dir", cache_dir])


def test_a_reference_preset_set_is_evaluated_on_its_backbones_raw_output():
    from lgm_ray.backbones import create_backbone
    from lgm_ray.evaluate.feature_cache import backbone_fingerprint
    from lgm_ray.evaluate.protocol import synset_settings

    payload = {"backbone": "digits_simclr_cnn",
               "config": {"backbone": "digits_simclr_cnn", "raw_output": True, "normalization": "imagenet",
                          "real_res": 32, "crop_res": 32}}
    assert synset_settings(payload, "digits_simclr_cnn")["raw_output"] is True
    assert "raw_output" not in synset_settings(payload, "clip_vitb32")  # other backbones: their own output
    plain = backbone_fingerprint(create_backbone("digits_simclr_cnn"))
    raw = backbone_fingerprint(create_backbone("digits_simclr_cnn", raw_output=True))
    assert plain["raw_output"] is False and raw["raw_output"] is True  # cached apart
