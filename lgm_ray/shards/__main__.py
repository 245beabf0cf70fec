"""Build, index and verify WebDataset shard sets from the command line: ``python -m lgm_ray.shards``.

    python -m lgm_ray.shards build digits --out shards/digits
    python -m lgm_ray.shards build imagefolder DIR --out shards/NAME [--real-res 256 --format jpg …]
    python -m lgm_ray.shards build hf DIR --out shards/NAME [--image-column image --label-column label]
    python -m lgm_ray.shards build … --val-fraction 0.1 [--val-seed 0]   # + a validation split
    python -m lgm_ray.shards index 'DIR/train-{000000..000146}.tar' --out shards/NAME \\
        [--test 'DIR/val-{000000..000006}.tar'] [--classnames FILE] [--image-key K] [--label-key K[:FIELD]]
    python -m lgm_ray.shards verify shards/NAME

Exit codes:

* 0 — built, indexed, or verified sound (``OK …`` on stdout);
* 1 — ``verify`` read the set and found problems: one line per problem on stderr, then ``FAILED …``;
* 2 — bad input: a usage error, or one line ``error: …`` naming the problem and the fix (an unusable
  source, option, ``--out`` or manifest, a damaged shard or sample met while building or indexing);
  nothing is written then;
* 130 — interrupted (Ctrl-C): ``build`` leaves ``--out`` as it was, ``index`` writes nothing.

This module only parses and dispatches, one function per subcommand, to the engines:
:func:`lgm_ray.shards.build.build`, :func:`lgm_ray.shards.index.index` and
:func:`lgm_ray.shards.verify.verify`. ``main(argv)`` takes a list and returns the exit code, so tests
call it in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from lgm_ray.common.cli import fail, run_command
from lgm_ray.common.errors import EXIT_FAILED, EXIT_INTERRUPTED, InputError
from lgm_ray.shards.build import build
from lgm_ray.shards.decode import ON_BAD_SAMPLE
from lgm_ray.shards.format import IMAGE_FORMATS, IMAGE_KEYS, rebuild_hint
from lgm_ray.shards.index import index
from lgm_ray.shards.sources import IMAGE_SUFFIXES, SOURCES
from lgm_ray.shards.verify import verify

__all__ = ["main", "make_parser"]


def _add_build(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="encode a source into shards and a manifest")
    b.add_argument("source", choices=SOURCES)
    b.add_argument("path", nargs="?", help="DIR, for imagefolder (class sub-folders, or train/ and test/ "
                   f"holding them; images {' '.join(IMAGE_SUFFIXES)}) and hf (saved with save_to_disk)")
    b.add_argument("--out", help="output folder (default: shards/SOURCE or shards/<DIR's name>)")
    b.add_argument("--real-res", type=int, help="stored short side in pixels (default 256; digits 32)")
    b.add_argument("--format", choices=IMAGE_FORMATS, help="encoding (default jpg; digits png)")
    b.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    b.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    b.add_argument("--test-fraction", type=float, default=0.1, help="held out if no test split (default 0.1)")
    b.add_argument("--split-seed", type=int, default=0, help="seed of that split and of the shard shuffle")
    b.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of every class's train images as split 'val' (default 0: "
                   "none; at least 1 per class, at least 1 left for training)")
    b.add_argument("--val-seed", type=int, default=0, help="seed of the validation split (default 0)")
    b.add_argument("--image-column", default="image", help="hf: image column (default image)")
    b.add_argument("--label-column", default="label", help="hf: label column (default label)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out, once built")
    b.add_argument("--on-bad-sample", choices=ON_BAD_SAMPLE, default="raise",
                   help="skip: leave out undecodable source images (listed in the manifest)")


def _add_index(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("index", help="write a manifest for existing WebDataset shards (no image is "
                       "rewritten)")
    i.add_argument("source", help="the train shards: a brace or glob pattern "
                   "(DIR/train-{000000..000146}.tar, pipe:…, http(s)://…, s3://…) or a folder (train/ val/ test/ sub-folders, or shards "
                   "named by split)")
    i.add_argument("--out", required=True, help="folder for manifest.json (the shards stay where they are)")
    i.add_argument("--test", help="the test shards (pattern or folder), if SOURCE does not hold them")
    i.add_argument("--classnames", help="FILE with one class name per line (classnames.txt style), or "
                   "KEY:FIELD to take each class's name from a field of the JSON member KEY; default: a "
                   "classnames.txt beside the shards, else the class indices")
    i.add_argument("--image-key", help="the image member's extension (default: found among "
                   f"{', '.join(IMAGE_KEYS[:6])}, …)")
    i.add_argument("--label-key", default="cls", help="the label member: cls (an integer, the default), "
                   "another extension, or KEY:FIELD for a field of a JSON member (e.g. json:label)")
    i.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of every class's train samples as split 'val' (by position; "
                   "no shard is rewritten)")
    i.add_argument("--val-seed", type=int, default=0, help="seed of the validation split (default 0)")
    i.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="scanning processes")
    i.add_argument("--overwrite", action="store_true", help="replace an existing manifest.json in --out")
    i.add_argument("--on-bad-sample", choices=ON_BAD_SAMPLE, default="raise",
                   help="skip: leave out samples without an image or with a bad label (counted and listed)")


def _add_verify(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("verify", help="check hashes and counts and decode every sample")
    v.add_argument("root", help="shard set folder, URL prefix, manifest file or shard pattern")
    v.add_argument("--on-bad-sample", choices=ON_BAD_SAMPLE, default="raise",
                   help="skip: report bad samples, and pass if nothing else is wrong")


def make_parser() -> argparse.ArgumentParser:
    """The command line's parser: one subparser per subcommand."""
    p = argparse.ArgumentParser(prog="python -m lgm_ray.shards", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Exit codes:"):__doc__.index("This module")])
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_build, _add_index, _add_verify):
        add(sub)
    return p


def run_build(args: argparse.Namespace, command: list[str]) -> int:
    """``build``: encode the source into ``--out``."""
    name = os.path.basename(os.path.normpath(args.path or args.source))
    build(args.source, args.path, out=args.out or os.path.join("shards", name),
          real_res=args.real_res, fmt=args.format, quality=args.quality, shard_size=args.shard_size,
          workers=args.workers, test_fraction=args.test_fraction, split_seed=args.split_seed,
          val_fraction=args.val_fraction, val_seed=args.val_seed, overwrite=args.overwrite,
          on_bad_sample=args.on_bad_sample, image_column=args.image_column, label_column=args.label_column,
          command=command)
    return 0


def run_index(args: argparse.Namespace, command: list[str]) -> int:
    """``index``: scan existing shards and write ``--out/manifest.json``."""
    index(args.source, out=args.out, test=args.test, classnames=args.classnames, image_key=args.image_key,
          label_key=args.label_key, val_fraction=args.val_fraction, val_seed=args.val_seed,
          workers=args.workers, overwrite=args.overwrite, on_bad_sample=args.on_bad_sample, command=command)
    return 0


def run_verify(args: argparse.Namespace, command: list[str]) -> int:
    """``verify``: the full check; ``OK …`` (0), or the problems and ``FAILED …`` (1)."""
    problems, tolerated, summary = verify(args.root, on_bad_sample=args.on_bad_sample)
    for line in tolerated:
        print(f"skipped: {line}", file=sys.stderr)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"FAILED {summary}: {len(problems)} problems; {rebuild_hint(args.root)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"OK {summary}; sizes, sha256 and counts match, every sample decodes"
          + (f", {len(tolerated)} bad samples tolerated" if tolerated else ""))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, list[str]], int]] = {
    "build": run_build, "index": run_index, "verify": run_verify}


def main(argv: list[str] | None = None) -> int:
    """``python -m lgm_ray.shards {build,index,verify}``; returns the exit code (module doc)."""
    args = make_parser().parse_args(argv)
    command = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        try:
            return COMMANDS[args.command](args, command)
        except InputError:
            raise
        except ValueError as e:  # an engine's check of an option: bad input too
            raise InputError(str(e)) from e

    try:
        return run_command(body)
    except KeyboardInterrupt:
        return fail(f"{args.command} interrupted; nothing was written (a build leaves --out as it was)",
                    EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
