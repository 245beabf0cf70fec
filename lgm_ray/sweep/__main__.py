"""The sweep command: ``python -m lgm_ray.sweep SPEC [--set KEY=VALUE …] [--resume] [--address A]``.

Runs the grid of a sweep spec (``sweeps/*.yaml``) as Ray Tune trials, every result in MLflow.

``--set KEY=VALUE`` (repeatable) changes a field of the spec before it is checked, without copying the
file: a dotted key into the spec and a YAML value, e.g. ``--set config.steps=20 --set eval.epochs=5
--set storage=/tmp/x --set resources.workers=2 --set datasets.digits.shards=/data/digits``. A key that
names no field fails with the nearest valid one. The settings are kept in the resolved spec
(``spec.yaml``, tag ``lgm_ray.overrides`` on the parent run); a ``--resume`` needs the same values.

Relative paths in the spec (shards, storage, config_file, weights) are from the working directory.

Before Ray starts and before anything is written, a preflight checks the spec, the sweep folder, the
MLflow tracking store (a server must answer within seconds), every backbone's weights and every dataset's
shards; a failure is one ``error: …`` line and exit 2, and the same command runs once it is fixed.
SIGTERM is handled as Ctrl-C.

Exit status:
  0    every trial and shared baseline finished (the parent MLflow run FINISHED)
  1    some trials or shared baselines failed (their MLflow runs FAILED with the error, the parent FAILED
       and tagged lgm_ray.failed_trials), or the sweep stopped on an error after it started: --resume
       re-runs what failed and keeps what finished
  2    a bad spec, --set or command, or a failed preflight (tracking server, weights, shards, resources):
       one `error: …` line, nothing written; fix it and run the same command
  130  interrupted (Ctrl-C / SIGINT, or SIGTERM): unfinished trials' MLflow runs and the parent KILLED;
       continue with the same command and --resume (if nothing was written yet, the same command)
"""

from __future__ import annotations

import argparse
import sys

from lgm_ray.common.cli import fail, run_command
from lgm_ray.common.errors import EXIT_INTERRUPTED
from lgm_ray.sweep.driver import run_sweep, sigterm_as_sigint
from lgm_ray.sweep.parse import load_spec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``): the spec and how to run it."""
    first, rest = __doc__.split("\n", 2)[::2]
    p = argparse.ArgumentParser(prog="python -m lgm_ray.sweep", description=first, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="sweep spec (YAML), e.g. sweeps/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a spec field before it is checked (dotted key, YAML value; repeatable), "
                        "e.g. --set config.steps=20")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this spec")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (overrides MLFLOW_TRACKING_URI and the spec)")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with a local Ray")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status of the module docstring. A bad spec or command (any
    :class:`~lgm_ray.common.errors.InputError`: a ``SpecError``, a ``ConfigError``, a failed preflight)
    prints ``error: …`` and exits with status 2, before anything is written."""
    args = parse_args(argv)

    def body() -> int:
        with sigterm_as_sigint():
            try:
                spec = load_spec(args.spec, overrides=args.overrides)
            except KeyboardInterrupt:
                return fail("interrupted while reading the spec; nothing was written", EXIT_INTERRUPTED)
            return run_sweep(spec, resume=args.resume, address=args.address, tracking_uri=args.tracking_uri,
                             dashboard=args.dashboard)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
