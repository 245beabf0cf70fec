"""The Tune trial of a sweep: one grid point distilled, evaluated on every evaluation backbone, reported.

:func:`run_trial` is the trainable the driver (:mod:`lgm_ray.sweep.driver`) hands to Ray Tune. Ray pickles it
by reference, so it lives in this importable module (never ``__main__``) and imports only what a trial
needs. A trial reads its grid point from the sweep folder's ``trials.json`` (:func:`load_point`),
distils into the point's run folder (:func:`trial_run_dir`: a function of the point alone, so a re-run
finds its checkpoint), evaluates the set on each evaluation backbone in its own process, one after the
other, and writes ``result.json`` or ``error.txt`` there — nothing outside that folder.

The run folder's names, :func:`trial_run_dir` and :func:`load_point` live here
because the trial is what writes that folder; the MLflow logger (:mod:`lgm_ray.sweep.mlflow_runs`), the
shared baselines (:mod:`lgm_ray.sweep.baselines`) and the driver import them from here.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

from lgm_ray.common.atomic import write_text
from lgm_ray.distill.config import DistillConfig
from lgm_ray.sweep.spec import TrialPoint

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

POINTS_FILE = "trials.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"


def load_point(config: dict[str, Any]) -> TrialPoint:
    """A trial's grid point, from the sweep folder's ``trials.json`` (written by the driver)."""
    points = json.loads((Path(config["sweep_dir"]) / POINTS_FILE).read_text())
    return TrialPoint.from_dict(points[config["trial"]])


def trial_run_dir(sweep_dir: str | Path, key: str) -> Path:
    """The run folder of a grid point: a function of the point alone, so a re-run finds its checkpoint."""
    return Path(sweep_dir) / key / "run"


# ---------------------------------------------------------------- one distillation


def distill(
    cfg: DistillConfig,
    *,
    workers: int = 0,
    use_gpu: bool = False,
    on_progress: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """One distillation into ``cfg.out`` with :func:`lgm_ray.distill.run.run_distill`, resuming from its
    checkpoint when one is there (a re-run trial continues where it stopped)."""
    from lgm_ray.distill.run import run_distill

    params = inspect.signature(run_distill).parameters
    kwargs: dict[str, Any] = {"use_gpu": use_gpu, "on_progress": on_progress}
    if "resume" in params:
        kwargs["resume"] = True
    if "workers" in params:
        kwargs["workers"] = workers
    elif getattr(cfg, "workers", 0) != workers:
        cfg = dataclasses.replace(cfg, workers=workers)
    return run_distill(cfg, **kwargs)


# ---------------------------------------------------------------- the trial


def run_eval_kwargs(cfg: DistillConfig) -> dict[str, Any]:
    """The evaluation settings that come from a run's config (its preprocessing and output form)."""
    from lgm_ray.evaluate.protocol import evaluate

    params = inspect.signature(evaluate).parameters
    fields = ("real_res", "crop_res", "normalization", "raw_output", "device")
    return {k: getattr(cfg, k) for k in fields if k in params and hasattr(cfg, k)}


def _eval_kwargs(cfg: DistillConfig, config: dict[str, Any]) -> dict[str, Any]:
    return {**config["eval"], **run_eval_kwargs(cfg), "cache_dir": config["cache_dir"]}


def _tune_progress(progress: dict) -> None:
    tune.report({k: progress[k] for k in ("step", "loss", "images_per_s") if k in progress})


def _checkpoint_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint in a run folder (0: none): where a re-run continues."""
    from lgm_ray.distill.checkpoints import latest_checkpoint
    from lgm_ray.distill.run import checkpoint_roots

    ckpt = latest_checkpoint(*checkpoint_roots(run_dir))
    return ckpt.step if ckpt is not None else 0


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: distil one grid point, evaluate it on every evaluation backbone, report.

    Writes only under the point's run folder. A finished point (its ``result.json`` present) is
    reported again without work; a failure writes ``error.txt`` there and re-raises, so Tune marks
    the trial ERROR and the driver marks its MLflow run FAILED.
    """
    import torch

    from lgm_ray.evaluate.protocol import evaluate_baseline, evaluate_synset

    point = load_point(config)
    run_dir = trial_run_dir(config["sweep_dir"], point.key)
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / RESULT_FILE
    if done.exists():
        tune.report({"final": 1, "result_file": str(done)})
        return
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    try:
        cfg = point.resolved(out=str(run_dir))
        workers = config["workers"]
        resumed_from = _checkpoint_step(run_dir)
        summary = distill(
            cfg,
            workers=workers,
            use_gpu=config["use_gpu"],
            on_progress=_tune_progress if workers == 0 else None,
        )
        payload = torch.load(run_dir / "synset.pt", map_location="cpu", weights_only=False)
        images, labels = payload["images"], payload["labels"]
        meta = {"class_names": payload.get("class_names"), "num_classes": payload.get("num_classes")}
        kwargs = _eval_kwargs(cfg, config)
        evals, neighbors = {}, {}
        for b in config["eval_backbones"]:
            weights = cfg.weights if b == cfg.backbone else None
            evals[b] = evaluate_synset(images, labels, b, cfg.shards, weights=weights, **meta, **kwargs)
            if config["neighbors"] and b == cfg.backbone:
                neighbors[b] = evaluate_baseline(
                    "neighbors",
                    b,
                    cfg.shards,
                    images=images,
                    labels=labels,
                    weights=weights,
                    **meta,
                    **kwargs,
                )
        result = {
            "key": point.key,
            "dataset": point.dataset,
            "backbone": point.backbone,
            "seed": point.seed,
            "ablation": point.ablation_label,
            "ablation_values": point.ablation,
            "resumed_from_step": resumed_from,
            "summary": summary,
            "evals": evals,
            "neighbors": neighbors,
            "node_id": ray.get_runtime_context().get_node_id(),
        }
        write_text(done, json.dumps(result, default=str))
    except BaseException:
        write_text(run_dir / ERROR_FILE, traceback.format_exc())
        raise
    metrics = {f"{b}/{m}": r[m] for b, r in evals.items() for m in ("top1_mean", "top5_mean")}
    tune.report({"final": 1, "result_file": str(done), "final_loss": summary.get("final_loss"), **metrics})


def trial_name(trial: Trial) -> str:
    """Tune trial name and folder: the grid point's key."""
    return trial.config["trial"]
