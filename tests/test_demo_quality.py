"""End to end on the offline demo: shards → distil (the demo config) → evaluate against random."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lgm_ray.distill import main as distill_main
from lgm_ray.evaluate import evaluate_baseline, evaluate_synset

DEMO = Path(__file__).resolve().parents[1] / "configs" / "digits_demo.yaml"


@pytest.mark.slow
def test_demo_distilled_set_beats_random_real_images(tmp_path, digits_shards):
    distill_main(["--config", str(DEMO), "--shards", digits_shards, "--out", str(tmp_path / "run"), "--log-every", "250"])
    payload = torch.load(tmp_path / "run" / "synset.pt", weights_only=False)
    common = {"real_res": 32, "crop_res": 32, "epochs": 300, "seeds": 2, "cache_dir": tmp_path / "cache"}
    distilled = evaluate_synset(payload["images"], payload["labels"], "digits_simclr_cnn", digits_shards, **common)
    random = evaluate_baseline("random", "digits_simclr_cnn", digits_shards, **common)
    assert distilled["n_train"] == 10
    assert distilled["top1_mean"] >= random["top1_mean"] + 10, (distilled["top1_mean"], random["top1_mean"])
