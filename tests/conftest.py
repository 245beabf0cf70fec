"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    """The digits shards (default build: 32 px PNG), built once per test session."""
    from lgm_ray.shards import main as shards_main

    out = tmp_path_factory.mktemp("digits_shards") / "digits"
    assert shards_main(["build", "digits", "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def shards(digits_shards):
    from lgm_ray.shards import ShardSet

    return ShardSet(digits_shards)
