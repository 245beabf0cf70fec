"""Helpers of the evaluation tests: the demo backbone, a fast config, one probe seed by hand, the command in-process."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lgm_ray import backbones
from lgm_ray.core.synset import synset_payload
from lgm_ray.distill.config import DistillConfig
from lgm_ray.evaluate import feature_cache as fc
from lgm_ray.evaluate import probe as probe
from lgm_ray.evaluate.__main__ import main
from lgm_ray.evaluate.config import EvalConfig

BACKBONE = "digits_simclr_cnn"
TWIN = "digits_cnn_twin"  # the demo backbone under a second name: a second backbone for cross-model tests
FAST = EvalConfig(real_res=32, crop_res=32, epochs=10, seeds=2)


def summary(r: dict) -> tuple:
    """The numbers of a result that must not change between two ways of computing it."""
    return (r["top1_per_seed"], r["top5_per_seed"], r["top1_mean"], r["top1_std"], r["n_train"])


def scores_by_hand(images, labels, shards, seed: int, *, epochs: int, res: int = 32, crop: int = 32,
                   split: str = "test", normalization: str = "native") -> dict:
    """One probe seed computed outside lgm_ray.evaluate.protocol: fresh backbone, own feature pass, no cache."""
    bb = backbones.create_backbone(BACKBONE, normalization=normalization)
    feats, y, _ = fc.extract_features(bb, shards.eval_batches(split, resize=res, crop=crop))
    head = probe.train_probe_on_images(images, labels, bb, feature_dim=bb.feature_dim, num_classes=10, seed=seed,
                                       epochs=epochs, batch=len(labels), crop_res=crop)
    return probe.score_head(head, feats, y)


def save_set(path: Path, images, labels, **config) -> str:
    """A set as `python -m lgm_ray.distill` saves it: the run's config and backbone in the payload."""
    cfg = DistillConfig(**config).validate().to_dict()
    torch.save(synset_payload(images, labels, class_names=[str(i) for i in range(10)], num_classes=10,
                              config=cfg, backbone=cfg["backbone"]), path)
    return str(path)


def cli(capsys, *argv: str) -> tuple[dict, str, str]:
    """Run the command in-process with --json; return (its JSON, stdout, stderr)."""
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    return json.loads(out.strip().splitlines()[-1]), out, err


def notes(err: str) -> list[str]:
    """The command's notes on stderr."""
    return [line for line in err.splitlines() if ": note: " in line]
