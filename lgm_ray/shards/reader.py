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

The command line, ``python -m lgm_ray.shards {build,index,verify}``, and the full check of a set
(:func:`lgm_ray.shards.__main__.verify`) live in :mod:`lgm_ray.shards.__main__`; this module's ``__main__`` block
runs it, so the documented command is unchanged. Writing lives in :mod:`lgm_ray.shards.build` (its sources in
:mod:`lgm_ray.shards.sources`), indexing in :mod:`lgm_ray.shards.index`; the on-disk format and its checks
in :mod:`lgm_ray.shards.format` (whose docstring states the integrity policy), reading URLs and tars in :mod:`lgm_ray.shards.io`, decoding in
:mod:`lgm_ray.shards.decode`, and the virtual streams in :mod:`lgm_ray.shards.stream` (whose docstring
states the determinism policy).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from itertools import chain, count
from typing import Any

import numpy as np
import torch

from lgm_ray.shards.decode import (
    ON_BAD_SAMPLE,
    BadSample,
    Decoded,
    Decoder,
    EvalTask,
    SkippedSample,
    TrainTask,
    crop_array,
    decode_pool,
    parse_label,
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
    verify_hint,
)
from lgm_ray.shards.index import index_source
from lgm_ray.shards.io import load_manifest, members_of
from lgm_ray.shards.locate import is_pattern
from lgm_ray.shards.sources import SPLITS
from lgm_ray.shards.stream import (
    SHUFFLE_BUFFER,
    SPARES,
    TAG_PICK,
    Lookahead,
    Reader,
    StreamPlan,
    Unit,
    batched,
    stream_layout,
)

__all__ = ["ShardSet", "open_manifest"]

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]
Ref = tuple[int, int]  # (index of the entry in the manifest, position of the sample in the entry)
SPLIT_FLAGS = {"train": "", "val": "--val-fraction 0.1", "test": "--test-fraction 0.1"}


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
        self.skipped: list[SkippedSample] = []
        self._bad_keys: dict[str, set[str]] = defaultdict(set)
        layout = Layout.of(self.manifest)
        self._reader = Reader(self.root, self.base, self.manifest, layout)
        self._decoder = Decoder(self.root, layout, on_bad_sample)
        self._index: dict[str, list[tuple[int, int, str, int]]] = {}

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
                      num_workers: int = 0, shuffle_buffer: int = SHUFFLE_BUFFER
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This rank's share of the global training batch of step ``start_step``, ``start_step + 1``, …

        Yields ``(images B_r×3×R×R float in [0, 1], labels B_r, positions B_r)``. The rule (see
        :mod:`lgm_ray.distill.real_batches`): the train shards are dealt to ``num_streams`` virtual streams — shard
        ``i`` to stream ``i % num_streams`` when there are at least as many shards as streams, else sample
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
            raise ValueError(f"need num_workers ≥ 0 and shuffle_buffer ≥ 1, got {num_workers}, {shuffle_buffer}")
        shares, mine = stream_layout(batch_size, num_streams, rank, world_size, start_step)
        plans = self._stream_plans(num_streams)
        active = tuple((v, plans[v], shares[v]) for v in mine if shares[v])
        first = np.cumsum([0, *shares]).tolist()
        positions = torch.cat([torch.arange(first[v], first[v] + n) for v, _, n in active] or
                              [torch.empty(0, dtype=torch.int64)])
        if not active:
            return self._empty(size)
        tasks = self._train_tasks(active, seed, start_step, size, shuffle_buffer)
        return self._serve(decode_pool(self._decoder, tasks, num_workers), positions)

    def _train_tasks(self, active: tuple[tuple[int, StreamPlan, int], ...], seed: int, start_step: int,
                     size: int, shuffle_buffer: int) -> Iterator[TrainTask]:
        streams = [(v, share, Lookahead(self._reader.stream_items(v, plan, share, seed, start_step,
                                                                       shuffle_buffer)))
                   for v, plan, share in active]
        for step in count(start_step):
            yield TrainTask([(v, s.take(share), s.peek(SPARES)) for v, share, s in streams], size, step)

    def _stream_plans(self, num_streams: int) -> list[StreamPlan]:
        """Every virtual stream's units: whole shards dealt round-robin, or every shard sliced by stride."""
        self._counts("train")
        shards, offset = [], 0
        for i, entry in enumerate(self.manifest["shards"]):
            if entry["split"] == "train":
                shards.append((i, offset, entry["count"]))
                offset += entry["count"]
        if offset < num_streams:
            raise ValueError(f"{self.root} has {offset} train samples, fewer than num_streams={num_streams}; "
                             f"lower num_streams (config field real_streams) to at most {offset}")
        if len(shards) >= num_streams:
            return [tuple((i, off, 1, 0, n) for i, off, n in shards[v::num_streams])
                    for v in range(num_streams)]
        return [tuple((i, off, num_streams, v, n_v) for i, off, n in shards
                      if (n_v := len(range((v - off) % num_streams, n, num_streams))))
                for v in range(num_streams)]

    def _serve(self, decoded: Iterator[Decoded], positions: torch.Tensor
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, labels, _, skipped in decoded:
            self._note_skipped(skipped)
            yield images.float().div_(255.0), labels, positions.clone()

    @staticmethod
    def _empty(size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            yield (torch.empty((0, 3, size, size)), torch.empty(0, dtype=torch.int64),
                   torch.empty(0, dtype=torch.int64))

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
        plan = self._plan(split, rank, world_size)
        items = chain.from_iterable(self._reader.unit_items(Unit(*step)) for step in plan)
        tasks = (EvalTask(chunk, size, crop) for chunk in batched(items, batch_size))
        return self._rebatch(decode_pool(self._decoder, tasks, num_workers), batch_size)

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
        queues = []
        for c, refs in enumerate(self._class_refs(split)):
            if len(refs) < n:
                raise ValueError(f"class {self.class_names[c]!r} has only {len(refs)} {split} samples, n={n}")
            order = np.random.default_rng([TAG_PICK, seed, c]).permutation(len(refs))
            queues.append([refs[i] for i in order])
        chosen: list[list[np.ndarray]] = [[] for _ in queues]
        cursor = [0] * len(queues)
        while True:  # a skipped sample is replaced by the class's next candidate in the next round
            wanted: dict[tuple[int, int], int] = {}
            for c, queue in enumerate(queues):
                take = queue[cursor[c]:cursor[c] + n - len(chosen[c])]
                if len(chosen[c]) < n and not take:
                    raise ShardError(f"class {self.class_names[c]!r} has fewer than n={n} decodable {split} "
                                     f"samples in {self.root}; {verify_hint(self.root)}")
                cursor[c] += len(take)
                wanted.update(dict.fromkeys(take, c))
            if not wanted:
                break
            for ref, array in self._fetch(list(wanted), size, crop).items():
                if array is not None:
                    chosen[wanted[ref]].append(array)
        labels = torch.arange(self.num_classes).repeat_interleave(n)
        return to_tensor([a for arrays in chosen for a in arrays], crop), labels

    def class_images(self, cls: int, *, split: str = "train", resize: int | None = None,
                     crop: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """All images of class ``cls`` in ``split`` (centre crops, manifest order) and their keys."""
        if not 0 <= cls < self.num_classes:
            raise ValueError(f"cls must be in [0, {self.num_classes}), got {cls}")
        size, crop = self._sizes(resize, crop)
        rows = [(s, p, k) for s, p, k, label in self._index_of(split) if label == cls]
        got = self._fetch([(s, p) for s, p, _ in rows], size, crop)
        kept = [(got[s, p], k) for s, p, k in rows if got[s, p] is not None]
        return to_tensor([a for a, _ in kept], crop), [k for _, k in kept]

    def _counts(self, split: str) -> list[int]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        if split not in self.manifest["counts"]:
            have = ", ".join(self.manifest["counts"])
            raise ValueError(f"{self.root} has no split {split!r} (it has {have}); "
                             f"re-build it with `python -m lgm_ray.shards build SOURCE --out {self.root} "
                             f"--overwrite {SPLIT_FLAGS[split]}` (or re-index it with `python -m "
                             f"lgm_ray.shards.reader index` and --test SOURCE or --val-fraction) to hold one out")
        return self.manifest["counts"][split]

    def _sizes(self, resize: int | None, crop: int | None) -> tuple[int, int]:
        size = resize or self.image_size
        crop = crop or size
        if not 1 <= crop <= size:
            raise ValueError(f"need 1 ≤ crop ≤ resize, got crop={crop}, resize={size}")
        return size, crop

    def _plan(self, split: str, rank: int, world_size: int) -> list[tuple[int, int, int, int]]:
        """This rank's (entry index, first sample's index in the split, stride, phase) in manifest order."""
        self._counts(split)
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 ≤ rank < world_size, got rank={rank}, world_size={world_size}")
        shards, offset = [], 0
        for i, entry in enumerate(self.manifest["shards"]):
            if entry["split"] == split:
                shards.append((i, offset))
                offset += entry["count"]
        if len(shards) >= world_size:
            return [(i, off, 1, 0) for i, off in shards[rank::world_size]]
        return [(i, off, world_size, rank) for i, off in shards]

    def _rebatch(self, decoded: Iterable[Decoded], batch_size: int) -> Iterator[Batch]:
        queue: deque[list[Any]] = deque()
        have = 0
        for images, labels, keys, skipped in decoded:
            self._note_skipped(skipped)
            if keys:
                queue.append([images, labels, keys, 0])
                have += len(keys)
            while have >= batch_size:
                yield _take(queue, batch_size)
                have -= batch_size
        if have:
            yield _take(queue, have)

    def _index_of(self, split: str) -> list[tuple[int, int, str, int]]:
        """(entry index, position, key, label) of every sample of ``split``, read once and cached."""
        self._counts(split)
        if split not in self._index:
            rows = []
            for i, entry in enumerate(self.manifest["shards"]):
                if entry["split"] != split:
                    continue
                for pos, sample in self._reader.entry_samples(i):
                    key = sample["__key__"]
                    try:
                        rows.append((i, pos, key, parse_label(members_of(sample), key,
                                                                    self._reader.layout)))
                    except BadSample as bad:
                        self._note_skipped([self._decoder.bad(self._reader.url(i), bad)])
            self._index[split] = rows
        return self._index[split]

    def _class_refs(self, split: str) -> list[list[tuple[int, int]]]:
        refs: list[list[tuple[int, int]]] = [[] for _ in range(self.num_classes)]
        for shard, pos, _, label in self._index_of(split):
            refs[label].append((shard, pos))
        return refs

    def _fetch(self, refs: list[Ref], size: int, crop: int) -> dict[Ref, np.ndarray | None]:
        """Centre crops of chosen (entry, position) samples, one streamed read per entry; None where bad."""
        by_entry: dict[int, set[int]] = defaultdict(set)
        for entry, pos in refs:
            by_entry[entry].add(pos)
        out: dict[Ref, np.ndarray | None] = {}
        for entry in sorted(by_entry):
            wanted, url = by_entry[entry], self._reader.url(entry)
            for pos, sample in self._reader.entry_samples(entry):
                if pos not in wanted:
                    continue
                item = (sample["__key__"], url, members_of(sample), None, None)
                try:
                    out[entry, pos] = crop_array(self._decoder.image(item, size)[0], crop)
                except BadSample as bad:
                    self._note_skipped([self._decoder.bad(url, bad)])
                    out[entry, pos] = None
        return {ref: out[ref] for ref in refs}

    def _note_skipped(self, skipped: list[SkippedSample]) -> None:
        for s in skipped:
            bad = self._bad_keys[s.shard]
            if s.key in bad:
                continue
            bad.add(s.key)
            self.skipped.append(s)
            warnings.warn(f"skipped a bad sample: shard {s.shard}, key {s.key}: {s.reason}", stacklevel=4)
            total = sum(int(e["count"]) for e in self.manifest["shards"]
                        if entry_url(self.base, e) == s.shard)
            if len(bad) >= total:
                raise ShardError(f"shard {s.shard}: none of its {total} samples decodes (e.g. key {s.key}: "
                                 f"{s.reason}); {verify_hint(self.root)}, then fix or drop that shard "
                                 f"({rebuild_hint(self.root)})")


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
