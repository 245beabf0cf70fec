"""The report's pictures: PIL images of distilled sets, WebP data URIs, and the PNG figures.

Pure image work (PIL, matplotlib) on what :mod:`lgm_ray.report.load` read: thumbnails embedded in the
page, the gallery and evolution mosaics, the meta-loss plot and ours-vs-the-paper bars written as PNG
files. No HTML here (the sections of :mod:`lgm_ray.report.sections` place these on the page) and no MLflow.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

from lgm_ray.common.atomic import replace_with, save_figure
from lgm_ray.distill.run_folder import RunFolder
from lgm_ray.report.load import Sweep, ablation_labels


def pil(img: np.ndarray):
    """A PIL image of one distilled image (CHW or HWC floats in [0, 1], clipped)."""
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
    """:func:`data_uri` of an image file."""
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


def pick_steps(files: list[Path], max_steps: int) -> list[Path]:
    """At most ``max_steps`` of the step grids, evenly spread, the first and the last always in."""
    files = sorted(files, key=RunFolder.step_of)
    if len(files) <= max_steps:
        return files
    idx = sorted({round(i * (len(files) - 1) / (max_steps - 1)) for i in range(max_steps)})
    return [files[i] for i in idx]


def loss_curves_png(sweep: Sweep, path: Path):
    """Meta loss over steps, every finished trial on one plot; returns the data as a long frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    rows = []
    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=110)
    backbones = sorted({t.backbone for t in sweep.trials})
    ablations = ablation_labels(sweep.spec)
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
    save_figure(fig, path)
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
    return replace_with(path, lambda tmp: canvas.save(tmp, format="PNG"))


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
    return replace_with(path, lambda tmp: canvas.save(tmp, format="PNG"))


def paper_png(cmp, path: Path, title: str) -> Path:
    """Ours beside the paper's numbers (:func:`lgm_ray.results.tables.paper_comparison`'s frame) as bars."""
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
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = save_figure(fig, path)
    plt.close(fig)
    return png
