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
* an **embedding map** per set with its **periphery numbers** (:mod:`lgm_ray.embedding`).

The page needs no server and loads nothing from elsewhere: no scripts, no fonts, every picture an
embedded compressed thumbnail (WebP data URI) linking to the full-size file under ``out/images`` or
``out/figures``. Every figure is written to ``out/figures`` as PNG plus the data behind it as Parquet,
and logged to the sweep's MLflow parent run under ``report/`` (the page too); each trial's embedding
map and periphery numbers also go to its child run.

Sources: a sweep folder (``storage/NAME``, :mod:`lgm_ray.sweep`'s layout: ``spec.yaml``,
``sweep_state.json``, ``trials.json``, ``<trial>/run/{synset.pt, grid.png, grids/, config.yaml,
result.json, error.txt}``, ``baselines/*.json``, ``feature_cache/``), or an MLflow experiment name (or
id): its newest sweep parent run (or ``--parent-run``), whose child runs' artifacts are downloaded. A
sweep still running gives a report of what has finished so far.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

MARKER = ".lgm_ray_report"
RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"
POINTS_FILE = "trials.json"
PERIPHERY_METRICS = ("median_percentile", "frac_periphery", "frac_outside", "median_distance_ratio",
                     "mean_margin", "frac_negative_margin")


class ReportError(ValueError):
    """A report that cannot be built from what was given; the message names the problem and the fix."""


# ---------------------------------------------------------------- the sweep, from a folder or MLflow


@dataclass
class Trial:
    """One grid point as the report sees it.

    Attributes:
        key: the grid point's name (its folder, its MLflow child run's ``lgm_ray.trial_key``).
        dataset, backbone, ablation, seed: the point (``ablation`` is its label, ``default`` for none).
        status: ``finished``, ``failed`` or ``unfinished``.
        run_dir: a folder holding its ``synset.pt``, ``grid.png``, ``grids/``, ``config.yaml``.
        result: its ``result.json`` (evaluations, summary with the per-step losses), when finished.
        error: the last line of its error, when failed.
        run_id: its MLflow child run, when known.
    """

    key: str
    dataset: str
    backbone: str
    ablation: str
    seed: int
    status: str
    run_dir: Path | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.backbone} · {self.ablation} · seed {self.seed}"


@dataclass
class Sweep:
    """Everything the report reads, whatever the source."""

    name: str
    spec: dict[str, Any]
    trials: list[Trial]
    baselines: list[dict[str, Any]]
    source: str
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    cache_dir: Path | None = None

    @property
    def datasets(self) -> list[str]:
        named = list((self.spec.get("datasets") or {}).keys())
        return named + sorted({t.dataset for t in self.trials} - set(named))

    @property
    def eval_backbones(self) -> list[str]:
        named = list(self.spec.get("eval_backbones") or [])
        seen = {b for t in self.trials if t.result for b in t.result.get("evals", {})}
        return named + sorted(seen - set(named))

    @property
    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.status == "finished"]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def _ablation_labels(spec: dict[str, Any]) -> list[str]:
    from lgm_ray.sweep_spec import ablation_label

    return [ablation_label(p or {}) for p in spec.get("ablations") or [{}]]


def _point_of(key: str, cfg: dict[str, Any], spec: dict[str, Any]) -> tuple[str, str, str, int]:
    """dataset, backbone, ablation label and seed of a trial with no result, from its config and the spec."""
    from lgm_ray.sweep_spec import ablation_label

    datasets = spec.get("datasets") or {}
    dataset = next((n for n, d in datasets.items() if (d or {}).get("shards") == cfg.get("shards")),
                   key.split("-")[0])
    ablation = next((ablation_label(p) for p in spec.get("ablations") or [] if p and
                     all(cfg.get(k) == v for k, v in p.items())), "default")
    return dataset, str(cfg.get("backbone", "?")), ablation, int(cfg.get("seed", 0))


def _trial(key: str, run_dir: Path, spec: dict[str, Any], status: str | None = None,
           error: str | None = None, run_id: str | None = None, grid_point: dict | None = None) -> Trial:
    from lgm_ray.sweep_spec import ablation_label

    result = json.loads((run_dir / RESULT_FILE).read_text()) if (run_dir / RESULT_FILE).is_file() else None
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    if error is None and (run_dir / ERROR_FILE).is_file():
        error = _last_line((run_dir / ERROR_FILE).read_text())
    if result is not None:
        point = (result["dataset"], result["backbone"], result.get("ablation") or "default", int(result["seed"]))
    elif grid_point is not None:
        point = (grid_point["dataset"], grid_point["backbone"], ablation_label(grid_point.get("ablation") or {}),
                 int(grid_point.get("seed", 0)))
    else:
        point = _point_of(key, cfg or {}, spec)
    status = status or ("finished" if result else "failed" if error else "unfinished")
    return Trial(key, *point, status=status, run_dir=run_dir, result=result, error=error, run_id=run_id,
                 config=cfg or {})


def _order(sweep: Sweep) -> None:
    spec = sweep.spec
    ds = sweep.datasets
    bb = list(spec.get("backbones") or [])
    ab = _ablation_labels(spec)

    def rank(values: list, v) -> int:
        return values.index(v) if v in values else len(values)

    sweep.trials.sort(key=lambda t: (rank(ds, t.dataset), rank(ab, t.ablation), rank(bb, t.backbone), t.backbone,
                                     t.seed, t.key))


def load_sweep_dir(path: str | Path) -> Sweep:
    """A sweep folder as :mod:`lgm_ray.sweep` writes it."""
    root = Path(path)
    if not (root / "spec.yaml").is_file():
        raise ReportError(f"{root} is not a sweep folder (no spec.yaml): give storage/NAME of a sweep, "
                          f"or an MLflow experiment name")
    spec = yaml.safe_load((root / "spec.yaml").read_text()) or {}
    state = json.loads((root / "sweep_state.json").read_text()) if (root / "sweep_state.json").is_file() else {}
    # the grid (trials.json, written by the sweep's driver), then any other run folder
    points = json.loads((root / POINTS_FILE).read_text()) if (root / POINTS_FILE).is_file() else {}
    keys = list(points) + [d.parent.name for d in sorted(root.glob("*/run")) if d.is_dir() and d.parent.name
                           not in points]
    trials = [_trial(k, root / k / "run", spec, grid_point=points.get(k)) for k in keys]
    baselines = [json.loads(f.read_text()) for f in sorted((root / "baselines").glob("*.json"))]
    sweep = Sweep(spec.get("name") or root.name, spec, trials, baselines, str(root), state.get("tracking_uri"),
                  state.get("experiment_id"), state.get("parent_run_id"), root / "feature_cache")
    _order(sweep)
    return sweep


TRIAL_ARTIFACTS = ("result.json", "synset.pt", "grid.png", "config.yaml", "grids")


def load_mlflow(experiment: str, tracking_uri: str, work_dir: str | Path, parent_run: str | None = None) -> Sweep:
    """A sweep from MLflow: the experiment's newest sweep parent run (or ``parent_run``) and its children.

    The trials' artifacts (``result.json``, ``synset.pt``, ``grid.png``, ``config.yaml``, ``grids/``)
    are downloaded under ``work_dir``; baselines are read from their child runs' tags and metrics.
    """
    from mlflow import MlflowClient

    from lgm_ray.tracking import KEY_TAG, KIND_TAG, Tracker

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        try:
            exp = client.get_experiment(experiment)
        except Exception:  # noqa: BLE001 - an unknown id is reported below
            exp = None
    if exp is None:
        raise ReportError(f"{experiment!r} is neither a sweep folder nor an MLflow experiment at {tracking_uri}; "
                          f"give storage/NAME of a sweep, or pass the right --tracking-uri")
    if parent_run is None:
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ReportError(f"MLflow experiment {exp.name!r} has no sweep run (tag {KIND_TAG} = sweep); "
                              f"run `python -m lgm_ray.sweep SPEC` first")
        parent_run = runs[0].info.run_id
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {}
    if any(a.path == "spec.yaml" for a in client.list_artifacts(parent_run)):
        spec = yaml.safe_load(Path(client.download_artifacts(parent_run, "spec.yaml", str(work))).read_text()) or {}
    trials, baselines = [], []
    for run in Tracker(tracking_uri).children(exp.experiment_id, parent_run):
        tags, kind = run.data.tags, run.data.tags.get(KIND_TAG)
        if kind == "baseline" and run.info.status == "FINISHED":
            baselines.append({"dataset": tags.get("dataset"), "baseline": tags.get("baseline"),
                              "backbone": tags.get("eval_backbone"), **run.data.metrics})
        elif kind == "trial":
            key = tags.get(KEY_TAG) or run.info.run_name
            run_dir = work / "trials" / key
            run_dir.mkdir(parents=True, exist_ok=True)
            have = {a.path for a in client.list_artifacts(run.info.run_id)}
            for name in TRIAL_ARTIFACTS:
                if name in have:
                    client.download_artifacts(run.info.run_id, name, str(run_dir))
            status = {"FINISHED": None, "FAILED": "failed"}.get(run.info.status, "unfinished")
            error = _last_line(tags["error"]) if tags.get("error") else None
            t = _trial(key, run_dir, spec, status=status, error=error, run_id=run.info.run_id)
            if t.status == "finished" and t.result is None:
                t.status = "unfinished"
            trials.append(t)
    sweep = Sweep(spec.get("name") or exp.name, spec, trials, baselines, f"{tracking_uri} · experiment {exp.name}",
                  tracking_uri, exp.experiment_id, parent_run)
    _order(sweep)
    return sweep


# ---------------------------------------------------------------- tables


def results(sweep: Sweep):
    """The long results frame (:func:`lgm_ray.tracking.results_frame`) of the finished trials and baselines.

    Baseline rows take the mean and std as recorded (a baseline child run in MLflow holds no per-seed values).
    """
    import pandas as pd

    from lgm_ray.tracking import METRIC_FIELDS, results_frame

    frame = results_frame([t.result for t in sweep.finished], [])
    rows = [{"dataset": b["dataset"], "training_set": b["baseline"], "distill_backbone": "", "ablation": "",
             "eval_backbone": b["backbone"], **{m: float(b.get(m, float("nan"))) for m in METRIC_FIELDS},
             "n_values": len(b.get("top1_per_seed") or []) or None} for b in sweep.baselines]
    if rows:
        frame = pd.concat([frame, pd.DataFrame(rows, columns=frame.columns)], ignore_index=True)
    return frame


def _paper_rows(paper: Any) -> tuple[list[str], dict[str, list[float]]] | None:
    if not isinstance(paper, dict) or not isinstance(paper.get("columns"), list):
        return None
    rows = {str(k): v for k, v in paper.items() if k != "columns" and isinstance(v, list)
            and len(v) == len(paper["columns"])}
    return [str(c) for c in paper["columns"]], rows


def paper_comparison(paper: Any, means, ablation) -> Any:
    """Ours beside the paper's numbers, for the table the spec's ``paper`` field names.

    ``paper``: ``{columns: [...], ROW: [values], ...}``. Columns ``[same-model, cross-model]`` name the
    ablation table (rows: ablation labels); otherwise a cross-model table (columns: evaluation
    backbones and ``avg``; row ``distilled``: each column the set distilled with that backbone —
    our same-model diagonal; other rows: the baselines).

    Returns:
        DataFrame ``table, row, column, ours, paper, delta`` (``ours`` NaN where the sweep has no such
        cell), or ``None`` when ``paper`` has no such form.
    """
    import pandas as pd

    parsed = _paper_rows(paper)
    if parsed is None:
        return None
    cols, rows = parsed
    out = []
    is_ablation = set(cols) == {"same-model", "cross-model"}

    def cell(frame, row: str, col: str) -> float:
        if frame is None or col not in frame.columns:
            return float("nan")
        hits = [r for r in frame.index if r == row or r.startswith(row + " [default]")]
        return float(frame.loc[hits[0], col]) if hits else float("nan")

    for row, values in rows.items():
        ours_row = {}
        for col in cols:
            if is_ablation:
                ours_row[col] = cell(ablation, row, col)
            elif row == "distilled" and col != "avg":
                ours_row[col] = cell(means, f"distilled: {col}", col)
            elif col != "avg":
                ours_row[col] = cell(means, row, col)
        if not is_ablation and "avg" in cols:
            got = [ours_row[c] for c in cols if c != "avg"]
            ours_row["avg"] = float(np.mean(got)) if got and not any(math.isnan(v) for v in got) else float("nan")
        for col, p in zip(cols, values, strict=True):
            o = ours_row[col]
            out.append({"table": "ablation" if is_ablation else "cross-model", "row": row, "column": col,
                        "ours": o, "paper": float(p), "delta": o - float(p)})
    return pd.DataFrame(out, columns=["table", "row", "column", "ours", "paper", "delta"])


# ---------------------------------------------------------------- pictures


def _pil(img: np.ndarray):
    from PIL import Image

    a = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a.transpose(1, 2, 0)
    a = (a * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a)


def data_uri(im, max_side: int | None = None, quality: int = 80) -> str:
    """A compressed (lossy) WebP data URI of a PIL image, shrunk to ``max_side``."""
    from PIL import Image

    im = im.convert("RGB")
    if max_side and max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="WEBP", quality=quality, method=4)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()


def file_uri(path: Path, max_side: int, quality: int = 82) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return data_uri(im, max_side, quality)


def crop_grid(path: Path, n_classes: int, keep: int):
    """The first ``keep`` class columns of a ``save_grid`` image (padding 2, one column per class)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if n_classes <= keep:
            return im.copy()
        cell = (im.size[0] - 2) // n_classes
        return im.crop((0, 0, 2 + keep * cell, im.size[1]))


def _step_of(path: Path) -> int:
    return int(path.stem.split("_")[-1])


def pick_steps(files: list[Path], max_steps: int) -> list[Path]:
    """At most ``max_steps`` of the step grids, evenly spread, the first and the last always in."""
    files = sorted(files, key=_step_of)
    if len(files) <= max_steps:
        return files
    idx = sorted({round(i * (len(files) - 1) / (max_steps - 1)) for i in range(max_steps)})
    return [files[i] for i in idx]


def _save_png(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def loss_curves_png(sweep: Sweep, path: Path):
    """Meta loss over steps, every finished trial on one plot; returns the data as a long frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    rows = []
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=110)
    backbones = sorted({t.backbone for t in sweep.trials})
    ablations = _ablation_labels(sweep.spec)
    styles = ["-", "--", ":", "-."]
    cmap = plt.get_cmap("tab10")
    trials = [t for t in sweep.finished if (t.result.get("summary") or {}).get("losses")]
    for t in trials:
        losses = [float(v) if v is not None else float("nan") for v in t.result["summary"]["losses"]]
        steps = np.arange(1, len(losses) + 1)
        rows += [{"trial": t.key, "dataset": t.dataset, "backbone": t.backbone, "ablation": t.ablation,
                  "seed": t.seed, "step": int(s), "meta_loss": v} for s, v in zip(steps, losses, strict=True)]
        a = ablations.index(t.ablation) if t.ablation in ablations else 0
        ax.plot(steps, losses, lw=1.0, alpha=0.85, color=cmap(backbones.index(t.backbone) % 10),
                ls=styles[a % len(styles)], label=f"{t.dataset} · {t.label}")
    ax.set_xlabel("step")
    ax.set_ylabel("meta loss  1 − cos(G_real, G_syn)")
    ax.set_title(f"{sweep.name}: meta loss of {len(trials)} trials")
    ax.grid(alpha=0.3)
    if 0 < len(trials) <= 16:
        ax.legend(fontsize=7, loc="upper right")
    elif trials:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=cmap(i % 10), label=b) for i, b in enumerate(backbones)]
        if len(ablations) <= len(styles):
            handles += [Line2D([], [], color="k", ls=styles[i], label=a) for i, a in enumerate(ablations)]
        ax.legend(handles=handles, fontsize=7, loc="upper right")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return pd.DataFrame(rows, columns=["trial", "dataset", "backbone", "ablation", "seed", "step", "meta_loss"])


def gallery_png(cells: list[list[Any]], row_labels: list[str], col_labels: list[str], path: Path,
                title: str, cell_px: int = 64) -> Path:
    """A mosaic: rows × columns of images (PIL or ``None``), class names on the left, column labels
    written upwards on top; one PNG (PIL: a 100-column mosaic in well under a second)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    step = cell_px + 4
    left = 12 + max([int(font.getlength(r)) for r in row_labels] + [20])
    top = 30 + max([int(font.getlength(c)) for c in col_labels] + [20])
    canvas = Image.new("RGB", (left + len(col_labels) * step + 8, top + len(row_labels) * step + 8), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), title, fill="black", font=font)
    for j, label in enumerate(col_labels):
        text = Image.new("RGB", (int(font.getlength(label)) + 4, 16), "white")
        ImageDraw.Draw(text).text((2, 1), label, fill="black", font=font)
        text = text.rotate(90, expand=True)
        canvas.paste(text, (left + j * step + (step - text.size[0]) // 2, top - 4 - text.size[1]))
    for i, (label, row) in enumerate(zip(row_labels, cells, strict=True)):
        draw.text((6, top + i * step + step // 2 - 7), label, fill="black", font=font)
        for j, im in enumerate(row):
            if im is not None:
                fit = Image.Resampling.LANCZOS if max(im.size) > cell_px else Image.Resampling.NEAREST
                canvas.paste(im.convert("RGB").resize((cell_px, cell_px), fit), (left + j * step + 2, top + i * step + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def evolution_png(strips: list[tuple[int, Any]], path: Path, title: str) -> Path:
    """The step grids of one set stacked top to bottom, each labelled with its step (PIL)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    label_w = 90
    width = label_w + max(im.size[0] for _, im in strips)
    height = 22 + sum(im.size[1] + 4 for _, im in strips)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="black", font=font)
    y = 22
    for step, im in strips:
        draw.text((4, y + im.size[1] // 2 - 7), f"step {step}", fill="black", font=font)
        canvas.paste(im, (label_w, y))
        y += im.size[1] + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ---------------------------------------------------------------- HTML


CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1400px;padding:0 18px 60px;
color:#222}
h1{margin:18px 0 4px}h2{border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:34px}h3{margin:22px 0 6px}
.meta{color:#555}nav a{margin-right:14px}
table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:center;
vertical-align:top}th{background:#f4f4f4;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums;
white-space:nowrap}th.row{text-align:left}
.scroll{overflow-x:auto;max-width:100%}
figure{display:inline-block;margin:2px 3px;text-align:center}figcaption{font-size:12px;color:#333;max-width:120px;
overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.gallery img{width:var(--thumb);height:var(--thumb);object-fit:contain;image-rendering:pixelated;background:#eee}
.evo figure{display:flex;align-items:center;gap:10px;margin:3px 0}.evo figcaption{width:90px;text-align:right}
.evo img{height:60px;image-rendering:pixelated}.evo-links{margin:4px 0}
img.fig{max-width:100%;height:auto;border:1px solid #eee}
.pair{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.bad{color:#b00}.good{color:#070}.note{color:#666;font-size:13px}details{margin:6px 0}summary{cursor:pointer}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any, digits: int = 2) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    return "—" if math.isnan(f) else f"{f:.{digits}f}"


def _pm(mean: Any, std: Any) -> str:
    m, s = _num(mean), _num(std)
    return m if m == "—" or s == "—" else f"{m} ± {s}"


def _frame_html(frame, std=None, index_name: str | None = None, digits: int = 2) -> str:
    """A (means[, stds]) frame as an HTML table; ``mean ± std`` cells."""
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    rows = []
    for label, row in frame.iterrows():
        cells = []
        for c in frame.columns:
            v = row[c]
            if std is not None and c in std.columns:
                text = _pm(v, std.loc[label, c])
            elif isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool):
                text = _num(v, digits)
            else:
                text = _e(v)
            cells.append(f'<td class="num">{text}</td>')
        rows.append(f'<tr><th class="row">{_e(label)}</th>{"".join(cells)}</tr>')
    name = index_name if index_name is not None else (frame.index.name or "")
    return (f'<div class="scroll"><table><thead><tr><th>{_e(name)}</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _paper_html(cmp) -> str:
    cols = list(dict.fromkeys(cmp["column"]))
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for row, g in cmp.groupby("row", sort=False):
        by = g.set_index("column")
        cells = "".join(
            f'<td class="num">{_num(by.loc[c, "ours"])} / {_num(by.loc[c, "paper"], 1)}'
            + (f' <span class="{"good" if by.loc[c, "delta"] >= 0 else "bad"}">({by.loc[c, "delta"]:+.1f})</span>'
               if not math.isnan(by.loc[c, "delta"]) else "") + "</td>" for c in cols)
        body.append(f'<tr><th class="row">{_e(row)}</th>{cells}</tr>')
    return (f'<div class="scroll"><table><thead><tr><th>ours / paper (Δ)</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _img(uri: str, href: str | None, alt: str, cls: str = "") -> str:
    tag = f'<img src="{uri}" alt="{_e(alt)}"' + (f' class="{cls}"' if cls else "") + ">"
    return f'<a href="{_e(href)}">{tag}</a>' if href else tag


# ---------------------------------------------------------------- the builder


@dataclass
class _Figure:
    """A figure of the report: its PNG and the Parquet of its data, relative to ``out``; where it goes in MLflow."""

    png: Path
    data: Path | None
    trial: str | None = None  # also logged to this trial's child run


class _Builder:
    def __init__(self, sweep: Sweep, out: Path, *, embeddings: bool, projection: str, split: str, device: str,
                 cache_dir: Path | None, thumb_px: int, max_classes: int, max_steps: int,
                 evolution_classes: int) -> None:
        self.sweep, self.out = sweep, out
        self.embeddings, self.projection, self.split, self.device = embeddings, projection, split, device
        self.cache_dir = cache_dir or sweep.cache_dir
        self.thumb_px, self.max_classes, self.max_steps = thumb_px, max_classes, max_steps
        self.evolution_classes = evolution_classes
        self.figures: list[_Figure] = []
        self.child_metrics: dict[str, dict[str, float]] = {}
        self.notes: list[str] = []
        self._payloads: dict[str, dict] = {}
        self._sources: dict = {}
        self.frame = results(sweep)

    # ---- helpers

    def payload(self, t: Trial) -> dict | None:
        if t.key not in self._payloads:
            import torch

            f = t.run_dir / "synset.pt" if t.run_dir else None
            self._payloads[t.key] = (torch.load(f, map_location="cpu", weights_only=False)
                                     if f is not None and f.is_file() else None)
        return self._payloads[t.key]

    def fig_uri(self, path: Path, width: int = 1000) -> str:
        return file_uri(path, width, 80)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    def add_figure(self, png: Path, frame=None, trial: str | None = None) -> None:
        data = None
        if frame is not None:
            data = png.with_suffix(".parquet")
            frame.to_parquet(data, index=False)
        self.figures.append(_Figure(png, data, trial))

    def fig_block(self, png: Path, caption: str) -> str:
        data = png.with_suffix(".parquet")
        link = f' · <a href="{_e(self.rel(data))}">data (Parquet)</a>' if data.exists() else ""
        return (f'<figure>{_img(self.fig_uri(png), self.rel(png), caption, "fig")}'
                f'<div class="note">{_e(caption)} · <a href="{_e(self.rel(png))}">PNG</a>{link}</div></figure>')

    # ---- sections

    def gallery(self) -> str:
        import pandas as pd

        parts = []
        for ds in self.sweep.datasets:
            trials = [t for t in self.sweep.finished if t.dataset == ds and self.payload(t) is not None]
            if not trials:
                continue
            payloads = [self.payload(t) for t in trials]
            names = next((list(p["class_names"]) for p in payloads if p.get("class_names")), None)
            n_classes = max(int(p.get("num_classes") or int(p["labels"].max()) + 1) for p in payloads)
            names = names or [str(c) for c in range(n_classes)]
            classes = list(range(min(n_classes, self.max_classes)))
            rows: list[dict] = []
            cells: dict[tuple[int, int], list[str]] = {}
            mosaic = [[None] * len(trials) for _ in classes]
            for j, (t, p) in enumerate(zip(trials, payloads, strict=True)):
                images, labels = p["images"].float().numpy(), p["labels"].long().numpy()
                seen: dict[int, int] = {}
                for i, (img, c) in enumerate(zip(images, labels.tolist(), strict=True)):
                    if c not in classes:
                        continue
                    k = seen[c] = seen.get(c, -1) + 1
                    im = _pil(img)
                    full = self.out / "images" / t.key / f"{c:04d}_{k}.png"
                    full.parent.mkdir(parents=True, exist_ok=True)
                    im.save(full, compress_level=1)
                    if mosaic[c][j] is None:
                        mosaic[c][j] = im
                    cap = names[c]
                    cells.setdefault((c, j), []).append(
                        f'<figure>{_img(data_uri(im, self.thumb_px), self.rel(full), f"{t.label}: {cap}")}'
                        f"<figcaption>{_e(cap)}</figcaption></figure>")
                    rows.append({"dataset": ds, "trial": t.key, "backbone": t.backbone, "ablation": t.ablation,
                                 "seed": t.seed, "image": i, "label": c, "class_name": names[c],
                                 "file": self.rel(full)})
            groups: dict[str, list[int]] = {}
            for j, t in enumerate(trials):
                groups.setdefault(t.ablation, []).append(j)
            order = [j for g in groups.values() for j in g]
            head1 = "".join(f'<th colspan="{len(g)}">{_e(a)}</th>' for a, g in groups.items())
            several_seeds = len({t.seed for t in trials}) > 1
            head2 = "".join(f"<th>{_e(trials[j].backbone)}" + (f"<br>seed {trials[j].seed}" if several_seeds else "")
                            + "</th>" for j in order)
            body = "".join(
                f'<tr><th class="row">{_e(names[c])}</th>'
                + "".join(f"<td>{''.join(cells.get((c, j), []))}</td>" for j in order) + "</tr>" for c in classes)
            more = (f'<p class="note">showing the first {len(classes)} of {n_classes} classes '
                    f"(max_classes)</p>" if len(classes) < n_classes else "")
            parts.append(f'<h3>{_e(ds)}</h3>{more}<div class="scroll gallery" style="--thumb:{self.thumb_px}px">'
                         f'<table><thead><tr><th rowspan="2">class</th>{head1}</tr><tr>{head2}</tr></thead>'
                         f"<tbody>{body}</tbody></table></div>")
            png = self.out / "figures" / f"gallery_{ds}.png"
            gallery_png([[mosaic[c][j] for j in order] for c in classes], [names[c] for c in classes],
                        [trials[j].label for j in order], png, f"{ds}: distilled images")
            self.add_figure(png, pd.DataFrame(rows))
        return "".join(parts) or '<p class="note">no finished trial with a synset.pt yet</p>'

    def evolution(self) -> str:
        """Step grids of every set: embedded for the first set of each (dataset, backbone), linked for the rest
        (a page of 100 trials stays small); each set's strips stacked in one PNG figure."""
        import pandas as pd

        parts, shown_pairs = [], set()
        for t in self.sweep.finished:
            files = sorted((t.run_dir / "grids").glob("step_*.png")) if t.run_dir else []
            if not files:
                continue
            p = self.payload(t) or {}
            n_classes = int(p.get("num_classes") or (int(p["labels"].max()) + 1 if "labels" in p else 1))
            embed = (t.dataset, t.backbone) not in shown_pairs
            shown_pairs.add((t.dataset, t.backbone))
            figs, strips, rows = [], [], []
            for f in pick_steps(files, self.max_steps):
                step = _step_of(f)
                full = self.out / "images" / t.key / "steps" / f.name
                full.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, full)
                im = crop_grid(f, n_classes, self.evolution_classes)
                strips.append((step, im))
                rows.append({"trial": t.key, "step": step, "file": self.rel(full)})
                if embed:
                    figs.append(f"<figure><figcaption>step {step}</figcaption>"
                                f'{_img(data_uri(im, 1200, 70), self.rel(full), f"{t.key} step {step}")}</figure>')
                else:
                    figs.append(f'<a href="{_e(self.rel(full))}">step {step}</a>')
            png = self.out / "figures" / "evolution" / f"{t.key}.png"
            evolution_png(strips, png, f"{t.dataset} · {t.label}")
            self.add_figure(png, pd.DataFrame(rows))
            shown = min(n_classes, self.evolution_classes)
            head = f"{_e(t.dataset)} · {_e(t.label)} ({len(files)} grids; first {shown} classes)"
            if embed:
                parts.append(f'<details open><summary>{head}</summary><div class="evo scroll">{"".join(figs)}'
                             f"</div></details>")
            else:
                parts.append(f'<p class="evo-links">{head}: {" · ".join(figs)} · '
                             f'<a href="{_e(self.rel(png))}">all steps (PNG)</a></p>')
        return "".join(parts) or '<p class="note">no step grids (grids/step_*.png) found</p>'

    def tables(self) -> tuple[str, str]:
        from lgm_ray.tracking import ablation_table, cross_model_table, heatmap_png

        cross, abl_parts = [], []
        paper = self.sweep.spec.get("paper")
        for ds in self.sweep.datasets:
            means, stds = cross_model_table(self.frame, ds, self.sweep.eval_backbones)
            if means.empty:
                continue
            png = heatmap_png(means, self.out / "figures" / f"cross_model_{ds}.png",
                              f"{ds}: cross-model linear-probe top-1 (%), mean ± std", stds=stds)
            self.add_figure(png, means.add_suffix("_mean").join(stds.add_suffix("_std")).reset_index())
            distilled = self.frame[(self.frame["dataset"] == ds) & (self.frame["training_set"] == "distilled")]
            abl = ablation_table(self.frame, ds) if distilled["ablation"].nunique() > 1 else None
            cmp = paper_comparison(paper, means, abl)
            kind, paper_block = None, ""
            if cmp is not None and len(cmp):
                kind = str(cmp["table"].iloc[0])
                cmp_png = self._paper_png(cmp, ds)
                paper_block = (f"<h4>{_e(ds)}: beside the paper's numbers (the spec's <code>paper</code> field, "
                               f"{_e(kind)} table)</h4><div class='pair'>{_paper_html(cmp)}"
                               f"{self.fig_block(cmp_png, 'ours vs the paper')}</div>")
            cross.append(f"<h3>{_e(ds)}</h3><p class='note'>linear-probe top-1 (%) on the {_e(self.split_name())} "
                         f"split, mean ± std over probe seeds (and distillation seeds); rows: training set, "
                         f"columns: evaluation backbone</p><div class='pair'>{_frame_html(means, stds)}"
                         f"{self.fig_block(png, f'{ds}: cross-model heatmap')}</div>"
                         + (paper_block if kind == "cross-model" else ""))
            if abl is not None and not abl.empty:
                png = heatmap_png(abl, self.out / "figures" / f"ablation_{ds}.png",
                                  f"{ds}: ablation, mean top-1 (%)")
                self.add_figure(png, abl.reset_index())
                abl_parts.append(f"<h3>{_e(ds)}</h3><p class='note'>mean top-1 (%): same-model (distilled and "
                                 f"evaluated with one backbone) and cross-model (every other pair)</p>"
                                 f"<div class='pair'>{_frame_html(abl)}{self.fig_block(png, f'{ds}: ablation')}"
                                 f"</div>" + (paper_block if kind == "ablation" else ""))
            elif kind == "ablation":
                abl_parts.append(f"<h3>{_e(ds)}</h3>{paper_block}")
        if paper is not None and _paper_rows(paper) is None:
            cross.append(f"<p class='note'>the spec's <code>paper</code> field: "
                         f"<code>{_e(json.dumps(paper, default=str))}</code></p>")
        return ("".join(cross) or '<p class="note">no results yet</p>',
                "".join(abl_parts) or '<p class="note">the sweep has a single ablation point</p>')

    def split_name(self) -> str:
        return str((self.sweep.spec.get("eval") or {}).get("split") or "test")

    def _paper_png(self, cmp, ds: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
        labels = [f"{r} / {c}" for r, c in zip(cmp["row"], cmp["column"], strict=True)]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, cmp["paper"], 0.4, label="paper", color="#999")
        ax.bar(x + 0.2, np.nan_to_num(cmp["ours"].to_numpy(dtype=float)), 0.4, label="ours", color="#1f77b4")
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{ds}: ours vs the paper", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = _save_png(fig, self.out / "figures" / f"paper_{ds}.png")
        plt.close(fig)
        self.add_figure(png, cmp)
        return png

    def losses(self) -> str:
        png = self.out / "figures" / "meta_loss.png"
        frame = loss_curves_png(self.sweep, png)
        if frame.empty:
            return '<p class="note">no loss curves yet</p>'
        self.add_figure(png, frame)
        return self.fig_block(png, "meta loss of every finished trial")

    def embedding(self) -> str:
        import pandas as pd

        from lgm_ray.embedding import FeaturesUnavailable, embed_set, plot_embedding, set_features

        if not self.embeddings:
            return '<p class="note">embedding maps were not asked for (embeddings=False)</p>'
        summaries, parts, all_rows, hits = [], [], [], 0
        for t in self.sweep.finished:
            p = self.payload(t)
            if p is None:
                continue
            shards = (p.get("config") or {}).get("shards") or t.config.get("shards")
            try:
                feats = set_features(p, shards, split=self.split, cache_dir=self.cache_dir, device=self.device,
                                     sources=self._sources)
                emb = embed_set(feats.real_features, feats.real_labels, feats.syn_features, p["labels"],
                                class_names=feats.class_names, num_classes=feats.num_classes,
                                method=self.projection, seed=0)
            except (FeaturesUnavailable, ValueError) as exc:
                self.notes.append(f"embedding map of {t.key}: skipped ({exc})")
                parts.append(f'<p class="note">{_e(t.key)}: no embedding map ({_e(exc)})</p>')
                continue
            hits += feats.cache_hit
            png = plot_embedding(emb, p["images"], self.out / "figures" / "embedding" / f"{t.key}.png",
                                 f"{t.dataset} · {t.label} · {feats.backbone} features, {self.split} split")
            table = emb.periphery.assign(trial=t.key)
            self.add_figure(png, emb.points.assign(trial=t.key), trial=t.key)
            per = png.with_name(f"{t.key}_periphery.parquet")
            table.to_parquet(per, index=False)
            self.figures.append(_Figure(per, None, t.key))
            all_rows.append(table)
            s = emb.summary
            self.child_metrics[t.key] = {f"periphery/{k}": s[k] for k in PERIPHERY_METRICS if k in s}
            summaries.append({"trial": t.key, "dataset": t.dataset, "backbone": t.backbone, "ablation": t.ablation,
                              "seed": t.seed, **s})
            shown = table[["class_name", "percentile", "distance_ratio", "margin", "nearest_other_name"]].rename(
                columns={"class_name": "class", "percentile": "percentile among its class",
                         "distance_ratio": "distance / class radius", "margin": "margin",
                         "nearest_other_name": "nearest other class"}).set_index("class")
            parts.append(f"<details{' open' if not parts else ''}><summary>{_e(t.dataset)} · {_e(t.label)}: median "
                         f"percentile {_num(s['median_percentile'], 0)}, {100 * s['frac_outside']:.0f}% outside "
                         f"their class</summary><div class='pair'>{self.fig_block(png, f'embedding map of {t.key}')}"
                         f"{_frame_html(shown, index_name='class', digits=2)}</div></details>")
        if not summaries:
            return "".join(parts) or '<p class="note">no finished trial with a synset.pt yet</p>'
        summary = pd.DataFrame(summaries)
        pd.concat(all_rows, ignore_index=True).to_parquet(self.out / "figures" / "periphery.parquet", index=False)
        self.figures.append(_Figure(self.out / "figures" / "periphery.parquet", None))
        summary.to_parquet(self.out / "figures" / "periphery_summary.parquet", index=False)
        self.figures.append(_Figure(self.out / "figures" / "periphery_summary.parquet", None))
        shown = summary.set_index("trial")[["backbone", "ablation", "median_percentile", "frac_periphery",
                                            "frac_outside", "median_distance_ratio", "mean_margin",
                                            "frac_negative_margin"]]
        for c in ("frac_periphery", "frac_outside", "frac_negative_margin"):
            shown[c] = 100 * shown[c]
        shown = shown.rename(columns={"median_percentile": "median percentile", "frac_periphery": "% ≥ 90th pct",
                                      "frac_outside": "% outside class", "median_distance_ratio":
                                      "median distance / radius", "mean_margin": "mean margin",
                                      "frac_negative_margin": "% nearer another class"})
        intro = (f"<p class='note'>Features of the <b>{_e(self.split)}</b> split by each set's own backbone; "
                 f"{'PCA fitted on the real features' if self.projection == 'pca' else 't-SNE'}. Per distilled "
                 f"image: <b>percentile</b> = share of its class's real images closer to the class mean (100: "
                 f"outside the class cluster); <b>margin</b> = distance to the nearest other class mean minus "
                 f"distance to its own (negative: nearer another class); radius = median real distance to the "
                 f"class mean. Real images average the 50th percentile. The split's features of {hits} of "
                 f"{len(summaries)} sets came from the feature cache the evaluations filled.</p>")
        return intro + _frame_html(shown, index_name="trial") + "".join(parts)

    def failures(self) -> str:
        bad = [t for t in self.sweep.trials if t.status != "finished"]
        if not bad:
            return ""
        rows = "".join(f'<tr><th class="row">{_e(t.key)}</th><td>{_e(t.status)}</td><td style="text-align:left">'
                       f"{_e(t.error or '')}</td></tr>" for t in bad)
        return (f'<h2 id="failed">Failed and unfinished trials</h2><table><thead><tr><th>trial</th><th>status</th>'
                f"<th>error</th></tr></thead><tbody>{rows}</tbody></table>")

    def page(self) -> str:
        s = self.sweep
        t0 = time.perf_counter()
        gallery, evolution = self.gallery(), self.evolution()
        cross, ablation = self.tables()
        losses, embedding = self.losses(), self.embedding()
        counts = {k: sum(t.status == k for t in s.trials) for k in ("finished", "failed", "unfinished")}
        mlflow = (f"MLflow: <code>{_e(s.tracking_uri)}</code>, experiment {_e(s.experiment_id)}, parent run "
                  f"<code>{_e(s.parent_run_id)}</code>" if s.parent_run_id else "MLflow: not recorded")
        desc = s.spec.get("description") or ""
        notes = "".join(f"<li>{_e(n)}</li>" for n in self.notes)
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>lgm_ray sweep report: {_e(s.name)}</title><style>{CSS}</style></head>
<body>
<h1>Sweep <code>{_e(s.name)}</code></h1>
<p class="meta">{_e(desc)}<br>source: <code>{_e(s.source)}</code> · {counts['finished']} trials finished,
{counts['failed']} failed, {counts['unfinished']} unfinished · {len(s.baselines)} baseline evaluations<br>{mlflow}<br>
generated by <code>python -m lgm_ray.report</code> in {time.perf_counter() - t0:.1f} s</p>
<nav><a href="#gallery">Gallery</a><a href="#evolution">Evolution</a><a href="#cross-model">Cross-model</a>
<a href="#ablation">Ablation</a><a href="#meta-loss">Meta loss</a><a href="#embedding">Embedding maps</a></nav>
<h2 id="gallery">Distilled images</h2>
<p class="note">One row per class, one column per (ablation, distillation backbone); each image links to its
full-size file.</p>{gallery}
<h2 id="evolution">Evolution over steps</h2>{evolution}
<h2 id="cross-model">Cross-model table</h2>{cross}
<h2 id="ablation">Ablations</h2>{ablation}
<h2 id="meta-loss">Meta loss</h2>{losses}
<h2 id="embedding">Embedding maps and periphery numbers</h2>{embedding}
{self.failures()}
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
</body></html>
"""


# ---------------------------------------------------------------- MLflow


def log_report(sweep: Sweep, out: Path, figures: list[_Figure], child_metrics: dict[str, dict[str, float]],
               tracking_uri: str | None = None) -> bool:
    """Log the page and every figure (PNG + Parquet) to the parent run under ``report/``; each trial's
    embedding map, periphery numbers and metrics to its child run. Returns whether anything was logged."""
    uri = tracking_uri or sweep.tracking_uri
    if not uri or not sweep.parent_run_id:
        return False
    from mlflow import MlflowClient

    from lgm_ray.tracking import Tracker

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
    from lgm_ray.embedding import PROJECTIONS

    if projection not in PROJECTIONS:
        raise ReportError(f"projection {projection!r}: choose one of {', '.join(PROJECTIONS)}")
    if split not in ("test", "val"):
        raise ReportError(f"split {split!r}: choose test or val")
    out = Path(out)
    _prepare_out(out)
    with tempfile.TemporaryDirectory(prefix="lgm_ray_report_") as tmp:
        if Path(source).is_dir():
            sweep = load_sweep_dir(source)
            if tracking_uri:
                sweep.tracking_uri = tracking_uri
        else:
            from lgm_ray.tracking import resolve_tracking_uri

            uri = resolve_tracking_uri(tracking_uri)
            if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
                raise ReportError(f"{source!r} is not a sweep folder, and there is no MLflow store at {uri} to look "
                                  f"for an experiment of that name; give storage/NAME of a sweep, or "
                                  f"--tracking-uri of the store")
            sweep = load_mlflow(str(source), uri, tmp, parent_run)
        builder = _Builder(sweep, out, embeddings=embeddings, projection=projection, split=split, device=device,
                           cache_dir=Path(cache_dir) if cache_dir else None, thumb_px=thumb_px,
                           max_classes=max_classes, max_steps=max_steps, evolution_classes=evolution_classes)
        page = builder.page()
    index = out / "index.html"
    tmp_index = out / f".index.{os.getpid()}.tmp"
    tmp_index.write_text(page, encoding="utf-8")
    os.replace(tmp_index, index)
    if log_mlflow:
        try:
            logged = log_report(sweep, out, builder.figures, builder.child_metrics, sweep.tracking_uri)
            if not logged:
                print("[lgm_ray.report] no MLflow parent run known: figures not logged", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - the page is the product; MLflow trouble is a warning
            print(f"[lgm_ray.report] warning: logging the report to MLflow failed: {exc!r}", file=sys.stderr)
    return index


def page_size(out: str | Path) -> int:
    """Bytes of the page (``index.html``, with its embedded thumbnails and figures)."""
    return (Path(out) / "index.html").stat().st_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lgm_ray.report", description=__doc__.split("\n")[0])
    p.add_argument("source", help="a sweep folder (storage/NAME) or an MLflow experiment name")
    p.add_argument("--out", required=True, help="report folder (index.html, figures/, images/)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's, else MLFLOW_TRACKING_URI, "
                                          "else sqlite:///mlflow.db)")
    p.add_argument("--parent-run", help="the sweep's parent run id (default: the experiment's newest sweep)")
    p.add_argument("--projection", default="pca", choices=("pca", "tsne"))
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", help="feature cache (default: the sweep's feature_cache/)")
    p.add_argument("--no-embeddings", action="store_true", help="skip the embedding maps")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the figures to MLflow")
    p.add_argument("--thumb-px", type=int, default=96)
    p.add_argument("--max-classes", type=int, default=100)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI: writes the report, prints its path and size; bad input exits 2 with one message."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        index = build_report(args.source, args.out, args.tracking_uri, parent_run=args.parent_run,
                             embeddings=not args.no_embeddings, projection=args.projection, split=args.split,
                             device=args.device, cache_dir=args.cache_dir, log_mlflow=not args.no_mlflow,
                             thumb_px=args.thumb_px, max_classes=args.max_classes)
    except ReportError as exc:
        print(f"python -m lgm_ray.report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {index} ({page_size(index.parent) / 1e6:.2f} MB, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
