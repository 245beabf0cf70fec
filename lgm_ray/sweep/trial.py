"""The Tune trial of a sweep: one grid point distilled, evaluated on every evaluation backbone, reported.

:func:`run_trial` is the trainable the driver (:mod:`lgm_ray.sweep.driver`) hands to Ray Tune. Ray pickles it
by reference, so it lives in this importable module (never ``__main__``) and imports only what a trial
needs. A trial reads its grid point from the sweep folder's ``trials.json`` (:func:`load_point`),
distils into the point's run folder (:meth:`SweepFolder.run <lgm_ray.results.folder.SweepFolder.run>`: a
function of the point alone, so a re-run finds its checkpoint), evaluates the set on each evaluation
backbone in its own process, one after the other, and writes ``result.json`` or ``error.txt`` there
(:class:`~lgm_ray.distill.run_folder.RunFolder`) — nothing outside that folder.

The Tune config of a trial (the driver's ``param_space``) holds ``trial`` (the point's key), ``sweep_dir``,
``eval_backbones``, ``eval`` (the spec's probe settings), ``neighbors`` (whether to run that baseline),
``use_gpu`` and ``cache_dir`` (the sweep's feature cache).
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

from lgm_ray.distill.config import DistillConfig
from lgm_ray.distill.run_folder import RunFolder
from lgm_ray.evaluate.config import EvalConfig
from lgm_ray.results.folder import SweepFolder
from lgm_ray.sweep.spec import TrialPoint, run_eval_config

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


def load_point(config: dict[str, Any]) -> TrialPoint:
    """A trial's grid point, from the sweep folder's ``trials.json`` (written by the driver)."""
    return TrialPoint.from_dict(SweepFolder(config["sweep_dir"]).read_points()[config["trial"]])


def trial_run(config: dict[str, Any]) -> RunFolder:
    """The run folder of a trial, from its Tune config."""
    return SweepFolder(config["sweep_dir"]).run(config["trial"])


def trial_name(trial: Trial) -> str:
    """Tune trial name and folder: the grid point's key."""
    return trial.config["trial"]


# ---------------------------------------------------------------- distil, then evaluate


def _tune_progress(progress: dict) -> None:
    tune.report({k: progress[k] for k in ("step", "loss", "images_per_s") if k in progress})


def distill(cfg: DistillConfig, *, use_gpu: bool = False) -> dict[str, Any]:
    """One distillation into ``cfg.out`` (``cfg.workers`` Ray Train workers, or this process), resuming from
    its checkpoint when one is there (a re-run trial continues where it stopped). Progress goes to Tune
    from an in-process run (the workers of a distributed one cannot report to the trial)."""
    from lgm_ray.distill.run import run_distill

    on_progress = _tune_progress if cfg.workers == 0 else None
    return run_distill(cfg, resume=True, use_gpu=use_gpu, on_progress=on_progress)


def evaluate_run(run: RunFolder, cfg: DistillConfig, config: dict[str, Any]) -> tuple[dict, dict]:
    """The distilled set of ``run`` on every evaluation backbone, and its ``neighbors`` baseline on the
    distillation backbone when the sweep asks for it: ``(evals, neighbors)``, backbone → result."""
    from lgm_ray.evaluate.protocol import evaluate_baseline, evaluate_synset

    payload = run.load_synset()
    images, labels = payload["images"], payload["labels"]
    settings: EvalConfig = run_eval_config(config["eval"], cfg)
    common = {"class_names": payload.get("class_names"), "num_classes": payload.get("num_classes"),
              "cache_dir": config["cache_dir"]}
    evals, neighbors = {}, {}
    for b in config["eval_backbones"]:
        weights = cfg.weights if b == cfg.backbone else None
        evals[b] = evaluate_synset(images, labels, b, cfg.shards, settings, weights=weights, **common)
        if config["neighbors"] and b == cfg.backbone:
            neighbors[b] = evaluate_baseline("neighbors", b, cfg.shards, settings, images=images, labels=labels,
                                             weights=weights, **common)
    return evals, neighbors


# ---------------------------------------------------------------- the trial


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: distil one grid point, evaluate it on every evaluation backbone, report.

    Writes only under the point's run folder. A finished point (its ``result.json`` present) is
    reported again without work; a failure writes ``error.txt`` there and re-raises, so Tune marks
    the trial ERROR and the driver marks its MLflow run FAILED; a stop (an interrupt, a signal) leaves
    it unfinished, to continue from its checkpoint.
    """
    point = load_point(config)
    run = trial_run(config)
    run.root.mkdir(parents=True, exist_ok=True)
    if run.result.exists():
        tune.report({"final": 1, "result_file": str(run.result)})
        return
    run.error.unlink(missing_ok=True)
    try:
        cfg = point.resolved(out=str(run.root))
        ckpt = run.latest_checkpoint()
        summary = distill(cfg, use_gpu=config["use_gpu"])
        evals, neighbors = evaluate_run(run, cfg, config)
        run.write_result({
            "key": point.key,
            "dataset": point.dataset,
            "backbone": point.backbone,
            "seed": point.seed,
            "ablation": point.ablation_label,
            "ablation_values": point.ablation,
            "resumed_from_step": ckpt.step if ckpt is not None else 0,
            "summary": summary,
            "evals": evals,
            "neighbors": neighbors,
            "node_id": ray.get_runtime_context().get_node_id(),
        })
    except Exception:  # not a KeyboardInterrupt or SystemExit (a stop): that one leaves the trial unfinished
        run.write_error(traceback.format_exc())
        raise
    metrics = {f"{b}/{m}": r[m] for b, r in evals.items() for m in ("top1_mean", "top5_mean")}
    tune.report({"final": 1, "result_file": str(run.result), "final_loss": summary.get("final_loss"), **metrics})
