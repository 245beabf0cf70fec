"""Decoding shard samples: labels and images from a sample's bytes, and the decode pool that runs it in order.

A sample read from a tar (webdataset's dict of member bytes, :mod:`lgm_ray.shards.io`) becomes an RGB image
and a class index here (:func:`decode_sample`: PIL, and the label rules of the set's
:class:`~lgm_ray.shards.format.Layout`), then a uint8 crop (:func:`resize_short`, :func:`crop_array`). The
reader builds *tasks* in the main process (:class:`EvalTask`, :class:`TrainTask`: lists of undecoded
:data:`Item`); :func:`decode_pool` decodes them with a :class:`Decoder`, here or in DataLoader processes,
and returns them in order, so what a step gets does not depend on ``num_workers``.

The bad-sample handler: an image that does not decode or a missing or unusable label raises
:class:`BadSample`; under ``on_bad_sample="raise"`` the :class:`Decoder` turns it into a
:class:`~lgm_ray.shards.format.ShardError` naming the shard, the key and the fix; under ``"skip"`` it lists
it (:class:`SkippedSample`) and, in a training task, gives its place to the next decodable sample of its
stream (from that step's share or the spares beyond it), cropped at the bad sample's place, so batches
keep their size. Back in the main process a :class:`SkipLog` lists each skipped sample once and warns,
and stops a read when none of a shard's samples decodes.

Kept apart from the tar reading (:mod:`lgm_ray.shards.io`) because it opens nothing and runs in the decode
pool's processes, and from the streams (:mod:`lgm_ray.shards.stream`) because it does not care which
samples a task holds.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from lgm_ray.shards.format import Layout, ShardError, entry_url, rebuild_hint, verify_hint

ON_BAD_SAMPLE = ("raise", "skip")


class SkippedSample(NamedTuple):
    """A sample left out under ``on_bad_sample="skip"``."""

    shard: str
    key: str
    reason: str


class SkipLog:
    """The samples a reader left out under ``on_bad_sample="skip"``: each listed once (:attr:`skipped`) and
    warned about; a shard none of whose samples decodes raises :class:`ShardError`."""

    def __init__(self, root: str, base: str, manifest: dict[str, Any]) -> None:
        self.root, self.base, self.manifest = root, base, manifest
        self.skipped: list[SkippedSample] = []
        self._bad_keys: dict[str, set[str]] = defaultdict(set)

    def note(self, skipped: Iterable[SkippedSample]) -> None:
        """List (and warn about) each newly skipped sample; raise once a whole shard is bad."""
        for s in skipped:
            bad = self._bad_keys[s.shard]
            if s.key in bad:
                continue
            bad.add(s.key)
            self.skipped.append(s)
            warnings.warn(f"skipped a bad sample: shard {s.shard}, key {s.key}: {s.reason}", stacklevel=4)
            total = sum(int(e["count"]) for e in self.manifest["shards"]
                        if entry_url(self.base, e) == s.shard)
            if len(bad) >= total:
                raise ShardError(f"shard {s.shard}: none of its {total} samples decodes (e.g. key {s.key}: "
                                 f"{s.reason}); {verify_hint(self.root)}, then fix or drop that shard "
                                 f"({rebuild_hint(self.root)})")


class BadSample(Exception):
    """One sample's problem (image or label); the skip policy may absorb it."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key, self.reason = key, reason


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
    """One step of some virtual streams: per stream, its share and the next few samples as spares.

    The spares (:data:`~lgm_ray.shards.stream.SPARES` of them) may fill a bad sample's place.
    """

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
