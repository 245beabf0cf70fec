"""The shared baselines of a sweep, computed once per (dataset, evaluation backbone) before the trials.

``random``, ``centroids`` and ``full`` (:data:`~lgm_ray.sweep.spec.SHARED_BASELINES`) do not depend on a
trial's distilled set, so the driver runs each once per (dataset, evaluation backbone) as a Ray task
instead of in every trial. Each result goes to ``baselines/`` in the sweep folder (reused on
``--resume``) and to its own MLflow child run. The same tasks fill the sweep's feature cache with every
split the trials will read, so that the trials only read it (a pair with no shared baseline gets a task
that only caches features). The ``neighbors`` baseline depends on the set, so it runs inside each trial
(:mod:`lgm_ray.sweep.trial`).
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import ray

from lgm_ray.results.tracking import Tracker
from lgm_ray.sweep.spec import SHARED_BASELINES, SweepSpec
from lgm_ray.sweep.trial import run_eval_kwargs, write_text


def _baseline_task(kind: str, backbone: str, shards: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from lgm_ray.evaluate.protocol import evaluate_baseline

    return evaluate_baseline(kind, backbone, shards, **kwargs)


def _warm_cache_task(kind: str, backbone: str, shards: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fill the feature cache with the splits the trials read (``kind``: comma-separated splits)."""
    from lgm_ray.evaluate.feature_cache import FeatureSource
    from lgm_ray.shards.reader import ShardSet

    params = inspect.signature(FeatureSource).parameters
    source = FeatureSource(backbone, ShardSet(shards), **{k: v for k, v in kwargs.items() if k in params})
    return {split: len(source.features(split).labels) for split in kind.split(",")}


def baseline_file(sweep_dir: Path, dataset: str, backbone: str, kind: str) -> Path:
    """Where one shared baseline's result is kept: its presence means done (skipped on resume)."""
    return sweep_dir / "baselines" / f"{dataset}__{backbone}__{kind}.json"


def run_baselines(
    spec: SweepSpec, tracker: Tracker, experiment_id: str, parent_id: str
) -> list[dict[str, Any]]:
    """The shared baselines, once per (dataset, evaluation backbone), as Ray tasks; reused on resume.

    They also fill the sweep's feature cache with every split the trials will read (a (dataset,
    backbone) with no shared baseline gets a task that only does that), so that trials only read it.
    """
    base = spec.base_config()
    res = spec.resources
    gpus = (res.gpus_per_worker if res.workers == 0 else 1) if res.use_gpu else 0
    options = {"num_cpus": res.cpus_per_worker or 1, "num_gpus": gpus}
    baseline_task = ray.remote(**options)(_baseline_task)
    warm_task = ray.remote(**options)(_warm_cache_task)
    kwargs = {
        **spec.eval_kwargs(),
        **run_eval_kwargs(base),
        "device": "cuda" if gpus else "cpu",
        "cache_dir": str(spec.sweep_dir / "feature_cache"),
        "ipc": base.ipc,
    }
    held_out = kwargs.get("split", "test")
    (spec.sweep_dir / "baselines").mkdir(parents=True, exist_ok=True)
    done, pending = [], {}
    for ds in spec.datasets:
        for b in spec.eval_backbones:
            kinds = [k for k in spec.baselines if k in SHARED_BASELINES]
            for kind in kinds:
                f = baseline_file(spec.sweep_dir, ds.name, b, kind)
                if f.exists():
                    done.append(json.loads(f.read_text()))
                    continue
                kw = dict(kwargs)
                if kind == "full":
                    kw["epochs"] = None  # the full-data probe keeps its own protocol (100 epochs, batch 128)
                    kw["batch"] = None
                pending[baseline_task.remote(kind, b, ds.shards, kw)] = (ds.name, b, kind)
            splits = [held_out] + (["train"] if "neighbors" in spec.baselines else [])
            if not set(kinds) & {"centroids", "full"} and (kinds == [] or "neighbors" in spec.baselines):
                pending[warm_task.remote(",".join(splits), b, ds.shards, kwargs)] = (ds.name, b, "features")
    if pending:
        what = ", ".join(sorted({k for *_, k in pending.values()}))
        print(
            f"[lgm_ray.sweep] {len(pending)} shared evaluations before the trials ({what})",
            file=sys.stderr,
            flush=True,
        )
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ds_name, b, kind = pending.pop(ready[0])
        if kind == "features":
            try:
                ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - the trials will report the same problem
                print(f"[lgm_ray.sweep] caching {ds_name} features of {b} failed: {exc}", file=sys.stderr)
            continue
        key = f"baseline-{ds_name}-{b}-{kind}"
        run_id = tracker.child(
            experiment_id,
            parent_id,
            key,
            kind="baseline",
            tags={"dataset": ds_name, "eval_backbone": b, "baseline": kind},
        )
        try:
            result = {**ray.get(ready[0]), "dataset": ds_name, "baseline": kind, "backbone": b}
        except Exception as exc:  # noqa: BLE001 - a failed baseline is reported, the sweep goes on
            print(f"[lgm_ray.sweep] baseline {key} failed: {exc}", file=sys.stderr, flush=True)
            tracker.fail(run_id, str(exc))
            continue
        write_text(baseline_file(spec.sweep_dir, ds_name, b, kind), json.dumps(result, default=str))
        tracker.log_params(
            run_id,
            {
                "dataset": ds_name,
                "eval_backbone": b,
                "baseline": kind,
                **{
                    k: result.get(k)
                    for k in ("epochs", "batch", "n_train", "real_res", "crop_res", "normalization", "split")
                },
            },
        )
        tracker.log_metrics(
            run_id, {m: result[m] for m in ("top1_mean", "top1_std", "top5_mean", "top5_std")}
        )
        tracker.finish(run_id)
        done.append(result)
    return done
