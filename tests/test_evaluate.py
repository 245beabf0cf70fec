"""Evaluation end to end on the digits shards and the shipped demo backbone (lgm_ray.evaluate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lgm_ray.feature_cache as fc
from lgm_ray import evaluate as ev
from lgm_ray.models.digits_cnn import DigitsCNN
from lgm_ray.synset import synset_payload

BACKBONE = "digits_simclr_cnn"
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


@pytest.fixture(scope="module")
def synset_file(real_set, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("synset") / "set.pt"
    images, labels, _ = real_set
    torch.save(synset_payload(images, labels, class_names=[str(i) for i in range(10)], num_classes=10), path)
    return str(path)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> str:
    """Other weights for the same architecture: a randomly initialised DigitsCNN."""
    path = tmp_path_factory.mktemp("weights") / "digits_cnn_random.pt"
    torch.manual_seed(123)
    torch.save(DigitsCNN().state_dict(), path)
    return str(path)


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


def _summary(r: dict) -> tuple:
    return (r["top1_per_seed"], r["top5_per_seed"], r["top1_mean"], r["top1_std"], r["n_train"])


def test_cli_json_is_last_line_with_protocol_fields(digits_shards, synset_file, cache_dir, capsys):
    rc = ev.main(["--synset", synset_file, "--backbone", BACKBONE, "--shards", digits_shards, "--real-res", "32",
                  "--crop-res", "32", "--epochs", "10", "--seeds", "2", "--cache-dir", cache_dir, "--json"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["backbone", "training"]
    out = json.loads(lines[-1])
    assert out["backbone"] == BACKBONE and out["baseline"] is None and out["training_set"] == "distilled"
    assert out["seeds"] == [3407, 3408] and out["epochs"] == 10 and out["n_train"] == 10
    assert out["batch"] == 10 and out["lr"] == pytest.approx(1e-3 * 10 / 256)
    t1 = torch.tensor(out["top1_per_seed"], dtype=torch.float64)
    assert out["top1_mean"] == pytest.approx(float(t1.mean()))
    assert out["top1_std"] == pytest.approx(float(t1.std(correction=0)))
    assert out["topk"] == 5 and all(a <= b for a, b in zip(out["top1_per_seed"], out["top5_per_seed"], strict=True))
    assert 0.0 <= out["top1_mean"] <= 100.0 and "top5_std" in out


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
    loaded = cache.load("k")
    assert loaded.hit and torch.equal(loaded.features, torch.full((3, 2), 2.0)) and loaded.keys == ["a", "b", "c"]
    assert fc.feature_key({"a": 1, "b": 2}) == fc.feature_key({"b": 2, "a": 1}) != fc.feature_key({"a": 1, "b": 3})


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LGM_RAY_CACHE", str(tmp_path / "c"))
    assert fc.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LGM_RAY_CACHE")
    assert fc.default_cache_dir() == Path.home() / ".cache" / "lgm_ray" / "features"


def test_full_fast_baseline_learns_and_says_its_mode(digits_shards, cache_dir, capsys):
    rc = ev.main(["--baseline", "full", "--backbone", BACKBONE, "--shards", digits_shards, "--real-res", "32",
                  "--crop-res", "32", "--epochs", "10", "--seeds", "2", "--cache-dir", cache_dir, "--json"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "full (fast)" in out
    r = json.loads(out.strip().splitlines()[-1])
    assert r["full_mode"] == "fast" and r["n_train"] == 1437 and r["batch"] == 128
    assert r["lr"] == pytest.approx(5e-4)
    assert r["top1_mean"] > 70.0  # frozen SimCLR features of all digits: far above chance (10 %)


def test_full_reference_mode_streams_augmented_images(digits_shards, cache_dir):
    r = ev.evaluate_baseline("full", BACKBONE, digits_shards, full_mode="reference", real_res=32, crop_res=32,
                             epochs=1, seeds=1, cache_dir=cache_dir)
    assert r["full_mode"] == "reference" and r["n_train"] == 1437 and r["epochs"] == 1
    assert r["top1_mean"] > 20.0


def test_random_baseline_uses_selection_seed_k(digits_shards, cache_dir):
    r = ev.evaluate_baseline("random", BACKBONE, digits_shards, cache_dir=cache_dir, **FAST)
    assert r["selection_seeds"] == [0, 1] and r["seeds"] == [3407, 3408] and r["n_train"] == 10


def test_centroids_pick_the_image_nearest_each_class_mean(digits_shards, shards, cache_dir):
    r = ev.evaluate_baseline("centroids", BACKBONE, digits_shards, cache_dir=cache_dir, **FAST)
    assert r["n_train"] == 10 and r["select_backbone"] == BACKBONE
    from lgm_ray.backbones import create_backbone

    feats, labels, keys = fc.extract_features(create_backbone(BACKBONE),
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


def test_cross_model_on_ray_equals_sequential(digits_shards, real_set, random_weights, cache_dir):
    import ray

    images, labels, _ = real_set
    kw = {"images": images, "labels": labels, "weights": [None, random_weights], "cache_dir": cache_dir, **FAST}
    sequential = ev.evaluate_cross_model([BACKBONE, BACKBONE], digits_shards, **kw)
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        parallel = ev.evaluate_cross_model([BACKBONE, BACKBONE], digits_shards, **kw)
    finally:
        ray.shutdown()
    assert [_summary(r) for r in parallel] == [_summary(r) for r in sequential]
    assert _summary(sequential[0]) != _summary(sequential[1])  # two backbones, two different results


def _bad_synset(tmp_path: Path, labels, **extra) -> str:
    path = tmp_path / "bad.pt"
    torch.save(synset_payload(torch.rand(len(labels), 3, 32, 32), torch.tensor(labels), **extra), path)
    return str(path)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_synset", "does not exist; pass the .pt file written by `python -m lgm_ray.distill`"),
        ("missing_shards", "does not exist; build it first, e.g. `python -m lgm_ray.shards build digits"),
        ("unknown_backbone", "unknown backbone 'vit_nope'; known backbones: "),
        ("neighbors_without_synset", "--baseline neighbors needs --synset"),
        ("labels_outside", "labels [10, 11] outside the shards' classes 0…9; evaluate it against the shards"),
        ("class_names", "class_names differ from the shards manifest's"),
        ("nothing", "nothing to evaluate: give a synthetic set (--synset) or --baseline"),
    ],
)
def test_bad_inputs_fail_with_a_clear_message(case, expected, digits_shards, tmp_path, capsys):
    args = {"--backbone": BACKBONE, "--shards": digits_shards}
    if case == "missing_synset":
        args["--synset"] = str(tmp_path / "nope.pt")
    elif case == "missing_shards":
        args["--baseline"], args["--shards"] = "random", str(tmp_path / "no_shards")
    elif case == "unknown_backbone":
        args["--baseline"], args["--backbone"] = "random", "vit_nope"
    elif case == "neighbors_without_synset":
        args["--baseline"] = "neighbors"
    elif case == "labels_outside":
        args["--synset"] = _bad_synset(tmp_path, [0, 10, 11])
    elif case == "class_names":
        args["--synset"] = _bad_synset(tmp_path, list(range(10)), class_names=list("abcdefghij"))
    argv = [x for kv in args.items() for x in kv] + ["--epochs", "1", "--seeds", "1"]
    with pytest.raises(SystemExit) as exc:
        ev.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    if case == "unknown_backbone":
        assert BACKBONE in err  # the known ones are listed


def test_missing_class_warns_but_evaluates(digits_shards, real_set, cache_dir):
    images, labels, _ = real_set
    keep = labels != 3
    with pytest.warns(UserWarning, match=r"no image of 1 of the 10 classes \(\[3\]\)"):
        r = ev.evaluate_synset(images[keep], labels[keep], BACKBONE, digits_shards, cache_dir=cache_dir,
                               **{**FAST, "epochs": 2, "seeds": 1})
    assert r["n_train"] == 9 and r["num_classes"] == 10
