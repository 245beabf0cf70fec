"""The on-disk format of lgm_ray's shard sets, its checks, and the decoding of units for :class:`ShardSet`.

A shard set is a folder (or URL prefix) holding ``manifest.json`` and tar shards ``train-000000.tar``, …
A sample is ``KEY.jpg`` (or ``KEY.png``) plus ``KEY.cls``, its class index in ASCII.

Integrity: opening a *local* set checks that every listed shard exists with the manifest's byte size and
that no unlisted ``*.tar`` lies beside them. Every read of a shard, local or remote, loads it whole and
checks its size, sha256 and sample count before any of its samples is used. ``verify`` also decodes all.

Determinism: a *unit* is one shard (or a rank's slice of it) read in one epoch. Unit order, sample order
within a unit and every random crop come from generators seeded by ``(seed, rank, world_size, epoch,
shard)`` alone, and DataLoader workers hand whole units back in unit order, so batches do not depend on
``num_workers``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_FORMATS = ("jpg", "png")
ON_BAD_SAMPLE = ("raise", "skip")
# Domain tags keep the random streams of different uses apart for one user seed.
TAG_ORDER, TAG_UNIT, TAG_PICK = 1, 2, 3

Sample = tuple[str, dict[str, bytes]]


class ShardError(Exception):
    """A shard set, shard or sample that cannot be used; the message names it and what to do."""


class SkippedSample(NamedTuple):
    """A sample left out under ``on_bad_sample="skip"``."""

    shard: str
    key: str
    reason: str


class BadSample(Exception):
    """One sample's problem (image or label); the skip policy may absorb it."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key, self.reason = key, reason


def rebuild_hint(root: str) -> str:
    """The advice every unrecoverable error ends with."""
    return f"re-build the set with `python -m lgm_ray.shards build SOURCE --out {root} --overwrite`"


def verify_hint(root: str) -> str:
    """Advice pointing at the full report."""
    return f"run `python -m lgm_ray.shards verify {root}` for a full report"


def is_local(root: str) -> bool:
    """Whether ``root`` is a plain local path (not ``pipe:`` or ``scheme://``)."""
    return "://" not in root and not root.startswith("pipe:")


def join(root: str, name: str) -> str:
    """``root/name`` for paths and URL prefixes alike."""
    return f"{root.rstrip('/')}/{name}"


def read_bytes(url: str) -> bytes:
    """Read a whole local file, fsspec URL (s3, gs, http…) or ``pipe:`` command.

    A URL whose fsspec backend is not installed (e.g. ``s3fs``) goes to WebDataset's gopen instead,
    which handles ``pipe:``, ``http(s)`` (curl) and ``gs`` (gsutil).
    """
    if "://" in url and not url.startswith("pipe:"):
        import fsspec

        try:
            with fsspec.open(url, "rb") as stream:
                return stream.read()
        except ImportError:  # "Install s3fs to access S3": say so, unless gopen can do without
            if url.split("://", 1)[0] not in ("http", "https", "gs", "sftp", "ftps", "scp"):
                raise
    if "://" in url or url.startswith("pipe:"):
        from webdataset.gopen import gopen

        with gopen(url, "rb") as stream:
            return stream.read()
    with open(url, "rb") as stream:
        return stream.read()


def load_manifest(root: str) -> dict[str, Any]:
    """Read and check ``root/manifest.json``; raise :class:`ShardError` if unusable."""
    url = join(root, MANIFEST_NAME)
    try:
        raw = read_bytes(url)
    except Exception as e:  # each transport has its own errors: missing file, failed pipe, network
        raise ShardError(f"cannot read the manifest {url} ({type(e).__name__}: {e}); build the shard set "
                         f"with `python -m lgm_ray.shards build SOURCE --out {root}`") from e
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ShardError(f"manifest {url} is not valid JSON ({e}); {rebuild_hint(root)}") from e
    check_manifest(manifest, root)
    return manifest


def check_manifest(m: Any, root: str) -> None:
    """Check a manifest's structure and its own arithmetic (not the files)."""
    where = join(root, MANIFEST_NAME)

    def fail(problem: str) -> None:
        raise ShardError(f"manifest {where}: {problem}; {rebuild_hint(root)}")

    version = m.get("format_version") if isinstance(m, dict) else None
    if version != FORMAT_VERSION:
        fail(f"format_version is {version!r}, this lgm_ray reads {FORMAT_VERSION}")
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
        for split, per_class in counts.items():
            if sum(per_class) != totals[split]:
                fail(f"counts differ: the {split} classes add up to {sum(per_class)} samples but its "
                     f"shards hold {totals[split]}")
        if m["image"]["encoding"] not in IMAGE_FORMATS or int(m["image"]["short_side"]) < 1:
            fail(f"unknown image policy {m['image']!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        fail(f"malformed ({type(e).__name__}: {e})")


def local_file_problems(m: dict[str, Any], root: str) -> list[str]:
    """Listed shards missing or of the wrong size, and unlisted ``*.tar`` files, in a local set."""
    problems, listed = [], {e["name"] for e in m["shards"]}
    for entry in m["shards"]:
        path = join(root, entry["name"])
        if not os.path.isfile(path):
            problems.append(f"shard {path} is listed in the manifest but missing")
        elif (size := os.path.getsize(path)) != entry["bytes"]:
            problems.append(f"shard {path} has {size} bytes, the manifest says {entry['bytes']} "
                            "(truncated or replaced)")
    for name in sorted(os.listdir(root)):
        if name.endswith(".tar") and name not in listed:
            problems.append(f"shard {join(root, name)} is not listed in the manifest (from another build?)")
    return problems


def shard_bytes_problem(data: bytes, entry: dict[str, Any]) -> str | None:
    """Why a shard's bytes differ from the manifest's size and sha256, or None."""
    if len(data) != entry["bytes"]:
        return f"has {len(data)} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return "has a sha256 that differs from the manifest's (corrupted or replaced)"
    return None


def parse_tar(data: bytes, url: str, hint: str = "") -> list[Sample]:
    """Split a tar's members into WebDataset samples: consecutive members sharing a key."""
    hint = f"; {hint}" if hint else ""
    samples: list[Sample] = []
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not member.isfile() or not dot or not stem:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                payload = tar.extractfile(member).read()  # type: ignore[union-attr]
                if samples and samples[-1][0] == key:
                    samples[-1][1][ext] = payload
                    continue
                if key in seen:
                    raise ShardError(f"shard {url}, key {key}: the key appears twice{hint}")
                seen.add(key)
                samples.append((key, {ext: payload}))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"shard {url} is truncated or not a valid tar ({e}){hint}") from e
    return samples


def load_shard(root: str, entry: dict[str, Any]) -> list[Sample]:
    """Read a whole shard, check it against its manifest entry, and split it into samples."""
    url = join(root, entry["name"])
    try:
        data = read_bytes(url)
    except Exception as e:  # each transport has its own errors
        raise ShardError(f"shard {url} cannot be read ({type(e).__name__}: {e}); {verify_hint(root)}") from e
    if problem := shard_bytes_problem(data, entry):
        raise ShardError(f"shard {url} {problem}; {verify_hint(root)}, then {rebuild_hint(root)}")
    samples = parse_tar(data, url, rebuild_hint(root))
    if len(samples) != entry["count"]:
        raise ShardError(f"shard {url} holds {len(samples)} samples, the manifest says {entry['count']}; "
                         f"{rebuild_hint(root)}")
    return samples


def parse_label(parts: dict[str, bytes], key: str, num_classes: int) -> int:
    """A sample's class index, checked against the manifest's classes."""
    raw = parts.get("cls")
    if raw is None:
        raise BadSample(key, f"has no 'cls' label (members: {sorted(parts)})")
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise BadSample(key, f"label {raw[:16]!r} is not an ASCII integer") from None
    if not 0 <= label < num_classes:
        raise BadSample(key, f"label {label} is outside the manifest's {num_classes} classes")
    return label


def decode_sample(sample: Sample, encoding: str, num_classes: int) -> tuple[Image.Image, int]:
    """Decode one sample into an RGB image and its label; raise :class:`BadSample` if it cannot."""
    key, parts = sample
    label = parse_label(parts, key, num_classes)
    payload = parts.get(encoding)
    if payload is None:
        raise BadSample(key, f"has no '{encoding}' image (members: {sorted(parts)})")
    try:
        img = Image.open(io.BytesIO(payload))
        img.load()
        return (img if img.mode == "RGB" else img.convert("RGB")), label
    except Image.UnidentifiedImageError:
        raise BadSample(key, f"image does not decode (not a recognisable {encoding})") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, … on malformed data
        raise BadSample(key, f"image does not decode ({type(e).__name__}: {e})") from None


def resize_short(img: Image.Image, size: int) -> Image.Image:
    """Resize (bilinear, antialiased) so that the short side is ``size``."""
    w, h = img.size
    if min(w, h) == size:
        return img
    new = (size, max(size, round(h * size / w))) if w <= h else (max(size, round(w * size / h)), size)
    return img.resize(new, Image.Resampling.BILINEAR)


def crop_array(img: Image.Image, size: int, fx: float | None = None, fy: float | None = None) -> np.ndarray:
    """A ``size``×``size`` crop as H×W×3 uint8: centred, or at fractions ``fx, fy`` ∈ [0, 1) of the slack."""
    w, h = img.size
    x = (w - size) // 2 if fx is None else int(fx * (w - size + 1))
    y = (h - size) // 2 if fy is None else int(fy * (h - size + 1))
    return np.asarray(img, dtype=np.uint8)[y:y + size, x:x + size]


@dataclass(frozen=True)
class Unit:
    """One shard read in one pass: keep positions p with (offset + p) % stride == phase."""

    uid: int
    shard: int
    offset: int
    stride: int
    phase: int
    size: int
    crop: int
    rng_key: tuple[int, ...] | None = None  # None: file order and centre crops


Decoded = tuple[int, torch.Tensor, torch.Tensor, list[str], list[SkippedSample]]


class Reader:
    """Decodes units; small and picklable so DataLoader workers get their own copy."""

    def __init__(self, root: str, manifest: dict[str, Any], on_bad_sample: str) -> None:
        self.root, self.manifest, self.on_bad_sample = root, manifest, on_bad_sample
        self.encoding = manifest["image"]["encoding"]
        self.num_classes = len(manifest["class_names"])

    def bad(self, url: str, bad: BadSample) -> SkippedSample:
        """Raise for a bad sample, or describe it when the policy is to skip."""
        if self.on_bad_sample == "raise":
            raise ShardError(f"shard {url}, key {bad.key}: {bad.reason}; {rebuild_hint(self.root)}, or pass "
                             "on_bad_sample='skip' (CLI: --on-bad-sample skip) to leave such samples out")
        return SkippedSample(url, bad.key, bad.reason)

    def decode_unit(self, unit: Unit) -> Decoded:
        """Decode a unit into uint8 images N×3×crop×crop, labels, keys and the samples skipped."""
        entry = self.manifest["shards"][unit.shard]
        url = join(self.root, entry["name"])
        samples = load_shard(self.root, entry)
        picked = [s for p, s in enumerate(samples) if (unit.offset + p) % unit.stride == unit.phase]
        offsets = None
        if unit.rng_key is not None:
            rng = np.random.default_rng(list(unit.rng_key))
            picked = [picked[i] for i in rng.permutation(len(picked))]
            offsets = rng.random((len(picked), 2))  # drawn for all, so a skipped sample shifts no crop
        images = torch.empty((len(picked), 3, unit.crop, unit.crop), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            images.share_memory_()  # filled in place, so nothing is copied on the way to the main process
        labels, keys, skipped, out = [], [], [], images.numpy()  # numpy: torch's strided copy is slow here
        for i, sample in enumerate(picked):
            try:
                img, label = decode_sample(sample, self.encoding, self.num_classes)
            except BadSample as bad:
                skipped.append(self.bad(url, bad))
                continue
            fx, fy = (None, None) if offsets is None else offsets[i]
            out[len(keys)] = crop_array(resize_short(img, unit.size), unit.crop, fx, fy).transpose(2, 0, 1)
            labels.append(label)
            keys.append(sample[0])
        return unit.uid, images[:len(keys)], torch.tensor(labels, dtype=torch.int64), keys, skipped


@dataclass(frozen=True)
class TrainUnits:
    """The endless unit sequence of one rank: every epoch a fresh shard order and fresh seeds."""

    plan: tuple[tuple[int, int, int, int], ...]
    seed: int
    rank: int
    world_size: int
    size: int

    def __iter__(self) -> Iterator[Unit]:
        base = (self.seed, self.rank, self.world_size)
        for epoch in count():
            order = np.random.default_rng([TAG_ORDER, *base, epoch]).permutation(len(self.plan))
            for j, k in enumerate(order):
                shard, offset, stride, phase = self.plan[k]
                yield Unit(epoch * len(self.plan) + j, shard, offset, stride, phase, self.size, self.size,
                           (TAG_UNIT, *base, epoch, shard))


class UnitDataset(torch.utils.data.IterableDataset):
    """Worker ``w`` of ``n`` decodes the units with ``uid % n == w``."""

    def __init__(self, reader: Reader, units: Iterable[Unit]) -> None:
        self.reader, self.units = reader, units

    def __iter__(self) -> Iterator[Decoded | tuple[int, ShardError]]:
        info = torch.utils.data.get_worker_info()
        n, me = (1, 0) if info is None else (info.num_workers, info.id)
        for unit in self.units:
            if unit.uid % n == me:
                try:
                    yield self.reader.decode_unit(unit)
                except ShardError as e:  # handed back whole: the DataLoader would bury it in a traceback
                    yield unit.uid, e
                    return


def decoded_units(reader: Reader, units: Iterable[Unit], num_workers: int) -> Iterator[Decoded]:
    """Decode units in uid order, in-process or with a DataLoader of ``num_workers`` processes."""
    if num_workers == 0:
        yield from (reader.decode_unit(u) for u in units)
        return
    loader = torch.utils.data.DataLoader(UnitDataset(reader, units), batch_size=None, num_workers=num_workers)
    pending: dict[int, Any] = {}
    expected = 0
    for item in loader:  # already in uid order (round-robin); the buffer only guards that assumption
        pending[item[0]] = item
        while expected in pending:
            ready = pending.pop(expected)
            if isinstance(ready[1], ShardError):
                raise ready[1]
            yield ready
            expected += 1


def to_tensor(arrays: list[np.ndarray], crop: int) -> torch.Tensor:
    """Stack H×W×3 uint8 arrays into float32 N×3×H×W in [0, 1]."""
    if not arrays:
        return torch.empty((0, 3, crop, crop))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
