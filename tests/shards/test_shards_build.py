"""``python -m lgm_ray.shards build``: digits, image folders and HF datasets written as WebDataset
shards — manifests, contents, splits (test and val), overwrite and bad source images."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shard_files import image_bytes, read_manifest, tar_labels, tar_members, write_images

from lgm_ray.shards.__main__ import main
from lgm_ray.shards.build import build
from lgm_ray.shards.format import ShardError
from lgm_ray.shards.reader import ShardSet


def test_build_digits_manifest_and_contents(tmp_path: Path) -> None:
    from lgm_ray.shards.digits import load_digits_split

    out = tmp_path / "digits"
    assert main(["build", "digits", "--out", str(out), "--shard-size", "500"]) == 0
    m = read_manifest(out)
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
    assert [e["sha256"] for e in read_manifest(again)["shards"]] == [e["sha256"] for e in m["shards"]]


def test_build_imagefolder_stratified(rect_set: Path) -> None:
    m = read_manifest(rect_set)
    assert m["class_names"] == ["cat", "dog", "emu"]
    assert m["counts"] == {"train": [6, 6, 6], "test": [2, 2, 2]}
    assert m["image"] == {**m["image"], "encoding": "jpg", "quality": 95, "short_side": 8}
    assert {e["name"] for e in m["shards"]} == {"train-000000.tar", "train-000001.tar", "train-000002.tar",
                                                "train-000003.tar", "test-000000.tar", "test-000001.tar"}
    for name, payload in tar_members(rect_set / "train-000000.tar"):
        if name.endswith(".jpg"):
            assert min(Image.open(io.BytesIO(payload)).size) == 8
    assert set(tar_labels(rect_set, "test").values()) == {0, 1, 2}


def test_build_imagefolder_train_test_folders(tmp_path: Path) -> None:
    write_images(tmp_path / "src" / "train", {"x": 5, "y": 3}, lambda i: (9, 9))
    write_images(tmp_path / "src" / "test", {"x": 2, "y": 1}, lambda i: (9, 9))
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
    m = read_manifest(tmp_path / "set")
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
    m = read_manifest(tmp_path / "set")
    assert m["class_names"] == ["0", "1", "2"] and m["counts"] == {"train": [3, 3, 3], "test": [1, 1, 1]}
    x, y, _ = next(ShardSet(str(tmp_path / "set")).iter_split("test"))
    assert x.shape == (3, 3, 6, 6)
    with pytest.raises(ShardError, match="no column 'image'"):
        build("hf", str(tmp_path / "hf"), out=str(tmp_path / "other"))


def test_overwrite_refused_then_replaced_and_kept_on_failure(square_set: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = Path(shutil.copytree(square_set, tmp_path / "set"))
    before = (out / "manifest.json").read_bytes()
    write_images(tmp_path / "src", {"p": 3, "q": 3}, lambda i: (8, 8))
    args = ["build", "imagefolder", str(tmp_path / "src"), "--out", str(out), "--real-res", "8"]
    assert main(args) == 2  # bad input: one line
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(out) in err and "--overwrite" in err
    assert (out / "manifest.json").read_bytes() == before
    (tmp_path / "src" / "r").mkdir()  # an empty class: this build fails, the old set must survive
    assert main([*args, "--overwrite"]) == 2
    assert "hold no images" in capsys.readouterr().err.splitlines()[-1]
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set", "src"]  # no staging folder left behind
    (tmp_path / "src" / "r").rmdir()
    assert main([*args, "--overwrite"]) == 0
    assert read_manifest(out)["class_names"] == ["p", "q"] and not (out / "train-000004.tar").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="notes.txt"):
        build("imagefolder", str(tmp_path / "src"), out=str(out), overwrite=True)


def test_build_empty_class_folder(tmp_path: Path) -> None:
    write_images(tmp_path / "src", {"a": 2}, lambda i: (8, 8))
    (tmp_path / "src" / "b").mkdir()
    with pytest.raises(ShardError, match=r"class folders \['.*b'\] hold no images"):
        build("imagefolder", str(tmp_path / "src"), out=str(tmp_path / "set"))
    assert not (tmp_path / "set").exists()


def test_build_skips_undecodable_source_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_images(tmp_path / "src", {"a": 4, "b": 4}, lambda i: (8, 8))
    (tmp_path / "src" / "a" / "broken.png").write_bytes(b"not a png")
    args = ["build", "imagefolder", str(tmp_path / "src"), "--out", str(tmp_path / "set"),
            "--test-fraction", "0"]
    assert main(args) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress lines, the one error line
    assert last.startswith("error: ") and "broken.png does not decode" in last
    assert main([*args, "--on-bad-sample", "skip"]) == 0
    m = read_manifest(tmp_path / "set")
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
        assert len(theirs) == s.count(split) and {k: c for k, (_, c) in theirs.items()} == tar_labels(root, split)
        if ours is not None:
            assert theirs == ours


# ---------------------------------------------------------------- validation split


def _val_build(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    assert main(["build", "digits", "--out", str(out), "--workers", "1", *extra]) == 0
    return out


def test_build_digits_val_split_matches_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lgm_ray.shards.digits import load_digits_split

    out = _val_build(tmp_path, "val", "--val-fraction", "0.1", "--val-seed", "3")
    m = read_manifest(out)
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
    stored = sorted(image_bytes(x) for xs, _, _ in s.iter_split("val") for x in xs)
    assert stored == sorted(image_bytes(x) for x in val_x)  # PNG of the rounded images: lossless
    keys = [k for r in range(3) for _, _, ks in s.eval_batches("val", 50, rank=r, world_size=3) for k in ks]
    assert sorted(keys) == sorted(tar_labels(out, "val"))
    train = [image_bytes(x) for xs, _, _ in s.iter_split("train") for x in xs]
    assert sorted(train + stored) == sorted(image_bytes(x) for x in load_digits_split("train")[0])  # out of train
    assert main(["verify", str(out)]) == 0
    assert f"val {len(val_y)}" in capsys.readouterr().out
    assert sorted(image_bytes(x) for x in load_digits_split("val", val_fraction=0.1, val_seed=4)[0]) != stored


def test_imagefolder_val_folder_is_a_split_never_a_class(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_images(src, {"a": 4, "b": 3}, lambda i: (8, 8))
    write_images(src / "val", {"a": 2, "b": 1}, lambda i: (8, 8), seed=1)
    m = build("imagefolder", str(src), out=str(tmp_path / "flat"), real_res=8, workers=1)
    assert m["class_names"] == ["a", "b"] and m["counts"] == {"train": [4, 3], "test": [2, 1]}
    assert m["split"]["method"] == "folders: (class folders), val"
    carved = build("imagefolder", str(src), out=str(tmp_path / "carved"), real_res=8, workers=1,
                   val_fraction=0.25)
    assert carved["counts"] == {"train": [3, 2], "test": [2, 1], "val": [1, 1]}
    s = ShardSet(str(tmp_path / "carved"))
    val_keys = [k for _, _, ks in s.iter_split("val") for k in ks]
    assert sorted(val_keys) == sorted(tar_labels(tmp_path / "carved", "val")) and len(val_keys) == 2
    write_images(src / "test", {"a": 1, "b": 1}, lambda i: (8, 8), seed=2)
    both = build("imagefolder", str(src), out=str(tmp_path / "both"), real_res=8, workers=1)
    assert both["counts"] == {"train": [4, 3], "test": [1, 1], "val": [2, 1]}
    assert main(["verify", str(tmp_path / "both")]) == 0
    with pytest.raises(ShardError, match="brings its own validation split.*without --val-fraction"):
        build("imagefolder", str(src), out=str(tmp_path / "twice"), val_fraction=0.1)


def test_val_carve_keeps_one_of_each_class_on_each_side(tmp_path: Path) -> None:
    write_images(tmp_path / "src", {"a": 9, "b": 2}, lambda i: (8, 8))
    m = build("imagefolder", str(tmp_path / "src"), out=str(tmp_path / "set"), real_res=8, workers=1,
              test_fraction=0.0, val_fraction=0.01)
    assert m["counts"]["val"] == [1, 1] and m["counts"]["train"] == [8, 1]  # round(0.09) = 0 → 1 anyway
    write_images(tmp_path / "src", {"c": 1}, lambda i: (8, 8))
    with pytest.raises(ShardError, match=r"classes \['c'\] have fewer than 2 train images.*--val-fraction"):
        build("imagefolder", str(tmp_path / "src"), out=str(tmp_path / "other"), test_fraction=0.0,
              val_fraction=0.5)
    with pytest.raises(ValueError, match=r"--val-fraction in \[0, 1\), got 1.0"):
        build("imagefolder", str(tmp_path / "src"), out=str(tmp_path / "x"), val_fraction=1.0)
