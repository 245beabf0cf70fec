"""WebDataset shard sets: the real images lgm_ray distils from and evaluates on.

A set is a ``manifest.json`` and tar shards (:mod:`~lgm_ray.shards.format`). It is written by
``python -m lgm_ray.shards build`` (:mod:`~lgm_ray.shards.build`, from digits, an image folder or a saved
HF dataset) or indexed where it lies by ``... index`` (:mod:`~lgm_ray.shards.index`), checked byte for
byte by ``... verify`` (:mod:`~lgm_ray.shards.verify`), and read through
:class:`~lgm_ray.shards.reader.ShardSet`: deterministic training streams (:mod:`~lgm_ray.shards.stream`)
and ordered evaluation passes. Every bad input raises :class:`ShardError` (an
:class:`~lgm_ray.common.errors.InputError`).

The engines ``build``, ``index`` and ``verify`` are re-exported here as :func:`build_shards`,
:func:`index_shards` and :func:`verify_shards`: their own names are those of their modules, which must
stay reachable as ``lgm_ray.shards.build`` and so on.
"""

from lgm_ray.shards.build import build as build_shards
from lgm_ray.shards.decode import ON_BAD_SAMPLE
from lgm_ray.shards.format import MANIFEST_NAME, SPLITS, ShardError
from lgm_ray.shards.index import index as index_shards
from lgm_ray.shards.reader import ShardSet, open_manifest
from lgm_ray.shards.sources import SOURCES
from lgm_ray.shards.verify import verify as verify_shards

__all__ = ["MANIFEST_NAME", "ON_BAD_SAMPLE", "SOURCES", "SPLITS", "ShardError", "ShardSet", "build_shards",
           "index_shards", "open_manifest", "verify_shards"]
