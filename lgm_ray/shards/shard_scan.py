"""One pass over shards lgm_ray did not write, for ``index``: what each shard and sample holds.

:func:`scan_shard` streams one shard through webdataset (:func:`lgm_ray.shards.io.shard_samples`) and
records its byte size, SHA-256 and sample count and, per sample, its image member, its raw label
(:func:`label_value`: a class index or a class name), the short side read from the image header and,
when asked, a class name from a JSON member; nothing is decoded or rewritten. A sample without an image
or with an unusable label is listed as bad (position, key, reason) for the caller's policy.
:func:`scan_all` scans many shards, in processes when asked. What the scans mean — classes, counts,
the manifest — is :mod:`lgm_ray.shards.index`'s business.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from lgm_ray.shards.decode import BadSample, image_payload, json_field
from lgm_ray.shards.format import IMAGE_KEYS, SPLITS
from lgm_ray.shards.io import ReadStats, members_of, shard_samples


@dataclass(frozen=True)
class Spec:
    """What to read from every sample."""

    image_key: str | None  # None: the first of IMAGE_KEYS present
    label_key: str
    label_field: str | None
    names_key: str | None  # class names from a JSON member's field (``--classnames KEY:FIELD``)
    names_field: str | None

    @property
    def members(self) -> frozenset[str]:
        return frozenset({*IMAGE_KEYS, self.label_key} | {k for k in (self.image_key, self.names_key) if k})


@dataclass
class ShardScan:
    """One shard's scan: its file facts and, per kept sample, position, label value and short side."""

    url: str
    split: str
    bytes: int = 0
    sha256: str = ""
    samples: int = 0
    positions: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    sides: list[int] = field(default_factory=list)
    names: list[Any] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    image_keys: Counter = field(default_factory=Counter)
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (position, key, reason)


def label_value(parts: dict[str, bytes], key: str, spec: Spec) -> int | str:
    """A sample's raw label: an int (class index) or a str (class name)."""
    raw = parts.get(spec.label_key)
    if raw is None:
        raise BadSample(key, f"has no '{spec.label_key}' label (members: {sorted(parts)}); name the "
                                  "label's member with --label-key")
    try:
        value = json_field(json.loads(raw), spec.label_field) if spec.label_field \
            else raw.decode("utf-8").strip()
    except (ValueError, KeyError, TypeError, IndexError) as e:
        what = f"field {spec.label_field!r} of '{spec.label_key}'" if spec.label_field else f"'{spec.label_key}'"
        raise BadSample(key, f"{what} is unusable ({type(e).__name__}: {e})") from None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadSample(key, f"label {value!r} is neither an integer nor a class name")
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        value = int(value)
    if isinstance(value, int) and value < 0:
        raise BadSample(key, f"label {value} is negative")
    return value


def scan_shard(url: str, split: str, spec: Spec) -> ShardScan:
    """Read one shard through webdataset: sizes, hash, per-sample label and image header; no decoding."""
    scan, stats = ShardScan(url, split), ReadStats()
    keys = (spec.image_key,) if spec.image_key else IMAGE_KEYS
    for p, sample in enumerate(shard_samples(url, spec.members, stats=stats, hashing=True)):
        key, parts = sample["__key__"], members_of(sample)
        try:
            ext, payload = image_payload(parts, key, keys)
            value = label_value(parts, key, spec)
            name = None
            if spec.names_key:
                try:
                    name = str(json_field(json.loads(parts[spec.names_key]), spec.names_field or ""))
                except (ValueError, KeyError, TypeError, IndexError) as e:
                    raise BadSample(key, f"no class name in field {spec.names_field!r} of "
                                              f"'{spec.names_key}' ({type(e).__name__}: {e})") from None
            try:
                with Image.open(io.BytesIO(payload)) as img:
                    side = min(img.size)
            except Exception as e:  # PIL raises many types on malformed headers
                raise BadSample(key, f"image does not decode ({type(e).__name__}: {e})") from None
        except BadSample as bad:
            scan.bad.append((p, bad.key, bad.reason))
            continue
        scan.positions.append(p)
        scan.values.append(value)
        scan.sides.append(side)
        scan.names.append(name)
        scan.keys.append(key)
        scan.image_keys[ext] += 1
    scan.bytes, scan.sha256, scan.samples = stats.bytes, stats.sha256 or "", stats.samples
    return scan


def _scan_task(task: tuple[str, str, Spec]) -> ShardScan:
    return scan_shard(*task)



def scan_all(splits: dict[str, list[str]], spec: Spec, workers: int, log: Any) -> list[ShardScan]:
    """Scan every shard (``splits``: URLs by split), split by split, in ``workers`` processes if > 1."""
    tasks = [(url, split, spec) for split in SPLITS for url in splits.get(split, ())]
    print(f"[shards] indexing {len(tasks)} shards ({', '.join(f'{s} {len(u)}' for s, u in splits.items())})"
          f" with {workers} processes", file=log, flush=True)
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            return list(pool.map(_scan_task, tasks))
    return [scan_shard(*t) for t in tasks]
