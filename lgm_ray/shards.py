"""WebDataset shards for lgm_ray: the :class:`ShardSet` streaming API and ``python -m lgm_ray.shards``.

    python -m lgm_ray.shards build digits --out shards/digits
    python -m lgm_ray.shards build imagefolder DIR --out shards/NAME [--real-res 256 --format jpg …]
    python -m lgm_ray.shards build hf DIR --out shards/NAME [--image-column image --label-column label]
    python -m lgm_ray.shards verify shards/NAME

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
from lgm_ray.shards_build import IMAGE_SUFFIXES, SOURCES, build
from lgm_ray.shards_stream import ShardError, SkippedSample

__all__ = ["ShardError", "ShardSet", "SkippedSample", "build", "main", "verify"]

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]
Ref = tuple[int, int]  # (index of the shard in the manifest, position of the sample in the shard)


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

    def train_stream(self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                     real_res: int | None = None, num_workers: int = 0
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled training batches of this rank: ``(images B×3×R×R in [0, 1], labels B)``.

        Each epoch visits the rank's shards in a fresh order, each shard's samples in a fresh order, and
        takes a fresh random ``R``×``R`` crop of every image resized to short side ``R``. With at least
        ``world_size`` shards, rank ``r`` reads shards ``r, r + world_size, …``; with fewer, every rank reads
        all shards and keeps the samples ``i`` (manifest order) with ``i % world_size == r``. The batches
        are a function of ``(seed, rank, world_size, batch_size, real_res)`` only, whatever ``num_workers``.

        Args:
            batch_size: images per batch.
            seed: non-negative integer.
            rank: this worker's index in ``[0, world_size)``.
            world_size: number of workers sharing the training split.
            real_res: ``R``; defaults to the size the shards were built at.
            num_workers: DataLoader processes decoding whole shards (0: decode in this process). Each
                shard in flight holds ``count×3×R×R`` bytes, and the first batch waits for a whole shard.
        """
        size, _ = self._sizes(real_res, None)
        if batch_size < 1 or seed < 0 or num_workers < 0:
            raise ValueError("need batch_size ≥ 1, seed ≥ 0 and num_workers ≥ 0")
        plan = self._plan("train", rank, world_size)
        if not self._plan_samples(plan):
            raise ValueError(f"rank {rank} of {world_size} gets no training samples of {self.root}")
        units = core.TrainUnits(tuple(plan), seed, rank, world_size, size)
        decoded = core.decoded_units(self._reader, units, num_workers)
        return ((x, y) for x, y, _ in self._rebatch(decoded, batch_size, len(plan)))

    def eval_batches(self, split: str = "test", batch_size: int = 256, *, rank: int = 0, world_size: int = 1,
                     resize: int | None = None, crop: int | None = None, num_workers: int = 0
                     ) -> Iterator[Batch]:
        """One ordered pass over this rank's part of ``split``: ``(images, labels, keys)`` batches.

        Images are resized to short side ``resize`` (default: the stored size) and centre-cropped to
        ``crop`` (default: ``resize``). Ranks split the samples as in :meth:`train_stream`, so across
        ranks every sample comes exactly once; the last batch may be smaller.
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
        if split not in self.manifest["counts"]:
            raise ValueError(f"{self.root} has no split {split!r}; it has {sorted(self.manifest['counts'])}")
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

    def _plan_samples(self, plan: list[tuple[int, int, int, int]]) -> int:
        counts = [self.manifest["shards"][i]["count"] for i, *_ in plan]
        return sum(len(range((p - o) % s, n, s)) for n, (_, o, s, p) in zip(counts, plan, strict=True))

    def _rebatch(self, decoded: Iterable[core.Decoded], batch_size: int, units_per_pass: int = 0
                 ) -> Iterator[Batch]:
        queue: deque[list[Any]] = deque()
        have = empty_run = 0
        for _, images, labels, keys, skipped in decoded:
            self._note_skipped(skipped)
            empty_run = 0 if keys else empty_run + 1
            if units_per_pass and empty_run >= units_per_pass:
                raise ShardError(f"a whole pass over {self.root} gave no decodable sample; "
                                 f"{core.verify_hint(self.root)}")
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
                for pos, (key, parts) in enumerate(core.load_shard(self.root, entry)):
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
            samples = core.load_shard(self.root, entry)
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


def _take(queue: deque[list[Any]], n: int) -> Batch:
    """Pop ``n`` samples off a queue of [images, labels, keys, start] parts as one float batch."""
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
    return images.float().div_(255.0), torch.cat([p[1] for p in pieces]), [k for p in pieces for k in p[2]]


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
