"""scikit-learn's digits as a small real image dataset that needs no download.

1,797 grey 8×8 images of 10 classes. lgm_ray fixes one split (stratified 80/20, seed 0) and turns
each image into a 3-channel float image in [0, 1], bilinearly upsampled to ``res``. The demo and the
tests use it; ``python -m lgm_ray.shards build digits`` writes it as WebDataset shards.

A validation split is carved out of train on request (``val_fraction`` > 0): per class ``round(F·n)``
train images, at least 1 and at most ``n − 1``, with a seed derived from ``val_seed`` — the same carve
as ``python -m lgm_ray.shards build … --val-fraction F --val-seed S``. Train then shrinks by what ``val``
took; test never changes.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from lgm_ray.common.suggest import did_you_mean
from lgm_ray.shards.format import SPLITS
from lgm_ray.shards.splits import carve_val

CLASS_NAMES: tuple[str, ...] = tuple(str(i) for i in range(10))
SPLIT_SEED = 0
TEST_FRACTION = 0.2


@lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    idx = np.arange(len(data.target))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=data.target, random_state=SPLIT_SEED
    )
    return data.images.astype(np.float32), data.target.astype(np.int64), np.sort(train_idx), np.sort(test_idx)


@lru_cache(maxsize=8)
def _indices(val_fraction: float, val_seed: int) -> dict[str, np.ndarray]:
    """Indices into the 1,797 images of every split, for one validation carve (none when 0)."""
    _, targets, train_idx, test_idx = _split_indices()
    out = {"train": train_idx, "test": test_idx}
    if val_fraction > 0:
        parts = carve_val([(int(i), int(targets[i])) for i in train_idx], val_fraction, val_seed, CLASS_NAMES)
        out.update({split: np.sort([i for i, _ in items]) for split, items in parts.items()})
    return out


def load_digits_split(split: str, res: int = 32, *, val_fraction: float = 0.0,
                      val_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of one split.

    Args:
        split: ``"train"`` (1,437 images, fewer when a ``val`` split is carved), ``"val"`` (needs
            ``val_fraction`` > 0) or ``"test"`` (360 images).
        res: output side in pixels (bilinear upsampling of the 8×8 originals).
        val_fraction: fraction of every class's train images held out as ``val`` (0: no ``val``).
        val_seed: seed of that carve.

    Returns:
        images: float32 N×3×res×res in [0, 1]; labels: int64 N.
    """
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {', '.join(SPLITS)}, got {split!r}"
                         f"{did_you_mean(split, SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"need val_fraction in [0, 1), got {val_fraction}")
    if split == "val" and val_fraction == 0:
        raise ValueError("the digits 'val' split is carved out of train: pass val_fraction > 0, e.g. "
                         "load_digits_split('val', val_fraction=0.1)")
    images, targets, _, _ = _split_indices()
    idx = _indices(float(val_fraction), int(val_seed))[split]
    x = torch.from_numpy(images[idx] / 16.0).unsqueeze(1)  # N×1×8×8, values 0..16 → [0, 1]
    if res != 8:
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(targets[idx])
