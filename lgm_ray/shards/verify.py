"""The full check of a shard set (``python -m lgm_ray.shards verify ROOT``): :func:`verify`.

Every shard is read to its end through :mod:`lgm_ray.shards.io` (no
:class:`~lgm_ray.shards.reader.ShardSet`): its byte size, SHA-256 and sample count are compared with the
manifest's, every sample is decoded (:func:`lgm_ray.shards.decode.decode_sample`), a built set's images
are checked for the manifest's short side, and the classes are recounted per split. Opening a set checks
only what costs nothing (:mod:`lgm_ray.shards.format` states the integrity policy); this reads every byte.

A shard that an indexed validation carve splits between ``train`` and ``val`` is read once, its samples
attributed by position. A split whose shards showed a problem is not recounted (its counts would only
repeat the problem).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from lgm_ray.shards.decode import ON_BAD_SAMPLE, BadSample, decode_sample
from lgm_ray.shards.format import Layout, ShardError, entry_url, local_file_problems
from lgm_ray.shards.io import ReadStats, members_of, shard_samples
from lgm_ray.shards.reader import open_manifest

__all__ = ["verify"]


def verify(root: str, *, on_bad_sample: str = "raise") -> tuple[list[str], list[str], str]:
    """Check every shard's size, sha256 and sample count, decode every sample, and recount the classes.

    Args:
        root: where the set is (see :class:`~lgm_ray.shards.reader.ShardSet`).
        on_bad_sample: with ``"skip"``, undecodable samples and bad labels are reported as tolerated
            (what a skipping :class:`~lgm_ray.shards.reader.ShardSet` would leave out) instead of as
            problems.

    Returns:
        ``(problems, tolerated, summary)``; the set is sound when ``problems`` is empty.

    Raises:
        ShardError: the manifest itself is missing or unusable.
    """
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
    root = os.fspath(root)
    m, base = open_manifest(root)
    check = _Check(m, base, on_bad_sample)
    by_url: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in m["shards"]:
        by_url[entry_url(base, entry)].append(entry)
    damaged: set[str] = set()
    for url, entries in by_url.items():
        if not check.shard(url, entries):
            damaged.update(e["split"] for e in entries)
    check.recount(damaged)
    totals = ", ".join(f"{split} {sum(c)}" for split, c in m["counts"].items())
    summary = f"{root}: {len(by_url)} shards, {len(m['class_names'])} classes, samples: {totals}"
    return check.problems, check.tolerated, summary


class _Check:
    """One verification's findings: problems, tolerated bad samples, and the classes counted per split."""

    def __init__(self, m: dict[str, Any], base: str, on_bad_sample: str) -> None:
        self.m, self.layout = m, Layout.of(m)
        self.problems = local_file_problems(m, base)
        self.listed = "\n".join(self.problems)  # what opening the set found already, not to repeat
        self.tolerated: list[str] = []
        self.sink = self.tolerated if on_bad_sample == "skip" else self.problems
        self.size = int(m["image"]["short_side"])
        self.found = {split: [0] * len(m["class_names"]) for split in m["counts"]}

    def shard(self, url: str, entries: list[dict[str, Any]]) -> bool:
        """Read one shard (listed by ``entries``, one per split it serves); whether it showed no problem."""
        before = len(self.problems) + len(self.tolerated)
        stats = ReadStats()
        if f"shard {url} is listed in the manifest but missing" not in self.listed:
            try:
                self._samples(url, entries, stats)
            except ShardError as e:
                self.problems.append(str(e))
        if stats.done:
            self._file_facts(url, entries[0], stats)
        return len(self.problems) + len(self.tolerated) == before

    def _samples(self, url: str, entries: list[dict[str, Any]], stats: ReadStats) -> None:
        """Decode every sample of the shard, counting its class in the split it belongs to."""
        first = entries[0]
        owner = None  # a whole shard in one split; else each kept position's split
        if "positions" in first:
            owner = {int(p): e["split"] for e in entries for p in e.get("positions", ())}
        for p, sample in enumerate(shard_samples(url, self.layout.members, stats=stats, hashing=True)):
            split = first["split"] if owner is None else owner.get(p)
            if split is None:
                continue  # left out when the set was indexed
            key = sample["__key__"]
            try:
                img, label = decode_sample((key, members_of(sample)), self.layout)
            except BadSample as bad:
                self.sink.append(f"shard {url}, key {bad.key}: {bad.reason}")
                continue
            if self.layout.resized and min(img.size) != self.size:
                self.problems.append(f"shard {url}, key {key}: short side {min(img.size)}, "
                                     f"manifest: {self.size}")
            self.found[split][label] += 1

    def _file_facts(self, url: str, entry: dict[str, Any], stats: ReadStats) -> None:
        """The shard's byte size, SHA-256 and sample count against the manifest's."""
        if stats.bytes != entry["bytes"]:
            if f"shard {url} has {stats.bytes} bytes" not in self.listed:
                self.problems.append(f"shard {url} has {stats.bytes} bytes, the manifest says "
                                     f"{entry['bytes']}")
        elif stats.sha256 != entry["sha256"]:
            self.problems.append(f"shard {url} has a sha256 that differs from the manifest's (corrupted or "
                                 "replaced)")
        expected = int(entry.get("tar_samples", entry["count"]))
        if stats.samples != expected:
            self.problems.append(f"shard {url} holds {stats.samples} samples, manifest: {expected}")

    def recount(self, damaged: set[str]) -> None:
        """The per-class counts of every split without damaged shards against the manifest's."""
        for split, expected_counts in self.m["counts"].items():
            if split not in damaged and self.found[split] != list(expected_counts):
                self.problems.append(f"split {split}: the shards hold per-class counts {self.found[split]}, "
                                     f"the manifest says {list(expected_counts)}")
