"""Decoded images per second per core: lgm_ray shards vs torchvision ``ImageFolder`` + ``DataLoader``.

Writes a synthetic image set (JPEG 400×320, smooth gradients, shapes and sensor-like noise, 10 classes)
into a temporary folder, builds shards from it with ``lgm_ray.shards`` (short side 256, JPEG quality 95,
no test split), then reads a fixed number of images both ways with the same preprocessing (resize
short side 256, random crop 256, float tensor in [0, 1]) and the same number of worker processes:

    python benchmarks/shards.py --workers 1 2 [--images 2000] [--measure 1920] [--batch-size 64] [--streams 1]

The first batch of each run (worker start-up, first shard) is not timed; the figures are medians of
alternating rounds. Per core divides by the worker count (0 counts as 1). Both pipelines leave their
main process some work: ImageFolder's receives collated batches, the shard stream's cuts decoded
uint8 shards into batches and converts them to float. The shards are read as a training run reads them
(``ShardSet.train_batches``, one rank of one), from ``--streams`` virtual streams: 1 by default, which
decodes one shard at a time and so times decoding itself. With 8 streams (a run's default) all 8 start
together, so the untimed first batch decodes one shard per stream — with the default 2000 images in 8
shards, the whole set; pass ``--measure`` of several times ``--images`` to time the steady state.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(root: Path, n: int, classes: int = 10, size: tuple[int, int] = (400, 320),
                seed: int = 0) -> int:
    """Write ``n`` JPEGs into ``root/class_k/``; return their total size in bytes."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    total = 0
    for i in range(n):
        c = i % classes
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None]
        base = rng.uniform(40, 200, 3) + 60 * ramp * rng.uniform(-1, 1, 3)
        img = np.broadcast_to(base, (h, w, 3)).copy()
        for _ in range(4):  # a few flat shapes give edges like a real scene's
            x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
            img[y0:y0 + rng.integers(20, 120), x0:x0 + rng.integers(20, 160)] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 6 + 2 * c, img.shape)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        total += path.stat().st_size
    return total


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


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts (default 2)")
    parser.add_argument("--images", type=int, default=2000, help="synthetic images to generate")
    parser.add_argument("--measure", type=int, default=1920, help="images timed per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per worker count")
    parser.add_argument("--streams", type=int, default=1,
                        help="virtual streams of the shard reader (default 1)")
    args = parser.parse_args(argv)

    from lgm_ray.shards import ShardSet
    from lgm_ray.shards_build import build

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "images", Path(tmp) / "shards"
        start = time.perf_counter()
        total = make_images(src, args.images)
        print(f"generated {args.images} JPEG 400x320 images, {total / args.images / 1e3:.0f} kB each on "
              f"average, 10 classes ({time.perf_counter() - start:.1f} s)")
        start = time.perf_counter()
        manifest = build("imagefolder", str(src), out=str(out), real_res=256, shard_size=args.shard_size,
                         test_fraction=0.0, workers=max(args.workers))
        stored = sum(e["bytes"] for e in manifest["shards"])
        print(f"built {len(manifest['shards'])} shards, short side 256, {stored / args.images / 1e3:.0f} kB "
              f"per sample, in {time.perf_counter() - start:.1f} s with {max(args.workers)} processes")
        shards = ShardSet(str(out))
        print(f"load average before timing: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
              f"(other processes on this machine skew the figures)")
        print(f"\n{'workers':>7}  {'ImageFolder img/s':>17}  {'shards img/s':>12}  {'per core IF':>11}  "
              f"{'per core shards':>15}  {'ratio':>5}")
        for workers in args.workers:
            rates: dict[str, list[float]] = {"folder": [], "shards": []}
            for _ in range(args.rounds):  # alternate, so that a burst of outside load hits both
                for name in rates:
                    if name == "folder":
                        batches = imagefolder_batches(src, args.batch_size, workers)
                    else:
                        batches = shards.train_batches(args.batch_size, seed=0, real_res=256,
                                                       num_streams=args.streams, num_workers=workers)
                    rates[name].append(timed(batches, args.measure))
                    batches.close()
            folder, sharded = (float(np.median(r)) for r in rates.values())
            cores = max(workers, 1)
            print(f"{workers:>7}  {folder:>17.0f}  {sharded:>12.0f}  {folder / cores:>11.0f}  "
                  f"{sharded / cores:>15.0f}  {sharded / folder:>5.2f}")
        print(f"(medians of {args.rounds} alternating rounds of {args.measure} images; "
              f"load average after: {os.getloadavg()[0]:.1f})")

if __name__ == "__main__":
    main()
