"""Run a sweep spec on Ray Tune: ``python -m lgm_ray.sweep SPEC [--set KEY=VALUE …] [--resume]``.

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

This module is the driver (its command is :mod:`lgm_ray.sweep.__main__`), in the order it runs:

1. **preflight** (:func:`preflight`), before Ray starts and before anything is written: the sweep folder
   (:func:`check_folder`), the MLflow store answering within seconds
   (:func:`~lgm_ray.results.tracking.check_tracking`), every backbone's weights loading
   (:func:`check_weights`); the datasets were checked when the spec was read
   (:func:`~lgm_ray.sweep.parse.check_datasets`). A failure is one ``error: …`` line, exit 2, nothing
   written, so the same command runs once the cause is fixed;
2. Ray, and the spec against the cluster (:func:`max_concurrent_trials`);
3. the sweep folder, the MLflow parent run (:mod:`lgm_ray.sweep.mlflow_runs`), the shared baselines
   (:mod:`lgm_ray.sweep.baselines`), the Tuner over the trial (:func:`make_tuner`,
   :mod:`lgm_ray.sweep.trial`) with the MLflow callback;
4. the end (:func:`finish`): tables, the HTML report, every MLflow run closed, the exit status.

**Stops.** SIGTERM (what a scheduler or a spot reclaim sends) is handled as SIGINT (Ctrl-C)
(:func:`sigterm_as_sigint`): Tune stops the trials at a clean point, the MLflow runs of unfinished
trials and the parent end KILLED, the command exits 130, and ``--resume`` continues without redoing a
finished trial. A second signal stops at once (the runs are still closed). MLflow's HTTP calls retry and
wait a bounded time (:func:`~lgm_ray.results.tracking.http_limits`).

Exit status (:data:`EXIT_STATUS`; the command's ``--help`` shows the same table):

==== =========================================================================================
0    every trial and shared baseline finished; the parent MLflow run is FINISHED
1    some trials or shared baselines failed (their runs FAILED with the error, the parent FAILED
     and tagged ``lgm_ray.failed_trials``), or the sweep stopped on an unexpected error after it
     started; ``--resume`` re-runs what failed and keeps what finished
2    a bad spec, ``--set`` or command, or a failed preflight (tracking server, weights, shards,
     resources): one ``error: …`` line, nothing written; fix it and run the same command
130  interrupted (SIGINT / Ctrl-C or SIGTERM): unfinished runs and the parent KILLED; continue
     with the same command and ``--resume`` (when nothing was written yet: the same command)
==== =========================================================================================
"""

from __future__ import annotations

import shlex
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from lgm_ray.common.cli import fail
from lgm_ray.common.errors import EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, InputError, RunFailedError
from lgm_ray.common.ray_start import start_ray
from lgm_ray.results.folder import SweepFolder
from lgm_ray.results.tables import folder_tables, write_tables
from lgm_ray.results.tracking import (
    FAILED_TAG,
    Tracker,
    check_tracking,
    http_limits,
    resolve_tracking_uri,
    ui_hint,
)
from lgm_ray.sweep.baselines import run_baselines
from lgm_ray.sweep.mlflow_runs import MlflowTrialLogger, start_tracking
from lgm_ray.sweep.parse import check_resources
from lgm_ray.sweep.spec import SpecError, SweepSpec
from lgm_ray.sweep.trial import run_trial, trial_name

INTERRUPTED = EXIT_INTERRUPTED
EXIT_STATUS = {
    0: "every trial and shared baseline finished",
    EXIT_FAILED: "some trials or shared baselines failed, or the sweep stopped on an error after it started "
                 "(--resume re-runs what failed)",
    EXIT_INPUT: "a bad spec, --set or command, or a failed preflight (tracking server, weights, shards, "
                "resources); nothing was written",
    EXIT_INTERRUPTED: "interrupted (SIGINT or SIGTERM); unfinished MLflow runs KILLED; continue with --resume",
}


def _say(message: str) -> None:
    print(f"[lgm_ray.sweep] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- preflight: before Ray, nothing written


def check_folder(spec: SweepSpec, resume: bool) -> None:
    """A new sweep needs a folder where none has started; a resumed one the spec it was started with."""
    folder = spec.folder
    if folder.is_started() and not resume:
        raise SpecError(
            f"{folder.root} holds a sweep already: pass --resume to continue it, or change the "
            f"spec's name / storage (nothing was overwritten)"
        )
    if resume and folder.is_started() and folder.is_sweep() and not same_spec(folder.read_spec(), resolved_spec(spec)):
        raise SpecError(
            f"the spec changed since {folder.root} was started ({folder.spec}); resume it with the same "
            f"spec (and the same --set), or give the changed one a new name"
        )


def resolved_spec(spec: SweepSpec) -> dict[str, Any]:
    """The resolved spec as the sweep folder keeps it (``spec.yaml``; its source file is not part of it)."""
    return {k: v for k, v in spec.to_dict().items() if k != "source"}


def same_spec(kept: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether two resolved specs run the same sweep: every field but the ``--set`` text that led to it."""
    return {k: v for k, v in kept.items() if k != "overrides"} == {k: v for k, v in now.items() if k != "overrides"}


def _weights_needed(spec: SweepSpec) -> dict[tuple[str, str | None], tuple[str, Any]]:
    """(backbone, weights file) → (what loads it, a run config to build it with), for every backbone a
    trial distils or evaluates with and every evaluation backbone of the shared baselines."""
    needed: dict[tuple[str, str | None], tuple[str, Any]] = {}
    for point in spec.grid():
        cfg = point.resolved()
        where = f"ablations.weights of {point.key}" if "weights" in point.ablation else "config.weights"
        needed.setdefault((point.backbone, cfg.weights), (where if cfg.weights else "backbones", cfg))
    base = spec.base_config()
    for b in spec.eval_backbones:
        needed.setdefault((b, None), ("eval_backbones (the shared baselines and evaluations)", base))
    return needed


def check_weights(spec: SweepSpec) -> None:
    """Every backbone's weights load here, once, before any trial: a ``weights:`` file that is not there,
    a file that is not that backbone's, or a pretrained name whose weights are neither cached nor
    downloadable (offline) fails now, naming the backbone, instead of when its trial runs.

    Raises:
        SpecError: naming the backbone, the weights and the fix.
    """
    from lgm_ray.backbones import create_backbone

    for (backbone, weights), (where, cfg) in _weights_needed(spec).items():
        if weights and "://" not in weights and not Path(weights).is_file():
            raise SpecError(f"{where}: backbone {backbone!r}: weights file {weights!r} does not exist; give "
                            f"the path of a copy of its weights (relative paths are from the working directory)")
        try:
            model = create_backbone(backbone, weights=weights, img_size=cfg.crop_res,
                                    normalization=cfg.normalization, raw_output=cfg.raw_output, device="cpu")
        except InputError as exc:
            raise SpecError(f"{where}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a file that does not load is a bad input, named here
            raise SpecError(
                f"{where}: backbone {backbone!r} does not load its weights {weights or '(pretrained)'} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); give this backbone's "
                f"weights file"
            ) from None
        del model


def preflight(spec: SweepSpec, uri: str, resume: bool) -> None:
    """Everything checked before Ray starts and before anything is written (module docstring, step 1)."""
    check_folder(spec, resume)
    check_tracking(uri)
    check_weights(spec)


def _build_missing_shards(spec: SweepSpec) -> None:
    for ds in spec.datasets:
        if ds.build and not (Path(ds.shards) / "manifest.json").is_file():
            from lgm_ray.shards.build import build

            _say(f"building {ds.name} shards in {ds.shards}")
            build(ds.build, out=ds.shards)


# ---------------------------------------------------------------- stops


def _sigterm(signum: int, frame: Any) -> None:
    """SIGTERM does what SIGINT does now: Tune's handler during ``fit`` (a clean stop), else a
    KeyboardInterrupt."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIG_IGN or SIG_DFL (a background job): stop all the same
        raise KeyboardInterrupt


def route_sigterm() -> None:
    """Make SIGTERM act as SIGINT (again: ``ray.init`` installs its own SIGTERM handler, which exits
    mid-call and leaves the MLflow runs RUNNING)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)


@contextmanager
def sigterm_as_sigint() -> Iterator[None]:
    """For the duration, SIGTERM is handled as SIGINT (:func:`route_sigterm`); then both handlers as they
    were (Tune leaves its SIGINT handler installed after ``fit``, which would swallow a later Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    route_sigterm()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


@dataclass
class _Open:
    """What a sweep has opened so far, for closing it when it stops: the MLflow parent run, once made."""

    tracker: Tracker | None = None
    experiment_id: str = ""
    parent: str = ""

    def close(self, status: str) -> None:
        """End the open child runs and the parent with ``status`` (best effort: the store may be gone)."""
        if self.tracker is None:
            return
        try:
            self.tracker.close_children(self.experiment_id, self.parent, status)
            self.tracker.finish(self.parent, status)
        except Exception as exc:  # noqa: BLE001 - closing must not hide why the sweep stopped
            _say(f"warning: could not mark the MLflow runs {status}: {exc!r}")


def resume_command(spec: SweepSpec, tracking_uri: str | None = None, address: str | None = None) -> str:
    """The command that continues this sweep: the same spec, ``--set`` settings and flags, with ``--resume``."""
    words = ["python", "-m", "lgm_ray.sweep", spec.source or "SPEC"]
    for item in spec.overrides:
        words += ["--set", item]
    if tracking_uri:
        words += ["--tracking-uri", tracking_uri]
    if address:
        words += ["--address", address]
    return shlex.join(words + ["--resume"])


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
    """Run (or resume) a validated spec; returns the exit status (:data:`EXIT_STATUS`).

    Raises:
        InputError: a failed preflight or a spec the cluster cannot run (nothing written: exit 2).
        RunFailedError: the sweep stopped on an unexpected error after it started (exit 1); the message
            names what was kept and the command that continues.
    """
    uri = resolve_tracking_uri(tracking_uri, spec.mlflow.tracking_uri)
    again = resume_command(spec, tracking_uri, address)
    with sigterm_as_sigint(), http_limits():
        try:
            preflight(spec, uri, resume)
            _build_missing_shards(spec)
            started = _start_ray(address, dashboard)
        except KeyboardInterrupt:
            return fail("interrupted before the sweep started (no sweep folder, no MLflow run): run the same "
                        "command again", EXIT_INTERRUPTED)
        route_sigterm()  # ray.init installed its own
        try:
            return _run(spec, uri, resume, again)
        finally:
            if started:
                ray.shutdown()


def _start_ray(address: str | None, dashboard: bool) -> bool:
    """:func:`~lgm_ray.common.ray_start.start_ray`; a Ray that does not start or answer is one line, exit 2."""
    try:
        return start_ray(address, dashboard=dashboard)
    except Exception as exc:  # noqa: BLE001 - Ray's errors here are a wrong address or a machine problem
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        where = f"join the Ray cluster at {address}" if address else "start a local Ray (or join RAY_ADDRESS)"
        raise InputError(f"could not {where} ({type(exc).__name__}: {first}); check --address / RAY_ADDRESS "
                         f"and `ray status` (nothing was written)") from None


def _run(spec: SweepSpec, uri: str, resume: bool, again: str) -> int:
    """The sweep once Ray is up: the folder, MLflow, the baselines, the trials, the end; every stop closes
    the MLflow runs and ends in one ``error: …`` line and its exit status."""
    folder = spec.folder
    opened = _Open()
    try:
        max_trials = max_concurrent_trials(spec)
        folder.root.mkdir(parents=True, exist_ok=True)
        folder.driver_error.unlink(missing_ok=True)  # an earlier stop's traceback, now out of date
        folder.write_spec(resolved_spec(spec))
        folder.write_points({p.key: p.to_dict() for p in spec.grid()})
        opened.tracker, opened.experiment_id, opened.parent = start_tracking(spec, uri, resume)
        t0 = time.perf_counter()
        _, failed_baselines = run_baselines(spec, opened.tracker, opened.experiment_id, opened.parent)
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
        return finish(spec, opened.tracker, opened.experiment_id, opened.parent, uri,
                      failed_baselines=failed_baselines, again=again)
    except KeyboardInterrupt:
        opened.close("KILLED")
        if not folder.is_started():
            return fail("interrupted before the sweep started; nothing was computed: run the same command again",
                        EXIT_INTERRUPTED)
        return fail(f"interrupted; unfinished MLflow runs marked KILLED; kept: {folder.root}; continue with: "
                    f"{again}", EXIT_INTERRUPTED)
    except InputError:
        raise  # found before anything was written (the cluster cannot run the spec)
    except Exception as exc:  # noqa: BLE001 - every failure of a sweep ends in one line and exit 1
        opened.close("FAILED")
        raise RunFailedError(_stopped_message(folder, exc, again)) from exc


def _stopped_message(folder: SweepFolder, exc: BaseException, again: str) -> str:
    """The one line of a sweep that stopped on an unexpected error: what, where its traceback went, and
    what to run next (``--resume`` only when something was kept)."""
    text = "".join(traceback.format_exception(exc))
    if folder.root.is_dir():
        where = folder.write_driver_error(text)
    else:
        with tempfile.NamedTemporaryFile("w", prefix="lgm_ray_sweep_error_", suffix=".txt", delete=False) as f:
            f.write(text)
            where = Path(f.name)
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if folder.is_started():
        advice = f"kept: {folder.root}; fix the cause, then continue with: {again}"
    else:
        advice = "nothing was computed; fix the cause and run the same command again"
    return f"the sweep stopped: {what} (traceback: {where}); {advice}"


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


def parent_status(failed: list, unfinished: list) -> str:
    """The parent run's end: KILLED while trials are unfinished, FAILED when any trial or shared baseline
    failed, else FINISHED."""
    return "KILLED" if unfinished else "FAILED" if failed else "FINISHED"


def finish(
    spec: SweepSpec,
    tracker: Tracker,
    exp_id: str,
    parent: str,
    uri: str,
    *,
    failed_baselines: list[tuple[str, str]] = (),
    again: str | None = None,
) -> int:
    """The tables (:func:`~lgm_ray.results.tables.folder_tables` of the sweep folder: the finished trials
    and shared baselines) on the parent run, printed; every open run closed (unfinished trials KILLED); the parent
    FINISHED, FAILED or KILLED (:func:`parent_status`); one ``error: …`` line when not all finished; the
    exit status."""
    folder = spec.folder
    finished, failed, unfinished = collect(folder)
    failures = failed + list(failed_baselines)
    tracker.close_children(exp_id, parent, "KILLED")
    text, _ = write_tables(folder_tables(folder), folder.tables)
    tracker.log_artifact(parent, folder.tables, SweepFolder.TABLES)
    tracker.log_metrics(parent, {"trials_finished": len(finished), "trials_failed": len(failed),
                                 "trials_unfinished": len(unfinished), "baselines_failed": len(failed_baselines)})
    tracker.set_tags(parent, {FAILED_TAG: ",".join(k for k, _ in failures)})
    report = _build_report(spec, uri, parent)
    tracker.finish(parent, parent_status(failures, unfinished))
    print()
    print(text or "(no finished trial yet)")
    print(f"{len(finished)} trials finished, {len(failed)} failed, {len(unfinished)} unfinished  ({folder.root})")
    for key, err in failures:
        print(f"  FAILED {key}: {err}")
    print(f"tables: {folder.tables}")
    if report is not None:
        print(f"report: {report}")
    print(f"MLflow: experiment {spec.mlflow.experiment or spec.name!r}, parent run {parent}; {ui_hint(uri)}")
    sys.stdout.flush()
    again = again or resume_command(spec)
    if unfinished:
        return fail(f"interrupted: {len(unfinished)} trials unfinished (their MLflow runs and the parent "
                    f"KILLED); continue with: {again}", EXIT_INTERRUPTED)
    if failures:
        counts = [f"{len(failed)} of {len(failed) + len(finished)} trials"] if failed else []
        counts += [f"{len(failed_baselines)} shared baselines"] if failed_baselines else []
        what = "; ".join(f"{k}: {e}" for k, e in failures[:3]) + (" …" if len(failures) > 3 else "")
        return fail(f"{' and '.join(counts)} failed ({what}); their MLflow runs and the parent are FAILED; "
                    f"fix the cause, then re-run them (finished trials are kept) with: {again}", EXIT_FAILED)
    return 0
