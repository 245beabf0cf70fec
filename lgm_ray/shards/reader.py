"""WebDataset shards for lgm_ray: the :class:`ShardSet` reader of a set (manifest, streams, passes).

A :class:`ShardSet` opens a set's manifest and serves its endless, deterministic training streams and
its ordered evaluation passes; :func:`open_manifest` finds the manifest of a set however it is given.

A set holds the splits ``train`` and ``test`` (possibly empty, with ``--test-fraction 0``), and ``val``
when one was held out of train (``--val-fraction``) or came from the source (a ``val/`` folder beside
``test/``, a ``validation`` split beside ``test``). Choices are made on ``val``; ``test`` is for the end.

Where a set is (``--shards``, :class:`ShardSet`'s ``root``): a folder or URL prefix holding
``manifest.json`` (built or indexed), a manifest file (``….json``), or shards lgm_ray did not write — a
brace or glob pattern (``DIR/train-{000000..000146}.tar``, ``pipe:…``, ``http(s)://…``, ``s3://…``) or a
folder of them — which is indexed in memory on every open (``index`` does it once).

:class:`ShardSet` is the face; the work is in the modules beside it: which samples each stream, rank and
pass reads in :mod:`lgm_ray.shards.stream` (whose docstring states the determinism policy), decoding and
the bad-sample handler in :mod:`lgm_ray.shards.decode`, what decoded tasks become for the caller in
:mod:`lgm_ray.shards.batches`, per-class access in :mod:`lgm_ray.shards.per_class`; the on-disk format and
its checks in :mod:`lgm_ray.shards.format` (whose docstring states the integrity policy), reading URLs and
tars in :mod:`lgm_ray.shards.io`. Writing lives in :mod:`lgm_ray.shards.build` (its sources in
:mod:`lgm_ray.shards.sources`), indexing in :mod:`lgm_ray.shards.index`, the full check of a set in
:mod:`lgm_ray.shards.verify`, and the command line, ``python -m lgm_ray.shards {build,index,verify}``, in
:mod:`lgm_ray.shards.__main__`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import chain
from typing import Any

import numpy as np
import torch

from lgm_ray.shards.batches import Batch, TrainBatch, empty_train, rebatch, train_output
from lgm_ray.shards.decode import (
    ON_BAD_SAMPLE,
    Decoder,
    EvalTask,
    SkipLog,
    SkippedSample,
    decode_pool,
    to_tensor,
)
from lgm_ray.shards.format import (
    MANIFEST_NAME,
    Layout,
    ShardError,
    entry_url,
    is_local,
    join,
    local_file_problems,
    rebuild_hint,
    split_counts,
    verify_hint,
)
from lgm_ray.shards.index import index_source
from lgm_ray.shards.io import load_manifest
from lgm_ray.shards.locate import is_pattern
from lgm_ray.shards.per_class import SampleIndex
from lgm_ray.shards.stream import (
    SHUFFLE_BUFFER,
    Reader,
    StreamPlan,
    batched,
    eval_plan,
    stream_layout,
    stream_plans,
    train_tasks,
)

__all__ = ["ShardSet", "open_manifest"]


def open_manifest(root: str) -> tuple[dict[str, Any], str]:
    """The manifest of a set given as ``--shards`` gives it, and the base its relative shard names are in.

    A folder or URL prefix holding ``manifest.json``, or a ``….json`` manifest file, is read; a shard
    pattern, or a local folder of shards without a manifest, is indexed in memory (see module doc).
    """
    if root.endswith(".json"):
        return load_manifest(root), root.rpartition("/")[0] or "."
    if is_pattern(root) or (is_local(root) and os.path.isdir(root)
                            and not os.path.isfile(join(root, MANIFEST_NAME))
                            and any(n.endswith((".tar", ".tar.gz", ".tgz")) or os.path.isdir(join(root, n))
                                    for n in os.listdir(root))):
        return index_source(root), root
    return load_manifest(root), root


class ShardSet:
    """A shard set: its manifest, endless training streams and ordered evaluation passes.

    Args:
        root: where the set is (module doc): a folder or URL prefix with ``manifest.json`` (``file://``,
            ``s3://``, ``gs://``, ``http(s)://`` … through fsspec, ``pipe:CMD`` through webdataset's gopen),
            a manifest file, or a shard pattern or folder of shards to index in memory.
        on_bad_sample: ``"raise"`` stops at the first undecodable image or bad label with a
            :class:`ShardError`; ``"skip"`` leaves such samples out (training fills their places, see
            :mod:`lgm_ray.shards.stream`), lists each once in :attr:`skipped` (shard, key, reason) and
            warns. Shard-level damage (bad tar, truncation, wrong size or count) always raises.

    Raises:
        ShardError: the manifest is missing, malformed or inconsistent, a class has no train samples, or,
            for local shards, a listed shard is missing or of the wrong size or an unlisted shard lies
            beside a built set's manifest.
    """

    def __init__(self, root: str, *, on_bad_sample: str = "raise") -> None:
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        self.root = os.fspath(root)
        self.manifest, self.base = open_manifest(self.root)
        if problems := local_file_problems(self.manifest, self.base):
            raise ShardError(f"shard set {self.root} does not match its manifest: {'; '.join(problems)}; "
                             f"{verify_hint(self.root)}, then {rebuild_hint(self.root)}")
        self.class_names: list[str] = list(self.manifest["class_names"])
        self.num_classes = len(self.class_names)
        self.image_size = int(self.manifest["image"]["short_side"])
        layout = Layout.of(self.manifest)
        self._skips = SkipLog(self.root, self.base, self.manifest)
        self.skipped: list[SkippedSample] = self._skips.skipped  # the log's list, filled as samples are skipped
        self._reader = Reader(self.root, self.base, self.manifest, layout)
        self._decoder = Decoder(self.root, layout, on_bad_sample)
        self._samples = SampleIndex(self._reader, self._decoder, self._skips, self.class_names)

    def count(self, split: str) -> int:
        """Number of samples of ``split`` in the manifest."""
        return sum(self._counts(split))

    def shard_urls(self, split: str) -> list[str]:
        """URLs (or paths) of the shards of ``split``, in manifest order (a shard split across two
        splits by an indexed validation carve is listed in both)."""
        self._counts(split)
        return [entry_url(self.base, e) for e in self.manifest["shards"] if e["split"] == split]

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0,
                      world_size: int = 1, num_streams: int = 8, real_res: int | None = None,
                      num_workers: int = 0, shuffle_buffer: int = SHUFFLE_BUFFER) -> Iterator[TrainBatch]:
        """This rank's share of the global training batch of step ``start_step``, ``start_step + 1``, …

        Yields ``(images B_r×3×R×R float in [0, 1], labels B_r, positions B_r)``. The rule (see
        :mod:`lgm_ray.distill.real_batches`): the train shards are dealt to ``num_streams`` virtual streams —
        shard ``i`` to stream ``i % num_streams`` when there are at least as many shards as streams, else sample
        ``j`` of the split (manifest order) to stream ``j % num_streams``. Each stream is an endless
        shuffled sequence (per-epoch unit order, a seeded shuffle buffer of ``shuffle_buffer`` samples
        over each unit, a random ``R``×``R`` crop of every image resized to short side ``R``), seeded by
        ``(seed, stream)``. Stream ``v`` gives the next ``batch_size // num_streams + (v < batch_size %
        num_streams)`` of its samples to every step; the global batch is the streams' shares in stream
        order, and ``positions`` are the yielded samples' places in it. Rank ``r`` reads streams ``r, r +
        world_size, …``, so the global batch, and each sample's position in it, depend on ``(seed, step,
        batch_size, num_streams, real_res, shuffle_buffer)`` and the data only: neither on ``world_size``
        nor on ``num_workers``. A start at step ``t`` finds each stream's place from the manifest's counts
        and passes over the samples before it in the tar stream without decoding them.

        Args:
            batch_size: size of the global batch (all ranks together); may be smaller than ``num_streams``
                (streams whose share is 0 read nothing; a rank whose streams all have 0 yields empty
                batches).
            seed: any integer; the streams' seeds are derived from it.
            start_step: the first step yielded.
            rank: this rank's index in ``[0, world_size)``.
            world_size: ranks sharing the batch; at most ``num_streams``.
            num_streams: virtual streams; fix it for a run (changing it changes every batch).
            real_res: ``R``; defaults to the set's short side (an indexed set: the median one).
            num_workers: decode processes (0: decode here). The tars are read here; each process holds
                up to 2 steps' samples in flight.
            shuffle_buffer: samples held per open unit to shuffle it (raw bytes, not decoded); a unit of
                at most this many samples is fully permuted. Memory: one buffer per stream of this rank.

        Raises:
            ValueError: bad arguments; ``world_size > num_streams``; fewer train samples than streams.
        """
        size, _ = self._sizes(real_res, None)
        if num_workers < 0 or shuffle_buffer < 1:
            raise ValueError(f"need num_workers ≥ 0 and shuffle_buffer ≥ 1, got {num_workers}, "
                             f"{shuffle_buffer}")
        shares, mine = stream_layout(batch_size, num_streams, rank, world_size, start_step)
        plans = self._stream_plans(num_streams)
        active = tuple((v, plans[v], shares[v]) for v in mine if shares[v])
        first = np.cumsum([0, *shares]).tolist()
        positions = torch.cat([torch.arange(first[v], first[v] + n) for v, _, n in active] or
                              [torch.empty(0, dtype=torch.int64)])
        if not active:
            return empty_train(size)
        tasks = train_tasks(self._reader, active, seed, start_step, size, shuffle_buffer)
        return train_output(decode_pool(self._decoder, tasks, num_workers), positions, self._skips)

    def _stream_plans(self, num_streams: int) -> list[StreamPlan]:
        """Every virtual stream's units (:func:`lgm_ray.shards.stream.stream_plans`)."""
        self._counts("train")
        return stream_plans(self.manifest, self.root, num_streams)

    def eval_batches(self, split: str = "test", batch_size: int = 256, *, rank: int = 0, world_size: int = 1,
                     resize: int | None = None, crop: int | None = None, num_workers: int = 0
                     ) -> Iterator[Batch]:
        """One ordered pass over this rank's part of ``split``: ``(images, labels, keys)`` batches.

        Images are resized to short side ``resize`` (default: the stored size) and centre-cropped to
        ``crop`` (default: ``resize``). With at least ``world_size`` shards, rank ``r`` reads shards ``r,
        r + world_size, …``; with fewer, every rank reads all shards and keeps the samples ``i`` (manifest
        order) with ``i % world_size == r``. Across ranks every sample comes exactly once; the last batch
        may be smaller. ``num_workers`` decode processes change nothing but the speed.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
        """
        size, crop = self._sizes(resize, crop)
        if batch_size < 1 or num_workers < 0:
            raise ValueError("need batch_size ≥ 1 and num_workers ≥ 0")
        self._counts(split)
        units = eval_plan(self.manifest, split, rank, world_size)
        items = chain.from_iterable(self._reader.unit_items(unit) for unit in units)
        tasks = (EvalTask(chunk, size, crop) for chunk in batched(items, batch_size))
        return rebatch(decode_pool(self._decoder, tasks, num_workers), batch_size, self._skips)

    def iter_split(self, split: str, *, resize: int | None = None, crop: int | None = None,
                   batch_size: int = 256) -> Iterator[Batch]:
        """All of ``split`` in order: :meth:`eval_batches` as rank 0 of 1."""
        return self.eval_batches(split, batch_size, resize=resize, crop=crop)

    def random_per_class(self, seed: int, *, n: int = 1, split: str = "train", resize: int | None = None,
                         crop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random images of every class, a function of ``seed``; centre crops, sorted by class.

        Returns:
            images float32 (C·n)×3×crop×crop in [0, 1]; labels int64 ``[0]*n + [1]*n + …``.
        """
        size, crop = self._sizes(resize, crop)
        self._counts(split)
        arrays = self._samples.random_per_class(seed, n, split, size, crop)
        return to_tensor(arrays, crop), torch.arange(self.num_classes).repeat_interleave(n)

    def class_images(self, cls: int, *, split: str = "train", resize: int | None = None,
                     crop: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """All images of class ``cls`` in ``split`` (centre crops, manifest order) and their keys."""
        if not 0 <= cls < self.num_classes:
            raise ValueError(f"cls must be in [0, {self.num_classes}), got {cls}")
        size, crop = self._sizes(resize, crop)
        self._counts(split)
        arrays, keys = self._samples.class_images(cls, split, size, crop)
        return to_tensor(arrays, crop), keys

    def _counts(self, split: str) -> list[int]:
        return split_counts(self.manifest, self.root, split)

    def _sizes(self, resize: int | None, crop: int | None) -> tuple[int, int]:
        size = resize or self.image_size
        crop = crop or size
        if not 1 <= crop <= size:
            raise ValueError(f"need 1 ≤ crop ≤ resize, got crop={crop}, resize={size}")
        return size, crop
