"""The tables: per dataset, the cross-model table (training set × evaluation backbone, top-1 mean ± std,
baselines as extra rows) and the ablation table, each as HTML and heatmap with its missing cells named, and
the paper's numbers beside whichever of them the spec's ``paper`` field names.

Every number comes from the sweep's :class:`~lgm_ray.results.tables.SweepTables`
(:func:`lgm_ray.report.frames.tables`, kept on the context): the same object, from the same function, that
the sweep writes to ``tables/`` and logs to MLflow. This module renders it and computes nothing.
"""

from __future__ import annotations

import json

from lgm_ray.report.context import ReportContext
from lgm_ray.report.figures import paper_png
from lgm_ray.report.markup import esc, frame_html, note, notes_html, paper_html
from lgm_ray.results.tables import DatasetTables, ablation_png, cross_model_png, cross_model_wide, paper_rows


def _paper(ctx: ReportContext, t: DatasetTables) -> str:
    """The paper's numbers beside ours (table and bars); empty when the spec gives none."""
    if t.paper_kind is None:
        return ""
    png = paper_png(t.paper, ctx.out / "figures" / f"paper_{t.dataset}.png", f"{t.dataset}: ours vs the paper")
    ctx.add_figure(png, t.paper)
    return (f"<h4>{esc(t.dataset)}: beside the paper's numbers (the spec's <code>paper</code> field, "
            f"{esc(t.paper_kind)} table)</h4><div class='pair'>{paper_html(t.paper)}"
            f"{ctx.fig_block(png, 'ours vs the paper')}</div>")


def _cross(ctx: ReportContext, t: DatasetTables) -> str:
    """The cross-model table and heatmap of one dataset, its missing cells under it."""
    png = cross_model_png(t, ctx.out / "figures" / f"cross_model_{t.dataset}.png")
    ctx.add_figure(png, cross_model_wide(t))
    return (f"<h3>{esc(t.dataset)}</h3><p class='note'>{esc(t.cross_title)} (on the {esc(ctx.split_name())} "
            f"split)</p><div class='pair'>{frame_html(t.means, t.stds, table_id=f'cross_model_{t.dataset}')}"
            f"{ctx.fig_block(png, f'{t.dataset}: cross-model heatmap')}</div>{notes_html(t.missing)}")


def _ablation(ctx: ReportContext, t: DatasetTables) -> str:
    """The ablation table and heatmap of one dataset, what it averages over and its ``—`` rows explained."""
    png = ablation_png(t, ctx.out / "figures" / f"ablation_{t.dataset}.png")
    ctx.add_figure(png, t.ablation.reset_index())
    return (f"<h3>{esc(t.dataset)}</h3><p class='note'>{esc(t.ablation_title)}</p>"
            f"<div class='pair'>{frame_html(t.ablation, table_id=f'ablation_{t.dataset}')}"
            f"{ctx.fig_block(png, f'{t.dataset}: ablation')}</div>{notes_html(t.ablation_missing)}")


def render(ctx: ReportContext) -> tuple[str, str]:
    """The cross-model section and the ablation section."""
    cross, ablation = [], []
    for t in ctx.tables.datasets:
        paper = _paper(ctx, t)
        if not t.means.empty:
            cross.append(_cross(ctx, t) + (paper if t.paper_kind == "cross-model" else ""))
        elif t.missing:
            cross.append(f"<h3>{esc(t.dataset)}</h3>{notes_html(t.missing)}")
        if t.ablation is not None:
            ablation.append(_ablation(ctx, t) + (paper if t.paper_kind == "ablation" else ""))
        elif t.paper_kind == "ablation":
            ablation.append(f"<h3>{esc(t.dataset)}</h3>{paper}")
    paper = ctx.sweep.spec.get("paper")
    if paper is not None and paper_rows(paper) is None:
        cross.append(f"<p class='note'>the spec's <code>paper</code> field: "
                     f"<code>{esc(json.dumps(paper, default=str))}</code></p>")
    return ("".join(cross) or note("no results yet"),
            "".join(ablation) or note("the sweep has a single ablation point"))
