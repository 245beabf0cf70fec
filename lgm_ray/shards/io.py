"""Reading a shard set's bytes: opening any URL, loading the manifest, streaming a tar's samples.

Manifests and shards are read from a local path, an fsspec URL (``s3://``, ``gs://``, ``http(s)://``,
``memory://`` …) or a ``pipe:`` command (:func:`open_stream`). A shard's bytes stream through webdataset's
``tariterators`` (tar reading, grouping members by key) in :func:`shard_samples`, which never holds a shard
whole, checks that the tar is well formed and ends with its end-of-archive blocks, and counts (and, when
asked, hashes) what it read (:class:`ReadStats`). A sample here is webdataset's dict of raw member bytes:
nothing is decoded.

Kept apart from decoding (:mod:`lgm_ray.shards.decode`, which works on bytes already read, often in other
processes) and from the streams (:mod:`lgm_ray.shards.stream`, which decide what to read and in what
order); ``index`` and ``verify`` read shards through it too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from webdataset import tariterators
from webdataset.gopen import gopen

from lgm_ray.shards.format import MANIFEST_NAME, ShardError, check_manifest, join, rebuild_hint


def open_stream(url: str) -> Any:
    """Open a local file, fsspec URL (s3, gs, http, memory…) or ``pipe:`` command for streaming reads.

    A URL whose fsspec backend is not installed goes to webdataset's gopen where it has a scheme for it
    (``http(s)`` through curl, ``gs`` through gsutil); otherwise the error says what to install.
    """
    if url.startswith("pipe:"):
        return gopen(url, "rb")
    if url.startswith("file://"):
        return open(url[len("file://"):], "rb")
    if "://" in url:
        import fsspec

        scheme = url.split("://", 1)[0]
        try:  # http(s): a plain stream (block_size 0), not range requests per block
            return fsspec.open(url, "rb", **({"block_size": 0} if scheme in ("http", "https") else {})).open()
        except ImportError as e:  # "Install s3fs to access S3"
            if scheme in ("http", "https", "gs", "sftp", "ftps", "scp"):
                return gopen(url, "rb")
            raise ShardError(f"cannot open {url}: {e}; install that package (s3://: `pip install s3fs`), or "
                             f"give the shards as a pipe: URL, e.g. 'pipe:aws s3 cp {url} -'") from None
    return open(url, "rb")


def read_bytes(url: str) -> bytes:
    """Read a whole (small) file, such as a manifest or a class-names list, from any source."""
    stream = open_stream(url)
    try:
        return stream.read()
    finally:
        stream.close()


def load_manifest(root: str) -> dict[str, Any]:
    """Read and check ``root/manifest.json`` (or ``root`` itself when it names a ``.json`` file)."""
    url = root if root.endswith(".json") else join(root, MANIFEST_NAME)
    try:
        raw = read_bytes(url)
    except Exception as e:  # each transport has its own errors: missing file, failed pipe, network
        raise ShardError(f"cannot read the manifest {url} ({type(e).__name__}: {e}); build the shard set "
                         f"with `python -m lgm_ray.shards build SOURCE --out {root}`, or index existing "
                         f"shards with `python -m lgm_ray.shards index 'DIR/train-{{000000..000099}}.tar' "
                         f"--out {root}`") from e
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ShardError(f"manifest {url} is not valid JSON ({e}); {rebuild_hint(root)}") from e
    check_manifest(manifest, root)
    return manifest


class ReadStats:
    """What a finished read of a shard found: samples (of the selected members), bytes, SHA-256."""

    def __init__(self) -> None:
        self.samples = 0
        self.bytes = 0
        self.sha256: str | None = None
        self.done = False


class _Tally:
    """A read-through file wrapper that counts bytes, keeps the first and last few, and hashes if asked."""

    def __init__(self, stream: Any, hashing: bool) -> None:
        self.stream, self.total, self.head, self.tail = stream, 0, b"", b""
        self.hash = hashlib.sha256() if hashing else None

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.total += len(data)
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        self.tail = (self.tail + data)[-512:] if len(data) < 512 else data[-512:]
        if self.hash is not None:
            self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()

    def ends_like_a_tar(self) -> bool:
        """Whether the bytes end in an all-zero 512-byte block (a tar's end); compressed tars pass."""
        compressed = self.head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))
        return compressed or (self.total % 512 == 0 and self.tail == bytes(512))


def _extension(fname: str) -> str | None:
    return (tariterators.base_plus_ext(fname)[1] or "").lower() or None


def shard_samples(url: str, members: Iterable[str] | None, *, stats: ReadStats | None = None,
                  hashing: bool = False, hint: str = "") -> Iterator[dict[str, Any]]:
    """Stream a shard's samples through webdataset (tar reading, grouping by key), in tar order.

    Each sample is webdataset's dict: ``__key__``, ``__url__`` and one ``bytes`` value per member
    extension kept (``members``; None keeps all). ``stats`` is filled when the shard was read to its end.

    Raises:
        ShardError: the shard cannot be opened, is not a valid tar, is truncated inside a member, or ends
            without the tar end-of-archive blocks (cut at a member boundary).
    """
    hint = f"; {hint}" if hint else ""
    keep = None if members is None else frozenset(members)
    try:
        tally = _Tally(open_stream(url), hashing)
    except ShardError:
        raise
    except Exception as e:  # each transport has its own errors
        raise ShardError(f"shard {url} cannot be read ({type(e).__name__}: {e}){hint}") from None

    def files() -> Iterator[dict[str, Any]]:
        yield from tariterators.tar_file_expander([{"url": url, "stream": tally}], eof_value=None,
                                                  select_files=None if keep is None else
                                                  (lambda name: _extension(name) in keep))

    n = 0
    try:
        try:
            for sample in tariterators.group_by_keys(files()):
                n += 1
                yield sample
            tally.drain()
        except Exception as e:  # tarfile.ReadError, EOFError, OSError, ValueError (a member twice)…
            reason = str(e.args[0]) if e.args else type(e).__name__
            raise ShardError(f"shard {url} is truncated or not a valid tar ({type(e).__name__}: "
                             f"{reason.split(' @ ')[0]}){hint}") from None
    finally:
        tally.close()
    if not tally.ends_like_a_tar():  # cut at a member boundary: tarfile itself sees a short, sound tar
        raise ShardError(f"shard {url} does not end with the tar end-of-archive blocks (after {n} samples, "
                         f"{tally.total} bytes): it is truncated, or its end was changed{hint}")
    if stats is not None:
        stats.samples, stats.bytes, stats.done = n, tally.total, True
        stats.sha256 = tally.hash.hexdigest() if tally.hash is not None else None




def members_of(sample: dict[str, Any]) -> dict[str, bytes]:
    """A webdataset sample's members without its ``__key__``-style metadata."""
    return {k: v for k, v in sample.items() if not k.startswith("__")}
