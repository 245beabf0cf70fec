"""WebDataset shards for lgm_ray: the :class:`ShardSet` streaming API and ``python -m lgm_ray.shards``.

    python -m lgm_ray.shards build digits --out shards/digits
    python -m lgm_ray.shards build imagefolder DIR --out shards/NAME [--real-res 256 --format jpg …]
    python -m lgm_ray.shards build hf DIR --out shards/NAME [--image-column image --label-column label]
    python -m lgm_ray.shards build … --val-fraction 0.1 [--val-seed 0]   # + a validation split
    python -m lgm_ray.shards verify shards/NAME

A set holds the splits ``train`` and ``test`` (possibly empty, with ``--test-fraction 0``), and ``val``
when one was held out of train (``--val-fraction``) or came from the source (a ``val/`` folder beside
``test/``, a ``validation`` split beside ``test``). Choices are made on ``val``; ``test`` is for the end.

Writing lives in :mod:`lgm_ray.shards_build`; the on-disk format, its checks and the decoding of units
in :mod:`lgm_ray.shards_stream` (whose docstring states the integrity and determinism policies).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from lgm_ray import shards_stream as core
from lgm_ray.shards_build import IMAGE_SUFFIXES, SOURCES, SPLITS, build
from lgm_ray.shards_stream import ShardError, SkippedSample

__all__ = ["ShardError", "ShardSet", "SkippedSample", "build", "main", "verify"]

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]
Ref = tuple[int, int]  # (index of the shard in the manifest, position of the sample in the shard)
SPLIT_FLAGS = {"train": "", "val": "--val-fraction 0.1", "test": "--test-fraction 0.1"}


class ShardSet:
    """A built shard set: its manifest, endless training streams and ordered evaluation passes.

    Args:
        root: local folder or URL prefix holding ``manifest.json`` and the shards: ``file://``, ``s3://``,
            ``gs://``, ``http(s)://`` … through fsspec, ``pipe:CMD`` through WebDataset's gopen.
        on_bad_sample: ``"raise"`` stops at the first undecodable image or bad label with a
            :class:`ShardError`; ``"skip"`` leaves such samples out, lists each once in :attr:`skipped`
            (shard, key, reason) and warns. Shard-level damage (wrong hash, bad tar) always raises.

    Raises:
        ShardError: the manifest is missing, malformed or inconsistent, a class has no train samples, or,
            for a local set, a listed shard is missing or of the wrong size or an unlisted shard lies beside.
    """

    def __init__(self, root: str, *, on_bad_sample: str = "raise") -> None:
        if on_bad_sample not in core.ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {core.ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        self.root = os.fspath(root)
        self.manifest: dict[str, Any] = core.load_manifest(self.root)
        if core.is_local(self.root) and (problems := core.local_file_problems(self.manifest, self.root)):
            raise ShardError(f"shard set {self.root} does not match its manifest: {'; '.join(problems)}; "
                             f"{core.verify_hint(self.root)}, then {core.rebuild_hint(self.root)}")
        self.class_names: list[str] = list(self.manifest["class_names"])
        self.num_classes = len(self.class_names)
        self.image_size = int(self.manifest["image"]["short_side"])
        self.skipped: list[SkippedSample] = []
        self._reader = core.Reader(self.root, self.manifest, on_bad_sample)
        self._index: dict[str, list[tuple[int, int, str, int]]] = {}

    def count(self, split: str) -> int:
        """Number of samples of ``split`` in the manifest."""
        return sum(self._counts(split))

    def shard_urls(self, split: str) -> list[str]:
        """URLs (or paths) of the shards of ``split``, in manifest order."""
        self._counts(split)
        return [core.join(self.root, e["name"]) for e in self.manifest["shards"] if e["split"] == split]

    def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0, rank: int = 0,
                      world_size: int = 1, num_streams: int = 8, real_res: int | None = None,
                      num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This rank's share of the global training batch of step ``start_step``, ``start_step + 1``, …

        Yields ``(images B_r×3×R×R float in [0, 1], labels B_r, positions B_r)``. The rule (see
        :mod:`lgm_ray.sources`): the train shards are dealt to ``num_streams`` virtual streams — shard
        ``i`` to stream ``i % num_streams`` when there are at least as many shards as streams, else sample
        ``j`` of the split (manifest order) to stream ``j % num_streams``. Each stream is an endless
        shuffled sequence (per-epoch unit order, per-unit sample order, a random ``R``×``R`` crop of every
        image resized to short side ``R``), seeded by ``(seed, stream)``. Stream ``v`` gives the next
        ``batch_size // num_streams + (v < batch_size % num_streams)`` of its samples to every step; the
        global batch is the streams' shares in stream order, and ``positions`` are the yielded samples'
        places in it. Rank ``r`` reads streams ``r, r + world_size, …``, so the global batch, and each
        sample's position in it, depend on ``(seed, step, batch_size, num_streams, real_res)`` and the
        data only: neither on ``world_size`` nor on ``num_workers``. A start at step ``t`` finds each
        stream's place from the manifest's counts and decodes only from the unit it lands in.

        Args:
            batch_size: size of the global batch (all ranks together); may be smaller than ``num_streams``
                (streams whose share is 0 read nothing; a rank whose streams all have 0 yields empty
                batches).
            seed: any integer; the streams' seeds are derived from it.
            start_step: the first step yielded.
            rank: this rank's index in ``[0, world_size)``.
            world_size: ranks sharing the batch; at most ``num_streams``.
            num_streams: virtual streams; fix it for a run (changing it changes every batch).
            real_res: ``R``; defaults to the size the shards were built at.
            num_workers: DataLoader processes decoding whole units (0: decode in this process). Each unit
                in flight holds ``count×3×R×R`` bytes; the first batch waits for one unit per stream of
                this rank, and the workers hold up to about one more per stream, decoded ahead.

        Raises:
            ValueError: bad arguments; ``world_size > num_streams``; fewer train samples than streams.
        """
        size, _ = self._sizes(real_res, None)
        if num_workers < 0:
            raise ValueError(f"need num_workers ≥ 0, got {num_workers}")
        shares, mine = core.stream_layout(batch_size, num_streams, rank, world_size, start_step)
        plans = self._stream_plans(num_streams)
        active = tuple((v, plans[v], shares[v]) for v in mine if shares[v])
        units = core.StreamUnits(active, seed, start_step, size)
        # Streams that start together need their next units together: let the workers hold one per stream.
        ahead = max(2, -(-len(active) // max(num_workers, 1)) + 1)
        decoded = core.decoded_units(self._reader, units, num_workers, ahead) if active else iter(())
        first = np.cumsum([0, *shares]).tolist()
        positions = torch.cat([torch.arange(first[v], first[v] + n) for v, _, n in active] or
                              [torch.empty(0, dtype=torch.int64)])
        return self._serve(zip(units, decoded, strict=False), active, size, positions)

    def _stream_plans(self, num_streams: int) -> list[core.StreamPlan]:
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

    def _serve(self, units_and_decoded: Iterator[tuple[core.Unit, core.Decoded]],
               active: tuple[tuple[int, core.StreamPlan, int], ...], size: int, positions: torch.Tensor
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Hand each decoded unit to its stream's queue and cut every step's shares off the queues."""
        queues: dict[int, deque[list[Any]]] = {v: deque() for v, _, _ in active}
        have = dict.fromkeys(queues, 0)
        empty_run = dict.fromkeys(queues, 0)
        units_of = {v: len(plan) for v, plan, _ in active}
        while True:
            parts = []
            for v, _, share in active:
                while have[v] < share:
                    unit, (_, images, labels, keys, skipped) = next(units_and_decoded)
                    self._note_skipped(skipped)
                    w = unit.stream
                    empty_run[w] = 0 if keys else empty_run[w] + 1
                    if empty_run[w] >= units_of[w]:
                        raise ShardError(f"a whole pass of virtual stream {w} over {self.root} gave no "
                                         f"decodable sample; {core.verify_hint(self.root)}")
                    if keys:
                        queues[w].append([images, labels, keys, 0])
                        have[w] += len(keys)
                parts.append(_pop(queues[v], share))
                have[v] -= share
            if parts:
                images = torch.cat([p[0] for p in parts]).float().div_(255.0)
                labels = torch.cat([p[1] for p in parts])
            else:
                images, labels = torch.empty((0, 3, size, size)), torch.empty(0, dtype=torch.int64)
            yield images, labels, positions.clone()

    def eval_batches(self, split: str = "test", batch_size: int = 256, *, rank: int = 0, world_size: int = 1,
                     resize: int | None = None, crop: int | None = None, num_workers: int = 0
                     ) -> Iterator[Batch]:
        """One ordered pass over this rank's part of ``split``: ``(images, labels, keys)`` batches.

        Images are resized to short side ``resize`` (default: the stored size) and centre-cropped to
        ``crop`` (default: ``resize``). With at least ``world_size`` shards, rank ``r`` reads shards ``r,
        r + world_size, …``; with fewer, every rank reads all shards and keeps the samples ``i`` (manifest
        order) with ``i % world_size == r``. Across ranks every sample comes exactly once; the last batch
        may be smaller.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
        """
        size, crop = self._sizes(resize, crop)
        if batch_size < 1 or num_workers < 0:
            raise ValueError("need batch_size ≥ 1 and num_workers ≥ 0")
        plan = self._plan(split, rank, world_size)
        units = [core.Unit(uid, *step, size, crop) for uid, step in enumerate(plan)]
        return self._rebatch(core.decoded_units(self._reader, units, num_workers), batch_size)

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
            order = np.random.default_rng([core.TAG_PICK, seed, c]).permutation(len(refs))
            queues.append([refs[i] for i in order])
        chosen: list[list[np.ndarray]] = [[] for _ in queues]
        cursor = [0] * len(queues)
        while True:  # a skipped sample is replaced by the class's next candidate in the next round
            wanted: dict[tuple[int, int], int] = {}
            for c, queue in enumerate(queues):
                take = queue[cursor[c]:cursor[c] + n - len(chosen[c])]
                if len(chosen[c]) < n and not take:
                    raise ShardError(f"class {self.class_names[c]!r} has fewer than n={n} decodable {split} "
                                     f"samples in {self.root}; {core.verify_hint(self.root)}")
                cursor[c] += len(take)
                wanted.update(dict.fromkeys(take, c))
            if not wanted:
                break
            for ref, array in self._fetch(list(wanted), size, crop).items():
                if array is not None:
                    chosen[wanted[ref]].append(array)
        labels = torch.arange(self.num_classes).repeat_interleave(n)
        return core.to_tensor([a for arrays in chosen for a in arrays], crop), labels

    def class_images(self, cls: int, *, split: str = "train", resize: int | None = None,
                     crop: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """All images of class ``cls`` in ``split`` (centre crops, manifest order) and their keys."""
        if not 0 <= cls < self.num_classes:
            raise ValueError(f"cls must be in [0, {self.num_classes}), got {cls}")
        size, crop = self._sizes(resize, crop)
        rows = [(s, p, k) for s, p, k, label in self._index_of(split) if label == cls]
        got = self._fetch([(s, p) for s, p, _ in rows], size, crop)
        kept = [(got[s, p], k) for s, p, k in rows if got[s, p] is not None]
        return core.to_tensor([a for a, _ in kept], crop), [k for _, k in kept]

    def _counts(self, split: str) -> list[int]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        if split not in self.manifest["counts"]:
            have = ", ".join(self.manifest["counts"])
            raise ValueError(f"{self.root} has no split {split!r} (it has {have}); "
                             f"re-build it with `python -m lgm_ray.shards build SOURCE --out {self.root} "
                             f"--overwrite {SPLIT_FLAGS[split]}` to hold one out of train")
        return self.manifest["counts"][split]

    def _sizes(self, resize: int | None, crop: int | None) -> tuple[int, int]:
        size = resize or self.image_size
        crop = crop or size
        if not 1 <= crop <= size:
            raise ValueError(f"need 1 ≤ crop ≤ resize, got crop={crop}, resize={size}")
        return size, crop

    def _plan(self, split: str, rank: int, world_size: int) -> list[tuple[int, int, int, int]]:
        """This rank's (shard index, first sample's index in the split, stride, phase) in manifest order."""
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

    def _rebatch(self, decoded: Iterable[core.Decoded], batch_size: int) -> Iterator[Batch]:
        queue: deque[list[Any]] = deque()
        have = 0
        for _, images, labels, keys, skipped in decoded:
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
        """(shard index, position, key, label) of every sample of ``split``, read once and cached."""
        self._counts(split)
        if split not in self._index:
            rows = []
            for i, entry in enumerate(self.manifest["shards"]):
                if entry["split"] != split:
                    continue
                for pos, (key, parts) in enumerate(self._reader.samples(i)):
                    try:
                        rows.append((i, pos, key, core.parse_label(parts, key, self.num_classes)))
                    except core.BadSample as bad:
                        self._note_skipped([self._reader.bad(core.join(self.root, entry["name"]), bad)])
            self._index[split] = rows
        return self._index[split]

    def _class_refs(self, split: str) -> list[list[tuple[int, int]]]:
        refs: list[list[tuple[int, int]]] = [[] for _ in range(self.num_classes)]
        for shard, pos, _, label in self._index_of(split):
            refs[label].append((shard, pos))
        return refs

    def _fetch(self, refs: list[Ref], size: int, crop: int) -> dict[Ref, np.ndarray | None]:
        """Centre crops of chosen (shard, position) samples, one read per shard; None where skipped."""
        by_shard: dict[int, list[int]] = defaultdict(list)
        for shard, pos in refs:
            by_shard[shard].append(pos)
        out: dict[Ref, np.ndarray | None] = {}
        for shard in sorted(by_shard):
            entry = self.manifest["shards"][shard]
            samples = self._reader.samples(shard)
            for pos in by_shard[shard]:
                try:
                    img, _ = core.decode_sample(samples[pos], self._reader.encoding, self.num_classes)
                    out[shard, pos] = core.crop_array(core.resize_short(img, size), crop)
                except core.BadSample as bad:
                    self._note_skipped([self._reader.bad(core.join(self.root, entry["name"]), bad)])
                    out[shard, pos] = None
        return {ref: out[ref] for ref in refs}

    def _note_skipped(self, skipped: list[SkippedSample]) -> None:
        for s in skipped:
            if all((s.shard, s.key) != (t.shard, t.key) for t in self.skipped):
                self.skipped.append(s)
                warnings.warn(f"skipped a bad sample: shard {s.shard}, key {s.key}: {s.reason}",
                              stacklevel=4)


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


def verify(root: str, *, on_bad_sample: str = "raise") -> tuple[list[str], list[str], str]:
    """Check every shard's size, sha256 and sample count, decode every sample, and recount the classes.

    Args:
        root: the shard set's folder or URL prefix.
        on_bad_sample: with ``"skip"``, undecodable samples and bad labels are reported as tolerated
            (what a skipping :class:`ShardSet` would leave out) instead of as problems.

    Returns:
        ``(problems, tolerated, summary)``; the set is sound when ``problems`` is empty.

    Raises:
        ShardError: the manifest itself is missing or unusable.
    """
    root = os.fspath(root)
    m = core.load_manifest(root)
    local = core.is_local(root)
    problems = core.local_file_problems(m, root) if local else []
    tolerated: list[str] = []
    sink = tolerated if on_bad_sample == "skip" else problems
    enc, n_classes, size = m["image"]["encoding"], len(m["class_names"]), int(m["image"]["short_side"])
    found = {split: [0] * n_classes for split in m["counts"]}
    damaged: set[str] = set()
    for entry in m["shards"]:
        url, split = core.join(root, entry["name"]), entry["split"]
        before = len(problems) + len(tolerated)
        samples: list[tuple[str, dict[str, bytes]]] = []
        try:
            data = core.read_bytes(url)
        except Exception as e:  # each transport has its own errors; a missing local shard is already listed
            if not (local and not os.path.isfile(url)):
                problems.append(f"shard {url} cannot be read ({type(e).__name__}: {e})")
        else:
            problem = core.shard_bytes_problem(data, entry)
            if problem and not (local and len(data) != entry["bytes"]):  # a wrong size is listed already
                problems.append(f"shard {url} {problem}")
            try:
                samples = core.parse_tar(data, url)
            except ShardError as e:
                problems.append(str(e))
            if samples and len(samples) != entry["count"]:
                problems.append(f"shard {url} holds {len(samples)} samples, manifest: {entry['count']}")
        for sample in samples:
            try:
                img, label = core.decode_sample(sample, enc, n_classes)
            except core.BadSample as bad:
                sink.append(f"shard {url}, key {bad.key}: {bad.reason}")
                continue
            if min(img.size) != size:
                problems.append(f"shard {url}, key {sample[0]}: short side {min(img.size)}, manifest: {size}")
            found[split][label] += 1
        if len(problems) + len(tolerated) > before:
            damaged.add(split)
    for split, expected in m["counts"].items():
        if split not in damaged and found[split] != list(expected):
            problems.append(f"split {split}: the shards hold per-class counts {found[split]}, "
                            f"the manifest says {list(expected)}")
    totals = ", ".join(f"{split} {sum(c)}" for split, c in m["counts"].items())
    summary = f"{root}: {len(m['shards'])} shards, {n_classes} classes, samples: {totals}"
    return problems, tolerated, summary


def main(argv: list[str] | None = None) -> int:
    """``python -m lgm_ray.shards {build,verify}``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lgm_ray.shards", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="encode a source into shards and a manifest")
    b.add_argument("source", choices=SOURCES)
    b.add_argument("path", nargs="?", help="DIR, for imagefolder (class sub-folders, or train/ and test/ "
                   f"holding them; images {' '.join(IMAGE_SUFFIXES)}) and hf (saved with save_to_disk)")
    b.add_argument("--out", help="output folder (default: shards/SOURCE or shards/<DIR's name>)")
    b.add_argument("--real-res", type=int, help="stored short side in pixels (default 256; digits 32)")
    b.add_argument("--format", choices=core.IMAGE_FORMATS, help="encoding (default jpg; digits png)")
    b.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    b.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    b.add_argument("--test-fraction", type=float, default=0.1, help="held out if no test split (default 0.1)")
    b.add_argument("--split-seed", type=int, default=0, help="seed of that split and of the shard shuffle")
    b.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of every class's train images as split 'val' (default 0: "
                   "none; at least 1 per class, at least 1 left for training)")
    b.add_argument("--val-seed", type=int, default=0, help="seed of the validation split (default 0)")
    b.add_argument("--image-column", default="image", help="hf: image column (default image)")
    b.add_argument("--label-column", default="label", help="hf: label column (default label)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out, once built")
    b.add_argument("--on-bad-sample", choices=core.ON_BAD_SAMPLE, default="raise",
                   help="skip: leave out undecodable source images (listed in the manifest)")
    v = sub.add_parser("verify", help="check hashes and counts and decode every sample")
    v.add_argument("root", help="shard set folder or URL prefix")
    v.add_argument("--on-bad-sample", choices=core.ON_BAD_SAMPLE, default="raise",
                   help="skip: report bad samples, and pass if nothing else is wrong")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            name = os.path.basename(os.path.normpath(args.path or args.source))
            build(args.source, args.path, out=args.out or os.path.join("shards", name),
                  real_res=args.real_res, fmt=args.format, quality=args.quality, shard_size=args.shard_size,
                  workers=args.workers, test_fraction=args.test_fraction, split_seed=args.split_seed,
                  val_fraction=args.val_fraction, val_seed=args.val_seed,
                  overwrite=args.overwrite, on_bad_sample=args.on_bad_sample, image_column=args.image_column,
                  label_column=args.label_column, command=sys.argv[1:] if argv is None else argv)
            return 0
        problems, tolerated, summary = verify(args.root, on_bad_sample=args.on_bad_sample)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        parser.error(str(e))
    for line in tolerated:
        print(f"skipped: {line}", file=sys.stderr)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"FAILED {summary}: {len(problems)} problems; {core.rebuild_hint(args.root)}", file=sys.stderr)
        return 1
    print(f"OK {summary}; sizes, sha256 and counts match, every sample decodes"
          + (f", {len(tolerated)} bad samples tolerated" if tolerated else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
