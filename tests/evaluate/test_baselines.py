"""The real-image baselines' selection rules (lgm_ray.evaluate.baselines) on hand-made features and digits shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lgm_ray.common.errors import InputError
from lgm_ray.core.synset import SynsetFileError, load_synset_file, synset_payload
from lgm_ray.evaluate import baselines as bl
from lgm_ray.evaluate.feature_cache import EvaluationInputError


def test_centroid_is_the_image_nearest_the_class_mean():
    feats = torch.tensor([
        [0.0, 0.0], [10.0, 0.0], [4.0, 1.0], [5.0, -1.0],  # class 0: mean (4.75, 0) → index 3
        [0.0, 10.0], [0.0, 14.0], [1.0, 12.5],  # class 1: mean (1/3, 12.17) → index 6, then 5
    ])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    assert bl.centroid_indices(feats, labels, 2).tolist() == [3, 6]
    assert bl.centroid_indices(feats, labels, 2, per_class=2).tolist() == [3, 2, 6, 5]
    with pytest.raises(ValueError, match="class 2 has 0 training images"):
        bl.centroid_indices(feats, labels, 3)


def test_neighbor_is_nearest_image_of_the_same_class():
    feats = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [0.1, 0.1], [6.0, 6.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    query = torch.tensor([[0.1, 0.1], [0.9, 1.2], [0.0, 0.0]])
    # query 0 sits on top of index 3, but that one is class 1: its class-0 neighbour is index 0
    assert bl.nearest_same_class_indices(query, torch.tensor([0, 0, 1]), feats, labels).tolist() == [0, 1, 3]
    assert bl.select_indices("neighbors", feats, labels, 2, query=query[:1],
                             query_labels=torch.tensor([1])).tolist() == [3]
    with pytest.raises(ValueError, match="no real training image of class 2"):
        bl.nearest_same_class_indices(query[:1], torch.tensor([2]), feats, labels)


def test_center_crop_like_real_resizes_then_crops():
    x = torch.rand(2, 3, 64, 64)
    out = bl.center_crop_like_real(x, 32, 28)
    assert out.shape == (2, 3, 28, 28)
    assert torch.equal(bl.center_crop_like_real(x, 64, 60), x[..., 2:62, 2:62])


def test_random_gives_one_image_per_class_and_other_sets_for_other_seeds(shards):
    sets = [bl.select_random(shards, k, real_res=32) for k in range(5)]
    for images, labels in sets:
        assert images.shape == (10, 3, 32, 32)
        assert labels.tolist() == list(range(10))
    for i in range(5):
        for j in range(i + 1, 5):
            assert not torch.equal(sets[i][0], sets[j][0])
    assert torch.equal(bl.select_random(shards, 3, real_res=32)[0], sets[3][0])


def test_fetch_train_images_keeps_key_order_and_repeats(shards):
    images, keys = shards.class_images(4, resize=32, crop=32)
    picked = [keys[5], keys[0], keys[5]]
    got = bl.fetch_train_images(shards, picked, resize=32, crop=32)
    assert torch.equal(got, torch.stack([images[5], images[0], images[5]]))
    with pytest.raises(KeyError, match="not in the 'train' split"):
        bl.fetch_train_images(shards, ["no-such-key"], resize=32, crop=32)


def test_synset_class_checks(shards, tmp_path: Path):
    labels = torch.arange(10)
    bl.check_synset_classes(labels, shards, class_names=[str(i) for i in range(10)], num_classes=10)
    with pytest.raises(EvaluationInputError, match=r"labels \[10, 12\] outside the shards' classes 0…9"):
        bl.check_synset_classes(torch.tensor([0, 10, 12]), shards)
    with pytest.raises(ValueError, match="class_names differ from the shards manifest's"):
        bl.check_synset_classes(labels, shards, class_names=[f"c{i}" for i in range(10)])
    with pytest.raises(ValueError, match="num_classes=100 but the shards have 10 classes"):
        bl.check_synset_classes(labels, shards, num_classes=100)
    with pytest.warns(UserWarning, match=r"no image of 2 of the 10 classes \(\[3, 7\]\)"):
        bl.check_synset_classes(torch.tensor([0, 1, 2, 4, 5, 6, 8, 9]), shards)


def test_the_one_synset_loader_errors(tmp_path: Path):
    with pytest.raises(SynsetFileError, match="does not exist; pass the synset.pt") as missing:
        load_synset_file(tmp_path / "nope.pt")
    assert isinstance(missing.value, InputError)  # every command reports it as bad input (exit 2)
    bad = tmp_path / "bad.pt"
    torch.save({"pixels": torch.zeros(1)}, bad)
    with pytest.raises(SynsetFileError, match="is not a synthetic set"):
        load_synset_file(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(SynsetFileError, match="cannot load synthetic set"):
        load_synset_file(junk)
    out_of_range = tmp_path / "range.pt"
    torch.save({"images": torch.full((1, 3, 4, 4), 2.0), "labels": torch.tensor([0])}, out_of_range)
    with pytest.raises(SynsetFileError, match="must lie in \\[0, 1\\]"):
        load_synset_file(out_of_range)
    good = tmp_path / "good.pt"
    images = torch.rand(2, 3, 8, 8)
    torch.save(synset_payload(images, torch.tensor([0, 1]), class_names=["a", "b"]), good)
    loaded = load_synset_file(good)
    assert torch.equal(loaded["images"], images) and loaded["labels"].tolist() == [0, 1]
