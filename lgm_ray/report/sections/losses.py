"""The meta-loss curves: every finished trial's per-step loss on one plot (``figures/meta_loss.png``)."""

from __future__ import annotations

from lgm_ray.report.context import ReportContext
from lgm_ray.report.figures import loss_curves_png
from lgm_ray.report.markup import note


def render(ctx: ReportContext) -> str:
    """The meta-loss plot, or a note when no trial has recorded its losses yet."""
    png = ctx.out / "figures" / "meta_loss.png"
    frame = loss_curves_png(ctx.sweep, png)
    if frame.empty:
        return note("no loss curves yet")
    ctx.add_figure(png, frame)
    return ctx.fig_block(png, "meta loss of every finished trial")
