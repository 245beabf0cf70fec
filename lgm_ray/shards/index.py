"""Index WebDataset shards lgm_ray did not write: ``python -m lgm_ray.shards index SOURCE --out DIR``.

One scan of the shards (:mod:`lgm_ray.shards.shard_scan`: streamed through webdataset, in ``--workers``
processes) finds, per shard, its byte size, SHA-256 and sample count, and per sample its image member,
its label and its image's size (read from the image header; nothing is decoded or rewritten).
``DIR/manifest.json`` then lists the shards where they are (relative to ``DIR`` when inside it, else absolute paths or URLs), with the
classes, the counts per class and the layout; every lgm_ray command works on ``DIR`` as on a built set.

Where the shards are (SOURCE, ``--test``; found by :mod:`lgm_ray.shards.locate`): a brace pattern
``DIR/train-{000000..000146}.tar`` (also ``pipe:CMD``, ``http(s)://…``, ``s3://…`` and anything fsspec opens; ``A::B`` joins two), a glob
``DIR/*.tar``, or a folder — ``train/``, ``val/`` (or ``validation/``) and ``test/`` sub-folders of shards,
or shards whose names say their split (``…-train-0000.tar``, ``…-validation-00.tar``; all train when
none does).

Images: the first member among :data:`lgm_ray.shards.format.IMAGE_KEYS` (jpg, jpeg, png, webp, …) a
sample holds, or ``--image-key``. Labels: ``cls`` (an integer) by default, another member
(``--label-key txt``), or a JSON member's field (``--label-key json:label``; a dotted field reaches into
nested objects); integers are class indices, other values class names. Class names: ``--classnames FILE``
(one per line, as ``classnames.txt``), ``--classnames json:class_name`` (each sample's JSON names its
class), else a ``classnames.txt`` beside the train shards (or one folder up), else the indices.

Bad input raises one :class:`~lgm_ray.shards.format.ShardError` naming it and the fix, before anything is
written: a pattern that matches nothing (or only in part), a class-names file whose length disagrees
with the labels, a label outside the classes, a sample without an image, a truncated shard. Under
``--on-bad-sample skip`` the bad *samples* are left out instead (the manifest keeps only the good
positions, and lists the others under ``skipped``); damaged shards always raise.

A validation split (``--val-fraction F``) is carved out of train per class, as ``build`` does, by sample
position: the train and val entries of a shard list their positions, so no shard is rewritten.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lgm_ray import __version__
from lgm_ray.common.atomic import write_text
from lgm_ray.shards.decode import ON_BAD_SAMPLE
from lgm_ray.shards.format import (
    IMAGE_KEYS,
    INDEX_FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    ShardError,
    check_manifest,
    is_local,
    join,
)
from lgm_ray.shards.io import read_bytes
from lgm_ray.shards.locate import sources_of
from lgm_ray.shards.shard_scan import ShardScan, Spec, scan_all
from lgm_ray.shards.splits import carve_val

CLASSNAMES_FILE = "classnames.txt"
_CACHE: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class _Options:
    """What to read from every sample, and the class names given by a file (None: from the labels)."""

    spec: Spec
    image_key: str | None  # as given (None: auto)
    label_key: str  # as given, without its field
    names_file: str | None
    file_names: list[str] | None


@dataclass
class _Labelled:
    """The classes, and per scan the (position, class index) of every sample kept."""

    class_names: list[str]
    by_name: bool  # labels are class names
    kept: dict[int, list[tuple[int, int]]]  # scan index → (position, class index)
    drop: set[tuple[int, int]]  # (id of scan, sample index) left out for a bad label
    skipped: list[dict[str, str]]  # what the manifest lists under ``skipped``


def read_classnames(path: str) -> list[str]:
    """Class names, one per line (blank lines ignored), from a local file or URL."""
    try:
        text = read_bytes(path).decode("utf-8")
    except Exception as e:  # missing file, network, not UTF-8
        raise ShardError(f"cannot read the class-names file {path} ({type(e).__name__}: {e}); give a text "
                         "file with one class name per line") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ShardError(f"class-names file {path} lists no names; give one class name per line")
    return names


def _nearby_classnames(url: str) -> str | None:
    """A ``classnames.txt`` beside the shard or one folder up, if one can be read."""
    if url.startswith("pipe:"):
        return None
    folder = url.rpartition("/")[0] or "."
    for where in (folder, folder.rpartition("/")[0]):
        candidate = join(where or ".", CLASSNAMES_FILE)
        if is_local(candidate) and not os.path.isfile(candidate):
            continue
        try:
            read_bytes(candidate)
            return candidate
        except Exception:  # not there (remote): indices then
            continue
    return None


def _split_arg(value: str | None) -> tuple[str | None, str | None]:
    if not value or ":" not in value or "://" in value:
        return value, None
    key, _, field_ = value.partition(":")
    if not key or not field_:
        raise ValueError(f"give KEY:FIELD (e.g. json:label), got {value!r}")
    return key.lower(), field_


def _fail_or_skip(bad: list[str], on_bad_sample: str, what: str) -> None:
    if bad and on_bad_sample == "raise":
        raise ShardError(f"{bad[0]}{f' (and {len(bad) - 1} more {what})' if len(bad) > 1 else ''}; fix the "
                         "option or the shards, or pass --on-bad-sample skip to leave such samples out "
                         "(counted and listed in the manifest)")


def scan(splits: dict[str, list[str]], *, classnames: str | None = None, image_key: str | None = None,
         label_key: str = "cls", val_fraction: float = 0.0, val_seed: int = 0, workers: int = 1,
         on_bad_sample: str = "raise", out: str | None = None, log: Any = None) -> dict[str, Any]:
    """Scan shards by split and return their lgm_ray manifest (see the module doc); writes nothing.

    Args:
        splits: shard URLs by split (``train`` required).
        out: the folder the manifest will live in (shard URLs inside it are stored relative to it).

    Raises:
        ShardError: bad shards or samples (module doc); ValueError: bad options.
    """
    _check_options(splits, val_fraction, on_bad_sample)
    log = log or sys.stderr
    opts = _options(splits, classnames, image_key, label_key)
    started = time.monotonic()
    scans = scan_all(splits, opts.spec, workers, log)
    labelled = _label(scans, opts, on_bad_sample)
    carve = _carve(scans, labelled, val_fraction, val_seed)
    names_out = [s for s in SPLITS if s in splits or (s == "val" and carve)]
    counts, entries, prefix = _entries(scans, labelled, carve, names_out, out)
    _require_every_class(counts["train"], labelled.class_names, opts)
    manifest = {
        "format": "lgm_ray.shards", "format_version": INDEX_FORMAT_VERSION,
        "name": Path(out).name if out else Path(prefix.rstrip("/") or "shards").name,
        "source": _source(splits, opts), "class_names": labelled.class_names, "counts": counts,
        "image": _image(scans, labelled, opts.spec), "label": {"key": opts.spec.label_key,
                                                                "field": opts.spec.label_field,
                                                                "by_name": labelled.by_name},
        "members": sorted(opts.spec.members),
        "split": {"method": "shards by split" + (f"; val: stratified carve from train by position, fraction "
                                                 f"{val_fraction}, seed {val_seed}" if carve else ""),
                  **({"val_fraction": val_fraction, "val_seed": val_seed} if carve else {})},
        "shards": entries, "skipped": labelled.skipped, "lgm_ray_version": __version__,
    }
    check_manifest(manifest, out or "(in memory)")
    print(f"[shards] indexed {len(scans)} shards, {len(labelled.class_names)} classes, samples: "
          f"{', '.join(f'{k} {sum(v)}' for k, v in counts.items())}; {len(labelled.skipped)} skipped "
          f"({time.monotonic() - started:.1f} s)", file=log, flush=True)
    return manifest


def _check_options(splits: dict[str, list[str]], val_fraction: float, on_bad_sample: str) -> None:
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"need --val-fraction in [0, 1), got {val_fraction}")
    if val_fraction > 0 and "val" in splits:
        raise ShardError("the source has its own validation shards; index without --val-fraction, or give "
                         "the train shards alone as a pattern")


def _options(splits: dict[str, list[str]], classnames: str | None, image_key: str | None,
             label_key: str) -> _Options:
    """The members to read (``--image-key``, ``--label-key``, ``--classnames KEY:FIELD``), and the class
    names of a ``--classnames`` file or of a ``classnames.txt`` beside the train shards."""
    label_key, label_field = _split_arg(label_key)
    from_file = not classnames or ":" not in classnames or os.path.exists(classnames) \
        or not is_local(classnames)
    names_key, names_field = (None, None) if from_file else _split_arg(classnames)
    spec = Spec(image_key.lower() if image_key else None, (label_key or "cls").lower(), label_field,
                names_key, names_field)
    names_file = None if names_key else classnames or _nearby_classnames(splits["train"][0])
    file_names = read_classnames(names_file) if names_file else None
    return _Options(spec, image_key, label_key, names_file, file_names)


def _label(scans: list[ShardScan], opts: _Options, on_bad_sample: str) -> _Labelled:
    """The classes, and every sample's class index; bad samples and labels raise or are left out."""
    bad = [f"shard {s.url}, key {key}: {reason}" for s in scans for _, key, reason in s.bad]
    _fail_or_skip(bad, on_bad_sample, "bad samples")
    class_names, by_name, label_of, why = _classes(scans, opts.file_names, opts.spec)
    rows_bad = []
    for s in scans:  # labels outside the classes, found now that the classes are known
        for i, value in enumerate(s.values):
            if label_of(value) is None:
                rows_bad.append((s, i, why(value).replace("the class-names file", str(opts.names_file))))
    _fail_or_skip([f"shard {s.url}, key {s.keys[i]}: {r}" for s, i, r in rows_bad], on_bad_sample,
                  "bad labels")
    drop = {(id(s), i) for s, i, _ in rows_bad}
    skipped = [{"shard": s.url, "key": key, "reason": reason} for s in scans for _, key, reason in s.bad]
    skipped += [{"shard": s.url, "key": s.keys[i], "reason": r} for s, i, r in rows_bad]
    kept = {n: [(p, label_of(v)) for i, (p, v) in enumerate(zip(s.positions, s.values, strict=True))
                if (id(s), i) not in drop]
            for n, s in enumerate(scans)}
    return _Labelled(class_names, by_name, kept, drop, skipped)


def _carve(scans: list[ShardScan], labelled: _Labelled, val_fraction: float, val_seed: int
           ) -> dict[tuple[int, int], str]:
    """The train samples (scan index, position) carved out as ``val``, per class (none without a fraction)."""
    if val_fraction <= 0:
        return {}
    items = [((n, p), c) for n, kept in labelled.kept.items() if scans[n].split == "train" for p, c in kept]
    return {ref: "val" for ref, _ in carve_val(items, val_fraction, val_seed, labelled.class_names)["val"]}


def _entries(scans: list[ShardScan], labelled: _Labelled, carve: dict[tuple[int, int], str],
             names_out: list[str], out: str | None) -> tuple[dict[str, list[int]], list[dict[str, Any]], str]:
    """Per-class counts by split, the manifest's shard entries (one per shard and split it serves; positions
    where it serves part), and the shards' common parent."""
    counts = {split: [0] * len(labelled.class_names) for split in names_out}
    entries = []
    prefix = _common_parent([s.url for s in scans])
    for n, s in enumerate(scans):
        parts: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for p, c in labelled.kept[n]:
            parts[carve.get((n, p), s.split)].append((p, c))
        whole = len(parts) == 1 and len(labelled.kept[n]) == s.samples
        for split in (x for x in SPLITS if x in parts):
            for _, c in parts[split]:
                counts[split][c] += 1
            entry = {"name": f"{split}/{_relative(s.url, prefix)}", "url": _stored_url(s.url, out),
                     "split": split, "count": len(parts[split]), "sha256": s.sha256, "bytes": s.bytes}
            if not whole:
                entry.update(positions=[p for p, _ in parts[split]], tar_samples=s.samples)
            entries.append(entry)
    return counts, entries, prefix


def _require_every_class(train_counts: list[int], class_names: list[str], opts: _Options) -> None:
    if missing := [class_names[c] for c, k in enumerate(train_counts) if k == 0]:
        where = f"{opts.names_file} lists {len(class_names)} class names but the" if opts.file_names \
            else "The"
        raise ShardError(f"{where} train shards hold no sample of classes {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''} ({len(missing)} of {len(class_names)}); pass "
                         "the class-names file of this set (or none: indices), or add the missing classes' "
                         "shards")


def _source(splits: dict[str, list[str]], opts: _Options) -> dict[str, Any]:
    """The manifest's ``source``: how the set was indexed."""
    spec = opts.spec
    return {"kind": "index", "splits": {k: len(v) for k, v in splits.items()},
            "class_names": opts.names_file or (f"{spec.names_key}:{spec.names_field}" if spec.names_key
                                               else "indices"),
            "image_key": opts.image_key or "auto",
            "label_key": opts.label_key + (f":{spec.label_field}" if spec.label_field else "")}


def _image(scans: list[ShardScan], labelled: _Labelled, spec: Spec) -> dict[str, Any]:
    """The manifest's ``image``: the image keys found, and the kept samples' short sides."""
    found_keys: Counter = Counter()
    for s in scans:
        found_keys.update(s.image_keys)
    keys = [spec.image_key] if spec.image_key else [k for k in IMAGE_KEYS if found_keys[k]]
    sides = [side for s in scans for i, side in enumerate(s.sides) if (id(s), i) not in labelled.drop]
    return {"encoding": keys[0], "keys": keys, "short_side": int(statistics.median(sides)),
            "short_side_range": [min(sides), max(sides)], "resized": False,
            "resize": "as stored: short sides vary (short_side is their median)"}


def _classes(scans: list[ShardScan], file_names: list[str] | None, spec: Spec
             ) -> tuple[list[str], bool, Any, Any]:
    """Class names, whether names are labels too, label → class index (None: bad), and why it is bad.

    With a class-names file, integers index it and other labels are looked up in it; without one,
    integers are indices (and other labels bad) or, when no label is an integer, the sorted names are
    the classes.
    """
    values = [v for s in scans for v in s.values]
    if not values:
        raise ShardError(f"no usable sample in {scans[0].url if scans else 'the shards'}; check --image-key and "
                         "--label-key")
    has_int = any(isinstance(v, int) for v in values)
    if file_names is not None:
        first: dict[str, int] = {}
        for i, name in enumerate(file_names):
            first.setdefault(name, i)
        n = len(file_names)
        return (file_names, not all(isinstance(v, int) for v in values),
                lambda v: (v if v < n else None) if isinstance(v, int) else first.get(v),
                lambda v: f"label {v!r} is outside the {n} classes of the class-names file (its length "
                          f"disagrees with the labels)" if isinstance(v, int) else
                          f"label {v!r} is not one of the {n} names of the class-names file")
    if not has_int:
        names = sorted(set(map(str, values)))
        return names, True, {name: i for i, name in enumerate(names)}.get, lambda v: ""
    top = max(v for v in values if isinstance(v, int))
    not_int = lambda v: f"label {v!r} is not an integer class index (the other labels are)"  # noqa: E731
    if spec.names_key:
        named: dict[int, str] = {}
        for s in scans:
            for v, name in zip(s.values, s.names, strict=True):
                if isinstance(v, int) and named.setdefault(v, name) != name:
                    raise ShardError(f"class {v} is named both {named[v]!r} and {name!r} in field "
                                     f"{spec.names_field!r} of '{spec.names_key}' (shard {s.url}); pass "
                                     "--classnames FILE instead")
        if unnamed := [c for c in range(top + 1) if c not in named]:
            raise ShardError(f"classes {unnamed[:5]} have no sample to take their names from; pass "
                             "--classnames FILE")
        return [named[c] for c in range(top + 1)], False, lambda v: v if isinstance(v, int) else None, not_int
    return [str(c) for c in range(top + 1)], False, lambda v: v if isinstance(v, int) else None, not_int


def _common_parent(urls: Sequence[str]) -> str:
    parent = os.path.commonprefix([u.rpartition("/")[0] + "/" for u in urls])
    return parent[:parent.rfind("/") + 1]


def _relative(url: str, prefix: str) -> str:
    return url[len(prefix):] if prefix and url.startswith(prefix) else url


def _stored_url(url: str, out: str | None) -> str:
    """A local shard inside ``out`` relative to it (the folder stays movable), others absolute."""
    if not is_local(url):
        return url
    path = os.path.abspath(url)
    if out and is_local(out):
        rel = os.path.relpath(path, os.path.abspath(out))
        if not rel.startswith(".."):
            return rel
    return path


def index_source(spec: str) -> dict[str, Any]:
    """The manifest of a shard pattern or folder, scanned in memory (once per process) with the defaults."""
    if spec not in _CACHE:
        print(f"[shards] {spec} has no lgm_ray manifest: indexing it in memory; run `python -m lgm_ray.shards "
              f"index '{spec}' --out DIR` once and pass DIR to skip this scan", file=sys.stderr, flush=True)
        _CACHE[spec] = scan(sources_of(spec))
    return _CACHE[spec]


def index(source: str, *, out: str, test: str | None = None, classnames: str | None = None,
          image_key: str | None = None, label_key: str = "cls", val_fraction: float = 0.0, val_seed: int = 0,
          workers: int = 1, overwrite: bool = False, on_bad_sample: str = "raise",
          command: Sequence[str] | None = None) -> dict[str, Any]:
    """Scan existing shards and write ``out/manifest.json`` for them (module doc); returns the manifest.

    Raises:
        ShardError: bad shards, samples or options (nothing is written then), or an existing manifest in
            ``out`` without ``overwrite``.
    """
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise ShardError(f"--out {out} exists and is not a folder; choose another --out")
    if (target / MANIFEST_NAME).exists() and not overwrite:
        raise ShardError(f"{target / MANIFEST_NAME} exists; pass --overwrite to replace it (only once the "
                         "new one is complete) or choose another --out")
    manifest = scan(sources_of(source, test), classnames=classnames, image_key=image_key, label_key=label_key,
                    val_fraction=val_fraction, val_seed=val_seed, workers=workers, on_bad_sample=on_bad_sample,
                    out=str(target))
    flags = [x for k, v in (("--out", out), ("--test", test), ("--classnames", classnames),
                            ("--image-key", image_key), ("--label-key", label_key)) if v for x in (k, v)]
    manifest["command"] = shlex.join(["python", "-m", "lgm_ray.shards", *(command or ["index", source, *flags])])
    write_text(target / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    print(f"[shards] wrote {target / MANIFEST_NAME}", file=sys.stderr, flush=True)
    return manifest
