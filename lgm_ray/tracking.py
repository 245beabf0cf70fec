"""MLflow for sweeps: one experiment per spec, a parent run per sweep, a child run per trial, and tables.

Everything goes through one :class:`mlflow.MlflowClient` with explicit experiment and run ids. The
fluent API (``mlflow.set_experiment``, ``mlflow.start_run``) is not used: ``set_experiment`` exports
``MLFLOW_EXPERIMENT_ID``, which every Ray process started afterwards inherits and which overrides the
experiment named to Ray's own MLflow helpers (DESIGN §5). Only the sweep's driver logs, so one
process writes the store — a SQLite file needs no locking across trials, and a tracking server bound
to the head node's loopback serves a whole cluster.

Where results go (:func:`resolve_tracking_uri`): ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else
the spec's ``mlflow.tracking_uri``, else ``sqlite:///mlflow.db`` in the working directory, whose
artifacts go to ``mlartifacts/`` beside it. ``mlflow ui --backend-store-uri sqlite:///mlflow.db``
shows them.

Runs:

* the parent run (tag ``lgm_ray.kind = sweep``): the resolved spec, the tables;
* one child per trial (``mlflow.parentRunId`` = the parent, ``lgm_ray.kind = trial``,
  ``lgm_ray.trial_key`` = the grid point): the resolved run config as params, the meta loss per
  step, images/s, top-1/top-5 mean and std per evaluation backbone, the synthetic set, its grids
  and the config as artifacts; FAILED with the error when the trial fails;
* one child per shared baseline (``lgm_ray.kind = baseline``).

Tables (:func:`results_frame`, :func:`cross_model_table`, :func:`ablation_table`): pure pandas over
result records; written as Markdown, Parquet and a heatmap PNG.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlflow.db"
KIND_TAG = "lgm_ray.kind"
KEY_TAG = "lgm_ray.trial_key"
PARENT_TAG = "mlflow.parentRunId"
METRIC_FIELDS = ("top1_mean", "top1_std", "top5_mean", "top5_std")
BASELINE_ORDER = ("centroids", "neighbors", "random", "full")


def resolve_tracking_uri(
    cli_uri: str | None = None, spec_uri: str | None = None, cwd: str | Path | None = None
) -> str:
    """The tracking URI: the flag, else ``MLFLOW_TRACKING_URI``, else the spec's, else SQLite in ``cwd``."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec_uri
    if uri:
        return uri
    return f"sqlite:///{Path(cwd or Path.cwd()).resolve() / DEFAULT_DB}"


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or "://" not in uri or uri.startswith("file:")


def ui_hint(uri: str) -> str:
    """Where to look at the results."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        rel = os.path.relpath(path) if path.is_absolute() else str(path)
        shown = f"sqlite:///{rel}" if not rel.startswith("..") else uri
        return f"mlflow ui --backend-store-uri {shown}   (then open http://127.0.0.1:5000)"
    return f"open {uri} (the MLflow tracking server)"


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


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

    Args:
        tracking_uri: the MLflow tracking URI (see :func:`resolve_tracking_uri`).
    """

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "_client": None}

    @property
    def client(self):
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
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            location = (
                Path(self.tracking_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts"
            ).as_uri()
        return self.client.create_experiment(name, artifact_location=location)

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
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{KEY_TAG}` = '{key}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def children(self, experiment_id: str, parent_id: str) -> list:
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

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, _param_value(v)[:8000]) for k, v in tags.items()])

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log (flattened) params; values already logged with the same value are skipped (resume)."""
        from mlflow.entities import Param

        have = self.client.get_run(run_id).data.params
        flat = {k: _param_value(v) for k, v in flatten(params).items()}
        new = [Param(k, v) for k, v in flat.items() if have.get(k) != v]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Log finite numeric metrics at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i : i + 1000])

    def log_series(self, run_id: str, name: str, values: Iterable[float], first_step: int = 1) -> None:
        """Log one metric over steps (e.g. the meta loss of every step), in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(name, float(v), now, first_step + i)
            for i, v in enumerate(values)
            if v is not None and math.isfinite(float(v))
        ]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i : i + 1000])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
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
        self.client.set_terminated(run_id, status=status)

    def fail(self, run_id: str, error: str) -> None:
        """Mark a run FAILED with its error (tag ``error``, artifact ``error.txt``)."""
        self.set_tags(run_id, {"error": error[-7900:]})
        self.client.log_text(run_id, error, "error.txt")
        self.finish(run_id, "FAILED")


# ---------------------------------------------------------------- tables


def results_frame(trials: list[dict[str, Any]], baselines: list[dict[str, Any]]):
    """One row per (training set, evaluation backbone): the long table behind every view.

    Args:
        trials: per trial ``{"dataset", "backbone", "ablation" (label), "seed", "evals": {eval
            backbone: evaluation result}, "neighbors": {eval backbone: result}}`` (results as
            :func:`lgm_ray.evaluate.evaluate` returns them).
        baselines: ``{"dataset", "baseline", "backbone" (evaluation), **evaluation result}``.

    Returns:
        DataFrame with ``dataset, training_set, distill_backbone, ablation, eval_backbone, top1_mean,
        top1_std, top5_mean, top5_std, n_values`` — distilled sets pooled over distillation seeds
        (mean and population std over every (distillation seed, probe seed) value).
    """
    import pandas as pd

    groups: dict[tuple, dict[str, list[float]]] = {}

    def add(key: tuple, res: dict[str, Any]) -> None:
        g = groups.setdefault(key, {"top1": [], "top5": []})
        g["top1"] += list(res.get("top1_per_seed") or [res["top1_mean"]])
        g["top5"] += list(res.get("top5_per_seed") or [res["top5_mean"]])

    for t in trials:
        for b, res in (t.get("evals") or {}).items():
            add((t["dataset"], "distilled", t["backbone"], t["ablation"], b), res)
        for b, res in (t.get("neighbors") or {}).items():
            add((t["dataset"], "neighbors", t["backbone"], t["ablation"], b), res)
    for r in baselines:
        add((r["dataset"], r["baseline"], "", "", r["backbone"]), r)
    rows = []
    for (ds, kind, src, abl, b), g in groups.items():
        m1, s1 = _mean_std(g["top1"])
        m5, s5 = _mean_std(g["top5"])
        rows.append(
            {
                "dataset": ds,
                "training_set": kind,
                "distill_backbone": src,
                "ablation": abl,
                "eval_backbone": b,
                "top1_mean": m1,
                "top1_std": s1,
                "top5_mean": m5,
                "top5_std": s5,
                "n_values": len(g["top1"]),
            }
        )
    cols = [
        "dataset",
        "training_set",
        "distill_backbone",
        "ablation",
        "eval_backbone",
        *METRIC_FIELDS,
        "n_values",
    ]
    return pd.DataFrame(rows, columns=cols)


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


def cross_model_table(frame, dataset: str, eval_backbones: list[str], metric: str = "top1"):
    """The cross-model table of one dataset: rows training sets, columns evaluation backbones, + avg.

    Rows: ``distilled: BACKBONE`` (``[ablation]`` appended when the sweep has several ablation
    points), then the baselines in the paper's order (centroids, neighbors, random, full; a
    ``neighbors`` row picks, for column B, the neighbours of the set distilled with B). Cells hold the
    mean; a second frame of the same shape holds the std.

    Returns:
        ``(means, stds)`` DataFrames indexed by row label.
    """
    import pandas as pd

    f = frame[frame["dataset"] == dataset]
    several = f[f["training_set"] == "distilled"]["ablation"].nunique() > 1
    means: dict[str, dict[str, float]] = {}
    stds: dict[str, dict[str, float]] = {}

    def put(label: str, b: str, row) -> None:
        means.setdefault(label, {})[b] = row[f"{metric}_mean"]
        stds.setdefault(label, {})[b] = row[f"{metric}_std"]

    for _, row in f[f["training_set"] == "distilled"].iterrows():
        label = f"distilled: {row['distill_backbone']}" + (f" [{row['ablation']}]" if several else "")
        put(label, row["eval_backbone"], row)
    for kind in BASELINE_ORDER:
        for _, row in f[f["training_set"] == kind].iterrows():
            if kind == "neighbors":
                if row["distill_backbone"] != row["eval_backbone"]:
                    continue
                label = "neighbors" + (f" [{row['ablation']}]" if several else "")
            else:
                label = kind
            put(label, row["eval_backbone"], row)
    cols = list(eval_backbones)
    m = pd.DataFrame.from_dict(means, orient="index").reindex(columns=cols)
    s = pd.DataFrame.from_dict(stds, orient="index").reindex(columns=cols)
    m["avg"] = m[cols].mean(axis=1, skipna=True)
    s["avg"] = float("nan")
    m.index.name = s.index.name = "training set"
    return m, s


def ablation_table(frame, dataset: str, metric: str = "top1", distill_backbones: list[str] | None = None):
    """Same-model and cross-model averages per ablation point (the paper's ImageNet-100 ablation table).

    Same-model: mean over distillation backbones B of the set distilled with B evaluated on B.
    Cross-model: mean over pairs (A, B), A ≠ B. NaN where the sweep has no such pair.
    ``distill_backbones``: average over these distillation backbones only (those ablated at every
    point), so that every row averages the same backbones.
    """
    import pandas as pd

    f = frame[(frame["dataset"] == dataset) & (frame["training_set"] == "distilled")]
    if distill_backbones is not None:
        f = f[f["distill_backbone"].isin(distill_backbones)]
    rows = {}
    for label, g in f.groupby("ablation", sort=False):
        same = g[g["distill_backbone"] == g["eval_backbone"]][f"{metric}_mean"]
        cross = g[g["distill_backbone"] != g["eval_backbone"]][f"{metric}_mean"]
        rows[label] = {
            "same-model": same.mean() if len(same) else float("nan"),
            "cross-model": cross.mean() if len(cross) else float("nan"),
        }
    out = pd.DataFrame.from_dict(rows, orient="index", columns=["same-model", "cross-model"])
    out.index.name = "ablation"
    return out


def _cell(mean: float, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def to_markdown(means, stds=None, title: str | None = None) -> str:
    """A Markdown table of a (means[, stds]) frame pair: ``mean ± std`` cells, ``—`` for missing."""
    head = [means.index.name or "", *map(str, means.columns)]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, row in means.iterrows():
        cells = [_cell(row[c], None if stds is None else stds.loc[label, c]) for c in means.columns]
        lines.append("| " + " | ".join([str(label), *cells]) + " |")
    return "\n".join(lines) + "\n"


def heatmap_png(means, path: str | Path, title: str = "", unit: str = "top-1 (%)", *, stds=None) -> Path:
    """A heatmap of a means frame (rows × columns), each cell annotated (``mean ± std`` when ``stds``, a
    frame of the same shape, is given), sized to its labels; written atomically. The MLflow tables and
    the report draw with it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = means.to_numpy(dtype=float)
    n_r, n_c = values.shape
    label_in = 0.3 + 0.06 * max([len(str(r)) for r in means.index] + [4])
    width, height = label_in + 1.2 * n_c + 1.3, 1.5 + 0.36 * n_r
    fig, ax = plt.subplots(figsize=(width, height), dpi=110 if n_r <= 30 else 72)
    # fixed margins from the labels' length: tight_layout would draw a 100-row table twice
    fig.subplots_adjust(left=label_in / width, right=1 - 1.3 / width, bottom=1.0 / height, top=1 - 0.45 / height)
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_xticks(range(n_c), [str(c) for c in means.columns], rotation=25, ha="right", fontsize=8)
    ax.set_yticks(range(n_r), [str(r) for r in means.index], fontsize=8)
    finite = values[np.isfinite(values)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(n_r):
        for j in range(n_c):
            if math.isfinite(values[i, j]):
                sd = stds.iloc[i, j] if stds is not None else float("nan")
                text = f"{values[i, j]:.1f}" + (f"\n± {sd:.1f}" if math.isfinite(sd) else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="k" if values[i, j] > mid else "w")
    fig.colorbar(im, cax=fig.add_axes((1 - 1.1 / width, 1.0 / height, 0.15 / width, 1 - 1.45 / height)), label=unit)
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_tables(
    frame,
    datasets: list[str],
    eval_backbones: list[str],
    out_dir: str | Path,
    with_ablation: bool,
    ablation_backbones: list[str] | None = None,
) -> tuple[str, list[Path]]:
    """Write every table of a sweep to ``out_dir`` (Markdown, Parquet, heatmap PNG).

    ``ablation_backbones``: passed to :func:`ablation_table`.

    Returns:
        ``(markdown, files)``: the Markdown of every table (what the command prints) and the files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out / "results.parquet", index=False)
    files = [out / "results.parquet"]
    text = []
    for ds in datasets:
        means, stds = cross_model_table(frame, ds, eval_backbones)
        if means.empty:
            continue
        title = f"{ds}: cross-model linear-probe top-1 (%) — rows: training set, columns: evaluation backbone"
        md = to_markdown(means, stds, title)
        text.append(md)
        (out / f"cross_model_{ds}.md").write_text(md)
        wide = means.add_suffix("_mean").join(stds.add_suffix("_std")).reset_index()
        wide.to_parquet(out / f"cross_model_{ds}.parquet", index=False)
        files += [
            out / f"cross_model_{ds}.md",
            out / f"cross_model_{ds}.parquet",
            heatmap_png(means, out / f"cross_model_{ds}.png", f"{ds}: cross-model top-1 (%)"),
        ]
        if with_ablation:
            abl = ablation_table(frame, ds, distill_backbones=ablation_backbones)
            if not abl.empty:
                md = to_markdown(abl, None, f"{ds}: ablation, mean top-1 (%) same-model / cross-model")
                text.append(md)
                (out / f"ablation_{ds}.md").write_text(md)
                abl.reset_index().to_parquet(out / f"ablation_{ds}.parquet", index=False)
                files += [
                    out / f"ablation_{ds}.md",
                    out / f"ablation_{ds}.parquet",
                    heatmap_png(abl, out / f"ablation_{ds}.png", f"{ds}: ablation top-1 (%)"),
                ]
    return "\n".join(text), files
