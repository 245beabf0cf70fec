"""Build, index and verify WebDataset shard sets from the command line: ``python -m lgm_ray.shards``.

    python -m lgm_ray.shards build digits --out shards/digits
    python -m lgm_ray.shards build imagefolder DIR --out shards/NAME [--real-res 256 --format jpg …]
    python -m lgm_ray.shards build hf DIR --out shards/NAME [--image-column image --label-column label]
    python -m lgm_ray.shards build … --val-fraction 0.1 [--val-seed 0]   # + a validation split
    python -m lgm_ray.shards index 'DIR/train-{000000..000146}.tar' --out shards/NAME \\
        [--test 'DIR/val-{000000..000006}.tar'] [--classnames FILE] [--image-key K] [--label-key K[:FIELD]]
    python -m lgm_ray.shards verify shards/NAME

This module holds the command line — its parser, :func:`main` and the dispatch of the subcommands to
:func:`lgm_ray.shards.build.build`, :func:`lgm_ray.shards.index.index` and :func:`verify` — and
:func:`verify` itself, the full check of a set (every shard's size, sha256 and count, every sample
decoded, the classes recounted). They live apart from :mod:`lgm_ray.shards.reader`, the
:class:`~lgm_ray.shards.reader.ShardSet` reader the training and evaluation code imports, which needs none of
them. The documented command stays ``python -m lgm_ray.shards``: that module's ``__main__`` block calls
:func:`main` (``main(argv)`` takes a list, so tests call it in-process).

:func:`verify` is here rather than beside the reader because the ``verify`` subcommand is its one caller
(tests call it directly): it reads every byte of every shard through :mod:`lgm_ray.shards.io` without a
:class:`~lgm_ray.shards.reader.ShardSet`, and it cannot go down into :mod:`lgm_ray.shards.format`, which
:mod:`lgm_ray.shards.io` and :mod:`lgm_ray.shards.decode` import.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Any

from lgm_ray.shards.build import build
from lgm_ray.shards.decode import ON_BAD_SAMPLE, BadSample, decode_sample
from lgm_ray.shards.format import (
    IMAGE_FORMATS,
    IMAGE_KEYS,
    Layout,
    ShardError,
    entry_url,
    local_file_problems,
    rebuild_hint,
)
from lgm_ray.shards.index import index
from lgm_ray.shards.io import ReadStats, members_of, shard_samples
from lgm_ray.shards.reader import open_manifest
from lgm_ray.shards.sources import IMAGE_SUFFIXES, SOURCES

__all__ = ["main", "verify"]


def verify(root: str, *, on_bad_sample: str = "raise") -> tuple[list[str], list[str], str]:
    """Check every shard's size, sha256 and sample count, decode every sample, and recount the classes.

    Args:
        root: where the set is (see :class:`ShardSet`).
        on_bad_sample: with ``"skip"``, undecodable samples and bad labels are reported as tolerated
            (what a skipping :class:`ShardSet` would leave out) instead of as problems.

    Returns:
        ``(problems, tolerated, summary)``; the set is sound when ``problems`` is empty.

    Raises:
        ShardError: the manifest itself is missing or unusable.
    """
    root = os.fspath(root)
    m, base = open_manifest(root)
    layout = Layout.of(m)
    problems = local_file_problems(m, base)
    listed = "\n".join(problems)
    tolerated: list[str] = []
    sink = tolerated if on_bad_sample == "skip" else problems
    size, n_classes = int(m["image"]["short_side"]), len(m["class_names"])
    found = {split: [0] * n_classes for split in m["counts"]}
    damaged: set[str] = set()
    by_url: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in m["shards"]:
        by_url[entry_url(base, entry)].append(entry)
    for url, entries in by_url.items():
        first, before = entries[0], len(problems) + len(tolerated)
        owner = {int(p): e["split"] for e in entries for p in e.get("positions", ())} if "positions" in first \
            else None
        stats = ReadStats()
        if f"shard {url} is listed in the manifest but missing" not in listed:
            try:
                for p, sample in enumerate(shard_samples(url, layout.members, stats=stats, hashing=True)):
                    split = first["split"] if owner is None else owner.get(p)
                    if split is None:
                        continue  # left out when the set was indexed
                    key = sample["__key__"]
                    try:
                        img, label = decode_sample((key, members_of(sample)), layout)
                    except BadSample as bad:
                        sink.append(f"shard {url}, key {bad.key}: {bad.reason}")
                        continue
                    if layout.resized and min(img.size) != size:
                        problems.append(f"shard {url}, key {key}: short side {min(img.size)}, manifest: {size}")
                    found[split][label] += 1
            except ShardError as e:
                problems.append(str(e))
        if stats.done:
            if stats.bytes != first["bytes"]:
                if f"shard {url} has {stats.bytes} bytes" not in listed:
                    problems.append(f"shard {url} has {stats.bytes} bytes, the manifest says {first['bytes']}")
            elif stats.sha256 != first["sha256"]:
                problems.append(f"shard {url} has a sha256 that differs from the manifest's (corrupted or "
                                "replaced)")
            expected = int(first.get("tar_samples", first["count"]))
            if stats.samples != expected:
                problems.append(f"shard {url} holds {stats.samples} samples, manifest: {expected}")
        if len(problems) + len(tolerated) > before:
            damaged.update(e["split"] for e in entries)
    for split, expected_counts in m["counts"].items():
        if split not in damaged and found[split] != list(expected_counts):
            problems.append(f"split {split}: the shards hold per-class counts {found[split]}, "
                            f"the manifest says {list(expected_counts)}")
    totals = ", ".join(f"{split} {sum(c)}" for split, c in m["counts"].items())
    summary = f"{root}: {len(by_url)} shards, {n_classes} classes, samples: {totals}"
    return problems, tolerated, summary


def main(argv: list[str] | None = None) -> int:
    """``python -m lgm_ray.shards {build,index,verify}``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lgm_ray.shards", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="encode a source into shards and a manifest")
    b.add_argument("source", choices=SOURCES)
    b.add_argument("path", nargs="?", help="DIR, for imagefolder (class sub-folders, or train/ and test/ "
                   f"holding them; images {' '.join(IMAGE_SUFFIXES)}) and hf (saved with save_to_disk)")
    b.add_argument("--out", help="output folder (default: shards/SOURCE or shards/<DIR's name>)")
    b.add_argument("--real-res", type=int, help="stored short side in pixels (default 256; digits 32)")
    b.add_argument("--format", choices=IMAGE_FORMATS, help="encoding (default jpg; digits png)")
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
    b.add_argument("--on-bad-sample", choices=ON_BAD_SAMPLE, default="raise",
                   help="skip: leave out undecodable source images (listed in the manifest)")
    i = sub.add_parser("index", help="write a manifest for existing WebDataset shards (no image is rewritten)")
    i.add_argument("source", help="the train shards: a brace or glob pattern (DIR/train-{000000..000146}.tar, "
                   "pipe:…, http(s)://…, s3://…) or a folder (train/ val/ test/ sub-folders, or shards "
                   "named by split)")
    i.add_argument("--out", required=True, help="folder for manifest.json (the shards stay where they are)")
    i.add_argument("--test", help="the test shards (pattern or folder), if SOURCE does not hold them")
    i.add_argument("--classnames", help="FILE with one class name per line (classnames.txt style), or "
                   "KEY:FIELD to take each class's name from a field of the JSON member KEY; default: a "
                   "classnames.txt beside the shards, else the class indices")
    i.add_argument("--image-key", help="the image member's extension (default: found among "
                   f"{', '.join(IMAGE_KEYS[:6])}, …)")
    i.add_argument("--label-key", default="cls", help="the label member: cls (an integer, the default), "
                   "another extension, or KEY:FIELD for a field of a JSON member (e.g. json:label)")
    i.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of every class's train samples as split 'val' (by position; "
                   "no shard is rewritten)")
    i.add_argument("--val-seed", type=int, default=0, help="seed of the validation split (default 0)")
    i.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="scanning processes")
    i.add_argument("--overwrite", action="store_true", help="replace an existing manifest.json in --out")
    i.add_argument("--on-bad-sample", choices=ON_BAD_SAMPLE, default="raise",
                   help="skip: leave out samples without an image or with a bad label (counted and listed)")
    v = sub.add_parser("verify", help="check hashes and counts and decode every sample")
    v.add_argument("root", help="shard set folder, URL prefix, manifest file or shard pattern")
    v.add_argument("--on-bad-sample", choices=ON_BAD_SAMPLE, default="raise",
                   help="skip: report bad samples, and pass if nothing else is wrong")
    args = parser.parse_args(argv)
    command = sys.argv[1:] if argv is None else argv
    try:
        if args.command == "build":
            name = os.path.basename(os.path.normpath(args.path or args.source))
            build(args.source, args.path, out=args.out or os.path.join("shards", name),
                  real_res=args.real_res, fmt=args.format, quality=args.quality, shard_size=args.shard_size,
                  workers=args.workers, test_fraction=args.test_fraction, split_seed=args.split_seed,
                  val_fraction=args.val_fraction, val_seed=args.val_seed,
                  overwrite=args.overwrite, on_bad_sample=args.on_bad_sample, image_column=args.image_column,
                  label_column=args.label_column, command=command)
            return 0
        if args.command == "index":
            index(args.source, out=args.out, test=args.test, classnames=args.classnames,
                  image_key=args.image_key, label_key=args.label_key, val_fraction=args.val_fraction,
                  val_seed=args.val_seed, workers=args.workers, overwrite=args.overwrite,
                  on_bad_sample=args.on_bad_sample, command=command)
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
        print(f"FAILED {summary}: {len(problems)} problems; {rebuild_hint(args.root)}", file=sys.stderr)
        return 1
    print(f"OK {summary}; sizes, sha256 and counts match, every sample decodes"
          + (f", {len(tolerated)} bad samples tolerated" if tolerated else ""))
    return 0
