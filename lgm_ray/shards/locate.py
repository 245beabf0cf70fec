"""Where shards lgm_ray did not write are: patterns, URLs and folders turned into shard URLs by split.

:func:`is_pattern` tells a shard pattern from a set's folder or manifest; :func:`expand` lists the shards
a brace or glob pattern names (``DIR/train-{000000..000146}.tar``, ``pipe:CMD``, ``http(s)://…``,
``s3://…`` and anything fsspec opens; ``A::B`` joins two), checking that they exist where that can be
checked; :func:`discover` finds a local folder's shards by split (``train/``, ``val/``, ``test/``
sub-folders, or split words in the shard names); :func:`sources_of` does both for ``shards index``.
Each raises :class:`~lgm_ray.shards.format.ShardError` naming the pattern or folder and the fix.
"""

from __future__ import annotations

import glob
import os
import re
from collections import defaultdict
from pathlib import Path

from lgm_ray.shards.format import ShardError, is_local

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SPLIT_WORDS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
_GLOB = re.compile(r"[*?\[]")


def is_pattern(spec: str) -> bool:
    """Whether ``spec`` names shards (a brace or glob pattern, ``A::B``, or a shard file) rather than a set."""
    return ("{" in spec and "}" in spec) or "::" in spec or spec.rstrip().endswith(TAR_SUFFIXES) \
        or (is_local(spec) and bool(_GLOB.search(spec)))


def expand(spec: str) -> list[str]:
    """The shard URLs a pattern names, each checked to exist where that can be checked.

    Raises:
        ShardError: the pattern matches no shard, or some of the shards it names do not exist.
    """
    from webdataset.shardlists import expand_urls

    urls = expand_urls(spec)
    found, missing = [], []
    for url in urls:
        if url.startswith("pipe:"):
            found.append(url)  # a command: whether it works shows when it runs
            continue
        if not is_local(url) and not url.startswith("file://"):
            matches = _remote_matches(url)
            found += [url] if matches is None else matches
            missing += [] if matches is None or matches else [url]
            continue
        path = url.removeprefix("file://")
        if _GLOB.search(path):
            matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
            found += matches
            missing += [] if matches else [url]
        elif os.path.isfile(path):
            found.append(path)
        else:
            missing.append(url)
    if not found:
        raise ShardError(f"{spec} matches no shard ({missing[0] if missing else 'nothing'} does not exist); "
                         "check the folder, the name and the brace range, e.g. DIR/train-{000000..000146}.tar")
    if missing:
        raise ShardError(f"{len(missing)} of the {len(urls)} shards that {spec} names do not exist (e.g. "
                         f"{', '.join(missing[:3])}); fix the pattern's range or fetch the missing shards")
    return found


def _remote_matches(url: str) -> list[str] | None:
    """Existing URLs for a remote URL or glob through fsspec: [] when none, None when it cannot tell."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        if _GLOB.search(path):
            return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))
        return [url] if fs.exists(path) else []
    except ImportError as e:
        if url.split("://", 1)[0] in ("http", "https", "gs"):
            return None  # gopen will fetch it with curl or gsutil
        raise ShardError(f"cannot reach {url}: {e}; install that package (s3://: `pip install s3fs`), or give "
                         f"the shards as pipe: URLs, e.g. 'pipe:aws s3 cp {url} -'") from None


def discover(folder: str) -> dict[str, list[str]]:
    """The shards of a local folder by split: ``train/`` ``val/`` ``test/`` sub-folders, or split words in names.

    Raises:
        ShardError: no train shards, or shard names that mix split words with names that have none.
    """
    root = Path(folder)

    def tars(d: Path) -> list[str]:
        return sorted(str(p) for p in d.iterdir() if p.is_file() and p.name.endswith(TAR_SUFFIXES))

    splits: dict[str, list[str]] = {}
    for split, words in SPLIT_WORDS.items():
        for word in words:
            if (root / word).is_dir() and (found := tars(root / word)):
                splits[split] = found
                break
    top = tars(root)
    if top:
        named: dict[str, list[str]] = defaultdict(list)
        for path in top:
            tokens = set(re.split(r"[-_.]", Path(path).name.lower()))
            hits = [s for s, words in SPLIT_WORDS.items() if tokens & set(words)]
            named[hits[0] if len(hits) == 1 else "?"].append(path)
        if "?" in named and len(named) > 1:
            raise ShardError(f"cannot tell the split of {Path(named['?'][0]).name} in {folder} (other shards "
                             "there are named by split); give the train shards as a pattern and the test "
                             "shards with --test")
        for split, paths in named.items():
            splits.setdefault("train" if split == "?" else split, []).extend(paths)
    if not splits.get("train"):
        raise ShardError(f"found no train shards in {folder} (looked for train/ and for *.tar named by split: "
                         f"{sorted(splits) or 'no shards at all'}); give the train shards as a pattern, e.g. "
                         f"'{folder}/train-{{000000..000099}}.tar'")
    return splits


def sources_of(source: str, test: str | None = None) -> dict[str, list[str]]:
    """Shard URLs by split for an ``index`` SOURCE (pattern or folder) and its ``--test``."""
    if is_local(source) and os.path.isdir(source) and not is_pattern(source):
        splits = discover(source)
    else:
        splits = {"train": expand(source)}
    if test:
        held = discover(test).get("train", []) if os.path.isdir(test) and not is_pattern(test) else expand(test)
        splits["test"] = held
    if overlap := set(splits["train"]) & set(splits.get("test", ())):
        raise ShardError(f"shards {sorted(overlap)[:3]} are both train and test shards; give them once")
    return splits
