"""The result tables of a sweep, computed once, from one frame, by one function each.

Every reader of a sweep's numbers goes through :func:`sweep_tables`: the finished trials' results, the
shared baselines, the trials that did not finish and the resolved spec in, a :class:`SweepTables` out —
the long results frame (:func:`results_frame`) and, per dataset, the cross-model table and heatmap data
(:func:`cross_model_table`), the ablation table (:func:`ablation_table`), the cells that are missing and
why (:func:`missing_cells`, :func:`ablation_missing`) and our numbers beside the paper's
(:func:`paper_comparison`). The sweep writes that object (:func:`write_tables`: Markdown, Parquet and
heatmap PNG under ``tables/``, logged to the parent run; the Markdown is what the command prints;
:func:`folder_tables` reads a sweep folder into it); the report (:mod:`lgm_ray.report.frames`) renders
the very same object. No reader computes a mean of its own.

Like with like: the ablation table averages every row over the same cells — the ablation backbones (those
distilled at every ablation point) evaluated on themselves (same-model) and on every other evaluation
backbone (cross-model) — and says so in its title; a row missing any of its cells reads ``—``. The
cross-model table's ``avg`` column is likewise the mean over every evaluation backbone, ``—`` for a row
that lacks one. Cells the sweep asked for and has no result for are named, with the reason (the trial
failed, with its error; unfinished; the baseline failed or has not run).

Why apart from :mod:`lgm_ray.results.tracking`: these are pure pandas / matplotlib over result records and
know nothing of MLflow. pandas and matplotlib are imported inside the functions that use them, so
importing this module stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lgm_ray.common.atomic import save_figure, write_text
from lgm_ray.results.labels import ablation_label

if TYPE_CHECKING:
    import pandas as pd

    from lgm_ray.results.folder import SweepFolder

METRIC_FIELDS = ("top1_mean", "top1_std", "top5_mean", "top5_std")
BASELINE_ORDER = ("centroids", "neighbors", "random", "full")
SHARED_BASELINES = ("random", "centroids", "full")  # once per (dataset, evaluation backbone)
FRAME_COLUMNS = ("dataset", "training_set", "distill_backbone", "ablation", "eval_backbone", *METRIC_FIELDS,
                 "n_values")
RESULTS_FILE = "results.parquet"  # the long frame, in the tables folder
SAME, CROSS = "same-model", "cross-model"  # the ablation table's columns
AVG = "avg"  # the cross-model table's last column
DASH = "—"  # a cell with no number


# ---------------------------------------------------------------- the long frame


def results_frame(trials: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (training set, evaluation backbone): the long table behind every view.

    Args:
        trials: per finished trial ``{"dataset", "backbone", "ablation" (label), "seed", "evals": {eval
            backbone: evaluation result}, "neighbors": {eval backbone: result}}`` (results as
            :func:`lgm_ray.evaluate.protocol.evaluate` returns them).
        baselines: ``{"dataset", "baseline", "backbone" (evaluation), **evaluation result}``; a record
            without per-seed values (a baseline's MLflow run) keeps its recorded mean and std.

    Returns:
        DataFrame with ``dataset, training_set, distill_backbone, ablation, eval_backbone, top1_mean,
        top1_std, top5_mean, top5_std, n_values`` — distilled sets pooled over distillation seeds
        (mean and population std over every (distillation seed, probe seed) value).
    """
    import pandas as pd

    rows = []
    for (ds, kind, src, abl, b), g in _pool(trials, baselines).items():
        if g["recorded"] is not None:  # one record with no per-seed values: as recorded
            rec = g["recorded"]
            stats = [float(rec.get(m, float("nan"))) for m in METRIC_FIELDS]
            n = rec.get("n_values")
        else:
            stats = [*_mean_std(g["top1"]), *_mean_std(g["top5"])]
            n = len(g["top1"])
        rows.append({"dataset": ds, "training_set": kind, "distill_backbone": src, "ablation": abl,
                     "eval_backbone": b, **dict(zip(METRIC_FIELDS, stats, strict=True)), "n_values": n})
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))


def _pool(trials: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """(dataset, training set, distillation backbone, ablation, evaluation backbone) → every top-1 and
    top-5 value of that row (each probe seed of each distillation seed), and the record itself when it is
    the row's only one and holds no per-seed values."""
    groups: dict[tuple, dict[str, Any]] = {}

    def add(key: tuple, res: dict[str, Any]) -> None:
        g = groups.setdefault(key, {"top1": [], "top5": [], "records": 0})
        g["records"] += 1
        per_seed = res.get("top1_per_seed")
        g["top1"] += list(per_seed or [res["top1_mean"]])
        g["top5"] += list(res.get("top5_per_seed") or [res["top5_mean"]] * len(per_seed or [0]))
        g["recorded"] = res if g["records"] == 1 and not per_seed else None

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


def _mean_of_all(values: list[float | None]) -> float:
    """The mean of every value, NaN when there is none or any is missing: never a mean of fewer cells."""
    if not values or any(v is None or math.isnan(v) for v in values):
        return float("nan")
    return sum(values) / len(values)


# ---------------------------------------------------------------- what the sweep asked for


def _union(first, *more) -> tuple[str, ...]:
    """The names of ``first`` then those of ``more`` not seen yet, in order, each once."""
    out = dict.fromkeys(str(x) for x in first)
    for seq in more:
        out.update(dict.fromkeys(str(x) for x in seq if x not in ("", None)))
    return tuple(out)


@dataclass(frozen=True)
class SweepGrid:
    """What a sweep was asked for: from its resolved spec (``spec.yaml``), completed by what its results hold.

    Attributes:
        datasets, backbones (distillation), eval_backbones: the names, the spec's order first.
        ablations: the ablation points' labels; the first is the reference point, where every backbone
            distils.
        ablation_backbones: the backbones distilled at every ablation point (the spec's
            ``ablation_backbones``, all backbones when it names none); ``None`` until known — with no
            spec, the backbones the results hold at every point.
        baselines: the baselines asked for (``None``: not known; those the results hold).
    """

    datasets: tuple[str, ...] = ()
    backbones: tuple[str, ...] = ()
    eval_backbones: tuple[str, ...] = ()
    ablations: tuple[str, ...] = ()
    ablation_backbones: tuple[str, ...] | None = None
    baselines: tuple[str, ...] | None = None

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> SweepGrid:
        """The grid of a resolved spec (:meth:`lgm_ray.sweep.spec.SweepSpec.to_dict`); empty for none."""
        if not spec:
            return cls()
        ds = spec.get("datasets") or {}
        names = list(ds) if isinstance(ds, dict) else [d["name"] if isinstance(d, dict) else d for d in ds]
        backbones = _union(spec.get("backbones") or ())
        chosen = spec.get("ablation_backbones")
        return cls(_union(names), backbones, _union(spec.get("eval_backbones") or backbones),
                   _union(ablation_label(p or {}) for p in spec.get("ablations") or [{}]),
                   _union(chosen) if chosen is not None else (backbones or None),
                   _union(spec["baselines"]) if spec.get("baselines") is not None else None)

    def completed(self, frame: pd.DataFrame, missing: list[dict[str, Any]]) -> SweepGrid:
        """This grid with every name the results (``frame``) and the unfinished trials (``missing``) hold
        added after the spec's; what the spec does not say is read from them."""
        distilled = frame[frame["training_set"] == "distilled"]
        points = list(zip(distilled["distill_backbone"], distilled["ablation"], strict=True))
        points += [(m["backbone"], m["ablation"]) for m in missing]
        ablations = _union(self.ablations, [a for _, a in points])
        if not self.ablations and "default" in ablations:  # no spec: the point with no ablation first
            ablations = _union(["default"], ablations)
        backbones = _union(self.backbones, [b for b, _ in points])
        chosen = self.ablation_backbones
        if chosen is None:
            at = [{b for b, a in points if a == label} for label in ablations[1:]]
            chosen = tuple(b for b in backbones if all(b in s for s in at))
        kinds = [k for k in frame["training_set"] if k != "distilled"]
        return SweepGrid(_union(self.datasets, frame["dataset"], [m["dataset"] for m in missing]), backbones,
                         _union(self.eval_backbones, frame["eval_backbone"]), ablations or ("default",), chosen,
                         _union(self.baselines or (), kinds))

    @property
    def reference(self) -> str:
        """The reference ablation point's label (``default`` when the sweep has no ablation)."""
        return self.ablations[0] if self.ablations else "default"

    def distilled_at(self, ablation: str) -> tuple[str, ...]:
        """The backbones the grid distils at an ablation point: all at the reference one, the ablation
        backbones at the others."""
        if ablation == self.reference:
            return self.backbones
        return tuple(b for b in self.backbones if b in (self.ablation_backbones or ()))

    def row_label(self, kind: str, backbone: str = "", ablation: str = "") -> str:
        """A cross-model table's row: ``distilled: B``, ``neighbors``, or a baseline's name; `` [point]``
        appended to the first two when the sweep has several ablation points."""
        tag = f" [{ablation}]" if len(self.ablations) > 1 else ""
        if kind == "distilled":
            return f"distilled: {backbone}{tag}"
        return f"neighbors{tag}" if kind == "neighbors" else kind


def trial_state(key: str, dataset: str, backbone: str, ablation: str, seed: int, status: str,
                error: str | None = None) -> dict[str, Any]:
    """A trial with no result, as :func:`sweep_tables` takes it: its point, ``failed`` or ``unfinished``,
    and the last line of its error."""
    return {"key": key, "dataset": dataset, "backbone": backbone, "ablation": ablation, "seed": int(seed),
            "status": status, "error": error}


# ---------------------------------------------------------------- the tables


@dataclass(frozen=True)
class _Row:
    """One row of a cross-model table: its label, what it holds, and the columns the grid asks of it."""

    label: str
    kind: str
    backbone: str = ""
    ablation: str = ""
    expected: tuple[str, ...] = ()


def _rows(grid: SweepGrid, f: pd.DataFrame) -> list[_Row]:
    """The rows of one dataset's cross-model table in the paper's order: the distilled sets (by ablation
    point, then backbone), then centroids, neighbors (per point), random, full — every row the grid asks for
    and every row the results hold."""
    cols = grid.eval_backbones
    held = f[f["training_set"] == "distilled"]
    points = dict.fromkeys((a, b) for a in grid.ablations for b in grid.distilled_at(a))
    points.update(dict.fromkeys(zip(held["ablation"], held["distill_backbone"], strict=True)))
    order = sorted(points, key=lambda p: (grid.ablations.index(p[0]), grid.backbones.index(p[1])))
    rows = [_Row(grid.row_label("distilled", b, a), "distilled", b, a, cols if b in grid.distilled_at(a) else ())
            for a, b in order]
    kinds = grid.baselines or ()
    neighbors_at = set(f[f["training_set"] == "neighbors"]["ablation"])
    for kind in BASELINE_ORDER:
        if kind == "neighbors":
            rows += [_Row(grid.row_label(kind, ablation=a), kind, ablation=a,
                          expected=tuple(b for b in cols if b in grid.distilled_at(a)))
                     for a in grid.ablations if a in neighbors_at or (kind in kinds and grid.distilled_at(a))]
        elif kind in kinds:
            rows.append(_Row(kind, kind, expected=cols))
    return rows


def cross_model_table(frame: pd.DataFrame, grid: SweepGrid, dataset: str,
                      metric: str = "top1") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cross-model table of one dataset — rows training sets, columns evaluation backbones, then
    ``avg`` — and the heatmap's data.

    Rows (:func:`_rows`): ``distilled: BACKBONE`` (`` [point]`` appended when the sweep has several
    ablation points) for every set the grid asks for, then the baselines in the paper's order
    (centroids, neighbors, random, full; a ``neighbors`` row picks, for column B, the neighbours of the
    set distilled with B). A row the grid asks for and the results lack is all NaN (named by
    :func:`missing_cells`). ``avg``: the mean over every evaluation backbone, NaN for a row lacking one.

    Args:
        frame: the long frame of :func:`results_frame`.
        grid: the sweep's grid, completed (:meth:`SweepGrid.completed`).
        dataset: the dataset whose rows make the table.
        metric: ``top1`` or ``top5``.

    Returns:
        ``(means, stds)`` DataFrames indexed by row label (``stds``' ``avg`` is NaN).
    """
    import pandas as pd

    f = frame[frame["dataset"] == dataset]
    cells: dict[str, dict[str, tuple[float, float]]] = {}
    for r in f.to_dict("records"):
        kind = r["training_set"]
        if kind == "neighbors" and r["distill_backbone"] != r["eval_backbone"]:
            continue
        label = grid.row_label(kind, r["distill_backbone"], r["ablation"])
        cells.setdefault(label, {})[r["eval_backbone"]] = (r[f"{metric}_mean"], r[f"{metric}_std"])
    labels = [row.label for row in _rows(grid, f)]
    cols = list(grid.eval_backbones)
    means = pd.DataFrame([[cells.get(lb, {}).get(c, (math.nan, math.nan))[0] for c in cols] for lb in labels],
                         index=labels, columns=cols, dtype=float)
    stds = pd.DataFrame([[cells.get(lb, {}).get(c, (math.nan, math.nan))[1] for c in cols] for lb in labels],
                        index=labels, columns=cols, dtype=float)
    means[AVG] = [_mean_of_all(list(means.loc[lb, cols])) for lb in labels] if labels else []
    stds[AVG] = math.nan
    means.index.name = stds.index.name = "training set"
    return means, stds


def ablation_cells(grid: SweepGrid) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The (distillation, evaluation) backbone pairs every row of the ablation table averages: same-model
    ``A→A`` and cross-model ``A→B`` (B ≠ A) for every ablation backbone A and evaluation backbone B."""
    chosen = grid.ablation_backbones or ()
    same = [(a, a) for a in chosen if a in grid.eval_backbones]
    cross = [(a, b) for a in chosen for b in grid.eval_backbones if b != a]
    return same, cross


def ablation_table(frame: pd.DataFrame, grid: SweepGrid, dataset: str, metric: str = "top1") -> pd.DataFrame:
    """Same-model and cross-model averages per ablation point (the paper's ImageNet-100 ablation table).

    Every row averages the same cells (:func:`ablation_cells`): the ablation backbones, same-model and
    cross-model. A row lacking any of its cells is NaN (named by :func:`ablation_missing`), never a mean
    over fewer cells than the others.

    Args:
        frame: the long frame of :func:`results_frame`.
        grid: the sweep's grid, completed (:meth:`SweepGrid.completed`).
        dataset: the dataset whose distilled rows are averaged.
        metric: ``top1`` or ``top5``.

    Returns:
        A frame indexed by ablation label (every point of the grid, in order) with columns ``same-model``
        and ``cross-model``.
    """
    import pandas as pd

    value = _distilled_values(frame, dataset, metric)
    same, cross = ablation_cells(grid)
    rows = {a: {SAME: _mean_of_all([value.get((x, a, y)) for x, y in same]),
                CROSS: _mean_of_all([value.get((x, a, y)) for x, y in cross])} for a in grid.ablations}
    out = pd.DataFrame.from_dict(rows, orient="index", columns=[SAME, CROSS], dtype=float)
    out.index.name = "ablation"
    return out


def _distilled_values(frame: pd.DataFrame, dataset: str, metric: str) -> dict[tuple[str, str, str], float]:
    """(distillation backbone, ablation, evaluation backbone) → the distilled set's mean."""
    f = frame[(frame["dataset"] == dataset) & (frame["training_set"] == "distilled")]
    return {(r["distill_backbone"], r["ablation"], r["eval_backbone"]): r[f"{metric}_mean"]
            for r in f.to_dict("records")}


def ablation_title(grid: SweepGrid, dataset: str) -> str:
    """The ablation table's title: what its rows are averaged over."""
    same, cross = ablation_cells(grid)
    chosen = ", ".join(grid.ablation_backbones or ()) or "no backbone (none distilled at every point)"

    def pairs(cells: list[tuple[str, str]]) -> str:
        n = f"{len(cells)} cell{'s' if len(cells) != 1 else ''} a row"
        return f"{n}: " + ", ".join(f"{a}→{b}" for a, b in cells) if cells else "no such pair"

    return (f"{dataset}: ablation, mean linear-probe top-1 (%) over {chosen} — same-model ({pairs(same)}); "
            f"cross-model ({pairs(cross)}); a row missing any of its cells reads {DASH}")


def cross_model_title(dataset: str) -> str:
    """The cross-model table's title: what its cells and its ``avg`` are."""
    return (f"{dataset}: cross-model linear-probe top-1 (%), mean ± std over probe seeds (and distillation "
            f"seeds) — rows: training set, columns: evaluation backbone; {AVG}: the mean over every "
            f"evaluation backbone, {DASH} for a row lacking one")


# ---------------------------------------------------------------- missing cells, named


def _why(dataset: str, backbone: str, ablation: str, missing: list[dict[str, Any]]) -> str:
    """Why the set distilled with ``backbone`` at ``ablation`` has no number: its trials that did not finish
    (failed, with the last line of the error; unfinished), else that no trial of it reported one."""
    states = [m for m in missing if (m["dataset"], m["backbone"], m["ablation"]) == (dataset, backbone, ablation)]
    if not states:
        return "no trial reported it"
    return "; ".join(f"trial {m['key']} {m['status']}" + (f" ({m['error']})" if m.get("error") else "")
                     for m in states)


def missing_cells(means: pd.DataFrame, frame: pd.DataFrame, grid: SweepGrid, dataset: str,
                  missing: list[dict[str, Any]]) -> list[str]:
    """Every cell of a cross-model table the grid asks for and the results lack, named with the reason;
    also the sets pooled over fewer distillation seeds than asked (some of their trials did not finish).

    Args:
        means: the table (:func:`cross_model_table`).
        frame: the long frame it came from.
        grid: the completed grid.
        dataset: the table's dataset.
        missing: the trials with no result (:func:`trial_state`).

    Returns:
        One line per row with missing cells (``ROW: no result on B1, B2 — REASON``), in the table's order.
    """
    f = frame[frame["dataset"] == dataset]
    lines = []
    mine = [m for m in missing if m["dataset"] == dataset]
    if mine and not (f["training_set"] == "distilled").any():
        counts = {s: sum(m["status"] == s for m in mine) for s in ("failed", "unfinished")}
        lines.append(f"{dataset}: no distilled set — every trial failed or is unfinished "
                     f"({counts['failed']} failed, {counts['unfinished']} unfinished)")
    for row in _rows(grid, f):
        lost = [c for c in row.expected if math.isnan(means.loc[row.label, c])]
        if not lost:
            if row.kind == "distilled" and any((m["backbone"], m["ablation"]) == (row.backbone, row.ablation)
                                               for m in mine):
                lines.append(f"{row.label}: over its finished seeds only — "
                             f"{_why(dataset, row.backbone, row.ablation, mine)}")
            continue
        where = "any evaluation backbone" if len(lost) == len(grid.eval_backbones) > 1 else ", ".join(lost)
        if row.kind == "distilled":
            why = _why(dataset, row.backbone, row.ablation, mine)
        elif row.kind == "neighbors":  # column B: the neighbours of the set distilled with B
            why = "; ".join(f"{b}: {_why(dataset, b, row.ablation, mine)}" for b in lost)
        else:
            why = "the shared baseline failed or has not run (its MLflow run, if any, says which)"
        lines.append(f"{row.label}: no result on {where} — {why}")
    return lines


def ablation_missing(ablation: pd.DataFrame, frame: pd.DataFrame, grid: SweepGrid, dataset: str,
                     missing: list[dict[str, Any]]) -> list[str]:
    """Every ablation row shown as ``—``: which of its cells are missing and why."""
    value = _distilled_values(frame, dataset, "top1")
    same, cross = ablation_cells(grid)
    mine = [m for m in missing if m["dataset"] == dataset]
    lines = []
    for a in ablation.index:
        for col, cells in ((SAME, same), (CROSS, cross)):
            if not math.isnan(ablation.loc[a, col]):
                continue
            lost = [(x, y) for x, y in cells if value.get((x, a, y)) is None]
            if not cells:
                lines.append(f"{a}, {col}: the grid has no such pair")
                continue
            whys = dict.fromkeys(_why(dataset, x, a, mine) for x, _ in lost)
            lines.append(f"{a}, {col}: no result for " + ", ".join(f"{x}→{y}" for x, y in lost)
                         + " — " + "; ".join(whys))
    return lines


# ---------------------------------------------------------------- beside the paper


def paper_rows(paper: Any) -> tuple[list[str], dict[str, list[float]]] | None:
    """The columns and rows of the spec's ``paper`` field, or ``None`` when it has no such form.

    Rows whose length differs from the columns' are left out.
    """
    if not isinstance(paper, dict) or not isinstance(paper.get("columns"), list):
        return None
    rows = {str(k): v for k, v in paper.items() if k != "columns" and isinstance(v, list)
            and len(v) == len(paper["columns"])}
    return [str(c) for c in paper["columns"]], rows


def _lookup(table: pd.DataFrame | None, rows: list[str], col: str) -> float:
    """``table[row, col]`` for the first of ``rows`` it has; NaN where there is none."""
    if table is None or col not in table.columns:
        return float("nan")
    hit = next((r for r in rows if r in table.index), None)
    return float(table.loc[hit, col]) if hit is not None else float("nan")


def paper_comparison(paper: Any, means: pd.DataFrame | None, ablation: pd.DataFrame | None,
                     reference: str = "default") -> pd.DataFrame | None:
    """Ours beside the paper's numbers, for the table the spec's ``paper`` field names.

    ``paper``: ``{columns: [...], ROW: [values], ...}``. Columns ``[same-model, cross-model]`` name the
    ablation table (rows: ablation labels); otherwise a cross-model table (columns: evaluation
    backbones and ``avg``; row ``distilled``: each column the set distilled with that backbone at the
    ``reference`` ablation point — our same-model diagonal; other rows: the baselines). Our ``avg``: the
    mean of our cells of the paper's other columns, NaN when one is missing.

    Returns:
        DataFrame ``table, row, column, ours, paper, delta`` (``ours`` NaN where the sweep has no such
        cell), or ``None`` when ``paper`` has no such form.
    """
    import pandas as pd

    parsed = paper_rows(paper)
    if parsed is None:
        return None
    cols, rows = parsed
    is_ablation = set(cols) == {SAME, CROSS}
    out = []
    for row, values in rows.items():
        ours = {}
        for col in cols:
            if is_ablation:
                ours[col] = _lookup(ablation, [row], col)
            elif col != AVG:
                names = [f"distilled: {col}", f"distilled: {col} [{reference}]"] if row == "distilled" else [
                    row, f"{row} [{reference}]"]
                ours[col] = _lookup(means, names, col)
        if not is_ablation and AVG in cols:
            ours[AVG] = _mean_of_all([ours[c] for c in cols if c != AVG])
        for col, p in zip(cols, values, strict=True):
            out.append({"table": "ablation" if is_ablation else "cross-model", "row": row, "column": col,
                        "ours": ours[col], "paper": float(p), "delta": ours[col] - float(p)})
    return pd.DataFrame(out, columns=["table", "row", "column", "ours", "paper", "delta"])


# ---------------------------------------------------------------- every table of a sweep, once


@dataclass
class DatasetTables:
    """The tables of one dataset.

    Attributes:
        dataset: its name.
        means, stds: the cross-model table (:func:`cross_model_table`), also the heatmap's data.
        cross_title: what its cells and ``avg`` are.
        missing: its missing cells, named (:func:`missing_cells`).
        ablation: the ablation table (:func:`ablation_table`), ``None`` for a single ablation point.
        ablation_title: what its rows are averaged over (:func:`ablation_title`).
        ablation_over: the backbones its rows average, comma-separated (the heatmap's title).
        ablation_missing: its ``—`` rows, named (:func:`ablation_missing`).
        paper: ours beside the paper's numbers (:func:`paper_comparison`), ``None`` when the spec has none.
    """

    dataset: str
    means: pd.DataFrame
    stds: pd.DataFrame
    cross_title: str
    missing: list[str]
    ablation: pd.DataFrame | None
    ablation_title: str
    ablation_over: str
    ablation_missing: list[str]
    paper: pd.DataFrame | None

    @property
    def paper_kind(self) -> str | None:
        """``cross-model`` or ``ablation``: the table the paper's numbers belong to."""
        return None if self.paper is None or not len(self.paper) else str(self.paper["table"].iloc[0])

    def cross_markdown(self) -> str:
        """The cross-model table as Markdown, its missing cells listed under it."""
        return to_markdown(self.means, self.stds, self.cross_title) + _notes_markdown(self.missing)

    def ablation_markdown(self) -> str:
        """The ablation table as Markdown (empty for none), its ``—`` rows explained under it."""
        if self.ablation is None:
            return ""
        return to_markdown(self.ablation, None, self.ablation_title) + _notes_markdown(self.ablation_missing)

    def paper_markdown(self) -> str:
        """Ours beside the paper's numbers as Markdown (empty for none)."""
        if self.paper_kind is None:
            return ""
        lines = [f"**{self.dataset}: ours / paper (Δ), the spec's `paper` field ({self.paper_kind} table)**", "",
                 "| row | column | ours | paper | Δ |", "|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['column']} | {_cell(r['ours'])} | {r['paper']:.1f} | {_cell(r['delta'])} |"
                  for r in self.paper.to_dict("records")]
        return "\n".join(lines) + "\n"


def _notes_markdown(notes: list[str]) -> str:
    return ("\nMissing cells:\n\n" + "".join(f"- {n}\n" for n in notes)) if notes else ""


@dataclass
class SweepTables:
    """Every table of a sweep (:func:`sweep_tables`): what ``tables/``, the printed summary and the report show.

    Attributes:
        frame: the long results frame (:func:`results_frame`).
        grid: the completed grid the tables follow.
        datasets: one :class:`DatasetTables` per dataset of the grid, in order.
    """

    frame: pd.DataFrame
    grid: SweepGrid
    datasets: list[DatasetTables]

    def markdown(self) -> str:
        """Every table as Markdown, dataset by dataset (what the sweep prints at its end)."""
        parts = [p for t in self.datasets for p in (t.cross_markdown(), t.ablation_markdown(), t.paper_markdown())
                 if p]
        return "\n".join(parts)


def sweep_tables(spec: dict[str, Any] | None, trials: list[dict[str, Any]], baselines: list[dict[str, Any]],
                 missing: list[dict[str, Any]] = (), metric: str = "top1") -> SweepTables:
    """Every table of a sweep, computed once: the one function the sweep and the report call.

    Args:
        spec: the resolved spec (``spec.yaml``): the grid the tables follow and the ``paper`` field; ``{}``
            or ``None``: the grid is read from the results alone.
        trials: the finished trials' results (``result.json``).
        baselines: the shared baselines' records.
        missing: the trials with no result (:func:`trial_state`), so that their cells are named.
        metric: ``top1`` or ``top5``.
    """
    frame = results_frame(trials, baselines)
    missing = list(missing)
    grid = SweepGrid.from_spec(spec).completed(frame, missing)
    paper = (spec or {}).get("paper")
    out = []
    for ds in grid.datasets:
        means, stds = cross_model_table(frame, grid, ds, metric)
        abl = ablation_table(frame, grid, ds, metric) if len(grid.ablations) > 1 else None
        out.append(DatasetTables(
            ds, means, stds, cross_model_title(ds), missing_cells(means, frame, grid, ds, missing), abl,
            ablation_title(grid, ds) if abl is not None else "", ", ".join(grid.ablation_backbones or ()),
            ablation_missing(abl, frame, grid, ds, missing) if abl is not None else [],
            paper_comparison(paper, means, abl, grid.reference)))
    return SweepTables(frame, grid, out)


def folder_tables(folder: SweepFolder) -> SweepTables:
    """:func:`sweep_tables` of a sweep folder: its spec, every grid point's run folder (``result.json``:
    finished; ``error.txt``: failed; neither: unfinished) and its shared baselines."""
    results, missing = [], []
    for key, point in folder.read_points().items():
        run = folder.run(key)
        result = run.read_result()
        if result is not None:
            results.append(result)
            continue
        error = run.last_error_line()
        missing.append(trial_state(key, point["dataset"], point["backbone"], ablation_label(point.get("ablation")
                                   or {}), point.get("seed", 0), "failed" if error else "unfinished", error))
    return sweep_tables(folder.read_spec(), results, folder.read_baselines(), missing)


# ---------------------------------------------------------------- rendered


def _cell(mean: float, std: float | None = None) -> str:
    """One Markdown cell: ``mean ± std``, ``mean`` without a std, ``—`` when missing."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return DASH
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

    Written atomically (a temporary file, then a rename), so a reader never sees half a PNG.

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


def cross_model_png(t: DatasetTables, path: str | Path) -> Path:
    """The cross-model heatmap of one dataset (``tables/`` and the report draw the same one)."""
    return heatmap_png(t.means, path, f"{t.dataset}: cross-model linear-probe top-1 (%), mean ± std", stds=t.stds)


def ablation_png(t: DatasetTables, path: str | Path) -> Path:
    """The ablation heatmap of one dataset, titled with the backbones it averages over."""
    return heatmap_png(t.ablation, path, f"{t.dataset}: ablation, mean top-1 (%) over {t.ablation_over}")


def cross_model_wide(t: DatasetTables) -> pd.DataFrame:
    """The cross-model table as one frame: ``B_mean`` and ``B_std`` columns side by side (its Parquet)."""
    return t.means.add_suffix("_mean").join(t.stds.add_suffix("_std")).reset_index()


def write_tables(tables: SweepTables, out_dir: str | Path) -> tuple[str, list[Path]]:
    """Write every table of a sweep to ``out_dir``: ``results.parquet`` (the long frame) and per dataset
    ``cross_model_DS`` and ``ablation_DS`` (``.md``: the table, its title and its missing cells; ``.parquet``;
    ``.png``: the heatmap) and ``paper_DS`` (``.md``, ``.parquet``) when the spec gives the paper's numbers.

    Args:
        tables: :func:`sweep_tables` (or :func:`folder_tables`) of the sweep.
        out_dir: the folder, created if needed.

    Returns:
        ``(markdown, files)``: :meth:`SweepTables.markdown` (what the command prints) and the files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables.frame.to_parquet(out / RESULTS_FILE, index=False)
    files = [out / RESULTS_FILE]
    for t in tables.datasets:
        ds = t.dataset
        if not t.means.empty:
            write_text(out / f"cross_model_{ds}.md", t.cross_markdown())
            cross_model_wide(t).to_parquet(out / f"cross_model_{ds}.parquet", index=False)
            files += [out / f"cross_model_{ds}.md", out / f"cross_model_{ds}.parquet",
                      cross_model_png(t, out / f"cross_model_{ds}.png")]
        if t.ablation is not None:
            write_text(out / f"ablation_{ds}.md", t.ablation_markdown())
            t.ablation.reset_index().to_parquet(out / f"ablation_{ds}.parquet", index=False)
            files += [out / f"ablation_{ds}.md", out / f"ablation_{ds}.parquet",
                      ablation_png(t, out / f"ablation_{ds}.png")]
        if t.paper_kind is not None:
            write_text(out / f"paper_{ds}.md", t.paper_markdown())
            t.paper.to_parquet(out / f"paper_{ds}.parquet", index=False)
            files += [out / f"paper_{ds}.md", out / f"paper_{ds}.parquet"]
    return tables.markdown(), files
