"""Trials per hour of a sweep spec (the demo by default) at 1 and 2 concurrent trials.

    python benchmarks/sweep.py [--spec sweeps/demo.yaml] [--concurrency 1 2] [--steps N] [--keep DIR]

Runs the spec once per concurrency level, each time as a fresh sweep (its own storage and SQLite
MLflow store in a temporary folder, a fresh local Ray), with ``resources.max_concurrent_trials`` set
to the level. Trials per hour count the Tune phase only (the shared baselines run before it, once,
and are reported apart), from ``timing.json`` the sweep writes. ``--steps`` shortens every trial's
distillation (the demo's own is 240). On this 2-core machine one in-process trial holds one core, so
2 concurrent trials can at best double the rate; the load average before and after each run is
printed, since other processes share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_once(spec_path: Path, concurrency: int, steps: int | None, folder: Path) -> dict:
    from lgm_ray.sweep.driver import run_sweep
    from lgm_ray.sweep.parse import parse_spec

    data = yaml.safe_load(spec_path.read_text())
    data["name"] = f"{data.get('name', spec_path.stem)}-c{concurrency}"
    data["storage"] = str(folder / "runs")
    data["mlflow"] = {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": data["name"]}
    data.setdefault("resources", {})["max_concurrent_trials"] = concurrency
    if steps is not None:
        data.setdefault("config", {})["steps"] = steps
    spec = parse_spec(data, source=str(spec_path), cwd=ROOT)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    status = run_sweep(spec)
    wall = time.perf_counter() - t0
    timing = json.loads((spec.sweep_dir / "timing.json").read_text())
    trials = len(spec.grid())
    return {
        "concurrency": concurrency,
        "status": status,
        "trials": trials,
        "wall_s": round(wall, 1),
        "baselines_s": timing["baselines_s"],
        "trials_s": timing["trials_s"],
        "trials_per_hour": round(3600 * trials / timing["trials_s"], 1),
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", default=str(ROOT / "sweeps" / "demo.yaml"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, help="override every trial's steps (default: the spec's)")
    p.add_argument("--keep", help="keep the sweeps in this folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rows = []
    for c in args.concurrency:
        folder = Path(args.keep) / f"c{c}" if args.keep else Path(tempfile.mkdtemp(prefix=f"lgm_sweep_c{c}_"))
        folder.mkdir(parents=True, exist_ok=True)
        try:
            rows.append(run_once(Path(args.spec), c, args.steps, folder))
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{'concurrent':>10} {'trials':>6} {'trials s':>9} {'trials/h':>9} {'baselines s':>11} {'load':>11}"
    )
    for r in rows:
        print(
            f"{r['concurrency']:>10} {r['trials']:>6} {r['trials_s']:>9.1f} {r['trials_per_hour']:>9.1f} "
            f"{r['baselines_s']:>11.1f} {r['load_before']:>5.1f}→{r['load_after']:<5.1f}"
        )
    if len(rows) >= 2:
        print(
            f"speed-up {rows[-1]['concurrency']} vs {rows[0]['concurrency']} concurrent: "
            f"{rows[-1]['trials_per_hour'] / rows[0]['trials_per_hour']:.2f}×"
        )


if __name__ == "__main__":
    main()
