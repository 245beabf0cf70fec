"""The sweep command: ``python -m lgm_ray.sweep SPEC [--resume] [--address A]``.

Exit status: 0 all trials finished; 1 some trials failed (FAILED in MLflow, listed); 2 a bad spec
or command (one line ``error: …``, nothing ran); 130 interrupted (re-run with ``--resume``).
"""

from __future__ import annotations

import argparse
import sys

from lgm_ray.common.cli import run_command
from lgm_ray.sweep.driver import run_sweep
from lgm_ray.sweep.parse import load_spec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``): the spec and how to run it."""
    p = argparse.ArgumentParser(prog="python -m lgm_ray.sweep", description=__doc__.split("\n")[0])
    p.add_argument("spec", help="sweep spec (YAML), e.g. sweeps/demo.yaml")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this spec")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (overrides MLFLOW_TRACKING_URI and the spec)")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with a local Ray")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: a bad spec or command (any :class:`~lgm_ray.common.errors.InputError`: a
    ``SpecError``, a ``ConfigError``) prints ``error: …`` and exits with status 2, before any trial."""
    args = parse_args(argv)

    def body() -> int:
        spec = load_spec(args.spec)
        return run_sweep(spec, resume=args.resume, address=args.address, tracking_uri=args.tracking_uri,
                         dashboard=args.dashboard)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
