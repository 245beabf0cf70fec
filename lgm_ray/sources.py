"""Where a distillation run gets its real images: a name or a path → a :class:`RealSource`.

``digits`` is scikit-learn's digits held in memory (no files needed: the tests and the quickest
demo); any other value is a WebDataset shards folder or URL written by ``python -m lgm_ray.shards``.
Both stream endless shuffled batches that are a deterministic function of their seed, which is what
lets a distillation run resume bit-identically (it re-opens the stream at every checkpoint with a
seed derived from the step).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from lgm_ray.digits import CLASS_NAMES, load_digits_split


class RealSource(Protocol):
    num_classes: int
    class_names: list[str]

    def stream(
        self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class DigitsSource:
    """The digits train split in memory, resized to ``real_res``, as an endless shuffled stream."""

    def __init__(self, real_res: int = 32) -> None:
        self.images, self.labels = load_digits_split("train", res=real_res)
        self.class_names = list(CLASS_NAMES)
        self.num_classes = len(self.class_names)
        self.real_res = real_res

    def stream(
        self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx_all = torch.arange(rank, len(self.labels), world_size)
        g = torch.Generator().manual_seed(seed)
        buf = torch.empty(0, dtype=torch.long)
        while True:
            while len(buf) < batch_size:
                buf = torch.cat([buf, idx_all[torch.randperm(len(idx_all), generator=g)]])
            take, buf = buf[:batch_size], buf[batch_size:]
            yield self.images[take], self.labels[take]


class ShardSource:
    """A WebDataset shards folder (or URL) read through :class:`lgm_ray.shards.ShardSet`."""

    def __init__(self, root: str, real_res: int | None = None, num_workers: int = 0) -> None:
        from lgm_ray.shards import ShardSet

        self.shards = ShardSet(root)
        self.class_names = list(self.shards.class_names)
        self.num_classes = self.shards.num_classes
        self.real_res = real_res
        self.num_workers = num_workers

    def stream(
        self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.shards.train_stream(
            batch_size, seed=seed, rank=rank, world_size=world_size, real_res=self.real_res,
            num_workers=self.num_workers,
        )


def open_source(spec: str, real_res: int | None = None, num_workers: int = 0) -> RealSource:
    """``"digits"`` → :class:`DigitsSource`; anything else → :class:`ShardSource`."""
    if spec == "digits":
        return DigitsSource(real_res or 32)
    return ShardSource(spec, real_res, num_workers)

