"""The on-disk format of lgm_ray's shard sets, its checks, and the decoding of units for :class:`ShardSet`.

A shard set is a folder (or URL prefix) holding ``manifest.json`` and tar shards ``train-000000.tar``, …
A sample is ``KEY.jpg`` (or ``KEY.png``) plus ``KEY.cls``, its class index in ASCII.

Integrity: opening a *local* set checks that every listed shard exists with the manifest's byte size and
that no unlisted ``*.tar`` lies beside them. Every load of a shard, local or remote, reads it whole and
checks its size, sha256 and sample count before any of its samples is used (a reader keeps a few small
shards it has checked, see :class:`Reader`). ``verify`` also decodes all.

Determinism: a *unit* is one shard (or a slice of it) read once. Training units belong to a virtual stream
(see :mod:`lgm_ray.sources` for the rule that deals streams to ranks); a stream's unit order, the sample
order within a unit and every random crop come from generators seeded by ``(seed, stream, epoch, shard)``
alone, and DataLoader workers hand whole units back in unit order, so batches depend neither on
``num_workers`` nor on how many ranks share the streams. Positions within a stream are computed from the
manifest's counts, so a stream can start at any step without decoding what comes before.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from heapq import merge
from itertools import count
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from lgm_ray.seeds import derive_seed

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_FORMATS = ("jpg", "png")
ON_BAD_SAMPLE = ("raise", "skip")
# A domain tag keeps random_per_class's draws apart from other uses of one user seed.
TAG_PICK = 3

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
    """One shard read in one pass: keep positions p with (offset + p) % stride == phase.

    With ``rng_key``, the kept samples are shuffled and cropped at random, and the first ``skip`` of the
    shuffled order are dropped without being decoded (a stream that starts inside this unit).
    """

    uid: int
    shard: int
    offset: int
    stride: int
    phase: int
    size: int
    crop: int
    rng_key: tuple[int, ...] | None = None  # None: file order and centre crops
    stream: int = 0
    skip: int = 0


Decoded = tuple[int, torch.Tensor, torch.Tensor, list[str], list[SkippedSample]]


class Reader:
    """Decodes units; small and picklable so DataLoader workers get their own copy.

    Keeps the last checked and parsed shards, up to ``cache_bytes`` of them, because a set with fewer
    shards than virtual streams has every stream read every shard (a slice each) in every epoch.
    """

    def __init__(self, root: str, manifest: dict[str, Any], on_bad_sample: str,
                 cache_bytes: int = 64 << 20) -> None:
        self.root, self.manifest, self.on_bad_sample = root, manifest, on_bad_sample
        self.encoding = manifest["image"]["encoding"]
        self.num_classes = len(manifest["class_names"])
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, list[Sample]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": OrderedDict()}  # a worker starts with an empty cache

    def samples(self, shard: int) -> list[Sample]:
        """The samples of the manifest's shard number ``shard``: loaded and checked, or cached."""
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        entry = self.manifest["shards"][shard]
        samples = load_shard(self.root, entry)
        if entry["bytes"] <= self.cache_bytes:
            self._cache[shard] = samples
            while sum(self.manifest["shards"][i]["bytes"] for i in self._cache) > self.cache_bytes:
                self._cache.popitem(last=False)
        return samples

    def bad(self, url: str, bad: BadSample) -> SkippedSample:
        """Raise for a bad sample, or describe it when the policy is to skip."""
        if self.on_bad_sample == "raise":
            raise ShardError(f"shard {url}, key {bad.key}: {bad.reason}; {rebuild_hint(self.root)}, or pass "
                             "on_bad_sample='skip' (CLI: --on-bad-sample skip) to leave such samples out")
        return SkippedSample(url, bad.key, bad.reason)

    def decode_unit(self, unit: Unit) -> Decoded:
        """Decode a unit into uint8 images N×3×crop×crop, labels, keys and the samples skipped."""
        url = join(self.root, self.manifest["shards"][unit.shard]["name"])
        samples = self.samples(unit.shard)
        picked = [s for p, s in enumerate(samples) if (unit.offset + p) % unit.stride == unit.phase]
        offsets = None
        if unit.rng_key is not None:
            rng = np.random.default_rng(list(unit.rng_key))
            picked = [picked[i] for i in rng.permutation(len(picked))]
            offsets = rng.random((len(picked), 2))  # drawn for all, so a skipped sample shifts no crop
            picked, offsets = picked[unit.skip:], offsets[unit.skip:]
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


def stream_layout(batch_size: int, num_streams: int, rank: int, world_size: int, start_step: int = 0
                  ) -> tuple[list[int], list[int]]:
    """Each virtual stream's share of a global batch, and the streams that rank ``rank`` reads.

    Stream ``v`` gives ``batch_size // num_streams + (v < batch_size % num_streams)`` samples per step;
    rank ``r`` of ``world_size`` reads streams ``r, r + world_size, …``.

    Raises:
        ValueError: a bad argument, or more ranks than streams (a rank would get no stream at all).
    """
    if batch_size < 1 or num_streams < 1 or start_step < 0:
        raise ValueError(f"need batch_size ≥ 1, num_streams ≥ 1 and start_step ≥ 0, got batch_size="
                         f"{batch_size}, num_streams={num_streams}, start_step={start_step}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 ≤ rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size > num_streams:
        raise ValueError(f"world_size={world_size} ranks cannot share num_streams={num_streams} virtual "
                         f"streams (each rank reads whole streams); raise num_streams (config field "
                         f"real_streams) to at least {world_size}")
    base, extra = divmod(batch_size, num_streams)
    return [base + (v < extra) for v in range(num_streams)], list(range(rank, num_streams, world_size))


StreamPlan = tuple[tuple[int, int, int, int, int], ...]  # units: (shard, offset, stride, phase, samples)


@dataclass(frozen=True)
class StreamUnits:
    """The units of some virtual streams from step ``start_step`` on, in the order they are first needed.

    Stream ``v`` walks its units epoch after epoch, each epoch in an order seeded by ``(seed, v, epoch)``;
    it hands out ``share`` samples per step, so the unit holding stream position ``i`` is first needed at
    step ``i // share``. The streams' unit sequences are merged by that step (then by stream), which
    is the order a consumer of all these streams needs them in. The first unit of each stream starts at
    position ``start_step * share``, found from the manifest's counts without reading anything.
    """

    streams: tuple[tuple[int, StreamPlan, int], ...]  # (stream id, units, share per step)
    seed: int
    start_step: int
    size: int

    def _needs(self, v: int, plan: StreamPlan, share: int) -> Iterator[tuple[int, int, Unit]]:
        total = sum(n for *_, n in plan)
        start = self.start_step * share
        for epoch in count(start // total):
            rng = np.random.default_rng(derive_seed(self.seed, "real-order", v, epoch))
            order = rng.permutation(len(plan))
            first = epoch * total  # stream position of the unit's first sample
            for k in order:
                shard, offset, stride, phase, n = plan[k]
                if first + n > start:
                    skip = max(0, start - first)
                    key = (derive_seed(self.seed, "real-unit", v, epoch, shard),)
                    unit = Unit(-1, shard, offset, stride, phase, self.size, self.size, key, v, skip)
                    yield (first + skip) // share, v, unit
                first += n

    def __iter__(self) -> Iterator[Unit]:
        needs = merge(*(self._needs(v, plan, share) for v, plan, share in self.streams), key=lambda x: x[:2])
        for uid, (_, _, unit) in enumerate(needs):
            yield replace(unit, uid=uid)


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


def decoded_units(reader: Reader, units: Iterable[Unit], num_workers: int, ahead: int = 2
                  ) -> Iterator[Decoded]:
    """Decode units in uid order, in-process or with a DataLoader of ``num_workers`` processes.

    ``ahead`` is how many decoded units each worker may hold ready (the DataLoader's prefetch factor).
    """
    if num_workers == 0:
        yield from (reader.decode_unit(u) for u in units)
        return
    loader = torch.utils.data.DataLoader(UnitDataset(reader, units), batch_size=None, num_workers=num_workers,
                                         prefetch_factor=ahead)
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
