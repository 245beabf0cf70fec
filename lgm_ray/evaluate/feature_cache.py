"""On-disk cache of frozen-backbone features of a shards split, keyed by everything that made them.

Evaluating many training sets on one backbone tests them all on the same test split, and the
``centroids`` / ``neighbors`` / ``full`` baselines all need the features of the whole train split:
computing those once per (backbone and its weights, dataset manifest, split, preprocessing,
normalisation) and reusing them is what makes a cross-model table affordable.

The key is a SHA-256 over a JSON description of those inputs (:func:`feature_key`):

* the backbone (:func:`backbone_fingerprint`): its name, output form, normalisation and a SHA-256 of
  its whole state dict, so other weights under the same name, or another normalisation (its mean/std
  are buffers of the module), get other features. Hashing is cheap next to loading the weights
  (a ViT-B's 346 MB hash in about 0.26 s on one CPU core) and is done once per backbone object;
* the versions of torch, timm, open_clip and lgm_ray (:func:`package_versions`): an upgrade that
  changes a kernel or a model's forward cannot serve features computed before it;
* the shards' manifest (its SHA-256), the split and the preprocessing.

Each entry is one NumPy ``.npz`` file (``features`` float32 N×D, ``labels`` int64 N, ``keys`` the
samples' keys, ``meta`` the JSON description), written to a unique temporary name in the same folder
and then ``os.replace``-d into place: concurrent evaluations (Ray tasks) never write the same file
and readers only ever see complete files. Two processes that miss at once both compute and the last
rename wins with identical content. A file that cannot be read for any reason (truncated, corrupt,
another format) or whose stored description is not the one asked for is recomputed with a warning,
never fatal and never trusted.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lgm_ray.backbones import create_backbone, list_backbones
from lgm_ray.common.errors import InputError
from lgm_ray.common.suggest import did_you_mean
from lgm_ray.core.defaults import CROP_RES, REAL_RES

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when what a cached entry means changes
CACHE_ENV = "LGM_RAY_CACHE"
# Packages whose code produces the features: key name → distribution name.
VERSIONED_PACKAGES = {"torch": "torch", "timm": "timm", "open_clip": "open_clip_torch", "lgm_ray": "lgm_ray"}


class EvaluationInputError(InputError):
    """An evaluation input that cannot be used (unknown backbone, missing file, absent split, …).

    The message names the problem and the fix. An :class:`~lgm_ray.common.errors.InputError`, as are the
    shards', backbones' and synset files' own (``ShardError``, ``BackboneWeightsError``,
    ``SynsetFileError``): ``python -m lgm_ray.evaluate`` turns each into one ``error: …`` line and exit
    status 2 (:func:`lgm_ray.common.cli.run_command`); any other exception is a bug and keeps its traceback.
    """


class MissingInputError(EvaluationInputError, FileNotFoundError):
    """An input file or folder that does not exist (also a ``FileNotFoundError``)."""


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that compute features (``"absent"`` when not installed)."""
    out = {}
    for key, dist in VERSIONED_PACKAGES.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "absent"
    return out


def default_cache_dir() -> Path:
    """``$LGM_RAY_CACHE`` if set, else ``~/.cache/lgm_ray/features``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lgm_ray" / "features"


def state_dict_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and raw bytes of every tensor).

    The bytes are hashed in place (no copy on the CPU; one device-to-host copy per tensor otherwise).
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.cpu().contiguous().reshape(-1)
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def backbone_fingerprint(backbone: nn.Module, normalization: str = "native") -> dict:
    """What identifies a backbone's features: its name, output form and a digest of its weights."""
    spec = getattr(backbone, "spec", None)
    return {
        "name": getattr(backbone, "name", type(backbone).__name__),
        "feature_dim": getattr(backbone, "feature_dim", None),
        "ends_in_norm": getattr(spec, "ends_in_norm", None),
        "normalization": normalization,
        "raw_output": bool(getattr(backbone, "raw_output", False)),
        "input_grid": getattr(spec, "input_grid", None),
        "weights_sha256": state_dict_digest(backbone),
    }


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of a shards manifest (canonical JSON): other data, other split → other digest."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()


def _canonical(description: dict) -> dict:
    """``description`` as it reads back from JSON (tuples become lists, odd values strings)."""
    return json.loads(json.dumps(description, sort_keys=True, default=str))


def feature_key(description: dict) -> str:
    """The cache key of a JSON-able description of how features were produced."""
    blob = json.dumps({"format": CACHE_FORMAT, **description}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def feature_description(fingerprint: dict, shards, split: str, *, resize: int, crop: int) -> dict:
    """Everything that determines the centre-crop features of a split: the cache entry's description."""
    return {
        "backbone": fingerprint,
        "versions": package_versions(),
        "manifest_sha256": manifest_digest(shards.manifest),
        "split": split,
        "preprocess": {"resize": resize, "crop": crop, "mode": "resize_short_side+center_crop"},
    }


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

    def load(self, key: str, description: dict | None = None) -> CachedFeatures | None:
        """The entry of ``key``, or ``None`` when absent.

        A file that cannot be read (any exception: truncated, corrupt, not an ``.npz``), whose arrays
        disagree in length, or whose stored description differs from ``description`` (when given)
        counts as absent, with a warning: the caller recomputes and overwrites it.
        """
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as f:
                feats, labels = f["features"], f["labels"]
                keys = [str(k) for k in f["keys"]]
                meta = json.loads(str(f["meta"]))
            if feats.ndim != 2 or feats.dtype != np.float32 or labels.shape != (len(feats),) or \
                    len(keys) != len(feats):
                raise ValueError(f"inconsistent arrays: features {feats.shape} {feats.dtype}, labels "
                                 f"{labels.shape}, {len(keys)} keys")
        except Exception as exc:  # noqa: BLE001 - a cache file must never be fatal, whatever is wrong with it
            warnings.warn(f"feature cache file {p} is unreadable ({type(exc).__name__}: {exc}); recomputing it",
                          stacklevel=2)
            return None
        if description is not None and meta != _canonical(description):
            warnings.warn(f"feature cache file {p} holds features of another description; recomputing it",
                          stacklevel=2)
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
                    meta=np.asarray(json.dumps(_canonical(description), sort_keys=True)),
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
        cached = self.load(key, description)
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
        shards: a :class:`lgm_ray.shards.reader.ShardSet`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        resize, crop: the preprocessing (the reference tests on resize 256 + centre crop 224).
        normalization: recorded in the key (the backbone's mean/std are hashed with its weights too).
        device: where the backbone runs (not part of the key).
        batch_size: extraction batch (not part of the key: it does not change the features).
        fingerprint: a precomputed :func:`backbone_fingerprint` (hashing large weights costs time).
    """
    description = feature_description(fingerprint or backbone_fingerprint(backbone, normalization), shards,
                                      split, resize=resize, crop=crop)

    def compute():
        return extract_features(
            backbone, shards.eval_batches(split, batch_size, resize=resize, crop=crop), device
        )

    return cache.get_or_compute(description, compute)


def check_backbone(name: str) -> None:
    """Raise an :class:`EvaluationInputError` listing the known backbones when ``name`` is not one."""
    known = list_backbones()
    if name not in known:
        raise EvaluationInputError(f"unknown backbone {name!r}{did_you_mean(name, known)}; use one of the known "
                                   f"backbones: {', '.join(known)}")


def check_device(device: str | torch.device) -> None:
    """Raise an :class:`EvaluationInputError` when ``device`` is CUDA on a machine without one."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationInputError(f"device {str(device)!r}: no CUDA device is available here; use cpu")


class FeatureSource:
    """One frozen backbone on one shards set, with its fingerprint and the cache of its split features.

    Every split's features (train for the baselines, val or test for scoring) and every feature the
    probe trains on come from :attr:`backbone`, this one object, and are cached under
    :attr:`fingerprint`, computed from it once: the two halves of an evaluation cannot come from
    different models.

    Args:
        backbone_name: a registry name (checked: an unknown one lists the known ones).
        shards: a :class:`lgm_ray.shards.reader.ShardSet`.
        weights, normalization, device, raw_output: as :func:`lgm_ray.backbones.frozen.create_backbone`.
        real_res, crop_res: split features are of resize ``real_res`` + centre crop ``crop_res``.
        cache_dir: cache folder (default :func:`default_cache_dir`).

    Attributes:
        cache_hits: split → whether its features came from the cache (last request).
    """

    def __init__(self, backbone_name: str, shards, *, weights: str | None = None,
                 normalization: str = "native", device: str | torch.device = "cpu", real_res: int = REAL_RES,
                 crop_res: int = CROP_RES, cache_dir: str | os.PathLike | None = None, raw_output: bool = False) -> None:
        check_backbone(backbone_name)
        check_device(device)
        self.shards, self.device, self.real_res, self.crop_res = shards, device, real_res, crop_res
        self.normalization = normalization
        self.backbone = create_backbone(backbone_name, weights=weights, normalization=normalization,
                                        img_size=crop_res, device=device, raw_output=raw_output)
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
