"""Time one distillation on 1 vs 2 Ray workers (fixed total work), the all-reduce, and each worker's memory.

    python benchmarks/workers.py [--steps 30 --augs 20 --workers 1 2]

Not a test: prints figures (and writes them to benchmarks/results/workers_cpu.txt with --save).
On a machine with one core per worker the goal is 2 workers ≥ 1.8× one worker; each worker runs one
torch thread so the cores are not shared inside a worker.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lgm_ray.distill.config import DistillConfig  # noqa: E402
from lgm_ray.distill.run import run_distill  # noqa: E402


def bytes_per_step(num_classes: int, features: int) -> int:
    """Floats summed by the one all-reduce of a step: [G_real; G_syn], plus the finite flag."""
    return 4 * (2 * num_classes * (features + 1) + 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--augs", type=int, default=20)
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--save", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["OMP_NUM_THREADS"] = "1"
    import ray

    ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    lines = [f"digits_simclr_cnn, 10 classes, ipc 1, augs {args.augs}, {args.res} px, {args.steps} steps, "
             f"{os.cpu_count()} cores; step times exclude worker start-up",
             f"all-reduce payload per step: {bytes_per_step(10, 256)} bytes "
             f"(ImageNet-1k ViT-B: {bytes_per_step(1000, 768) / 1e6:.1f} MB)"]
    base = None
    for k in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = DistillConfig.from_dict(dict(
                shards="digits", syn_res=args.res, real_res=args.res, crop_res=args.res, augs_per_batch=args.augs,
                steps=args.steps, ckpt_every=args.steps, log_every=args.steps, pyramid_extent=10, workers=k,
                out=str(Path(tmp) / "run")))
            t0 = time.perf_counter()
            summary = run_distill(cfg)
            wall = time.perf_counter() - t0
        per = summary["per_worker"]
        loop_s = max(w["seconds"] for w in per)
        rate = args.steps / loop_s
        base = base or rate
        reduce_ms = 1000 * max(w["reduce_seconds"] for w in per) / args.steps
        mem = ", ".join(f"rank {w['rank']} {w['peak_memory_mb']:.0f} MB" for w in per)
        lines.append(f"workers {k}: {rate:.2f} steps/s ({rate / base:.2f}× one worker), all-reduce "
                     f"{reduce_ms:.1f} ms/step ({100 * reduce_ms / 1000 / (loop_s / args.steps):.0f}% of a step), "
                     f"wall {wall:.0f} s with start-up; peak RSS {mem}")
        print(lines[-1], flush=True)
    ray.shutdown()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.save:
        out = Path(__file__).resolve().parent / "results" / "workers_cpu.txt"
        out.write_text(text)


if __name__ == "__main__":
    main()
