"""On-disk cache of frozen-backbone features of a shards split, keyed by everything that made them.

Evaluating many training sets on one backbone tests them all on the same test split, and the
``centroids`` / ``neighbors`` / ``full`` baselines all need the features of the whole train split:
computing those once per (backbone and its weights, dataset manifest, split, preprocessing,
normalisation) and reusing them is what makes a cross-model table affordable.

The key is a SHA-256 over a JSON description of those inputs (:func:`feature_key`); the backbone's
part hashes its state dict (:func:`backbone_fingerprint`), so other weights under the same name, or
another normalisation (its mean/std are buffers of the module), get other features. Each entry is
one NumPy ``.npz`` file (``features`` float32 N×D, ``labels`` int64 N, ``keys`` the samples' keys,
``meta`` the JSON description), written to a unique temporary name in the same folder and then
``os.replace``-d into place: concurrent evaluations (Ray tasks) never write the same file and readers
only ever see complete files. Two processes that miss at once both compute and the last rename wins
with identical content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lgm_ray.backbones import create_backbone, list_backbones

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what a cached entry means changes
CACHE_ENV = "LGM_RAY_CACHE"


def default_cache_dir() -> Path:
    """``$LGM_RAY_CACHE`` if set, else ``~/.cache/lgm_ray/features``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lgm_ray" / "features"


def state_dict_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and raw bytes of every tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def backbone_fingerprint(backbone: nn.Module, normalization: str = "native") -> dict:
    """What identifies a backbone's features: its name, output form and a digest of its weights."""
    spec = getattr(backbone, "spec", None)
    return {
        "name": getattr(backbone, "name", type(backbone).__name__),
        "feature_dim": getattr(backbone, "feature_dim", None),
        "ends_in_norm": getattr(spec, "ends_in_norm", None),
        "normalization": normalization,
        "weights_sha256": state_dict_digest(backbone),
    }


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of a shards manifest (canonical JSON): other data, other split → other digest."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()


def feature_key(description: dict) -> str:
    """The cache key of a JSON-able description of how features were produced."""
    blob = json.dumps({"format": CACHE_FORMAT, **description}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class CachedFeatures:
    """Features of one split: ``features`` N×D float32, ``labels`` N int64, ``keys`` N sample keys."""

    features: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    hit: bool
    path: Path


class FeatureCache:
    """A folder of ``<key>.npz`` feature files with atomic writes.

    Args:
        root: cache folder (created on first write); default :func:`default_cache_dir`.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def load(self, key: str) -> CachedFeatures | None:
        """The entry of ``key``, or ``None`` when absent (a corrupt file counts as absent)."""
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as f:
                feats, labels, keys = f["features"], f["labels"], [str(k) for k in f["keys"]]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable feature cache file %s (%s); recomputing", p, exc)
            return None
        return CachedFeatures(torch.from_numpy(feats), torch.from_numpy(labels), keys, True, p)

    def store(self, key: str, features: torch.Tensor, labels: torch.Tensor, keys: list[str],
              description: dict) -> Path:
        """Write an entry atomically: unique temp file in the same folder, fsync, ``os.replace``."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(key)
        tmp = self.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    features=features.detach().cpu().float().numpy(),
                    labels=labels.detach().cpu().long().numpy(),
                    keys=np.asarray(keys, dtype=str),
                    meta=np.asarray(json.dumps(description, sort_keys=True, default=str)),
                )
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        return final

    def get_or_compute(
        self, description: dict, compute: Callable[[], tuple[torch.Tensor, torch.Tensor, list[str]]]
    ) -> CachedFeatures:
        """Load the entry described by ``description`` or compute, store and return it.

        ``hit`` of the result says whether the features came from disk.
        """
        key = feature_key(description)
        cached = self.load(key)
        if cached is not None:
            log.info("feature cache hit %s", cached.path)
            return cached
        feats, labels, keys = compute()
        path = self.store(key, feats, labels, keys, description)
        log.info("feature cache miss; wrote %s", path)
        return CachedFeatures(feats.detach().cpu().float(), labels.detach().cpu().long(), list(keys), False, path)


@torch.no_grad()
def extract_features(
    backbone: nn.Module, batches, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Run ``backbone`` over ``(images, labels, keys)`` batches; return the concatenated results."""
    feats, labels, keys = [], [], []
    for x, y, k in batches:
        feats.append(backbone(x.to(device).float()).float().cpu())
        labels.append(torch.as_tensor(y).long().cpu())
        keys.extend(str(s) for s in k)
    if not feats:
        raise ValueError("no images to extract features from (empty split)")
    return torch.cat(feats), torch.cat(labels), keys


def split_features(
    cache: FeatureCache,
    backbone: nn.Module,
    shards,
    split: str,
    *,
    resize: int,
    crop: int,
    normalization: str = "native",
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    fingerprint: dict | None = None,
) -> CachedFeatures:
    """Centre-crop features of a whole shards split (resize short side, centre crop), via the cache.

    Args:
        cache: where entries live.
        backbone: frozen feature extractor.
        shards: a :class:`lgm_ray.shards.ShardSet`.
        split: ``"train"`` or ``"test"``.
        resize, crop: the preprocessing (the reference tests on resize 256 + centre crop 224).
        normalization: recorded in the key (the backbone's mean/std are hashed with its weights too).
        device: where the backbone runs (not part of the key).
        batch_size: extraction batch (not part of the key: it does not change the features).
        fingerprint: a precomputed :func:`backbone_fingerprint` (hashing large weights costs time).
    """
    description = {
        "backbone": fingerprint or backbone_fingerprint(backbone, normalization),
        "manifest_sha256": manifest_digest(shards.manifest),
        "split": split,
        "preprocess": {"resize": resize, "crop": crop, "mode": "resize_short_side+center_crop"},
    }

    def compute():
        return extract_features(
            backbone, shards.eval_batches(split, batch_size, resize=resize, crop=crop), device
        )

    return cache.get_or_compute(description, compute)


def check_backbone(name: str) -> None:
    """Raise a ``ValueError`` listing the known backbones when ``name`` is not one of them."""
    if name not in list_backbones():
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}")


def _check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")


class FeatureSource:
    """One frozen backbone on one shards set, with its fingerprint and the cache of its split features.

    Args:
        backbone_name: a registry name (checked: an unknown one lists the known ones).
        shards: a :class:`lgm_ray.shards.ShardSet`.
        weights, normalization, device: as :func:`lgm_ray.backbones.create_backbone`.
        real_res, crop_res: split features are of resize ``real_res`` + centre crop ``crop_res``.
        cache_dir: cache folder (default :func:`default_cache_dir`).

    Attributes:
        cache_hits: split → whether its features came from the cache (last request).
    """

    def __init__(self, backbone_name: str, shards, *, weights: str | None = None,
                 normalization: str = "native", device: str | torch.device = "cpu", real_res: int = 256,
                 crop_res: int = 224, cache_dir: str | os.PathLike | None = None) -> None:
        check_backbone(backbone_name)
        _check_device(device)
        self.shards, self.device, self.real_res, self.crop_res = shards, device, real_res, crop_res
        self.normalization = normalization
        self.backbone = create_backbone(backbone_name, weights=weights, normalization=normalization,
                                        img_size=crop_res, device=device)
        self.fingerprint = backbone_fingerprint(self.backbone, normalization)
        self.cache = FeatureCache(cache_dir)
        self.cache_hits: dict[str, bool] = {}

    def features(self, split: str) -> CachedFeatures:
        """Centre-crop features of a whole split, from the cache when there."""
        f = split_features(self.cache, self.backbone, self.shards, split, resize=self.real_res,
                           crop=self.crop_res, normalization=self.normalization, device=self.device,
                           fingerprint=self.fingerprint)
        self.cache_hits[split] = f.hit
        return f
