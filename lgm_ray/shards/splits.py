"""The split rules every source shares: a stratified hold-out and the validation carve.

Pure functions of the items and a seed (:mod:`lgm_ray.shards.sources` and the digits' fixed split in
:mod:`lgm_ray.shards.digits` both use them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from lgm_ray.core.seeds import derive_seed
from lgm_ray.shards.format import ShardError

Item = tuple[Any, int]  # (reference the encoder can open, class index)


def stratified_split(items: list[Item], fraction: float, seed: int, *, held_out: str = "test",
                     minimum: int = 0) -> dict[str, list[Item]]:
    """Hold out ``round(fraction * n)`` items of every class, at least ``minimum``, at most ``n − 1``.

    Returns ``{"train": …, held_out: …}``, class by class, each class in the items' order.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_class[item[1]].append(item)
    out: dict[str, list[Item]] = {"train": [], held_out: []}
    for c in sorted(by_class):
        group = by_class[c]
        k = min(len(group) - 1, max(minimum, round(fraction * len(group))))
        perm = rng.permutation(len(group))
        out[held_out] += [group[i] for i in sorted(perm[:k])]
        out["train"] += [group[i] for i in sorted(perm[k:])]
    return out


def carve_val(items: list[Item], fraction: float, seed: int, class_names: Sequence[str]
              ) -> dict[str, list[Item]]:
    """The validation carve: ``{"train", "val"}`` out of train items, stratified, ≥ 1 of each class each side.

    Raises:
        ShardError: a class has fewer than 2 train items, so it cannot give one to each side.
    """
    counts = np.bincount([y for _, y in items], minlength=len(class_names))
    if few := [class_names[c] for c, n in enumerate(counts) if n < 2]:
        raise ShardError(f"classes {few} have fewer than 2 train images, so a validation split (≥ 1 per "
                         "class, ≥ 1 left for training) cannot be held out; add images or build without "
                         "--val-fraction")
    return stratified_split(items, fraction, derive_seed(seed, "val-split"), held_out="val", minimum=1)
