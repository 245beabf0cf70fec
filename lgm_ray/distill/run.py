"""One distillation run, the engine behind ``python -m lgm_ray.distill`` and the sweep's trials.

:func:`run_distill` checks the inputs, resumes from the run folder's newest checkpoint
(:class:`~lgm_ray.distill.run_folder.RunFolder`), runs :func:`lgm_ray.distill.loop.run_loop` here or on
K Ray Train workers (:mod:`lgm_ray.distill.workers`), and writes the set and its grid.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lgm_ray.backbones import get_spec
from lgm_ray.common.errors import RunFailedError
from lgm_ray.core.synset import synset_payload
from lgm_ray.distill.checkpoints import Checkpoint, assemble, save_local
from lgm_ray.distill.config import ConfigError, DistillConfig, load_yaml, write_yaml
from lgm_ray.distill.loop import SkippedStepsError, run_loop
from lgm_ray.distill.run_folder import RunFolder


def write_config(cfg: DistillConfig, out: Path, resumed_at: int | None) -> None:
    """Write ``config.yaml``; a resume with other settings writes ``config.resumed_at_N.yaml`` instead."""
    folder = RunFolder(out)
    folder.root.mkdir(parents=True, exist_ok=True)
    path = folder.config
    data = cfg.to_dict()
    if resumed_at is not None and path.exists():
        old = load_yaml(path)
        if old == data:
            return
        path = folder.resumed_config(resumed_at)
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
        from lgm_ray.shards.reader import ShardSet

        ShardSet(cfg.shards)  # raises ShardError naming the problem and the fix


def finish(cfg: DistillConfig, ckpt: Checkpoint, figures: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``synset.pt`` and ``grid.png`` from the final checkpoint; return the JSON summary.

    ``figures``: each process's :meth:`LoopResult.figures`, rank 0 first.
    """
    folder = RunFolder(cfg.out)
    synset = assemble(ckpt)
    images = synset.render().detach()
    payload = synset_payload(
        images, synset.labels, class_names=list(ckpt.meta["class_names"]), num_classes=synset.num_classes,
        config=cfg.to_dict(), synset_config=synset.config(),
        synset_state={k: v.cpu() for k, v in synset.state_dict().items()}, backbone=cfg.backbone,
        steps=ckpt.step,
    )
    folder.save_synset(payload)
    folder.save_grid(images, cfg.ipc)
    losses = [float(v) for v in ckpt.meta["losses"]]
    summary = {
        "steps": ckpt.step,
        "final_loss": losses[-1] if losses else None,
        "skipped_steps": int(ckpt.meta["skipped"]),
        "seconds": figures[0]["seconds"],
        "images_per_s": figures[0]["images_per_s"],
        "workers": cfg.workers,
        "out": str(folder.root),
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

    ``cfg.workers`` = 0 runs here; K ≥ 1 runs on K Ray Train workers (:mod:`lgm_ray.distill.workers`), with a
    GPU each when ``use_gpu``. Both run :func:`lgm_ray.distill.loop.run_loop`. ``on_progress`` (picklable) is
    called on rank 0 every ``cfg.log_every`` steps.

    Raises:
        ConfigError: bad settings or inputs, an existing run without ``resume``, or a checkpoint written
            with other settings.
        RunFailedError: the run failed after it started; the message names the checkpoint kept.
    """
    cfg.validate()
    check_inputs(cfg)
    out = Path(cfg.out)
    folder = RunFolder(out)
    ckpt = folder.latest_checkpoint()
    if ckpt is not None and not resume:
        raise ConfigError(f"{out} already holds a run (checkpoint at step {ckpt.step}, {ckpt.path}): pass --resume "
                          "to continue it, or choose another --out (nothing was overwritten)")
    if ckpt is not None:
        from lgm_ray.distill.checkpoints import check_resumable

        check_resumable(ckpt, cfg.to_dict())
        print(f"resumed from step {ckpt.step} ({ckpt.path})", file=log or sys.stderr, flush=True)
    elif resume:
        print(f"no checkpoint in {out}; starting from step 0", file=log or sys.stderr, flush=True)
    write_config(cfg, out, ckpt.step if ckpt else None)
    if cfg.workers:
        from lgm_ray.distill.workers import run_on_workers

        final, figures = run_on_workers(cfg, resume=ckpt, use_gpu=use_gpu, on_progress=on_progress)
        return finish(cfg, final, figures)

    def save(synset, optimizer, meta):
        save_local(folder, [(0, synset, optimizer)], meta)

    try:
        result = run_loop(cfg, save_checkpoint=save, resume=ckpt, on_progress=on_progress, log=log,
                          save_grid=lambda images, step: folder.save_grid(images, cfg.ipc, step))
    except SkippedStepsError as e:
        kept = folder.latest_checkpoint()
        where = f"{kept.path} (step {kept.step})" if kept else "none (no checkpoint was reached)"
        raise RunFailedError(f"{e}. Checkpoint kept: {where}") from e
    final = folder.latest_checkpoint()
    assert final is not None and final.step == cfg.steps, "the loop saves a checkpoint at its last step"
    return finish(cfg, final, [result.figures()])
