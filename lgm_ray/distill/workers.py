"""One distillation on K Ray Train workers (docs/design.md §2): exact, elastic, surviving a lost worker.

Each worker (a ``TorchTrainer`` worker: gloo on CPU, NCCL on GPU, one device each) holds a frozen
backbone replica, reads its share of the real batch (the virtual streams dealt to it), owns a block
of classes of the synthetic set with their Adam state, and runs :func:`lgm_ray.distill.loop.run_loop` — the
same loop as the single process — with an all-reduce as its ``reduce``: one collective of
``2 · classes · (features + 1)`` floats per step (plus one float for the finite flag).

Checkpoints: every ``ckpt_every`` steps every rank writes ``classes-rank{r}.pt`` (its classes) and
rank 0 ``meta.json`` into a folder that ``ray.train.report`` merges into one checkpoint
``OUT/ray/attempt-N/step_NNNNNNN`` (:mod:`lgm_ray.distill.checkpoints`). With ``FailureConfig(max_failures)``
a lost worker makes Train restart the group from the last recorded checkpoint; because every draw
is a function of (seed, step) the restarted run ends with the same images. A re-run of the command
(``--resume``) starts a new attempt from the newest complete checkpoint of any attempt, written by
any number of workers (or by the single process). Ray is joined or started by
:func:`lgm_ray.common.ray_start.start_ray`; the folder names are
:class:`~lgm_ray.distill.run_folder.RunFolder`'s.

The workers run with the driver's test hook :data:`lgm_ray.distill.loop.TEST_STEP_DELAY` when it is
set: a Ray started earlier in the process does not see a variable set later, so it travels with the
workers' config.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from lgm_ray.common.errors import RunFailedError
from lgm_ray.common.ray_start import start_ray
from lgm_ray.distill.checkpoints import (
    Checkpoint,
    class_file,
    read_checkpoint,
    write_rank_files,
)
from lgm_ray.distill.config import ConfigError, DistillConfig
from lgm_ray.distill.loop import TEST_STEP_DELAY, class_shards
from lgm_ray.distill.run_folder import RunFolder

RANK_FIGURES = "figures-rank{rank}.json"


def _resume_point(resume_path: str | None) -> Checkpoint | None:
    """Where a worker starts: Train's checkpoint after a restart of the group, else the run's ``--resume``
    checkpoint, else None (step 0)."""
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            return read_checkpoint(folder)
    return read_checkpoint(resume_path) if resume_path else None


def _report_figures(figures: dict[str, Any], rank: int, steps: int) -> None:
    """Hand a worker's figures to Train in one last report's checkpoint (names of their own per rank)."""
    import json

    import ray
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        figures = {**figures, "host": socket.gethostname(), "pid": os.getpid(),
                   "node_id": ray.get_runtime_context().get_node_id()}
        (Path(tmp) / RANK_FIGURES.format(rank=rank)).write_text(json.dumps(figures))
        ray.train.report({"step": steps, "figures": True}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=RunFolder.figures_name(steps))


def _worker(config: dict[str, Any]) -> None:
    """The body of every Ray Train worker."""
    import sys

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from lgm_ray.distill.loop import run_loop

    os.environ.update(config["test_env"])
    cfg = DistillConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config["use_gpu"]:
        device = ray.train.torch.get_device()
        cfg.device = str(device)
    else:
        device = torch.device("cpu")
        cfg.device = "cpu"
    resume = _resume_point(config["resume_path"])

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def save(synset, optimizer, meta) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            write_rank_files(Path(tmp), rank, synset, optimizer, meta if rank == 0 else None)
            metrics = {"step": meta["step"], "loss": meta["losses"][-1] if meta["losses"] else None}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=RunFolder.checkpoint_name(meta["step"]))

    out = cfg.out
    result = run_loop(
        cfg, save_checkpoint=save, resume=resume, rank=rank, world_size=world, reduce=reduce, device=device,
        on_progress=config["on_progress"], log=sys.stderr,
        save_grid=lambda images, step: RunFolder(out).save_grid(images, cfg.ipc, step),
    )
    _report_figures(result.figures(), rank, result.steps)


def check_cluster(num_workers: int, use_gpu: bool, storage: str) -> None:
    """Fail fast on what the cluster can never give, instead of waiting for it forever."""
    import ray

    total = ray.cluster_resources()
    if use_gpu and total.get("GPU", 0) < num_workers:
        raise ConfigError(f"{num_workers} workers with a GPU each asked for, but the cluster has "
                          f"{int(total.get('GPU', 0))} GPU(s); use --workers ≤ {int(total.get('GPU', 0))} or add GPU nodes")
    if not use_gpu and total.get("CPU", 0) < num_workers:
        raise ConfigError(f"{num_workers} workers need {num_workers} CPUs, the cluster has {int(total.get('CPU', 0))}; "
                          "use fewer --workers or add nodes")
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if len(hosts) > 1 and "://" not in storage:
        raise ConfigError(f"the cluster spans {len(hosts)} machines but the run's storage {storage!r} is a local "
                          "path: give --storage-path a shared folder (NFS) or cloud storage (s3://…, gs://…)")


def _check_request(cfg: DistillConfig) -> None:
    """What fails before Ray starts: more workers than classes, or than virtual real streams."""
    from lgm_ray.distill.real_batches import open_source

    num_classes = open_source(cfg.shards, cfg.real_res).num_classes
    class_shards(num_classes, cfg.workers)  # more workers than classes: a clear error before Ray starts
    if cfg.workers > cfg.real_streams:
        raise ConfigError(f"{cfg.workers} workers but real_streams = {cfg.real_streams}: the real batch is dealt "
                          f"in {cfg.real_streams} virtual streams; use --real-streams ≥ {cfg.workers}")


def _trainer(cfg: DistillConfig, storage: str, resume: Checkpoint | None, use_gpu: bool, on_progress):
    """The ``TorchTrainer`` of one attempt: ``cfg.workers`` workers running :func:`_worker`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    name = RunFolder.next_attempt(Path(storage)) if "://" not in storage else f"attempt-{os.getpid()}"
    test_env = {TEST_STEP_DELAY: os.environ[TEST_STEP_DELAY]} if os.environ.get(TEST_STEP_DELAY) else {}
    return TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.to_dict(), "use_gpu": use_gpu, "on_progress": on_progress,
                           "resume_path": str(resume.path) if resume is not None else None, "test_env": test_env},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               placement_strategy=cfg.placement),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
        ),
    )


def _outcome(result, cfg: DistillConfig, storage: str) -> tuple[Checkpoint, list[dict[str, Any]]]:
    """The final checkpoint (every class at ``cfg.steps``) and each rank's figures of a finished fit."""
    import json

    final = None
    for checkpoint, metrics in result.best_checkpoints:
        if metrics.get("step") == cfg.steps and not metrics.get("figures"):
            with checkpoint.as_directory() as folder:
                final = read_checkpoint(folder)  # loads everything: valid after the folder goes
            if final is not None:
                final.path = Path(checkpoint.path)
    if final is None:
        raise RunFailedError(f"the workers finished but no complete checkpoint of step {cfg.steps} was found "
                             f"under {storage}")
    with result.checkpoint.as_directory() as folder:
        figures = [json.loads((Path(folder) / RANK_FIGURES.format(rank=r)).read_text()) for r in range(cfg.workers)]
    return final, figures


def run_on_workers(cfg: DistillConfig, *, resume: Checkpoint | None = None, use_gpu: bool = False,
                   on_progress=None) -> tuple[Checkpoint, list[dict[str, Any]]]:
    """Run ``cfg`` on ``cfg.workers`` Ray Train workers; return the final checkpoint and each rank's figures
    (:meth:`LoopResult.figures` plus host, pid and Ray node id).

    Joins ``RAY_ADDRESS`` or starts a local Ray (:func:`~lgm_ray.common.ray_start.start_ray`) unless Ray
    is up in this process already; a Ray it started it shuts down at the end.

    Raises:
        ConfigError: more workers than classes or than the cluster holds, a local storage path on a
            multi-machine cluster.
        RunFailedError: the workers failed more than ``cfg.max_failures`` times (the message names the
            checkpoint kept; the same command with ``--resume`` continues from it).
    """
    import ray
    import ray.train

    _check_request(cfg)
    started = start_ray(log_to_driver=True)
    try:
        storage = cfg.storage_path or str(RunFolder(cfg.out).ray.resolve())
        check_cluster(cfg.workers, use_gpu, storage)
        _check_backbone(cfg)
        try:
            result = _trainer(cfg, storage, resume, use_gpu, on_progress).fit()
        except ray.train.TrainingFailedError as e:
            kept = RunFolder(cfg.out).latest_checkpoint()
            where = f"{kept.path} (step {kept.step})" if kept else "none (no checkpoint was reached)"
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise RunFailedError(f"the workers failed more than max_failures = {cfg.max_failures} time(s) "
                                 f"({type(e).__name__}: {first}). "
                                 f"Checkpoint kept: {where}; run the same command with --resume to continue") from e
        return _outcome(result, cfg, storage)
    finally:
        if started:
            ray.shutdown()


def _check_backbone(cfg: DistillConfig) -> None:
    """Load the backbone once here, so missing weights fail before any worker starts."""
    from lgm_ray.backbones import create_backbone

    create_backbone(cfg.backbone, weights=cfg.weights, img_size=cfg.crop_res, normalization=cfg.normalization,
                    raw_output=cfg.raw_output, device="cpu")


__all__ = ["check_cluster", "class_file", "run_on_workers"]
