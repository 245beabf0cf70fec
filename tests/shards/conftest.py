"""The shard tests' small sets, built by ``python -m lgm_ray.shards build`` into tmp paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from shard_files import write_images

from lgm_ray.shards.__main__ import main


@pytest.fixture(scope="module")
def square_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes × 20 noise images 8×8 PNG, stored at 8 px: crops are the images themselves."""
    base = tmp_path_factory.mktemp("square")
    write_images(base / "src", {"a": 20, "b": 20, "c": 20}, lambda i: (8, 8))
    out = base / "set"
    assert main(["build", "imagefolder", str(base / "src"), "--out", str(out), "--real-res", "8",
                 "--format", "png", "--shard-size", "10", "--test-fraction", "0.25", "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def rect_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes × 8 JPEG images of assorted sizes, stored at short side 8."""
    base = tmp_path_factory.mktemp("rect")
    write_images(base / "src", {"emu": 8, "cat": 8, "dog": 8}, lambda i: (10 + i, 18 - i), fmt="JPEG")
    out = base / "set"
    assert main(["build", "imagefolder", str(base / "src"), "--out", str(out), "--real-res", "8",
                 "--shard-size", "5", "--test-fraction", "0.25", "--workers", "1"]) == 0
    return out


@pytest.fixture()
def bad_copy(square_set: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(square_set, tmp_path / "copy"))
