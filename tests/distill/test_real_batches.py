"""lgm_ray.distill.real_batches: the real batch of a step is a function of (seed, step) and the data alone.

Checked on real shards (digits, built in fixtures: 2 train shards sliced across 8 streams, and 15 train
shards dealt whole, also indexed as foreign shards with a validation split carved out by position) and on
the in-memory digits source.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import pytest
import torch

from lgm_ray.distill.real_batches import DigitsSource, RealBatch, ShardSource
from lgm_ray.shards import decode as shards_decode
from lgm_ray.shards.digits import load_digits_split

B = 50  # not a multiple of 8: streams give 7, 7, 6, 6, 6, 6, 6, 6 samples per step
STEPS = 40  # 40 × 50 > 1,437 train samples: past the first epoch of every stream


@pytest.fixture(scope="module")
def dealt_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Digits in shards of 100: 15 train shards, at least one whole shard per stream."""
    from lgm_ray.shards.__main__ import main

    out = tmp_path_factory.mktemp("dealt") / "digits"
    assert main(["build", "digits", "--out", str(out), "--shard-size", "100", "--workers", "1"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def indexed_shards(dealt_shards: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The dealt train shards indexed as shards lgm_ray did not write, with val carved out by position."""
    from lgm_ray.shards.index import index

    out = tmp_path_factory.mktemp("indexed")
    index(f"{dealt_shards}/train-{{000000..000014}}.tar", out=str(out), val_fraction=0.1)
    return str(out)


@pytest.fixture(scope="module", params=["memory", "sliced", "dealt", "indexed"])
def source(request: pytest.FixtureRequest, digits_shards: str, dealt_shards: str, indexed_shards: str
           ) -> DigitsSource | ShardSource:
    if request.param == "memory":
        return DigitsSource(32)
    return ShardSource({"sliced": digits_shards, "dealt": dealt_shards, "indexed": indexed_shards}[request.param])


@pytest.fixture(scope="module")
def reference(source: DigitsSource | ShardSource) -> list[RealBatch]:
    """The first STEPS global batches, read by one rank from step 0."""
    return _take(source.batches(B, seed=11), STEPS)


def _take(stream: Iterator[RealBatch], n: int) -> list[RealBatch]:
    out = list(islice(stream, n))
    close = getattr(stream, "close", None)
    if close:
        close()
    return out


def _same(a: RealBatch, b: RealBatch) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _assemble(parts: list[RealBatch]) -> RealBatch:
    """The global batch from the ranks' shares, put in position order."""
    images, labels, positions = (torch.cat(list(t)) for t in zip(*parts, strict=True))
    order = positions.argsort()
    return RealBatch(images[order], labels[order], positions[order])


def test_global_batch_layout(source: DigitsSource | ShardSource, reference: list[RealBatch]) -> None:
    first = reference[0]
    assert first.images.shape == (B, 3, 32, 32) and first.images.dtype == torch.float32
    assert first.labels.dtype == first.positions.dtype == torch.int64
    assert first.positions.tolist() == list(range(B))
    assert 0.0 <= float(first.images.min()) and float(first.images.max()) <= 1.0
    assert not _same(reference[0], reference[1])
    assert not _same(_take(source.batches(B, seed=12), 1)[0], first)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_share_the_same_global_batch(source: DigitsSource | ShardSource, reference: list[RealBatch],
                                           world_size: int) -> None:
    parts = [_take(source.batches(B, seed=11, rank=r, world_size=world_size), 5) for r in range(world_size)]
    sizes = [len(p[0].labels) for p in parts]
    assert sum(sizes) == B
    if world_size > 1:
        assert max(sizes) < B  # each rank reads a share, not the whole batch
    for t in range(5):
        shares = [p[t] for p in parts]
        positions = torch.cat([s.positions for s in shares])
        assert sorted(positions.tolist()) == list(range(B))  # every position once: no sample twice, none lost
        assert _same(_assemble(shares), reference[t])  # (image, label) at each position: the K = 1 batch


@pytest.mark.parametrize(("start", "rank", "world_size"), [(1, 0, 1), (13, 0, 1), (39, 0, 1), (29, 2, 3)])
def test_start_step_resumes_exactly(source: DigitsSource | ShardSource, reference: list[RealBatch],
                                    start: int, rank: int, world_size: int) -> None:
    resumed = _take(source.batches(B, seed=11, start_step=start, rank=rank, world_size=world_size),
                    STEPS - start)
    straight = _take(source.batches(B, seed=11, rank=rank, world_size=world_size), STEPS)[start:]
    assert all(_same(a, b) for a, b in zip(resumed, straight, strict=True))
    if world_size == 1:
        assert all(_same(a, b) for a, b in zip(resumed, reference[start:], strict=True))


def test_fast_forward_decodes_only_where_it_lands(dealt_shards: str, digits_shards: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []
    real_decode = shards_decode.decode_sample
    monkeypatch.setattr(shards_decode, "decode_sample", lambda *a: decoded.append(1) or real_decode(*a))
    for root in (dealt_shards, digits_shards):
        src = ShardSource(root)
        far = 10**7  # 5·10⁸ samples in: a stream read from step 0 would decode for hours
        decoded.clear()
        early = _take(src.batches(B, seed=11, start_step=far - 2), 3)
        assert 0 < len(decoded) < 2 * src.shards.count("train")
        decoded.clear()
        late = _take(src.batches(B, seed=11, start_step=far), 1)
        assert 0 < len(decoded) < src.shards.count("train")
        assert _same(late[0], early[2])


def test_batches_do_not_depend_on_decode_workers(digits_shards: str, dealt_shards: str, indexed_shards: str
                                                  ) -> None:
    for root in (digits_shards, dealt_shards, indexed_shards):
        args = {"seed": 5, "start_step": 7, "rank": 1, "world_size": 2}
        inline = _take(ShardSource(root).batches(B, **args), 6)
        pooled = _take(ShardSource(root, num_workers=2).batches(B, **args), 6)
        assert all(_same(a, b) for a, b in zip(inline, pooled, strict=True))


def test_more_ranks_than_streams_is_refused(source: DigitsSource | ShardSource) -> None:
    with pytest.raises(ValueError, match=r"world_size=9 ranks cannot share num_streams=8 .*raise num_str"):
        source.batches(B, seed=0, rank=0, world_size=9)
    source.batches(B, seed=0, rank=8, world_size=9, num_streams=9)  # the fix works


def test_batch_smaller_than_streams(source: DigitsSource | ShardSource) -> None:
    """5 samples from 8 streams: streams 0-4 give one each; ranks holding only streams 5-7 get nothing."""
    whole = _take(source.batches(5, seed=2), 2)
    parts = [_take(source.batches(5, seed=2, rank=r, world_size=8), 2) for r in range(8)]
    for r in range(5, 8):
        assert parts[r][0].images.shape == (0, 3, 32, 32) and parts[r][0].labels.numel() == 0
    for t in range(2):
        assert _same(_assemble([p[t] for p in parts]), whole[t])


def test_streams_fix_the_batch(source: DigitsSource | ShardSource, reference: list[RealBatch]) -> None:
    """num_streams is part of the rule: the same seed with other streams gives other batches."""
    assert not _same(_take(source.batches(B, seed=11, num_streams=4), 1)[0], reference[0])


def test_digits_epochs_cover_the_train_split() -> None:
    """1,437 = 3 × 479: with 3 streams, one step of the whole split is one epoch of every stream."""
    src = DigitsSource(8)
    truth = sorted(map(bytes, load_digits_split("train", res=8)[0].numpy()))
    for batch in _take(src.batches(1437, seed=0, num_streams=3), 2):
        assert sorted(map(bytes, batch.images.numpy())) == truth


def test_digits_val_split_is_carved_out_of_train() -> None:
    full_x, full_y = load_digits_split("train", res=8)
    val_x, val_y = load_digits_split("val", res=8, val_fraction=0.2, val_seed=1)
    src = DigitsSource(8, val_fraction=0.2, val_seed=1)
    assert len(src.labels) + len(val_y) == len(full_y)
    counts, val_counts = torch.bincount(full_y), torch.bincount(val_y, minlength=10)
    assert val_counts.tolist() == [round(0.2 * int(n)) for n in counts]
    assert torch.equal(torch.bincount(src.labels, minlength=10), counts - val_counts)
    assert sorted(map(bytes, torch.cat([src.images, val_x]).numpy())) == sorted(map(bytes, full_x.numpy()))
    test_y = load_digits_split("test", res=8, val_fraction=0.2)[1]
    assert torch.equal(test_y, load_digits_split("test", res=8)[1])  # test never changes
    other = load_digits_split("val", res=8, val_fraction=0.2, val_seed=2)[0]
    assert sorted(map(bytes, other.numpy())) != sorted(map(bytes, val_x.numpy()))
    with pytest.raises(ValueError, match=r"pass val_fraction > 0, e\.g\. load_digits_split\('val', val_"):
        load_digits_split("val")
