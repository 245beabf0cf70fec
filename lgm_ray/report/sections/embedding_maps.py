"""The embedding maps and periphery numbers: for every finished set, its map among the real classes of a
split and the periphery numbers of each of its images (:mod:`lgm_ray.report.embedding`), with the features
read by the set's own backbone through the sweep's feature cache
(:mod:`lgm_ray.report.embedding_features`); a summary table of all sets above them. A set whose features
cannot be had here (its backbone or shards not at hand) gets a note instead."""

from __future__ import annotations

from typing import Any

from lgm_ray.report.context import ReportContext
from lgm_ray.report.load import Trial
from lgm_ray.report.markup import esc, frame_html, note, num

# The periphery numbers logged to each trial's child run (as ``periphery/NAME``).
PERIPHERY_METRICS = ("median_percentile", "frac_periphery", "frac_outside", "median_distance_ratio",
                     "mean_margin", "frac_negative_margin")


def _embed(ctx: ReportContext, t: Trial, p: dict):
    """The set's features and its :class:`~lgm_ray.report.embedding.SetEmbedding`."""
    from lgm_ray.report.embedding import embed_set
    from lgm_ray.report.embedding_features import set_features

    shards = (p.get("config") or {}).get("shards") or t.config.get("shards")
    feats = set_features(p, shards, split=ctx.split, cache_dir=ctx.cache_dir, device=ctx.device,
                         sources=ctx.sources)
    emb = embed_set(feats.real_features, feats.real_labels, feats.syn_features, p["labels"],
                    class_names=feats.class_names, num_classes=feats.num_classes, method=ctx.projection, seed=0)
    return feats, emb


def _trial_block(ctx: ReportContext, t: Trial, emb, png, table, is_first: bool) -> str:
    """One set's map beside its per-image numbers, folded (the first one open)."""
    s = emb.summary
    shown = table[["class_name", "percentile", "distance_ratio", "margin", "nearest_other_name"]].rename(
        columns={"class_name": "class", "percentile": "percentile among its class",
                 "distance_ratio": "distance / class radius", "margin": "margin",
                 "nearest_other_name": "nearest other class"}).set_index("class")
    return (f"<details{' open' if is_first else ''}><summary>{esc(t.dataset)} · {esc(t.label)}: median "
            f"percentile {num(s['median_percentile'], 0)}, {100 * s['frac_outside']:.0f}% outside "
            f"their class</summary><div class='pair'>{ctx.fig_block(png, f'embedding map of {t.key}')}"
            f"{frame_html(shown, index_name='class', digits=2)}</div></details>")


def _trial(ctx: ReportContext, t: Trial, p: dict, is_first: bool) -> tuple[str, dict[str, Any] | None, Any, bool]:
    """One set's map and numbers: its HTML, its summary row, its per-image table and whether its split's
    features came from the cache; a note (and no summary) when its features cannot be had here."""
    from lgm_ray.report.embedding import plot_embedding
    from lgm_ray.report.embedding_features import FeaturesUnavailable

    try:
        feats, emb = _embed(ctx, t, p)
    except (FeaturesUnavailable, ValueError) as exc:
        ctx.notes.append(f"embedding map of {t.key}: skipped ({exc})")
        return note(f"{esc(t.key)}: no embedding map ({esc(exc)})"), None, None, False
    png = plot_embedding(emb, p["images"], ctx.out / "figures" / "embedding" / f"{t.key}.png",
                         f"{t.dataset} · {t.label} · {feats.backbone} features, {ctx.split} split")
    table = emb.periphery.assign(trial=t.key)
    ctx.add_figure(png, emb.points.assign(trial=t.key), trial=t.key)
    per = png.with_name(f"{t.key}_periphery.parquet")
    table.to_parquet(per, index=False)
    ctx.add_file(per, t.key)
    s = emb.summary
    ctx.child_metrics[t.key] = {f"periphery/{k}": s[k] for k in PERIPHERY_METRICS if k in s}
    summary = {"trial": t.key, "dataset": t.dataset, "backbone": t.backbone, "ablation": t.ablation,
               "seed": t.seed, **s}
    return _trial_block(ctx, t, emb, png, table, is_first), summary, table, bool(feats.cache_hit)


def _summary(ctx: ReportContext, summaries: list[dict], tables: list, hits: int) -> str:
    """The periphery numbers of every set (written as Parquet too) and what they mean."""
    import pandas as pd

    summary = pd.DataFrame(summaries)
    figures = ctx.out / "figures"
    pd.concat(tables, ignore_index=True).to_parquet(figures / "periphery.parquet", index=False)
    ctx.add_file(figures / "periphery.parquet")
    summary.to_parquet(figures / "periphery_summary.parquet", index=False)
    ctx.add_file(figures / "periphery_summary.parquet")
    shown = summary.set_index("trial")[["backbone", "ablation", *PERIPHERY_METRICS]]
    for c in ("frac_periphery", "frac_outside", "frac_negative_margin"):
        shown[c] = 100 * shown[c]
    shown = shown.rename(columns={"median_percentile": "median percentile", "frac_periphery": "% ≥ 90th pct",
                                  "frac_outside": "% outside class", "median_distance_ratio":
                                  "median distance / radius", "mean_margin": "mean margin",
                                  "frac_negative_margin": "% nearer another class"})
    intro = (f"<p class='note'>Features of the <b>{esc(ctx.split)}</b> split by each set's own backbone; "
             f"{'PCA fitted on the real features' if ctx.projection == 'pca' else 't-SNE'}. Per distilled "
             f"image: <b>percentile</b> = share of its class's real images closer to the class mean (100: "
             f"outside the class cluster); <b>margin</b> = distance to the nearest other class mean minus "
             f"distance to its own (negative: nearer another class); radius = median real distance to the "
             f"class mean. Real images average the 50th percentile. The split's features of {hits} of "
             f"{len(summaries)} sets came from the feature cache the evaluations filled.</p>")
    return intro + frame_html(shown, index_name="trial")


def render(ctx: ReportContext) -> str:
    """Every finished set's map and numbers, the summary table first."""
    if not ctx.embeddings:
        return note("embedding maps were not asked for (embeddings=False)")
    parts, summaries, tables, hits = [], [], [], 0
    for t in ctx.sweep.finished:
        p = ctx.payload(t)
        if p is None:
            continue
        html, summary, table, hit = _trial(ctx, t, p, is_first=not parts)
        parts.append(html)
        if summary is not None:
            summaries.append(summary)
            tables.append(table)
            hits += hit
    if not summaries:
        return "".join(parts) or note("no finished trial with a synset.pt yet")
    return _summary(ctx, summaries, tables, hits) + "".join(parts)
