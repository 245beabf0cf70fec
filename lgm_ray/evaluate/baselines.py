"""The paper's real-image baselines: which real training images stand in for a distilled set.

(Cazenavette et al., NeurIPS 2025; docs/design.md §1.)

* ``random``: one random real training image per class; selection seed ``k`` for probe seed
  ``3407 + k`` (seeds 0–4), so the reported mean ± std covers both the draw and the probe.
* ``centroids``: per class, the real training image whose feature is closest (Euclidean) to the
  class's mean feature.
* ``neighbors``: for each distilled image, the real training image *of its class* whose feature is
  nearest (Euclidean) to the distilled image's feature.
* ``full``: the whole training split (trained in :mod:`lgm_ray.evaluate.protocol`).

Selection features are centre-crop features (resize the short side to ``real_res``, centre-crop
``crop_res``, no augmentation) of a *selection* backbone, by default the evaluation backbone; a
distilled image gets the same preprocessing before its feature is taken. The selected images
themselves are returned as the probe trains on real images: resize to ``real_res`` + centre crop
``real_res`` (the reference random-crops ``real_res`` before its augmentation; a centre crop keeps
the selection deterministic). Ties go to the lowest index (the split's stored order).

The module also checks a distilled set's classes against the shards (:func:`check_synset_classes`; the
policy is in :mod:`lgm_ray.evaluate.protocol`); a saved set is loaded by the one loader,
:func:`lgm_ray.core.synset.load_synset_file`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lgm_ray.core.defaults import REAL_RES
from lgm_ray.evaluate.feature_cache import EvaluationInputError

BASELINES = ("random", "centroids", "neighbors", "full")


def centroid_indices(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     per_class: int = 1) -> torch.Tensor:
    """Per class, the indices of the ``per_class`` samples nearest to the class's mean feature.

    Args:
        features: N×D features of the candidate images.
        labels: N class indices.
        num_classes: classes to pick for (``0 … num_classes-1``, each must have ``per_class`` samples).
        per_class: images per class (the paper uses 1).

    Returns:
        long tensor of ``num_classes × per_class`` indices into ``features``, class by class, nearest
        first.
    """
    f = features.double()
    out = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} training images, fewer than the {per_class} needed")
        fc = f[members]
        dist = (fc - fc.mean(dim=0, keepdim=True)).pow(2).sum(dim=1)
        order = torch.sort(dist, stable=True).indices[:per_class]
        out.append(members[order])
    return torch.cat(out)


def nearest_same_class_indices(query: torch.Tensor, query_labels: torch.Tensor,
                               features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each query feature, the index of the nearest candidate feature with the same label.

    Args:
        query: M×D features (the distilled images').
        query_labels: M labels.
        features: N×D candidate features (the real training images').
        labels: N candidate labels.

    Returns:
        long tensor of M indices into ``features``.
    """
    f, q = features.double(), query.double()
    out = torch.empty(len(query_labels), dtype=torch.long)
    for i, c in enumerate(query_labels.tolist()):
        members = torch.nonzero(labels == c).flatten()
        if len(members) == 0:
            raise ValueError(f"no real training image of class {c} to be the neighbour of distilled image {i}")
        dist = (f[members] - q[i]).pow(2).sum(dim=1)
        out[i] = members[int(torch.argmin(dist))]
    return out


def center_crop_like_real(images: torch.Tensor, real_res: int, crop_res: int) -> torch.Tensor:
    """Preprocess (distilled) images as the real test images are: resize short side, centre crop."""
    h, w = images.shape[-2:]
    scale = real_res / min(h, w)
    size = (max(crop_res, round(h * scale)), max(crop_res, round(w * scale)))
    x = images.float()
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=size[0] < h)
    top, left = (size[0] - crop_res) // 2, (size[1] - crop_res) // 2
    return x[..., top : top + crop_res, left : left + crop_res].clamp(0.0, 1.0)


def select_indices(baseline: str, features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                   ipc: int = 1, query: torch.Tensor | None = None,
                   query_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the real training images a feature-based baseline (``centroids``/``neighbors``) picks."""
    if baseline == "centroids":
        return centroid_indices(features, labels, num_classes, ipc)
    if baseline == "neighbors":
        if query is None or query_labels is None:
            raise ValueError("the neighbors baseline needs the distilled images' features and labels")
        return nearest_same_class_indices(query, query_labels.long(), features, labels)
    raise ValueError(f"{baseline!r} does not select images by features")


@torch.no_grad()
def image_features(backbone: torch.nn.Module, images: torch.Tensor, real_res: int, crop_res: int,
                   device: str | torch.device = "cpu", chunk: int = 256) -> torch.Tensor:
    """Centre-crop features of (distilled) images, preprocessed as the real images are."""
    x = center_crop_like_real(images, real_res, crop_res)
    return torch.cat([backbone(x[i : i + chunk].to(device)).float().cpu() for i in range(0, len(x), chunk)])


def fetch_train_images(shards, keys: Sequence[str], *, resize: int, crop: int,
                       split: str = "train", batch_size: int = 256) -> torch.Tensor:
    """The images of ``keys`` from one pass over a split, in the order of ``keys``.

    Raises:
        KeyError: a key is not in the split (the cached features and the shards disagree).
    """
    wanted = set(map(str, keys))  # a key may repeat (two distilled images, one nearest neighbour)
    found: dict[str, torch.Tensor] = {}
    for x, _, batch_keys in shards.iter_split(split, resize=resize, crop=crop, batch_size=batch_size):
        for j, k in enumerate(batch_keys):
            if str(k) in wanted:
                found[str(k)] = x[j]
        if len(found) == len(wanted):
            break
    missing = sorted(wanted - set(found))
    if missing:
        raise KeyError(
            f"{len(missing)} selected images ({missing[:3]}) are not in the {split!r} split of the shards; "
            "the feature cache and the shards disagree — clear the cache folder and rerun"
        )
    return torch.stack([found[str(k)] for k in keys]).float()


def select_random(shards, seed: int, *, ipc: int = 1,
                  real_res: int = REAL_RES) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` random real training images per class, drawn with selection seed ``seed``."""
    images, labels = shards.random_per_class(seed, n=ipc, split="train", resize=real_res, crop=real_res)
    return images.float(), labels.long()


def select_by_indices(shards, train_keys: Sequence[str], train_labels: torch.Tensor,
                      indices: torch.Tensor, *, real_res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real training images at ``indices`` of the cached train split, with their labels."""
    keys = [train_keys[i] for i in indices.tolist()]
    images = fetch_train_images(shards, keys, resize=real_res, crop=real_res)
    return images, train_labels[indices].long()


# ---------------------------------------------------------------- the distilled set's classes


def check_synset_classes(labels: torch.Tensor, shards, *, class_names: list[str] | None = None,
                         num_classes: int | None = None, source: str = "synthetic set") -> None:
    """Check a set's labels and class metadata against the shards' manifest.

    Raises:
        EvaluationInputError: ``num_classes`` or ``class_names`` differ from the manifest's, or a label
            falls outside ``0 … classes-1`` (the set was distilled from other data).

    Warns:
        UserWarning: some class has no image (evaluated anyway; see :mod:`lgm_ray.evaluate.protocol`).
    """
    c = shards.num_classes
    hint = "evaluate it against the shards it was distilled from (--shards)"
    if num_classes is not None and int(num_classes) != c:
        raise EvaluationInputError(f"{source} has num_classes={int(num_classes)} but the shards have {c} classes; {hint}")
    if class_names is not None and list(class_names) != list(shards.class_names):
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(class_names, shards.class_names, strict=False)) if a != b]
        raise EvaluationInputError(
            f"{source}'s class_names differ from the shards manifest's ({len(class_names)} vs "
            f"{len(shards.class_names)} names; first differences (index, set, shards): {diff[:3]}); {hint}"
        )
    bad = sorted({int(v) for v in labels.tolist() if not 0 <= int(v) < c})
    if bad:
        raise EvaluationInputError(f"{source} has labels {bad[:10]} outside the shards' classes 0…{c - 1}; {hint}")
    missing = sorted(set(range(c)) - {int(v) for v in labels.tolist()})
    if missing:
        warnings.warn(
            f"{source} has no image of {len(missing)} of the {c} classes ({missing[:10]}); the probe "
            "is still tested on every class, so those test images are almost surely misclassified",
            stacklevel=3,
        )
