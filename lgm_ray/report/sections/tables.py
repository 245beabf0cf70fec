"""The tables: per dataset, the cross-model table (training set × evaluation backbone, top-1 mean ± std,
baselines as extra rows) and the ablation table, each as HTML and heatmap, and the paper's numbers beside
whichever of them the spec's ``paper`` field names (:func:`lgm_ray.report.frames.paper_comparison`)."""

from __future__ import annotations

import json
from typing import Any

from lgm_ray.report.context import ReportContext
from lgm_ray.report.figures import paper_png
from lgm_ray.report.frames import paper_comparison, paper_rows
from lgm_ray.report.markup import esc, frame_html, note, paper_html


def _paper(ctx: ReportContext, ds: str, cmp) -> tuple[str | None, str]:
    """The kind of table the paper's numbers belong to, and their block (table and bars); ``(None, "")``
    when the spec gives none."""
    if cmp is None or not len(cmp):
        return None, ""
    kind = str(cmp["table"].iloc[0])
    png = paper_png(cmp, ctx.out / "figures" / f"paper_{ds}.png", f"{ds}: ours vs the paper")
    ctx.add_figure(png, cmp)
    return kind, (f"<h4>{esc(ds)}: beside the paper's numbers (the spec's <code>paper</code> field, "
                  f"{esc(kind)} table)</h4><div class='pair'>{paper_html(cmp)}"
                  f"{ctx.fig_block(png, 'ours vs the paper')}</div>")


def _cross(ctx: ReportContext, ds: str, means, stds) -> str:
    """The cross-model table and heatmap of one dataset (the paper's numbers go after it)."""
    from lgm_ray.results.tables import heatmap_png

    png = heatmap_png(means, ctx.out / "figures" / f"cross_model_{ds}.png",
                      f"{ds}: cross-model linear-probe top-1 (%), mean ± std", stds=stds)
    ctx.add_figure(png, means.add_suffix("_mean").join(stds.add_suffix("_std")).reset_index())
    return (f"<h3>{esc(ds)}</h3><p class='note'>linear-probe top-1 (%) on the {esc(ctx.split_name())} "
            f"split, mean ± std over probe seeds (and distillation seeds); rows: training set, "
            f"columns: evaluation backbone</p><div class='pair'>{frame_html(means, stds)}"
            f"{ctx.fig_block(png, f'{ds}: cross-model heatmap')}</div>")


def _ablation(ctx: ReportContext, ds: str, abl) -> str:
    """The ablation table and heatmap of one dataset (the paper's numbers go after it)."""
    from lgm_ray.results.tables import heatmap_png

    png = heatmap_png(abl, ctx.out / "figures" / f"ablation_{ds}.png", f"{ds}: ablation, mean top-1 (%)")
    ctx.add_figure(png, abl.reset_index())
    return (f"<h3>{esc(ds)}</h3><p class='note'>mean top-1 (%): same-model (distilled and "
            f"evaluated with one backbone) and cross-model (every other pair)</p>"
            f"<div class='pair'>{frame_html(abl)}{ctx.fig_block(png, f'{ds}: ablation')}</div>")


def _dataset(ctx: ReportContext, ds: str, paper: Any) -> tuple[str, str]:
    """The cross-model and ablation parts of one dataset (empty when it has no result yet)."""
    from lgm_ray.results.tables import ablation_table, cross_model_table

    frame = ctx.frame
    means, stds = cross_model_table(frame, ds, ctx.sweep.eval_backbones)
    if means.empty:
        return "", ""
    cross = _cross(ctx, ds, means, stds)
    distilled = frame[(frame["dataset"] == ds) & (frame["training_set"] == "distilled")]
    abl = ablation_table(frame, ds) if distilled["ablation"].nunique() > 1 else None
    kind, paper_block = _paper(ctx, ds, paper_comparison(paper, means, abl))
    cross += paper_block if kind == "cross-model" else ""
    if abl is not None and not abl.empty:
        return cross, _ablation(ctx, ds, abl) + (paper_block if kind == "ablation" else "")
    return cross, (f"<h3>{esc(ds)}</h3>{paper_block}" if kind == "ablation" else "")


def render(ctx: ReportContext) -> tuple[str, str]:
    """The cross-model section and the ablation section."""
    cross, ablation = [], []
    paper = ctx.sweep.spec.get("paper")
    for ds in ctx.sweep.datasets:
        c, a = _dataset(ctx, ds, paper)
        cross.append(c)
        ablation.append(a)
    if paper is not None and paper_rows(paper) is None:
        cross.append(f"<p class='note'>the spec's <code>paper</code> field: "
                     f"<code>{esc(json.dumps(paper, default=str))}</code></p>")
    return ("".join(cross) or note("no results yet"),
            "".join(ablation) or note("the sweep has a single ablation point"))
