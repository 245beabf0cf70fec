"""``python -m lgm_ray.shards index``: shard sets lgm_ray did not write, in two public ImageNet layouts.

The sets are written here with webdataset's own ``ShardWriter``: JPEG + ``cls`` + a per-sample JSON
(timm's ``imagenet-1k-wds`` layout) and WebP + ``cls`` with a ``classnames.txt`` beside the shards (the
CLIP-benchmark layout). Indexed, they are distilled and evaluated like built sets.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import threading
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lgm_ray.shards.__main__ import main
from lgm_ray.shards.decode import crop_array, resize_short
from lgm_ray.shards.format import ShardError
from lgm_ray.shards.index import index
from lgm_ray.shards.reader import ShardSet
from lgm_ray.shards.verify import verify

NAMES = ["tench", "goldfish", "great white shark"]


def _image(rng: np.random.Generator, fmt: str) -> bytes:
    w, h = (int(v) for v in rng.integers(16, 26, 2))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt, quality=95)
    return buf.getvalue()


def _write(pattern: str, samples: list[dict], maxcount: int) -> None:
    with wds.ShardWriter(pattern, maxcount=maxcount, encoder=False, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)


def _samples(split: str, per_class: int, layout: str, seed: int) -> list[dict]:
    """Samples of 3 classes, mixed (as published shards are), in the layout's members."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(3), per_class))
    out = []
    for i, c in enumerate(labels.tolist()):
        key = f"{split}_{i:05d}"
        if layout == "jpeg_json":
            meta = {"filename": f"n0000000{c}_{i}.JPEG", "label": c, "class_name": NAMES[c]}
            out.append({"__key__": key, "jpg": _image(rng, "JPEG"), "cls": str(c).encode(),
                        "json": json.dumps(meta).encode()})
        else:
            out.append({"__key__": key, "webp": _image(rng, "WEBP"), "cls": str(c).encode()})
    return out


@pytest.fixture(scope="module")
def jpeg_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """timm's layout: imagenet-train-{000000..000002}.tar (24 samples) and a validation shard (9)."""
    root = tmp_path_factory.mktemp("jpeg_json")
    _write(str(root / "imagenet-train-%06d.tar"), _samples("train", 8, "jpeg_json", 0), 10)
    _write(str(root / "imagenet-validation-%06d.tar"), _samples("val", 3, "jpeg_json", 1), 10)
    return root


@pytest.fixture(scope="module")
def webp_names(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLIP-benchmark layout: train/ and test/ shards of WebP + cls, classnames.txt beside them."""
    root = tmp_path_factory.mktemp("webp_names")
    (root / "train").mkdir()
    (root / "test").mkdir()
    _write(str(root / "train" / "%d.tar"), _samples("train", 8, "webp", 2), 12)
    _write(str(root / "test" / "%d.tar"), _samples("test", 3, "webp", 3), 12)
    (root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (root / "train" / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    return root


def _truth(urls: list[str], image_key: str) -> dict[str, tuple[np.ndarray, int]]:
    """key → (decoded image, label), read with plain webdataset."""
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", image_key, "cls")
    return {k: (img, int(c)) for k, img, c in ds}


def _as_read(image: np.ndarray, side: int) -> bytes:
    """What the reader makes of a decoded image at resize = crop = ``side`` (its own helpers)."""
    return crop_array(resize_short(Image.fromarray(image), side), side).tobytes()


def _read(shards: ShardSet, split: str, side: int = 16) -> dict[str, tuple[bytes, int]]:
    out = {}
    for x, y, keys in shards.iter_split(split, resize=side, crop=side, batch_size=7):
        for image, label, key in zip(x, y.tolist(), keys, strict=True):
            out[key] = (image.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy().tobytes(), label)
    return out


def _take(stream: Iterator, n: int) -> list:
    out = list(islice(stream, n))
    stream.close()
    return out


# ---------------------------------------------------------------- the two layouts


def test_index_jpeg_cls_json(jpeg_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = str(jpeg_json / "imagenet-train-{000000..000002}.tar")
    test = str(jpeg_json / "imagenet-validation-000000.tar")
    assert main(["index", train, "--test", test, "--classnames", "json:class_name", "--out",
                 str(tmp_path / "set"), "--workers", "2"]) == 0
    m = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert m["class_names"] == NAMES and m["counts"] == {"train": [8, 8, 8], "test": [3, 3, 3]}
    assert m["image"]["keys"] == ["jpg"] and m["image"]["resized"] is False
    assert 16 <= m["image"]["short_side"] <= 25 and m["label"] == {"key": "cls", "field": None, "by_name": False}
    assert [e["url"] for e in m["shards"]] == [str(jpeg_json / f"imagenet-train-00000{i}.tar") for i in range(3)] \
        + [test]
    assert "index" in m["command"] and sorted(p.name for p in (tmp_path / "set").iterdir()) == ["manifest.json"]
    s = ShardSet(str(tmp_path / "set"))
    for split, urls in (("train", s.shard_urls("train")), ("test", [test])):
        truth = _truth(urls, "jpg")
        assert _read(s, split) == {k: (_as_read(img, 16), c) for k, (img, c) in truth.items()}
    assert main(["verify", str(tmp_path / "set")]) == 0
    assert "OK" in capsys.readouterr().out


def test_index_webp_with_classnames_beside(webp_names: Path, tmp_path: Path) -> None:
    m = index(str(webp_names), out=str(tmp_path / "set"), val_fraction=0.25, val_seed=1)
    assert m["class_names"] == NAMES and m["image"]["keys"] == ["webp"]
    assert m["source"]["class_names"] == str(webp_names / "train" / "classnames.txt")
    assert m["counts"] == {"train": [6, 6, 6], "test": [3, 3, 3], "val": [2, 2, 2]}
    s = ShardSet(str(tmp_path / "set"))
    train, val = _read(s, "train"), _read(s, "val")
    truth = _truth([str(webp_names / "train" / f"{i}.tar") for i in range(2)], "webp")
    assert not set(train) & set(val) and {**train, **val} == {k: (_as_read(i, 16), c) for k, (i, c) in truth.items()}
    assert sorted(set(_read(s, "test"))) == sorted(_truth([str(webp_names / "test" / "0.tar")], "webp"))
    assert verify(str(tmp_path / "set"))[0] == []
    other = index(str(webp_names), out=str(tmp_path / "other"), val_fraction=0.25, val_seed=2)
    assert [e.get("positions") for e in other["shards"]] != [e.get("positions") for e in m["shards"]]


def test_label_from_a_json_field_and_names_by_index(jpeg_json: Path, tmp_path: Path) -> None:
    m = index(str(jpeg_json / "imagenet-train-*.tar"), out=str(tmp_path / "set"), label_key="json:label")
    assert m["class_names"] == ["0", "1", "2"] and m["label"]["key"] == "json" and "test" not in m["counts"]
    by_cls = {k: c for k, (_, c) in _read(ShardSet(str(tmp_path / "set")), "train").items()}
    assert by_cls == {k: c for k, (_, c) in _truth(
        [str(jpeg_json / f"imagenet-train-00000{i}.tar") for i in range(3)], "jpg").items()}
    named = index(str(jpeg_json / "imagenet-train-*.tar"), out=str(tmp_path / "named"),
                  label_key="json:class_name")  # names as labels: classes in sorted order
    assert named["class_names"] == sorted(NAMES) and named["label"]["by_name"] is True
    labels = {k: c for k, (_, c) in _read(ShardSet(str(tmp_path / "named")), "train").items()}
    assert {k: named["class_names"][c] for k, c in labels.items()} == {k: NAMES[c] for k, c in by_cls.items()}


@pytest.mark.parametrize("layout", ["jpeg_json", "webp_names"])
def test_index_distill_evaluate(layout: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from lgm_ray.distill.config import DistillConfig
    from lgm_ray.distill.run import run_distill
    from lgm_ray.evaluate.config import EvalConfig
    from lgm_ray.evaluate.protocol import evaluate_baseline, evaluate_synset

    root = request.getfixturevalue(layout)
    if layout == "jpeg_json":
        index(str(root / "imagenet-train-{000000..000002}.tar"), out=str(tmp_path / "set"),
              test=str(root / "imagenet-validation-{000000..000000}.tar"), classnames="json:class_name")
    else:
        index(str(root), out=str(tmp_path / "set"))
    shards = str(tmp_path / "set")
    cfg = DistillConfig(shards=shards, steps=2, syn_res=16, real_res=16, crop_res=16, augs_per_batch=2,
                        pyramid_extent=4, log_every=1, ckpt_every=2, real_streams=4, out=str(tmp_path / "run"))
    summary = run_distill(cfg)
    assert summary["steps"] == 2 and all(np.isfinite(summary["losses"]))
    payload = torch.load(tmp_path / "run" / "synset.pt", weights_only=False)
    assert payload["class_names"] == NAMES and payload["images"].shape == (3, 3, 16, 16)
    settings = EvalConfig(real_res=16, crop_res=16, epochs=2, seeds=1)
    cache = str(tmp_path / "cache")
    mine = evaluate_synset(payload["images"], payload["labels"], cfg.backbone, shards, settings, cache_dir=cache)
    base = evaluate_baseline("random", cfg.backbone, shards, settings, cache_dir=cache)
    for r in (mine, base):
        assert r["num_classes"] == 3 and 0.0 <= r["top1_mean"] <= 100.0


def test_pattern_and_folder_as_shards_directly(jpeg_json: Path, webp_names: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    pattern = str(jpeg_json / "imagenet-train-{000000..000002}.tar")
    index(pattern, out=str(tmp_path / "set"))
    direct = ShardSet(pattern)  # indexed in memory, once per process
    assert "indexing it in memory" in capsys.readouterr().err
    assert direct.count("train") == 24 and direct.class_names == ["0", "1", "2"]
    saved = ShardSet(str(tmp_path / "set"))
    for a, b in zip(_take(direct.train_batches(6, seed=4, num_streams=3), 6),
                    _take(saved.train_batches(6, seed=4, num_streams=3), 6), strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    as_file = ShardSet(str(tmp_path / "set" / "manifest.json"))
    assert as_file.shard_urls("train") == saved.shard_urls("train")
    folder = ShardSet(str(webp_names))  # train/ and test/ sub-folders, classnames.txt beside
    assert folder.class_names == NAMES and folder.count("test") == 9


def test_inside_out_urls_are_relative(webp_names: Path, tmp_path: Path) -> None:
    import shutil

    moved = Path(shutil.copytree(webp_names, tmp_path / "a"))
    index(str(moved), out=str(moved))
    m = json.loads((moved / "manifest.json").read_text())
    assert {e["url"] for e in m["shards"]} == {"train/0.tar", "train/1.tar", "test/0.tar"}
    shutil.move(str(moved), str(tmp_path / "b"))  # the folder stays usable where it goes
    assert ShardSet(str(tmp_path / "b")).count("train") == 24


# ---------------------------------------------------------------- remote sources


def test_remote_patterns(jpeg_json: Path, tmp_path: Path) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(jpeg_json))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        local = index(str(jpeg_json / "imagenet-train-{000000..000002}.tar"), out=str(tmp_path / "local"))
        for name, pattern in (("http", f"{base}/imagenet-train-{{000000..000002}}.tar"),
                              ("pipe", f"pipe:cat {jpeg_json}/imagenet-train-{{000000..000002}}.tar"),
                              ("file", f"file://{jpeg_json}/imagenet-train-{{000000..000002}}.tar")):
            m = index(pattern, out=str(tmp_path / name))
            assert m["counts"] == local["counts"] and [e["sha256"] for e in m["shards"]] == \
                [e["sha256"] for e in local["shards"]]
            assert _read(ShardSet(str(tmp_path / name)), "train") == _read(ShardSet(str(tmp_path / "local")), "train")
        with pytest.raises(ShardError, match=r"2 of the 4 shards .* do not exist"):
            index(f"{base}/imagenet-train-{{000001..000004}}.tar", out=str(tmp_path / "gap"))
    finally:
        server.shutdown()
    with pytest.raises(ShardError, match=r"s3fs.*pipe:aws s3 cp"):
        index("s3://some-bucket/imagenet-train-{000000..000002}.tar", out=str(tmp_path / "s3"))
    assert not (tmp_path / "gap").exists() and not (tmp_path / "s3").exists()


# ---------------------------------------------------------------- bad input


def _broken(tmp_path: Path, edit: dict[int, dict]) -> Path:
    """The webp layout with some samples changed: index → replacement members (None drops one)."""
    samples = _samples("train", 4, "webp", 5)
    for i, change in edit.items():
        samples[i] = {k: v for k, v in {**samples[i], **change}.items() if v is not None}
    (tmp_path / "src").mkdir(exist_ok=True)
    _write(str(tmp_path / "src" / "train-%06d.tar"), samples, 6)
    return tmp_path / "src"


def test_pattern_that_matches_nothing(jpeg_json: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "set"
    with pytest.raises(ShardError, match=r"matches no shard .*brace range"):
        index(str(jpeg_json / "imagenet-tain-{000000..000002}.tar"), out=str(out))
    with pytest.raises(ShardError, match=r"3 of the 6 shards .* do not exist .*imagenet-train-000003.tar"):
        index(str(jpeg_json / "imagenet-train-{000000..000005}.tar"), out=str(out))
    with pytest.raises(ShardError, match="matches no shard"):
        ShardSet(str(jpeg_json / "nothing-*.tar"))
    capsys.readouterr()
    assert main(["index", str(jpeg_json / "x-{0..3}.tar"), "--out", str(out)]) == 2  # bad input
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "matches no shard" in err
    assert not out.exists()


def test_classnames_file_that_disagrees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _broken(tmp_path, {})
    (tmp_path / "two.txt").write_text("tench\ngoldfish\n")
    (tmp_path / "four.txt").write_text("tench\ngoldfish\nshark\nray\n")
    out = tmp_path / "set"
    with pytest.raises(ShardError, match=r"label 2 is outside the 2 classes of \S+two.txt \(its length "
                                         r"disagrees.*\(and 3 more bad labels\).*--on-bad-sample skip"):
        index(str(src), out=str(out), classnames=str(tmp_path / "two.txt"))
    with pytest.raises(ShardError, match=r"four.txt lists 4 class names but the train shards hold no sample of "
                                         r"classes \['ray'\]"):
        index(str(src), out=str(out), classnames=str(tmp_path / "four.txt"))
    assert not out.exists()
    m = index(str(src), out=str(out), classnames=str(tmp_path / "two.txt"), on_bad_sample="skip")
    assert m["counts"] == {"train": [4, 4]} and len(m["skipped"]) == 4
    assert all("outside the 2 classes" in s["reason"] for s in m["skipped"])
    assert sorted(_read(ShardSet(str(out)), "train").values(), key=lambda v: v[1])[-1][1] == 1
    assert verify(str(out))[0] == []


def test_label_outside_the_classes_and_sample_without_image(tmp_path: Path) -> None:
    src = _broken(tmp_path, {3: {"webp": None, "txt": b"caption only"}, 7: {"cls": b"x1"}})
    out = tmp_path / "set"
    with pytest.raises(ShardError, match=r"train-000000.tar, key train_00003: has no image \(jpg, jpeg, png, "
                                         r"webp.*members: \['cls'\]\); .*--on-bad-sample skip"):
        index(str(src), out=str(out))
    (src / "train-000000.tar").rename(src / "keep.tar")  # the label alone, in train-000001.tar
    with pytest.raises(ShardError, match=r"key train_00007: label 'x1' is not an integer class index"):
        index(str(src / "train-*.tar"), out=str(out))
    (src / "keep.tar").rename(src / "train-000000.tar")
    assert not out.exists()
    m = index(str(src), out=str(out), on_bad_sample="skip")
    assert sum(m["counts"]["train"]) == 10 and m["class_names"] == ["0", "1", "2"]
    assert sorted((s["key"], s["reason"].split(" (")[0]) for s in m["skipped"]) == [
        ("train_00003", "has no image"), ("train_00007", "label 'x1' is not an integer class index")]
    keys = set(_read(ShardSet(str(out)), "train"))
    assert len(keys) == 10 and not keys & {"train_00003", "train_00007"}
    batches = _take(ShardSet(str(out)).train_batches(10, seed=0, num_streams=2), 3)
    assert all(len(y) == 10 for _, y, _ in batches)  # the left-out positions are never read
    assert verify(str(out))[0] == []
    (src / "classnames.txt").write_text("\n".join(NAMES))  # beside the shards: names may be labels too
    named = index(str(src), out=str(tmp_path / "named"), on_bad_sample="skip")
    assert named["class_names"] == NAMES and named["label"]["by_name"] is True
    assert [s["reason"].split(" (")[0] for s in named["skipped"]][1] == \
        f"label 'x1' is not one of the 3 names of {src / 'classnames.txt'}"


def test_index_on_a_truncated_shard(tmp_path: Path) -> None:
    src = _broken(tmp_path, {})
    shard = src / "train-000001.tar"
    data = shard.read_bytes()
    out = tmp_path / "set"
    inside, boundary = _cuts(data)
    for cut, why in ((inside, "truncated or not a valid tar"), (boundary, "does not end with the tar end")):
        shard.write_bytes(data[:cut])
        with pytest.raises(ShardError, match=rf"shard \S+train-000001.tar.*{why}"):
            index(str(src / "train-{000000..000001}.tar"), out=str(out), on_bad_sample="skip")
        assert not out.exists()


def _cuts(data: bytes) -> tuple[int, int]:
    """Offsets inside the last member's data, and just before that member's header."""
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + 10, last.offset


def test_existing_manifest_needs_overwrite(webp_names: Path, tmp_path: Path) -> None:
    out = tmp_path / "set"
    index(str(webp_names), out=str(out))
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ShardError, match=r"manifest.json exists; pass --overwrite"):
        index(str(webp_names), out=str(out), val_fraction=0.25)
    assert (out / "manifest.json").read_bytes() == before
    with pytest.raises(ShardError, match="missing.txt"):  # a failed overwrite keeps the old manifest
        index(str(webp_names), out=str(out), classnames=str(tmp_path / "missing.txt"), overwrite=True)
    assert (out / "manifest.json").read_bytes() == before
    index(str(webp_names), out=str(out), val_fraction=0.25, overwrite=True)
    assert "val" in json.loads((out / "manifest.json").read_text())["counts"]
