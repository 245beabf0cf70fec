"""One distillation run: ``python -m lgm_ray.distill`` (one process, or ``--workers K`` Ray workers).

Reads a config (``--config FILE`` and/or flags, one per :class:`~lgm_ray.config.DistillConfig`
field), distils ``ipc`` images per class against a frozen backbone with the exact first-order step
of :mod:`lgm_ray.matching`, and writes to ``--out``:

* ``synset.pt`` — ``{"images": N×3×H×W in [0, 1], "labels": N}`` (the reference format) plus the
  class names, the parameters and the resolved config;
* ``grid.png`` — the distilled images, one row per image-per-class; ``grids/step_NNNNNNN.png`` along
  the way (at checkpoints and every ``grid_every`` steps);
* ``checkpoints/step_NNNNNNN/`` — per-class checkpoints (:mod:`lgm_ray.checkpoints`) every
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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lgm_ray.atomic import replace_with
from lgm_ray.backbones import BackboneWeightsError, get_spec
from lgm_ray.checkpoints import Checkpoint, assemble, latest_checkpoint, save_local
from lgm_ray.config import ConfigError, DistillConfig, load_yaml, write_yaml
from lgm_ray.loop import SkippedStepsError, grid_path, run_loop
from lgm_ray.shards_format import ShardError
from lgm_ray.synset import synset_payload


class RunFailedError(RuntimeError):
    """A run that started and then failed; the message names the checkpoint it kept."""


def save_grid(images: torch.Tensor, path: Path, ipc: int) -> None:
    """Save images as a grid with one column per class and one row per image-per-class (atomically)."""
    from torchvision.utils import save_image

    n_classes = images.shape[0] // ipc
    # Images are stored class-major (class 0's ipc images first); show classes along a row.
    order = torch.arange(images.shape[0]).view(n_classes, ipc).t().flatten()
    replace_with(path, lambda tmp: save_image(images[order].float().cpu(), tmp, nrow=n_classes, padding=2,
                                              pad_value=1.0))


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never leaves half a file."""
    replace_with(path, lambda tmp: torch.save(obj, tmp))


def checkpoint_roots(out: str | Path) -> list[Path]:
    """Where a run's checkpoints live: the single process's and the Ray workers'."""
    return [Path(out) / "checkpoints", Path(out) / "ray"]


def write_config(cfg: DistillConfig, out: Path, resumed_at: int | None) -> None:
    """Write ``config.yaml``; a resume with other settings writes ``config.resumed_at_N.yaml`` instead."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    data = cfg.to_dict()
    if resumed_at is not None and path.exists():
        old = load_yaml(path)
        if old == data:
            return
        path = out / f"config.resumed_at_{resumed_at}.yaml"
    write_yaml(data, path)


def check_inputs(cfg: DistillConfig) -> None:
    """Fail before any step on what can be checked here: backbone name, device, shards."""
    try:
        get_spec(cfg.backbone)
    except KeyError as e:
        raise ConfigError(f"{e.args[0]} (field 'backbone')") from None
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but no CUDA device is visible; use --device cpu")
    if cfg.shards != "digits":
        from lgm_ray.shards import ShardSet

        ShardSet(cfg.shards)  # raises ShardError naming the problem and the fix


def finish(cfg: DistillConfig, ckpt: Checkpoint, figures: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``synset.pt`` and ``grid.png`` from the final checkpoint; return the JSON summary.

    ``figures``: each process's :meth:`LoopResult.figures`, rank 0 first.
    """
    out = Path(cfg.out)
    synset = assemble(ckpt)
    images = synset.render().detach()
    payload = synset_payload(
        images, synset.labels, class_names=list(ckpt.meta["class_names"]), num_classes=synset.num_classes,
        config=cfg.to_dict(), synset_config=synset.config(),
        synset_state={k: v.cpu() for k, v in synset.state_dict().items()}, backbone=cfg.backbone,
        steps=ckpt.step,
    )
    atomic_save(payload, out / "synset.pt")
    save_grid(images, out / "grid.png", cfg.ipc)
    losses = [float(v) for v in ckpt.meta["losses"]]
    summary = {
        "steps": ckpt.step,
        "final_loss": losses[-1] if losses else None,
        "skipped_steps": int(ckpt.meta["skipped"]),
        "seconds": figures[0]["seconds"],
        "images_per_s": figures[0]["images_per_s"],
        "workers": cfg.workers,
        "out": str(out),
        "losses": losses,
    }
    if cfg.workers:
        summary["per_worker"] = figures
    return summary


def run_distill(
    cfg: DistillConfig,
    *,
    resume: bool = False,
    use_gpu: bool = False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    log=None,
) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) one distillation; returns the summary (with per-step losses).

    ``cfg.workers`` = 0 runs here; K ≥ 1 runs on K Ray Train workers (:mod:`lgm_ray.workers`), with a
    GPU each when ``use_gpu``. Both run :func:`lgm_ray.loop.run_loop`. ``on_progress`` (picklable) is
    called on rank 0 every ``cfg.log_every`` steps.

    Raises:
        ConfigError: bad settings or inputs, an existing run without ``resume``, or a checkpoint written
            with other settings.
        RunFailedError: the run failed after it started; the message names the checkpoint kept.
    """
    cfg.validate()
    check_inputs(cfg)
    out = Path(cfg.out)
    ckpt = latest_checkpoint(*checkpoint_roots(out))
    if ckpt is not None and not resume:
        raise ConfigError(f"{out} already holds a run (checkpoint at step {ckpt.step}, {ckpt.path}): pass --resume "
                          "to continue it, or choose another --out (nothing was overwritten)")
    if ckpt is not None:
        from lgm_ray.checkpoints import check_resumable

        check_resumable(ckpt, cfg.to_dict())
        print(f"resumed from step {ckpt.step} ({ckpt.path})", file=log or sys.stderr, flush=True)
    elif resume:
        print(f"no checkpoint in {out}; starting from step 0", file=log or sys.stderr, flush=True)
    write_config(cfg, out, ckpt.step if ckpt else None)
    if cfg.workers:
        from lgm_ray.workers import run_on_workers

        final, figures = run_on_workers(cfg, resume=ckpt, use_gpu=use_gpu, on_progress=on_progress)
        return finish(cfg, final, figures)

    def save(synset, optimizer, meta):
        save_local(out, [(0, synset, optimizer)], meta)

    try:
        result = run_loop(cfg, save_checkpoint=save, resume=ckpt, on_progress=on_progress, log=log,
                          save_grid=lambda images, step: save_grid(images, grid_path(out, step), cfg.ipc))
    except SkippedStepsError as e:
        kept = latest_checkpoint(*checkpoint_roots(out))
        where = f"{kept.path} (step {kept.step})" if kept else "none (no checkpoint was reached)"
        raise RunFailedError(f"{e}. Checkpoint kept: {where}") from e
    final = latest_checkpoint(*checkpoint_roots(out))
    assert final is not None and final.step == cfg.steps, "the loop saves a checkpoint at its last step"
    return finish(cfg, final, [result.figures()])


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
    args = parse_args(argv)
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    try:
        cfg = config_from_args(args)
        summary = run_distill(cfg, resume=args.resume, use_gpu=args.gpu)
    except (ConfigError, BackboneWeightsError, ShardError) as exc:  # usage: the message says the fix
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except RunFailedError as exc:  # the run started and failed; the message names what it kept
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    printed = {k: v for k, v in summary.items() if k != "losses"}
    print(json.dumps(printed), flush=True)
    return summary


if __name__ == "__main__":
    main()
