"""The sweep's result tables: the results frame, cross-model and ablation tables, Markdown/Parquet/heatmap files."""

from __future__ import annotations

import math

import pytest

from lgm_ray.results.tables import (
    ablation_table,
    cross_model_table,
    results_frame,
    to_markdown,
    write_tables,
)


def _eval(top1, top5=None):
    top5 = top5 or [100.0] * len(top1)
    return {
        "top1_per_seed": top1,
        "top5_per_seed": top5,
        "top1_mean": sum(top1) / len(top1),
        "top5_mean": sum(top5) / len(top5),
    }


def _records():
    trials = []
    for seed, shift in ((0, 0.0), (1, 4.0)):
        for src in ("a", "b"):
            for abl, drop in (("default", 0.0), ("aug=none", 30.0)):
                same = 80.0 - drop + shift
                trials.append(
                    {
                        "dataset": "d",
                        "backbone": src,
                        "ablation": abl,
                        "seed": seed,
                        "evals": {
                            src: _eval([same, same + 2]),
                            ("b" if src == "a" else "a"): _eval([same - 20, same - 18]),
                        },
                        "neighbors": {src: _eval([60.0, 62.0])},
                    }
                )
    baselines = [
        {"dataset": "d", "baseline": kind, "backbone": b, **_eval([v, v])}
        for b in ("a", "b")
        for kind, v in (("random", 40.0), ("centroids", 55.0), ("full", 90.0))
    ]
    return trials, baselines


def test_results_pool_distillation_and_probe_seeds():
    frame = results_frame(*_records())
    row = frame[
        (frame.training_set == "distilled")
        & (frame.distill_backbone == "a")
        & (frame.eval_backbone == "a")
        & (frame.ablation == "default")
    ].iloc[0]
    # seed 0 gives 80, 82 and seed 1 gives 84, 86: mean 83, population std sqrt(5)
    assert row.top1_mean == pytest.approx(83.0)
    assert row.top1_std == pytest.approx(math.sqrt(5.0))
    assert row.n_values == 4


def test_cross_model_and_ablation_tables():
    frame = results_frame(*_records())
    means, stds = cross_model_table(frame, "d", ["a", "b"])
    assert list(means.columns) == ["a", "b", "avg"]
    assert means.loc["distilled: a [default]", "a"] == pytest.approx(83.0)
    assert means.loc["distilled: a [default]", "b"] == pytest.approx(63.0)
    assert means.loc["distilled: a [default]", "avg"] == pytest.approx(73.0)
    assert means.loc["distilled: b [aug=none]", "b"] == pytest.approx(53.0)
    assert means.loc["neighbors [default]", "a"] == pytest.approx(61.0)
    # the paper's order: distilled sets, then centroids, neighbors, random, full
    assert list(means.index[4:]) == [
        "centroids",
        "neighbors [default]",
        "neighbors [aug=none]",
        "random",
        "full",
    ]
    assert means.loc["full", "b"] == 90.0 and means.loc["centroids", "a"] == 55.0
    md = to_markdown(means, stds, "t")
    assert "| distilled: a [default] | 83.00 ± 2.24 | 63.00 ± 2.24 | 73.00 |" in md
    abl = ablation_table(frame, "d")
    assert abl.loc["default", "same-model"] == pytest.approx(83.0)
    assert abl.loc["default", "cross-model"] == pytest.approx(63.0)
    assert abl.loc["aug=none", "same-model"] == pytest.approx(53.0)
    trials, baselines = _records()
    for t in trials:  # sets distilled with b score 10 points more
        if t["backbone"] == "b":
            t["evals"] = {k: _eval([v + 10 for v in r["top1_per_seed"]]) for k, r in t["evals"].items()}
    shifted = results_frame(trials, baselines)
    assert ablation_table(shifted, "d").loc["default", "same-model"] == pytest.approx(88.0)
    assert ablation_table(shifted, "d", distill_backbones=["b"]).loc[
        "default", "same-model"
    ] == pytest.approx(93.0)


def test_single_ablation_point_rows_and_missing_cells():
    trials, baselines = _records()
    trials = [t for t in trials if t["ablation"] == "default" and t["backbone"] == "a"]
    means, stds = cross_model_table(results_frame(trials, baselines), "d", ["a", "b", "c"])
    assert "distilled: a" in means.index and "neighbors" in means.index  # no [ablation] with one point
    assert math.isnan(means.loc["distilled: a", "c"])
    assert "| neighbors | 61.00 ± 1.00 | — | — |" in to_markdown(means, stds)


def test_write_tables_markdown_parquet_heatmap(tmp_path):
    import pandas as pd
    from PIL import Image

    frame = results_frame(*_records())
    text, files = write_tables(frame, ["d"], ["a", "b"], tmp_path, with_ablation=True)
    names = {f.name for f in files}
    assert {
        "results.parquet",
        "cross_model_d.md",
        "cross_model_d.parquet",
        "cross_model_d.png",
        "ablation_d.md",
        "ablation_d.parquet",
        "ablation_d.png",
    } <= names
    assert "distilled: a [default]" in text and "same-model" in text
    back = pd.read_parquet(tmp_path / "results.parquet")
    assert len(back) == len(frame) and set(back.training_set) == {
        "distilled",
        "neighbors",
        "random",
        "centroids",
        "full",
    }
    wide = pd.read_parquet(tmp_path / "cross_model_d.parquet")
    assert wide.set_index("training set").loc["full", "a_mean"] == 90.0
    with Image.open(tmp_path / "cross_model_d.png") as img:
        assert img.size[0] > 100 and img.size[1] > 100
