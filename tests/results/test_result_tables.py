"""The sweep's result tables: the results frame; the cross-model and ablation tables over like-for-like cells;
missing cells named; the paper's numbers beside ours; the Markdown / Parquet / heatmap files."""

from __future__ import annotations

import math

import pytest

from lgm_ray.results.tables import (
    SweepGrid,
    ablation_table,
    cross_model_table,
    paper_comparison,
    results_frame,
    sweep_tables,
    to_markdown,
    trial_state,
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


SPEC = {"datasets": {"d": {"shards": "x"}}, "backbones": ["a", "b"], "eval_backbones": ["a", "b"],
        "ablations": [{}, {"aug": "none"}], "ablation_backbones": None, "seeds": [0, 1],
        "baselines": ["random", "centroids", "neighbors", "full"]}


def _grid(frame, spec=SPEC, missing=()):
    return SweepGrid.from_spec(spec).completed(frame, list(missing))


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
    # a baseline as its MLflow run holds it (no per-seed values): its mean and std as recorded
    recorded = results_frame([], [{"dataset": "d", "baseline": "random", "backbone": "a", "top1_mean": 25.0,
                                   "top1_std": 5.0, "top5_mean": 90.0, "top5_std": 1.0}])
    assert recorded.iloc[0][["top1_mean", "top1_std", "top5_std"]].tolist() == [25.0, 5.0, 1.0]


def test_cross_model_and_ablation_tables():
    frame = results_frame(*_records())
    grid = _grid(frame)
    means, stds = cross_model_table(frame, grid, "d")
    assert list(means.columns) == ["a", "b", "avg"]
    assert means.loc["distilled: a [default]", "a"] == pytest.approx(83.0)
    assert means.loc["distilled: a [default]", "b"] == pytest.approx(63.0)
    assert means.loc["distilled: a [default]", "avg"] == pytest.approx(73.0)
    assert means.loc["distilled: b [aug=none]", "b"] == pytest.approx(53.0)
    assert means.loc["neighbors [default]", "a"] == pytest.approx(61.0)
    # the paper's order: distilled sets, then centroids, neighbors, random, full
    assert list(means.index[4:]) == ["centroids", "neighbors [default]", "neighbors [aug=none]", "random", "full"]
    assert means.loc["full", "b"] == 90.0 and means.loc["centroids", "a"] == 55.0
    md = to_markdown(means, stds, "t")
    assert "| distilled: a [default] | 83.00 ± 2.24 | 63.00 ± 2.24 | 73.00 |" in md
    abl = ablation_table(frame, grid, "d")
    assert abl.loc["default", "same-model"] == pytest.approx(83.0)
    assert abl.loc["default", "cross-model"] == pytest.approx(63.0)
    assert abl.loc["aug=none", "same-model"] == pytest.approx(53.0)
    trials, baselines = _records()
    for t in trials:  # sets distilled with b score 10 points more
        if t["backbone"] == "b":
            t["evals"] = {k: _eval([v + 10 for v in r["top1_per_seed"]]) for k, r in t["evals"].items()}
    shifted = results_frame(trials, baselines)
    assert ablation_table(shifted, _grid(shifted), "d").loc["default", "same-model"] == pytest.approx(88.0)
    only_b = _grid(shifted, {**SPEC, "ablation_backbones": ["b"]})
    assert ablation_table(shifted, only_b, "d").loc["default", "same-model"] == pytest.approx(93.0)


def _demo(ablation_backbones=("cnn",)):
    """The demo's shape: three backbones at the default point, the ablation points on the CNN alone."""
    scores = {("cnn", "default"): {"cnn": 80.0, "vit": 70.0, "mix": 69.0},
              ("vit", "default"): {"cnn": 60.0, "vit": 75.0, "mix": 65.0},
              ("mix", "default"): {"cnn": 72.0, "vit": 62.0, "mix": 77.0},
              ("cnn", "init=noise"): {"cnn": 74.0, "vit": 50.0, "mix": 53.0},
              ("cnn", "aug=none"): {"cnn": 72.0, "vit": 69.0, "mix": 70.0}}
    trials = [{"dataset": "digits", "backbone": a, "ablation": p, "seed": 0,
               "evals": {b: _eval([v]) for b, v in e.items()}, "neighbors": {a: _eval([50.0])}}
              for (a, p), e in scores.items()]
    spec = {"datasets": {"digits": {}}, "backbones": ["cnn", "vit", "mix"], "eval_backbones": ["cnn", "vit", "mix"],
            "ablations": [{}, {"init": "noise"}, {"aug": "none"}],
            "ablation_backbones": list(ablation_backbones) if ablation_backbones else None,
            "baselines": ["neighbors"]}
    return spec, trials


def test_ablation_rows_average_the_same_backbones_as_the_demo_sweep():
    """The bug a user found after `make demo`: the default row averaged all three backbones while the
    ablation rows held the CNN alone. Every row now averages the CNN's cells, and says so."""
    spec, trials = _demo()
    t = sweep_tables(spec, trials, []).datasets[0]
    assert t.ablation.loc["default"].tolist() == [80.0, pytest.approx((70.0 + 69.0) / 2)]
    assert t.ablation.loc["init=noise"].tolist() == [74.0, pytest.approx((50.0 + 53.0) / 2)]
    assert t.ablation.loc["aug=none"].tolist() == [72.0, pytest.approx((69.0 + 70.0) / 2)]
    assert "over cnn — same-model (1 cell a row: cnn→cnn); cross-model (2 cells a row: cnn→vit, cnn→mix)" in (
        t.ablation_title)
    assert t.ablation_missing == []
    # the heatmap's avg: a neighbors row of an ablation point has the CNN's column only, so no avg
    assert t.means.loc["neighbors [default]", "avg"] == 50.0
    assert math.isnan(t.means.loc["neighbors [init=noise]", "avg"])
    assert t.means.loc["neighbors [init=noise]", "cnn"] == 50.0
    assert t.means.loc["distilled: cnn [init=noise]", "avg"] == pytest.approx((74.0 + 50.0 + 53.0) / 3)


def test_a_row_missing_a_cell_is_a_dash_never_a_mean_of_fewer_cells():
    # the spec ablates every backbone, but the ViT failed at init=noise and the mixer never ran there
    spec, trials = _demo(ablation_backbones=None)
    trials.append({"dataset": "digits", "backbone": "mix", "ablation": "aug=none", "seed": 0,
                   "evals": {b: _eval([60.0]) for b in ("cnn", "vit", "mix")}, "neighbors": {}})
    missing = [trial_state("digits-vit-init_noise-seed0", "digits", "vit", "init=noise", 0, "failed",
                           "ShardError: sha256 mismatch"),
               trial_state("digits-mix-init_noise-seed0", "digits", "mix", "init=noise", 0, "unfinished"),
               trial_state("digits-vit-aug_none-seed0", "digits", "vit", "aug=none", 0, "unfinished")]
    t = sweep_tables(spec, trials, [], missing).datasets[0]
    assert t.ablation.loc["default", "same-model"] == pytest.approx((80.0 + 75.0 + 77.0) / 3)
    assert t.ablation.loc["default", "cross-model"] == pytest.approx((70 + 69 + 60 + 65 + 72 + 62) / 6)
    for point in ("init=noise", "aug=none"):
        assert t.ablation.loc[point].isna().all()
    notes = "\n".join(t.ablation_missing)
    assert ("init=noise, same-model: no result for vit→vit, mix→mix — trial digits-vit-init_noise-seed0 failed "
            "(ShardError: sha256 mismatch); trial digits-mix-init_noise-seed0 unfinished") in notes
    assert "aug=none, cross-model: no result for vit→cnn, vit→mix — trial digits-vit-aug_none-seed0 unfinished" in (
        notes)
    md = t.ablation_markdown()
    assert "| init=noise | — | — |" in md and "Missing cells:" in md
    cross = "\n".join(t.missing)
    assert ("distilled: vit [init=noise]: no result on any evaluation backbone — trial "
            "digits-vit-init_noise-seed0 failed (ShardError: sha256 mismatch)") in cross
    assert math.isnan(t.means.loc["distilled: vit [init=noise]", "cnn"])


def test_without_a_spec_the_ablation_backbones_are_those_at_every_point():
    spec, trials = _demo()
    t = sweep_tables({}, trials, []).datasets[0]  # e.g. an MLflow parent run with no spec.yaml
    assert list(t.ablation.index) == ["default", "init=noise", "aug=none"]
    assert t.ablation.loc["default"].tolist() == [80.0, pytest.approx(69.5)]
    assert "over cnn " in t.ablation_title


def test_a_dataset_whose_every_trial_failed_and_a_missing_baseline_are_named():
    trials, baselines = _records()
    baselines = [b for b in baselines if not (b["baseline"] == "full" and b["backbone"] == "b")]
    spec = {**SPEC, "datasets": {"d": {}, "broken": {}}}
    missing = [trial_state(f"broken-{b}-{p}-seed{s}", "broken", b, label, s, "failed", "ShardError: bad tar")
               for b in ("a", "b") for p, label in (("", "default"), ("aug_none", "aug=none")) for s in (0, 1)]
    tables = sweep_tables(spec, trials, baselines, missing)
    d, broken = tables.datasets
    assert [t.dataset for t in tables.datasets] == ["d", "broken"]
    assert d.missing == ["full: no result on b — the shared baseline failed or has not run (its MLflow run, "
                         "if any, says which)"]
    assert math.isnan(d.means.loc["full", "avg"])
    assert broken.missing[0] == "broken: no distilled set — every trial failed or is unfinished (8 failed, 0 unfinished)"
    assert any(n.startswith("distilled: a [default]: no result on any evaluation backbone — trial broken-a--seed0 "
                            "failed (ShardError: bad tar); trial broken-a--seed1 failed") for n in broken.missing)
    assert broken.means.drop(columns="avg").isna().all().all()
    assert "broken: no distilled set" in tables.markdown()


def test_a_set_missing_some_seeds_says_so():
    trials, baselines = _records()
    trials = [t for t in trials if not (t["backbone"] == "a" and t["ablation"] == "default" and t["seed"] == 1)]
    missing = [trial_state("d-a-seed1", "d", "a", "default", 1, "failed", "RuntimeError: oom")]
    t = sweep_tables(SPEC, trials, baselines, missing).datasets[0]
    assert t.means.loc["distilled: a [default]", "a"] == pytest.approx(81.0)  # seed 0 alone
    assert "distilled: a [default]: over its finished seeds only — trial d-a-seed1 failed (RuntimeError: oom)" in (
        t.missing)


def test_single_ablation_point_rows_and_missing_cells():
    trials, baselines = _records()
    trials = [t for t in trials if t["ablation"] == "default" and t["backbone"] == "a"]
    spec = {**SPEC, "backbones": ["a"], "eval_backbones": ["a", "b", "c"], "ablations": [{}]}
    t = sweep_tables(spec, trials, baselines).datasets[0]
    assert "distilled: a" in t.means.index and "neighbors" in t.means.index  # no [ablation] with one point
    assert math.isnan(t.means.loc["distilled: a", "c"]) and t.ablation is None
    assert "| neighbors | 61.00 ± 1.00 | — | — | — |" in t.cross_markdown()
    assert "distilled: a: no result on c — no trial reported it" in t.missing


def test_paper_comparison_of_both_tables():
    spec, trials = _demo()
    paper = {"columns": ["cnn", "vit", "avg"], "distilled": [63.0, 75.0, 69.0], "random": [31.7, 50.3, 41.0]}
    t = sweep_tables({**spec, "paper": paper}, trials, []).datasets[0]
    cmp = t.paper.set_index(["row", "column"])
    assert t.paper_kind == "cross-model"
    assert cmp.loc[("distilled", "cnn"), "ours"] == 80.0 and cmp.loc[("distilled", "vit"), "ours"] == 75.0
    assert cmp.loc[("distilled", "avg"), "ours"] == pytest.approx(77.5)
    assert math.isnan(cmp.loc[("random", "avg"), "ours"])  # no random baseline in this sweep
    import pandas as pd

    abl = pd.DataFrame({"same-model": [80.0, 70.0], "cross-model": [60.0, float("nan")]},
                       index=pd.Index(["default", "aug=none"], name="ablation"))
    paper = {"columns": ["same-model", "cross-model"], "default": [87.2, 77.8], "aug=none": [68.6, 33.3],
             "color=false": [86.5, 76.4]}
    cmp = paper_comparison(paper, None, abl).set_index(["row", "column"])
    assert (cmp["table"] == "ablation").all()
    assert cmp.loc[("default", "same-model"), "delta"] == pytest.approx(80.0 - 87.2)
    assert cmp.loc[("aug=none", "same-model"), "ours"] == 70.0
    assert pd.isna(cmp.loc[("aug=none", "cross-model"), "ours"])
    assert pd.isna(cmp.loc[("color=false", "same-model"), "ours"])  # not in the sweep
    assert paper_comparison({"note": "free text"}, None, abl) is None


def test_write_tables_markdown_parquet_heatmap(tmp_path):
    import pandas as pd
    from PIL import Image

    trials, baselines = _records()
    tables = sweep_tables(SPEC, trials, baselines)
    text, files = write_tables(tables, tmp_path)
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
    # what the command prints is the files' Markdown, nothing computed apart
    assert text == tables.markdown()
    for name in ("cross_model_d.md", "ablation_d.md"):
        assert (tmp_path / name).read_text() in text
    assert "distilled: a [default]" in text and "same-model" in text
    back = pd.read_parquet(tmp_path / "results.parquet")
    assert len(back) == len(tables.frame) and set(back.training_set) == {
        "distilled",
        "neighbors",
        "random",
        "centroids",
        "full",
    }
    wide = pd.read_parquet(tmp_path / "cross_model_d.parquet").set_index("training set")
    assert wide.loc["full", "a_mean"] == 90.0
    abl = pd.read_parquet(tmp_path / "ablation_d.parquet").set_index("ablation")
    assert abl.loc["default", "same-model"] == pytest.approx(83.0)
    with Image.open(tmp_path / "cross_model_d.png") as img:
        assert img.size[0] > 100 and img.size[1] > 100
