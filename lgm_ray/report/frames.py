"""The data behind the report's tables: the long results frame and our numbers beside the paper's.

Frames computed from a loaded :class:`~lgm_ray.report.load.Sweep`, with no rendering: the tables section
(:mod:`lgm_ray.report.sections.tables`) draws them, :mod:`lgm_ray.results.tables` pivots them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lgm_ray.report.load import Sweep


def results(sweep: Sweep):
    """The long results frame (:func:`lgm_ray.results.tables.results_frame`) of the finished trials and baselines.

    Baseline rows take the mean and std as recorded (a baseline child run in MLflow holds no per-seed values).
    """
    import pandas as pd

    from lgm_ray.results.tables import METRIC_FIELDS, results_frame

    frame = results_frame([t.result for t in sweep.finished], [])
    rows = [{"dataset": b["dataset"], "training_set": b["baseline"], "distill_backbone": "", "ablation": "",
             "eval_backbone": b["backbone"], **{m: float(b.get(m, float("nan"))) for m in METRIC_FIELDS},
             "n_values": len(b.get("top1_per_seed") or []) or None} for b in sweep.baselines]
    if rows:
        frame = pd.concat([frame, pd.DataFrame(rows, columns=frame.columns)], ignore_index=True)
    return frame


def paper_rows(paper: Any) -> tuple[list[str], dict[str, list[float]]] | None:
    """The columns and rows of the spec's ``paper`` field, or ``None`` when it has no such form.

    Rows whose length differs from the columns' are left out.
    """
    if not isinstance(paper, dict) or not isinstance(paper.get("columns"), list):
        return None
    rows = {str(k): v for k, v in paper.items() if k != "columns" and isinstance(v, list)
            and len(v) == len(paper["columns"])}
    return [str(c) for c in paper["columns"]], rows


def _cell(frame, row: str, col: str) -> float:
    """``frame[row, col]``; a row named ``row`` or ``row [default]…``; NaN where there is none."""
    if frame is None or col not in frame.columns:
        return float("nan")
    hits = [r for r in frame.index if r == row or r.startswith(row + " [default]")]
    return float(frame.loc[hits[0], col]) if hits else float("nan")


def _ours(row: str, cols: list[str], means, ablation, is_ablation: bool) -> dict[str, float]:
    """Our numbers of one row of the paper's table, column by column (``avg``: the mean of the others)."""
    ours = {}
    for col in cols:
        if is_ablation:
            ours[col] = _cell(ablation, row, col)
        elif row == "distilled" and col != "avg":
            ours[col] = _cell(means, f"distilled: {col}", col)
        elif col != "avg":
            ours[col] = _cell(means, row, col)
    if not is_ablation and "avg" in cols:
        got = [ours[c] for c in cols if c != "avg"]
        ours["avg"] = float(np.mean(got)) if got and not any(math.isnan(v) for v in got) else float("nan")
    return ours


def paper_comparison(paper: Any, means, ablation) -> Any:
    """Ours beside the paper's numbers, for the table the spec's ``paper`` field names.

    ``paper``: ``{columns: [...], ROW: [values], ...}``. Columns ``[same-model, cross-model]`` name the
    ablation table (rows: ablation labels); otherwise a cross-model table (columns: evaluation
    backbones and ``avg``; row ``distilled``: each column the set distilled with that backbone —
    our same-model diagonal; other rows: the baselines).

    Returns:
        DataFrame ``table, row, column, ours, paper, delta`` (``ours`` NaN where the sweep has no such
        cell), or ``None`` when ``paper`` has no such form.
    """
    import pandas as pd

    parsed = paper_rows(paper)
    if parsed is None:
        return None
    cols, rows = parsed
    is_ablation = set(cols) == {"same-model", "cross-model"}
    out = []
    for row, values in rows.items():
        ours = _ours(row, cols, means, ablation, is_ablation)
        for col, p in zip(cols, values, strict=True):
            out.append({"table": "ablation" if is_ablation else "cross-model", "row": row, "column": col,
                        "ours": ours[col], "paper": float(p), "delta": ours[col] - float(p)})
    return pd.DataFrame(out, columns=["table", "row", "column", "ours", "paper", "delta"])
