"""One set on several backbones (lgm_ray.evaluate.cross_model): per-backbone settings, and Ray — never unasked,
never outside the trial, the same numbers as in turn."""

from __future__ import annotations

import sys
import types

import pytest
from eval_helpers import BACKBONE, FAST, cli, notes, summary

from lgm_ray.evaluate import cross_model as cm
from lgm_ray.evaluate import protocol as ev

# ---------------------------------------------------------------- per-backbone settings


def test_cross_model_gives_other_backbones_their_own_normalisation(digits_shards, odd_set_file, cache_dir, capsys,
                                                                   twin, built_backbones):
    out, stdout, err = cli(capsys, "--synset", odd_set_file, "--backbone", f"{BACKBONE},{twin}",
                           "--shards", digits_shards, "--epochs", "1", "--seeds", "1", "--cache-dir", cache_dir)
    assert built_backbones == [(BACKBONE, "imagenet", 28), (twin, "native", 28)]
    assert [r["normalization"] for r in out["results"]] == ["imagenet", "native"]
    assert {r["crop_res"] for r in out["results"]} == {28} and {r["real_res"] for r in out["results"]} == {32}
    assert len(stdout.splitlines()) == 2 + 2 + 1  # header, rule, one row per backbone, JSON
    assert notes(err) == []


def test_per_backbone_normalisation_overrides_the_config(digits_shards, real_set, cache_dir, twin, built_backbones):
    images, labels, _ = real_set
    cfg = FAST.replace(epochs=1, seeds=1, normalization="imagenet")
    results = cm.evaluate_cross_model([BACKBONE, twin], digits_shards, cfg, images=images, labels=labels,
                                      normalization={twin: "native"}, parallel=False, cache_dir=cache_dir)
    assert [r["normalization"] for r in results] == ["imagenet", "native"]  # the others keep cfg's
    assert [b[1] for b in built_backbones] == ["imagenet", "native"]
    with pytest.raises(ev.EvaluationInputError, match="1 weights entries for 2 backbones"):
        cm.evaluate_cross_model([BACKBONE, twin], digits_shards, cfg, images=images, labels=labels,
                                weights=[None], parallel=False)
    with pytest.raises(ev.EvaluationInputError, match=r"normalization given for \['nope'\]"):
        cm.evaluate_cross_model([BACKBONE], digits_shards, cfg, images=images, labels=labels,
                                normalization={"nope": "native"}, parallel=False)


# ---------------------------------------------------------------- Ray: never unasked, never outside the trial


def _fake_ray(*, initialized: bool, actor_id: str | None = None) -> types.ModuleType:
    """A stand-in ``ray`` module: it answers whether Ray is up and where we are, and fails on any use."""
    fake = types.ModuleType("ray")

    def used(*args, **kwargs):
        raise AssertionError("Ray was used")

    fake.is_initialized = lambda: initialized
    fake.get_runtime_context = lambda: types.SimpleNamespace(get_actor_id=lambda: actor_id,
                                                             get_placement_group_id=lambda: None)
    fake.init = fake.remote = fake.put = fake.get = used
    return fake


def test_one_backbone_evaluations_never_use_ray(digits_shards, real_set, cache_dir, monkeypatch):
    images, labels, _ = real_set
    cfg, kw = FAST.replace(epochs=1, seeds=1), {"cache_dir": cache_dir}
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(initialized=True))  # a driver with Ray up
    ev.evaluate_synset(images, labels, BACKBONE, digits_shards, cfg, **kw)
    ev.evaluate_baseline("centroids", BACKBONE, digits_shards, cfg, **kw)
    assert len(cm.evaluate_cross_model([BACKBONE], digits_shards, cfg, images=images, labels=labels,
                                       parallel=False, **kw)) == 1
    with pytest.raises(AssertionError, match="Ray was used"):  # auto in a driver with Ray up: Ray tasks
        cm.evaluate_cross_model([BACKBONE], digits_shards, cfg, images=images, labels=labels, **kw)
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(initialized=True, actor_id="a1"))  # inside a trial
    assert len(cm.evaluate_cross_model([BACKBONE], digits_shards, cfg, images=images, labels=labels, **kw)) == 1
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(initialized=False))
    with pytest.raises(ev.EvaluationInputError, match="Ray is not initialised in this process; call ray.init"):
        cm.evaluate_cross_model([BACKBONE], digits_shards, cfg, images=images, labels=labels, parallel=True, **kw)


@pytest.fixture(scope="module")
def two_models(digits_shards, real_set, random_weights, cache_dir):
    """One set on two models (the demo backbone, and its architecture with random weights), in order."""
    images, labels, _ = real_set
    kw = {"images": images, "labels": labels, "weights": [None, random_weights], "cache_dir": cache_dir}
    sequential = cm.evaluate_cross_model([BACKBONE, BACKBONE], digits_shards, FAST, parallel=False, **kw)
    assert summary(sequential[0]) != summary(sequential[1])  # two models, two different results
    return kw, sequential


def test_cross_model_as_ray_tasks_equals_sequential(digits_shards, two_models, local_ray):
    kw, sequential = two_models
    on_ray = cm.evaluate_cross_model([BACKBONE, BACKBONE], digits_shards, FAST, **kw)  # auto, from the driver
    assert [summary(r) for r in on_ray] == [summary(r) for r in sequential]


def test_an_input_error_in_a_ray_task_arrives_as_itself(digits_shards, local_ray):
    with pytest.raises(ev.EvaluationInputError) as exc:  # the digits shards have no val split
        cm.evaluate_cross_model([BACKBONE], digits_shards, FAST.replace(split="val"), baseline="random",
                                parallel=True)
    assert type(exc.value) is ev.EvaluationInputError  # not a RayTaskError with the remote traceback
    assert str(exc.value).startswith(f"shards {digits_shards} have no 'val' split")


def test_cli_ray_flag_runs_the_backbones_as_tasks(digits_shards, synset_file, two_models, local_ray, capsys,
                                                  random_weights, cache_dir):
    _, sequential = two_models
    out, _, _ = cli(capsys, "--synset", synset_file, "--backbone", BACKBONE, "--shards", digits_shards, "--ray",
                    "--epochs", "10", "--seeds", "2", "--cache-dir", cache_dir)
    assert summary(out) == summary(sequential[0])  # the set's own settings are FAST's
    assert local_ray.is_initialized()  # a Ray it did not start is left running


@pytest.mark.slow  # an actor and its tasks start Ray workers: ~55 s on 2 busy cores
def test_cross_model_inside_a_trial_stays_in_the_trials_placement_group(digits_shards, two_models, local_ray):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray = local_ray
    kw, sequential = two_models
    # A trial: an actor in a placement group that holds every CPU of this Ray, so a task that escaped
    # the group could never be scheduled (the ray.get below would time out).
    group = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(group.ready(), timeout=120)

    @ray.remote(num_cpus=0)
    class Trial:
        def evaluate(self, parallel, forbid_tasks: bool):
            import ray as ray_in_trial

            from lgm_ray.evaluate import cross_model as cm

            if forbid_tasks:
                def no_tasks(*args, **kwargs):
                    raise AssertionError("a Ray task was started")

                ray_in_trial.remote = no_tasks
            return cm.evaluate_cross_model([BACKBONE, BACKBONE], digits_shards, FAST, parallel=parallel, **kw)

    try:
        trial = Trial.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group)).remote()
        in_group = ray.get(trial.evaluate.remote(True, False), timeout=300)  # tasks, pinned to the group
        in_process = ray.get(trial.evaluate.remote(None, True), timeout=300)  # auto in a trial: no tasks
    finally:
        remove_placement_group(group)
    for results in (in_group, in_process):
        assert [summary(r) for r in results] == [summary(r) for r in sequential]
