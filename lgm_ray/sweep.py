"""Run a sweep spec on Ray Tune: ``python -m lgm_ray.sweep SPEC [--resume] [--address A]``.

Each grid point of the spec (:mod:`lgm_ray.sweep_spec`) is one Tune trial: it distils (in its own
process, or on K Ray Train workers), evaluates the distilled set on every evaluation backbone in its
own process, one backbone after the other (no Ray tasks escape the trial), and reports. Before the
trials, the shared baselines (``random``, ``centroids``, ``full``) run once per (dataset, evaluation
backbone) as Ray tasks and fill the sweep's feature cache, which the trials then read. Every result
goes to MLflow (:mod:`lgm_ray.tracking`) from this driver only; at the end the cross-model and
ablation tables are logged on the parent run and printed.

Folders, under ``storage/NAME/``::

    spec.yaml             the resolved spec
    trials.json           every grid point (key → dataset, backbone, ablation, seed, run fields)
    sweep_state.json      tracking URI, MLflow experiment and parent run (``--resume`` reopens them)
    timing.json           seconds spent on the shared baselines and on the trials
    <trial key>/          Tune's trial folder (named after the grid point) …
      run/                … and the trial's run: checkpoints/ (ray/ with workers), synset.pt, grid.png,
                          grids/, config.yaml, result.json, error.txt — only this trial writes here
    baselines/            one JSON per (dataset, evaluation backbone, baseline)
    feature_cache/        frozen-backbone features of the shards (atomic files, filled before the
                          trials by the baselines, which the trials then only read)
    tables/               the tables as Markdown, Parquet and heatmap PNG

With no address a local Ray starts; ``--address`` or ``RAY_ADDRESS`` joins a cluster. ``--resume``
continues an interrupted sweep (``Tuner.restore``): finished trials are skipped, errored ones re-run,
an unfinished one continues from its run folder's checkpoint.

Exit status: 0 all trials finished; 1 some trials failed (FAILED in MLflow, listed); 2 a bad spec
or command (nothing ran); 130 interrupted (re-run with ``--resume``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from lgm_ray.config import ConfigError, DistillConfig
from lgm_ray.sweep_parse import check_resources, load_spec
from lgm_ray.sweep_spec import SHARED_BASELINES, SpecError, SweepSpec, TrialPoint
from lgm_ray.tracking import KIND_TAG, Tracker, flatten, resolve_tracking_uri, ui_hint, write_tables

STATE_FILE = "sweep_state.json"
POINTS_FILE = "trials.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"
INTERRUPTED = 130


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    """One distillation into ``cfg.out`` with :func:`lgm_ray.distill.run_distill`, resuming from its
    checkpoint when one is there (a re-run trial continues where it stopped)."""
    from lgm_ray.distill import run_distill

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
    from lgm_ray.evaluate import evaluate

    params = inspect.signature(evaluate).parameters
    fields = ("real_res", "crop_res", "normalization", "raw_output", "device")
    return {k: getattr(cfg, k) for k in fields if k in params and hasattr(cfg, k)}


def _eval_kwargs(cfg: DistillConfig, config: dict[str, Any]) -> dict[str, Any]:
    return {**config["eval"], **run_eval_kwargs(cfg), "cache_dir": config["cache_dir"]}


def _tune_progress(progress: dict) -> None:
    tune.report({k: progress[k] for k in ("step", "loss", "images_per_s") if k in progress})


def _checkpoint_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint in a run folder (0: none): where a re-run continues."""
    from lgm_ray.checkpoints import latest_checkpoint
    from lgm_ray.distill import checkpoint_roots

    ckpt = latest_checkpoint(*checkpoint_roots(run_dir))
    return ckpt.step if ckpt is not None else 0


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: distil one grid point, evaluate it on every evaluation backbone, report.

    Writes only under the point's run folder. A finished point (its ``result.json`` present) is
    reported again without work; a failure writes ``error.txt`` there and re-raises, so Tune marks
    the trial ERROR and the driver marks its MLflow run FAILED.
    """
    import torch

    from lgm_ray.evaluate import evaluate_baseline, evaluate_synset

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
        _atomic_write(done, json.dumps(result, default=str))
    except BaseException:
        _atomic_write(run_dir / ERROR_FILE, traceback.format_exc())
        raise
    metrics = {f"{b}/{m}": r[m] for b, r in evals.items() for m in ("top1_mean", "top5_mean")}
    tune.report({"final": 1, "result_file": str(done), "final_loss": summary.get("final_loss"), **metrics})


def trial_name(trial) -> str:
    """Tune trial name and folder: the grid point's key."""
    return trial.config["trial"]


# ---------------------------------------------------------------- MLflow from the driver


class MlflowTrialLogger(tune.Callback):
    """Tune callback that logs every trial to its MLflow child run, from the driver process.

    It reads the tracking URI, experiment and parent run from the sweep's state file at set-up, so
    a restored sweep (``Tuner.restore`` brings back a pickled copy) logs where the new command says.
    """

    def __init__(self, sweep_dir: str) -> None:
        self.sweep_dir = sweep_dir
        self.tracker: Tracker | None = None
        self.runs: dict[str, str] = {}

    def _state(self) -> dict[str, Any]:
        return json.loads((Path(self.sweep_dir) / STATE_FILE).read_text())

    def setup(self, **info) -> None:
        state = self._state()
        self.tracker = Tracker(state["tracking_uri"])
        self.experiment_id, self.parent_id = state["experiment_id"], state["parent_run_id"]
        self.runs = {}

    def _warn(self, what: str, exc: BaseException) -> None:
        print(
            f"[lgm_ray.sweep] warning: MLflow logging failed ({what}): {exc!r}", file=sys.stderr, flush=True
        )

    def _run_id(self, trial) -> str:
        if trial.trial_id not in self.runs:
            point = load_point(trial.config)
            self.runs[trial.trial_id] = self.tracker.child(
                self.experiment_id,
                self.parent_id,
                point.key,
                kind="trial",
                tags={
                    "dataset": point.dataset,
                    "distill_backbone": point.backbone,
                    "ablation": point.ablation_label,
                    "seed": str(point.seed),
                },
            )
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        try:
            cfg = trial.config
            point = load_point(cfg)
            self.tracker.log_params(
                self._run_id(trial),
                {
                    **point.resolved().to_dict(),
                    "out": str(trial_run_dir(cfg["sweep_dir"], point.key)),
                    "dataset": point.dataset,
                    "eval_backbones": ",".join(cfg["eval_backbones"]),
                    "workers": cfg["workers"],
                    **{f"ablation.{k}": v for k, v in point.ablation.items()},
                    **{f"eval.{k}": v for k, v in cfg["eval"].items()},
                },
            )
        except Exception as exc:  # noqa: BLE001 - logging must never stop the sweep
            self._warn(f"start {trial}", exc)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("final") or "step" not in result:
            return
        try:
            self.tracker.log_metrics(
                self._run_id(trial),
                {k: result[k] for k in ("loss", "images_per_s") if k in result},
                step=int(result["step"]),
            )
        except Exception as exc:  # noqa: BLE001
            self._warn(f"progress {trial}", exc)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        try:
            run_id = self._run_id(trial)
            run_dir = trial_run_dir(trial.config["sweep_dir"], trial.config["trial"])
            log_trial_result(self.tracker, run_id, run_dir)
            self.tracker.finish(run_id)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"complete {trial}", exc)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        try:
            run_dir = trial_run_dir(trial.config["sweep_dir"], trial.config["trial"])
            error = (run_dir / ERROR_FILE).read_text() if (run_dir / ERROR_FILE).exists() else ""
            if not error and trial.error_file and Path(trial.error_file).exists():
                error = Path(trial.error_file).read_text()
            self.tracker.fail(self._run_id(trial), error or "the trial failed (no error text recorded)")
        except Exception as exc:  # noqa: BLE001
            self._warn(f"error {trial}", exc)


def log_trial_result(tracker: Tracker, run_id: str, run_dir: Path) -> None:
    """Log a finished trial's metrics and artifacts from its run folder."""
    result = json.loads((run_dir / RESULT_FILE).read_text())
    summary = result["summary"]
    tracker.log_series(run_id, "meta_loss", summary.get("losses") or [])
    metrics = {k: summary.get(k) for k in ("final_loss", "images_per_s", "seconds", "steps")}
    for kind, evals in (("", result["evals"]), ("neighbors/", result["neighbors"])):
        for b, r in evals.items():
            metrics.update(
                {f"{kind}{b}/{m}": r[m] for m in ("top1_mean", "top1_std", "top5_mean", "top5_std")}
            )
    if result["evals"]:
        metrics["top1_mean_avg"] = sum(r["top1_mean"] for r in result["evals"].values()) / len(
            result["evals"]
        )
    tracker.log_metrics(run_id, metrics)
    for name in ("synset.pt", "grid.png", "config.yaml", RESULT_FILE):
        tracker.log_artifact(run_id, run_dir / name)
    if (run_dir / "grids").is_dir():
        tracker.log_artifact(run_id, run_dir / "grids", "grids")
        tracker.log_image_steps(run_id, run_dir / "grids")


# ---------------------------------------------------------------- baselines


def _baseline_task(kind: str, backbone: str, shards: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from lgm_ray.evaluate import evaluate_baseline

    return evaluate_baseline(kind, backbone, shards, **kwargs)


def _warm_cache_task(kind: str, backbone: str, shards: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fill the feature cache with the splits the trials read (``kind``: comma-separated splits)."""
    from lgm_ray.feature_cache import FeatureSource
    from lgm_ray.shards import ShardSet

    params = inspect.signature(FeatureSource).parameters
    source = FeatureSource(backbone, ShardSet(shards), **{k: v for k, v in kwargs.items() if k in params})
    return {split: len(source.features(split).labels) for split in kind.split(",")}


def baseline_file(sweep_dir: Path, dataset: str, backbone: str, kind: str) -> Path:
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
        _atomic_write(baseline_file(spec.sweep_dir, ds_name, b, kind), json.dumps(result, default=str))
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


# ---------------------------------------------------------------- the driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lgm_ray.sweep", description=__doc__.split("\n")[0])
    p.add_argument("spec", help="sweep spec (YAML), e.g. sweeps/demo.yaml")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this spec")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (overrides MLFLOW_TRACKING_URI and the spec)")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with a local Ray")
    return p.parse_args(argv)


def _build_missing_shards(spec: SweepSpec) -> None:
    for ds in spec.datasets:
        if ds.build and not (Path(ds.shards) / "manifest.json").is_file():
            from lgm_ray.shards import main as shards_main

            print(f"[lgm_ray.sweep] building {ds.name} shards in {ds.shards}", file=sys.stderr, flush=True)
            if shards_main(["build", ds.build, "--out", ds.shards]) != 0:
                raise SpecError(f"datasets.{ds.name}: building {ds.build} shards in {ds.shards} failed")


def _init_ray(address: str | None, dashboard: bool) -> bool:
    """Join ``address`` / ``RAY_ADDRESS``, or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=dashboard)
    return True


def cluster_nodes() -> list[dict[str, float]]:
    """Every node's total resources: the live nodes, plus the autoscaler's node types when on a head node."""
    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    bootstrap = Path.home() / "ray_bootstrap_config.yaml"  # written by `ray up` on the head node
    if bootstrap.is_file():
        try:
            types = (yaml.safe_load(bootstrap.read_text()) or {}).get("available_node_types", {})
            for t in types.values():  # each node type as many times as the autoscaler may launch it
                res = {k: float(v) for k, v in (t.get("resources") or {}).items()}
                nodes += [res] * min(int(t.get("max_workers", 0)), 256)
        except (OSError, yaml.YAMLError, AttributeError, ValueError):
            pass
    return nodes


def _start_tracking(spec: SweepSpec, uri: str, resume: bool) -> tuple[Tracker, str, str]:
    state_path = spec.sweep_dir / STATE_FILE
    old = json.loads(state_path.read_text()) if resume and state_path.exists() else {}
    tracker = Tracker(uri)
    experiment = spec.mlflow.experiment or spec.name
    exp_id = tracker.experiment(experiment)
    parent = tracker.start_parent(
        exp_id,
        spec.name,
        run_id=old.get("parent_run_id") if old.get("tracking_uri") == uri else None,
        tags={"spec": spec.source or "", "mlflow.note.content": spec.description},
    )
    state = {"tracking_uri": uri, "experiment": experiment, "experiment_id": exp_id, "parent_run_id": parent}
    _atomic_write(state_path, json.dumps(state, indent=1))
    resolved = spec.to_dict()
    tracker.log_params(
        parent, {k: v for k, v in flatten(resolved).items() if k not in ("paper", "description")}
    )
    tracker.log_artifact(parent, spec.sweep_dir / "spec.yaml")
    if spec.source:
        tracker.log_artifact(parent, spec.source, "spec_source")
    return tracker, exp_id, parent


def collect(spec: SweepSpec) -> tuple[list[dict], list[tuple[str, str]], list[str]]:
    """Finished trial results, failed trials (key, error) and unfinished keys, from the run folders."""
    finished, failed, unfinished = [], [], []
    for point in spec.grid():
        run_dir = trial_run_dir(spec.sweep_dir, point.key)
        if (run_dir / RESULT_FILE).exists():
            finished.append(json.loads((run_dir / RESULT_FILE).read_text()))
        elif (run_dir / ERROR_FILE).exists():
            lines = [ln for ln in (run_dir / ERROR_FILE).read_text().strip().splitlines() if ln.strip()]
            failed.append((point.key, lines[-1] if lines else "unknown error"))
        else:
            unfinished.append(point.key)
    return finished, failed, unfinished


def run_sweep(
    spec: SweepSpec,
    *,
    resume: bool = False,
    address: str | None = None,
    tracking_uri: str | None = None,
    dashboard: bool = False,
) -> int:
    """Run (or resume) a validated spec; returns the exit status (see the module docstring)."""
    uri = resolve_tracking_uri(tracking_uri, spec.mlflow.tracking_uri)
    sweep_dir = spec.sweep_dir
    can_restore = sweep_dir.exists() and tune.Tuner.can_restore(str(sweep_dir))
    if sweep_dir.exists() and any(sweep_dir.iterdir()) and not resume:
        raise SpecError(
            f"{sweep_dir} holds a sweep already: pass --resume to continue it, or change the "
            f"spec's name / storage (nothing was overwritten)"
        )
    resolved = {k: v for k, v in spec.to_dict().items() if k != "source"}
    saved = sweep_dir / "spec.yaml"
    if resume and saved.exists() and yaml.safe_load(saved.read_text()) != resolved:
        raise SpecError(
            f"the spec changed since {sweep_dir} was started ({saved}); resume it with the same "
            f"spec, or give the changed one a new name"
        )
    _build_missing_shards(spec)
    started = _init_ray(address, dashboard)
    try:
        max_trials = spec.resources.max_concurrent_trials
        if spec.resources.check:
            fit = check_resources(spec.resources, cluster_nodes())
            max_trials = min(max_trials or fit, fit)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(saved, yaml.safe_dump(resolved, sort_keys=False))
        _atomic_write(
            sweep_dir / POINTS_FILE, json.dumps({p.key: p.to_dict() for p in spec.grid()}, indent=1)
        )
        tracker, exp_id, parent = _start_tracking(spec, uri, resume)
        t0 = time.perf_counter()
        baselines = run_baselines(spec, tracker, exp_id, parent)
        t1 = time.perf_counter()

        trainable = tune.with_resources(run_trial, spec.resources.trial_resources())
        if resume and can_restore:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True)
        else:
            points = spec.grid()
            constants = {
                "eval_backbones": spec.eval_backbones,
                "eval": spec.eval_kwargs(),
                "neighbors": "neighbors" in spec.baselines,
                "workers": spec.resources.workers,
                "use_gpu": spec.resources.use_gpu,
                "cache_dir": str(sweep_dir / "feature_cache"),
                "sweep_dir": str(sweep_dir),
            }
            # The grid is over the points' keys (what Tune's tables show); each trial reads its point
            # from the sweep folder.
            param_space = {"trial": tune.grid_search([p.key for p in points]), **constants}
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=max_trials,
                    trial_name_creator=trial_name,
                    trial_dirname_creator=trial_name,
                ),
                run_config=tune.RunConfig(
                    name=spec.name,
                    storage_path=str(spec.storage),
                    callbacks=[MlflowTrialLogger(str(sweep_dir))],
                    failure_config=tune.FailureConfig(max_failures=0),
                    verbose=1,
                ),
            )
        tuner.fit()
        timing = {
            "baselines_s": round(t1 - t0, 2),
            "trials_s": round(time.perf_counter() - t1, 2),
            "max_concurrent_trials": max_trials,
        }
        _atomic_write(sweep_dir / "timing.json", json.dumps(timing))
        print(
            f"[lgm_ray.sweep] baselines {timing['baselines_s']:.0f} s, trials {timing['trials_s']:.0f} s "
            f"(at most {max_trials} at once)",
            file=sys.stderr,
            flush=True,
        )
        return finish(spec, tracker, exp_id, parent, baselines, uri)
    finally:
        if started:
            ray.shutdown()


def finish(
    spec: SweepSpec, tracker: Tracker, exp_id: str, parent: str, baselines: list[dict], uri: str
) -> int:
    """Tables on the parent run, printed; unfinished trials marked KILLED; the exit status."""
    from lgm_ray.tracking import results_frame

    finished, failed, unfinished = collect(spec)
    for run in tracker.children(exp_id, parent):
        if run.info.status == "RUNNING" and run.data.tags.get(KIND_TAG) == "trial":
            tracker.finish(run.info.run_id, "KILLED")
    frame = results_frame(finished, baselines)
    text, _ = write_tables(
        frame,
        [d.name for d in spec.datasets],
        spec.eval_backbones,
        spec.sweep_dir / "tables",
        with_ablation=spec.has_ablations,
        ablation_backbones=spec.ablation_backbones,
    )
    tracker.log_artifact(parent, spec.sweep_dir / "tables", "tables")
    tracker.log_metrics(
        parent,
        {
            "trials_finished": len(finished),
            "trials_failed": len(failed),
            "trials_unfinished": len(unfinished),
        },
    )
    tracker.set_tags(parent, {"lgm_ray.failed_trials": ",".join(k for k, _ in failed)})
    report = None
    try:
        from lgm_ray.report import build_report

        report = build_report(spec.sweep_dir, spec.sweep_dir / "report", uri, parent_run=parent)
    except Exception as exc:  # noqa: BLE001 - the report never fails the sweep; its error is shown
        print(f"[lgm_ray.sweep] warning: the report failed: {exc!r}", file=sys.stderr, flush=True)
    tracker.finish(parent, "KILLED" if unfinished else "FINISHED")
    print()
    print(text or "(no finished trial yet)")
    print(
        f"{len(finished)} trials finished, {len(failed)} failed, {len(unfinished)} unfinished  "
        f"({spec.sweep_dir})"
    )
    for key, err in failed:
        print(f"  FAILED {key}: {err}")
    print(f"tables: {spec.sweep_dir / 'tables'}")
    if report is not None:
        print(f"report: {report}")
    print(f"MLflow: experiment {spec.mlflow.experiment or spec.name!r}, parent run {parent}; {ui_hint(uri)}")
    if unfinished:
        print(f"interrupted: continue with  python -m lgm_ray.sweep {spec.source or 'SPEC'} --resume")
        return INTERRUPTED
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: a bad spec or command exits with status 2 and one message, before any trial."""
    args = parse_args(argv)
    try:
        spec = load_spec(args.spec)
        return run_sweep(
            spec,
            resume=args.resume,
            address=args.address,
            tracking_uri=args.tracking_uri,
            dashboard=args.dashboard,
        )
    except (SpecError, ConfigError) as exc:
        print(f"python -m lgm_ray.sweep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
