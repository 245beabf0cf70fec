"""Run a sweep spec on Ray Tune: ``python -m lgm_ray.sweep SPEC [--resume] [--address A]``.

Each grid point of the spec (:mod:`lgm_ray.sweep.spec`) is one Tune trial: it distils (in its own
process, or on K Ray Train workers), evaluates the distilled set on every evaluation backbone in its
own process, one backbone after the other (no Ray tasks escape the trial), and reports. Before the
trials, the shared baselines (``random``, ``centroids``, ``full``) run once per (dataset, evaluation
backbone) as Ray tasks and fill the sweep's feature cache, which the trials then read. Every result
goes to MLflow (:mod:`lgm_ray.results.tracking`) from this driver only; at the end the cross-model and
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

This module is the driver and its command: it checks the spec against the cluster, writes the sweep
folder, runs the shared baselines (:mod:`lgm_ray.sweep.baselines`), builds or restores the Tuner over
the trial (:mod:`lgm_ray.sweep.trial`) with the MLflow callback (:mod:`lgm_ray.sweep.mlflow_runs`), and
reports at the end (tables, the HTML report, the exit status).

Exit status: 0 all trials finished; 1 some trials failed (FAILED in MLflow, listed); 2 a bad spec
or command (nothing ran); 130 interrupted (re-run with ``--resume``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import ray
import yaml
from ray import tune

from lgm_ray.results.tables import write_tables
from lgm_ray.results.tracking import KIND_TAG, Tracker, resolve_tracking_uri, ui_hint
from lgm_ray.sweep.baselines import run_baselines
from lgm_ray.sweep.mlflow_runs import MlflowTrialLogger, start_tracking
from lgm_ray.sweep.parse import check_resources
from lgm_ray.sweep.spec import SpecError, SweepSpec
from lgm_ray.sweep.trial import (
    ERROR_FILE,
    POINTS_FILE,
    RESULT_FILE,
    run_trial,
    trial_name,
    trial_run_dir,
    write_text,
)

INTERRUPTED = 130




def _build_missing_shards(spec: SweepSpec) -> None:
    for ds in spec.datasets:
        if ds.build and not (Path(ds.shards) / "manifest.json").is_file():
            from lgm_ray.shards.build import build

            print(f"[lgm_ray.sweep] building {ds.name} shards in {ds.shards}", file=sys.stderr, flush=True)
            build(ds.build, out=ds.shards)


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
        write_text(saved, yaml.safe_dump(resolved, sort_keys=False))
        write_text(sweep_dir / POINTS_FILE, json.dumps({p.key: p.to_dict() for p in spec.grid()}, indent=1))
        tracker, exp_id, parent = start_tracking(spec, uri, resume)
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
        write_text(sweep_dir / "timing.json", json.dumps(timing))
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
    from lgm_ray.results.tables import results_frame

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
        from lgm_ray.report.build import build_report

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




