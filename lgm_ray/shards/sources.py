"""Where a shard build's images come from: scikit-learn's digits, an image folder, a saved HF dataset.

Each source is resolved into a :class:`Source` — class names and, per split, ``(reference, label)``
items — before anything is encoded; :func:`open_ref` opens a reference as an RGB image and
:func:`describe` names it in messages. The splits are the source's own (a ``test/`` or ``val/``
folder, a saved ``test`` / ``validation`` split, the digits' fixed split) or held out here, stratified
(:func:`~lgm_ray.shards.splits.stratified_split`); :func:`~lgm_ray.shards.splits.carve_val` carves
``val`` out of train. :mod:`lgm_ray.shards.build`
writes the shards from a :class:`Source`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lgm_ray.common.suggest import did_you_mean
from lgm_ray.shards.format import SPLITS, ShardError
from lgm_ray.shards.splits import Item, stratified_split

SOURCES = ("digits", "imagefolder", "hf")
HELD_OUT_DIRS = ("test", "val", "validation")  # image-folder names that are splits, never classes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

@dataclass
class Source:
    """A source resolved into class names and, per split, (reference, label) items."""

    kind: str
    path: str | None
    class_names: list[str]
    items: dict[str, list[Item]]
    split_method: str
    extra: dict[str, Any] = field(default_factory=dict)


def digits_source(real_res: int, val_fraction: float = 0.0, val_seed: int = 0) -> Source:
    """scikit-learn's digits in lgm_ray's fixed split, upsampled to ``real_res``; ``val`` carved if asked."""
    from lgm_ray.shards.digits import CLASS_NAMES, load_digits_split

    items = {}
    for split in SPLITS if val_fraction > 0 else ("train", "test"):
        images, labels = load_digits_split(split, res=real_res, val_fraction=val_fraction, val_seed=val_seed)
        arrays = np.rint(images.numpy() * 255.0).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        items[split] = [(a, int(y)) for a, y in zip(arrays, labels.tolist(), strict=True)]
    return Source("digits", None, list(CLASS_NAMES), items, "fixed: lgm_ray.shards.digits (stratified 80/20)",
                  {"originals": "8x8 grey, upsampled bilinearly to short_side by lgm_ray.shards.digits"})


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
            raise ShardError(f"{path}: no column {col!r}{did_you_mean(col, first.column_names)} (columns: "
                             f"{first.column_names}); name them with --image-column / --label-column")
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
