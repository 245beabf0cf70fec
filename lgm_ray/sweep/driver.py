"""Run a sweep spec on Ray Tune: ``python -m lgm_ray.sweep SPEC [--resume] [--address A]``.

Each grid point of the spec (:mod:`lgm_ray.sweep.spec`) is one Tune trial: it distils (in its own
process, or on K Ray Train workers), evaluates the distilled set on every evaluation backbone in its
own process, one backbone after the other (no Ray tasks escape the trial), and reports. Before the
trials, the shared baselines (``random``, ``centroids``, ``full``) run once per (dataset, evaluation
backbone) as Ray tasks and fill the sweep's feature cache, which the trials then read. Every result
goes to MLflow (:mod:`lgm_ray.results.tracking`) from this driver only; at the end the cross-model and
ablation tables are logged on the parent run and printed.

The sweep's folder, ``storage/NAME/``, is laid out (and every path in it named) by
:class:`~lgm_ray.results.folder.SweepFolder`; each trial's run folder under it by
:class:`~lgm_ray.distill.run_folder.RunFolder`. Only a trial writes its run folder; the feature cache is
filled before the trials by the shared baselines, and the trials then only read it.

With no address a new local Ray starts (:func:`lgm_ray.common.ray_start.start_ray`); ``--address`` or
``RAY_ADDRESS`` joins a cluster. ``--resume`` continues an interrupted sweep (``Tuner.restore``):
finished trials are skipped, errored ones re-run, an unfinished one continues from its run folder's
checkpoint.

This module is the driver (its command is :mod:`lgm_ray.sweep.__main__`): it checks the sweep folder
(:func:`check_folder`) and the spec against the cluster (:func:`max_concurrent_trials`), writes the sweep
folder, runs the shared baselines (:mod:`lgm_ray.sweep.baselines`), builds or restores the Tuner over the
trial (:func:`make_tuner`, :mod:`lgm_ray.sweep.trial`) with the MLflow callback
(:mod:`lgm_ray.sweep.mlflow_runs`), and reports at the end (:func:`finish`: tables, the HTML report, the
exit status).

Exit status: 0 all trials finished; 1 some trials failed (FAILED in MLflow, listed); 2 a bad spec
or command (nothing ran); 130 interrupted (re-run with ``--resume``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from lgm_ray.common.errors import EXIT_FAILED, EXIT_INTERRUPTED
from lgm_ray.common.ray_start import start_ray
from lgm_ray.results.folder import SweepFolder
from lgm_ray.results.tables import results_frame, write_tables
from lgm_ray.results.tracking import KIND_TAG, Tracker, resolve_tracking_uri, ui_hint
from lgm_ray.sweep.baselines import run_baselines
from lgm_ray.sweep.mlflow_runs import MlflowTrialLogger, start_tracking
from lgm_ray.sweep.parse import check_resources
from lgm_ray.sweep.spec import SpecError, SweepSpec
from lgm_ray.sweep.trial import run_trial, trial_name

INTERRUPTED = EXIT_INTERRUPTED


def _say(message: str) -> None:
    print(f"[lgm_ray.sweep] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- before Ray


def check_folder(spec: SweepSpec, resume: bool) -> None:
    """A new sweep needs an empty folder; a resumed one the same resolved spec it was started with."""
    folder = spec.folder
    if not folder.is_empty() and not resume:
        raise SpecError(
            f"{folder.root} holds a sweep already: pass --resume to continue it, or change the "
            f"spec's name / storage (nothing was overwritten)"
        )
    if resume and folder.is_sweep() and folder.read_spec() != resolved_spec(spec):
        raise SpecError(
            f"the spec changed since {folder.root} was started ({folder.spec}); resume it with the same "
            f"spec, or give the changed one a new name"
        )


def resolved_spec(spec: SweepSpec) -> dict[str, Any]:
    """The resolved spec as the sweep folder keeps it (``spec.yaml``; its source file is not part of it)."""
    return {k: v for k, v in spec.to_dict().items() if k != "source"}


def _build_missing_shards(spec: SweepSpec) -> None:
    for ds in spec.datasets:
        if ds.build and not (Path(ds.shards) / "manifest.json").is_file():
            from lgm_ray.shards.build import build

            _say(f"building {ds.name} shards in {ds.shards}")
            build(ds.build, out=ds.shards)


# ---------------------------------------------------------------- the cluster


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


def max_concurrent_trials(spec: SweepSpec) -> int | None:
    """At most the spec's limit, and no more than the cluster holds (checked: a trial that can never be
    placed is refused before any starts)."""
    limit = spec.resources.max_concurrent_trials
    if not spec.resources.check:
        return limit
    fit = check_resources(spec.resources, cluster_nodes())
    return min(limit or fit, fit)


# ---------------------------------------------------------------- the trials


def make_tuner(spec: SweepSpec, max_trials: int | None, resume: bool) -> tune.Tuner:
    """The Tuner over every grid point (each trial reads its point from the sweep folder by key), or, on
    ``resume`` of a sweep Tune can restore, the restored one (errored trials run again)."""
    folder = spec.folder
    trainable = tune.with_resources(run_trial, spec.resources.trial_resources())
    if resume and folder.root.exists() and tune.Tuner.can_restore(str(folder.root)):
        return tune.Tuner.restore(str(folder.root), trainable=trainable, resume_errored=True)
    constants = {
        "eval_backbones": spec.eval_backbones,
        "eval": spec.eval_settings(),
        "neighbors": "neighbors" in spec.baselines,
        "use_gpu": spec.resources.use_gpu,
        "cache_dir": str(folder.feature_cache),
        "sweep_dir": str(folder.root),
    }
    # The grid is over the points' keys (what Tune's tables show).
    param_space = {"trial": tune.grid_search([p.key for p in spec.grid()]), **constants}
    return tune.Tuner(
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
            callbacks=[MlflowTrialLogger(str(folder.root))],
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,
        ),
    )


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
    check_folder(spec, resume)
    _build_missing_shards(spec)
    started = start_ray(address, dashboard=dashboard)
    try:
        max_trials = max_concurrent_trials(spec)
        folder = spec.folder
        folder.root.mkdir(parents=True, exist_ok=True)
        folder.write_spec(resolved_spec(spec))
        folder.write_points({p.key: p.to_dict() for p in spec.grid()})
        tracker, exp_id, parent = start_tracking(spec, uri, resume)
        t0 = time.perf_counter()
        baselines = run_baselines(spec, tracker, exp_id, parent)
        t1 = time.perf_counter()
        make_tuner(spec, max_trials, resume).fit()
        timing = {
            "baselines_s": round(t1 - t0, 2),
            "trials_s": round(time.perf_counter() - t1, 2),
            "max_concurrent_trials": max_trials,
        }
        folder.write_timing(timing)
        _say(f"baselines {timing['baselines_s']:.0f} s, trials {timing['trials_s']:.0f} s "
             f"(at most {max_trials} at once)")
        return finish(spec, tracker, exp_id, parent, baselines, uri)
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- the end


def collect(folder: SweepFolder) -> tuple[list[dict], list[tuple[str, str]], list[str]]:
    """Finished trial results, failed trials (key, last line of the error) and unfinished keys, from the
    run folders of every grid point."""
    finished, failed, unfinished = [], [], []
    for key, run in folder.runs().items():
        result = run.read_result()
        error = None if result is not None else run.last_error_line()
        if result is not None:
            finished.append(result)
        elif error is not None:
            failed.append((key, error))
        else:
            unfinished.append(key)
    return finished, failed, unfinished


def _build_report(spec: SweepSpec, uri: str, parent: str) -> Path | None:
    """The HTML report; it never fails the sweep (its error is shown)."""
    try:
        from lgm_ray.report.build import build_report

        return build_report(spec.sweep_dir, spec.folder.report, uri, parent_run=parent)
    except Exception as exc:  # noqa: BLE001 - the report never fails the sweep; its error is shown
        _say(f"warning: the report failed: {exc!r}")
        return None


def finish(
    spec: SweepSpec, tracker: Tracker, exp_id: str, parent: str, baselines: list[dict], uri: str
) -> int:
    """Tables on the parent run, printed; unfinished trials marked KILLED; the exit status."""
    folder = spec.folder
    finished, failed, unfinished = collect(folder)
    for run in tracker.children(exp_id, parent):
        if run.info.status == "RUNNING" and run.data.tags.get(KIND_TAG) == "trial":
            tracker.finish(run.info.run_id, "KILLED")
    text, _ = write_tables(
        results_frame(finished, baselines),
        [d.name for d in spec.datasets],
        spec.eval_backbones,
        folder.tables,
        with_ablation=spec.has_ablations,
        ablation_backbones=spec.ablation_backbones,
    )
    tracker.log_artifact(parent, folder.tables, SweepFolder.TABLES)
    tracker.log_metrics(
        parent,
        {"trials_finished": len(finished), "trials_failed": len(failed), "trials_unfinished": len(unfinished)},
    )
    tracker.set_tags(parent, {"lgm_ray.failed_trials": ",".join(k for k, _ in failed)})
    report = _build_report(spec, uri, parent)
    tracker.finish(parent, "KILLED" if unfinished else "FINISHED")
    print()
    print(text or "(no finished trial yet)")
    print(f"{len(finished)} trials finished, {len(failed)} failed, {len(unfinished)} unfinished  ({folder.root})")
    for key, err in failed:
        print(f"  FAILED {key}: {err}")
    print(f"tables: {folder.tables}")
    if report is not None:
        print(f"report: {report}")
    print(f"MLflow: experiment {spec.mlflow.experiment or spec.name!r}, parent run {parent}; {ui_hint(uri)}")
    if unfinished:
        print(f"interrupted: continue with  python -m lgm_ray.sweep {spec.source or 'SPEC'} --resume")
        return INTERRUPTED
    return EXIT_FAILED if failed else 0
