"""Helpers of the shard tests: write source images, read and rewrite tars and manifests (with
tarfile, independently of the code under test)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_images(folder: Path, per_class: dict[str, int], sizes: Callable[[int], tuple[int, int]],
                 fmt: str = "PNG", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, n in per_class.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = sizes(i)
            ext = "png" if fmt == "PNG" else "jpg"
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.{ext}", fmt)


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def tar_labels(root: Path, split: str) -> dict[str, int]:
    """key → class index, read straight from the tars (independent of the reader under test)."""
    out = {}
    for shard in sorted(root.glob(f"{split}-*.tar")):
        for name, payload in tar_members(shard):
            if name.endswith(".cls"):
                out[name[:-4]] = int(payload)
    return out


def read_manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def save_manifest(root: Path, m: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(m))


def rewrite_shard(root: Path, name: str, edit: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]],
                  raw: Callable[[bytes], bytes] = lambda b: b) -> None:
    """Rewrite a shard's members and re-seal its manifest entry (as a faulty build would have)."""
    path = root / name
    members = edit(tar_members(path))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member, payload in members:
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = raw(buf.getvalue())
    path.write_bytes(data)
    m = read_manifest(root)
    entry = next(e for e in m["shards"] if e["name"] == name)
    entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    save_manifest(root, m)


Members = list[tuple[str, bytes]]  # a tar's (name, bytes) in order


def replace_member(member: str, payload: bytes) -> Callable[[Members], Members]:
    return lambda members: [(n, payload if n == member else p) for n, p in members]


def first_key(root: Path, name: str) -> str:
    return tar_members(root / name)[0][0].split(".")[0]


def image_bytes(image: torch.Tensor) -> bytes:
    return image.mul(255).round().to(torch.uint8).numpy().tobytes()


def take(stream: Iterator, n: int) -> list:
    out = list(islice(stream, n))
    stream.close()
    return out
