"""Where distilled images sit among the real classes: periphery numbers and 2-D embedding maps.

Cazenavette et al. (NeurIPS 2025) find that the features of the distilled images lie at the
periphery of their class's cluster of real features, or outside it, rather than at its centre. This
module turns that into numbers, per distilled image, in the backbone's feature space (the space the
linear probe sees):

* **percentile**: of the real images of its class, the percentage that lie strictly closer to the
  class mean than the distilled image does. 50 is a typical real image; 100 means farther from the
  mean than every real image of its class (outside the cluster); 0 means at the centre.
* **margin**: the distance to the nearest *other* class mean minus the distance to its own class
  mean. Positive: nearer its own mean than any other; negative: nearer another class's mean.
* **distance ratio**: its distance to its class mean over the median distance of the class's real
  images (the class's typical radius), comparable across backbones.

and draws one map per set (:func:`plot_embedding`): the real features of a split, the class means
and the distilled images' features projected to 2-D (PCA by default, t-SNE optionally), the
distilled images drawn as thumbnails.

The math (:func:`class_means`, :func:`periphery`, :func:`summarize`, :func:`project_2d`,
:func:`embed_set`) takes arrays and returns arrays or frames; reading the features of a saved set
through its backbone and the sweep's feature cache is :mod:`lgm_ray.report.embedding_features`; the
report's embedding section (:mod:`lgm_ray.report.sections.embedding_maps`) does both for every set of a sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lgm_ray.common.atomic import save_figure
from lgm_ray.common.errors import InputError

PROJECTIONS = ("pca", "tsne")
PERIPHERY_PERCENTILE = 90.0  # "at the periphery": farther from the class mean than 90 % of its real images
PERIPHERY_COLUMNS = ["image", "label", "class_name", "distance", "percentile", "class_radius", "distance_ratio",
                     "nearest_other", "nearest_other_name", "nearest_other_distance", "margin"]


class EmbeddingInputError(InputError):
    """Features or labels that cannot be compared; the message names the problem and the fix."""


def _array(x: Any, name: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != ndim:
        raise EmbeddingInputError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    return a


def class_means(features: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Mean feature of each class (``num_classes`` × D, float64); NaN rows for classes with no image."""
    f = _array(features, "features", 2).astype(np.float64)
    y = _array(labels, "labels", 1).astype(np.int64)
    if len(f) != len(y):
        raise EmbeddingInputError(f"{len(f)} features but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise EmbeddingInputError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    sums = np.zeros((num_classes, f.shape[1]))
    np.add.at(sums, y, f)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` and of ``b`` (len(a) × len(b)), in row chunks
    of at most ~2²⁵ differences (256 MB) at a time."""
    out = np.empty((len(a), len(b)))
    chunk = max(1, (1 << 25) // max(1, b.size))
    for i in range(0, len(a), chunk):
        out[i : i + chunk] = np.linalg.norm(a[i : i + chunk, None, :] - b[None], axis=2)
    return out


def _inputs(real_features: Any, real_labels: Any, syn_features: Any,
            syn_labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Real and distilled features (float64) and labels (int64), checked to be comparable."""
    real = _array(real_features, "real features", 2).astype(np.float64)
    ry = _array(real_labels, "real labels", 1).astype(np.int64)
    syn = _array(syn_features, "distilled features", 2).astype(np.float64)
    sy = _array(syn_labels, "distilled labels", 1).astype(np.int64)
    if real.shape[1] != syn.shape[1]:
        raise EmbeddingInputError(f"real features are {real.shape[1]}-d but distilled ones {syn.shape[1]}-d: "
                                  f"compute both with the same backbone")
    if len(syn) != len(sy):
        raise EmbeddingInputError(f"{len(syn)} distilled features but {len(sy)} labels")
    return real, ry, syn, sy


def _present_means(real: np.ndarray, ry: np.ndarray, sy: np.ndarray, num_classes: int) -> np.ndarray:
    """The class means of the real features, checked to hold every distilled image's class and another one."""
    means = class_means(real, ry, num_classes)
    present = ~np.isnan(means).any(axis=1)
    missing = sorted(set(sy.tolist()) - set(np.flatnonzero(present).tolist()))
    if missing:
        raise EmbeddingInputError(f"distilled images of classes {missing} have no real image of their class "
                                  f"in the split: use a split that holds every class")
    if present.sum() < 2:
        raise EmbeddingInputError("the real split holds fewer than two classes: margins need another class")
    return means


def periphery(real_features: Any, real_labels: Any, syn_features: Any, syn_labels: Any,
              num_classes: int | None = None, class_names: Sequence[str] | None = None):
    """The periphery numbers of every distilled image (see the module docstring).

    Args:
        real_features, real_labels: features (N × D) and labels (N) of the real images of a split.
        syn_features, syn_labels: features (M × D) and labels (M) of the distilled images, from the
            same backbone and preprocessing.
        num_classes: default: one more than the largest label seen.
        class_names: names for the ``class_name`` and ``nearest_other_name`` columns.

    Returns:
        DataFrame, one row per distilled image, in its order: ``image`` (index in the set),
        ``label``, ``class_name``, ``distance`` (to its class mean), ``percentile``, ``class_radius``
        (median distance of the class's real images to their mean), ``distance_ratio``,
        ``nearest_other`` (label of the nearest other class mean), ``nearest_other_name``,
        ``nearest_other_distance``, ``margin``.

    Raises:
        EmbeddingInputError: shapes that disagree, or a distilled image of a class with no real image.
    """
    import pandas as pd

    real, ry, syn, sy = _inputs(real_features, real_labels, syn_features, syn_labels)
    if num_classes is None:
        num_classes = int(max(ry.max(initial=-1), sy.max(initial=-1))) + 1
    means = _present_means(real, ry, sy, num_classes)
    present = ~np.isnan(means).any(axis=1)
    real_dist = np.linalg.norm(real - means[ry], axis=1)
    own_dist = np.linalg.norm(syn - means[sy], axis=1)  # the same formula as real_dist: ties compare equal
    to_means = _distances(syn, np.where(present[:, None], means, 0.0))
    to_means[:, ~present] = np.inf  # absent classes are never the nearest
    rows = []
    names = list(class_names) if class_names is not None else None
    for i, c in enumerate(sy.tolist()):
        own = own_dist[i]
        cls = real_dist[ry == c]
        others = to_means[i].copy()
        others[c] = np.inf
        j = int(np.argmin(others))
        radius = float(np.median(cls))
        rows.append({
            "image": i, "label": c, "class_name": names[c] if names else str(c),
            "distance": float(own), "percentile": float(100.0 * np.count_nonzero(cls < own) / len(cls)),
            "class_radius": radius, "distance_ratio": float(own / radius) if radius > 0 else float("inf"),
            "nearest_other": j, "nearest_other_name": names[j] if names else str(j),
            "nearest_other_distance": float(others[j]), "margin": float(others[j] - own),
        })
    return pd.DataFrame(rows, columns=PERIPHERY_COLUMNS)


def summarize(table) -> dict[str, float]:
    """A set's periphery numbers in a few figures (what the report's summary table and MLflow show).

    Returns:
        ``n_images``; ``median_percentile``, ``mean_percentile``; ``frac_periphery`` (share of images
        at or beyond the 90th percentile of their class), ``frac_outside`` (share farther than every
        real image of their class); ``median_distance_ratio``; ``mean_margin``, ``frac_negative_margin``
        (share nearer another class's mean than their own).
    """
    n = len(table)
    if n == 0:
        return {"n_images": 0}
    p, m = table["percentile"].to_numpy(), table["margin"].to_numpy()
    return {
        "n_images": float(n),
        "median_percentile": float(np.median(p)), "mean_percentile": float(p.mean()),
        "frac_periphery": float(np.mean(p >= PERIPHERY_PERCENTILE)), "frac_outside": float(np.mean(p >= 100.0)),
        "median_distance_ratio": float(np.median(table["distance_ratio"].to_numpy())),
        "mean_margin": float(m.mean()), "frac_negative_margin": float(np.mean(m < 0)),
    }


# ---------------------------------------------------------------- projection


def _pca_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the top-2 principal directions (2 × D) of ``x``, signs fixed (largest loading positive)."""
    mu = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:  # one sample or one feature: pad with a zero direction
        comps = np.vstack([comps, np.zeros((2 - comps.shape[0], x.shape[1]))])
    signs = np.sign(comps[np.arange(2), np.abs(comps).argmax(axis=1)])
    return mu, comps * np.where(signs == 0, 1.0, signs)[:, None]


def project_2d(real: Any, means: Any, syn: Any, method: str = "pca",
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real features, class means and distilled features in the same 2-D map.

    PCA is fitted on the real features alone (the map is that of the real data; class means and
    distilled images are placed in it). t-SNE has no out-of-sample map, so it embeds all three
    together (``sklearn.manifold.TSNE``, PCA initialisation, ``seed``); it is slower and its
    distances are only locally meaningful.

    Returns:
        ``(real_2d, means_2d, syn_2d)``.
    """
    r = _array(real, "real features", 2).astype(np.float64)
    mu_ = _array(means, "class means", 2).astype(np.float64)
    s = _array(syn, "distilled features", 2).astype(np.float64)
    if method == "pca":
        mu, comps = _pca_fit(r)
        return (r - mu) @ comps.T, (mu_ - mu) @ comps.T, (s - mu) @ comps.T
    if method == "tsne":
        from sklearn.manifold import TSNE

        x = np.vstack([r, mu_, s])
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
        z = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(x)
        return z[: len(r)], z[len(r) : len(r) + len(mu_)], z[len(r) + len(mu_) :]
    raise EmbeddingInputError(f"unknown projection {method!r}; choose one of {', '.join(PROJECTIONS)}")


@dataclass
class SetEmbedding:
    """One distilled set among its real classes.

    Attributes:
        periphery: :func:`periphery`'s table (every distilled image).
        summary: :func:`summarize` of it.
        points: the map's points: ``kind`` (``real`` / ``mean`` / ``distilled``), ``label``,
            ``class_name``, ``x``, ``y``, ``image`` (index in the set for distilled points, else -1).
        method: the projection.
        classes: the classes drawn on the map (all of them, or the first ``max_classes``).
    """

    periphery: Any
    summary: dict[str, float]
    points: Any
    method: str
    classes: list[int] = field(default_factory=list)


def embed_set(real_features: Any, real_labels: Any, syn_features: Any, syn_labels: Any, *,
              class_names: Sequence[str] | None = None, num_classes: int | None = None,
              method: str = "pca", seed: int = 0, max_classes: int | None = 20,
              max_real_per_class: int | None = 500) -> SetEmbedding:
    """Periphery numbers of every distilled image (all classes) and the 2-D map of the first classes.

    Args:
        real_features, real_labels, syn_features, syn_labels: as :func:`periphery`.
        class_names, num_classes: as :func:`periphery`.
        method: ``pca`` or ``tsne``.
        seed: t-SNE's seed, and the subsampling of real points.
        max_classes: the map draws the first this many classes of the set (a 1,000-class map is a
            blur); ``None``: all. The numbers always cover every class.
        max_real_per_class: real points drawn per class (a random subset beyond it; the class
            means and the numbers use every real image).
    """
    import pandas as pd

    if method not in PROJECTIONS:
        raise EmbeddingInputError(f"unknown projection {method!r}; choose one of {', '.join(PROJECTIONS)}")
    real, ry, syn, sy = _inputs(real_features, real_labels, syn_features, syn_labels)
    table = periphery(real, ry, syn, sy, num_classes=num_classes, class_names=class_names)
    if num_classes is None:
        num_classes = int(max(ry.max(initial=-1), sy.max(initial=-1))) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    shown = sorted(set(sy.tolist()))
    if max_classes is not None:
        shown = shown[:max_classes]
    means = class_means(real, ry, num_classes)[shown]
    rng = np.random.default_rng(seed)
    keep = []
    for c in shown:
        idx = np.flatnonzero(ry == c)
        if max_real_per_class is not None and len(idx) > max_real_per_class:
            idx = np.sort(rng.choice(idx, max_real_per_class, replace=False))
        keep.append(idx)
    keep_idx = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
    syn_idx = np.flatnonzero(np.isin(sy, shown))
    r2, m2, s2 = project_2d(real[keep_idx], means, syn[syn_idx], method=method, seed=seed)
    parts = [
        pd.DataFrame({"kind": "real", "label": ry[keep_idx], "x": r2[:, 0], "y": r2[:, 1], "image": -1}),
        pd.DataFrame({"kind": "mean", "label": np.asarray(shown, dtype=np.int64), "x": m2[:, 0], "y": m2[:, 1],
                      "image": -1}),
        pd.DataFrame({"kind": "distilled", "label": sy[syn_idx], "x": s2[:, 0], "y": s2[:, 1], "image": syn_idx}),
    ]
    points = pd.concat(parts, ignore_index=True)
    points.insert(2, "class_name", [names[c] for c in points["label"]])
    return SetEmbedding(table, summarize(table), points, method, [int(c) for c in shown])


# ---------------------------------------------------------------- the map


def _draw_points(ax, pts, color: dict) -> None:
    """Real points by class, a dotted line from each distilled image to its class mean, the means (named)."""
    real = pts[pts["kind"] == "real"]
    ax.scatter(real["x"], real["y"], s=8, c=[color[c] for c in real["label"]], alpha=0.5, linewidths=0)
    means = pts[pts["kind"] == "mean"].set_index("label")
    for _, p in pts[pts["kind"] == "distilled"].iterrows():
        m = means.loc[p["label"]]
        ax.plot([p["x"], m["x"]], [p["y"], m["y"]], ls=":", lw=0.8, color=color[p["label"]], zorder=2)
    ax.scatter(means["x"], means["y"], marker="X", s=70, c=[color[c] for c in means.index], edgecolors="k",
               linewidths=0.8, zorder=4)
    if len(color) <= 30:
        for _, m in means.iterrows():
            ax.annotate(str(m["class_name"]), (m["x"], m["y"]), xytext=(4, 4), textcoords="offset points",
                        fontsize=8, weight="bold", zorder=5)


def _draw_thumbnails(ax, pts, imgs: np.ndarray, color: dict, thumb_px: int) -> None:
    """Each distilled image at its projected feature, framed in its class's colour."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    for _, p in pts[pts["kind"] == "distilled"].iterrows():
        img = np.clip(imgs[int(p["image"])].astype(np.float32), 0, 1).transpose(1, 2, 0)
        zoom = thumb_px / max(img.shape[:2])
        box = AnnotationBbox(OffsetImage(img, zoom=zoom, interpolation="nearest" if zoom >= 1 else "antialiased"),
                             (p["x"], p["y"]), frameon=True, pad=0.15, zorder=6,
                             bboxprops={"edgecolor": color[p["label"]], "linewidth": 1.5})
        ax.add_artist(box)


def _label_axes(ax, emb: SetEmbedding, title: str) -> None:
    """Room for the thumbnails at the edges, the projection's axis names, the title with the set's numbers."""
    xs = emb.points["x"].to_numpy()
    ys = emb.points["y"].to_numpy()
    if len(xs):
        dx, dy = np.ptp(xs) or 1.0, np.ptp(ys) or 1.0
        ax.set_xlim(xs.min() - 0.08 * dx, xs.max() + 0.08 * dx)
        ax.set_ylim(ys.min() - 0.08 * dy, ys.max() + 0.08 * dy)
    name = {"pca": "PCA", "tsne": "t-SNE"}[emb.method]
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    s = emb.summary
    note = (f"median percentile {s.get('median_percentile', float('nan')):.0f}, "
            f"{100 * s.get('frac_outside', float('nan')):.0f}% outside their class, "
            f"{100 * s.get('frac_negative_margin', float('nan')):.0f}% nearer another class mean")
    ax.set_title((title + "\n" if title else "") + note, fontsize=9)


def plot_embedding(emb: SetEmbedding, images: Any, path: str | Path, title: str = "",
                   thumb_px: int = 28) -> Path:
    """Draw a set's map: real points by class, class means (×, named), distilled images as thumbnails.

    Each thumbnail sits at its image's projected feature, framed in its class's colour, with a
    dotted line to its class mean. Written atomically as PNG (matplotlib, Agg).

    Args:
        emb: from :func:`embed_set`.
        images: the set's images (N × 3 × H × W in [0, 1], tensor or array), indexed by ``emb.points.image``.
        path: the PNG to write.
        title: the figure's title.
        thumb_px: thumbnails' side on the figure, in pixels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = _array(images, "images", 4)
    cmap = plt.get_cmap("tab10" if len(emb.classes) <= 10 else "tab20")
    color = {c: cmap(i % cmap.N) for i, c in enumerate(emb.classes)}
    fig, ax = plt.subplots(figsize=(7.5, 6.0), dpi=110)
    try:
        _draw_points(ax, emb.points, color)
        _draw_thumbnails(ax, emb.points, imgs, color, thumb_px)
        _label_axes(ax, emb, title)
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)
