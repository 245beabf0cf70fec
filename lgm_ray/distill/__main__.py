"""One distillation run: ``python -m lgm_ray.distill`` (one process, or ``--workers K`` Ray workers).

Reads a config (``--config FILE`` and/or flags, one per :class:`~lgm_ray.distill.config.DistillConfig`
field), distils ``ipc`` images per class against a frozen backbone with the exact first-order step
of :mod:`lgm_ray.core.matching`, and writes to ``--out``:

* ``synset.pt`` — ``{"images": N×3×H×W in [0, 1], "labels": N}`` (the reference format) plus the
  class names, the parameters and the resolved config;
* ``grid.png`` — the distilled images, one row per image-per-class; ``grids/step_NNNNNNN.png`` along
  the way (at checkpoints and every ``grid_every`` steps);
* ``checkpoints/step_NNNNNNN/`` — per-class checkpoints (:mod:`lgm_ray.distill.checkpoints`) every
  ``ckpt_every`` steps (``ray/`` holds the workers' checkpoints); ``--resume`` continues from the
  newest, on any number of workers, and reproduces an uninterrupted run;
* ``config.yaml`` — the resolved config (a resume with other non-image settings writes
  ``config.resumed_at_N.yaml`` beside it instead of overwriting it).

Progress goes to stderr; the last line on stdout is a JSON summary. Usage errors print one line
(``error: …``) and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from lgm_ray.common.cli import run_command
from lgm_ray.distill.config import DistillConfig, load_yaml
from lgm_ray.distill.run import run_distill


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags: ``--config``, ``--resume``, ``--gpu`` and one per DistillConfig field (derived, not listed)."""
    p = argparse.ArgumentParser(prog="python -m lgm_ray.distill", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file of DistillConfig fields; flags override it")
    p.add_argument("--resume", action="store_true", help="continue the newest checkpoint under OUT")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray worker (with --workers)")
    p.add_argument("--address", help="Ray cluster address for --workers (default: RAY_ADDRESS, else a local Ray)")
    defaults = DistillConfig()
    for name, (typ, _optional) in DistillConfig.field_types().items():
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"default: {getattr(defaults, name)}")
        else:
            p.add_argument(flag, dest=name, default=None, metavar=typ.__name__.upper(),
                           help=f"default: {getattr(defaults, name)}")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """The config file, overridden by the flags given, resolved and validated."""
    data = load_yaml(args.config) if args.config else {}
    DistillConfig.check_keys(data, source=args.config or "config")
    for name in DistillConfig.field_names():
        value = getattr(args, name, None)
        if value is not None:
            data[name] = None if value in ("none", "null") and DistillConfig.field_types()[name][1] else value
    return DistillConfig.from_dict(data, source=args.config or "flags")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command: returns the summary; bad input exits 2, a failed run 1, each with one ``error: …`` line."""
    args = parse_args(argv)
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    result: dict[str, Any] = {}

    def body() -> None:
        cfg = config_from_args(args)
        result.update(run_distill(cfg, resume=args.resume, use_gpu=args.gpu))

    code = run_command(body)
    if code:
        raise SystemExit(code)
    printed = {k: v for k, v in result.items() if k != "losses"}
    print(json.dumps(printed), flush=True)
    return result


if __name__ == "__main__":
    main()
