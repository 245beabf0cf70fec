"""A sweep's report: one static HTML page and the same figures as MLflow artifacts of the parent run.

``python -m lgm_ray.report SWEEP_DIR_OR_MLFLOW_EXPERIMENT --out report/ [--tracking-uri URI]``
(the sweep calls :func:`build_report` at its end). What a researcher looks at (Cazenavette et al.,
NeurIPS 2025):

* the **gallery**: the distilled images, one row per class, one column per (ablation, distillation
  backbone, seed) — the same class across backbones side by side, its name under each image, each
  image a link to its full-size file;
* the **evolution** of every set over steps (the pyramid's coarse-to-fine growth), from the
  ``grids/step_NNNNNNN.png`` the run saved along the way;
* the **cross-model table** (distillation backbone × evaluation backbone, top-1 mean ± std,
  baselines as extra rows) as a table and heatmap, the **ablation table**, and the paper's numbers
  beside them when the spec's ``paper`` field names them;
* the **meta-loss curves** of all trials on one plot;
* an **embedding map** per set with its **periphery numbers** (:mod:`lgm_ray.report.embedding`).

The page needs no server and loads nothing from elsewhere: no scripts, no fonts, every picture an
embedded compressed thumbnail (WebP data URI) linking to the full-size file under ``out/images`` or
``out/figures``. Every figure is written to ``out/figures`` as PNG plus the data behind it as Parquet,
and logged to the sweep's MLflow parent run under ``report/`` (the page too); each trial's embedding
map and periphery numbers also go to its child run.

Sources: a sweep folder (``storage/NAME``, :class:`lgm_ray.results.folder.SweepFolder`'s layout, each
trial's run folder a :class:`lgm_ray.distill.run_folder.RunFolder`), or an MLflow experiment name (or id):
its newest sweep parent run (or ``--parent-run``), whose child runs' artifacts are downloaded. A sweep still
running gives a report of what has finished so far.

This module holds the entry point (:func:`build_report`; the command is :mod:`lgm_ray.report.__main__`) and
the MLflow logging; the work is in :mod:`lgm_ray.report.load` (the sweep from either source),
:mod:`lgm_ray.report.frames` (the sweep's tables, from :mod:`lgm_ray.results.tables`), :mod:`lgm_ray.report.figures` (PNG
figures and embedded thumbnails), :mod:`lgm_ray.report.sections` (one renderer per section of the page) and
:mod:`lgm_ray.report.page` (the page around them).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from lgm_ray.common.atomic import write_text
from lgm_ray.evaluate.config import EVAL_SPLITS
from lgm_ray.report.context import Figure, ReportContext
from lgm_ray.report.embedding import PROJECTIONS
from lgm_ray.report.load import ReportError, Sweep, load_mlflow, load_sweep_dir
from lgm_ray.report.page import render_page

__all__ = ["build_report", "log_report", "page_size"]

MARKER = ".lgm_ray_report"


# ---------------------------------------------------------------- MLflow


def log_report(sweep: Sweep, out: Path, figures: list[Figure], child_metrics: dict[str, dict[str, float]],
               tracking_uri: str | None = None) -> bool:
    """Log the page and every figure (PNG + Parquet) to the parent run under ``report/``; each trial's
    embedding map, periphery numbers and metrics to its child run. Returns whether anything was logged."""
    uri = tracking_uri or sweep.tracking_uri
    if not uri or not sweep.parent_run_id:
        return False
    from mlflow import MlflowClient

    from lgm_ray.results.tracking import Tracker

    client = MlflowClient(tracking_uri=uri)
    parent = sweep.parent_run_id
    for f in figures:
        for path in (f.png, f.data):
            if path is None or not path.exists():
                continue
            sub = path.parent.relative_to(out).as_posix()
            client.log_artifact(parent, str(path), f"report/{sub}")
    client.log_artifact(parent, str(out / "index.html"), "report")
    tracker = Tracker(uri)
    runs: dict[str, str | None] = {}

    def run_of(key: str) -> str | None:
        if key not in runs:
            t = next((t for t in sweep.trials if t.key == key), None)
            runs[key] = (t.run_id if t and t.run_id else tracker.find_child(sweep.experiment_id, parent, key)
                         if sweep.experiment_id else None)
        return runs[key]

    for f in figures:
        if f.trial and run_of(f.trial):
            for path in (f.png, f.data):
                if path is not None and path.exists():
                    client.log_artifact(run_of(f.trial), str(path), "report")
    for key, metrics in child_metrics.items():
        if run_of(key):
            tracker.log_metrics(run_of(key), metrics)
    return True


# ---------------------------------------------------------------- entry points


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ReportError(f"{out} holds other files: give an empty or new folder (a report folder is "
                          f"rebuilt in place)")
    for sub in ("figures", "images"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python -m lgm_ray.report; rebuilt in place\n")


def _check_options(projection: str, split: str) -> None:
    if projection not in PROJECTIONS:
        raise ReportError(f"projection {projection!r}: choose one of {', '.join(PROJECTIONS)}")
    if split not in EVAL_SPLITS:
        raise ReportError(f"split {split!r}: choose one of {', '.join(EVAL_SPLITS)}")


def _load(source: str | Path, tracking_uri: str | None, parent_run: str | None, work: str) -> Sweep:
    """The sweep of a sweep folder, else of an MLflow experiment (its artifacts downloaded under ``work``)."""
    if Path(source).is_dir():
        sweep = load_sweep_dir(source)
        if tracking_uri:
            sweep.tracking_uri = tracking_uri
        return sweep
    from lgm_ray.results.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ReportError(f"{source!r} is not a sweep folder, and there is no MLflow store at {uri} to look "
                          f"for an experiment of that name; give storage/NAME of a sweep, or "
                          f"--tracking-uri of the store")
    return load_mlflow(str(source), uri, work, parent_run)


def _log(ctx: ReportContext) -> None:
    """:func:`log_report`, a failure of which is a warning (the page is the product)."""
    try:
        if not log_report(ctx.sweep, ctx.out, ctx.figures, ctx.child_metrics, ctx.sweep.tracking_uri):
            print("[lgm_ray.report] no MLflow parent run known: figures not logged", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - the page is the product; MLflow trouble is a warning
        print(f"[lgm_ray.report] warning: logging the report to MLflow failed: {exc!r}", file=sys.stderr)


def build_report(source: str | Path, out: str | Path, tracking_uri: str | None = None, *,
                 parent_run: str | None = None, embeddings: bool = True, projection: str = "pca",
                 split: str = "test", device: str = "cpu", cache_dir: str | Path | None = None,
                 log_mlflow: bool = True, thumb_px: int = 96, max_classes: int = 100, max_steps: int = 10,
                 evolution_classes: int = 10) -> Path:
    """Build the report of a sweep; returns the path of ``index.html``.

    Args:
        source: a sweep folder (``storage/NAME``) or an MLflow experiment name / id.
        out: the report folder (created; a previous report there is rebuilt).
        tracking_uri: MLflow tracking URI; default: the sweep folder's (``sweep_state.json``), else
            ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here (for an experiment name).
        parent_run: the sweep's parent run (an experiment source; default: the newest).
        embeddings: draw embedding maps and compute periphery numbers (needs the shards and the
            backbones; reads the sweep's feature cache).
        projection: ``pca`` or ``tsne``.
        split: the split whose real features the maps show (``test`` or ``val``).
        device: where the backbones run for the embedding maps.
        cache_dir: feature cache (default: the sweep's ``feature_cache/``, else the user's cache).
        log_mlflow: log every figure to the parent run (and maps to the child runs); a logging failure
            is a warning, the report is still written.
        thumb_px: largest side of the gallery's embedded thumbnails.
        max_classes: the gallery shows at most this many classes per dataset (the first).
        max_steps: the evolution shows at most this many steps per set.
        evolution_classes: the evolution strips show the first this many classes.

    Raises:
        ReportError: the source is neither, or ``out`` holds other files.
    """
    _check_options(projection, split)
    out = Path(out)
    _prepare_out(out)
    with tempfile.TemporaryDirectory(prefix="lgm_ray_report_") as tmp:
        sweep = _load(source, tracking_uri, parent_run, tmp)
        ctx = ReportContext(sweep, out, embeddings=embeddings, projection=projection, split=split, device=device,
                            cache_dir=Path(cache_dir) if cache_dir else None, thumb_px=thumb_px,
                            max_classes=max_classes, max_steps=max_steps, evolution_classes=evolution_classes)
        page = render_page(ctx)
    index = out / "index.html"
    write_text(index, page)
    if log_mlflow:
        _log(ctx)
    return index


def page_size(out: str | Path) -> int:
    """Bytes of the page (``index.html``, with its embedded thumbnails and figures)."""
    return (Path(out) / "index.html").stat().st_size






