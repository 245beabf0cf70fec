"""Per-class access to a shard set: every sample's class read once, and chosen samples fetched by place.

:class:`SampleIndex` serves :meth:`~lgm_ray.shards.reader.ShardSet.random_per_class` and
:meth:`~lgm_ray.shards.reader.ShardSet.class_images`: it reads a split's labels once (no image is decoded
for that) and caches ``(entry, position, key, label)`` per sample; fetching decodes just the chosen
samples, one streamed read per shard. Under ``on_bad_sample="skip"`` a bad sample is noted in the set's
:class:`~lgm_ray.shards.decode.SkipLog` and left out: a random draw replaces it with its class's next
candidate, so the draw stays a function of the seed.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from lgm_ray.shards.decode import BadSample, Decoder, SkipLog, crop_array, parse_label
from lgm_ray.shards.format import ShardError, verify_hint
from lgm_ray.shards.io import members_of
from lgm_ray.shards.stream import TAG_PICK, Reader

Ref = tuple[int, int]  # (index of the entry in the manifest, position of the sample in the entry)
Row = tuple[int, int, str, int]  # (entry index, position, key, label)


class SampleIndex:
    """The samples of a set's splits by class, read once; chosen samples decoded on demand."""

    def __init__(self, reader: Reader, decoder: Decoder, skips: SkipLog, class_names: list[str]) -> None:
        self.reader, self.decoder, self.skips, self.class_names = reader, decoder, skips, class_names
        self._rows: dict[str, list[Row]] = {}

    def rows(self, split: str) -> list[Row]:
        """(entry index, position, key, label) of every sample of ``split`` with a usable label, cached."""
        if split not in self._rows:
            rows = []
            for i, entry in enumerate(self.reader.manifest["shards"]):
                if entry["split"] != split:
                    continue
                for pos, sample in self.reader.entry_samples(i):
                    key = sample["__key__"]
                    try:
                        rows.append((i, pos, key, parse_label(members_of(sample), key, self.reader.layout)))
                    except BadSample as bad:
                        self.skips.note([self.decoder.bad(self.reader.url(i), bad)])
            self._rows[split] = rows
        return self._rows[split]

    def class_refs(self, split: str) -> list[list[Ref]]:
        """Every class's samples of ``split``, as (entry, position), in manifest order."""
        refs: list[list[Ref]] = [[] for _ in self.class_names]
        for shard, pos, _, label in self.rows(split):
            refs[label].append((shard, pos))
        return refs

    def fetch(self, refs: list[Ref], size: int, crop: int) -> dict[Ref, np.ndarray | None]:
        """Centre crops of chosen (entry, position) samples, one streamed read per entry; None where bad."""
        by_entry: dict[int, set[int]] = defaultdict(set)
        for entry, pos in refs:
            by_entry[entry].add(pos)
        out: dict[Ref, np.ndarray | None] = {}
        for entry in sorted(by_entry):
            wanted, url = by_entry[entry], self.reader.url(entry)
            for pos, sample in self.reader.entry_samples(entry):
                if pos not in wanted:
                    continue
                item = (sample["__key__"], url, members_of(sample), None, None)
                try:
                    out[entry, pos] = crop_array(self.decoder.image(item, size)[0], crop)
                except BadSample as bad:
                    self.skips.note([self.decoder.bad(url, bad)])
                    out[entry, pos] = None
        return {ref: out[ref] for ref in refs}

    def random_per_class(self, seed: int, n: int, split: str, size: int, crop: int) -> list[np.ndarray]:
        """``n`` decodable centre crops of every class, drawn with ``seed``; class by class.

        Raises:
            ValueError: a class has fewer than ``n`` samples; ShardError: fewer than ``n`` decode.
        """
        queues = self._shuffled(seed, n, split)
        chosen: list[list[np.ndarray]] = [[] for _ in queues]
        cursor = [0] * len(queues)
        while True:  # a skipped sample is replaced by the class's next candidate in the next round
            wanted: dict[Ref, int] = {}
            for c, queue in enumerate(queues):
                take = queue[cursor[c]:cursor[c] + n - len(chosen[c])]
                if len(chosen[c]) < n and not take:
                    raise ShardError(f"class {self.class_names[c]!r} has fewer than n={n} decodable {split} "
                                     f"samples in {self.reader.root}; {verify_hint(self.reader.root)}")
                cursor[c] += len(take)
                wanted.update(dict.fromkeys(take, c))
            if not wanted:
                break
            for ref, array in self.fetch(list(wanted), size, crop).items():
                if array is not None:
                    chosen[wanted[ref]].append(array)
        return [a for arrays in chosen for a in arrays]

    def _shuffled(self, seed: int, n: int, split: str) -> list[list[Ref]]:
        """Every class's samples in an order drawn from ``(seed, class)``; ValueError if one has < ``n``."""
        queues = []
        for c, refs in enumerate(self.class_refs(split)):
            if len(refs) < n:
                raise ValueError(f"class {self.class_names[c]!r} has only {len(refs)} {split} samples, n={n}")
            order = np.random.default_rng([TAG_PICK, seed, c]).permutation(len(refs))
            queues.append([refs[i] for i in order])
        return queues

    def class_images(self, cls: int, split: str, size: int, crop: int) -> tuple[list[np.ndarray], list[str]]:
        """Centre crops of every decodable sample of class ``cls`` in ``split`` (manifest order), and keys."""
        rows = [(s, p, k) for s, p, k, label in self.rows(split) if label == cls]
        got = self.fetch([(s, p) for s, p, _ in rows], size, crop)
        kept = [(got[s, p], k) for s, p, k in rows if got[s, p] is not None]
        return [a for a, _ in kept], [k for _, k in kept]
