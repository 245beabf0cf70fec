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
:func:`lgm_ray.shards.digits.load_digits_split`, so the shards' ``val`` equals the in-memory one. The
sources and their splits are resolved in :mod:`lgm_ray.shards.sources`; this module encodes and writes.
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
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from lgm_ray import __version__
from lgm_ray.common.atomic import write_text
from lgm_ray.shards.decode import resize_short
from lgm_ray.shards.format import FORMAT_VERSION, MANIFEST_NAME, SPLITS, ShardError
from lgm_ray.shards.sources import (
    SOURCES,
    Source,
    describe,
    digits_source,
    hf_source,
    imagefolder_source,
    open_ref,
)
from lgm_ray.shards.splits import carve_val


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
    _check_options(source, path, real_res, shard_size, quality, test_fraction, val_fraction)
    target = Path(out)
    _check_out(target, overwrite)
    started = time.monotonic()
    src = _resolve(source, path, real_res, test_fraction, split_seed, val_fraction, val_seed, image_column,
                   label_column)
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
        print(f"[shards] building {target} from {path or source}: {_sizes(src)} images, "
              f"{len(src.class_names)} classes, {len(tasks)} shards, {workers} workers", file=sys.stderr,
              flush=True)
        results = run_tasks(tasks, workers)
        counts, skipped = _tally(src, results)
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


def _check_options(source: str, path: str | None, real_res: int, shard_size: int, quality: int,
                   test_fraction: float, val_fraction: float) -> None:
    if source not in SOURCES or (path is None) != (source == "digits"):
        raise ValueError(f"source must be 'digits' or 'imagefolder DIR' or 'hf DIR', got {source!r} {path!r}")
    if real_res < 1 or shard_size < 1 or not 1 <= quality <= 100 or not 0.0 <= test_fraction < 1.0:
        raise ValueError("need --real-res ≥ 1, --shard-size ≥ 1, --quality 1..100, --test-fraction in [0, 1)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"need --val-fraction in [0, 1), got {val_fraction}")


def _resolve(source: str, path: str | None, real_res: int, test_fraction: float, split_seed: int,
             val_fraction: float, val_seed: int, image_column: str, label_column: str) -> Source:
    """The source's classes and split items, with ``val`` carved out of train when asked."""
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
    return src


def _splits(src: Source) -> list[str]:
    """The splits the set will list: train and test always, val when the source has one."""
    return [s for s in SPLITS if s != "val" or "val" in src.items]


def _sizes(src: Source) -> str:
    return ", ".join(f"{s} {len(src.items.get(s, []))}" for s in _splits(src))


def _tally(src: Source, results: list[dict[str, Any]]) -> tuple[dict[str, list[int]], list[dict[str, Any]]]:
    """Per-class counts by split and the skipped images, taken out of the written shards' results."""
    counts = {s: [0] * len(src.class_names) for s in _splits(src)}
    for r in results:
        for label in r.pop("labels"):
            counts[r["split"]][label] += 1
    skipped = [s for r in results for s in r.pop("skipped")]
    _require_train_images(src.class_names, counts["train"], f"without {len(skipped)} undecodable ones")
    return counts, skipped
