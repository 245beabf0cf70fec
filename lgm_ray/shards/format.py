"""The on-disk format of lgm_ray's shard sets: manifest fields and versions, shard locations, the checks.

A shard set is a manifest (``manifest.json``) and WebDataset tar shards. A set *built* by
``python -m lgm_ray.shards build`` keeps its shards beside the manifest (``train-000000.tar``, …; a sample
is ``KEY.jpg`` or ``KEY.png`` plus ``KEY.cls``, its class index in ASCII). A set *indexed* by
``python -m lgm_ray.shards index`` points at shards written by anyone, wherever they are (``url`` per
entry), with the image keys, the label's key (and JSON field) and the class names the scan found.

Integrity: opening a *local* set checks that every listed shard exists with the manifest's byte size
(and, for a built set, that no unlisted ``*.tar`` lies beside them: :func:`local_file_problems`). Every
read checks, at no extra cost, that the tar is well formed and ends with its end-of-archive blocks
(:func:`lgm_ray.shards.io.shard_samples`), and — where it reads the shard to its end — its byte size and
sample count against the manifest (:meth:`lgm_ray.shards.stream.Reader.entry_samples`). SHA-256 hashes
are checked by ``python -m lgm_ray.shards verify`` (hashing every byte is not free), which also decodes
every sample.

This module holds what every shard module agrees on: the format's constants (the splits among them),
:class:`ShardError` and the advice its messages end with, where a manifest entry's shard is
(:func:`entry_url`), the manifest's own consistency (:func:`check_manifest`, :func:`split_counts`) and how
its samples are laid out (:class:`Layout`). It opens no file, so that building, indexing, reading and
decoding all depend on it and not on one another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from PIL import Image

from lgm_ray.common.errors import InputError
from lgm_ray.common.suggest import did_you_mean

FORMAT_VERSION = 1  # what ``build`` writes; ``index`` writes INDEX_FORMAT_VERSION (shards anywhere)
INDEX_FORMAT_VERSION = 2
FORMAT_VERSIONS = (FORMAT_VERSION, INDEX_FORMAT_VERSION)
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "test", "val")  # manifest order; it also seeds each split's shard shuffle: do not reorder
# How to hold a split out when a set lacks it (the ``build`` flag named in the error).
SPLIT_FLAGS = {"train": "", "val": "--val-fraction 0.1", "test": "--test-fraction 0.1"}
IMAGE_FORMATS = ("jpg", "png")  # what ``build`` encodes
_PREFERRED_KEYS = ("jpg", "jpeg", "png", "webp", "jpe", "jfif", "bmp", "gif", "tif", "tiff", "ppm", "pgm",
                   "pbm", "pnm", "tga", "jp2", "j2k", "jpx", "avif", "qoi", "apng", "ico", "dib", "sgi")
# Image member extensions found automatically, in order of preference: those PIL here can open.
IMAGE_KEYS = tuple(k for k in _PREFERRED_KEYS if Image.registered_extensions().get(f".{k}") in Image.OPEN)


class ShardError(InputError):
    """A shard set, shard or sample that cannot be used; the message names it and what to do."""


def rebuild_hint(root: str) -> str:
    """The advice every unrecoverable error ends with."""
    return (f"re-build the set with `python -m lgm_ray.shards build SOURCE --out {root} --overwrite` (or, for "
            "shards lgm_ray did not write, fix them and re-run `python -m lgm_ray.shards index`)")


def verify_hint(root: str) -> str:
    """Advice pointing at the full report."""
    return f"run `python -m lgm_ray.shards verify {root}` for a full report"


def split_counts(m: dict[str, Any], root: str, split: str) -> list[int]:
    """The manifest's per-class counts of ``split``; ValueError naming the fix when the set lacks it."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}"
                         f"{did_you_mean(split, SPLITS)}")
    if split not in m["counts"]:
        have = ", ".join(m["counts"])
        raise ValueError(f"{root} has no split {split!r} (it has {have}); "
                         f"re-build it with `python -m lgm_ray.shards build SOURCE --out {root} "
                         f"--overwrite {SPLIT_FLAGS[split]}` (or re-index it with `python -m "
                         f"lgm_ray.shards index` and --test SOURCE or --val-fraction) to hold one out")
    return m["counts"][split]


def is_local(root: str) -> bool:
    """Whether ``root`` is a plain local path (not ``pipe:`` or ``scheme://``)."""
    return "://" not in root and not root.startswith("pipe:")


def join(root: str, name: str) -> str:
    """``root/name`` for paths and URL prefixes alike."""
    return f"{root.rstrip('/')}/{name}"


def entry_url(base: str, entry: dict[str, Any]) -> str:
    """Where a manifest entry's shard is: its ``url`` (absolute, or relative to ``base``), else ``base/name``."""
    url = entry.get("url") or entry["name"]
    return url if not is_local(url) or os.path.isabs(url) else join(base, url)


def check_manifest(m: Any, root: str) -> None:
    """Check a manifest's structure and its own arithmetic (not the files)."""
    where = root if root.endswith(".json") else join(root, MANIFEST_NAME)

    def fail(problem: str) -> None:
        raise ShardError(f"manifest {where}: {problem}; {rebuild_hint(root)}")

    version = m.get("format_version") if isinstance(m, dict) else None
    if version not in FORMAT_VERSIONS:
        fail(f"format_version is {version!r}, this lgm_ray reads {' and '.join(map(str, FORMAT_VERSIONS))}")
    try:
        names, counts = list(m["class_names"]), m["counts"]
        if not names or "train" not in counts:
            fail("lists no classes or no train split")
        for split, per_class in counts.items():
            if len(per_class) != len(names):
                fail(f"{split} counts list {len(per_class)} classes, class_names {len(names)}")
        for c, n in enumerate(counts["train"]):
            if int(n) <= 0:
                fail(f"class {names[c]!r} (index {c}) has 0 train samples; every class needs training "
                     "images: add some to the source or drop the class")
        totals, seen = dict.fromkeys(counts, 0), set()
        for entry in m["shards"]:
            name, split = entry["name"], entry["split"]
            if split not in totals or name in seen:
                fail(f"shard {name} has an unknown split {split!r} or is listed twice")
            seen.add(name)
            totals[split] += int(entry["count"])
            str(entry["sha256"]), int(entry["bytes"])  # present and numeric, or malformed (below)
            if "positions" in entry and len(entry["positions"]) != int(entry["count"]):
                fail(f"shard {name} lists {len(entry['positions'])} positions for {entry['count']} samples")
        for split, per_class in counts.items():
            if sum(per_class) != totals[split]:
                fail(f"counts differ: the {split} classes add up to {sum(per_class)} samples but its "
                     f"shards hold {totals[split]}")
        layout = Layout.of(m)
        if not layout.image_keys or int(m["image"]["short_side"]) < 1:
            fail(f"unknown image policy {m['image']!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        fail(f"malformed ({type(e).__name__}: {e})")


def local_file_problems(m: dict[str, Any], base: str) -> list[str]:
    """Listed local shards missing or of the wrong size; for a built set, unlisted ``*.tar`` beside them."""
    problems, checked = [], set()
    for entry in m["shards"]:
        path = entry_url(base, entry)
        if not is_local(path) or path in checked:
            continue
        checked.add(path)
        if not os.path.isfile(path):
            problems.append(f"shard {path} is listed in the manifest but missing")
        elif (size := os.path.getsize(path)) != entry["bytes"]:
            problems.append(f"shard {path} has {size} bytes, the manifest says {entry['bytes']} "
                            "(truncated or replaced)")
    if m.get("format_version") == FORMAT_VERSION and os.path.isdir(base):
        listed = {e["name"] for e in m["shards"]}
        for name in sorted(os.listdir(base)):
            if name.endswith(".tar") and name not in listed:
                problems.append(f"shard {join(base, name)} is not listed in the manifest (from another build?)")
    return problems


@dataclass(frozen=True)
class Layout:
    """How a set's samples are read: the members taken, the image keys, the label and the classes.

    ``members`` are the extensions read from the tar (the rest are skipped in the stream); sample
    positions count the samples holding any of them, the same way ``index`` counted them.
    """

    members: frozenset[str]
    image_keys: tuple[str, ...]
    label_key: str
    label_field: str | None
    by_name: bool  # labels are class names (mapped through ``class_names``), not indices
    class_names: tuple[str, ...]
    resized: bool  # every image has the manifest's short side (built sets)

    @classmethod
    def of(cls, m: dict[str, Any]) -> Layout:
        image, label = m["image"], m.get("label") or {}
        keys = tuple(image.get("keys") or [image["encoding"]])
        label_key = label.get("key", "cls")
        members = frozenset(m.get("members") or (*keys, label_key))
        return cls(members, keys, label_key, label.get("field"), bool(label.get("by_name")),
                   tuple(m["class_names"]), bool(image.get("resized", True)))
