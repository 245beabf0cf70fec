"""The gallery: the distilled images of each dataset, one row per class, one column per (ablation,
distillation backbone, seed); each thumbnail links to its full-size file under ``images/``, and the
whole dataset is drawn once more as one mosaic PNG (``figures/gallery_DATASET.png``)."""

from __future__ import annotations

from lgm_ray.report.context import ReportContext
from lgm_ray.report.figures import data_uri, gallery_png, pil
from lgm_ray.report.load import Trial
from lgm_ray.report.markup import esc, img, note


def _class_names(payloads: list[dict]) -> tuple[list[str], int]:
    """The class names (the first set's that has them, else the numbers) and the number of classes."""
    names = next((list(p["class_names"]) for p in payloads if p.get("class_names")), None)
    n_classes = max(int(p.get("num_classes") or int(p["labels"].max()) + 1) for p in payloads)
    return names or [str(c) for c in range(n_classes)], n_classes


def _write_set(ctx: ReportContext, ds: str, j: int, t: Trial, p: dict, names: list[str], classes: list[int],
               cells: dict[tuple[int, int], list[str]], mosaic: list[list]) -> list[dict]:
    """Write column ``j``'s images (set ``t``) under ``images/``, fill its cells and mosaic column; its rows."""
    images, labels = p["images"].float().numpy(), p["labels"].long().numpy()
    rows: list[dict] = []
    seen: dict[int, int] = {}
    for i, (image, c) in enumerate(zip(images, labels.tolist(), strict=True)):
        if c not in classes:
            continue
        k = seen[c] = seen.get(c, -1) + 1
        im = pil(image)
        full = ctx.out / "images" / t.key / f"{c:04d}_{k}.png"
        full.parent.mkdir(parents=True, exist_ok=True)
        im.save(full, compress_level=1)
        if mosaic[c][j] is None:
            mosaic[c][j] = im
        cap = names[c]
        cells.setdefault((c, j), []).append(
            f'<figure>{img(data_uri(im, ctx.thumb_px), ctx.rel(full), f"{t.label}: {cap}")}'
            f"<figcaption>{esc(cap)}</figcaption></figure>")
        rows.append({"dataset": ds, "trial": t.key, "backbone": t.backbone, "ablation": t.ablation,
                     "seed": t.seed, "image": i, "label": c, "class_name": names[c], "file": ctx.rel(full)})
    return rows


def _table(ctx: ReportContext, trials: list[Trial], groups: dict[str, list[int]], names: list[str],
           classes: list[int], cells: dict[tuple[int, int], list[str]]) -> str:
    """The gallery table: ablations over (backbone, seed) columns, one row per class."""
    order = [j for g in groups.values() for j in g]
    head1 = "".join(f'<th colspan="{len(g)}">{esc(a)}</th>' for a, g in groups.items())
    several_seeds = len({t.seed for t in trials}) > 1
    head2 = "".join(f"<th>{esc(trials[j].backbone)}" + (f"<br>seed {trials[j].seed}" if several_seeds else "")
                    + "</th>" for j in order)
    body = "".join(
        f'<tr><th class="row">{esc(names[c])}</th>'
        + "".join(f"<td>{''.join(cells.get((c, j), []))}</td>" for j in order) + "</tr>" for c in classes)
    return (f'<div class="scroll gallery" style="--thumb:{ctx.thumb_px}px">'
            f'<table><thead><tr><th rowspan="2">class</th>{head1}</tr><tr>{head2}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _dataset(ctx: ReportContext, ds: str) -> str:
    """The gallery of one dataset (empty when it has no finished set)."""
    import pandas as pd

    trials = [t for t in ctx.sweep.finished if t.dataset == ds and ctx.payload(t) is not None]
    if not trials:
        return ""
    payloads = [ctx.payload(t) for t in trials]
    names, n_classes = _class_names(payloads)
    classes = list(range(min(n_classes, ctx.max_classes)))
    rows: list[dict] = []
    cells: dict[tuple[int, int], list[str]] = {}
    mosaic = [[None] * len(trials) for _ in classes]
    for j, (t, p) in enumerate(zip(trials, payloads, strict=True)):
        rows += _write_set(ctx, ds, j, t, p, names, classes, cells, mosaic)
    groups: dict[str, list[int]] = {}
    for j, t in enumerate(trials):
        groups.setdefault(t.ablation, []).append(j)
    order = [j for g in groups.values() for j in g]
    more = (note(f"showing the first {len(classes)} of {n_classes} classes (max_classes)")
            if len(classes) < n_classes else "")
    png = ctx.out / "figures" / f"gallery_{ds}.png"
    gallery_png([[mosaic[c][j] for j in order] for c in classes], [names[c] for c in classes],
                [trials[j].label for j in order], png, f"{ds}: distilled images")
    ctx.add_figure(png, pd.DataFrame(rows))
    return f"<h3>{esc(ds)}</h3>{more}{_table(ctx, trials, groups, names, classes, cells)}"


def render(ctx: ReportContext) -> str:
    """The gallery of every dataset."""
    return "".join(_dataset(ctx, ds) for ds in ctx.sweep.datasets) or note("no finished trial with a synset.pt yet")
