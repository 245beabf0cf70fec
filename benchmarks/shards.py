"""Images per second per core and peak memory: lgm_ray's webdataset reader vs the previous reader vs
torchvision ``ImageFolder`` + ``DataLoader``.

**Speed.** Writes a synthetic image set (JPEG 400×320, smooth gradients, shapes and sensor-like noise, 10
classes) into a temporary folder, builds shards from it with ``lgm_ray.shards.reader`` (short side 256, JPEG
quality 95, no test split), then reads a fixed number of images three ways with the same preprocessing
(resize short side 256, random crop 256, float tensor in [0, 1]) and the same number of worker processes:

* ``ImageFolder``: torchvision's dataset, shuffled ``DataLoader``;
* ``old``: the reader lgm_ray had before the webdataset pipeline (git 5caf9e1: a whole shard read, hashed
  and parsed with ``tarfile`` in a worker, decoded whole), copied into this file for the comparison;
* ``new``: ``ShardSet.train_batches`` — tars streamed through webdataset in the main process, a
  shuffle buffer, each step's samples decoded in the decode pool.

    python benchmarks/shards.py --workers 0 1 2 [--images 2000] [--measure 1920] [--streams 1]

The first batch of each run (worker start-up, first shard) is not timed; the figures are medians of
alternating rounds. Per core divides by the worker count (0 counts as 1; the main process, which reads
the tars for ``new`` and cuts batches for all three, is not counted).

**Memory.** Then writes a set of large shards (``--big-shards`` of ``--big-mb`` MB each, JPEG 500×375
cycled from a pool of distinct images; default 2 × 200 MB, not 1 GB, to spare the disk) and reads
``--big-read`` images from them in a fresh process per reader (one stream, decoding in-process), reporting
the process's peak RSS (``VmHWM``) above its RSS after start-up (imports, manifest).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from heapq import merge
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# ---------------------------------------------------------------- the previous reader (git 5caf9e1)


@dataclass(frozen=True)
class _OldUnit:
    uid: int
    shard: int
    offset: int
    stride: int
    phase: int
    size: int
    rng_key: tuple[int, ...]
    stream: int
    skip: int = 0


class _OldReader:
    """The old unit decoder: reads a whole shard, checks its sha256, parses it with tarfile, decodes all."""

    def __init__(self, root: str, manifest: dict[str, Any], cache_bytes: int = 64 << 20) -> None:
        self.root, self.manifest, self.cache_bytes = root, manifest, cache_bytes
        self.encoding = manifest["image"]["encoding"]
        self._cache: dict[int, list[tuple[str, dict[str, bytes]]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def samples(self, shard: int) -> list[tuple[str, dict[str, bytes]]]:
        if shard in self._cache:
            return self._cache[shard]
        entry = self.manifest["shards"][shard]
        with open(os.path.join(self.root, entry.get("url") or entry["name"]), "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise RuntimeError(f"shard {entry['name']}: sha256 differs")
        samples: list[tuple[str, dict[str, bytes]]] = []
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                stem, _, ext = member.name.partition(".")
                payload = tar.extractfile(member).read()  # type: ignore[union-attr]
                if samples and samples[-1][0] == stem:
                    samples[-1][1][ext] = payload
                else:
                    samples.append((stem, {ext: payload}))
        if entry["bytes"] <= self.cache_bytes:
            self._cache = {shard: samples}
        return samples

    def decode_unit(self, unit: _OldUnit) -> tuple[int, torch.Tensor, torch.Tensor]:
        from lgm_ray.shards.decode import crop_array, resize_short

        samples = self.samples(unit.shard)
        picked = [s for p, s in enumerate(samples) if (unit.offset + p) % unit.stride == unit.phase]
        rng = np.random.default_rng(list(unit.rng_key))
        picked = [picked[i] for i in rng.permutation(len(picked))]
        offsets = rng.random((len(picked), 2))
        picked, offsets = picked[unit.skip:], offsets[unit.skip:]
        images = torch.empty((len(picked), 3, unit.size, unit.size), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            images.share_memory_()
        out, labels = images.numpy(), []
        for i, (_, parts) in enumerate(picked):
            with Image.open(io.BytesIO(parts[self.encoding])) as img:
                img = img.convert("RGB")
            out[i] = crop_array(resize_short(img, unit.size), unit.size, *offsets[i]).transpose(2, 0, 1)
            labels.append(int(parts["cls"]))
        return unit.uid, images, torch.tensor(labels)


def _old_units(streams: list[tuple[int, tuple, int]], seed: int, size: int) -> Iterator[_OldUnit]:
    from lgm_ray.core.seeds import derive_seed

    def needs(v: int, plan: tuple, share: int) -> Iterator[tuple[int, int, _OldUnit]]:
        first = 0
        for epoch in count():
            order = np.random.default_rng(derive_seed(seed, "real-order", v, epoch)).permutation(len(plan))
            for k in order:
                shard, offset, stride, phase, n = plan[k]
                key = (derive_seed(seed, "real-unit", v, epoch, shard),)
                yield first // share, v, _OldUnit(-1, shard, offset, stride, phase, size, key, v)
                first += n

    merged = merge(*(needs(v, plan, share) for v, plan, share in streams), key=lambda x: x[:2])
    for uid, (_, _, unit) in enumerate(merged):
        yield replace(unit, uid=uid)


class _OldUnitDataset(torch.utils.data.IterableDataset):
    def __init__(self, reader: _OldReader, units: Iterator[_OldUnit]) -> None:
        self.reader, self.units = reader, units

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        n, me = (1, 0) if info is None else (info.num_workers, info.id)
        for unit in self.units:
            if unit.uid % n == me:
                yield self.reader.decode_unit(unit)


def old_train_batches(root: str, batch_size: int, *, seed: int, num_streams: int, real_res: int,
                      num_workers: int) -> Generator[tuple[torch.Tensor, torch.Tensor]]:
    """The old ``ShardSet.train_batches`` (one rank of one, no bad samples): whole units in queues."""
    from lgm_ray.shards.reader import ShardSet

    plans = ShardSet(root)._stream_plans(num_streams)
    manifest = json.loads(Path(root, "manifest.json").read_text())
    shares = [batch_size // num_streams + (v < batch_size % num_streams) for v in range(num_streams)]
    active = [(v, plans[v], shares[v]) for v in range(num_streams) if shares[v]]
    units = _old_units(active, seed, real_res)
    reader = _OldReader(root, manifest)
    if num_workers == 0:
        decoded: Iterator[Any] = (reader.decode_unit(u) for u in units)
    else:
        ahead = max(2, -(-len(active) // num_workers) + 1)
        decoded = iter(torch.utils.data.DataLoader(_OldUnitDataset(reader, units), batch_size=None,
                                                   num_workers=num_workers, prefetch_factor=ahead))
    units = _old_units(active, seed, real_res)  # the same sequence again, to route units to streams
    queues: dict[int, deque[list[Any]]] = {v: deque() for v, _, _ in active}
    have = dict.fromkeys(queues, 0)
    while True:
        parts = []
        for v, _, share in active:
            while have[v] < share:
                unit, (_, images, labels) = next(units), next(decoded)
                queues[unit.stream].append([images, labels, 0])
                have[unit.stream] += len(labels)
            pieces, need = [], share
            while need:
                part = queues[v][0]
                k = min(need, len(part[1]) - part[2])
                pieces.append((part[0][part[2]:part[2] + k], part[1][part[2]:part[2] + k]))
                part[2] += k
                need -= k
                if part[2] == len(part[1]):
                    queues[v].popleft()
            parts += pieces
            have[v] -= share
        yield torch.cat([p[0] for p in parts]).float().div_(255.0), torch.cat([p[1] for p in parts])


# ---------------------------------------------------------------- data and timing


def make_images(root: Path, n: int, classes: int = 10, size: tuple[int, int] = (400, 320),
                seed: int = 0) -> int:
    """Write ``n`` JPEGs into ``root/class_k/``; return their total size in bytes."""
    total = 0
    for i, jpeg in enumerate(synthetic_jpegs(n, classes, size, seed)):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(jpeg)
        total += len(jpeg)
    return total


def synthetic_jpegs(n: int, classes: int = 10, size: tuple[int, int] = (400, 320), seed: int = 0,
                    quality: int = 90) -> Iterator[bytes]:
    """``n`` JPEGs like photographs to a codec: gradients, flat shapes with edges, sensor-like noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        c = i % classes
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None]
        base = rng.uniform(40, 200, 3) + 60 * ramp * rng.uniform(-1, 1, 3)
        img = np.broadcast_to(base, (h, w, 3)).copy()
        for _ in range(4):
            x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
            img[y0:y0 + rng.integers(20, 120), x0:x0 + rng.integers(20, 160)] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 6 + 2 * c, img.shape)
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        yield buf.getvalue()


def timed(batches: Iterator[tuple[torch.Tensor, ...]], measure: int) -> float:
    """Images per second over ``measure`` images after the first (untimed) batch."""
    next(batches)
    seen, start = 0, time.perf_counter()
    while seen < measure:
        seen += len(next(batches)[0])
    return seen / (time.perf_counter() - start)


def imagefolder_batches(root: Path, batch_size: int, workers: int) -> Generator[tuple[torch.Tensor, ...]]:
    """Endless shuffled batches from torchvision's ImageFolder."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(256), transforms.RandomCrop(256), transforms.ToTensor()])
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root), transform=tf), batch_size=batch_size, shuffle=True,
        num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    while True:
        yield from loader


def load() -> str:
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def speed(args: argparse.Namespace, tmp: Path) -> None:
    from lgm_ray.shards.build import build
    from lgm_ray.shards.reader import ShardSet

    src, out = tmp / "images", tmp / "shards"
    start = time.perf_counter()
    total = make_images(src, args.images)
    print(f"generated {args.images} JPEG 400x320 images, {total / args.images / 1e3:.0f} kB each on "
          f"average, 10 classes ({time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    manifest = build("imagefolder", str(src), out=str(out), real_res=256, shard_size=args.shard_size,
                     test_fraction=0.0, workers=max(max(args.workers), 1))
    stored = sum(e["bytes"] for e in manifest["shards"])
    print(f"built {len(manifest['shards'])} shards, short side 256, {stored / args.images / 1e3:.0f} kB "
          f"per sample, in {time.perf_counter() - start:.1f} s")
    shards = ShardSet(str(out))
    print(f"load average before timing: {load()} (other processes on this machine skew the figures)")
    print(f"\n{'workers':>7}  {'ImageFolder':>11}  {'old':>6}  {'new':>6}  {'IF/core':>7}  {'old/core':>8}  "
          f"{'new/core':>8}  {'new/IF':>6}  {'new/old':>7}   (images/s)")
    for workers in args.workers:
        rates: dict[str, list[float]] = {"folder": [], "old": [], "new": []}
        for _ in range(args.rounds):  # alternate, so that a burst of outside load hits all three
            for name in rates:
                if name == "folder":
                    batches = imagefolder_batches(src, args.batch_size, workers)
                elif name == "old":
                    batches = old_train_batches(str(out), args.batch_size, seed=0, num_streams=args.streams,
                                                real_res=256, num_workers=workers)
                else:
                    batches = shards.train_batches(args.batch_size, seed=0, real_res=256,
                                                   num_streams=args.streams, num_workers=workers)
                rates[name].append(timed(batches, args.measure))
                batches.close()
        folder, old, new = (float(np.median(r)) for r in rates.values())
        c = max(workers, 1)
        print(f"{workers:>7}  {folder:>11.0f}  {old:>6.0f}  {new:>6.0f}  {folder / c:>7.0f}  {old / c:>8.0f}  "
              f"{new / c:>8.0f}  {new / folder:>6.2f}  {new / old:>7.2f}")
    print(f"(medians of {args.rounds} alternating rounds of {args.measure} images, {args.streams} stream(s); "
          f"load average after: {load()})")


# ---------------------------------------------------------------- memory


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_child(reader: str, root: str, n: int, streams: int, buffer: int) -> None:
    """Read ``n`` images with one reader and print start-up RSS and peak RSS (kB) as JSON."""
    from lgm_ray.shards.reader import ShardSet

    shards = ShardSet(root)
    base = _rss_kb("VmRSS")
    if reader == "old":
        batches = old_train_batches(root, 64, seed=0, num_streams=streams, real_res=256, num_workers=0)
    else:
        batches = shards.train_batches(64, seed=0, real_res=256, num_streams=streams, num_workers=0,
                                       shuffle_buffer=buffer)
    seen, start = 0, time.perf_counter()
    while seen < n:
        seen += len(next(batches)[0])
    print(json.dumps({"base_kb": base, "peak_kb": _rss_kb("VmHWM"), "seconds": time.perf_counter() - start}))


def memory(args: argparse.Namespace, tmp: Path) -> None:
    import webdataset as wds

    from lgm_ray.shards.index import index

    folder = tmp / "big"
    folder.mkdir()
    pool = list(synthetic_jpegs(64, size=(500, 375), seed=1, quality=95))
    per = int(args.big_mb * 1e6 // (np.mean([len(j) for j in pool]) + 1024))
    start = time.perf_counter()
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=per, encoder=False, verbose=0) as sink:
        for i in range(per * args.big_shards):
            sink.write({"__key__": f"s{i:07d}", "jpg": pool[i % len(pool)], "cls": str(i % 10).encode()})
    sizes = [p.stat().st_size for p in sorted(folder.glob("*.tar"))]
    index(str(folder / "train-*.tar"), out=str(folder))
    print(f"\nwrote {len(sizes)} shards of {per} JPEG 500x375 samples, {np.mean(sizes) / 1e6:.0f} MB each "
          f"({time.perf_counter() - start:.1f} s), indexed in place")
    print(f"peak RSS reading {args.big_read} images (batch 64, random crop 256, decoding in the reading "
          f"process), above the process's RSS after start-up; load average {load()}")
    for reader, streams, buffer in (("old", 1, 0), ("new", 1, 1000), ("new", 1, 100), ("new", 2, 1000)):
        proc = subprocess.run([sys.executable, __file__, "--rss-child", reader, str(folder), str(args.big_read),
                               str(streams), str(buffer)], capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        what = "old (whole shards)" if reader == "old" else f"new, shuffle buffer {buffer}"
        print(f"  {what:<26} {streams} stream(s): peak {r['peak_kb'] / 1e3:7.0f} MB, above start-up "
              f"{(r['peak_kb'] - r['base_kb']) / 1e3:7.0f} MB ({args.big_read / r['seconds']:.0f} img/s)")


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print the figures."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rss-child"]:
        rss_child(argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts")
    parser.add_argument("--images", type=int, default=2000, help="synthetic images to generate")
    parser.add_argument("--measure", type=int, default=1920, help="images timed per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per worker count")
    parser.add_argument("--streams", type=int, default=1, help="virtual streams of the shard readers")
    parser.add_argument("--big-shards", type=int, default=2, help="large shards for the memory figures")
    parser.add_argument("--big-mb", type=float, default=200, help="size of each large shard in MB")
    parser.add_argument("--big-read", type=int, default=3000, help="images read from the large shards")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_speed:
            speed(args, Path(tmp))
        if not args.skip_memory:
            memory(args, Path(tmp))


if __name__ == "__main__":
    main()
