"""One distillation on K Ray Train workers: exact against one process, elastic, surviving a lost worker.

Real Ray (the ``local_ray`` fixture: a local instance of the module's own; ``ray.cluster_utils.Cluster``
for two nodes), real shards, real checkpoints through ``ray.train.report``. The runs that a test kills
mid-way are slowed by the loop's test hook (``LGM_RAY_TEST_STEP_DELAY``), which reaches the workers
although it is set after the module's Ray started.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from lgm_ray.distill.__main__ import main
from lgm_ray.distill.checkpoints import class_file
from lgm_ray.distill.config import ConfigError, DistillConfig
from lgm_ray.distill.loop import TEST_STEP_DELAY
from lgm_ray.distill.run import run_distill
from lgm_ray.distill.run_folder import RunFolder

pytestmark = pytest.mark.slow

STEPS = 12


def _cfg(shards: str, out: Path, **kw) -> DistillConfig:
    base = dict(shards=shards, syn_res=16, real_res=16, crop_res=16, augs_per_batch=2, pyramid_extent=4,
                steps=STEPS, ckpt_every=4, log_every=4, ipc=1, lr=0.01, seed=3, out=str(out))
    return DistillConfig.from_dict({**base, **kw})


def _images(out: Path) -> torch.Tensor:
    return RunFolder(out).load_synset()["images"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def single(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    return out, run_distill(_cfg(digits_shards, out))


@pytest.fixture(scope="module")
def two_workers(local_ray, digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("k2") / "run"
    return out, run_distill(_cfg(digits_shards, out, workers=2))


def test_two_workers_equal_one_process(single, two_workers):
    (s_out, s_sum), (w_out, w_sum) = single, two_workers
    assert w_sum["steps"] == STEPS and len(w_sum["losses"]) == STEPS
    # The meta loss at every step, and the images after growth (pyramid 4 px at step 12) and Adam
    # re-creations, are the single process's up to float summation order.
    assert max(abs(a - b) for a, b in zip(w_sum["losses"], s_sum["losses"], strict=True)) < 1e-5
    assert _rel(_images(w_out), _images(s_out)) < 1e-4
    per = w_sum["per_worker"]
    assert [p["rank"] for p in per] == [0, 1] and [p["classes"] for p in per] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert all(p["peak_memory_mb"] > 0 and p["reduce_seconds"] > 0 for p in per)


def test_three_workers_uneven_classes_equal_one_process(local_ray, single, digits_shards, tmp_path):
    s_out, s_sum = single
    summary = run_distill(_cfg(digits_shards, tmp_path / "k3", workers=3))
    assert [p["classes"] for p in summary["per_worker"]] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert max(abs(a - b) for a, b in zip(summary["losses"], s_sum["losses"], strict=True)) < 1e-5
    assert _rel(_images(tmp_path / "k3"), _images(s_out)) < 1e-4


def test_a_rerun_on_the_same_workers_is_bit_identical(local_ray, two_workers, digits_shards, tmp_path):
    run_distill(_cfg(digits_shards, tmp_path / "again", workers=2))
    assert torch.equal(_images(tmp_path / "again"), _images(two_workers[0]))


def test_resume_on_another_number_of_workers(local_ray, single, digits_shards, tmp_path):
    """Checkpointed by 3 workers at step 8, continued on 2 workers, then extended on one process."""
    out = tmp_path / "elastic"
    run_distill(_cfg(digits_shards, out, workers=3, steps=8))
    folder = RunFolder(out)
    ckpt = folder.latest_checkpoint()
    assert ckpt.path.is_relative_to(folder.ray) and ckpt.path.name == folder.checkpoint_name(8)
    assert ckpt.step == 8 and sorted(ckpt.path.glob("classes-rank*.pt")) == [ckpt.path / class_file(r) for r in range(3)]
    run_distill(_cfg(digits_shards, out, workers=2, steps=10), resume=True)
    summary = run_distill(_cfg(digits_shards, out, workers=0, steps=STEPS), resume=True)
    s_out, s_sum = single
    assert max(abs(a - b) for a, b in zip(summary["losses"], s_sum["losses"], strict=True)) < 1e-5
    assert _rel(_images(out), _images(s_out)) < 1e-4


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _descends_from_me(pid: int) -> bool:
    me = os.getpid()
    while pid > 1:
        pid = _parent(pid)
        if pid == me:
            return True
    return False


def _worker_pids() -> list[int]:
    """This test's Ray Train worker processes: titled ``ray::RayTrainWorker…``, under this process's Ray."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes()
                    and _descends_from_me(int(proc.name))):
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(pids)


class _Killer(threading.Thread):
    """Kills one Ray Train worker once the run has a checkpoint of ``step`` (plus ``delay`` seconds)."""

    def __init__(self, out: Path, step: int, delay: float) -> None:
        super().__init__(daemon=True)
        self.out, self.step, self.delay, self.killed = out, step, delay, None

    def run(self) -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            ckpt = RunFolder(self.out).latest_checkpoint()
            if ckpt is not None and ckpt.step >= self.step:
                break
            time.sleep(0.05)
        time.sleep(self.delay)
        pids = _worker_pids()
        if pids:
            os.kill(pids[-1], 9)
            self.killed = pids[-1]


def _kill_a_worker_after(out: Path, step: int, delay: float = 0.0) -> _Killer:
    killer = _Killer(out, step, delay)
    killer.start()
    return killer


@pytest.mark.parametrize("delay", [0.0, 1.5])
def test_a_lost_worker_restarts_from_the_last_checkpoint_with_the_same_images(
        local_ray, two_workers, digits_shards, tmp_path, delay, monkeypatch):
    """Killed right after a checkpoint (which Train may not have recorded yet) or a few steps past it."""
    out = tmp_path / "lost"
    monkeypatch.setenv(TEST_STEP_DELAY, "0.25")
    killer = _kill_a_worker_after(out, 4, delay)
    t0 = time.monotonic()
    summary = run_distill(_cfg(digits_shards, out, workers=2, max_failures=2))
    killer.join(timeout=5)
    assert killer.killed is not None, "no Ray Train worker process was found to kill"
    assert summary["steps"] == STEPS
    # The workers that finished are a new group: the killed process is not among them.
    assert killer.killed not in {w["pid"] for w in summary["per_worker"]}
    assert torch.equal(_images(out), _images(two_workers[0]))
    # The hook reached the workers: the last group alone ran at least 12 − 8 steps of 0.25 s.
    assert summary["per_worker"][0]["seconds"] >= 0.25 * summary["per_worker"][0]["steps_run"] >= 1.0
    assert time.monotonic() - t0 > 0.25 * STEPS


def test_spent_retries_fail_clearly_and_the_same_command_resumes(local_ray, two_workers, digits_shards, tmp_path,
                                                               capsys, monkeypatch):
    out = tmp_path / "spent"
    args = ["--shards", digits_shards, "--syn-res", "16", "--real-res", "16", "--crop-res", "16",
            "--augs-per-batch", "2", "--pyramid-extent", "4", "--steps", str(STEPS), "--ckpt-every", "4",
            "--log-every", "4", "--lr", "0.01", "--seed", "3", "--workers", "2", "--out", str(out)]
    killer = _kill_a_worker_after(out, 4, 0.5)
    monkeypatch.setenv(TEST_STEP_DELAY, "0.25")
    with pytest.raises(SystemExit) as exc:
        main([*args, "--max-failures", "0"])
    monkeypatch.delenv(TEST_STEP_DELAY)
    killer.join(timeout=5)
    assert killer.killed is not None
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "failed more than max_failures = 0" in err and "Checkpoint kept:" in err and "--resume" in err
    kept = RunFolder(out).latest_checkpoint()
    assert kept is not None and kept.path.is_relative_to(RunFolder(out).ray) and 4 <= kept.step < STEPS
    main([*args, "--resume"])
    assert torch.equal(_images(out), _images(two_workers[0]))


def test_bad_worker_requests_fail_before_any_step(local_ray, digits_shards, tmp_path):
    with pytest.raises(ConfigError, match="11 workers for 10 classes"):
        run_distill(_cfg(digits_shards, tmp_path / "a", workers=11, real_streams=16))
    with pytest.raises(ConfigError, match="GPU"):
        run_distill(_cfg(digits_shards, tmp_path / "b", workers=2), use_gpu=True)
    with pytest.raises(ConfigError, match="real_streams"):
        run_distill(_cfg(digits_shards, tmp_path / "c", workers=3, real_streams=2))
    from lgm_ray.backbones import BackboneWeightsError

    with pytest.raises(BackboneWeightsError):
        run_distill(_cfg(digits_shards, tmp_path / "d", workers=2, weights=str(tmp_path / "missing.pt")))
    assert not any(RunFolder(tmp_path / n).ray.exists() for n in "abcd")


def test_two_nodes_strict_spread_gives_the_same_images(two_workers, digits_shards, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        summary = run_distill(_cfg(digits_shards, tmp_path / "nodes", workers=2, placement="STRICT_SPREAD"))
        assert len({p["node_id"] for p in summary["per_worker"]}) == 2  # one worker on each node
        assert torch.equal(_images(tmp_path / "nodes"), _images(two_workers[0]))
    finally:
        ray.shutdown()
        cluster.shutdown()
