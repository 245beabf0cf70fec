"""Where a distillation run gets its real images: a name or a path → a :class:`RealSource`.

``digits`` is scikit-learn's digits held in memory (no files needed: the tests and the quickest
demo); any other value is a WebDataset shard set: a folder or URL with an lgm_ray manifest (written by
``python -m lgm_ray.shards build`` or ``index``), a manifest file, or a shard pattern such as
``DIR/train-{000000..000146}.tar`` (see :class:`lgm_ray.shards.reader.ShardSet`).

**The real batch of a step.** ``source.batches(B, seed=s, start_step=t, rank=r, world_size=K,
num_streams=V)`` yields rank ``r``'s share of the global real batch of steps ``t, t + 1, …``, by one
rule that makes the global batch a function of ``(s, step, B, V)`` and the data alone:

1. The training data is dealt to ``V`` virtual streams. Shards: shard ``i`` (manifest order) goes to
   stream ``i % V`` when there are at least ``V`` train shards, else sample ``j`` of the split goes to
   stream ``j % V``. Digits: sample ``j`` of the train split goes to stream ``j % V``.
2. Each stream is an endless shuffled sequence seeded apart from ``(s, stream)``: every epoch a fresh
   order of its units (shards or shard slices), a fresh shuffle of the samples in each unit, and, for
   shards, a fresh random ``R``×``R`` crop of every image (resized to short side ``R``). Shards stream:
   a unit is shuffled through a seeded buffer of ``shuffle_buffer`` samples (default 1,000; a unit of at
   most that many samples is fully permuted) as webdataset reads it.
3. Stream ``v`` gives ``B // V + (v < B % V)`` samples per step, the next ones of its sequence; the
   global batch of step ``t`` is the streams' shares concatenated in stream order. A sample's
   *position* is its index ``0 … B − 1`` in that batch; the caller uses it to pick the sample's
   augmentation out of a draw made for the whole batch.
4. Rank ``r`` reads streams ``r, r + K, r + 2K, …`` and yields their shares (in stream order) with
   their positions. The union over ranks is the global batch, whatever ``K``.

Consequences: a run on any number of ranks sees the same batches; a run resumed (or extended) at any
step sees exactly the batches of an uninterrupted run, because a stream's place at step ``t`` is
computed from the counts (``t × share`` samples in), and only the unit it lands in is read — the
samples before that place pass through the tar stream undecoded; the decode processes
(``num_workers``) change nothing.

Limits: ``K ≤ V`` (each rank reads whole streams: raise ``num_streams`` for more ranks; a ``ValueError``
says so); ranks read unequal shares when ``V`` is not a multiple of ``K`` (e.g. V = 8, K = 3: 3, 3 and
2 streams); ``B < V`` is allowed — streams whose share is 0 read nothing, and a rank whose streams all
have share 0 yields empty batches; ``V`` must not exceed the number of training samples; changing
``V``, ``B``, ``R`` or the shuffle buffer changes every batch. Under ``on_bad_sample="skip"`` a bad
sample's place is taken by the next decodable sample of its stream (within its step's share and the
2 samples after it), so batches keep their size and resumption stays exact. Memory per rank: one
shuffle buffer of raw (encoded) samples per stream it reads, plus the decode processes' tasks in flight
(2 steps each) — not a shard's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from typing import NamedTuple, Protocol

import torch

from lgm_ray.core.seeds import generator
from lgm_ray.shards.digits import CLASS_NAMES, load_digits_split
from lgm_ray.shards.stream import stream_layout


class RealBatch(NamedTuple):
    """A rank's share of one step's global real batch."""

    images: torch.Tensor  # float32 B_r×3×R×R in [0, 1]
    labels: torch.Tensor  # int64 B_r
    positions: torch.Tensor  # int64 B_r: places of these samples in the global batch, 0 … B − 1


class RealSource(Protocol):
    num_classes: int
    class_names: list[str]

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0,
                world_size: int = 1, num_streams: int = 8) -> Iterator[RealBatch]: ...

    def random_per_class(self, seed: int, *, n: int = 1, res: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class DigitsSource:
    """The digits train split in memory, resized to ``real_res``, dealt to virtual streams (module doc).

    Args:
        real_res: image side in pixels.
        val_fraction: hold this fraction of every class out of train as a ``val`` split (not streamed),
            so that choices tuned on ``load_digits_split("val", …)`` never saw their images.
        val_seed: seed of that carve.
    """

    def __init__(self, real_res: int = 32, *, val_fraction: float = 0.0, val_seed: int = 0) -> None:
        self.images, self.labels = load_digits_split("train", res=real_res, val_fraction=val_fraction,
                                                     val_seed=val_seed)
        self.class_names = list(CLASS_NAMES)
        self.num_classes = len(self.class_names)
        self.real_res = real_res
        self.val_fraction, self.val_seed = val_fraction, val_seed

    def random_per_class(self, seed: int, *, n: int = 1, res: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random train images of every class at ``res`` (class ``c``'s from (seed, c)), by class."""
        images, labels = load_digits_split("train", res=res, val_fraction=self.val_fraction, val_seed=self.val_seed)
        rows = []
        for c in range(self.num_classes):
            members = torch.nonzero(labels == c).flatten()
            order = torch.randperm(len(members), generator=generator(seed, "pick", c))
            rows.append(members[order[:n]])
        picked = torch.cat(rows)
        return images[picked], labels[picked]

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0,
                world_size: int = 1, num_streams: int = 8) -> Iterator[RealBatch]:
        """This rank's share of the global real batch of step ``start_step``, ``start_step + 1``, …"""
        shares, mine = stream_layout(batch_size, num_streams, rank, world_size, start_step)
        n = len(self.labels)
        if n < num_streams:
            raise ValueError(f"digits train has {n} samples, fewer than num_streams={num_streams}; lower "
                             "num_streams (config field real_streams)")
        first = [sum(shares[:v]) for v in range(num_streams)]
        active = [v for v in mine if shares[v]]
        positions = torch.cat([torch.arange(first[v], first[v] + shares[v]) for v in active] or
                              [torch.empty(0, dtype=torch.int64)])
        members = {v: torch.arange(v, n, num_streams) for v in active}
        return self._serve(members, shares, seed, start_step, positions)

    def _serve(self, members: dict[int, torch.Tensor], shares: list[int], seed: int, start_step: int,
               positions: torch.Tensor) -> Iterator[RealBatch]:
        epochs: dict[int, tuple[int, torch.Tensor]] = {}

        def order(v: int, epoch: int) -> torch.Tensor:  # the stream's samples in epoch ``epoch``'s order
            if epochs.get(v, (-1,))[0] != epoch:
                perm = torch.randperm(len(members[v]), generator=generator(seed, "real-order", v, epoch))
                epochs[v] = (epoch, members[v][perm])
            return epochs[v][1]

        for step in count(start_step):
            picks = [torch.empty(0, dtype=torch.int64)]
            for v, idx in members.items():
                i = torch.arange(step * shares[v], (step + 1) * shares[v])  # stream positions of this step
                for epoch in (i // len(idx)).unique().tolist():  # one epoch, or the end of one and a start
                    picks.append(order(v, epoch)[i[i // len(idx) == epoch] % len(idx)])
            take = torch.cat(picks)
            yield RealBatch(self.images[take], self.labels[take], positions.clone())


class ShardSource:
    """A WebDataset shard set (folder, URL, manifest or pattern) read through :class:`lgm_ray.shards.reader.ShardSet`.

    Args:
        root: the shard set's folder or URL prefix.
        real_res: side of the random crops (default: the size the shards were built at).
        num_workers: decode processes (the tars are read in this process); the batches do not depend on
            it.
    """

    def __init__(self, root: str, real_res: int | None = None, num_workers: int = 0) -> None:
        from lgm_ray.shards.reader import ShardSet

        self.shards = ShardSet(root)
        self.class_names = list(self.shards.class_names)
        self.num_classes = self.shards.num_classes
        self.real_res = real_res
        self.num_workers = num_workers

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0,
                world_size: int = 1, num_streams: int = 8) -> Iterator[RealBatch]:
        """This rank's share of the global real batch of step ``start_step``, ``start_step + 1``, …"""
        stream = self.shards.train_batches(batch_size, seed=seed, start_step=start_step, rank=rank,
                                           world_size=world_size, num_streams=num_streams,
                                           real_res=self.real_res, num_workers=self.num_workers)
        return (RealBatch(*b) for b in stream)

    def random_per_class(self, seed: int, *, n: int = 1, res: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random train images of every class, resized and centre-cropped to ``res``, by class."""
        images, labels = self.shards.random_per_class(seed, n=n, split="train", resize=res, crop=res)
        return images.float(), labels.long()


def open_source(spec: str, real_res: int | None = None, num_workers: int = 0) -> RealSource:
    """``"digits"`` → :class:`DigitsSource`; anything else → :class:`ShardSource`."""
    if spec == "digits":
        return DigitsSource(real_res or 32)
    return ShardSource(spec, real_res, num_workers)
