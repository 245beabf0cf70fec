"""The shared baselines of a sweep, computed once per (dataset, evaluation backbone) before the trials.

``random``, ``centroids`` and ``full`` (:data:`~lgm_ray.sweep.spec.SHARED_BASELINES`) do not depend on a
trial's distilled set, so the driver runs each once per (dataset, evaluation backbone) as a Ray task
instead of in every trial. Each result goes to the sweep folder's ``baselines/``
(:meth:`SweepFolder.write_baseline <lgm_ray.results.folder.SweepFolder.write_baseline>`, reused on
``--resume``) and to its own MLflow child run. The same tasks fill the sweep's feature cache with every
split the trials will read, so that the trials only read it (a pair with no shared baseline gets a task
that only caches features). The ``neighbors`` baseline depends on the set, so it runs inside each trial
(:mod:`lgm_ray.sweep.trial`).
"""

from __future__ import annotations

import sys
from typing import Any

import ray

from lgm_ray.evaluate.config import EvalConfig
from lgm_ray.results.tracking import Tracker
from lgm_ray.sweep.spec import SHARED_BASELINES, SweepSpec, run_eval_config

FEATURES = "features"  # the kind of a task that only fills the feature cache


def _baseline_task(kind: str, backbone: str, shards: str, cfg: EvalConfig, cache_dir: str) -> dict[str, Any]:
    from lgm_ray.evaluate.protocol import evaluate_baseline

    return evaluate_baseline(kind, backbone, shards, cfg, cache_dir=cache_dir)


def _warm_cache_task(splits: list[str], backbone: str, shards: str, cfg: EvalConfig,
                     cache_dir: str) -> dict[str, int]:
    """Fill the feature cache with the splits the trials read; split → how many images."""
    from lgm_ray.evaluate.feature_cache import FeatureSource
    from lgm_ray.shards.reader import ShardSet

    source = FeatureSource(backbone, ShardSet(shards), normalization=cfg.normalization, device=cfg.device,
                           real_res=cfg.real_res, crop_res=cfg.crop_res, cache_dir=cache_dir,
                           raw_output=cfg.raw_output)
    return {split: len(source.features(split).labels) for split in splits}


def _task_options(spec: SweepSpec) -> dict[str, float]:
    """One shared evaluation's resources: a worker's CPUs, and one GPU when the sweep has GPUs."""
    res = spec.resources
    gpus = (res.gpus_per_worker if res.workers == 0 else 1) if res.use_gpu else 0
    return {"num_cpus": res.cpus_per_worker or 1, "num_gpus": gpus}


def _submit(spec: SweepSpec, done: list[dict[str, Any]]) -> dict[ray.ObjectRef, tuple[str, str, str]]:
    """Start every shared evaluation not done yet (appending the done ones' results to ``done``);
    returns task → (dataset, evaluation backbone, kind)."""
    options = _task_options(spec)
    baseline_task = ray.remote(**options)(_baseline_task)
    warm_task = ray.remote(**options)(_warm_cache_task)
    base = spec.base_config()
    cfg = run_eval_config(spec.eval_settings(), base, device="cuda" if options["num_gpus"] else "cpu",
                          ipc=base.ipc)
    # the full-data probe keeps its own protocol (100 epochs, batch 128)
    full_cfg = cfg.replace(epochs=None, batch=None)
    cache_dir = str(spec.folder.feature_cache)
    kinds = [k for k in spec.baselines if k in SHARED_BASELINES]
    splits = [cfg.split] + (["train"] if "neighbors" in spec.baselines else [])
    pending: dict[ray.ObjectRef, tuple[str, str, str]] = {}
    for ds in spec.datasets:
        for b in spec.eval_backbones:
            for kind in kinds:
                result = spec.folder.read_baseline(ds.name, b, kind)
                if result is not None:
                    done.append(result)
                    continue
                task_cfg = full_cfg if kind == "full" else cfg
                pending[baseline_task.remote(kind, b, ds.shards, task_cfg, cache_dir)] = (ds.name, b, kind)
            if not set(kinds) & {"centroids", "full"} and (kinds == [] or "neighbors" in spec.baselines):
                pending[warm_task.remote(splits, b, ds.shards, cfg, cache_dir)] = (ds.name, b, FEATURES)
    return pending


def _record(spec: SweepSpec, tracker: Tracker, experiment_id: str, parent_id: str, task: ray.ObjectRef,
            ds_name: str, b: str, kind: str) -> dict[str, Any] | tuple[str, str]:
    """One finished baseline: written to the sweep folder and logged to its MLflow child run (FAILED with
    its error when the task failed: a failed baseline is reported, the sweep goes on). Returns its result,
    or ``(key, last line of the error)`` when it failed."""
    key = f"baseline-{ds_name}-{b}-{kind}"
    tags = {"dataset": ds_name, "eval_backbone": b, "baseline": kind}
    run_id = tracker.child(experiment_id, parent_id, key, kind="baseline", tags=tags)
    try:
        result = {**ray.get(task), "dataset": ds_name, "baseline": kind, "backbone": b}
    except Exception as exc:  # noqa: BLE001 - a failed baseline is reported, the sweep goes on
        print(f"[lgm_ray.sweep] baseline {key} failed: {exc}", file=sys.stderr, flush=True)
        tracker.fail(run_id, str(exc))
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        return key, (lines[-1] if lines else type(exc).__name__)
    spec.folder.write_baseline(ds_name, b, kind, result)
    shown = ("epochs", "batch", "n_train", "real_res", "crop_res", "normalization", "split")
    tracker.log_params(run_id, {**tags, **{k: result.get(k) for k in shown}})
    tracker.log_metrics(run_id, {m: result[m] for m in ("top1_mean", "top1_std", "top5_mean", "top5_std")})
    tracker.finish(run_id)
    return result


def run_baselines(
    spec: SweepSpec, tracker: Tracker, experiment_id: str, parent_id: str
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The shared baselines, once per (dataset, evaluation backbone), as Ray tasks; reused on resume.

    They also fill the sweep's feature cache with every split the trials will read (a (dataset,
    backbone) with no shared baseline gets a task that only does that), so that trials only read it.
    Returns every shared baseline's result, those of earlier runs of the sweep included, and the failed
    ones as ``(key, last line of the error)`` (run again on ``--resume``).
    """
    spec.folder.baselines.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    pending = _submit(spec, done)
    if pending:
        what = ", ".join(sorted({k for *_, k in pending.values()}))
        print(f"[lgm_ray.sweep] {len(pending)} shared evaluations before the trials ({what})",
              file=sys.stderr, flush=True)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ds_name, b, kind = pending.pop(ready[0])
        if kind == FEATURES:
            try:
                ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - the trials will report the same problem
                print(f"[lgm_ray.sweep] caching {ds_name} features of {b} failed: {exc}", file=sys.stderr)
            continue
        result = _record(spec, tracker, experiment_id, parent_id, ready[0], ds_name, b, kind)
        (failed if isinstance(result, tuple) else done).append(result)
    return done, failed
