"""The report's HTML page: its CSS, the table and image markup, and the builder of every section.

:class:`Builder` walks a loaded :class:`~lgm_ray.report.load.Sweep` section by section (gallery,
evolution, cross-model and ablation tables beside the paper's numbers, meta loss, embedding maps),
writes each figure under ``out/figures`` and ``out/images`` with :mod:`lgm_ray.report.figures`, and
returns the one self-contained page; it records every figure (:class:`Figure`) and each trial's
periphery metrics so that :mod:`lgm_ray.report.build` can log them to MLflow.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lgm_ray.common.atomic import save_figure
from lgm_ray.report.figures import (
    crop_grid,
    data_uri,
    evolution_png,
    file_uri,
    gallery_png,
    loss_curves_png,
    pick_steps,
    pil,
    step_of,
)
from lgm_ray.report.load import Sweep, Trial, paper_comparison, paper_rows, results

PERIPHERY_METRICS = ("median_percentile", "frac_periphery", "frac_outside", "median_distance_ratio",
                     "mean_margin", "frac_negative_margin")


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
class Figure:
    """A figure of the report: its PNG and the Parquet of its data, relative to ``out``; where it goes in MLflow."""

    png: Path
    data: Path | None
    trial: str | None = None  # also logged to this trial's child run


class Builder:
    """Builds the page of one sweep into ``out``: one method per section, :meth:`page` for all of them.

    Attributes:
        figures: every figure written so far (for :func:`lgm_ray.report.build.log_report`).
        child_metrics: each trial's periphery metrics, by trial key (logged to its child run).
        notes: what was skipped and why, listed at the end of the page.
    """

    def __init__(self, sweep: Sweep, out: Path, *, embeddings: bool, projection: str, split: str, device: str,
                 cache_dir: Path | None, thumb_px: int, max_classes: int, max_steps: int,
                 evolution_classes: int) -> None:
        self.sweep, self.out = sweep, out
        self.embeddings, self.projection, self.split, self.device = embeddings, projection, split, device
        self.cache_dir = cache_dir or sweep.cache_dir
        self.thumb_px, self.max_classes, self.max_steps = thumb_px, max_classes, max_steps
        self.evolution_classes = evolution_classes
        self.figures: list[Figure] = []
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
        self.figures.append(Figure(png, data, trial))

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
                    im = pil(img)
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
                step = step_of(f)
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
        from lgm_ray.results.tables import ablation_table, cross_model_table, heatmap_png

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
        if paper is not None and paper_rows(paper) is None:
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
        png = save_figure(fig, self.out / "figures" / f"paper_{ds}.png")
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

        from lgm_ray.report.embedding import embed_set, plot_embedding
        from lgm_ray.report.embedding_features import FeaturesUnavailable, set_features

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
            self.figures.append(Figure(per, None, t.key))
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
        self.figures.append(Figure(self.out / "figures" / "periphery.parquet", None))
        summary.to_parquet(self.out / "figures" / "periphery_summary.parquet", index=False)
        self.figures.append(Figure(self.out / "figures" / "periphery_summary.parquet", None))
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
