"""Write lgm_ray shard sets: ``python -m lgm_ray.shards build {digits | imagefolder DIR | hf DIR}``.

Images are decoded once, resized to short side ``real_res`` (uncropped), encoded once as JPEG or PNG and
written with their class index into tar shards by ``webdataset.TarWriter`` (``KEY.cls``, ``KEY.jpg``; any
WebDataset reader reads them), train, test and val apart. Samples are shuffled (``split_seed``) before
sharding, so shards mix classes; tar members carry a fixed timestamp and owner, so the same inputs and
options give byte-identical shards. A process pool encodes shards into a hidden staging
folder beside ``--out``; the manifest is written last (tmp + ``os.replace``), then the staging folder
replaces ``--out``, so a failed build leaves whatever was in ``--out`` untouched.

Splits: ``test`` comes from the source (a ``test/`` or ``val/`` folder, a saved ``test`` or ``validation``
split) or is held out of the images, stratified (``--test-fraction``, ``--split-seed``). ``val`` comes
from the source where it has both (``val/`` beside ``test/``; ``validation`` beside ``test``), or is carved
out of train with ``--val-fraction F``: per class ``round(F·n)`` images, at least 1 and at most ``n − 1``,
drawn with a seed derived from ``--val-seed``; the digits source carves it through
:func:`lgm_ray.digits.load_digits_split`, so the shards' ``val`` equals the in-memory one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from lgm_ray import __version__
from lgm_ray.atomic import write_text
from lgm_ray.seeds import derive_seed
from lgm_ray.shards_decode import resize_short
from lgm_ray.shards_format import FORMAT_VERSION, MANIFEST_NAME, ShardError

SOURCES = ("digits", "imagefolder", "hf")
SPLITS = ("train", "test", "val")  # this order seeds each split's shard shuffle: do not reorder
HELD_OUT_DIRS = ("test", "val", "validation")  # image-folder names that are splits, never classes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

Item = tuple[Any, int]  # (reference the encoder can open, class index)


@dataclass
class Source:
    """A source resolved into class names and, per split, (reference, label) items."""

    kind: str
    path: str | None
    class_names: list[str]
    items: dict[str, list[Item]]
    split_method: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Encoding:
    """How every image is stored."""

    fmt: str
    quality: int
    real_res: int
    on_bad_sample: str


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its final path and its (key, reference, label) samples."""

    path: str
    split: str
    samples: list[tuple[str, Any, int]]
    enc: Encoding


def stratified_split(items: list[Item], fraction: float, seed: int, *, held_out: str = "test",
                     minimum: int = 0) -> dict[str, list[Item]]:
    """Hold out ``round(fraction * n)`` items of every class, at least ``minimum``, at most ``n − 1``.

    Returns ``{"train": …, held_out: …}``, class by class, each class in the items' order.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_class[item[1]].append(item)
    out: dict[str, list[Item]] = {"train": [], held_out: []}
    for c in sorted(by_class):
        group = by_class[c]
        k = min(len(group) - 1, max(minimum, round(fraction * len(group))))
        perm = rng.permutation(len(group))
        out[held_out] += [group[i] for i in sorted(perm[:k])]
        out["train"] += [group[i] for i in sorted(perm[k:])]
    return out


def carve_val(items: list[Item], fraction: float, seed: int, class_names: Sequence[str]
              ) -> dict[str, list[Item]]:
    """The validation carve: ``{"train", "val"}`` out of train items, stratified, ≥ 1 of each class each side.

    Raises:
        ShardError: a class has fewer than 2 train items, so it cannot give one to each side.
    """
    counts = np.bincount([y for _, y in items], minlength=len(class_names))
    if few := [class_names[c] for c, n in enumerate(counts) if n < 2]:
        raise ShardError(f"classes {few} have fewer than 2 train images, so a validation split (≥ 1 per "
                         "class, ≥ 1 left for training) cannot be held out; add images or build without "
                         "--val-fraction")
    return stratified_split(items, fraction, derive_seed(seed, "val-split"), held_out="val", minimum=1)


def digits_source(real_res: int, val_fraction: float = 0.0, val_seed: int = 0) -> Source:
    """scikit-learn's digits in lgm_ray's fixed split, upsampled to ``real_res``; ``val`` carved if asked."""
    from lgm_ray.digits import CLASS_NAMES, load_digits_split

    items = {}
    for split in SPLITS if val_fraction > 0 else ("train", "test"):
        images, labels = load_digits_split(split, res=real_res, val_fraction=val_fraction, val_seed=val_seed)
        arrays = np.rint(images.numpy() * 255.0).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        items[split] = [(a, int(y)) for a, y in zip(arrays, labels.tolist(), strict=True)]
    return Source("digits", None, list(CLASS_NAMES), items, "fixed: lgm_ray.digits (stratified 80/20)",
                  {"originals": "8x8 grey, upsampled bilinearly to short_side by lgm_ray.digits"})


def _class_files(folder: Path, exclude: Sequence[str] = ()) -> dict[str, list[str]]:
    classes = sorted(d.name for d in folder.iterdir()
                     if d.is_dir() and not d.name.startswith(".") and d.name not in exclude)
    return {c: sorted(str(p) for p in (folder / c).rglob("*")
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            for c in classes}


def imagefolder_source(path: str, test_fraction: float, seed: int) -> Source:
    """Class folders ``DIR/CLASS/*.jpg`` or ``DIR/train/CLASS/…``, with held-out folders beside them.

    A held-out folder (``test``, ``val`` or ``validation``, holding the same class folders) is a split,
    never a class, with or without ``train/``: ``test/`` is the test split, else ``val/`` (ImageNet's
    layout) or ``validation/``; ``val/`` (or ``validation/``) beside ``test/`` is the val split. With no
    held-out folder, the test split is held out of the images here (``test_fraction``, ``seed``).
    """
    root = Path(path)
    if not root.is_dir():
        raise ShardError(f"image folder {root} does not exist or is not a folder")
    train_dir = root / "train" if (root / "train").is_dir() else root
    held = [root / n for n in HELD_OUT_DIRS if (root / n).is_dir()]
    train = _class_files(train_dir, HELD_OUT_DIRS if train_dir == root else ())
    if not train:
        raise ShardError(f"{train_dir} holds no class sub-folders; lay it out as DIR/CLASS/IMAGE "
                         "or DIR/train/CLASS/IMAGE (+ DIR/test/CLASS/IMAGE)")
    if empty := [str(train_dir / name) for name, files in train.items() if not files]:
        raise ShardError(f"class folders {empty} hold no images ({' '.join(IMAGE_SUFFIXES)}); add images or "
                         "remove those folders")
    names = list(train)
    flat = [(f, i) for i, name in enumerate(names) for f in train[name]]
    if not held:
        return Source("imagefolder", str(root.resolve()), names, stratified_split(flat, test_fraction, seed),
                      f"stratified hold-out, test fraction {test_fraction}, seed {seed}")
    items: dict[str, list[Item]] = {"train": flat}
    for split, folder in zip(("test", "val"), held[:2], strict=False):
        files = _class_files(folder)
        if unknown := sorted(set(files) - set(names)):
            raise ShardError(f"{split} classes {unknown} in {folder} have no folder in {train_dir}")
        items[split] = [(f, names.index(c)) for c, fs in files.items() for f in fs]
    method = "folders: " + ", ".join([train_dir.name if train_dir != root else "(class folders)",
                                      *(f.name for f in held[:2])])
    return Source("imagefolder", str(root.resolve()), names, items, method)


def hf_source(path: str, image_column: str, label_column: str, test_fraction: float, seed: int) -> Source:
    """A ``datasets`` Dataset or DatasetDict saved with ``save_to_disk``."""
    import datasets

    try:
        saved = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, … for unusable folders
        raise ShardError(f"cannot load a save_to_disk dataset from {path} ({type(e).__name__}: {e})") from e
    if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved:
            raise ShardError(f"{path} has splits {list(saved)} but no 'train' split")
        parts = {"train": ("train", saved["train"])}
        held = [n for n in ("test", "validation") if n in saved]
        for split, name in zip(("test", "val"), held, strict=False):  # validation is test unless test exists
            parts[split] = (name, saved[name])
    else:
        parts = {"train": (None, saved)}
    first = parts["train"][1]
    for col in (image_column, label_column):
        if col not in first.column_names:
            raise ShardError(f"{path}: no column {col!r} (columns: {first.column_names}); "
                             "name them with --image-column / --label-column")
    raw = {s: list(ds[label_column]) for s, (_, ds) in parts.items()}
    values, feature = {v for vs in raw.values() for v in vs}, first.features[label_column]
    if isinstance(feature, datasets.ClassLabel) or all(isinstance(v, int) and v >= 0 for v in values):
        names = list(getattr(feature, "names", None) or map(str, range(max(values, default=0) + 1)))
        index = {i: i for i in range(len(names))}
    else:  # string labels: classes in sorted order
        names = sorted({str(v) for v in values})
        index = {v: names.index(str(v)) for v in values}
    items: dict[str, list[Item]] = {}
    for split, (name, _) in parts.items():
        items[split] = []
        for row, value in enumerate(raw[split]):
            if value not in index:
                raise ShardError(f"{path}: row {row} of split {name or '(single)'} has label {value!r}, "
                                 f"not one of the {len(names)} classes")
            items[split].append((("hf", path, name, row, image_column), index[value]))
    if "test" in parts:
        method = "saved splits: " + ", ".join(str(name) for name, _ in parts.values())
    else:
        items = stratified_split(items["train"], test_fraction, seed)
        method = f"stratified hold-out, test fraction {test_fraction}, seed {seed}"
    extra = {"image_column": image_column, "label_column": label_column}
    return Source("hf", str(Path(path).resolve()), names, items, method, extra)


@lru_cache(maxsize=4)
def _hf_column(path: str, split: str | None, column: str) -> Any:
    import datasets

    saved = datasets.load_from_disk(path)
    ds = saved[split] if split is not None else saved
    if isinstance(ds.features[column], datasets.Image):  # raw bytes: our own decoder reports errors
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds.select_columns([column])


def open_ref(ref: Any) -> Image.Image:
    """Open an item reference (digits array, file path or HF row) as an RGB image."""
    if isinstance(ref, np.ndarray):
        return Image.fromarray(ref)
    if not isinstance(ref, str):
        _, path, split, row, column = ref
        ref = _hf_column(path, split, column)[row][column]
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, Image.Image):
            return ref.convert("RGB")
        if not isinstance(ref, (str, bytes)):
            return Image.fromarray(np.asarray(ref, dtype=np.uint8))
    with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
        return img.convert("RGB")


def describe(ref: Any) -> str:
    """Where an item comes from, for messages."""
    if isinstance(ref, (str, np.ndarray)):
        return f"image file {ref}" if isinstance(ref, str) else "a digits image"
    return f"row {ref[3]} of split {ref[2] or '(single)'} in {ref[1]}"


def encode(img: Image.Image, enc: Encoding) -> bytes:
    """Resize the short side to ``enc.real_res`` and encode."""
    img = resize_short(img.convert("RGB"), enc.real_res)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=enc.quality) if enc.fmt == "jpg" else img.save(buf, "PNG")
    return buf.getvalue()


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Encode and write one shard (run in a pool worker); return its manifest entry and labels."""
    name, tmp = os.path.basename(task.path), task.path + ".part"
    labels, skipped = [], []
    # webdataset's writer: members KEY.cls and KEY.<fmt>; mtime 0 and fixed owners, so identical inputs
    # give identical shards.
    with wds.TarWriter(tmp, encoder=False, mtime=0, user="lgm_ray", group="lgm_ray") as sink:
        for key, ref, label in task.samples:
            try:
                payload = encode(open_ref(ref), task.enc)
            except Exception as e:  # PIL and datasets raise many types on bad files
                reason = f"does not decode ({type(e).__name__}: {e})"
                if task.enc.on_bad_sample == "raise":
                    raise ShardError(f"{describe(ref)} {reason} (key {key}, shard {name}); fix or remove it, "
                                     "or pass --on-bad-sample skip to leave such images out") from None
                skipped.append({"shard": name, "key": key, "source": describe(ref), "reason": reason})
                continue
            sink.write({"__key__": key, task.enc.fmt: payload, "cls": str(label).encode("ascii")})
            labels.append(label)
    if not labels:
        os.remove(tmp)
        return {"name": name, "split": task.split, "count": 0, "labels": [], "skipped": skipped}
    sha = hashlib.sha256()
    with open(tmp, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    os.replace(tmp, task.path)
    return {"name": name, "split": task.split, "count": len(labels), "sha256": sha.hexdigest(),
            "bytes": os.path.getsize(task.path), "labels": labels, "skipped": skipped}


def plan_tasks(source: Source, folder: Path, enc: Encoding, shard_size: int, seed: int) -> list[ShardTask]:
    """Shuffle each split, name its samples ``SPLIT_000123`` in that order and cut it into shards."""
    tasks = []
    for s, split in enumerate(SPLITS):
        items = source.items.get(split, [])
        order = np.random.default_rng([seed, s]).permutation(len(items))
        width = max(6, len(str(len(items))))
        keyed = [(f"{split}_{i:0{width}d}", *items[j]) for i, j in enumerate(order)]
        for n, start in enumerate(range(0, len(keyed), shard_size)):
            path = str(folder / f"{split}-{n:06d}.tar")
            tasks.append(ShardTask(path, split, keyed[start:start + shard_size], enc))
    return tasks


def run_tasks(tasks: list[ShardTask], workers: int) -> list[dict[str, Any]]:
    """Write shards, in a process pool when ``workers > 1``; a line per shard on stderr."""
    results = []

    def report(r: dict[str, Any]) -> None:
        results.append(r)
        size = f"{r['bytes'] / 1e6:.2f} MB" if r["count"] else "empty, dropped"
        print(f"[shards] {r['name']}: {r['count']} samples, {size} ({len(results)}/{len(tasks)})",
              file=sys.stderr, flush=True)

    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            report(write_shard(task))
    else:
        pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)))
        try:
            for future in as_completed([pool.submit(write_shard, t) for t in tasks]):
                report(future.result())
        finally:
            pool.shutdown(cancel_futures=True)
    return sorted((r for r in results if r["count"]), key=lambda r: (SPLITS.index(r["split"]), r["name"]))


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} exists and is not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ShardError(f"output folder {out} is not empty; pass --overwrite to replace it (the old set "
                         "stays until the new one is complete) or choose another --out")
    if strangers := sorted(p.name for p in out.iterdir() if p.name != MANIFEST_NAME and p.suffix != ".tar"):
        raise ShardError(f"output folder {out} holds files not from a shard set ({strangers[:5]}); "
                         "--overwrite only replaces shard-set folders: move them or choose another --out")


def _require_train_images(names: list[str], counts: list[int], where: str) -> None:
    if missing := [name for name, n in zip(names, counts, strict=True) if n == 0]:
        raise ShardError(f"classes {missing} have no train images {where}; add some or drop those classes")


def _swap_in(staging: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build(source: str, path: str | None = None, *, out: str, real_res: int | None = None,
          fmt: str | None = None, quality: int = 95, shard_size: int = 1000, workers: int | None = None,
          test_fraction: float = 0.1, split_seed: int = 0, val_fraction: float = 0.0, val_seed: int = 0,
          overwrite: bool = False, on_bad_sample: str = "raise", image_column: str = "image",
          label_column: str = "label", command: Sequence[str] | None = None) -> dict[str, Any]:
    """Build a shard set (see the module docstring and ``python -m lgm_ray.shards build -h``).

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        ShardError: bad source (missing folder or column, empty class, undecodable image) or ``out``.
        ValueError: bad options.
    """
    real_res = real_res or (32 if source == "digits" else 256)
    fmt = fmt or ("png" if source == "digits" else "jpg")
    workers = workers or os.cpu_count() or 1
    if source not in SOURCES or (path is None) != (source == "digits"):
        raise ValueError(f"source must be 'digits' or 'imagefolder DIR' or 'hf DIR', got {source!r} {path!r}")
    if real_res < 1 or shard_size < 1 or not 1 <= quality <= 100 or not 0.0 <= test_fraction < 1.0:
        raise ValueError("need --real-res ≥ 1, --shard-size ≥ 1, --quality 1..100, --test-fraction in [0, 1)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"need --val-fraction in [0, 1), got {val_fraction}")
    target = Path(out)
    _check_out(target, overwrite)
    started = time.monotonic()
    src = (digits_source(real_res, val_fraction, val_seed) if source == "digits"
           else imagefolder_source(str(path), test_fraction, split_seed) if source == "imagefolder"
           else hf_source(str(path), image_column, label_column, test_fraction, split_seed))
    train_counts = np.bincount([y for _, y in src.items["train"]], minlength=len(src.class_names)).tolist()
    _require_train_images(src.class_names, train_counts, f"in {path or source}")
    if val_fraction > 0 and source != "digits":
        if "val" in src.items:
            raise ShardError(f"{path} brings its own validation split ({src.split_method}); build without "
                             "--val-fraction, or move that folder away to carve one out of train")
        src.items.update(carve_val(src.items["train"], val_fraction, val_seed, src.class_names))
    if val_fraction > 0:
        src.split_method += f"; val: stratified carve from train, fraction {val_fraction}, seed {val_seed}"
    splits = [s for s in SPLITS if s != "val" or "val" in src.items]
    flags = {"out": out, "real-res": real_res, "format": fmt, "quality": quality, "shard-size": shard_size,
             "test-fraction": test_fraction, "split-seed": split_seed, "on-bad-sample": on_bad_sample}
    if val_fraction > 0:
        flags.update({"val-fraction": val_fraction, "val-seed": val_seed})
    args = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    command = command or ["build", source, *([path] if path else []), *args]
    staging = target.parent / f".{target.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        enc = Encoding(fmt, quality, real_res, on_bad_sample)
        tasks = plan_tasks(src, staging, enc, shard_size, split_seed)
        sizes = ", ".join(f"{s} {len(src.items.get(s, []))}" for s in splits)
        print(f"[shards] building {target} from {path or source}: {sizes} images, {len(src.class_names)} "
              f"classes, {len(tasks)} shards, {workers} workers", file=sys.stderr, flush=True)
        results = run_tasks(tasks, workers)
        counts = {s: [0] * len(src.class_names) for s in splits}
        for r in results:
            for label in r.pop("labels"):
                counts[r["split"]][label] += 1
        skipped = [s for r in results for s in r.pop("skipped")]
        _require_train_images(src.class_names, counts["train"], f"without {len(skipped)} undecodable ones")
        manifest = {
            "format": "lgm_ray.shards", "format_version": FORMAT_VERSION, "name": target.name,
            "source": {"kind": src.kind, "path": src.path, **src.extra},
            "class_names": src.class_names, "counts": counts,
            "image": {"encoding": fmt, "quality": quality if fmt == "jpg" else None, "short_side": real_res,
                      "resize": "short side to short_side, bilinear, antialiased, uncropped", "mode": "RGB"},
            "split": {"method": src.split_method, "seed": split_seed,
                      **({"val_fraction": val_fraction, "val_seed": val_seed} if val_fraction > 0 else {})},
            "shard_size": shard_size, "shards": results, "skipped": skipped,
            "command": shlex.join(["python", "-m", "lgm_ray.shards", *command]),
            "lgm_ray_version": __version__,
        }
        write_text(staging / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"[shards] wrote {target}: {len(results)} shards, {len(skipped)} images skipped "
          f"({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
    return manifest
