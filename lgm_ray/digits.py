"""scikit-learn's digits as a small real image dataset that needs no download.

1,797 grey 8×8 images of 10 classes. lgm_ray fixes one split (stratified 80/20, seed 0) and turns
each image into a 3-channel float image in [0, 1], bilinearly upsampled to ``res``. The demo and the
tests use it; ``python -m lgm_ray.shards build digits`` writes it as WebDataset shards.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

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


def load_digits_split(split: str, res: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of one split.

    Args:
        split: ``"train"`` (1,437 images) or ``"test"`` (360 images).
        res: output side in pixels (bilinear upsampling of the 8×8 originals).

    Returns:
        images: float32 N×3×res×res in [0, 1]; labels: int64 N.
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    images, targets, train_idx, test_idx = _split_indices()
    idx = train_idx if split == "train" else test_idx
    x = torch.from_numpy(images[idx] / 16.0).unsqueeze(1)  # N×1×8×8, values 0..16 → [0, 1]
    if res != 8:
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(targets[idx])
