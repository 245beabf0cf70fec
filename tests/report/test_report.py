"""The sweep report: built from a sweep folder and from MLflow, checked as files, in headless Chromium,
and in the MLflow UI served by ``mlflow server``.

The sweep folder is written here through the writers the sweep itself uses — :class:`SweepFolder` (spec,
grid points, state, baselines) and :class:`RunFolder` (grids, synset.pt, result.json, error.txt) — so a
drift between writer and reader fails these tests (no Ray, no distillation): three finished trials — the demo
backbone on two ablation points, and a second distillation backbone that is not in the registry (its embedding
map is skipped, as for a set whose backbone is not at hand) at the default point only (the spec's
``ablation_backbones``, as in the demo sweep) — one failed trial, one not started, three baselines on the demo
backbone only, all logged to MLflow as the sweep logs them (:func:`lgm_ray.sweep.mlflow_runs.log_trial_result`).
Known numbers go in; the tests look for them on the page, and check that the page's tables and the Markdown
tables the sweep logs to MLflow (``tables/``) hold the same numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from lgm_ray.distill.run_folder import RunFolder
from lgm_ray.report.build import build_report
from lgm_ray.report.load import ReportError
from lgm_ray.results.folder import SweepFolder
from lgm_ray.results.labels import ablation_label, point_key

BACKBONE = "digits_simclr_cnn"
OTHER = "digits_other_vit"  # a distillation backbone of the sweep that this machine does not have
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EXPERIMENT = "report-test"
# (backbone, ablation point, top-1 per probe seed on BACKBONE, on OTHER)
TRIALS = [
    (BACKBONE, {}, [80.0, 82.0], [70.0, 70.0]),
    (BACKBONE, {"param": "pixel"}, [60.0, 64.0], [50.0, 54.0]),
    (OTHER, {}, [40.0, 44.0], [90.0, 92.0]),
]
BASELINES = {"random": [20.0, 30.0], "centroids": [50.0, 52.0], "full": [97.0, 97.0]}
PAPER = {"columns": [BACKBONE, OTHER, "avg"], "distilled": [63.0, 75.0, 69.0], "random": [31.7, 50.3, 41.0]}
STEPS = (10, 20, 30)


def _key(backbone: str, ablation: dict) -> str:
    return point_key("digits", backbone, ablation, 0)


def _eval(top1: list[float]) -> dict:
    mean = sum(top1) / len(top1)
    std = (sum((v - mean) ** 2 for v in top1) / len(top1)) ** 0.5
    return {"top1_per_seed": top1, "top5_per_seed": [100.0] * len(top1), "top1_mean": mean, "top1_std": std,
            "top5_mean": 100.0, "top5_std": 0.0}


def _spec(name: str, shards: str, trials, failed: bool, broken: str | None = None) -> dict:
    """The resolved spec: the ablation points (the failed and the not-started ones too when ``failed``), the
    other ablation points on the demo backbone only; a dataset ``broken`` whose every trial failed."""
    backbones = list(dict.fromkeys(b for b, *_ in trials))
    ablations = list({ablation_label(a): a for _, a, *_ in trials}.values())
    ablations += [{"param": "broken"}, {"param": "later"}] if failed else []
    datasets = {"digits": {"shards": shards, "build": None}, **({broken: {"shards": broken, "build": None}}
                                                              if broken else {})}
    return {"name": name, "description": "a made-up sweep for the report tests", "datasets": datasets,
            "backbones": backbones, "eval_backbones": [BACKBONE, OTHER], "ablations": ablations,
            "ablation_backbones": [BACKBONE], "seeds": [0], "baselines": list(BASELINES),
            "eval": {"epochs": 10, "seeds": 2, "split": "test"}, "paper": PAPER}


def _points(trials, failed: bool, broken: str | None = None) -> dict[str, dict]:
    """trials.json as the driver writes it (``TrialPoint.to_dict()``), with a failed and a not-started point,
    and the points of the dataset ``broken``."""
    from lgm_ray.sweep.spec import TrialPoint

    ablations = [a for _, a, *_ in trials]
    backbones = [b for b, *_ in trials]
    if failed:
        ablations += [{"param": "broken"}, {"param": "later"}]
        backbones += [BACKBONE, BACKBONE]
    points = [TrialPoint(_key(b, a), "digits", b, 0, a, {}) for b, a in zip(backbones, ablations, strict=True)]
    if broken:
        points += [TrialPoint(point_key(broken, b, a, 0), broken, b, 0, a, {})
                   for b, a in zip(backbones, ablations, strict=True)]
    return {p.key: p.to_dict() for p in points}


def _write_trial(run: RunFolder, key: str, backbone: str, ablation: dict, shards: str, steps, n_losses: int,
                 top1_own: list[float], top1_other: list[float]) -> None:
    """A finished trial's run folder, written through :class:`RunFolder` as the distillation and the trial do."""
    from lgm_ray.core.seeds import generator
    from lgm_ray.core.synset import synset_payload
    from lgm_ray.distill.config import write_yaml

    run.root.mkdir(parents=True)
    cfg = {"backbone": backbone, "shards": shards, "seed": 0, "real_res": 32, "crop_res": 32,
           "normalization": "native", "weights": None, "ipc": 1, "param": "pyramid", **ablation}
    write_yaml(cfg, run.config)
    for step in steps:
        run.save_grid(torch.rand(10, 3, 32, 32, generator=generator("report-test", key, step)), 1, step)
    images = torch.rand(10, 3, 32, 32, generator=generator("report-test", key))
    run.save_synset(synset_payload(images, torch.arange(10), class_names=CLASS_NAMES, num_classes=10, config=cfg,
                                   backbone=backbone, steps=steps[-1]))
    run.save_grid(images, 1)
    losses = [1.0 - 0.5 * i / n_losses + 0.01 * (i % 3) for i in range(n_losses)]
    run.write_result({"key": key, "dataset": "digits", "backbone": backbone, "seed": 0,
                      "ablation": ablation_label(ablation), "ablation_values": ablation,
                      "summary": {"steps": steps[-1], "final_loss": losses[-1], "losses": losses, "seconds": 1.0,
                                  "images_per_s": 100.0},
                      "evals": {BACKBONE: _eval(top1_own), OTHER: _eval(top1_other)}, "neighbors": {}})


def _point_tags(backbone: str, ablation: dict) -> dict[str, str]:
    """A trial's child-run tags, as the sweep's MLflow logger sets them (its grid point)."""
    return {"dataset": "digits", "distill_backbone": backbone, "ablation": ablation_label(ablation), "seed": "0"}


def make_sweep(root: Path, shards: str, tracking_uri: str | None, trials=TRIALS, name: str = "report_test",
               steps=STEPS, n_losses: int = 30, failed: bool = True, experiment: str = EXPERIMENT,
               broken: str | None = None) -> Path:
    """A sweep folder written through :class:`SweepFolder` and :class:`RunFolder` (the sweep's writers), logged
    to MLflow as the sweep logs it when ``tracking_uri``; ``broken``: a second dataset of that name whose every
    trial failed."""
    from lgm_ray.results.tracking import Tracker

    folder = SweepFolder(root / name)
    folder.root.mkdir(parents=True)
    folder.write_spec(_spec(name, shards, trials, failed, broken))
    folder.write_points(_points(trials, failed, broken))
    if broken:
        for key, point in folder.read_points().items():
            if point["dataset"] == broken:
                folder.run(key).root.mkdir(parents=True)
                folder.run(key).write_error(f"Traceback ...\nShardError: {broken}: no shard\n")
    tracker = parent = exp = None
    if tracking_uri:
        tracker = Tracker(tracking_uri)
        exp = tracker.experiment(experiment)
        parent = tracker.start_parent(exp, name)
        tracker.log_artifact(parent, folder.spec)
        folder.write_state({"tracking_uri": tracking_uri, "experiment": experiment, "experiment_id": exp,
                            "parent_run_id": parent})
    for backbone, ablation, top1_own, top1_other in trials:
        key = _key(backbone, ablation)
        _write_trial(folder.run(key), key, backbone, ablation, shards, steps, n_losses, top1_own, top1_other)
        if tracker:
            from lgm_ray.sweep.mlflow_runs import log_trial_result

            child = tracker.child(exp, parent, key, tags=_point_tags(backbone, ablation))
            log_trial_result(tracker, child, folder.run(key))
            tracker.finish(child)
    if failed:  # one failed point (the other, "later", has not started)
        key = _key(BACKBONE, {"param": "broken"})
        run = folder.run(key)
        run.root.mkdir(parents=True)
        from lgm_ray.distill.config import write_yaml

        write_yaml({"backbone": BACKBONE, "shards": shards, "seed": 0}, run.config)
        run.write_error("Traceback ...\nShardError: shard test-000000.tar: sha256 mismatch\n")
        if tracker:
            tracker.fail(tracker.child(exp, parent, key, tags=_point_tags(BACKBONE, {"param": "broken"})),
                         run.error.read_text())
    for kind, top1 in BASELINES.items():
        rec = {"dataset": "digits", "baseline": kind, "backbone": BACKBONE, **_eval(top1)}
        folder.write_baseline("digits", BACKBONE, kind, rec)
        if tracker:
            run_id = tracker.child(exp, parent, f"baseline-digits-{BACKBONE}-{kind}", kind="baseline",
                                   tags={"dataset": "digits", "eval_backbone": BACKBONE, "baseline": kind})
            tracker.log_metrics(run_id, {m: rec[m] for m in ("top1_mean", "top1_std", "top5_mean", "top5_std")})
            tracker.finish(run_id)
    if tracker:
        tracker.finish(parent)
    return folder.root


class _Page(HTMLParser):
    """What a page shows: every <img> src, <a> href, figure caption, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs, self.links, self.captions, self.tags, self.text = [], [], [], [], []
        self._caption = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "a":
            self.links.append(a.get("href", ""))
        self._caption = tag == "figcaption"

    def handle_endtag(self, tag):
        self._caption = False

    def handle_data(self, data):
        self.text.append(data)
        if self._caption:
            self.captions.append(data.strip())


def parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.all_text = " ".join(p.text)
    return p


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, digits_shards, store):
    return make_sweep(tmp_path_factory.mktemp("sweeps"), digits_shards, store)


@pytest.fixture(scope="module")
def report(sweep_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out") / "report"
    t0 = time.perf_counter()
    index = build_report(sweep_dir, out)
    print(f"report of {sweep_dir}: {index} in {time.perf_counter() - t0:.1f} s")
    return index


KEYS = [_key(b, a) for b, a, *_ in TRIALS]


def test_page_is_self_contained_and_every_picture_resolves(report):
    page = parse(report)
    assert page.imgs, "no image on the page"
    for src in page.imgs:
        assert src.startswith("data:image/webp;base64,") or (report.parent / src).is_file(), src[:80]
    ids = {a["id"] for _, a in page.tags if "id" in a}
    for href in page.links:
        if href.startswith("#"):
            assert href[1:] in ids, f"broken anchor {href}"
        else:
            assert (report.parent / urllib.parse.unquote(href)).is_file(), f"broken link {href}"
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object")]
    external = [a for _, a in page.tags for k in ("src", "href") if re.match(r"(https?:)?//", a.get(k) or "")]
    assert not external
    # every gallery thumbnail links to its full-size file
    full = [h for h in page.links if h.startswith("images/") and "/steps/" not in h]
    assert len(full) == 10 * len(TRIALS)
    from PIL import Image

    with Image.open(report.parent / full[0]) as im:
        assert im.size == (32, 32)


def test_gallery_evolution_tables_and_paper_numbers_on_the_page(report):
    page = parse(report)
    # class names under the images: each class once per finished trial
    for name in CLASS_NAMES:
        assert page.captions.count(name) == len(TRIALS)
    # evolution: every saved step of one set per (dataset, backbone) shown, the other sets' steps linked
    for step in STEPS:
        assert page.captions.count(f"step {step}") == 2
        assert f"images/{KEYS[1]}/steps/step_{step:07d}.png" in page.links
    text = page.all_text
    # cross-model: mean ± std (population std over probe seeds), baselines as rows
    for cell in ("81.00 ± 1.00", "62.00 ± 2.00", "42.00 ± 2.00", "91.00 ± 1.00", "25.00 ± 5.00", "97.00 ± 0.00"):
        assert cell in text, cell
    # beside the paper: ours / paper (distilled = the same-model diagonal)
    assert "81.00 / 63.0" in text and "91.00 / 75.0" in text and "25.00 / 31.7" in text
    # ablation table: same-model and cross-model means per point
    assert re.search(r"param=pixel\s*62\.00\s*52\.00", text)
    # the failed trial, with its error, and the one not started
    assert re.search(rf"{re.escape(_key(BACKBONE, {'param': 'broken'}))}\s*failed\s*ShardError: .*sha256 mismatch",
                     text)
    assert re.search(rf"{re.escape(_key(BACKBONE, {'param': 'later'}))}\s*unfinished", text)
    assert "3 trials finished, 1 failed, 1 unfinished" in " ".join(text.split())
    # embedding: numbers for the demo backbone's sets, a clear note for the backbone not at hand
    assert "median percentile" in text
    assert re.search(rf"{re.escape(_key(OTHER, {}))}: no embedding map \(.*unknown backbone", text)


def test_figures_are_png_plus_parquet_with_the_numbers(report):
    import pandas as pd

    figs = report.parent / "figures"
    for name in ("cross_model_digits", "ablation_digits", "meta_loss", "gallery_digits", "paper_digits"):
        assert (figs / f"{name}.png").stat().st_size > 1000 and (figs / f"{name}.parquet").is_file()
    cross = pd.read_parquet(figs / "cross_model_digits.parquet").set_index("training set")
    assert cross.loc[f"distilled: {BACKBONE} [default]", f"{BACKBONE}_mean"] == pytest.approx(81.0)
    assert cross.loc[f"distilled: {OTHER} [default]", f"{OTHER}_std"] == pytest.approx(1.0)
    assert cross.loc["random", f"{BACKBONE}_mean"] == pytest.approx(25.0)
    losses = pd.read_parquet(figs / "meta_loss.parquet")
    assert sorted(losses["trial"].unique()) == sorted(KEYS) and len(losses) == 30 * len(TRIALS)
    paper = pd.read_parquet(figs / "paper_digits.parquet").set_index(["row", "column"])
    assert paper.loc[("distilled", "avg"), "ours"] == pytest.approx((81.0 + 91.0) / 2)
    assert paper.loc[("distilled", "avg"), "paper"] == 69.0
    periphery = pd.read_parquet(figs / "periphery_summary.parquet").set_index("trial")
    assert sorted(periphery.index) == sorted(KEYS[:2])  # the two sets of the backbone at hand
    per_image = pd.read_parquet(figs / "periphery.parquet")
    assert len(per_image) == 20 and per_image["percentile"].between(0, 100).all()
    for key in KEYS[:2]:
        assert (figs / "embedding" / f"{key}.png").is_file()
        assert (figs / "evolution" / f"{key}.png").is_file()


def test_figures_are_artifacts_of_the_parent_run_and_maps_of_the_child_runs(report, sweep_dir, store):
    import pandas as pd
    from mlflow import MlflowClient

    from lgm_ray.results.tracking import Tracker

    state = SweepFolder(sweep_dir).read_state()
    client = MlflowClient(store)
    parent = state["parent_run_id"]
    figures = {a.path for a in client.list_artifacts(parent, "report/figures")}
    for name in ("cross_model_digits", "ablation_digits", "meta_loss", "gallery_digits"):
        assert {f"report/figures/{name}.png", f"report/figures/{name}.parquet"} <= figures
    assert "report/index.html" in {a.path for a in client.list_artifacts(parent, "report")}
    summary = pd.read_parquet(report.parent / "figures" / "periphery_summary.parquet").set_index("trial")
    child = Tracker(store).find_child(state["experiment_id"], parent, KEYS[0])
    got = client.get_run(child).data.metrics
    assert got["periphery/median_percentile"] == pytest.approx(summary.loc[KEYS[0], "median_percentile"])
    assert f"report/{KEYS[0]}.png" in {a.path for a in client.list_artifacts(child, "report")}


# ---------------------------------------------------------------- the page's tables = the sweep's tables/


class _Tables(HTMLParser):
    """Every ``<table>`` of a page by its ``id``, as rows of cell texts (the header row first), and the text of
    every ``<li>``."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.items: list[str] = []
        self._table = self._row = self._cell = self._li = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id") or f"table-{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "li":
            self._li = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "li" and self._li is not None:
            self.items.append(" ".join("".join(self._li).split()))
            self._li = None
        elif tag in ("tr", "table"):
            self._row = None
            self._table = None if tag == "table" else self._table

    def handle_data(self, data):
        for part in (self._cell, self._li):
            if part is not None:
                part.append(data)


def page_tables(index: Path) -> _Tables:
    p = _Tables()
    p.feed(index.read_text(encoding="utf-8"))
    return p


def markdown_table(path: Path) -> tuple[str, list[list[str]], list[str]]:
    """A ``tables/*.md`` file: its title, its table as rows of cell texts (the header row first), its notes."""
    lines = path.read_text(encoding="utf-8").splitlines()
    title = next(line.strip("*") for line in lines if line.startswith("**"))
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines
            if line.startswith("|") and not line.startswith("|---")]
    return title, rows, [line[2:] for line in lines if line.startswith("- ")]


def driver_tables(sweep_dir: Path, tracking_uri: str | None, dst: Path) -> tuple[Path, str]:
    """``tables/`` as the sweep's driver writes it at its end (``write_tables(folder_tables(folder), …)``) and
    logs it to the parent run; with ``tracking_uri``, the copy downloaded back from MLflow. Returns that folder
    and the Markdown the driver prints."""
    from mlflow import MlflowClient

    from lgm_ray.results.tables import folder_tables, write_tables
    from lgm_ray.results.tracking import Tracker

    folder = SweepFolder(sweep_dir)
    text, _ = write_tables(folder_tables(folder), folder.tables)
    if not tracking_uri:
        return folder.tables, text
    parent = folder.read_state()["parent_run_id"]
    Tracker(tracking_uri).log_artifact(parent, folder.tables, SweepFolder.TABLES)
    return Path(MlflowClient(tracking_uri).download_artifacts(parent, SweepFolder.TABLES, str(dst))), text


@pytest.fixture(scope="module")
def logged_tables(sweep_dir, store, tmp_path_factory):
    return driver_tables(sweep_dir, store, tmp_path_factory.mktemp("logged_tables"))


def test_page_tables_and_the_mlflow_tables_hold_the_same_numbers(report, logged_tables):
    """What a researcher reads on the page and in the parent run's ``tables/`` (and what the sweep prints) cannot
    disagree: the same rows, cells, titles and missing cells. The ablation rows all average the demo backbone
    (the spec's ablation_backbones), although the default point also distilled with OTHER."""
    tables, printed = logged_tables
    page = page_tables(report)
    text = " ".join(parse(report).all_text.split())
    for name in ("cross_model_digits", "ablation_digits"):
        title, rows, notes = markdown_table(tables / f"{name}.md")
        assert page.tables[name] == rows, name
        assert title in text and notes and set(notes) <= set(page.items), name
        assert (tables / f"{name}.md").read_text(encoding="utf-8") in printed
    _, rows, notes = markdown_table(tables / "ablation_digits.md")
    assert rows == [["ablation", "same-model", "cross-model"],
                    ["default", "81.00", "70.00"],  # BACKBONE alone: 81 on itself, 70 on OTHER
                    ["param=pixel", "62.00", "52.00"],
                    ["param=broken", "—", "—"],
                    ["param=later", "—", "—"]]
    title = markdown_table(tables / "ablation_digits.md")[0]
    assert f"over {BACKBONE} — same-model (1 cell a row: {BACKBONE}→{BACKBONE}); cross-model (1 cell a row: " \
           f"{BACKBONE}→{OTHER})" in title
    broken, later = _key(BACKBONE, {"param": "broken"}), _key(BACKBONE, {"param": "later"})
    assert (f"param=broken, same-model: no result for {BACKBONE}→{BACKBONE} — trial {broken} failed "
            f"(ShardError: shard test-000000.tar: sha256 mismatch)") in notes
    assert f"param=later, cross-model: no result for {BACKBONE}→{OTHER} — trial {later} unfinished" in notes
    _, rows, notes = markdown_table(tables / "cross_model_digits.md")
    cells = {r[0]: r[1:] for r in rows}
    assert cells[f"distilled: {BACKBONE} [default]"] == ["81.00 ± 1.00", "70.00 ± 0.00", "75.50"]
    assert cells[f"distilled: {OTHER} [default]"] == ["42.00 ± 2.00", "91.00 ± 1.00", "66.50"]
    assert cells["random"] == ["25.00 ± 5.00", "—", "—"]  # the baselines ran on BACKBONE only: no avg
    assert f"distilled: {BACKBONE} [param=broken]: no result on any evaluation backbone — trial {broken} failed " \
           f"(ShardError: shard test-000000.tar: sha256 mismatch)" in notes
    assert f"random: no result on {OTHER} — the shared baseline failed or has not run (its MLflow run, if any, " \
           f"says which)" in notes


def test_a_dataset_whose_every_trial_failed_is_shown_with_its_missing_cells(tmp_path, digits_shards):
    sweep = make_sweep(tmp_path, digits_shards, None, trials=TRIALS[:1], name="broken_dataset", failed=False,
                       broken="scratched")
    index = build_report(sweep, tmp_path / "report", embeddings=False, log_mlflow=False)
    tables, _ = driver_tables(sweep, None, tmp_path)
    page = page_tables(index)
    title, rows, notes = markdown_table(tables / "cross_model_scratched.md")
    assert page.tables["cross_model_scratched"] == rows
    assert {r[0]: r[1:] for r in rows}[f"distilled: {BACKBONE}"] == ["—", "—", "—"]
    assert notes[0] == "scratched: no distilled set — every trial failed or is unfinished (1 failed, 0 unfinished)"
    key = point_key("scratched", BACKBONE, {}, 0)
    assert f"distilled: {BACKBONE}: no result on any evaluation backbone — trial {key} failed (ShardError: " \
           f"scratched: no shard)" in notes
    assert set(notes) <= set(page.items)
    assert page.tables["cross_model_digits"] == markdown_table(tables / "cross_model_digits.md")[1]


def test_report_from_the_mlflow_experiment_alone(sweep_dir, store, tmp_path, digits_shards, logged_tables):
    out = tmp_path / "from_mlflow"
    index = build_report(EXPERIMENT, out, store, cache_dir=sweep_dir / "feature_cache", log_mlflow=False)
    page = parse(index)
    for name in CLASS_NAMES:
        assert page.captions.count(name) == len(TRIALS)
    assert page.captions.count("step 20") == 2
    for cell in ("81.00 ± 1.00", "62.00 ± 2.00", "25.00 ± 5.00", "81.00 / 63.0"):
        assert cell in page.all_text
    assert "sha256 mismatch" in page.all_text  # the failed child run's error tag
    # the same numbers as the parent run's tables/, baselines read from their child runs' metrics
    tables, _ = logged_tables
    for name in ("cross_model_digits", "ablation_digits"):
        assert page_tables(index).tables[name] == markdown_table(tables / f"{name}.md")[1], name


def test_bad_sources_and_folders_fail_with_one_message(tmp_path, capsys, store, sweep_dir):
    with pytest.raises(ReportError, match="no MLflow store"):
        build_report("no-such-sweep", tmp_path / "a", f"sqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(ReportError, match="neither a sweep folder nor an MLflow experiment"):
        build_report("no-such-experiment", tmp_path / "b", store)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ReportError, match="holds other files"):
        build_report(sweep_dir, tmp_path / "c", log_mlflow=False, embeddings=False)
    (tmp_path / "d").mkdir()
    with pytest.raises(ReportError, match="not a sweep folder"):
        build_report(tmp_path / "d", tmp_path / "e")
    from lgm_ray.report.__main__ import main

    assert main([str(tmp_path / "d"), "--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err.count("error:") == 1


@pytest.mark.slow
def test_page_of_100_trials_stays_under_20_mb(tmp_path, digits_shards, report):
    """100 demo-sized trials (10 classes, 32 px, 8 step grids, 240 losses); the embedding maps are measured
    on the report above and added (one per trial), since computing 100 of them here would take minutes."""
    trials = [(BACKBONE, {"lr": f"0.{i:03d}"}, [50.0 + i % 7, 51.0], [40.0, 41.0]) for i in range(100)]
    sweep = make_sweep(tmp_path, digits_shards, None, trials=trials, steps=tuple(range(30, 241, 30)),
                       n_losses=240, failed=False)
    t0 = time.perf_counter()
    index = build_report(sweep, tmp_path / "report", embeddings=False, log_mlflow=False)
    seconds = time.perf_counter() - t0
    page = parse(index)
    assert len(page.captions) == 100 * 10 + 8  # every class of every trial; the steps of one set
    assert len([h for h in page.links if "/steps/" in h]) == 100 * 8  # the steps of every set, linked
    maps = [a["src"] for t, a in parse(report).tags if t == "img" and "embedding map" in a.get("alt", "")]
    assert len(maps) == 2
    per_map = max(len(s) for s in maps)
    size = index.stat().st_size + 100 * per_map
    print(f"100 trials: page {index.stat().st_size / 1e6:.1f} MB without maps, {size / 1e6:.1f} MB with 100 "
          f"embedding maps ({per_map / 1e3:.0f} kB each), built in {seconds:.1f} s")
    assert size < 20e6


# ---------------------------------------------------------------- in a browser


def chromium() -> str:
    exe = os.environ.get("LGM_RAY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("chromium is not installed: run .ci/chromium.sh (apt-get install chromium) for the browser "
                    "checks, or set LGM_RAY_CHROMIUM")
    return exe


def run_chromium(url: str, tmp: Path, *, screenshot: Path | None = None, budget_ms: int = 5000,
                 size: str = "1400,3000", timeout: float = 180) -> tuple[str, str]:
    """``chromium --headless``: the DOM after ``budget_ms`` of virtual time, and a screenshot; (dom, stderr)."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={Path(tmp) / f'profile-{time.monotonic_ns()}'}",
           f"--window-size={size}", f"--virtual-time-budget={budget_ms}", "--enable-logging=stderr", "--v=0"]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        cmd.append(f"--screenshot={screenshot}")
    done = subprocess.run([*cmd, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    if screenshot is not None:
        assert screenshot.stat().st_size > 10_000, done.stderr[-2000:]
    return done.stdout, done.stderr


# Added to a copy of the page for the check only (the report itself has no script): after load, the
# <body> records every image that did not decode and every error the page raised.
CHECK = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.src) || e)),
                        true);
window.addEventListener('load', () => {
  const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src);
  document.body.setAttribute('data-images', String(document.images.length));
  document.body.setAttribute('data-broken', JSON.stringify(broken));
  document.body.setAttribute('data-errors', JSON.stringify(window.__errors));
});
</script>"""


def test_report_in_headless_chromium(report, tmp_path):
    exe = chromium()
    checked = report.with_name("_browser_check.html")
    checked.write_text(report.read_text(encoding="utf-8").replace("<head>", "<head>" + CHECK, 1), encoding="utf-8")
    shot = report.parent / "screenshots" / "report.png"
    dom, log = run_chromium(checked.as_uri(), tmp_path, screenshot=shot, size="1400,6000")
    checked.unlink()
    print(f"{exe}: screenshot {shot}")
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = {k: json.loads(v.replace("&quot;", '"')) for k, v in re.findall(r'data-(\w+)="([^"]*)"', body)}
    assert attrs["images"] == len(parse(report).imgs) > 40
    assert attrs["broken"] == [], attrs["broken"]
    assert attrs["errors"] == [], attrs["errors"]
    assert not re.findall(r"CONSOLE|Uncaught", log), log
    page = _Page()
    page.feed(dom)
    for name in CLASS_NAMES:
        assert page.captions.count(name) == len(TRIALS)
    text = " ".join(page.text)
    assert "81.00 ± 1.00" in text and "25.00 ± 5.00" in text and "81.00 / 63.0" in text


def _get(base: str, endpoint: str, **params) -> dict:
    with urllib.request.urlopen(f"{base}{endpoint}?{urllib.parse.urlencode(params)}", timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_mlflow_ui_lists_the_sweep_and_shows_a_child_grid(mlflow_server, tmp_path, digits_shards):
    """The sweep and its report logged over HTTP; checked through the REST API the UI calls, then in the UI."""
    base = mlflow_server
    sweep = make_sweep(tmp_path, digits_shards, base, trials=TRIALS[:2], name="ui_test", experiment="ui-test")
    build_report(sweep, tmp_path / "report", embeddings=False)
    state = SweepFolder(sweep).read_state()
    exp = _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="ui-test")["experiment"]
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                 data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        runs = json.loads(r.read())["runs"]
    names = {r["info"]["run_name"]: r["info"]["run_id"] for r in runs}
    keys = [_key(b, a) for b, a, *_ in TRIALS[:2]]
    assert {"ui_test", *keys} <= set(names) and len(runs) == 1 + 2 + 1 + len(BASELINES)
    child = names[keys[0]]
    assert "grid.png" in {f["path"] for f in _get(base, "/api/2.0/mlflow/artifacts/list", run_id=child)["files"]}
    parent_figs = _get(base, "/api/2.0/mlflow/artifacts/list", run_id=state["parent_run_id"], path="report/figures")
    assert "report/figures/cross_model_digits.png" in {f["path"] for f in parent_figs["files"]}

    shots = tmp_path / "report" / "screenshots"
    dom, _ = run_chromium(f"{base}/#/experiments/{exp['experiment_id']}/runs", tmp_path, budget_ms=25000,
                          screenshot=shots / "mlflow_experiment.png", size="1400,1000")
    assert "ui_test" in dom  # the sweep's parent run, its children folded under it …
    assert re.search(rf"<strong>{len(runs)}</strong>\s*matching runs", dom)  # … and every run counted
    dom, _ = run_chromium(f"{base}/#/experiments/{exp['experiment_id']}/runs/{child}/artifacts/grid.png", tmp_path,
                          budget_ms=25000, screenshot=shots / "mlflow_child_grid.png", size="1400,1000")
    assert keys[0] in dom
    assert re.search(r'<img[^>]*alt="grid.png"[^>]*src="blob:', dom)  # the UI fetched and shows the grid
    parent = state["parent_run_id"]
    dom, _ = run_chromium(f"{base}/#/experiments/{exp['experiment_id']}/runs/{parent}/artifacts/report/figures/"
                          f"cross_model_digits.png", tmp_path, budget_ms=25000,
                          screenshot=shots / "mlflow_parent_heatmap.png", size="1400,1000")
    assert re.search(r'<img[^>]*alt="[^"]*cross_model_digits.png"[^>]*src="blob:', dom)  # the report's figure
    print(f"screenshots: {shots}")
