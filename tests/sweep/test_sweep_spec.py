"""Sweep specs: the shipped specs, the grid, and one clear error for every bad spec (no Ray here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lgm_ray.backbones import list_backbones
from lgm_ray.common.errors import InputError
from lgm_ray.distill.config import DistillConfig
from lgm_ray.evaluate.config import EvalConfig
from lgm_ray.results.labels import ablation_label, point_key
from lgm_ray.sweep.parse import check_resources, load_spec, parse_spec
from lgm_ray.sweep.spec import Resources, SpecError, eval_defaults, run_eval_config

ROOT = Path(__file__).resolve().parents[2]
DIGITS = [b for b in list_backbones() if b.startswith("digits_")]


def spec(tmp_path, **fields):
    """A small valid spec mapping (no shard check needed), updated with ``fields``."""
    data = {
        "name": "t",
        "datasets": {"digits": str(tmp_path / "shards")},
        "backbones": ["digits_simclr_cnn"],
        "storage": str(tmp_path / "runs"),
    }
    data.update(fields)
    return data


def fails(tmp_path, match: str, check_paths: bool = False, **fields) -> str:
    with pytest.raises(SpecError, match=match) as info:
        parse_spec(spec(tmp_path, **fields), check_paths=check_paths, cwd=tmp_path)
    return str(info.value)


def test_demo_spec_resolves_from_the_run_config_and_the_registry():
    s = load_spec(ROOT / "sweeps" / "demo.yaml", cwd=ROOT, check_paths=False)
    assert s.backbones == DIGITS and s.eval_backbones == DIGITS
    assert s.ablations == [{}, {"init": "noise"}, {"aug": "none"}]
    base = s.base_config()
    assert base.lr == 0.03 and base.syn_res == 32  # from configs/digits_demo.yaml
    assert base.init == "real" and base.grey
    assert base.steps == 240  # the spec's override wins over the file
    assert s.datasets[0].shards == str(ROOT / "shards" / "digits") and s.datasets[0].build == "digits"
    points = s.grid()
    assert len(DIGITS) == 3 and len(points) == len(DIGITS) + 2  # every backbone at the first point, the rest on one
    assert len({p.key for p in points}) == len(points)
    noise = next(p for p in points if p.ablation == {"init": "noise"})
    assert noise.backbone == "digits_simclr_cnn"
    cfg = noise.resolved(out="x")
    assert (cfg.init, cfg.param, cfg.aug, cfg.steps, cfg.shards) == ("noise", "pyramid", "standard", 240,
                                                                    s.datasets[0].shards)
    assert noise.ablation_label == "init=noise"
    # The point {} is the config file's own run: keys other points set keep the file's values.
    plain = next(p for p in points if p.ablation == {} and p.backbone == "digits_simclr_cnn")
    assert (plain.resolved(out="x").init, plain.resolved(out="x").aug) == ("real", "standard")
    assert s.eval_settings()["epochs"] == 1000 and s.eval_settings()["seeds"] == 3


def test_paper_specs_name_the_paper_grids():
    cross = load_spec(ROOT / "sweeps" / "cross_model.yaml", cwd=ROOT, check_paths=False)
    assert {"dinov2_vitb14", "eva02_vitb14", "mocov3_vitb16"} <= set(cross.backbones)
    assert any(b.startswith("clip_vitb") for b in cross.backbones) and len(cross.backbones) == 4
    assert cross.eval_backbones == cross.backbones
    assert cross.paper, "the spec records the paper's numbers it should reproduce"
    abl = load_spec(ROOT / "sweeps" / "ablation.yaml", cwd=ROOT, check_paths=False)
    labels = {p.ablation_label for p in abl.grid()}
    assert len(labels) == 4  # full, − colour, − pyramid, − augmentation
    assert abl.paper


def test_ablation_backbones_ablate_some_backbones_only(tmp_path):
    s = parse_spec(
        spec(
            tmp_path,
            backbones=["digits_simclr_cnn", "dinov2_vitb14"],
            ablations={"param": ["pyramid", "pixel"], "aug": ["standard", "none"]},
            ablation_backbones=["dinov2_vitb14"],
        ),
        check_paths=False,
    )
    got = sorted((p.backbone, p.ablation_label) for p in s.grid())
    assert got == sorted(
        [("digits_simclr_cnn", "param=pyramid, aug=standard")]
        + [
            ("dinov2_vitb14", f"param={p}, aug={a}")
            for p in ("pyramid", "pixel")
            for a in ("standard", "none")
        ]
    )
    fails(tmp_path, "ablation_backbones: .*not distillation backbones", ablation_backbones=["dinov2_vitb14"])


def test_grid_sets_only_the_overrides_so_a_preset_still_applies(tmp_path):
    s = parse_spec(
        spec(tmp_path, config={"preset": "reference"}, ablations={"normalization": ["native"]}, seeds=[0, 1]),
        check_paths=False,
    )
    points = s.grid()
    assert [p.seed for p in points] == [0, 1]
    cfg = points[0].resolved()
    assert cfg.steps == 5001  # from the preset: the grid did not fill in the plain defaults
    assert cfg.normalization == "native"  # the axis, given explicitly, wins over the preset


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"ablation": {"param": ["pixel"]}}, "unknown key 'ablation'.*did you mean 'ablations'"),
        ({"config": {"stpes": 3}}, "unknown run field 'stpes'.*did you mean 'steps'"),
        ({"ablations": {"parma": ["pixel"]}}, "unknown run field 'parma'.*did you mean 'param'"),
        ({"resources": {"worker": 1}}, r"resources: unknown key 'worker'.*did you mean 'workers'"),
        ({"eval": {"epoch": 3}}, "eval: unknown key 'epoch'.*did you mean 'epochs'"),
        ({"mlflow": {"tracking": "x"}}, "mlflow: unknown key 'tracking'.*tracking_uri"),
        ({"baselines": ["centroid"]}, "unknown baseline 'centroid'.*did you mean 'centroids'"),
    ],
)
def test_unknown_keys_name_the_nearest_valid_one(tmp_path, fields, match):
    fails(tmp_path, match, **fields)


def test_unknown_backbone_lists_the_known_ones(tmp_path):
    msg = fails(tmp_path, "backbones: unknown backbone 'dinov2_vitb16'", backbones=["dinov2_vitb16"])
    assert "dinov2_vitb14" in msg and "digits_simclr_cnn" in msg
    fails(tmp_path, "eval_backbones: unknown backbone 'nope_.*'", eval_backbones=["nope_*"])


def test_empty_axis_bad_values_and_grid_fields_name_the_field(tmp_path):
    fails(tmp_path, "ablations.param has no values", ablations={"param": []})
    fails(tmp_path, r"ablations\.param.*'voxel'.*pyramid", ablations={"param": ["pyramid", "voxel"]})
    fails(tmp_path, "config.steps.*'many'", config={"steps": "many"})
    fails(tmp_path, r"config\.lr.*must be > 0", config={"lr": -1.0})
    fails(tmp_path, "'backbone' is set by the sweep grid; use backbones", config={"backbone": "x"})
    fails(tmp_path, "'seed' is set by the sweep grid; use seeds", ablations={"seed": [0, 1]})
    fails(tmp_path, "ablations.aug lists a value twice", ablations={"aug": ["none", "none"]})
    fails(tmp_path, "seeds.*twice", seeds=[1, 1])
    fails(tmp_path, "backbones is empty", backbones=[])
    fails(tmp_path, "eval.epochs.*positive integer", eval={"epochs": 0})
    fails(tmp_path, "eval.full_mode.*'quick'.*fast", eval={"full_mode": "quick"})
    fails(tmp_path, "eval: unknown key 'device'", eval={"device": "cuda"})  # a run's own setting
    fails(tmp_path, "resources.workers.*≥ 0", resources={"workers": -1})
    fails(tmp_path, "storage.*shared", storage="s3://bucket/x")


def test_missing_shards_fail_with_the_build_command(tmp_path, digits_shards):
    msg = fails(tmp_path, "datasets.digits: no shard set", check_paths=True)
    assert "python -m lgm_ray.shards build digits" in msg
    # a folder that can be built offline is fine: the driver builds it before the sweep
    parse_spec(spec(tmp_path, datasets={"digits": {"shards": str(tmp_path / "s"), "build": "digits"}}))
    fails(
        tmp_path,
        "datasets.digits.build = 'imagefolder'",
        datasets={"digits": {"shards": "x", "build": "imagefolder"}},
    )
    ok = parse_spec(spec(tmp_path, datasets={"digits": digits_shards}))
    assert ok.datasets[0].shards == digits_shards


def test_relative_paths_are_made_absolute_from_the_working_directory(tmp_path):
    s = parse_spec(
        spec(tmp_path, datasets={"d": "shards/d"}, storage="runs"), cwd=tmp_path, check_paths=False
    )
    assert s.datasets[0].shards == str(tmp_path / "shards" / "d")
    assert s.sweep_dir == tmp_path / "runs" / "t"


def test_eval_defaults_come_from_eval_config(tmp_path):
    assert eval_defaults() == EvalConfig.defaults(EvalConfig.SWEEP_FIELDS)
    assert set(eval_defaults()) == set(EvalConfig.SWEEP_FIELDS)
    assert eval_defaults()["epochs"] == EvalConfig().epochs and eval_defaults()["seeds"] == EvalConfig().seeds
    s = parse_spec(spec(tmp_path, eval={"epochs": 7}), check_paths=False)
    assert s.eval_settings() == {**EvalConfig.defaults(EvalConfig.SWEEP_FIELDS), "epochs": 7}
    assert s.to_dict()["eval"] == s.eval_settings()


def test_a_run_is_evaluated_with_the_spec_probe_settings_and_its_own_preprocessing(tmp_path):
    s = parse_spec(spec(tmp_path, eval={"epochs": 7, "split": "val"}), check_paths=False)
    run = DistillConfig(real_res=32, crop_res=28, normalization="imagenet", raw_output=True, device="cpu")
    cfg = run_eval_config(s.eval_settings(), run)
    assert isinstance(cfg, EvalConfig)
    assert (cfg.epochs, cfg.split, cfg.seeds) == (7, "val", EvalConfig().seeds)
    assert {n: getattr(cfg, n) for n in EvalConfig.RUN_FIELDS} == {n: getattr(run, n) for n in EvalConfig.RUN_FIELDS}
    assert run_eval_config(s.eval_settings(), run, ipc=3).ipc == 3


def test_point_names_come_from_results_labels(tmp_path):
    """The report names a finished sweep's points with lgm_ray.results.labels, without importing the sweep."""
    s = parse_spec(spec(tmp_path, ablations={"color": [True, False]}, seeds=[0]), check_paths=False)
    for p in s.grid():
        assert p.ablation_label == ablation_label(p.ablation)
        assert p.key == point_key(p.dataset, p.backbone, p.ablation, p.seed)
    assert [p.key for p in s.grid()] == ["digits-digits_simclr_cnn-color=true-seed0",
                                         "digits-digits_simclr_cnn-color=false-seed0"]
    assert ablation_label({}) == "default" and ablation_label({"param": "pixel", "aug": "none"}) == (
        "param=pixel, aug=none")
    assert point_key("my data", "b", {"x": "a/b"}, 1) == "my_data-b-x=a_b-seed1"


def test_spec_error_is_an_input_error_and_the_command_prints_one_line(tmp_path, capsys):
    from lgm_ray.sweep.__main__ import main

    assert issubclass(SpecError, InputError)
    assert main([str(tmp_path / "nowhere.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: spec file") and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ndatasets: {digits: x}\nbackbones: [digits_simclr_cnn]\nconfig: {stpes: 3}\n")
    assert main([str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error: config: unknown run field 'stpes'")


def test_resources_the_cluster_can_never_provide():
    mem = 8 << 30
    one_node = [{"CPU": 2.0, "memory": mem}]
    # in-process trials: one CPU each → two at once on two cores
    assert check_resources(Resources(workers=0, cpus_per_worker=1), one_node) == 2
    with pytest.raises(SpecError, match="the trial itself asks for .*'CPU': 4"):
        check_resources(Resources(workers=0, cpus_per_worker=4), one_node)
    with pytest.raises(SpecError, match="asks for .*GPU.*no node of the cluster"):
        check_resources(Resources(workers=2, gpus_per_worker=1), one_node)
    two_nodes = [{"CPU": 2.0, "memory": mem}, {"CPU": 2.0, "memory": mem}]
    # K workers: the trial itself holds no CPU (docs/design.md §5), so 3 workers fit on 4 CPUs, once
    assert Resources(workers=3).trial_resources() == {"cpu": 0, "memory": 1 << 20}
    assert check_resources(Resources(workers=3), two_nodes) == 1
    assert check_resources(Resources(workers=2), two_nodes) == 2
    with pytest.raises(SpecError, match="one trial needs 5 workers"):
        check_resources(Resources(workers=5), two_nodes)
    gpu_nodes = [{"CPU": 8.0, "GPU": 4.0, "memory": mem}] * 2
    # GPU workers: the trial holds one GPU of its own for its evaluations
    assert check_resources(Resources(workers=3, gpus_per_worker=1), gpu_nodes) == 2


# ---------------------------------------------------------------- --set KEY=VALUE


def test_set_overrides_fields_before_the_spec_is_checked(tmp_path):
    from lgm_ray.sweep.parse import apply_overrides

    data = spec(tmp_path, datasets={"digits": "shards/digits"}, eval={"epochs": 100})
    out = apply_overrides(data, ["config.steps=20", "eval.epochs=5", "storage=/tmp/x", "resources.workers=2",
                                 "seeds=[0, 1]", "config.color=false", "datasets.digits.shards=/data/d",
                                 "mlflow.experiment=e"])
    assert out["config"] == {"steps": 20, "color": False}  # typed by YAML; a missing section is made
    assert out["eval"] == {"epochs": 5} and out["storage"] == "/tmp/x" and out["resources"] == {"workers": 2}
    assert out["seeds"] == [0, 1] and out["datasets"] == {"digits": {"shards": "/data/d"}}
    assert data["eval"] == {"epochs": 100} and "config" not in data, "the file's mapping is not changed"
    s = parse_spec(out, check_paths=False, cwd=tmp_path, overrides=["config.steps=20"])
    assert s.base_config().steps == 20 and s.resources.workers == 2 and s.eval_settings()["epochs"] == 5
    assert s.to_dict()["overrides"] == ["config.steps=20"]  # recorded in the resolved spec


def test_set_on_a_shipped_spec_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    s = load_spec("sweeps/demo.yaml", check_paths=False,
                  overrides=["config.steps=20", "eval.epochs=5", f"storage={tmp_path}", "resources.workers=2"])
    assert s.base_config().steps == 20 and s.eval_settings()["epochs"] == 5
    assert s.sweep_dir == tmp_path / "demo" and s.resources.workers == 2
    assert all(p.config["steps"] == 20 and p.config["workers"] == 2 for p in s.grid())
    assert s.overrides[0] == "config.steps=20"


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("config.stpes=20", "unknown config key 'stpes'.*did you mean 'steps'"),
        ("confg.steps=20", "unknown spec key 'confg'.*did you mean 'config'"),
        ("eval.epoch=5", "unknown eval key 'epoch'.*did you mean 'epochs'"),
        ("resources.worker=2", "unknown resources key 'worker'.*did you mean 'workers'"),
        ("mlflow.tracking=x", "unknown mlflow key 'tracking'.*did you mean 'tracking_uri'"),
        ("datasets.digts.shards=x", "unknown datasets dataset 'digts'.*did you mean 'digits'"),
        ("datasets.digits.shard=x", "did you mean 'shards'"),
        ("storage", "give KEY=VALUE"),
        ("config..steps=2", "give KEY=VALUE"),
        ("name.x=1", "'name' is a single value"),
        ("config.steps.x=1", "config.steps is a single value"),
        ("config.steps=[1", "not valid YAML"),
    ],
)
def test_a_bad_set_names_the_nearest_valid_key(tmp_path, item, match):
    from lgm_ray.sweep.parse import apply_overrides

    with pytest.raises(SpecError, match=match):
        apply_overrides(spec(tmp_path, datasets={"digits": "x"}), [item])


def test_a_bad_set_value_is_checked_like_the_file(tmp_path):
    from lgm_ray.sweep.parse import apply_overrides

    with pytest.raises(SpecError, match="config.steps.*'many'"):
        parse_spec(apply_overrides(spec(tmp_path), ["config.steps=many"]), check_paths=False)
    with pytest.raises(SpecError, match="lists its ablation points"):
        apply_overrides(spec(tmp_path, ablations=[{}, {"color": False}]), ["ablations.color=[true]"])


def test_the_command_refuses_a_bad_set_in_one_line(tmp_path, capsys):
    from lgm_ray.sweep.__main__ import main

    path = tmp_path / "s.yaml"
    path.write_text("name: t\ndatasets: {digits: x}\nbackbones: [digits_simclr_cnn]\n")
    assert main([str(path), "--set", "config.stpes=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set config.stpes=3: unknown config key 'stpes' (did you mean 'steps'?)")
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- paths


def test_every_relative_path_is_resolved_against_the_working_directory_once(tmp_path, monkeypatch):
    """The spec lies in one folder, the command runs in another: paths are the working directory's."""
    specs, work = tmp_path / "specs", tmp_path / "work"
    specs.mkdir()
    work.mkdir()
    (work / "cfg.yaml").write_text("weights: w/from_file.pt\nstorage_path: ckpts\nsteps: 3\n")
    path = specs / "rel.yaml"
    path.write_text(
        "name: rel\ndatasets: {digits: shards/digits}\nbackbones: [digits_simclr_cnn]\n"
        "config_file: cfg.yaml\nablations: [{}, {weights: w/ablated.pt}]\nstorage: runs\n"
        "mlflow: {tracking_uri: 'sqlite:///db/mlflow.db'}\n"
    )
    monkeypatch.chdir(work)
    s = load_spec(path, check_paths=False, overrides=["eval.epochs=2"])
    w = work.resolve()
    assert s.datasets[0].shards == str(w / "shards" / "digits")
    assert s.sweep_dir == w / "runs" / "rel"
    assert s.mlflow.tracking_uri == f"sqlite:///{w / 'db' / 'mlflow.db'}"
    first, ablated = s.grid()
    assert first.resolved().weights == str(w / "w" / "from_file.pt")
    assert first.resolved().storage_path == str(w / "ckpts")
    assert ablated.resolved().weights == str(w / "w" / "ablated.pt")
    for point in s.grid():  # what a trial reads: no relative path left
        for key in ("weights", "storage_path", "shards"):
            assert Path(point.config[key]).is_absolute()


def test_a_dataset_without_the_probe_split_fails_when_the_spec_is_read(tmp_path, digits_shards):
    msg = fails(tmp_path, "datasets.digits: .* has no split 'val'", check_paths=True,
                datasets={"digits": digits_shards}, eval={"split": "val"})
    assert "--val-fraction" in msg
