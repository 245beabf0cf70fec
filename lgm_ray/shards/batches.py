"""What the decode pool's output becomes for a :class:`~lgm_ray.shards.reader.ShardSet`'s caller.

Training: one ``(images, labels, positions)`` triple per step, images float in [0, 1]
(:func:`train_output`; :func:`empty_train` for a rank whose streams give nothing). Evaluation: the
decoded tasks re-cut into batches of exactly ``batch_size`` (the last may be smaller), since a task may
come back short of its skipped samples (:func:`rebatch`). Every task's skipped samples go to the
set's :class:`~lgm_ray.shards.decode.SkipLog` on the way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from lgm_ray.shards.decode import Decoded, SkipLog

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]  # images float N×3×H×W in [0, 1], labels, keys
TrainBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, places in the global batch


def train_output(decoded: Iterator[Decoded], positions: torch.Tensor, skips: SkipLog) -> Iterator[TrainBatch]:
    """Each step's decoded share as float images in [0, 1], with its labels and ``positions``."""
    for images, labels, _, skipped in decoded:
        skips.note(skipped)
        yield images.float().div_(255.0), labels, positions.clone()


def empty_train(size: int) -> Iterator[TrainBatch]:
    """Empty batches, endlessly: a rank whose streams have no share of the batch."""
    while True:
        yield (torch.empty((0, 3, size, size)), torch.empty(0, dtype=torch.int64),
               torch.empty(0, dtype=torch.int64))


def rebatch(decoded: Iterable[Decoded], batch_size: int, skips: SkipLog) -> Iterator[Batch]:
    """Decoded tasks re-cut into float batches of ``batch_size`` samples (the last may be smaller)."""
    queue: deque[list[Any]] = deque()
    have = 0
    for images, labels, keys, skipped in decoded:
        skips.note(skipped)
        if keys:
            queue.append([images, labels, keys, 0])
            have += len(keys)
        while have >= batch_size:
            yield _take(queue, batch_size)
            have -= batch_size
    if have:
        yield _take(queue, have)


def _pop(queue: deque[list[Any]], n: int) -> Batch:
    """Pop ``n`` samples off a queue of [images, labels, keys, start] parts: uint8 images, labels, keys."""
    pieces = []
    while n:
        part = queue[0]
        images, labels, keys, start = part
        k = min(n, len(keys) - start)
        pieces.append((images[start:start + k], labels[start:start + k], keys[start:start + k]))
        part[3] += k
        n -= k
        if part[3] == len(keys):
            queue.popleft()
    images = pieces[0][0] if len(pieces) == 1 else torch.cat([p[0] for p in pieces])
    return images, torch.cat([p[1] for p in pieces]), [k for p in pieces for k in p[2]]


def _take(queue: deque[list[Any]], n: int) -> Batch:
    """:func:`_pop` as one float batch in [0, 1]."""
    images, labels, keys = _pop(queue, n)
    return images.float().div_(255.0), labels, keys
