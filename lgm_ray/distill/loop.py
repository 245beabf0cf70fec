"""The one distillation loop, run by the single process and by every Ray worker alike.

The distributed context comes in as arguments (rank, world size, a ``reduce`` that sums over
processes, how to save a checkpoint): on one process ``reduce`` is the identity and checkpoints go
to ``OUT/checkpoints``; on Ray workers it is an all-reduce and checkpoints go through
``ray.train.report`` (:mod:`lgm_ray.distill.workers`). The step itself is :func:`lgm_ray.core.matching.lgm_step`
(docs/design.md §1–2).

Every random draw is a function of (run seed, step) or (run seed, class, level) and the real batch
of step t is a function of (run seed, t) and the data (:meth:`RealSource.batches`), so a run
resumed at any step — on the same or another number of processes — continues as if uninterrupted.

The loop reads its pieces in order: :func:`_start` (set-up and resume), :func:`_step` (one step, the
pyramid growth before it), :func:`_report` (progress on rank 0), :func:`_save` (grids and checkpoints).

**Test hook** (never a flag, never a config field): the environment variable ``LGM_RAY_TEST_STEP_DELAY``
(:data:`TEST_STEP_DELAY`) makes every process sleep that many seconds after each step, so that a test
can kill a run mid-way. Tests set it in a run's environment (``monkeypatch.setenv``, a subprocess's
``env=``); :mod:`lgm_ray.distill.workers` forwards it to the Ray Train workers.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, TextIO

import torch
import torch.nn.functional as F

from lgm_ray.backbones import Backbone, create_backbone
from lgm_ray.core.augment import AugSpec
from lgm_ray.core.matching import Reduce, amp_dtype, lgm_step
from lgm_ray.core.seeds import derive_seed
from lgm_ray.core.synset import SyntheticSet
from lgm_ray.distill.checkpoints import Checkpoint, build_synset, check_resumable, load_class_state
from lgm_ray.distill.config import ConfigError, DistillConfig
from lgm_ray.distill.real_batches import RealBatch, RealSource, open_source

GRID_SIDE = 64  # grids saved along the way are gathered at this side at most
TEST_STEP_DELAY = "LGM_RAY_TEST_STEP_DELAY"  # the test hook (module doc): seconds to sleep after each step


class SkippedStepsError(RuntimeError):
    """Too many steps had a non-finite gradient; the last good checkpoint is kept."""


def class_shards(num_classes: int, world_size: int) -> list[list[int]]:
    """Deal classes to processes in contiguous blocks, the first ones one larger when uneven."""
    if world_size > num_classes:
        raise ConfigError(f"{world_size} workers for {num_classes} classes: each worker owns at least one "
                          f"class of the synthetic set; use --workers ≤ {num_classes}")
    base, extra = divmod(num_classes, world_size)
    out, start = [], 0
    for r in range(world_size):
        n = base + (r < extra)
        out.append(list(range(start, start + n)))
        start += n
    return out


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class LoopResult:
    """What one process measured: its step count, losses and figures."""

    rank: int
    steps: int
    steps_run: int
    seconds: float
    reduce_seconds: float
    views_per_step: int
    peak_memory_mb: float
    classes: list[int] = field(default_factory=list)

    @property
    def images_per_s(self) -> float | None:
        done = self.steps_run
        return round(self.views_per_step * done / self.seconds, 2) if self.seconds and done else None

    def figures(self) -> dict[str, Any]:
        return {"rank": self.rank, "classes": self.classes, "steps": self.steps, "steps_run": self.steps_run,
                "views_per_step": self.views_per_step, "seconds": round(self.seconds, 3),
                "reduce_seconds": round(self.reduce_seconds, 3), "images_per_s": self.images_per_s,
                "peak_memory_mb": round(self.peak_memory_mb, 1)}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _grid_images(synset: SyntheticSet, owned_rows: torch.Tensor, num_images: int, reduce: Reduce) -> torch.Tensor:
    """Every image of the set (small), gathered with a sum of zero-padded shards; same on all processes."""
    with torch.no_grad():
        images = synset.render()
        side = min(images.shape[-1], GRID_SIDE)
        if side != images.shape[-1]:
            images = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        full = torch.zeros((num_images, *images.shape[1:]), device=images.device)
        full[owned_rows.to(images.device)] = images.float()
        return reduce(full).clamp(0, 1).cpu()


def real_start(source, cfg: DistillConfig, owned: list[int]) -> torch.Tensor:
    """The ``init: real`` start of the classes ``owned``: ``ipc`` random real training images per class.

    Class ``c``'s draw depends on (seed, c) only, so every process, and any number of them, starts
    the classes alike.
    """
    images, labels = source.random_per_class(derive_seed(cfg.seed, "init"), n=cfg.ipc, res=cfg.syn_res)
    keep = torch.isin(labels, torch.tensor(owned, dtype=labels.dtype))
    return images[keep]


def step_delay() -> float:
    """The test hook's seconds of sleep after each step (:data:`TEST_STEP_DELAY`; 0 when unset)."""
    return float(os.environ.get(TEST_STEP_DELAY) or 0)


class _TimedReduce:
    """A ``reduce`` that adds up the seconds spent in it (the all-reduce's share of the run)."""

    def __init__(self, reduce: Reduce) -> None:
        self.reduce, self.seconds = reduce, 0.0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.reduce(t)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - t0
        return out


@dataclass
class _Run:
    """One process's loop: what it was set up with, and its state between steps."""

    cfg: DistillConfig
    rank: int
    world_size: int
    source: RealSource
    owned: list[int]  # the classes of the synthetic set this process holds
    backbone: Backbone
    spec: AugSpec
    real_spec: AugSpec | None  # the real views' augmentation when it is not ``spec``
    synset: SyntheticSet
    optimizer: torch.optim.Optimizer
    batches: Iterator[RealBatch] | None = None
    step: int = 0
    losses: list[float] = field(default_factory=list)
    skipped: int = 0

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def num_images(self) -> int:
        return self.num_classes * self.cfg.ipc

    @cached_property
    def owned_rows(self) -> torch.Tensor:
        """The global image indices (class-major) of the images this process holds."""
        return torch.tensor([c * self.cfg.ipc + k for c in self.owned for k in range(self.cfg.ipc)])

    @property
    def real_batch(self) -> int:
        """Real samples per step (over all processes)."""
        return self.cfg.ipc * self.cfg.augs_per_batch * self.num_classes

    @property
    def views_per_step(self) -> int:
        return self.real_batch + self.num_images * self.cfg.augs_per_batch

    def meta(self) -> dict[str, Any]:
        """The checkpoint's ``meta.json`` (:mod:`lgm_ray.distill.checkpoints`)."""
        return {"step": self.step, "losses": self.losses, "skipped": self.skipped,
                "n_levels": len(self.synset.levels), "num_classes": self.num_classes,
                "class_names": list(self.source.class_names), "world_size": self.world_size,
                "config": self.cfg.to_dict()}


def _start(cfg: DistillConfig, resume: Checkpoint | None, rank: int, world_size: int,
           device: torch.device) -> _Run:
    """Set up this process's part of the run: its data, classes, backbone, set and optimiser, at step 0
    or at the checkpoint ``resume``."""
    source = open_source(cfg.shards, cfg.real_res, cfg.num_workers)
    owned = class_shards(source.num_classes, world_size)[rank]
    backbone = create_backbone(cfg.backbone, weights=cfg.weights, img_size=cfg.crop_res,
                               normalization=cfg.normalization, raw_output=cfg.raw_output, device=device)
    spec = AugSpec(mode=cfg.aug, crop_res=cfg.crop_res, noise_p=cfg.aug_noise_p, scale=(cfg.aug_min_scale, 1.0),
                   zoom_out=cfg.aug_zoom_out, padding=cfg.aug_padding)
    real_spec = None if cfg.aug_real else replace(spec, mode="none")  # aug_real: false — real views only resized
    step, losses, skipped, n_levels = 0, [], 0, 1
    if resume is not None:
        check_resumable(resume, cfg.to_dict())
        step, losses = resume.step, list(resume.meta["losses"])
        skipped, n_levels = int(resume.meta["skipped"]), int(resume.meta["n_levels"])
    synset = build_synset(cfg.to_dict(), source.num_classes, owned, n_levels)
    if resume is None and cfg.init == "real":
        synset.set_images(real_start(source, cfg, owned))
    synset = synset.to(device)
    optimizer = torch.optim.Adam(synset.parameters(), lr=cfg.lr)
    if resume is not None:
        load_class_state(synset, optimizer, resume.classes, resume.adam_step)
    run = _Run(cfg, rank, world_size, source, owned, backbone, spec, real_spec, synset, optimizer,
               step=step, losses=losses, skipped=skipped)
    run.batches = source.batches(run.real_batch, seed=derive_seed(cfg.seed, "real"), start_step=step, rank=rank,
                                 world_size=world_size, num_streams=cfg.real_streams)
    return run


def _step(run: _Run, reduce: Reduce, log: TextIO) -> None:
    """One step: grow the pyramid when due, :func:`lgm_step`, then Adam's step — or skip it when the
    gradient is not finite (counted; rank 0 says so)."""
    cfg, synset = run.cfg, run.synset
    since = run.step - cfg.pyramid_offset
    if since > 0 and since % cfg.pyramid_extent == 0 and synset.can_grow:
        synset.grow()
        run.optimizer = torch.optim.Adam(synset.parameters(), lr=cfg.lr)  # the paper re-creates Adam
    x, y, positions = next(run.batches)
    result = lgm_step(
        run.backbone, synset.render(), run.owned_rows, x, y, positions, num_classes=run.num_classes,
        feature_dim=run.backbone.feature_dim, num_images=run.num_images, real_total=run.real_batch, ipc=cfg.ipc,
        augs=cfg.augs_per_batch, seed=cfg.seed, step=run.step, spec=run.spec, head_std=cfg.head_std,
        real_spec=run.real_spec, micro_batch=cfg.micro_batch, amp_dtype=amp_dtype(cfg.amp), reduce=reduce,
    )
    if result.finite:
        run.optimizer.step()
    else:
        run.skipped += 1
        if run.rank == 0:
            print(f"step {run.step + 1}: non-finite gradient (loss {result.loss}); step skipped "
                  f"({run.skipped} so far, limit {cfg.max_skipped_steps})", file=log, flush=True)
    run.optimizer.zero_grad(set_to_none=True)
    run.losses.append(result.loss)
    run.step += 1


def _check_skipped(run: _Run) -> None:
    """Stop the run once more than ``max_skipped_steps`` steps were skipped."""
    if run.skipped > run.cfg.max_skipped_steps:
        raise SkippedStepsError(
            f"{run.skipped} steps had non-finite gradients (more than max_skipped_steps = "
            f"{run.cfg.max_skipped_steps}); the run stopped at step {run.step} and kept its last checkpoint. "
            "Try --amp bf16 or none instead of fp16, a lower --lr, or check the backbone's weights")


def _report(run: _Run, first: int, t_start: float, reduce_seconds: float, log: TextIO,
            on_progress: Callable[[dict[str, Any]], None] | None) -> None:
    """Rank 0's progress line (mean loss of the last ``log_every`` steps, rates, ETA) and ``on_progress``."""
    cfg, step = run.cfg, run.step
    now = time.perf_counter()
    recent = [v for v in run.losses[-cfg.log_every:] if math.isfinite(v)]
    rate = (step - first) / max(now - t_start, 1e-9)
    info = {"step": step, "loss": sum(recent) / len(recent) if recent else float("nan"),
            "images_per_s": rate * run.views_per_step, "skipped": run.skipped,
            "reduce_share": reduce_seconds / max(now - t_start, 1e-9)}
    side = run.synset.levels[-1].shape[-1]
    share = f"  all-reduce {100 * info['reduce_share']:.0f}%" if run.world_size > 1 else ""
    print(f"step {step}/{cfg.steps}  loss {info['loss']:.4f}  {rate:.2f} it/s  "
          f"{info['images_per_s']:.0f} img/s{share}  skipped {run.skipped}  "
          f"eta {(cfg.steps - step) / max(rate, 1e-9):.0f}s  pyramid {len(run.synset.levels)} levels ({side}px)",
          file=log, flush=True)
    if on_progress is not None:
        on_progress(info)


def _save(run: _Run, reduce: Reduce, save_grid: Callable[[torch.Tensor, int], None] | None,
          save_checkpoint: Callable[[SyntheticSet, torch.optim.Optimizer, dict[str, Any]], None]) -> None:
    """The grid (every process gathers, rank 0 saves) and the checkpoint due at this step, if any."""
    cfg, step = run.cfg, run.step
    at_ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps
    if save_grid is not None and (at_ckpt or (cfg.grid_every and step % cfg.grid_every == 0)):
        images = _grid_images(run.synset, run.owned_rows, run.num_images, reduce)
        if run.rank == 0:
            save_grid(images, step)
    if at_ckpt:
        save_checkpoint(run.synset, run.optimizer, run.meta())


def run_loop(
    cfg: DistillConfig,
    *,
    save_checkpoint: Callable[[SyntheticSet, torch.optim.Optimizer, dict[str, Any]], None],
    resume: Checkpoint | None = None,
    rank: int = 0,
    world_size: int = 1,
    reduce: Reduce = _identity,
    device: torch.device | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    save_grid: Callable[[torch.Tensor, int], None] | None = None,
    log: TextIO | None = None,
) -> LoopResult:
    """Run steps until ``cfg.steps`` on this process's class shard; every process calls it alike.

    Args:
        cfg: the run.
        save_checkpoint: ``(synset, optimizer, meta)`` → stores this process's classes (and ``meta`` on
            rank 0); called on every process every ``cfg.ckpt_every`` steps and at the end.
        resume: a complete checkpoint to continue from (written by any number of processes).
        rank, world_size, reduce: the distributed context (see :func:`lgm_ray.core.matching.lgm_step`).
        device: where the backbone and the images live (default ``cfg.device``).
        on_progress: called on rank 0 every ``cfg.log_every`` steps with step, loss, images/s.
        save_grid: ``(images, step)`` on rank 0 with the whole set at ``≤ GRID_SIDE`` px, at checkpoint
            steps and every ``cfg.grid_every`` steps.
        log: where rank 0 prints progress (default stderr).
    """
    log = log or sys.stderr
    device = device or torch.device(cfg.device)
    run = _start(cfg, resume, rank, world_size, device)
    timed_reduce = _TimedReduce(reduce)
    delay = step_delay()
    first, t_start = run.step, time.perf_counter()
    while run.step < cfg.steps:
        _step(run, timed_reduce, log)
        if delay:
            time.sleep(delay)
        _check_skipped(run)
        if rank == 0 and (run.step % cfg.log_every == 0 or run.step == cfg.steps):
            _report(run, first, t_start, timed_reduce.seconds, log, on_progress)
        _save(run, reduce, save_grid, save_checkpoint)
    seconds = time.perf_counter() - t_start
    return LoopResult(rank, run.step, run.step - first, seconds, timed_reduce.seconds, run.views_per_step,
                      peak_memory_mb(device), run.owned)
