"""End to end on the offline demo, for every demo backbone: shards → distil (the demo config, shortened)
→ evaluate against the real-image baselines → read the images with a pixel classifier.

The full table (400 steps, every backbone evaluating every set, 5 probe seeds) is
``benchmarks/demo_table.py``; this is the short run that fits CI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lgm_ray.distill.__main__ import main as distill_main
from lgm_ray.evaluate import EvalConfig, evaluate_baseline, evaluate_synset
from lgm_ray.evaluate.legibility import digits_pixel_classifier, legibility

DEMO = Path(__file__).resolve().parents[2] / "configs" / "digits_demo.yaml"
DEMO_BACKBONES = ["digits_simclr_cnn", "digits_simclr_vit", "digits_simclr_mixer"]
# The short run (300 steps, 2 probe seeds) starts from random real images (init: real) and must beat them
# by the 15 points, and the centroid images by 3 (the 5 hold for the full run: README, "Demo";
# the short runs gave +6.1 to +10.7 over centroids and +20 to +23 over random on this machine).
MARGIN_RANDOM = 15.0
MARGIN_CENTROIDS = 3.0


@pytest.fixture(scope="module")
def reader():
    return digits_pixel_classifier()


@pytest.mark.slow
@pytest.mark.parametrize("backbone", DEMO_BACKBONES)
def test_demo_distils_legible_digits_that_beat_random_real_images(tmp_path, digits_shards, reader, backbone):
    out = tmp_path / "run"
    distill_main(["--config", str(DEMO), "--backbone", backbone, "--shards", digits_shards, "--steps", "300",
                  "--out", str(out), "--log-every", "100"])
    payload = torch.load(out / "synset.pt", weights_only=False)
    # The paper's 1,000 probe epochs: with 300 the ViT's probe is far from converged on 10 images.
    cfg = EvalConfig(real_res=32, crop_res=32, epochs=1000, seeds=2, split="test")
    cache = tmp_path / "cache"
    distilled = evaluate_synset(payload["images"], payload["labels"], backbone, digits_shards, cfg, cache_dir=cache)
    random = evaluate_baseline("random", backbone, digits_shards, cfg, cache_dir=cache)
    centroids = evaluate_baseline("centroids", backbone, digits_shards, cfg, cache_dir=cache)
    got = {"distilled": distilled["top1_mean"], "random": random["top1_mean"], "centroids": centroids["top1_mean"]}
    assert distilled["n_train"] == 10
    # Same-model margins of the short run (the full run's are in the README table).
    assert got["distilled"] >= got["random"] + MARGIN_RANDOM, got
    assert got["distilled"] >= got["centroids"] + MARGIN_CENTROIDS, got
    # The images are digits: a pixel classifier trained on real digits reads most of them, and
    # they are grey like the data.
    images = payload["images"]
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
    read = legibility(images, payload["labels"], reader)
    assert read["legible_classes"] >= 8, read
