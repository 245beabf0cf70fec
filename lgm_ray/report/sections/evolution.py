"""The evolution over steps: every set's progress grids (``grids/step_NNNNNNN.png`` of its run folder),
embedded for the first set of each (dataset, backbone) and linked for the rest (a page of 100 trials stays
small); each set's strips stacked in one PNG figure (``figures/evolution/KEY.png``)."""

from __future__ import annotations

import shutil

from lgm_ray.distill.run_folder import RunFolder
from lgm_ray.report.context import ReportContext
from lgm_ray.report.figures import crop_grid, data_uri, evolution_png, pick_steps
from lgm_ray.report.load import Trial
from lgm_ray.report.markup import esc, img, note


def _trial(ctx: ReportContext, t: Trial, files: list, embed: bool) -> str:
    """One set's evolution: its picked steps copied under ``images/``, embedded or linked, and its figure."""
    import pandas as pd

    p = ctx.payload(t) or {}
    n_classes = int(p.get("num_classes") or (int(p["labels"].max()) + 1 if "labels" in p else 1))
    figs, strips, rows = [], [], []
    for f in pick_steps(files, ctx.max_steps):
        step = RunFolder.step_of(f)
        full = ctx.out / "images" / t.key / "steps" / f.name
        full.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, full)
        im = crop_grid(f, n_classes, ctx.evolution_classes)
        strips.append((step, im))
        rows.append({"trial": t.key, "step": step, "file": ctx.rel(full)})
        if embed:
            figs.append(f"<figure><figcaption>step {step}</figcaption>"
                        f'{img(data_uri(im, 1200, 70), ctx.rel(full), f"{t.key} step {step}")}</figure>')
        else:
            figs.append(f'<a href="{esc(ctx.rel(full))}">step {step}</a>')
    png = ctx.out / "figures" / "evolution" / f"{t.key}.png"
    evolution_png(strips, png, f"{t.dataset} · {t.label}")
    ctx.add_figure(png, pd.DataFrame(rows))
    shown = min(n_classes, ctx.evolution_classes)
    head = f"{esc(t.dataset)} · {esc(t.label)} ({len(files)} grids; first {shown} classes)"
    if embed:
        return f'<details open><summary>{head}</summary><div class="evo scroll">{"".join(figs)}</div></details>'
    return (f'<p class="evo-links">{head}: {" · ".join(figs)} · '
            f'<a href="{esc(ctx.rel(png))}">all steps (PNG)</a></p>')


def render(ctx: ReportContext) -> str:
    """The evolution of every finished set that saved step grids."""
    parts, shown_pairs = [], set()
    for t in ctx.sweep.finished:
        files = t.run.grid_paths() if t.run is not None else []
        if not files:
            continue
        embed = (t.dataset, t.backbone) not in shown_pairs
        shown_pairs.add((t.dataset, t.backbone))
        parts.append(_trial(ctx, t, files, embed))
    return "".join(parts) or note(f"no step grids ({RunFolder.GRIDS}/step_*.png) found")
