"""A sound set passes ``verify``; a damaged one (missing, truncated, corrupted or replaced shards, bad
samples, an inconsistent manifest) is named by opening, reading and ``verify``, each as far as it looks."""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from shard_files import (
    first_key,
    read_manifest,
    replace_member,
    rewrite_shard,
    save_manifest,
    take,
    tar_members,
)

from lgm_ray.shards.__main__ import main
from lgm_ray.shards.format import ShardError
from lgm_ray.shards.reader import ShardSet
from lgm_ray.shards.verify import verify


def test_verify_ok(square_set: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(square_set)]) == 0
    assert "OK" in capsys.readouterr().out
    problems, tolerated, _ = verify(str(square_set))
    assert problems == [] and tolerated == []


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"manifest.json.*python -m lgm_ray.shards build"):
        ShardSet(str(tmp_path))
    with pytest.raises(ShardError, match=r"manifest.json.*python -m lgm_ray.shards build"):
        verify(str(tmp_path))


def test_truncated_shard(bad_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = bad_copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError, match=r"train-000001.tar has 5000 bytes.*verify"):
        ShardSet(str(bad_copy))
    assert main(["verify", str(bad_copy)]) == 1
    assert "train-000001.tar" in capsys.readouterr().err


def test_truncated_tar_listed_as_such(bad_copy: Path) -> None:
    rewrite_shard(bad_copy, "train-000001.tar", lambda ms: ms, raw=lambda b: b[:5000])
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
    key = first_key(bad_copy, "train-000002.tar")
    rewrite_shard(bad_copy, "train-000002.tar", replace_member(f"{key}.{member_ext}", payload))
    s = ShardSet(str(bad_copy))
    message = rf"train-000002.tar, key {key}: {re.escape(problem)}.*on_bad_sample='skip'"
    with pytest.raises(ShardError, match=message):
        list(s.iter_split("train"))
    with pytest.raises(ShardError, match=rf"^shard \S+{message}"):  # from a worker: the message alone
        take(s.train_batches(8, seed=0, num_workers=2), 10)
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
    m = read_manifest(bad_copy)
    m["counts"]["train"][0] += 1
    save_manifest(bad_copy, m)
    with pytest.raises(ShardError, match=r"counts differ: the train classes add up to 46.*--overwrite"):
        ShardSet(str(bad_copy))


def test_shard_sample_count_differs(bad_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = read_manifest(bad_copy)
    m["shards"][0]["count"] += 1
    m["counts"]["train"][0] += 1  # consistent arithmetic: only reading the shard tells
    save_manifest(bad_copy, m)
    with pytest.raises(ShardError, match=r"train-000000.tar holds 10 samples, the manifest says 11"):
        list(ShardSet(str(bad_copy)).iter_split("train"))
    assert main(["verify", str(bad_copy)]) == 1
    assert "holds 10 samples" in capsys.readouterr().err


def test_empty_class_in_manifest(bad_copy: Path) -> None:
    m = read_manifest(bad_copy)
    m["counts"]["train"][1] = 0
    save_manifest(bad_copy, m)
    with pytest.raises(ShardError, match=r"class 'b' \(index 1\) has 0 train samples"):
        ShardSet(str(bad_copy))


def test_skip_policy_counts_and_reports(bad_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = tar_members(bad_copy / "train-000003.tar")
    k1, k2 = members[0][0].split(".")[0], members[2][0].split(".")[0]
    rewrite_shard(bad_copy, "train-000003.tar",
                   lambda ms: replace_member(f"{k2}.cls", b"9")(replace_member(f"{k1}.png", b"junk")(ms)))
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
        batches = take(streamed.train_batches(43, seed=1, num_workers=2), 2)  # skips happen in workers
    assert sorted(x.key for x in streamed.skipped) == sorted([k1, k2])
    assert all(len(x) == len(y) == len(p) == 43 for x, y, p in batches)  # streams take their next samples
    assert main(["verify", str(bad_copy), "--on-bad-sample", "skip"]) == 0
    assert "2 bad samples tolerated" in capsys.readouterr().out


def test_stream_with_no_decodable_sample_fails(bad_copy: Path) -> None:
    rewrite_shard(bad_copy, "train-000004.tar",  # 5 samples, the only shard of stream 4 of 5
                   lambda ms: [(n, b"junk" if n.endswith(".png") else p) for n, p in ms])
    s = ShardSet(str(bad_copy), on_bad_sample="skip")
    with pytest.raises(ShardError, match=r"virtual stream 4, step 0: sample \S+ of shard \S+train-000004.tar "
                                         r"and the 3 after it do not decode.*verify"):
        take(s.train_batches(10, seed=0, num_streams=5), 2)
    with pytest.warns(UserWarning), pytest.raises(ShardError, match=r"train-000004.tar: none of its 5 samples"):
        list(s.iter_split("train"))  # an ordered pass notices when a whole shard is bad
