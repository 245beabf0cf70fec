"""lgm_ray.shards.reader.ShardSet on real tar files written into tmp_path: training streams,
evaluation passes, per-class access, URLs, memory, and the skip policy's exact batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shard_files import first_key, image_bytes, replace_member, rewrite_shard, take, tar_labels

from lgm_ray.shards.reader import ShardSet


def test_no_hand_written_tar_reading() -> None:
    """The tar work is webdataset's: no module of lgm_ray.shards uses tarfile itself."""
    import importlib
    import pkgutil

    import lgm_ray.shards

    names = [m.name for m in pkgutil.iter_modules(lgm_ray.shards.__path__)]
    assert {"build", "decode", "format", "index", "io", "reader", "stream", "verify"} <= set(names)
    for name in names:
        module = importlib.import_module(f"lgm_ray.shards.{name}")
        assert "tarfile" not in vars(module), module.__name__


def test_shardset_basics(square_set: Path) -> None:
    s = ShardSet(str(square_set))
    assert s.class_names == ["a", "b", "c"] and s.num_classes == 3
    assert s.count("train") == 45 and s.count("test") == 15
    assert [Path(u).name for u in s.shard_urls("test")] == ["test-000000.tar", "test-000001.tar"]
    with pytest.raises(ValueError, match=r"has no split 'val' \(it has train, test\).*--val-fraction"):
        s.count("val")
    with pytest.raises(ValueError, match=r"has no split 'val'.*--val-fraction"):
        s.eval_batches("val")
    with pytest.raises(ValueError, match=r"split must be one of train, test, val; got 'valid' "
                                         r"\(did you mean 'val'\?\)"):
        s.count("valid")
    with pytest.raises(ValueError, match="rank"):
        s.train_batches(4, seed=0, rank=2, world_size=2)


def test_train_batches_deterministic(rect_set: Path) -> None:
    s = ShardSet(str(rect_set))
    for streams in (2, 8):  # 4 train shards: dealt whole (2 streams) or sliced (8 streams)
        a = take(s.train_batches(7, seed=3, num_streams=streams), 6)  # 42 samples > 18: crosses epochs
        b = take(s.train_batches(7, seed=3, num_streams=streams), 6)
        workers = take(s.train_batches(7, seed=3, num_streams=streams, num_workers=2), 6)
        other = take(s.train_batches(7, seed=4, num_streams=streams), 6)
        x0, y0, p0 = a[0]
        assert x0.shape == (7, 3, 8, 8) and x0.dtype == torch.float32 and y0.dtype == p0.dtype == torch.int64
        assert 0.0 <= float(x0.min()) and float(x0.max()) <= 1.0 and p0.tolist() == list(range(7))
        for one, two, three in zip(a, b, workers, strict=True):
            for u, v, w in zip(one, two, three, strict=True):
                assert torch.equal(u, v) and torch.equal(u, w)
        assert not all(torch.equal(x, x2) for (x, _, _), (x2, _, _) in zip(a, other, strict=True))
    small = take(s.train_batches(4, seed=3, real_res=5), 1)[0][0]
    assert small.shape == (4, 3, 5, 5)


@pytest.mark.parametrize("streams", [1, 9, 45])  # 45 train samples in 5 shards: 9 and 45 streams slice them
def test_train_batches_epochs_cover_every_sample(square_set: Path, streams: int) -> None:
    """Streams of equal size and a batch of the whole split: every step is one epoch of every stream."""
    s = ShardSet(str(square_set))
    everything = sorted(image_bytes(x) for xs, _, _ in s.iter_split("train") for x in xs)
    assert len(set(everything)) == 45
    steps = take(s.train_batches(45, seed=0, num_streams=streams), 2)
    for x, _, _ in steps:
        assert sorted(image_bytes(i) for i in x) == everything
    fresh_order = [image_bytes(i) for i in steps[0][0]] != [image_bytes(i) for i in steps[1][0]]
    assert fresh_order == (streams < 45)  # a fresh order every epoch, unless every stream holds one sample


def test_train_batches_random_crops_change_per_epoch(rect_set: Path) -> None:
    s = ShardSet(str(rect_set))  # 18 train images of short side 8, long sides 11…18: crops vary
    (x0, y0, _), (x1, y1, _) = take(s.train_batches(18, seed=0, num_streams=1), 2)
    assert sorted(y0.tolist()) == sorted(y1.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    assert sorted(image_bytes(i) for i in x0) != sorted(image_bytes(i) for i in x1)  # same images, other crops


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
    truth = tar_labels(square_set, "test")
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
    truth = tar_labels(square_set, "train")
    for c in range(3):
        images, keys = s.class_images(c)
        assert sorted(keys) == sorted(k for k, label in truth.items() if label == c)
        assert images.shape == (15, 3, 8, 8)
        assert {image_bytes(i) for i in x[y == c]} <= {image_bytes(i) for i in images}
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
    full = take(s.train_batches(8, seed=0, num_streams=1), 1)  # a 1,000-sample buffer: the whole unit first
    assert reads[0] >= smallest and not torch.equal(full[0][0], take(s.train_batches(
        8, seed=0, num_streams=1, shuffle_buffer=16), 1)[0][0])


@pytest.mark.filterwarnings("ignore:skipped a bad sample")
def test_skip_policy_keeps_batches_exact(bad_copy: Path) -> None:
    """A bad sample's place goes to the next good one of its stream: same size, same batch for any start,
    rank count or decode processes."""
    key = first_key(bad_copy, "train-000001.tar")
    rewrite_shard(bad_copy, "train-000001.tar", replace_member(f"{key}.png", b"junk"))
    s = ShardSet(str(bad_copy), on_bad_sample="skip")
    good = {image_bytes(x) for xs, _, ks in s.iter_split("train") for x in xs}
    assert len(good) == 44 and [x.key for x in s.skipped] == [key]
    straight = take(s.train_batches(9, seed=2, num_streams=3), 12)  # 108 samples: every one at least twice
    assert all(len(y) == 9 and {image_bytes(i) for i in x} <= good for x, y, _ in straight)
    resumed = take(s.train_batches(9, seed=2, num_streams=3, start_step=5), 7)
    assert all(torch.equal(u, v) for a, b in zip(resumed, straight[5:], strict=True)
               for u, v in zip(a, b, strict=True))
    parts = [take(s.train_batches(9, seed=2, num_streams=3, rank=r, world_size=3, num_workers=r), 12)
             for r in range(3)]
    for t in range(12):
        x, y, p = (torch.cat([part[t][i] for part in parts]) for i in range(3))
        order = p.argsort()
        assert torch.equal(x[order], straight[t][0]) and torch.equal(y[order], straight[t][1])
