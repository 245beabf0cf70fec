"""Periphery numbers on constructed cases with known answers, the 2-D projection, the map, and the
features of a saved set read through the feature cache (digits shards, the demo backbone)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lgm_ray.report.embedding import (
    EmbeddingInputError,
    embed_set,
    periphery,
    plot_embedding,
    project_2d,
    summarize,
)
from lgm_ray.report.embedding_features import FeaturesUnavailable, set_features

# Class 0: four real points around the mean (0, 0) at distances 1, 1, 3, 3 (radius: median 2).
# Class 1: the same shape around (10, 0).
REAL = np.array([[1, 0], [-1, 0], [0, 3], [0, -3], [11, 0], [9, 0], [10, 3], [10, -3]], dtype=float)
REAL_Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
# Distilled: class 0 at distance 2 (between the real ones), class 0 at (6, 0) (outside its class and
# nearer class 1's mean), class 1 near its mean.
SYN = np.array([[0, 2], [6, 0], [10, 0.5]], dtype=float)
SYN_Y = np.array([0, 0, 1])


def test_periphery_known_answer():
    t = periphery(REAL, REAL_Y, SYN, SYN_Y, class_names=["cat", "dog"])
    assert t["image"].tolist() == [0, 1, 2]
    assert t["class_name"].tolist() == ["cat", "cat", "dog"]
    assert t["distance"].tolist() == pytest.approx([2.0, 6.0, 0.5])
    # share of the class's real images strictly closer to the mean: 2 of 4, all 4, none
    assert t["percentile"].tolist() == pytest.approx([50.0, 100.0, 0.0])
    assert t["class_radius"].tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert t["distance_ratio"].tolist() == pytest.approx([1.0, 3.0, 0.25])
    assert t["nearest_other_name"].tolist() == ["dog", "dog", "cat"]
    # margin = distance to the nearest other mean − distance to its own
    assert t["margin"].tolist() == pytest.approx([np.hypot(10, 2) - 2, 4 - 6, np.hypot(10, 0.5) - 0.5])

    s = summarize(t)
    assert s["n_images"] == 3
    assert s["median_percentile"] == pytest.approx(50.0)
    assert s["frac_outside"] == pytest.approx(1 / 3)
    assert s["frac_periphery"] == pytest.approx(1 / 3)
    assert s["frac_negative_margin"] == pytest.approx(1 / 3)


def test_periphery_ties_count_as_not_closer_and_absent_classes_are_never_nearest():
    # a distilled image exactly as far as two real images (distance 1): none is strictly closer
    t = periphery(REAL, REAL_Y, np.array([[0.0, 1.0]]), np.array([0]), num_classes=3)
    assert t["percentile"].iloc[0] == 0.0
    assert t["nearest_other"].iloc[0] == 1  # class 2 has no real image: never the nearest


def test_periphery_refuses_what_it_cannot_compare():
    with pytest.raises(EmbeddingInputError, match="same backbone"):
        periphery(REAL, REAL_Y, np.zeros((1, 3)), np.array([0]))
    with pytest.raises(EmbeddingInputError, match=r"classes \[2\] have no real image"):
        periphery(REAL, REAL_Y, np.zeros((1, 2)), np.array([2]), num_classes=3)
    with pytest.raises(EmbeddingInputError, match="2 dimensions"):
        periphery(REAL[:, 0], REAL_Y, SYN, SYN_Y)


def test_pca_keeps_distances_within_the_plane_of_the_real_data():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 2)))  # a random plane in 6-D
    real = rng.normal(size=(50, 2)) * [3.0, 1.0] @ basis.T + 5.0
    means = rng.normal(size=(3, 2)) @ basis.T + 5.0
    off = rng.normal(size=(4, 6))  # distilled points off the plane: projected onto it
    r2, m2, s2 = project_2d(real, means, off)
    d = np.linalg.norm(real[:, None] - real[None], axis=2)
    d2 = np.linalg.norm(r2[:, None] - r2[None], axis=2)
    assert np.allclose(d, d2, atol=1e-8)
    assert np.allclose(np.linalg.norm(means - real.mean(0), axis=1), np.linalg.norm(m2, axis=1), atol=1e-8)
    inplane = (off - real.mean(0)) @ basis
    assert np.allclose(np.linalg.norm(inplane, axis=1), np.linalg.norm(s2, axis=1), atol=1e-8)
    assert not np.allclose(np.linalg.norm(off - real.mean(0), axis=1), np.linalg.norm(s2, axis=1))
    with pytest.raises(EmbeddingInputError, match="unknown projection 'umap'"):
        project_2d(real, means, off, method="umap")


def _clusters(rng, n_classes=6, per=30, dim=12):
    centres = rng.normal(size=(n_classes, dim)) * 4
    real = np.repeat(centres, per, axis=0) + rng.normal(size=(n_classes * per, dim))
    return real, np.repeat(np.arange(n_classes), per), centres


def test_embed_set_map_points_and_plot(tmp_path):
    rng = np.random.default_rng(1)
    real, ry, centres = _clusters(rng)
    syn = centres * 1.8  # every distilled point beyond its class, away from the origin
    sy = np.arange(6)
    emb = embed_set(real, ry, syn, sy, class_names=list("abcdef"), max_classes=4, max_real_per_class=10)
    assert len(emb.periphery) == 6  # the numbers cover every class …
    assert emb.classes == [0, 1, 2, 3]  # … the map the first four
    kinds = emb.points["kind"].value_counts().to_dict()
    assert kinds == {"real": 40, "mean": 4, "distilled": 4}
    assert set(emb.points.loc[emb.points["kind"] == "distilled", "image"]) == {0, 1, 2, 3}
    assert emb.summary["frac_outside"] == 1.0  # constructed beyond every real image
    images = torch.rand(6, 3, 16, 16)
    png = plot_embedding(emb, images, tmp_path / "map.png", "six clusters")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 400 and im.size[1] > 300


@pytest.mark.slow
def test_embed_set_tsne_map():
    """t-SNE embeds real points, means and distilled points together (sklearn; 15–25 s on 2 busy cores)."""
    rng = np.random.default_rng(1)
    real, ry, centres = _clusters(rng)
    tsne = embed_set(real, ry, centres * 1.8, np.arange(6), method="tsne", max_real_per_class=8)
    assert tsne.method == "tsne" and tsne.classes == list(range(6))
    assert np.isfinite(tsne.points[["x", "y"]].to_numpy()).all() and len(tsne.points) == 48 + 6 + 6


@pytest.fixture(scope="module")
def real_test_set(digits_shards):
    """The first test image of each class, saved as a 'distilled' set of the demo backbone."""
    from lgm_ray.shards.reader import ShardSet

    shards = ShardSet(digits_shards)
    xs, ys = [], []
    for x, y, _ in shards.eval_batches("test", 64, resize=32, crop=32):
        for img, label in zip(x, y.tolist(), strict=True):
            if label not in ys:
                xs.append(img)
                ys.append(label)
        if len(ys) == shards.num_classes:
            break
    order = np.argsort(ys)
    images = torch.stack([xs[i] for i in order]).float()
    images = images / 255.0 if images.max() > 1 else images
    return {"images": images, "labels": torch.tensor(sorted(ys)), "backbone": "digits_simclr_cnn",
            "class_names": [f"digit-{c}" for c in range(10)],
            "config": {"backbone": "digits_simclr_cnn", "shards": digits_shards, "real_res": 32, "crop_res": 32,
                       "normalization": "native"}}


def test_set_features_reads_the_split_through_the_cache(real_test_set, digits_shards, tmp_path):
    sources: dict = {}
    cache = tmp_path / "cache"
    feats = set_features(real_test_set, digits_shards, cache_dir=cache, sources=sources)
    assert feats.backbone == "digits_simclr_cnn" and feats.num_classes == 10
    assert not feats.cache_hit and len(feats.real_labels) == 360
    assert feats.class_names[3] == "digit-3"
    # the set's images are real test images: the same preprocessing gives the same features
    real = feats.real_features.numpy()
    for f in feats.syn_features.numpy():
        assert np.abs(real - f).max(axis=1).min() < 1e-4
    again = set_features(real_test_set, digits_shards, cache_dir=cache, sources=sources)
    assert again.cache_hit and len(sources) == 1  # one backbone object for both calls
    # each 'distilled' image is a real one: its percentile is that real image's rank in its class (up to
    # the one position its own float-rounded copy may take)
    t = periphery(feats.real_features, feats.real_labels, feats.syn_features, real_test_set["labels"])
    ry = feats.real_labels.numpy()
    means = np.stack([real[ry == c].mean(0) for c in range(10)])
    dist = np.linalg.norm(real - means[ry], axis=1)
    for f, c, pct in zip(feats.syn_features.numpy(), real_test_set["labels"].tolist(), t["percentile"], strict=True):
        k = int(np.abs(real - f).max(axis=1).argmin())
        rank = 100.0 * np.count_nonzero(dist[ry == c] < dist[k]) / np.count_nonzero(ry == c)
        assert abs(pct - rank) <= 100.0 / np.count_nonzero(ry == c) + 1e-9

    bad = {**real_test_set, "backbone": "no_such_backbone", "config": {}}
    with pytest.raises(FeaturesUnavailable, match="unknown backbone 'no_such_backbone'"):
        set_features(bad, digits_shards, cache_dir=cache)
    with pytest.raises(FeaturesUnavailable, match="does not exist"):
        set_features(real_test_set, tmp_path / "nowhere", cache_dir=cache)
    with pytest.raises(FeaturesUnavailable, match="not in the feature cache"):
        set_features(real_test_set, digits_shards, cache_dir=tmp_path / "empty", max_uncached=100)


def test_map_and_numbers_of_a_saved_set(real_test_set, tmp_path):
    """What the report does with one saved set: read it through the validated loader, its features by its own
    backbone on the shards its config names, then its map and periphery numbers."""
    import pandas as pd

    from lgm_ray.common.errors import InputError
    from lgm_ray.core.synset import SynsetFileError, load_synset_file

    torch.save(real_test_set, tmp_path / "synset.pt")
    payload = load_synset_file(tmp_path / "synset.pt")
    feats = set_features(payload, payload["config"]["shards"], cache_dir=tmp_path / "cache")
    emb = embed_set(feats.real_features, feats.real_labels, feats.syn_features, payload["labels"],
                    class_names=feats.class_names, num_classes=feats.num_classes)
    out = plot_embedding(emb, payload["images"], tmp_path / "map.png", f"synset.pt on {feats.backbone} (test)")
    assert out.stat().st_size > 10_000
    emb.periphery.to_parquet(tmp_path / "map.parquet", index=False)
    assert len(pd.read_parquet(tmp_path / "map.parquet")) == 10
    assert emb.summary["median_percentile"] < 100  # real images sit inside their class
    assert json.loads(json.dumps(emb.summary)) == emb.summary  # the summary is plain numbers (MLflow metrics)
    with pytest.raises(SynsetFileError, match="does not exist") as missing:
        load_synset_file(tmp_path / "missing.pt")
    assert isinstance(missing.value, InputError)  # a command prints it as one `error: …` line, exit 2
