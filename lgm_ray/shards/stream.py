"""The virtual streams under :class:`~lgm_ray.shards.reader.ShardSet`: which samples a stream and rank read.

A *unit* (:class:`Unit`) is one manifest entry (a shard, or the part of a shard in one split), or a slice
of it, read once: in file order with centre crops for an evaluation pass, or through a seeded shuffle
buffer with random crops for training. Training units belong to virtual streams; :func:`stream_layout`
gives each stream's share of a global batch and the streams a rank reads, :func:`stream_plans` each
stream's units, :func:`eval_plan` a rank's units of an ordered pass. :class:`Reader` turns a unit, or a
stream epoch after epoch, into undecoded items, and :func:`train_tasks` a rank's streams into one task
per step, for :mod:`lgm_ray.shards.decode` to decode. No shard is ever held whole: memory is the shuffle
buffer (raw samples) per open stream plus the decode pool's tasks in flight.

Determinism: training units belong to a virtual stream (see :mod:`lgm_ray.distill.real_batches` for the
rule that deals streams to ranks); a stream's unit order, the shuffle of each unit (a ``shuffle_buffer``-sample buffer
seeded by the unit) and every random crop come from seeds of ``(seed, stream, epoch, shard)`` alone. The
reader builds each step's task in the main process; the decode pool returns tasks in order, so batches
depend neither on ``num_workers`` nor on how many ranks share the streams. A stream starting at step ``t``
finds its unit from the manifest's counts and skips the samples before its place in the tar stream without
decoding them. Under ``on_bad_sample="skip"`` a bad training sample's place is taken by the next decodable
sample of its stream (from that step's share or a few samples beyond it, see :data:`SPARES`), cropped at
the bad sample's place: batches keep their size and stay a function of ``(seed, step)``.

The manifest and its checks live in :mod:`lgm_ray.shards.format`, opening URLs and streaming a tar's
samples in :mod:`lgm_ray.shards.io`.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any

import numpy as np
from webdataset import filters as wds_filters

from lgm_ray.core.seeds import derive_seed
from lgm_ray.shards.decode import Item, TrainTask
from lgm_ray.shards.format import Layout, ShardError, entry_url, rebuild_hint, verify_hint
from lgm_ray.shards.io import ReadStats, members_of, shard_samples

TAG_PICK = 3  # a domain tag keeps random_per_class's draws apart from other uses of one user seed
SHUFFLE_BUFFER = 1000  # samples per training unit's shuffle buffer: a full permutation of built shards
SPARES = 2  # samples beyond a step's share that a bad sample's place may be filled from


@dataclass(frozen=True)
class Unit:
    """One manifest entry read in one pass: keep its samples q with (offset + q) % stride == phase.

    With ``seed``, the kept samples go through a shuffle buffer and get random crops, and the first
    ``skip`` of the shuffled order are passed over without being decoded (a stream that starts inside).
    """

    entry: int
    offset: int
    stride: int
    phase: int
    seed: int | None = None  # None: file order and centre crops
    skip: int = 0


StreamPlan = tuple[tuple[int, int, int, int, int], ...]  # units: (entry, offset, stride, phase, samples)
ActiveStream = tuple[int, StreamPlan, int]  # (stream, its units, its share of every step)


def stream_layout(batch_size: int, num_streams: int, rank: int, world_size: int, start_step: int = 0
                  ) -> tuple[list[int], list[int]]:
    """Each virtual stream's share of a global batch, and the streams that rank ``rank`` reads.

    Stream ``v`` gives ``batch_size // num_streams + (v < batch_size % num_streams)`` samples per step;
    rank ``r`` of ``world_size`` reads streams ``r, r + world_size, …``.

    Raises:
        ValueError: a bad argument, or more ranks than streams (a rank would get no stream at all).
    """
    if batch_size < 1 or num_streams < 1 or start_step < 0:
        raise ValueError(f"need batch_size ≥ 1, num_streams ≥ 1 and start_step ≥ 0, got batch_size="
                         f"{batch_size}, num_streams={num_streams}, start_step={start_step}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 ≤ rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size > num_streams:
        raise ValueError(f"world_size={world_size} ranks cannot share num_streams={num_streams} virtual "
                         f"streams (each rank reads whole streams); raise num_streams (config field "
                         f"real_streams) to at least {world_size}")
    base, extra = divmod(batch_size, num_streams)
    return [base + (v < extra) for v in range(num_streams)], list(range(rank, num_streams, world_size))


def stream_plans(manifest: dict[str, Any], root: str, num_streams: int) -> list[StreamPlan]:
    """Every virtual stream's units: whole train shards dealt round-robin, or every shard sliced by stride.

    Raises:
        ValueError: fewer train samples than streams.
    """
    shards, offset = [], 0
    for i, entry in enumerate(manifest["shards"]):
        if entry["split"] == "train":
            shards.append((i, offset, entry["count"]))
            offset += entry["count"]
    if offset < num_streams:
        raise ValueError(f"{root} has {offset} train samples, fewer than num_streams={num_streams}; "
                         f"lower num_streams (config field real_streams) to at most {offset}")
    if len(shards) >= num_streams:
        return [tuple((i, off, 1, 0, n) for i, off, n in shards[v::num_streams])
                for v in range(num_streams)]
    return [tuple((i, off, num_streams, v, n_v) for i, off, n in shards
                  if (n_v := len(range((v - off) % num_streams, n, num_streams))))
            for v in range(num_streams)]


def eval_plan(manifest: dict[str, Any], split: str, rank: int, world_size: int) -> list[Unit]:
    """This rank's units of an ordered pass over ``split``, in manifest order: every ``world_size``-th
    shard from ``rank``, or, with fewer shards than ranks, every shard's samples ``i % world_size == rank``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 ≤ rank < world_size, got rank={rank}, world_size={world_size}")
    shards, offset = [], 0
    for i, entry in enumerate(manifest["shards"]):
        if entry["split"] == split:
            shards.append((i, offset))
            offset += entry["count"]
    if len(shards) >= world_size:
        return [Unit(i, off, 1, 0) for i, off in shards[rank::world_size]]
    return [Unit(i, off, world_size, rank) for i, off in shards]


class Reader:
    """Streams a set's entries and units as items for the decode pool (runs where the tasks are built)."""

    def __init__(self, root: str, base: str, manifest: dict[str, Any], layout: Layout) -> None:
        self.root, self.base, self.manifest, self.layout = root, base, manifest, layout
        self._positions: dict[int, dict[int, int]] = {}

    def url(self, entry: int) -> str:
        return entry_url(self.base, self.manifest["shards"][entry])

    def entry_samples(self, entry: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(q, sample)`` for the entry's samples in tar order; checks size and count at the end."""
        e = self.manifest["shards"][entry]
        url, expected = self.url(entry), int(e.get("tar_samples", e["count"]))
        where = None
        if "positions" in e:
            if entry not in self._positions:
                self._positions[entry] = {int(p): q for q, p in enumerate(e["positions"])}
            where = self._positions[entry]
        stats = ReadStats()
        for p, sample in enumerate(shard_samples(url, self.layout.members, stats=stats,
                                                 hint=rebuild_hint(self.root))):
            q = p if where is None else where.get(p)
            if q is not None:
                yield q, sample
        if stats.bytes != e["bytes"]:
            raise ShardError(f"shard {url} has {stats.bytes} bytes, the manifest says {e['bytes']} (truncated "
                             f"or replaced); {verify_hint(self.root)}, then {rebuild_hint(self.root)}")
        if stats.samples != expected:
            raise ShardError(f"shard {url} holds {stats.samples} samples, the manifest says {expected}; "
                             f"{rebuild_hint(self.root)}")

    def unit_items(self, unit: Unit, bufsize: int = SHUFFLE_BUFFER) -> Iterator[Item]:
        """The unit's samples as items: file order and centre crops, or shuffled with random crops."""
        url = self.url(unit.entry)
        kept = (s for q, s in self.entry_samples(unit.entry) if (unit.offset + q) % unit.stride == unit.phase)
        if unit.seed is None:
            for s in kept:
                yield s["__key__"], url, members_of(s), None, None
            return
        n = int(self.manifest["shards"][unit.entry]["count"])
        crops = np.random.default_rng(unit.seed).random((len(range((unit.phase - unit.offset) % unit.stride,
                                                                   n, unit.stride)), 2))
        shuffled = wds_filters.shuffle(bufsize, bufsize, rng=random.Random(unit.seed))(kept)
        for j, s in enumerate(shuffled):
            if j >= unit.skip:  # the samples before a stream's start are read, never decoded
                yield s["__key__"], url, members_of(s), float(crops[j, 0]), float(crops[j, 1])

    def stream_items(self, v: int, plan: StreamPlan, share: int, seed: int, start_step: int,
                     bufsize: int) -> Iterator[Item]:
        """Virtual stream ``v`` from its place at step ``start_step``: endless, epoch after epoch.

        Every epoch visits the stream's units in an order seeded by ``(seed, v, epoch)``; the first unit
        is the one holding stream position ``start_step * share``, found from the counts alone.
        """
        total = sum(n for *_, n in plan)
        start = start_step * share
        for epoch in count(start // total):
            order = np.random.default_rng(derive_seed(seed, "real-order", v, epoch)).permutation(len(plan))
            first = epoch * total  # stream position of the unit's first sample
            for k in order:
                entry, offset, stride, phase, n = plan[k]
                if first + n > start:
                    unit = Unit(entry, offset, stride, phase, derive_seed(seed, "real-unit", v, epoch, entry),
                                max(0, start - first))
                    yield from self.unit_items(unit, bufsize)
                first += n


def train_tasks(reader: Reader, active: Iterable[ActiveStream], seed: int, start_step: int, size: int,
                shuffle_buffer: int) -> Iterator[TrainTask]:
    """One :class:`~lgm_ray.shards.decode.TrainTask` per step from ``start_step`` on: each active stream's
    share of the step, and the :data:`SPARES` samples after it."""
    streams = [(v, share, Lookahead(reader.stream_items(v, plan, share, seed, start_step, shuffle_buffer)))
               for v, plan, share in active]
    for step in count(start_step):
        yield TrainTask([(v, s.take(share), s.peek(SPARES)) for v, share, s in streams], size, step)


class Lookahead:
    """An iterator that can hand out its next items and peek at the ones after them."""

    def __init__(self, items: Iterator[Item]) -> None:
        self.items, self.buffer = items, deque[Item]()

    def _fill(self, n: int) -> None:
        while len(self.buffer) < n:
            self.buffer.append(next(self.items))

    def take(self, n: int) -> list[Item]:
        self._fill(n)
        return [self.buffer.popleft() for _ in range(n)]

    def peek(self, n: int) -> list[Item]:
        self._fill(n)
        return [self.buffer[i] for i in range(n)]


def batched(items: Iterable[Item], n: int) -> Iterator[list[Item]]:
    """Consecutive lists of ``n`` items (the last may be shorter)."""
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
