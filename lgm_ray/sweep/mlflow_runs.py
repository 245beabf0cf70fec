"""MLflow from the sweep's driver: the parent run, and each trial's child run logged by a Tune callback.

Only the driver process talks to MLflow; trials and Ray tasks never do. :func:`start_tracking` opens
(on ``--resume``, reopens) the sweep's experiment and parent run and writes them to the sweep folder's
state file (:meth:`SweepFolder.write_state <lgm_ray.results.folder.SweepFolder.write_state>`).
:class:`MlflowTrialLogger`, a Tune callback, reads that file at set-up and logs each trial to its child
run: params when it starts, the meta loss while it runs, metrics and artifacts from its run folder when
it finishes (:func:`log_trial_result`), the error text when it fails; a logging failure there is a
warning, never a stopped sweep.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune

from lgm_ray.distill.run_folder import RunFolder
from lgm_ray.results.folder import SweepFolder
from lgm_ray.results.tables import METRIC_FIELDS
from lgm_ray.results.tracking import OVERRIDES_TAG, Tracker, flatten
from lgm_ray.sweep.spec import SweepSpec
from lgm_ray.sweep.trial import load_point, trial_run

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

# Spec fields that are not the parent's params: free text, and what may differ between a run and its
# --resume (MLflow refuses a param logged again with another value): the spec's path as typed and the
# --set text (tag lgm_ray.overrides; the values it set are params like any other).
UNLOGGED_FIELDS = ("paper", "description", "source", "overrides")


def start_tracking(spec: SweepSpec, uri: str, resume: bool) -> tuple[Tracker, str, str]:
    """Open the sweep's experiment and parent run, log the resolved spec on it (params, the ``--set``
    settings as tag ``lgm_ray.overrides``, ``spec.yaml``) and write the sweep's state file.

    On ``resume`` the parent run of the state file is reopened when the tracking URI is the same one,
    so a resumed sweep adds to its runs instead of starting new ones.

    Returns:
        The tracker, the experiment id and the parent run id.
    """
    folder = spec.folder
    old = folder.read_state() if resume else {}
    tracker = Tracker(uri)
    experiment = spec.mlflow.experiment or spec.name
    exp_id = tracker.experiment(experiment)
    parent = tracker.start_parent(
        exp_id,
        spec.name,
        run_id=old.get("parent_run_id") if old.get("tracking_uri") == uri else None,
        tags={"spec": spec.source or "", "mlflow.note.content": spec.description},
    )
    folder.write_state(
        {"tracking_uri": uri, "experiment": experiment, "experiment_id": exp_id, "parent_run_id": parent}
    )
    resolved = {k: v for k, v in spec.to_dict().items() if k not in UNLOGGED_FIELDS}
    tracker.log_params(parent, flatten(resolved))
    tracker.set_tags(parent, {OVERRIDES_TAG: " ".join(spec.overrides)})
    tracker.log_artifact(parent, folder.spec)
    if spec.source:
        tracker.log_artifact(parent, spec.source, "spec_source")
    return tracker, exp_id, parent


class MlflowTrialLogger(tune.Callback):
    """Tune callback that logs every trial to its MLflow child run, from the driver process.

    It reads the tracking URI, experiment and parent run from the sweep's state file at set-up, so
    a restored sweep (``Tuner.restore`` brings back a pickled copy) logs where the new command says.
    """

    def __init__(self, sweep_dir: str) -> None:
        self.sweep_dir = sweep_dir
        self.tracker: Tracker | None = None
        self.runs: dict[str, str] = {}

    def setup(self, **info: Any) -> None:
        state = SweepFolder(self.sweep_dir).read_state()
        self.tracker = Tracker(state["tracking_uri"])
        self.experiment_id, self.parent_id = state["experiment_id"], state["parent_run_id"]
        self.runs = {}

    def _warn(self, what: str, exc: BaseException) -> None:
        print(
            f"[lgm_ray.sweep] warning: MLflow logging failed ({what}): {exc!r}", file=sys.stderr, flush=True
        )

    def _run_id(self, trial: Trial) -> str:
        """The trial's child run, created (tagged with its grid point) on first use."""
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

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        try:
            self.tracker.log_params(self._run_id(trial), trial_params(trial.config))
        except Exception as exc:  # noqa: BLE001 - logging must never stop the sweep
            self._warn(f"start {trial}", exc)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
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

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        try:
            run_id = self._run_id(trial)
            log_trial_result(self.tracker, run_id, trial_run(trial.config))
            self.tracker.finish(run_id)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"complete {trial}", exc)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        try:
            run = trial_run(trial.config)
            error = run.error.read_text() if run.error.is_file() else ""
            if not error and trial.error_file and Path(trial.error_file).exists():
                error = Path(trial.error_file).read_text()
            self.tracker.fail(self._run_id(trial), error or "the trial failed (no error text recorded)")
        except Exception as exc:  # noqa: BLE001
            self._warn(f"error {trial}", exc)


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's MLflow params, from its Tune config: its resolved run config (the Ray Train workers
    included), run folder, dataset, evaluation backbones, ablation values and probe settings."""
    point = load_point(config)
    return {
        **point.resolved().to_dict(),
        "out": str(trial_run(config).root),
        "dataset": point.dataset,
        "eval_backbones": ",".join(config["eval_backbones"]),
        **{f"ablation.{k}": v for k, v in point.ablation.items()},
        **{f"eval.{k}": v for k, v in config["eval"].items()},
    }


def log_trial_result(tracker: Tracker, run_id: str, run: RunFolder | str | Path) -> None:
    """Log a finished trial's metrics and artifacts from its run folder (its ``result.json``)."""
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    result = run.read_result()
    if result is None:
        raise FileNotFoundError(f"{run.result} does not exist: the trial wrote no result")
    summary = result["summary"]
    tracker.log_series(run_id, "meta_loss", summary.get("losses") or [])
    metrics = {k: summary.get(k) for k in ("final_loss", "images_per_s", "seconds", "steps")}
    for kind, evals in (("", result["evals"]), ("neighbors/", result["neighbors"])):
        for b, r in evals.items():
            metrics.update({f"{kind}{b}/{m}": r[m] for m in METRIC_FIELDS})
    if result["evals"]:
        metrics["top1_mean_avg"] = sum(r["top1_mean"] for r in result["evals"].values()) / len(
            result["evals"]
        )
    tracker.log_metrics(run_id, metrics)
    for path in (run.synset, run.grid, run.config, run.result):
        tracker.log_artifact(run_id, path)
    if run.grids.is_dir():
        tracker.log_artifact(run_id, run.grids, RunFolder.GRIDS)
        tracker.log_image_steps(run_id, run.grids)
