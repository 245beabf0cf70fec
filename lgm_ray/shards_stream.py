"""The on-disk format of lgm_ray's shard sets, its checks, and the streaming reader under :class:`ShardSet`.

A shard set is a manifest (``manifest.json``) and WebDataset tar shards. A set *built* by
``python -m lgm_ray.shards build`` keeps its shards beside the manifest (``train-000000.tar``, …; a sample
is ``KEY.jpg`` or ``KEY.png`` plus ``KEY.cls``, its class index in ASCII). A set *indexed* by
``python -m lgm_ray.shards index`` points at shards written by anyone, wherever they are (``url`` per
entry), with the image keys, the label's key (and JSON field) and the class names the scan found.

Reading is a webdataset pipeline: the shard's bytes stream through ``webdataset.tariterators``
(tar reading, sample grouping by key), a seeded ``webdataset.filters.shuffle`` buffer, and a decode
pool (DataLoader processes, :func:`decode_pool`) that decodes with PIL under a bad-sample handler
(:class:`Decoder`). No shard is ever held whole: memory is the shuffle buffer (raw samples) per open
stream plus the decode pool's tasks in flight.

Integrity: opening a *local* set checks that every listed shard exists with the manifest's byte size
(and, for a built set, that no unlisted ``*.tar`` lies beside them). Every read checks, at no extra
cost, that the tar is well formed and ends with its end-of-archive blocks, and — where it reads the
shard to its end — its byte size and sample count against the manifest. SHA-256 hashes are checked by
``python -m lgm_ray.shards verify`` (hashing every byte is not free), which also decodes every sample.

Determinism: a *unit* is one manifest entry (a shard, or the part of a shard in one split), or a slice
of it, read once. Training units belong to a virtual stream (see :mod:`lgm_ray.sources` for the rule
that deals streams to ranks); a stream's unit order, the shuffle of each unit (a ``shuffle_buffer``-sample
buffer seeded by the unit) and every random crop come from seeds of ``(seed, stream, epoch, shard)``
alone. The reader builds each step's task in the main process; the decode pool returns tasks in order,
so batches depend neither on ``num_workers`` nor on how many ranks share the streams. A stream starting
at step ``t`` finds its unit from the manifest's counts and skips the samples before its place in the
tar stream without decoding them. Under ``on_bad_sample="skip"`` a bad training sample's place is taken
by the next decodable sample of its stream (from that step's share or a few samples beyond it, see
:data:`SPARES`), cropped at the bad sample's place: batches keep their size and stay a function of
``(seed, step)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from webdataset import filters as wds_filters
from webdataset import tariterators
from webdataset.gopen import gopen

from lgm_ray.seeds import derive_seed

FORMAT_VERSION = 1  # what ``build`` writes; ``index`` writes INDEX_FORMAT_VERSION (shards anywhere)
INDEX_FORMAT_VERSION = 2
FORMAT_VERSIONS = (FORMAT_VERSION, INDEX_FORMAT_VERSION)
MANIFEST_NAME = "manifest.json"
IMAGE_FORMATS = ("jpg", "png")  # what ``build`` encodes
_PREFERRED_KEYS = ("jpg", "jpeg", "png", "webp", "jpe", "jfif", "bmp", "gif", "tif", "tiff", "ppm", "pgm",
                   "pbm", "pnm", "tga", "jp2", "j2k", "jpx", "avif", "qoi", "apng", "ico", "dib", "sgi")
# Image member extensions found automatically, in order of preference: those PIL here can open.
IMAGE_KEYS = tuple(k for k in _PREFERRED_KEYS if Image.registered_extensions().get(f".{k}") in Image.OPEN)
ON_BAD_SAMPLE = ("raise", "skip")
TAG_PICK = 3  # a domain tag keeps random_per_class's draws apart from other uses of one user seed
SHUFFLE_BUFFER = 1000  # samples per training unit's shuffle buffer: a full permutation of built shards
SPARES = 2  # samples beyond a step's share that a bad sample's place may be filled from


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
    return (f"re-build the set with `python -m lgm_ray.shards build SOURCE --out {root} --overwrite` (or, for "
            "shards lgm_ray did not write, fix them and re-run `python -m lgm_ray.shards index`)")


def verify_hint(root: str) -> str:
    """Advice pointing at the full report."""
    return f"run `python -m lgm_ray.shards verify {root}` for a full report"


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


def open_stream(url: str) -> Any:
    """Open a local file, fsspec URL (s3, gs, http, memory…) or ``pipe:`` command for streaming reads.

    A URL whose fsspec backend is not installed goes to webdataset's gopen where it has a scheme for it
    (``http(s)`` through curl, ``gs`` through gsutil); otherwise the error says what to install.
    """
    if url.startswith("pipe:"):
        return gopen(url, "rb")
    if url.startswith("file://"):
        return open(url[len("file://"):], "rb")
    if "://" in url:
        import fsspec

        scheme = url.split("://", 1)[0]
        try:  # http(s): a plain stream (block_size 0), not range requests per block
            return fsspec.open(url, "rb", **({"block_size": 0} if scheme in ("http", "https") else {})).open()
        except ImportError as e:  # "Install s3fs to access S3"
            if scheme in ("http", "https", "gs", "sftp", "ftps", "scp"):
                return gopen(url, "rb")
            raise ShardError(f"cannot open {url}: {e}; install that package (s3://: `pip install s3fs`), or "
                             f"give the shards as a pipe: URL, e.g. 'pipe:aws s3 cp {url} -'") from None
    return open(url, "rb")


def read_bytes(url: str) -> bytes:
    """Read a whole (small) file, such as a manifest or a class-names list, from any source."""
    stream = open_stream(url)
    try:
        return stream.read()
    finally:
        stream.close()


def load_manifest(root: str) -> dict[str, Any]:
    """Read and check ``root/manifest.json`` (or ``root`` itself when it names a ``.json`` file)."""
    url = root if root.endswith(".json") else join(root, MANIFEST_NAME)
    try:
        raw = read_bytes(url)
    except Exception as e:  # each transport has its own errors: missing file, failed pipe, network
        raise ShardError(f"cannot read the manifest {url} ({type(e).__name__}: {e}); build the shard set "
                         f"with `python -m lgm_ray.shards build SOURCE --out {root}`, or index existing "
                         f"shards with `python -m lgm_ray.shards index 'DIR/train-{{000000..000099}}.tar' "
                         f"--out {root}`") from e
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ShardError(f"manifest {url} is not valid JSON ({e}); {rebuild_hint(root)}") from e
    check_manifest(manifest, root)
    return manifest


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


# ---------------------------------------------------------------- reading tars


class ReadStats:
    """What a finished read of a shard found: samples (of the selected members), bytes, SHA-256."""

    def __init__(self) -> None:
        self.samples = 0
        self.bytes = 0
        self.sha256: str | None = None
        self.done = False


class _Tally:
    """A read-through file wrapper that counts bytes, keeps the first and last few, and hashes if asked."""

    def __init__(self, stream: Any, hashing: bool) -> None:
        self.stream, self.total, self.head, self.tail = stream, 0, b"", b""
        self.hash = hashlib.sha256() if hashing else None

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.total += len(data)
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        self.tail = (self.tail + data)[-512:] if len(data) < 512 else data[-512:]
        if self.hash is not None:
            self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()

    def ends_like_a_tar(self) -> bool:
        """Whether the bytes end in an all-zero 512-byte block (a tar's end); compressed tars pass."""
        compressed = self.head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))
        return compressed or (self.total % 512 == 0 and self.tail == bytes(512))


def _extension(fname: str) -> str | None:
    return (tariterators.base_plus_ext(fname)[1] or "").lower() or None


def shard_samples(url: str, members: Iterable[str] | None, *, stats: ReadStats | None = None,
                  hashing: bool = False, hint: str = "") -> Iterator[dict[str, Any]]:
    """Stream a shard's samples through webdataset (tar reading, grouping by key), in tar order.

    Each sample is webdataset's dict: ``__key__``, ``__url__`` and one ``bytes`` value per member
    extension kept (``members``; None keeps all). ``stats`` is filled when the shard was read to its end.

    Raises:
        ShardError: the shard cannot be opened, is not a valid tar, is truncated inside a member, or ends
            without the tar end-of-archive blocks (cut at a member boundary).
    """
    hint = f"; {hint}" if hint else ""
    keep = None if members is None else frozenset(members)
    try:
        tally = _Tally(open_stream(url), hashing)
    except ShardError:
        raise
    except Exception as e:  # each transport has its own errors
        raise ShardError(f"shard {url} cannot be read ({type(e).__name__}: {e}){hint}") from None

    def files() -> Iterator[dict[str, Any]]:
        yield from tariterators.tar_file_expander([{"url": url, "stream": tally}], eof_value=None,
                                                  select_files=None if keep is None else
                                                  (lambda name: _extension(name) in keep))

    n = 0
    try:
        try:
            for sample in tariterators.group_by_keys(files()):
                n += 1
                yield sample
            tally.drain()
        except Exception as e:  # tarfile.ReadError, EOFError, OSError, ValueError (a member twice)…
            reason = str(e.args[0]) if e.args else type(e).__name__
            raise ShardError(f"shard {url} is truncated or not a valid tar ({type(e).__name__}: "
                             f"{reason.split(' @ ')[0]}){hint}") from None
    finally:
        tally.close()
    if not tally.ends_like_a_tar():  # cut at a member boundary: tarfile itself sees a short, sound tar
        raise ShardError(f"shard {url} does not end with the tar end-of-archive blocks (after {n} samples, "
                         f"{tally.total} bytes): it is truncated, or its end was changed{hint}")
    if stats is not None:
        stats.samples, stats.bytes, stats.done = n, tally.total, True
        stats.sha256 = tally.hash.hexdigest() if tally.hash is not None else None


# ---------------------------------------------------------------- decoding


def parse_label(parts: dict[str, bytes], key: str, layout: Layout) -> int:
    """A sample's class index from its label member (or that member's JSON field), checked."""
    raw = parts.get(layout.label_key)
    if raw is None:
        raise BadSample(key, f"has no '{layout.label_key}' label (members: {sorted(parts)})")
    value: Any
    if layout.label_field:
        try:
            value = json_field(json.loads(raw), layout.label_field)
        except (ValueError, KeyError, TypeError) as e:
            raise BadSample(key, f"'{layout.label_key}' has no usable field {layout.label_field!r} ({e})") from None
    else:
        try:
            value = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadSample(key, f"label {raw[:16]!r} is not text") from None
    n = len(layout.class_names)
    if isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, str) and
                                                                 re.fullmatch(r"-?\d+", value)):
        label = int(value)
        if not 0 <= label < n:
            raise BadSample(key, f"label {label} is outside the manifest's {n} classes")
        return label
    if layout.by_name and str(value) in layout.class_names:
        return layout.class_names.index(str(value))
    if layout.by_name:
        raise BadSample(key, f"label {str(value)[:40]!r} is not one of the manifest's {n} class names")
    raise BadSample(key, f"label {raw[:16] if not layout.label_field else value!r} is not an ASCII integer")


def json_field(obj: Any, field: str) -> Any:
    """``obj[a][b]…`` for ``field = "a.b…"``."""
    for part in field.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def image_payload(parts: dict[str, bytes], key: str, image_keys: tuple[str, ...]) -> tuple[str, bytes]:
    """The first of ``image_keys`` the sample holds, and its bytes."""
    for k in image_keys:
        if k in parts:
            return k, parts[k]
    raise BadSample(key, f"has no image ({', '.join(image_keys)}; members: {sorted(parts)})")


def decode_sample(sample: tuple[str, dict[str, bytes]], layout: Layout) -> tuple[Image.Image, int]:
    """Decode one sample into an RGB image and its label; raise :class:`BadSample` if it cannot."""
    key, parts = sample
    label = parse_label(parts, key, layout)
    ext, payload = image_payload(parts, key, layout.image_keys)
    try:
        img = Image.open(io.BytesIO(payload))
        img.load()
        return (img if img.mode == "RGB" else img.convert("RGB")), label
    except Image.UnidentifiedImageError:
        raise BadSample(key, f"image does not decode (not a recognisable {ext})") from None
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


def to_tensor(arrays: list[np.ndarray], crop: int) -> torch.Tensor:
    """Stack H×W×3 uint8 arrays into float32 N×3×H×W in [0, 1]."""
    if not arrays:
        return torch.empty((0, 3, crop, crop))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


# An undecoded sample on its way to the decode pool: key, shard URL, members, crop fractions (None: centre).
Item = tuple[str, str, dict[str, bytes], float | None, float | None]


class EvalTask(NamedTuple):
    """Samples in order, centre-cropped; bad ones are left out (or raise)."""

    items: list[Item]
    size: int
    crop: int


class TrainTask(NamedTuple):
    """One step of some virtual streams: per stream, its share and the next :data:`SPARES` samples."""

    pieces: list[tuple[int, list[Item], list[Item]]]
    size: int
    step: int


Decoded = tuple[torch.Tensor, torch.Tensor, list[str], list[SkippedSample]]


@dataclass(frozen=True)
class Decoder:
    """Decodes tasks (in a decode-pool process or here); small and picklable.

    The bad-sample handler: under ``"raise"`` a bad sample becomes a :class:`ShardError` naming the
    shard, the key and the fix; under ``"skip"`` it is listed (:class:`SkippedSample`) and, in training
    tasks, its place is filled (module docstring).
    """

    root: str
    layout: Layout
    on_bad_sample: str

    def bad(self, url: str, bad: BadSample) -> SkippedSample:
        """Raise for a bad sample, or describe it when the policy is to skip."""
        if self.on_bad_sample == "raise":
            raise ShardError(f"shard {url}, key {bad.key}: {bad.reason}; {rebuild_hint(self.root)}, or pass "
                             "on_bad_sample='skip' (CLI: --on-bad-sample skip) to leave such samples out")
        return SkippedSample(url, bad.key, bad.reason)

    def image(self, item: Item, size: int) -> tuple[Image.Image, int]:
        """An item's image resized to short side ``size``, and its label; :class:`BadSample` if bad."""
        img, label = decode_sample((item[0], item[2]), self.layout)
        return resize_short(img, size), label

    def __call__(self, task: EvalTask | TrainTask) -> Decoded | ShardError:
        try:
            return self._eval(task) if isinstance(task, EvalTask) else self._train(task)
        except ShardError as e:  # handed back whole: the DataLoader would bury it in a traceback
            return e

    def _eval(self, task: EvalTask) -> Decoded:
        out, labels, keys, skipped = _buffer(len(task.items), task.crop), [], [], []
        for item in task.items:
            try:
                img, label = self.image(item, task.size)
            except BadSample as bad:
                skipped.append(self.bad(item[1], bad))
                continue
            out[1][len(keys)] = crop_array(img, task.crop).transpose(2, 0, 1)
            labels.append(label)
            keys.append(item[0])
        return out[0][:len(keys)], torch.tensor(labels, dtype=torch.int64), keys, skipped

    def _train(self, task: TrainTask) -> Decoded:
        total = sum(len(items) for _, items, _ in task.pieces)
        (images, out), labels, keys, skipped, row = _buffer(total, task.size), [], [], [], 0
        for stream, items, spares in task.pieces:
            window, tried = items + spares, {}
            for i, (key, url, _, fx, fy) in enumerate(items):
                j = next((j for j in range(i, len(window)) if self._attempt(window, j, task.size, tried, skipped)),
                         None)
                if j is None:
                    raise ShardError(
                        f"virtual stream {stream}, step {task.step}: sample {key} of shard {url} and the "
                        f"{len(window) - i - 1} after it do not decode, so none can take its place; "
                        f"{verify_hint(self.root)}, then fix or drop the bad shards ({rebuild_hint(self.root)})")
                img, label = tried[j]
                out[row] = crop_array(img, task.size, fx, fy).transpose(2, 0, 1)
                labels.append(label)
                keys.append(window[j][0])
                row += 1
        return images, torch.tensor(labels, dtype=torch.int64), keys, skipped

    def _attempt(self, window: list[Item], j: int, size: int, tried: dict[int, Any],
                 skipped: list[SkippedSample]) -> bool:
        """Decode ``window[j]`` once (into ``tried``); whether it is good. A bad one is listed once."""
        if j not in tried:
            try:
                tried[j] = self.image(window[j], size)
            except BadSample as bad:
                skipped.append(self.bad(window[j][1], bad))
                tried[j] = None
        return tried[j] is not None


def _buffer(n: int, side: int) -> tuple[torch.Tensor, np.ndarray]:
    """A uint8 N×3×side×side tensor and its numpy view (torch's strided copy is slow here)."""
    images = torch.empty((n, 3, side, side), dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        images.share_memory_()  # filled in place, so nothing is copied on the way to the main process
    return images, images.numpy()


class _Tasks(torch.utils.data.Dataset):
    """The decode pool's dataset: an "index" is a task, and fetching it decodes it."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder

    def __getitem__(self, task: EvalTask | TrainTask) -> Decoded | ShardError:
        return self.decoder(task)


class _OneByOne:
    """The DataLoader's batch sampler: each task travels alone."""

    def __init__(self, tasks: Iterable[Any]) -> None:
        self.tasks = tasks

    def __iter__(self) -> Iterator[list[Any]]:
        return ([task] for task in self.tasks)


def _only(batch: list[Any]) -> Any:
    return batch[0]


def decode_pool(decoder: Decoder, tasks: Iterable[EvalTask | TrainTask], num_workers: int,
                prefetch: int = 2) -> Iterator[Decoded]:
    """Decode tasks in order, here or in ``num_workers`` DataLoader processes.

    The tasks are built here (reading the tars) as the pool asks for them: at most ``prefetch`` per
    process are in flight. A worker's :class:`ShardError` is raised here, message alone.
    """
    if num_workers == 0:
        for task in tasks:
            result = decoder(task)
            if isinstance(result, ShardError):
                raise result
            yield result
        return
    loader = torch.utils.data.DataLoader(_Tasks(decoder), batch_sampler=_OneByOne(tasks),  # type: ignore[arg-type]
                                         num_workers=num_workers, collate_fn=_only, prefetch_factor=prefetch)
    for result in loader:
        if isinstance(result, ShardError):
            raise result
        yield result


# ---------------------------------------------------------------- units and streams


@dataclass(frozen=True)
class Unit:
    """One manifest entry read in one pass: keep its samples q with (offset + q) % stride == phase.

    With ``seed``, the kept samples go through a shuffle buffer and get random crops, and the first
    ``skip`` of the shuffled order are passed over without being decoded (a stream that starts inside).
    """

    entry: int
    offset: int
    stride: int
    phase: int
    seed: int | None = None  # None: file order and centre crops
    skip: int = 0


StreamPlan = tuple[tuple[int, int, int, int, int], ...]  # units: (entry, offset, stride, phase, samples)


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


class Reader:
    """Streams a set's entries and units as items for the decode pool (runs where the tasks are built)."""

    def __init__(self, root: str, base: str, manifest: dict[str, Any], layout: Layout) -> None:
        self.root, self.base, self.manifest, self.layout = root, base, manifest, layout
        self._positions: dict[int, dict[int, int]] = {}

    def url(self, entry: int) -> str:
        return entry_url(self.base, self.manifest["shards"][entry])

    def entry_samples(self, entry: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(q, sample)`` for the entry's samples in tar order; checks size and count at the end."""
        e = self.manifest["shards"][entry]
        url, expected = self.url(entry), int(e.get("tar_samples", e["count"]))
        where = None
        if "positions" in e:
            if entry not in self._positions:
                self._positions[entry] = {int(p): q for q, p in enumerate(e["positions"])}
            where = self._positions[entry]
        stats = ReadStats()
        for p, sample in enumerate(shard_samples(url, self.layout.members, stats=stats,
                                                 hint=rebuild_hint(self.root))):
            q = p if where is None else where.get(p)
            if q is not None:
                yield q, sample
        if stats.bytes != e["bytes"]:
            raise ShardError(f"shard {url} has {stats.bytes} bytes, the manifest says {e['bytes']} (truncated "
                             f"or replaced); {verify_hint(self.root)}, then {rebuild_hint(self.root)}")
        if stats.samples != expected:
            raise ShardError(f"shard {url} holds {stats.samples} samples, the manifest says {expected}; "
                             f"{rebuild_hint(self.root)}")

    def unit_items(self, unit: Unit, bufsize: int = SHUFFLE_BUFFER) -> Iterator[Item]:
        """The unit's samples as items: file order and centre crops, or shuffled with random crops."""
        url = self.url(unit.entry)
        kept = (s for q, s in self.entry_samples(unit.entry) if (unit.offset + q) % unit.stride == unit.phase)
        if unit.seed is None:
            for s in kept:
                yield s["__key__"], url, members_of(s), None, None
            return
        n = int(self.manifest["shards"][unit.entry]["count"])
        crops = np.random.default_rng(unit.seed).random((len(range((unit.phase - unit.offset) % unit.stride,
                                                                   n, unit.stride)), 2))
        shuffled = wds_filters.shuffle(bufsize, bufsize, rng=random.Random(unit.seed))(kept)
        for j, s in enumerate(shuffled):
            if j >= unit.skip:  # the samples before a stream's start are read, never decoded
                yield s["__key__"], url, members_of(s), float(crops[j, 0]), float(crops[j, 1])

    def stream_items(self, v: int, plan: StreamPlan, share: int, seed: int, start_step: int,
                     bufsize: int) -> Iterator[Item]:
        """Virtual stream ``v`` from its place at step ``start_step``: endless, epoch after epoch.

        Every epoch visits the stream's units in an order seeded by ``(seed, v, epoch)``; the first unit
        is the one holding stream position ``start_step * share``, found from the counts alone.
        """
        total = sum(n for *_, n in plan)
        start = start_step * share
        for epoch in count(start // total):
            order = np.random.default_rng(derive_seed(seed, "real-order", v, epoch)).permutation(len(plan))
            first = epoch * total  # stream position of the unit's first sample
            for k in order:
                entry, offset, stride, phase, n = plan[k]
                if first + n > start:
                    unit = Unit(entry, offset, stride, phase, derive_seed(seed, "real-unit", v, epoch, entry),
                                max(0, start - first))
                    yield from self.unit_items(unit, bufsize)
                first += n


def members_of(sample: dict[str, Any]) -> dict[str, bytes]:
    """A webdataset sample's members without its ``__key__``-style metadata."""
    return {k: v for k, v in sample.items() if not k.startswith("__")}


class Lookahead:
    """An iterator that can hand out its next items and peek at the ones after them."""

    def __init__(self, items: Iterator[Item]) -> None:
        self.items, self.buffer = items, deque[Item]()

    def _fill(self, n: int) -> None:
        while len(self.buffer) < n:
            self.buffer.append(next(self.items))

    def take(self, n: int) -> list[Item]:
        self._fill(n)
        return [self.buffer.popleft() for _ in range(n)]

    def peek(self, n: int) -> list[Item]:
        self._fill(n)
        return [self.buffer[i] for i in range(n)]


def batched(items: Iterable[Item], n: int) -> Iterator[list[Item]]:
    """Consecutive lists of ``n`` items (the last may be shorter)."""
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
