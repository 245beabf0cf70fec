"""lgm_ray.shards.reader on real tar files written into tmp_path: build, verify, stream, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lgm_ray.shards.__main__ import main, verify
from lgm_ray.shards.build import build
from lgm_ray.shards.format import ShardError
from lgm_ray.shards.reader import ShardSet

# ---------------------------------------------------------------- helpers


def _write_images(folder: Path, per_class: dict[str, int], sizes: Callable[[int], tuple[int, int]],
                  fmt: str = "PNG", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, n in per_class.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = sizes(i)
            ext = "png" if fmt == "PNG" else "jpg"
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.{ext}", fmt)


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _tar_labels(root: Path, split: str) -> dict[str, int]:
    """key → class index, read straight from the tars (independent of the reader under test)."""
    out = {}
    for shard in sorted(root.glob(f"{split}-*.tar")):
        for name, payload in _tar_members(shard):
            if name.endswith(".cls"):
                out[name[:-4]] = int(payload)
    return out


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _save_manifest(root: Path, m: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(m))


def _rewrite_shard(root: Path, name: str, edit: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]],
                   raw: Callable[[bytes], bytes] = lambda b: b) -> None:
    """Rewrite a shard's members and re-seal its manifest entry (as a faulty build would have)."""
    path = root / name
    members = edit(_tar_members(path))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member, payload in members:
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = raw(buf.getvalue())
    path.write_bytes(data)
    m = _manifest(root)
    entry = next(e for e in m["shards"] if e["name"] == name)
    entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    _save_manifest(root, m)


def _replace(member: str, payload: bytes) -> Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]:
    return lambda members: [(n, payload if n == member else p) for n, p in members]


def _first_key(root: Path, name: str) -> str:
    return _tar_members(root / name)[0][0].split(".")[0]


def _h(image: torch.Tensor) -> bytes:
    return image.mul(255).round().to(torch.uint8).numpy().tobytes()


def _take(stream: Iterator, n: int) -> list:
    out = list(islice(stream, n))
    stream.close()
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def square_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes × 20 noise images 8×8 PNG, stored at 8 px: crops are the images themselves."""
    base = tmp_path_factory.mktemp("square")
    _write_images(base / "src", {"a": 20, "b": 20, "c": 20}, lambda i: (8, 8))
    out = base / "set"
    assert main(["build", "imagefolder", str(base / "src"), "--out", str(out), "--real-res", "8",
                 "--format", "png", "--shard-size", "10", "--test-fraction", "0.25", "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def rect_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes × 8 JPEG images of assorted sizes, stored at short side 8."""
    base = tmp_path_factory.mktemp("rect")
    _write_images(base / "src", {"emu": 8, "cat": 8, "dog": 8}, lambda i: (10 + i, 18 - i), fmt="JPEG")
    out = base / "set"
    assert main(["build", "imagefolder", str(base / "src"), "--out", str(out), "--real-res", "8",
                 "--shard-size", "5", "--test-fraction", "0.25", "--workers", "1"]) == 0
    return out


@pytest.fixture()
def bad_copy(square_set: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(square_set, tmp_path / "copy"))


# ---------------------------------------------------------------- build


def test_build_digits_manifest_and_contents(tmp_path: Path) -> None:
    from lgm_ray.shards.digits import load_digits_split

    out = tmp_path / "digits"
    assert main(["build", "digits", "--out", str(out), "--shard-size", "500"]) == 0
    m = _manifest(out)
    assert m["class_names"] == [str(i) for i in range(10)]
    assert m["image"]["encoding"] == "png" and m["image"]["short_side"] == 32
    assert m["command"].startswith("python -m lgm_ray.shards build digits --out")
    assert [e["name"] for e in m["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                                 "test-000000.tar"]
    for e in m["shards"]:
        data = (out / e["name"]).read_bytes()
        assert e["sha256"] == hashlib.sha256(data).hexdigest() and e["bytes"] == len(data)
    ref, labels = load_digits_split("test", 32)
    assert m["counts"]["test"] == torch.bincount(labels, minlength=10).tolist()
    assert m["counts"]["train"] == torch.bincount(load_digits_split("train", 32)[1], minlength=10).tolist()
    s = ShardSet(str(out))
    total, seen = torch.zeros(3, 32, 32), []
    for x, y, _ in s.iter_split("test", batch_size=100):
        total += x.sum(0)
        seen += y.tolist()
    assert sorted(seen) == sorted(labels.tolist())
    assert (total - ref.sum(0)).abs().max() / len(seen) < 1 / 255  # PNG of the rounded images: lossless
    again = tmp_path / "again"
    assert main(["build", "digits", "--out", str(again), "--shard-size", "500", "--workers", "1"]) == 0
    assert [e["sha256"] for e in _manifest(again)["shards"]] == [e["sha256"] for e in m["shards"]]


def test_build_imagefolder_stratified(rect_set: Path) -> None:
    m = _manifest(rect_set)
    assert m["class_names"] == ["cat", "dog", "emu"]
    assert m["counts"] == {"train": [6, 6, 6], "test": [2, 2, 2]}
    assert m["image"] == {**m["image"], "encoding": "jpg", "quality": 95, "short_side": 8}
    assert {e["name"] for e in m["shards"]} == {"train-000000.tar", "train-000001.tar", "train-000002.tar",
                                                "train-000003.tar", "test-000000.tar", "test-000001.tar"}
    for name, payload in _tar_members(rect_set / "train-000000.tar"):
        if name.endswith(".jpg"):
            assert min(Image.open(io.BytesIO(payload)).size) == 8
    assert set(_tar_labels(rect_set, "test").values()) == {0, 1, 2}


def test_build_imagefolder_train_test_folders(tmp_path: Path) -> None:
    _write_images(tmp_path / "src" / "train", {"x": 5, "y": 3}, lambda i: (9, 9))
    _write_images(tmp_path / "src" / "test", {"x": 2, "y": 1}, lambda i: (9, 9))
    m = build("imagefolder", str(tmp_path / "src"), out=str(tmp_path / "set"), real_res=9, workers=1)
    assert m["counts"] == {"train": [5, 3], "test": [2, 1]}
    assert m["split"]["method"].startswith("folders")
    assert "build imagefolder" in m["command"] and "--real-res 9" in m["command"]
    assert main(["verify", str(tmp_path / "set")]) == 0


def _hf_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)) for _ in range(n)]


def test_build_hf_dataset_dict_with_classlabel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["zebra", "ant"])})
    train = datasets.Dataset.from_dict({"image": _hf_images(6), "label": [0, 1] * 3}, features=features)
    val = datasets.Dataset.from_dict({"image": _hf_images(2), "label": [1, 0]}, features=features)
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "hf"))
    assert main(["build", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "set"),
                 "--real-res", "10"]) == 0
    m = _manifest(tmp_path / "set")
    assert m["class_names"] == ["zebra", "ant"]
    assert m["counts"] == {"train": [3, 3], "test": [1, 1]}
    assert "[shards] train-000000.tar: 6 samples" in capsys.readouterr().err  # progress, a line per shard
    assert main(["verify", str(tmp_path / "set")]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"])})
    datasets.Dataset.from_dict({"image": _hf_images(2), "label": [0, 1]}, features=features).save_to_disk(
        str(tmp_path / "hf_empty"))
    with pytest.raises(ShardError, match=r"classes \['c'\] have no train images"):
        build("hf", str(tmp_path / "hf_empty"), out=str(tmp_path / "empty"))


def test_build_hf_validation_beside_test_is_val(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["p", "q"])})
    parts = {name: datasets.Dataset.from_dict({"image": _hf_images(n), "label": [0, 1] * (n // 2)},
                                              features=features)
             for name, n in (("train", 6), ("validation", 4), ("test", 2))}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "hf"))
    m = build("hf", str(tmp_path / "hf"), out=str(tmp_path / "set"), real_res=6, workers=1)
    assert m["counts"] == {"train": [3, 3], "test": [1, 1], "val": [2, 2]}
    assert m["split"]["method"] == "saved splits: train, test, validation"


def test_build_hf_single_dataset_custom_columns(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features({"img": datasets.Image(), "y": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"img": _hf_images(12), "y": [0, 1, 2] * 4}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    assert main(["build", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "set"), "--real-res", "6",
                 "--image-column", "img", "--label-column", "y", "--test-fraction", "0.25"]) == 0
    m = _manifest(tmp_path / "set")
    assert m["class_names"] == ["0", "1", "2"] and m["counts"] == {"train": [3, 3, 3], "test": [1, 1, 1]}
    x, y, _ = next(ShardSet(str(tmp_path / "set")).iter_split("test"))
    assert x.shape == (3, 3, 6, 6)
    with pytest.raises(ShardError, match="no column 'image'"):
        build("hf", str(tmp_path / "hf"), out=str(tmp_path / "other"))


def test_overwrite_refused_then_replaced_and_kept_on_failure(square_set: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = Path(shutil.copytree(square_set, tmp_path / "set"))
    before = (out / "manifest.json").read_bytes()
    _write_images(tmp_path / "src", {"p": 3, "q": 3}, lambda i: (8, 8))
    args = ["build", "imagefolder", str(tmp_path / "src"), "--out", str(out), "--real-res", "8"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert (out / "manifest.json").read_bytes() == before
    (tmp_path / "src" / "r").mkdir()  # an empty class: this build fails, the old set must survive
    assert main([*args, "--overwrite"]) == 1
    assert "hold no images" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set", "src"]  # no staging folder left behind
    (tmp_path / "src" / "r").rmdir()
    assert main([*args, "--overwrite"]) == 0
    assert _manifest(out)["class_names"] == ["p", "q"] and not (out / "train-000004.tar").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="notes.txt"):
        build("imagefolder", str(tmp_path / "src"), out=str(out), overwrite=True)


def test_build_empty_class_folder(tmp_path: Path) -> None:
    _write_images(tmp_path / "src", {"a": 2}, lambda i: (8, 8))
    (tmp_path / "src" / "b").mkdir()
    with pytest.raises(ShardError, match=r"class folders \['.*b'\] hold no images"):
        build("imagefolder", str(tmp_path / "src"), out=str(tmp_path / "set"))
    assert not (tmp_path / "set").exists()


def test_build_skips_undecodable_source_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_images(tmp_path / "src", {"a": 4, "b": 4}, lambda i: (8, 8))
    (tmp_path / "src" / "a" / "broken.png").write_bytes(b"not a png")
    args = ["build", "imagefolder", str(tmp_path / "src"), "--out", str(tmp_path / "set"),
            "--test-fraction", "0"]
    assert main(args) == 1
    assert "broken.png does not decode" in capsys.readouterr().err
    assert main([*args, "--on-bad-sample", "skip"]) == 0
    m = _manifest(tmp_path / "set")
    assert m["counts"]["train"] == [4, 4] and len(m["skipped"]) == 1
    assert m["skipped"][0]["source"].endswith("broken.png")


@pytest.mark.parametrize("fixture", ["square_set", "rect_set"])
def test_webdataset_reads_the_shards(fixture: str, request: pytest.FixtureRequest) -> None:
    """Plain webdataset reads every image and label that ``build`` wrote (it wrote with TarWriter)."""
    import webdataset as wds

    root = request.getfixturevalue(fixture)
    s = ShardSet(str(root))
    ext = s.manifest["image"]["encoding"]
    for split in ("train", "test"):
        ds = wds.WebDataset(s.shard_urls(split), shardshuffle=False).decode("rgb8").to_tuple("__key__", ext, "cls")
        theirs = {k: (img.tobytes(), int(c)) for k, img, c in ds}
        ours = {k: (x.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy().tobytes(), int(y))
                for xs, ys, ks in s.iter_split(split, resize=8, crop=8) for x, y, k in zip(xs, ys, ks, strict=True)
                } if fixture == "square_set" else None  # 8×8 stored: ours are the images themselves
        assert len(theirs) == s.count(split) and {k: c for k, (_, c) in theirs.items()} == _tar_labels(root, split)
        if ours is not None:
            assert theirs == ours


def test_no_hand_written_tar_reading() -> None:
    """The tar work is webdataset's: lgm_ray's shard modules do not use tarfile themselves."""
    from lgm_ray.shards import build as shards_build
    from lgm_ray.shards import decode as shards_decode
    from lgm_ray.shards import format as shards_format
    from lgm_ray.shards import index as shards_index
    from lgm_ray.shards import io as shards_io
    from lgm_ray.shards import locate as shards_locate
    from lgm_ray.shards import reader as shards
    from lgm_ray.shards import sources as shards_sources
    from lgm_ray.shards import stream as shards_stream

    for module in (shards, shards_build, shards_decode, shards_format, shards_index, shards_io, shards_locate,
                   shards_sources, shards_stream):
        assert "tarfile" not in vars(module), module.__name__


# ---------------------------------------------------------------- stream


def test_verify_ok(square_set: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(square_set)]) == 0
    assert "OK" in capsys.readouterr().out
    problems, tolerated, _ = verify(str(square_set))
    assert problems == [] and tolerated == []


def test_shardset_basics(square_set: Path) -> None:
    s = ShardSet(str(square_set))
    assert s.class_names == ["a", "b", "c"] and s.num_classes == 3
    assert s.count("train") == 45 and s.count("test") == 15
    assert [Path(u).name for u in s.shard_urls("test")] == ["test-000000.tar", "test-000001.tar"]
    with pytest.raises(ValueError, match=r"has no split 'val' \(it has train, test\).*--val-fraction"):
        s.count("val")
    with pytest.raises(ValueError, match=r"has no split 'val'.*--val-fraction"):
        s.eval_batches("val")
    with pytest.raises(ValueError, match="split must be one of train, test, val; got 'valid'"):
        s.count("valid")
    with pytest.raises(ValueError, match="rank"):
        s.train_batches(4, seed=0, rank=2, world_size=2)


def test_train_batches_deterministic(rect_set: Path) -> None:
    s = ShardSet(str(rect_set))
    for streams in (2, 8):  # 4 train shards: dealt whole (2 streams) or sliced (8 streams)
        a = _take(s.train_batches(7, seed=3, num_streams=streams), 6)  # 42 samples > 18: crosses epochs
        b = _take(s.train_batches(7, seed=3, num_streams=streams), 6)
        workers = _take(s.train_batches(7, seed=3, num_streams=streams, num_workers=2), 6)
        other = _take(s.train_batches(7, seed=4, num_streams=streams), 6)
        x0, y0, p0 = a[0]
        assert x0.shape == (7, 3, 8, 8) and x0.dtype == torch.float32 and y0.dtype == p0.dtype == torch.int64
        assert 0.0 <= float(x0.min()) and float(x0.max()) <= 1.0 and p0.tolist() == list(range(7))
        for one, two, three in zip(a, b, workers, strict=True):
            for u, v, w in zip(one, two, three, strict=True):
                assert torch.equal(u, v) and torch.equal(u, w)
        assert not all(torch.equal(x, x2) for (x, _, _), (x2, _, _) in zip(a, other, strict=True))
    small = _take(s.train_batches(4, seed=3, real_res=5), 1)[0][0]
    assert small.shape == (4, 3, 5, 5)


@pytest.mark.parametrize("streams", [1, 9, 45])  # 45 train samples in 5 shards: 9 and 45 streams slice them
def test_train_batches_epochs_cover_every_sample(square_set: Path, streams: int) -> None:
    """Streams of equal size and a batch of the whole split: every step is one epoch of every stream."""
    s = ShardSet(str(square_set))
    everything = sorted(_h(x) for xs, _, _ in s.iter_split("train") for x in xs)
    assert len(set(everything)) == 45
    steps = _take(s.train_batches(45, seed=0, num_streams=streams), 2)
    for x, _, _ in steps:
        assert sorted(_h(i) for i in x) == everything
    fresh_order = [_h(i) for i in steps[0][0]] != [_h(i) for i in steps[1][0]]
    assert fresh_order == (streams < 45)  # a fresh order every epoch, unless every stream holds one sample


def test_train_batches_random_crops_change_per_epoch(rect_set: Path) -> None:
    s = ShardSet(str(rect_set))  # 18 train images of short side 8, long sides 11…18: crops vary
    (x0, y0, _), (x1, y1, _) = _take(s.train_batches(18, seed=0, num_streams=1), 2)
    assert sorted(y0.tolist()) == sorted(y1.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    assert sorted(_h(i) for i in x0) != sorted(_h(i) for i in x1)  # same images, other crops


def test_train_batches_bad_arguments(square_set: Path) -> None:
    s = ShardSet(str(square_set))
    with pytest.raises(ValueError, match=r"world_size=3 .* num_streams=2 .*raise num_streams"):
        s.train_batches(8, seed=0, rank=0, world_size=3, num_streams=2)
    with pytest.raises(ValueError, match=r"45 train samples, fewer than num_streams=46; lower num_streams"):
        s.train_batches(8, seed=0, num_streams=46)
    with pytest.raises(ValueError, match="start_step"):
        s.train_batches(8, seed=0, start_step=-1)


@pytest.mark.parametrize("world_size", [1, 2, 3])  # 2 test shards: ranks split shards (1, 2) or samples (3)
def test_eval_batches_every_sample_once(square_set: Path, world_size: int) -> None:
    s = ShardSet(str(square_set))
    truth = _tar_labels(square_set, "test")
    keys, labels = [], []
    for rank in range(world_size):
        for x, y, k in s.eval_batches("test", 4, rank=rank, world_size=world_size):
            assert x.shape == (len(k), 3, 8, 8) and len(y) == len(k) <= 4
            keys += k
            labels += y.tolist()
    assert len(keys) == len(set(keys)) == s.count("test") == 15
    assert dict(zip(keys, labels, strict=True)) == truth
    if world_size == 1:
        assert keys == list(truth)  # manifest order: shard by shard, file order inside


def test_eval_resize_and_centre_crop(rect_set: Path) -> None:
    s = ShardSet(str(rect_set))
    x, y, k = next(s.eval_batches("test", resize=6, crop=4))
    assert x.shape == (6, 3, 4, 4) and len(k) == 6
    with pytest.raises(ValueError, match="crop"):
        s.eval_batches("test", resize=4, crop=6)


def test_random_per_class_and_class_images(square_set: Path) -> None:
    s = ShardSet(str(square_set))
    x, y = s.random_per_class(5, n=2)
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(s.random_per_class(5, n=2)[0], x)
    assert not torch.equal(s.random_per_class(6, n=2)[0], x)
    truth = _tar_labels(square_set, "train")
    for c in range(3):
        images, keys = s.class_images(c)
        assert sorted(keys) == sorted(k for k, label in truth.items() if label == c)
        assert images.shape == (15, 3, 8, 8)
        assert {_h(i) for i in x[y == c]} <= {_h(i) for i in images}
    with pytest.raises(ValueError, match="has only 15 train samples, n=16"):
        s.random_per_class(0, n=16)


def test_remote_urls(square_set: Path) -> None:
    local = [k for _, _, ks in ShardSet(str(square_set)).iter_split("test") for k in ks]
    for root in (f"file://{square_set}", f"pipe:cat {square_set}"):
        assert [k for _, _, ks in ShardSet(root).iter_split("test") for k in ks] == local


def test_shards_stream_never_whole(digits_shards: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first batch comes after reading a small part of a 1,000-sample shard: buffers, not shards."""
    from lgm_ray.shards import io as shards_io

    reads: list[int] = []
    real = shards_io.open_stream

    class Counting:
        def __init__(self, stream) -> None:
            self.stream = stream

        def read(self, n: int = -1) -> bytes:
            data = self.stream.read(n)
            reads[-1] += len(data)
            return data

        def close(self) -> None:
            self.stream.close()

    monkeypatch.setattr(shards_io, "open_stream", lambda url: reads.append(0) or Counting(real(url)))
    s = ShardSet(digits_shards)
    smallest = min(e["bytes"] for e in s.manifest["shards"])
    for make in (lambda: s.train_batches(8, seed=0, num_streams=1, shuffle_buffer=16),
                 lambda: s.iter_split("train", batch_size=10)):
        reads.clear()
        stream = make()
        next(stream)
        assert len(reads) == 1 and 0 < reads[0] < smallest / 8
        stream.close()
    reads.clear()
    full = _take(s.train_batches(8, seed=0, num_streams=1), 1)  # a 1,000-sample buffer: the whole unit first
    assert reads[0] >= smallest and not torch.equal(full[0][0], _take(s.train_batches(
        8, seed=0, num_streams=1, shuffle_buffer=16), 1)[0][0])


@pytest.mark.filterwarnings("ignore:skipped a bad sample")
def test_skip_policy_keeps_batches_exact(bad_copy: Path) -> None:
    """A bad sample's place goes to the next good one of its stream: same size, same batch for any start,
    rank count or decode processes."""
    key = _first_key(bad_copy, "train-000001.tar")
    _rewrite_shard(bad_copy, "train-000001.tar", _replace(f"{key}.png", b"junk"))
    s = ShardSet(str(bad_copy), on_bad_sample="skip")
    good = {_h(x) for xs, _, ks in s.iter_split("train") for x in xs}
    assert len(good) == 44 and [x.key for x in s.skipped] == [key]
    straight = _take(s.train_batches(9, seed=2, num_streams=3), 12)  # 108 samples: every one at least twice
    assert all(len(y) == 9 and {_h(i) for i in x} <= good for x, y, _ in straight)
    resumed = _take(s.train_batches(9, seed=2, num_streams=3, start_step=5), 7)
    assert all(torch.equal(u, v) for a, b in zip(resumed, straight[5:], strict=True)
               for u, v in zip(a, b, strict=True))
    parts = [_take(s.train_batches(9, seed=2, num_streams=3, rank=r, world_size=3, num_workers=r), 12)
             for r in range(3)]
    for t in range(12):
        x, y, p = (torch.cat([part[t][i] for part in parts]) for i in range(3))
        order = p.argsort()
        assert torch.equal(x[order], straight[t][0]) and torch.equal(y[order], straight[t][1])


# ---------------------------------------------------------------- bad input


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"manifest.json.*lgm_ray.shards.reader build"):
        ShardSet(str(tmp_path))


def test_truncated_shard(bad_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = bad_copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError, match=r"train-000001.tar has 5000 bytes.*verify"):
        ShardSet(str(bad_copy))
    assert main(["verify", str(bad_copy)]) == 1
    assert "train-000001.tar" in capsys.readouterr().err


def test_truncated_tar_listed_as_such(bad_copy: Path) -> None:
    _rewrite_shard(bad_copy, "train-000001.tar", lambda ms: ms, raw=lambda b: b[:5000])
    s = ShardSet(str(bad_copy))
    with pytest.raises(ShardError, match=r"train-000001.tar is truncated or not a valid tar.*--overwrite"):
        list(s.iter_split("train"))


def test_corrupt_bytes_fail_the_hash(bad_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Streaming checks what costs nothing (tar structure, size, count, decoding); verify also hashes."""
    shard = bad_copy / "test-000000.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(b"\x89PNG") + 60  # inside the first image's compressed pixels
    data[at:at + 40] = bytes(40)
    shard.write_bytes(bytes(data))
    s = ShardSet(str(bad_copy))  # same size: opening passes, decoding does not
    with pytest.raises(ShardError, match=r"test-000000.tar, key test_0+: image does not decode.*verify|skip"):
        list(s.eval_batches("test"))
    assert main(["verify", str(bad_copy)]) == 1
    err = capsys.readouterr().err
    assert "test-000000.tar has a sha256 that differs" in err and "image does not decode" in err


def test_verify_finds_a_changed_byte_that_still_decodes(bad_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = bad_copy / "test-000001.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        cls = next(m for m in tar.getmembers() if m.name.endswith(".cls"))
    data[cls.offset_data] = ord("0") + (data[cls.offset_data] - ord("0") + 1) % 3  # another valid class
    shard.write_bytes(bytes(data))
    assert len(list(ShardSet(str(bad_copy)).iter_split("test"))) == 1  # reads fine: streaming does not hash
    assert main(["verify", str(bad_copy)]) == 1
    assert "test-000001.tar has a sha256 that differs" in capsys.readouterr().err


@pytest.mark.parametrize(("member_ext", "payload", "problem"), [
    ("png", b"not an image", "image does not decode"),
    ("cls", b"7", "label 7 is outside the manifest's 3 classes"),
    ("cls", b"x", "label b'x' is not an ASCII integer"),
])
def test_bad_sample(bad_copy: Path, member_ext: str, payload: bytes, problem: str,
                    capsys: pytest.CaptureFixture[str]) -> None:
    key = _first_key(bad_copy, "train-000002.tar")
    _rewrite_shard(bad_copy, "train-000002.tar", _replace(f"{key}.{member_ext}", payload))
    s = ShardSet(str(bad_copy))
    message = rf"train-000002.tar, key {key}: {re.escape(problem)}.*on_bad_sample='skip'"
    with pytest.raises(ShardError, match=message):
        list(s.iter_split("train"))
    with pytest.raises(ShardError, match=rf"^shard \S+{message}"):  # from a worker: the message alone
        _take(s.train_batches(8, seed=0, num_workers=2), 10)
    assert main(["verify", str(bad_copy)]) == 1
    assert f"train-000002.tar, key {key}: {problem}" in capsys.readouterr().err


def test_listed_shard_missing(bad_copy: Path) -> None:
    (bad_copy / "test-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"test-000001.tar is listed in the manifest but missing"):
        ShardSet(str(bad_copy))


def test_unlisted_extra_shard(bad_copy: Path) -> None:
    shutil.copy(bad_copy / "train-000000.tar", bad_copy / "train-000099.tar")
    with pytest.raises(ShardError, match=r"train-000099.tar is not listed in the manifest"):
        ShardSet(str(bad_copy))


def test_manifest_counts_differ(bad_copy: Path) -> None:
    m = _manifest(bad_copy)
    m["counts"]["train"][0] += 1
    _save_manifest(bad_copy, m)
    with pytest.raises(ShardError, match=r"counts differ: the train classes add up to 46.*--overwrite"):
        ShardSet(str(bad_copy))


def test_shard_sample_count_differs(bad_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = _manifest(bad_copy)
    m["shards"][0]["count"] += 1
    m["counts"]["train"][0] += 1  # consistent arithmetic: only reading the shard tells
    _save_manifest(bad_copy, m)
    with pytest.raises(ShardError, match=r"train-000000.tar holds 10 samples, the manifest says 11"):
        list(ShardSet(str(bad_copy)).iter_split("train"))
    assert main(["verify", str(bad_copy)]) == 1
    assert "holds 10 samples" in capsys.readouterr().err


def test_empty_class_in_manifest(bad_copy: Path) -> None:
    m = _manifest(bad_copy)
    m["counts"]["train"][1] = 0
    _save_manifest(bad_copy, m)
    with pytest.raises(ShardError, match=r"class 'b' \(index 1\) has 0 train samples"):
        ShardSet(str(bad_copy))


def test_skip_policy_counts_and_reports(bad_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = _tar_members(bad_copy / "train-000003.tar")
    k1, k2 = members[0][0].split(".")[0], members[2][0].split(".")[0]
    _rewrite_shard(bad_copy, "train-000003.tar",
                   lambda ms: _replace(f"{k2}.cls", b"9")(_replace(f"{k1}.png", b"junk")(ms)))
    s = ShardSet(str(bad_copy), on_bad_sample="skip")
    with pytest.warns(UserWarning, match="skipped a bad sample"):
        keys = [k for _, _, ks in s.iter_split("train") for k in ks]
    assert len(keys) == 43 and k1 not in keys and k2 not in keys
    assert sorted(x.key for x in s.skipped) == sorted([k1, k2])
    assert all(x.shard.endswith("train-000003.tar") for x in s.skipped)
    reasons = sorted(x.reason.split(" (")[0] for x in s.skipped)
    assert reasons == ["image does not decode", "label 9 is outside the manifest's 3 classes"]
    list(s.iter_split("train"))
    assert len(s.skipped) == 2  # each bad sample listed once
    streamed = ShardSet(str(bad_copy), on_bad_sample="skip")
    with pytest.warns(UserWarning):
        batches = _take(streamed.train_batches(43, seed=1, num_workers=2), 2)  # skips happen in workers
    assert sorted(x.key for x in streamed.skipped) == sorted([k1, k2])
    assert all(len(x) == len(y) == len(p) == 43 for x, y, p in batches)  # streams take their next samples
    assert main(["verify", str(bad_copy), "--on-bad-sample", "skip"]) == 0
    assert "2 bad samples tolerated" in capsys.readouterr().out


def test_stream_with_no_decodable_sample_fails(bad_copy: Path) -> None:
    _rewrite_shard(bad_copy, "train-000004.tar",  # 5 samples, the only shard of stream 4 of 5
                   lambda ms: [(n, b"junk" if n.endswith(".png") else p) for n, p in ms])
    s = ShardSet(str(bad_copy), on_bad_sample="skip")
    with pytest.raises(ShardError, match=r"virtual stream 4, step 0: sample \S+ of shard \S+train-000004.tar "
                                         r"and the 3 after it do not decode.*verify"):
        _take(s.train_batches(10, seed=0, num_streams=5), 2)
    with pytest.warns(UserWarning), pytest.raises(ShardError, match=r"train-000004.tar: none of its 5 samples"):
        list(s.iter_split("train"))  # an ordered pass notices when a whole shard is bad


# ---------------------------------------------------------------- validation split


def _val_build(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    assert main(["build", "digits", "--out", str(out), "--workers", "1", *extra]) == 0
    return out


def test_build_digits_val_split_matches_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lgm_ray.shards.digits import load_digits_split

    out = _val_build(tmp_path, "val", "--val-fraction", "0.1", "--val-seed", "3")
    m = _manifest(out)
    full = torch.bincount(load_digits_split("train")[1], minlength=10)
    val_x, val_y = load_digits_split("val", val_fraction=0.1, val_seed=3)
    assert m["counts"]["val"] == torch.bincount(val_y, minlength=10).tolist()
    assert m["counts"]["val"] == [round(0.1 * int(n)) for n in full]
    assert [a + b for a, b in zip(m["counts"]["train"], m["counts"]["val"], strict=True)] == full.tolist()
    assert m["counts"]["test"] == torch.bincount(load_digits_split("test")[1], minlength=10).tolist()
    assert [e["name"] for e in m["shards"] if e["split"] == "val"] == ["val-000000.tar"]
    assert m["split"]["val_fraction"] == 0.1 and m["split"]["val_seed"] == 3
    assert "--val-fraction 0.1 --val-seed 3" in m["command"]
    s = ShardSet(str(out))
    assert s.count("val") == len(val_y) == sum(m["counts"]["val"]) and s.count("train") == 1437 - len(val_y)
    stored = sorted(_h(x) for xs, _, _ in s.iter_split("val") for x in xs)
    assert stored == sorted(_h(x) for x in val_x)  # PNG of the rounded images: lossless
    keys = [k for r in range(3) for _, _, ks in s.eval_batches("val", 50, rank=r, world_size=3) for k in ks]
    assert sorted(keys) == sorted(_tar_labels(out, "val"))
    train = [_h(x) for xs, _, _ in s.iter_split("train") for x in xs]
    assert sorted(train + stored) == sorted(_h(x) for x in load_digits_split("train")[0])  # out of train
    assert main(["verify", str(out)]) == 0
    assert f"val {len(val_y)}" in capsys.readouterr().out
    assert sorted(_h(x) for x in load_digits_split("val", val_fraction=0.1, val_seed=4)[0]) != stored


def test_imagefolder_val_folder_is_a_split_never_a_class(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write_images(src, {"a": 4, "b": 3}, lambda i: (8, 8))
    _write_images(src / "val", {"a": 2, "b": 1}, lambda i: (8, 8), seed=1)
    m = build("imagefolder", str(src), out=str(tmp_path / "flat"), real_res=8, workers=1)
    assert m["class_names"] == ["a", "b"] and m["counts"] == {"train": [4, 3], "test": [2, 1]}
    assert m["split"]["method"] == "folders: (class folders), val"
    carved = build("imagefolder", str(src), out=str(tmp_path / "carved"), real_res=8, workers=1,
                   val_fraction=0.25)
    assert carved["counts"] == {"train": [3, 2], "test": [2, 1], "val": [1, 1]}
    s = ShardSet(str(tmp_path / "carved"))
    val_keys = [k for _, _, ks in s.iter_split("val") for k in ks]
    assert sorted(val_keys) == sorted(_tar_labels(tmp_path / "carved", "val")) and len(val_keys) == 2
    _write_images(src / "test", {"a": 1, "b": 1}, lambda i: (8, 8), seed=2)
    both = build("imagefolder", str(src), out=str(tmp_path / "both"), real_res=8, workers=1)
    assert both["counts"] == {"train": [4, 3], "test": [1, 1], "val": [2, 1]}
    assert main(["verify", str(tmp_path / "both")]) == 0
    with pytest.raises(ShardError, match="brings its own validation split.*without --val-fraction"):
        build("imagefolder", str(src), out=str(tmp_path / "twice"), val_fraction=0.1)


def test_val_carve_keeps_one_of_each_class_on_each_side(tmp_path: Path) -> None:
    _write_images(tmp_path / "src", {"a": 9, "b": 2}, lambda i: (8, 8))
    m = build("imagefolder", str(tmp_path / "src"), out=str(tmp_path / "set"), real_res=8, workers=1,
              test_fraction=0.0, val_fraction=0.01)
    assert m["counts"]["val"] == [1, 1] and m["counts"]["train"] == [8, 1]  # round(0.09) = 0 → 1 anyway
    _write_images(tmp_path / "src", {"c": 1}, lambda i: (8, 8))
    with pytest.raises(ShardError, match=r"classes \['c'\] have fewer than 2 train images.*--val-fraction"):
        build("imagefolder", str(tmp_path / "src"), out=str(tmp_path / "other"), test_fraction=0.0,
              val_fraction=0.5)
    with pytest.raises(ValueError, match=r"--val-fraction in \[0, 1\), got 1.0"):
        build("imagefolder", str(tmp_path / "src"), out=str(tmp_path / "x"), val_fraction=1.0)
