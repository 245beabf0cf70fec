"""MLflow for sweeps: one experiment per spec, a parent run per sweep, a child run per trial.

Held here: :class:`Tracker` (experiments, parent and child runs, params, metrics, artifacts, FAILED
runs with their error) and where results go (:func:`resolve_tracking_uri`, :func:`ui_hint`). The
result tables the sweep logs live in :mod:`lgm_ray.results.tables`: they are pure pandas and need no
MLflow, so the report builds them too.

Everything goes through one :class:`mlflow.MlflowClient` with explicit experiment and run ids. The
fluent API (``mlflow.set_experiment``, ``mlflow.start_run``) is not used: ``set_experiment`` exports
``MLFLOW_EXPERIMENT_ID``, which every Ray process started afterwards inherits and which overrides the
experiment named to Ray's own MLflow helpers (docs/design.md §5). Only the sweep's driver logs, so one
process writes the store — a SQLite file needs no locking across trials, and a tracking server bound
to the head node's loopback serves a whole cluster.

Where results go (:func:`resolve_tracking_uri`): ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else
the spec's ``mlflow.tracking_uri``, else ``sqlite:///mlflow.db`` in the working directory, whose
artifacts go to ``mlartifacts/`` beside it (a relative SQLite path is made absolute against the working
directory). ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows them.

Bounded waits: :func:`check_tracking` asks a tracking server one question, once, with a
:data:`PREFLIGHT_TIMEOUT_S` timeout, before a sweep writes anything (an unreachable server is an
:class:`TrackingError`, not four minutes of MLflow's default retries); :func:`http_limits` bounds
MLflow's retries and timeout (:data:`HTTP_LIMITS`) for the sweep's own calls.

Runs:

* the parent run (tag ``lgm_ray.kind = sweep``): the resolved spec, the tables;
* one child per trial (``mlflow.parentRunId`` = the parent, ``lgm_ray.kind = trial``,
  ``lgm_ray.trial_key`` = the grid point): the resolved run config as params, the meta loss per
  step, images/s, top-1/top-5 mean and std per evaluation backbone, the synthetic set, its grids
  and the config as artifacts; FAILED with the error when the trial fails;
* one child per shared baseline (``lgm_ray.kind = baseline``).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lgm_ray.common.errors import InputError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

DEFAULT_DB = "mlflow.db"
KIND_TAG = "lgm_ray.kind"
KEY_TAG = "lgm_ray.trial_key"
PARENT_TAG = "mlflow.parentRunId"
FAILED_TAG = "lgm_ray.failed_trials"
OVERRIDES_TAG = "lgm_ray.overrides"
# One question to a tracking server before a sweep starts: no retry, this many seconds at most.
PREFLIGHT_TIMEOUT_S = 5
# MLflow's HTTP retries and timeout for the sweep's own calls (its defaults, 7 retries with an
# exponential back-off and 120 s a request, keep a sweep waiting minutes on a server that is gone); a
# value set in the environment wins.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


class TrackingError(InputError):
    """The MLflow store cannot be reached or written; the message names the URI and the fix."""


def absolute_uri(uri: str, cwd: str | Path | None = None) -> str:
    """``uri`` with a relative SQLite path (``sqlite:///mlflow.db``) made absolute against ``cwd``
    (default: the working directory); any other URI as it is."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix) :].startswith("/"):
        return uri
    return f"{prefix}{(Path(cwd or Path.cwd()) / uri[len(prefix) :]).resolve()}"


def resolve_tracking_uri(
    cli_uri: str | None = None, spec_uri: str | None = None, cwd: str | Path | None = None
) -> str:
    """The tracking URI: the flag, else ``MLFLOW_TRACKING_URI``, else the spec's, else SQLite in ``cwd``.

    Args:
        cli_uri: ``--tracking-uri`` of the command line, if given.
        spec_uri: the spec's ``mlflow.tracking_uri``, if set.
        cwd: the folder of the default ``mlflow.db`` (default: the working directory).

    Returns:
        The URI to pass to :class:`Tracker`.
    """
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec_uri
    if uri:
        return absolute_uri(uri, cwd)
    return f"sqlite:///{Path(cwd or Path.cwd()).resolve() / DEFAULT_DB}"


@contextmanager
def _environment(values: dict[str, str], *, force: bool) -> Iterator[None]:
    """``values`` in ``os.environ`` for the duration (``force``: over what is there; else only where
    unset), then the environment as it was."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if force or saved[k] is None:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def http_limits() -> Any:
    """A context in which MLflow's HTTP calls retry and wait at most :data:`HTTP_LIMITS` (MLflow reads
    these variables on every request; values the user set in the environment win)."""
    return _environment(HTTP_LIMITS, force=False)


def _cause(exc: BaseException) -> str:
    """The short reason of a failed MLflow request: the OS error, a timeout or the HTTP status."""
    text = str(exc)
    for pattern in (r"\[Errno -?\d+\] [^\"')]+", r"[Rr]ead timed out", r"timed out", r"status code \d+",
                    r"HTTP \d{3}", r"\b[45]\d\d\b[^.;]*"):
        if m := re.search(pattern, text):
            return m.group(0).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def check_tracking(uri: str, timeout_s: int = PREFLIGHT_TIMEOUT_S) -> None:
    """Fail fast when the store at ``uri`` cannot take a sweep's runs: a tracking server that does not
    answer one request within ``timeout_s`` (no retry), or a SQLite file whose folder is missing or
    read-only. Nothing is created (no database file, no experiment).

    Raises:
        TrackingError: naming the URI and the fix.
    """
    fix = ("start it, or name one that runs with --tracking-uri, MLFLOW_TRACKING_URI or the spec's "
           "mlflow.tracking_uri (nothing was written)")
    if uri.startswith(("http://", "https://")):
        from mlflow import MlflowClient

        limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
        with _environment(limits, force=True):
            try:
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            except Exception as exc:  # noqa: BLE001 - any failure of the one request is the answer
                cause = _cause(exc)
                if re.search(r"\b40[13]\b", cause):
                    fix = ("give its credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
                           "MLFLOW_TRACKING_TOKEN), or name another server (nothing was written)")
                raise TrackingError(
                    f"the MLflow tracking server {uri} does not answer ({cause}, within {timeout_s} s); {fix}"
                ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            problem = "does not exist" if not folder.is_dir() else "is not writable"
            raise TrackingError(
                f"the MLflow store {uri}: its folder {folder} {problem}; create it, or {fix}"
            )


def is_local_store(uri: str) -> bool:
    """Whether ``uri`` is a store on this machine (SQLite, ``file:`` or a plain path), not a server."""
    return uri.startswith("sqlite:") or "://" not in uri or uri.startswith("file:")


def ui_hint(uri: str) -> str:
    """Where to look at the results: the ``mlflow ui`` command for a SQLite store, else the server."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        rel = os.path.relpath(path) if path.is_absolute() else str(path)
        shown = f"sqlite:///{rel}" if not rel.startswith("..") else uri
        return f"mlflow ui --backend-store-uri {shown}   (then open http://127.0.0.1:5000)"
    return f"open {uri} (the MLflow tracking server)"


def _param_value(value: Any) -> str:
    """``value`` as text, cut to 6000 characters (MLflow's limit on a param value)."""
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``mlartifacts/`` beside a SQLite store; ``None`` (the
    server's or store's own default) otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()


def _numeric(value: Any) -> bool:
    """Whether ``value`` is a finite number MLflow can log as a metric (booleans are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


class Tracker:
    """A sweep's MLflow runs, through one client with explicit ids (no global MLflow state).

    One class because every call goes through the one client it holds (made lazily, never pickled):
    finding and opening runs (experiment, parent, children) and logging to them.

    Args:
        tracking_uri: the MLflow tracking URI (see :func:`resolve_tracking_uri`).
    """

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the URI only: the client is rebuilt lazily where the tracker lands."""
        return {"tracking_uri": self.tracking_uri, "_client": None}

    @property
    def client(self) -> MlflowClient:
        """The one :class:`mlflow.MlflowClient`, made on first use (mlflow is imported only then)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # ---------------------------------------------------------------- experiment and runs

    def experiment(self, name: str) -> str:
        """The id of experiment ``name``, created if needed (a local store's artifacts go beside the DB)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        return self.client.create_experiment(name, artifact_location=artifact_location(self.tracking_uri))

    def start_parent(
        self, experiment_id: str, name: str, *, run_id: str | None = None, tags: dict[str, str] | None = None
    ) -> str:
        """The sweep's parent run: ``run_id`` reopened (``--resume``) when it exists, else a new run."""
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except Exception:  # noqa: BLE001 - an unknown id (another store) just means a new run
                run = None
            if run is not None and run.info.experiment_id == experiment_id:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
        run = self.client.create_run(experiment_id, run_name=name, tags={KIND_TAG: "sweep", **(tags or {})})
        return run.info.run_id

    def find_child(self, experiment_id: str, parent_id: str, key: str) -> str | None:
        """The id of the parent's child run tagged with trial key ``key``, or ``None``."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{KEY_TAG}` = '{key}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def children(self, experiment_id: str, parent_id: str) -> list[Run]:
        """Every child run of the parent (all pages)."""
        out, token = [], None
        while True:
            page = self.client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                max_results=1000,
                page_token=token,
            )
            out += list(page)
            token = page.token
            if not token:
                return out

    def child(
        self,
        experiment_id: str,
        parent_id: str,
        key: str,
        *,
        run_name: str | None = None,
        kind: str = "trial",
        tags: dict[str, str] | None = None,
    ) -> str:
        """The child run for ``key`` under the parent: found again on resume, else created; set RUNNING."""
        run_id = self.find_child(experiment_id, parent_id, key)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            if tags:
                self.set_tags(run_id, tags)
            return run_id
        run = self.client.create_run(
            experiment_id,
            run_name=run_name or key,
            tags={PARENT_TAG: parent_id, KEY_TAG: key, KIND_TAG: kind, **(tags or {})},
        )
        return run.info.run_id

    # ---------------------------------------------------------------- logging

    def _log_batch(self, run_id: str, *, params: list | None = None, metrics: list | None = None) -> None:
        """Log params (100 per call) and metrics (1,000 per call) in batches: MLflow's limits per request."""
        params, metrics = params or [], metrics or []
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set tags in one batch, values as text cut to MLflow's tag limit."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, _param_value(v)[:8000]) for k, v in tags.items()])

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log (flattened) params; values already logged with the same value are skipped (resume)."""
        from mlflow.entities import Param

        have = self.client.get_run(run_id).data.params
        flat = {k: _param_value(v) for k, v in flatten(params).items()}
        self._log_batch(run_id, params=[Param(k, v) for k, v in flat.items() if have.get(k) != v])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Log finite numeric metrics at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if _numeric(v)])

    def log_series(self, run_id: str, name: str, values: Iterable[float], first_step: int = 1) -> None:
        """Log one metric over steps (e.g. the meta loss of every step), in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(name, float(v), now, first_step + i)
            for i, v in enumerate(values)
            if v is not None and math.isfinite(float(v))
        ]
        self._log_batch(run_id, metrics=batch)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a folder's contents under ``artifact_path``; a missing path is skipped."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_image_steps(self, run_id: str, folder: str | Path, key: str = "synthetic_images") -> int:
        """Log ``step_NNNNNN.png`` files as one image series (the UI's step slider); returns the count."""
        from PIL import Image

        files = sorted(Path(folder).glob("step_*.png"))
        for f in files:
            with Image.open(f) as img:
                self.client.log_image(run_id, img.convert("RGB"), key=key, step=int(f.stem.split("_")[1]))
        return len(files)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """End the run with ``status`` (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        self.client.set_terminated(run_id, status=status)

    def close_children(self, experiment_id: str, parent_id: str, status: str = "KILLED") -> list[str]:
        """End every child run of the parent still RUNNING (a trial or baseline a stop cut short) with
        ``status``; returns their ids."""
        open_runs = [r.info.run_id for r in self.children(experiment_id, parent_id) if r.info.status == "RUNNING"]
        for run_id in open_runs:
            self.finish(run_id, status)
        return open_runs

    def fail(self, run_id: str, error: str) -> None:
        """Mark a run FAILED with its error (tag ``error``, artifact ``error.txt``)."""
        self.set_tags(run_id, {"error": error[-7900:]})
        self.client.log_text(run_id, error, "error.txt")
        self.finish(run_id, "FAILED")
