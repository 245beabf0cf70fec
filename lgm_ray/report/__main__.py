"""The report command: ``python -m lgm_ray.report SOURCE --out DIR``.

Exit status: 0 the report was written (its path and size printed); 2 a bad source, folder or option (one
line ``error: …``, nothing written).
"""

from __future__ import annotations

import argparse
import sys
import time

from lgm_ray.common.cli import run_command
from lgm_ray.evaluate.config import EVAL_SPLITS
from lgm_ray.report.build import build_report, page_size
from lgm_ray.report.embedding import PROJECTIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``): the sweep, the report folder and the options."""
    p = argparse.ArgumentParser(prog="python -m lgm_ray.report", description=__doc__.split("\n")[0])
    p.add_argument("source", help="a sweep folder (storage/NAME) or an MLflow experiment name")
    p.add_argument("--out", required=True, help="report folder (index.html, figures/, images/)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's, else MLFLOW_TRACKING_URI, "
                                          "else sqlite:///mlflow.db)")
    p.add_argument("--parent-run", help="the sweep's parent run id (default: the experiment's newest sweep)")
    p.add_argument("--projection", default="pca", choices=PROJECTIONS)
    p.add_argument("--split", default="test", choices=EVAL_SPLITS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", help="feature cache (default: the sweep's feature_cache/)")
    p.add_argument("--no-embeddings", action="store_true", help="skip the embedding maps")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the figures to MLflow")
    p.add_argument("--thumb-px", type=int, default=96)
    p.add_argument("--max-classes", type=int, default=100)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI: writes the report, prints its path and size; bad input (a
    :class:`~lgm_ray.report.load.ReportError`, any :class:`~lgm_ray.common.errors.InputError`) prints one
    ``error: …`` line and exits 2."""
    args = parse_args(argv)

    def body() -> int:
        t0 = time.perf_counter()
        index = build_report(args.source, args.out, args.tracking_uri, parent_run=args.parent_run,
                             embeddings=not args.no_embeddings, projection=args.projection, split=args.split,
                             device=args.device, cache_dir=args.cache_dir, log_mlflow=not args.no_mlflow,
                             thumb_px=args.thumb_px, max_classes=args.max_classes)
        print(f"report: {index} ({page_size(index.parent) / 1e6:.2f} MB, {time.perf_counter() - t0:.1f} s)")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
