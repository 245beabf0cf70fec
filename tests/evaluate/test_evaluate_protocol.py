"""The one-backbone protocol (lgm_ray.evaluate.protocol) end to end on the digits shards and the demo backbone:
its numbers, the baselines, a set's own settings, the held-out split, its EvalConfig."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import BACKBONE, FAST, cli, save_set, scores_by_hand

import lgm_ray.evaluate.feature_cache as fc
from lgm_ray import backbones
from lgm_ray.common.errors import InputError
from lgm_ray.distill.config import DistillConfig
from lgm_ray.evaluate import probe as probe
from lgm_ray.evaluate import protocol as ev
from lgm_ray.evaluate.config import EvalConfig

# ---------------------------------------------------------------- the protocol's numbers


def test_synset_numbers_are_the_protocols(digits_shards, shards, real_set, cache_dir):
    images, labels, _ = real_set
    r = ev.evaluate_synset(images, labels, BACKBONE, digits_shards, FAST, cache_dir=cache_dir)
    assert r["seeds"] == [3407, 3408] and r["n_train"] == 10 and r["n_eval"] == shards.count("test")
    assert r["epochs"] == 10 and r["batch"] == 10 and r["training_set"] == "distilled" and r["syn_res"] == 32
    assert r["lr"] == pytest.approx(1e-3 * 10 / 256)  # lr = 1e-3 × batch / 256, batch = min(100, n)
    t1 = torch.tensor(r["top1_per_seed"], dtype=torch.float64)
    assert r["top1_mean"] == pytest.approx(float(t1.mean()))
    assert r["top1_std"] == pytest.approx(float(((t1 - t1.mean()) ** 2).mean().sqrt()))  # population std
    for k, seed in enumerate((3407, 3408)):  # each seed recomputed outside the protocol
        by_hand = scores_by_hand(images, labels, shards, seed, epochs=10)
        assert (r["top1_per_seed"][k], r["top5_per_seed"][k]) == (by_hand["top1"], by_hand["top5"])


def test_default_config_is_the_papers(digits_shards, real_set, monkeypatch):
    """No config: EvalConfig's defaults (1,000 epochs, 5 seeds, 256/224, test split) reach the probe."""
    seen: list[dict] = []

    class Seen(Exception):
        pass

    def spy(images, labels, backbone, **kw):
        seen.append(kw)
        raise Seen  # enough seen; nothing trains

    monkeypatch.setattr(probe, "train_probe_on_images", spy)
    monkeypatch.setattr(ev, "_run_seeds", lambda env, fit, n, split: (seen.append({"n": n, "split": split}),
                                                                      fit(0, 3407)))
    images, labels, _ = real_set
    with pytest.raises(Seen):
        ev.evaluate_synset(images, labels, BACKBONE, digits_shards)
    (run, probe_kw) = seen
    assert run == {"n": 5, "split": "test"}
    assert (probe_kw["epochs"], probe_kw["batch"], probe_kw["crop_res"], probe_kw["device"]) == (1000, 10, 224, "cpu")


def test_full_reference_mode_streams_augmented_images(digits_shards, cache_dir):
    cfg = FAST.replace(full_mode="reference", epochs=2, seeds=1)
    r = ev.evaluate_baseline("full", BACKBONE, digits_shards, cfg, cache_dir=cache_dir)
    assert r["full_mode"] == "reference" and r["n_train"] == 1437 and r["epochs"] == 2
    assert r["top1_mean"] > 25.0  # two augmented epochs over 1,437 images (~30 steps): well above chance (10 %)


def test_random_baseline_trains_seed_k_on_selection_k(digits_shards, shards, cache_dir):
    from lgm_ray.evaluate import baselines as bl

    r = ev.evaluate_baseline("random", BACKBONE, digits_shards, FAST, cache_dir=cache_dir)
    assert r["selection_seeds"] == [0, 1]
    for k in (0, 1):
        images, labels = bl.select_random(shards, k, real_res=32)
        by_hand = scores_by_hand(images, labels, shards, 3407 + k, epochs=10)
        assert r["top1_per_seed"][k] == by_hand["top1"]


def test_centroids_pick_the_image_nearest_each_class_mean(digits_shards, shards, cache_dir):
    r = ev.evaluate_baseline("centroids", BACKBONE, digits_shards, FAST, cache_dir=cache_dir)
    assert r["n_train"] == 10 and r["select_backbone"] == BACKBONE
    feats, labels, keys = fc.extract_features(backbones.create_backbone(BACKBONE),
                                              shards.eval_batches("train", resize=32, crop=32))
    expected = []
    for c in range(10):
        members = torch.nonzero(labels == c).flatten()
        d = torch.cdist(feats[members].double(), feats[members].double().mean(0, keepdim=True)).flatten()
        expected.append(keys[members[int(d.argmin())]])
    assert r["selected_keys"] == expected


def test_ipc_comes_from_the_config(digits_shards, cache_dir):
    r = ev.evaluate_baseline("centroids", BACKBONE, digits_shards, FAST.replace(ipc=2, epochs=1, seeds=1),
                             cache_dir=cache_dir)
    assert r["n_train"] == 20 and len(r["selected_keys"]) == 20


def test_neighbors_of_real_images_are_the_images_themselves(digits_shards, real_set, cache_dir, random_weights):
    images, labels, keys = real_set
    r = ev.evaluate_baseline("neighbors", BACKBONE, digits_shards, FAST, images=images, labels=labels,
                             cache_dir=cache_dir)
    assert r["selected_keys"] == keys and r["n_train"] == 10
    other = ev.evaluate_baseline("neighbors", BACKBONE, digits_shards, FAST.replace(epochs=1, seeds=1),
                                 images=images, labels=labels, select_weights=random_weights, cache_dir=cache_dir)
    assert other["selected_keys"] == keys  # distance 0 whatever the selection backbone
    assert "select_feature_cache" in other


def test_missing_class_warns_but_evaluates(digits_shards, real_set, cache_dir):
    images, labels, _ = real_set
    keep = labels != 3
    with pytest.warns(UserWarning, match=r"no image of 1 of the 10 classes \(\[3\]\)"):
        r = ev.evaluate_synset(images[keep], labels[keep], BACKBONE, digits_shards,
                               FAST.replace(epochs=2, seeds=1), cache_dir=cache_dir)
    assert r["n_train"] == 9 and r["num_classes"] == 10


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
    ev.evaluate_baseline("centroids", BACKBONE, digits_shards, FAST.replace(seeds=1), cache_dir=str(tmp_path))
    assert sorted(split for split, _, _ in seen) == ["test", "train"]
    models = {id(bb) for _, bb, _ in seen} | {id(bb) for bb in trained_with}
    assert len(models) == 1 and len(trained_with) == 1
    (split0, bb, fp0), (_, _, fp1) = seen
    assert fp0 == fp1 == fc.backbone_fingerprint(bb, "native")  # one fingerprint, of that very model


# ---------------------------------------------------------------- the config and the inputs


@pytest.mark.parametrize(("change", "expected"), [
    ({"seeds": 0}, "EvalConfig.seeds: expected a positive integer, got 0"),
    ({"split": "tset"}, "EvalConfig.split: 'tset' is not one of val, test (did you mean 'test'?)"),
    ({"full_mode": "fats"}, "EvalConfig.full_mode: 'fats' is not one of fast, reference"),
    ({"normalization": "imagnet"}, "EvalConfig.normalization: 'imagnet' is not one of native, imagenet"),
    ({"crop_res": -1}, "EvalConfig.crop_res: expected a positive integer, got -1"),
])
def test_a_bad_setting_is_an_input_error_before_any_work(change, expected, digits_shards, built_backbones):
    with pytest.raises(ev.EvaluationInputError) as exc:
        ev.evaluate_baseline("random", BACKBONE, digits_shards, EvalConfig(**change))
    assert expected in str(exc.value) and isinstance(exc.value, InputError)
    assert built_backbones == []  # checked before any backbone is built


def test_settings_are_not_keywords_and_cfg_is_an_evalconfig(digits_shards, real_set):
    images, labels, _ = real_set
    with pytest.raises(TypeError, match="epochs"):
        ev.evaluate_synset(images, labels, BACKBONE, digits_shards, epochs=3)
    with pytest.raises(TypeError, match="cfg must be an EvalConfig, got dict"):
        ev.evaluate_synset(images, labels, BACKBONE, digits_shards, {"epochs": 3})


def test_ipc_larger_than_a_class_says_lower_ipc(digits_shards):
    with pytest.raises(ev.EvaluationInputError, match="ipc=1000: some class of .* has only .* lower --ipc"):
        ev.evaluate_baseline("random", BACKBONE, digits_shards, EvalConfig(ipc=1000))


# ---------------------------------------------------------------- the set's own settings


def test_synset_settings_follow_the_file_and_the_backbone():
    payload = {"config": DistillConfig(backbone=BACKBONE, real_res=48, crop_res=40,
                                       normalization="imagenet").to_dict(), "backbone": BACKBONE}
    assert ev.synset_settings(payload, BACKBONE) == {"real_res": 48, "crop_res": 40, "normalization": "imagenet"}
    assert ev.synset_settings(payload, "dinov2_vitb14") == {"real_res": 48, "crop_res": 40}  # its own mean/std
    assert ev.synset_settings({"images": None, "labels": None}, BACKBONE) == {}  # reference format: no config
    used, notes = ev.resolve_settings(payload, BACKBONE, {"crop_res": 36, "real_res": 48}, source="s.pt")
    assert used == {"normalization": "imagenet", "real_res": 48, "crop_res": 36, "raw_output": False}
    assert notes == [f"--crop-res 36 overrides crop_res=40 of s.pt (evaluating on {BACKBONE}): using 36"]
    used, notes = ev.resolve_settings(None, BACKBONE, {"crop_res": None})  # a baseline: the defaults
    assert used == {"normalization": "native", "real_res": 256, "crop_res": 224, "raw_output": False}
    assert notes == []
    assert set(used) == set(EvalConfig.SET_FIELDS)
    assert EvalConfig().replace(**ev.synset_settings(payload, BACKBONE)).crop_res == 40  # how a caller uses them


def test_a_reference_preset_set_is_evaluated_on_its_backbones_raw_output():
    from lgm_ray.backbones import create_backbone
    from lgm_ray.evaluate.feature_cache import backbone_fingerprint

    payload = {"backbone": "digits_simclr_cnn",
               "config": {"backbone": "digits_simclr_cnn", "raw_output": True, "normalization": "imagenet",
                          "real_res": 32, "crop_res": 32}}
    assert ev.synset_settings(payload, "digits_simclr_cnn")["raw_output"] is True
    assert "raw_output" not in ev.synset_settings(payload, "clip_vitb32")  # other backbones: their own output
    used, notes = ev.resolve_settings(payload, "digits_simclr_cnn", {"raw_output": False}, source="p.pt")
    assert used["raw_output"] is False and notes == [
        "--raw-output False overrides raw_output=True of p.pt (evaluating on digits_simclr_cnn): using False"]
    plain = backbone_fingerprint(create_backbone("digits_simclr_cnn"))
    raw = backbone_fingerprint(create_backbone("digits_simclr_cnn", raw_output=True))
    assert plain["raw_output"] is False and raw["raw_output"] is True  # cached apart


# ---------------------------------------------------------------- the held-out split


def test_split_val_scores_on_the_validation_split(val_shards, real_set, tmp_path, capsys):
    from lgm_ray.shards.reader import ShardSet

    shards = ShardSet(val_shards)
    images, labels, _ = real_set
    path = save_set(tmp_path / "set.pt", images, labels, backbone=BACKBONE, real_res=32, crop_res=32)
    cache = str(tmp_path / "cache")
    val, stdout, _ = cli(capsys, "--synset", path, "--backbone", BACKBONE, "--shards", val_shards, "--split", "val",
                         "--epochs", "3", "--seeds", "1", "--cache-dir", cache)
    assert val["split"] == "val" and val["feature_cache"] == {"val": False}
    assert val["n_eval"] == shards.count("val") != shards.count("test")
    assert stdout.splitlines()[2].split()[2] == "val"  # the table's split column
    assert val["top1_per_seed"][0] == scores_by_hand(images, labels, shards, 3407, epochs=3, split="val")["top1"]
    test = ev.evaluate_synset(images, labels, BACKBONE, val_shards, EvalConfig(epochs=3, seeds=1, real_res=32,
                                                                               crop_res=32), cache_dir=cache)
    assert test["split"] == "test" and test["n_eval"] == shards.count("test")
    assert test["feature_cache"] == {"test": False}  # its own entry, not the val features
