"""The result tables of a sweep: the long results frame and the views built from it, rendered.

Held here: :func:`results_frame` (one row per training set × evaluation backbone, pooled over
seeds), :func:`cross_model_table` (the paper's cross-model table: rows training sets, columns
evaluation backbones), :func:`ablation_table` (same-model / cross-model averages per ablation point),
their Markdown (:func:`to_markdown`) and heatmap PNG (:func:`heatmap_png`) renderings, and
:func:`write_tables`, which writes all of them for a sweep (Markdown, Parquet, PNG).

Why apart from :mod:`lgm_ray.results.tracking`: these are pure pandas / matplotlib over result records and
know nothing of MLflow. The sweep driver logs the files they write to its parent run, and the
report (:mod:`lgm_ray.report.load`, :mod:`lgm_ray.report.page`) builds the same tables from a
finished sweep without a tracking store in between. pandas and matplotlib are imported inside the
functions that use them, so importing this module stays cheap.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lgm_ray.common.atomic import save_figure

if TYPE_CHECKING:
    import pandas as pd

METRIC_FIELDS = ("top1_mean", "top1_std", "top5_mean", "top5_std")
BASELINE_ORDER = ("centroids", "neighbors", "random", "full")
FRAME_COLUMNS = ("dataset", "training_set", "distill_backbone", "ablation", "eval_backbone", *METRIC_FIELDS,
                 "n_values")
RESULTS_FILE = "results.parquet"  # the long frame, in the tables folder


def results_frame(trials: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (training set, evaluation backbone): the long table behind every view.

    Args:
        trials: per trial ``{"dataset", "backbone", "ablation" (label), "seed", "evals": {eval
            backbone: evaluation result}, "neighbors": {eval backbone: result}}`` (results as
            :func:`lgm_ray.evaluate.protocol.evaluate` returns them).
        baselines: ``{"dataset", "baseline", "backbone" (evaluation), **evaluation result}``.

    Returns:
        DataFrame with ``dataset, training_set, distill_backbone, ablation, eval_backbone, top1_mean,
        top1_std, top5_mean, top5_std, n_values`` — distilled sets pooled over distillation seeds
        (mean and population std over every (distillation seed, probe seed) value).
    """
    import pandas as pd

    rows = []
    for (ds, kind, src, abl, b), g in _pool(trials, baselines).items():
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
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))


def _pool(trials: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> dict[tuple, dict[str, list[float]]]:
    """(dataset, training set, distillation backbone, ablation, evaluation backbone) → every top-1 and
    top-5 value of that row (each probe seed of each distillation seed)."""
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
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std of a non-empty list (every seed's value counts once)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


def cross_model_table(
    frame: pd.DataFrame, dataset: str, eval_backbones: list[str], metric: str = "top1"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cross-model table of one dataset: rows training sets, columns evaluation backbones, + avg.

    Rows: ``distilled: BACKBONE`` (``[ablation]`` appended when the sweep has several ablation
    points), then the baselines in the paper's order (centroids, neighbors, random, full; a
    ``neighbors`` row picks, for column B, the neighbours of the set distilled with B). Cells hold the
    mean; a second frame of the same shape holds the std.

    Args:
        frame: the long frame of :func:`results_frame`.
        dataset: the dataset whose rows make the table.
        eval_backbones: the columns, in this order.
        metric: ``top1`` or ``top5``.

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


def ablation_table(
    frame: pd.DataFrame, dataset: str, metric: str = "top1", distill_backbones: list[str] | None = None
) -> pd.DataFrame:
    """Same-model and cross-model averages per ablation point (the paper's ImageNet-100 ablation table).

    Same-model: mean over distillation backbones B of the set distilled with B evaluated on B.
    Cross-model: mean over pairs (A, B), A ≠ B. NaN where the sweep has no such pair.

    Args:
        frame: the long frame of :func:`results_frame`.
        dataset: the dataset whose distilled rows are averaged.
        metric: ``top1`` or ``top5``.
        distill_backbones: average over these distillation backbones only (those ablated at every
            point), so that every row averages the same backbones; ``None``: all of them.

    Returns:
        A frame indexed by ablation label with columns ``same-model`` and ``cross-model``.
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
    """One Markdown cell: ``mean ± std``, ``mean`` without a std, ``—`` when missing."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def to_markdown(means: pd.DataFrame, stds: pd.DataFrame | None = None, title: str | None = None) -> str:
    """A Markdown table of a (means[, stds]) frame pair: ``mean ± std`` cells, ``—`` for missing.

    Args:
        means: the cells' means; its index gives the first column.
        stds: a frame of the same shape, or ``None`` for means only.
        title: a bold line above the table, if given.
    """
    head = [means.index.name or "", *map(str, means.columns)]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, row in means.iterrows():
        cells = [_cell(row[c], None if stds is None else stds.loc[label, c]) for c in means.columns]
        lines.append("| " + " | ".join([str(label), *cells]) + " |")
    return "\n".join(lines) + "\n"


def heatmap_png(
    means: pd.DataFrame,
    path: str | Path,
    title: str = "",
    unit: str = "top-1 (%)",
    *,
    stds: pd.DataFrame | None = None,
) -> Path:
    """A heatmap of a means frame (rows × columns), each cell annotated, sized to its labels.

    The sweep's tables (:func:`write_tables`) and the report draw with it. Written atomically (a
    temporary file, then a rename), so a reader never sees half a PNG.

    Args:
        means: the values; NaN cells are left blank.
        path: the PNG to write; its folder is created.
        title: drawn above the map, if given.
        unit: the colour bar's label.
        stds: a frame of the same shape: cells read ``mean ± std`` when given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
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
    fig.subplots_adjust(
        left=label_in / width, right=1 - 1.3 / width, bottom=1.0 / height, top=1 - 0.45 / height
    )
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
    cax = fig.add_axes((1 - 1.1 / width, 1.0 / height, 0.15 / width, 1 - 1.45 / height))
    fig.colorbar(im, cax=cax, label=unit)
    if title:
        ax.set_title(title, fontsize=9)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def write_tables(
    frame: pd.DataFrame,
    datasets: list[str],
    eval_backbones: list[str],
    out_dir: str | Path,
    with_ablation: bool,
    ablation_backbones: list[str] | None = None,
) -> tuple[str, list[Path]]:
    """Write every table of a sweep to ``out_dir`` (Markdown, Parquet, heatmap PNG).

    Args:
        frame: the long frame of :func:`results_frame`, written as ``results.parquet``.
        datasets: one cross-model table (and ablation table) per dataset; empty ones are skipped.
        eval_backbones: the cross-model tables' columns.
        out_dir: the folder, created if needed.
        with_ablation: also write the ablation tables (the sweep has several ablation points).
        ablation_backbones: passed to :func:`ablation_table` as ``distill_backbones``.

    Returns:
        ``(markdown, files)``: the Markdown of every table (what the command prints) and the files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out / RESULTS_FILE, index=False)
    files = [out / RESULTS_FILE]
    text = []
    for ds in datasets:
        for md, written in (_write_cross_model(frame, ds, eval_backbones, out),
                            _write_ablation(frame, ds, ablation_backbones, out) if with_ablation else ("", [])):
            if md:
                text.append(md)
            files += written
    return "\n".join(text), files


def _write_cross_model(frame: pd.DataFrame, ds: str, eval_backbones: list[str], out: Path) -> tuple[str, list[Path]]:
    """``cross_model_DS.md`` / ``.parquet`` (means and stds side by side) / ``.png``; nothing for no rows."""
    means, stds = cross_model_table(frame, ds, eval_backbones)
    if means.empty:
        return "", []
    title = f"{ds}: cross-model linear-probe top-1 (%) — rows: training set, columns: evaluation backbone"
    md = to_markdown(means, stds, title)
    (out / f"cross_model_{ds}.md").write_text(md)
    wide = means.add_suffix("_mean").join(stds.add_suffix("_std")).reset_index()
    wide.to_parquet(out / f"cross_model_{ds}.parquet", index=False)
    png = heatmap_png(means, out / f"cross_model_{ds}.png", f"{ds}: cross-model top-1 (%)")
    return md, [out / f"cross_model_{ds}.md", out / f"cross_model_{ds}.parquet", png]


def _write_ablation(frame: pd.DataFrame, ds: str, ablation_backbones: list[str] | None,
                    out: Path) -> tuple[str, list[Path]]:
    """``ablation_DS.md`` / ``.parquet`` / ``.png``; nothing when the dataset has no distilled rows."""
    abl = ablation_table(frame, ds, distill_backbones=ablation_backbones)
    if abl.empty:
        return "", []
    md = to_markdown(abl, None, f"{ds}: ablation, mean top-1 (%) same-model / cross-model")
    (out / f"ablation_{ds}.md").write_text(md)
    abl.reset_index().to_parquet(out / f"ablation_{ds}.parquet", index=False)
    png = heatmap_png(abl, out / f"ablation_{ds}.png", f"{ds}: ablation top-1 (%)")
    return md, [out / f"ablation_{ds}.md", out / f"ablation_{ds}.parquet", png]
