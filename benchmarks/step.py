"""Benchmark: lgm_ray's first-order step vs the reference second-order formulation.

Measures, on the same backbone, batch and augmentation parameters:

* time per step of the reference formulation (``create_graph=True`` through the backbone) and of
  lgm_ray's step in single-pass mode (graph kept, one forward) and in two-pass micro-batched mode;
* peak memory of each (CUDA: ``torch.cuda.max_memory_allocated`` above the set-up; CPU: the
  process's peak RSS above its level after set-up, warm-up step included, each configuration in a
  fresh process);
* peak memory of the micro-batched step at augs_per_batch 10 / 20 / 40.

It prints one line per configuration and the ratios the core issue sets as goals: step time of
lgm_ray / reference (≤ 1.0) and micro-batched peak memory at augs 40 / augs 10 (≤ 1.5).

``--noise`` measures the augmentation's additive noise alone, at ImageNet-1k's view count
(1,000 classes × 3 augs_per_batch = 3,000 views of 224 px by default): the old implementation (a CPU
draw per view in a Python loop, then a copy to the device; kept below as ``noise_loop``) against
:func:`lgm_ray.core.augment.view_noise` (a counter-based hash, vectorised, on the device). It applies the
noise the way a step does, a micro-batch of views at a time, and prints its cost per step and its
share of a step of ``--step-seconds`` (a measured step time of that configuration, noise excluded).
``--noise-impl loop`` runs the full-step comparison above with the old noise instead.

    python benchmarks/step.py                                  # CPU, the demo CNN on digits-sized images
    python benchmarks/step.py --device cuda --backbone dinov2_vitb14 --classes 100 --res 224
    python benchmarks/step.py --noise --out benchmarks/results/noise_cpu.txt
    python benchmarks/step.py --noise --device cuda --step-seconds 6.6
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from lgm_ray.core.augment import AugParams, AugSpec


def noise_loop(params: AugParams, spec: AugSpec, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """lgm_ray's augmentation noise before issue 8, kept for the comparison: one CPU draw per view."""
    out = torch.zeros((len(params), *shape), device=device, dtype=dtype)
    for i in torch.nonzero(params.noise_on).flatten().tolist():
        g = torch.Generator().manual_seed(int(params.noise_seed[i]))
        out[i] = (torch.randn(shape, generator=g) * spec.noise_std + spec.noise_mean).to(device, dtype)
    return out


def _use_noise(impl: str) -> None:
    """Make :func:`lgm_ray.core.augment.apply` add the old (``loop``) or the current (``hash``) noise."""
    import lgm_ray.core.augment as augment

    if impl == "loop":
        augment.view_noise = noise_loop


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(args: argparse.Namespace, mode: str, augs: int) -> dict:
    """One configuration, timed over ``args.repeats`` steps after a warm-up."""
    from lgm_ray.backbones import create_backbone
    from lgm_ray.core.augment import AugSpec, sample_params
    from lgm_ray.core.matching import SynPass, draw_head, meta_loss_and_grad, real_grad, view_layout
    from lgm_ray.core.reference import reference_step
    from lgm_ray.core.synset import SyntheticSet

    dev = torch.device(args.device)
    _use_noise(args.noise_impl)
    torch.manual_seed(0)
    bb = create_backbone(args.backbone, pretrained=args.backbone == "digits_simclr_cnn", img_size=args.crop, device=dev)
    spec = AugSpec(crop_res=args.crop)
    g = torch.Generator().manual_seed(0)
    syn = SyntheticSet(args.classes, args.ipc, args.res, start_levels=99, seed=0).to(dev)
    n_real = args.ipc * augs * args.classes
    x_real = torch.rand(n_real, 3, args.res, args.res, generator=g).to(dev)
    y_real = torch.randint(0, args.classes, (n_real,), generator=g).to(dev)
    w, b = draw_head(args.classes, bb.feature_dim, g)
    w, b = w.to(dev), b.to(dev)
    syn_params = sample_params(syn.num_images * augs, spec, g)
    real_params = sample_params(n_real, spec, g)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    micro = args.micro_batch if mode == "lgm_micro" else None
    total = syn.num_images * augs

    def step() -> None:
        syn.zero_grad(set_to_none=True)
        if mode == "reference":
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                reference_step(bb, syn.render(), syn.labels, augs, syn_params, x_real, y_real, real_params, spec, w, b)
            return
        g_real = real_grad(bb, x_real, y_real, w, b, n_real, spec, real_params, micro_batch=micro, amp_dtype=amp)
        p = SynPass(bb, syn.render(), syn.labels, view_layout(syn.num_images, augs), syn_params, spec,
                    micro_batch=micro, amp_dtype=amp)
        _, gr = meta_loss_and_grad(g_real, p.forward(w, b, total))
        p.backward(w, b, total, gr)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # CPU: peak RSS is a high-water mark, so take the baseline before the first step runs.
    base_rss = _rss_mb()
    step()  # warm-up (allocator, kernels)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        step()
    sync()
    sec = (time.perf_counter() - t0) / args.repeats
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak = _rss_mb() - base_rss
    return {"mode": mode, "augs": augs, "sec_per_step": sec, "peak_mb": peak,
            "views_per_step": n_real + total, "device": _device_name(dev)}


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _child(args: argparse.Namespace, mode: str, augs: int) -> dict:
    """Run one configuration in a fresh process so CPU peak RSS is not shared between runs."""
    cmd = [sys.executable, __file__, "--child", mode, str(augs)] + _forward_args(args)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"mode": mode, "augs": augs, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _forward_args(args: argparse.Namespace) -> list[str]:
    keys = ("backbone", "device", "classes", "ipc", "res", "crop", "repeats", "micro_batch", "amp", "noise_impl")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="digits_simclr_cnn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--res", type=int, default=32, help="synthetic and real image side")
    p.add_argument("--crop", type=int, default=None,
                   help="augmented crop side fed to the backbone (default 32; 224 with --noise)")
    p.add_argument("--augs", type=int, default=10, help="augs_per_batch of the time comparison")
    p.add_argument("--memory-augs", default="10,20,40", help="augs_per_batch values of the memory sweep ('' for none)")
    p.add_argument("--modes", default="reference,lgm,lgm_micro", help="step formulations of the time comparison")
    p.add_argument("--micro-batch", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--noise-impl", default="hash", choices=["hash", "loop"],
                   help="augmentation noise of the full-step runs: current (hash) or the old per-view loop")
    p.add_argument("--noise", action="store_true", help="measure the augmentation noise alone (see above)")
    p.add_argument("--views", type=int, default=3000, help="--noise: views per pass (ImageNet-1k: 1000 × 3)")
    p.add_argument("--passes", type=int, default=3,
                   help="--noise: noise passes over the views per step (real + two-pass synthetic: 3)")
    p.add_argument("--step-seconds", type=float, default=None,
                   help="--noise: a measured step time of that configuration without noise, for the share")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    p.add_argument("--out", help="--noise: also write the printed lines to this text file")
    p.add_argument("--child", nargs=2, metavar=("MODE", "AUGS"), help=argparse.SUPPRESS)
    p.add_argument("--json-out", help="also write all rows to this JSON file")
    args = p.parse_args(argv)
    if args.crop is None:
        args.crop = 224 if args.noise else 32
    return args


def _time(fn, repeats: int, dev: torch.device, warm_up: bool = True) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` (after one warm-up call).

    The minimum, not the mean: on a shared machine the other processes only ever add time.
    """
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def noise_benchmark(args: argparse.Namespace) -> list[str]:
    """Old vs new augmentation noise for ``args.views`` views of ``args.crop`` px; returns the lines."""
    from lgm_ray.core.augment import sample_params, view_noise

    dev = torch.device(args.device)
    spec = AugSpec(crop_res=args.crop)  # the paper's noise: N(0.5, 0.2²) on half the views
    params = sample_params(args.views, spec, torch.Generator().manual_seed(0))
    shape = (3, args.crop, args.crop)
    mb = args.micro_batch

    def over_views(fn) -> None:
        for i in range(0, args.views, mb):
            fn(params.select(slice(i, i + mb)), spec, shape, dev, torch.float32)

    # the two agree in distribution (different generators, so not value for value); also warms up
    sample = params.select(slice(0, min(mb, args.views)))
    on = sample.noise_on.to(dev)
    for name, fn in (("loop", noise_loop), ("hash", view_noise)):
        y = fn(sample, spec, shape, dev, torch.float32)[on]
        if not (abs(float(y.mean()) - 0.5) < 0.01 and abs(float(y.std()) - 0.2) < 0.01):
            raise RuntimeError(f"{name} noise has mean {float(y.mean())} and std {float(y.std())}")

    # interleaved, so both see the same load from other processes
    impls = (("loop", noise_loop), ("hash", view_noise))
    sec = {name: float("inf") for name, _ in impls}
    for _ in range(args.repeats):
        for name, fn in impls:
            sec[name] = min(sec[name], _time(lambda f=fn: over_views(f), 1, dev, warm_up=False))
    n_on = int(params.noise_on.sum())
    lines = [
        f"augmentation noise  device {_device_name(dev)}  threads {torch.get_num_threads()}  views {args.views} "
        f"({n_on} with noise)  crop {args.crop}  micro-batch {mb}  best of {args.repeats}",
        f"{'impl':<6}{'s/pass':>10}{'ms/noised view':>16}{'s/step':>10}   (step = {args.passes} passes)",
    ]
    for name in ("loop", "hash"):
        lines.append(f"{name:<6}{sec[name]:>10.3f}{1e3 * sec[name] / max(n_on, 1):>16.3f}"
                     f"{args.passes * sec[name]:>10.3f}")
    lines.append(f"speed-up hash / loop: {sec['loop'] / sec['hash']:.1f}x")
    if args.step_seconds:
        for name in ("loop", "hash"):
            noise = args.passes * sec[name]
            lines.append(f"share of a step of {args.step_seconds:.2f} s + noise, {name}: "
                         f"{100 * noise / (args.step_seconds + noise):.1f}%")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.noise:
        lines = noise_benchmark(args)
        print("\n".join(lines))
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    if args.child:
        print(json.dumps(run_one(args, args.child[0], int(args.child[1]))))
        return
    rows = [_child(args, m, args.augs) for m in args.modes.split(",")]
    mem_augs = [int(a) for a in args.memory_augs.split(",") if a]
    rows += [_child(args, "lgm_micro", a) for a in mem_augs if a != args.augs]
    print(f"backbone {args.backbone}  device {rows[0].get('device', args.device)}  classes {args.classes}  "
          f"ipc {args.ipc}  res {args.res}  crop {args.crop}  micro-batch {args.micro_batch}  amp {args.amp}  "
          f"noise {args.noise_impl}")
    print(f"{'mode':<11}{'augs':>5}{'views':>7}{'s/step':>10}{'peak MB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<11}{r['augs']:>5}  failed: {r['error']}")
        else:
            print(f"{r['mode']:<11}{r['augs']:>5}{r['views_per_step']:>7}{r['sec_per_step']:>10.4f}{r['peak_mb']:>10.1f}")
    by = {(r["mode"], r["augs"]): r for r in rows if "error" not in r}
    ref = by.get(("reference", args.augs))
    for mode in ("lgm", "lgm_micro"):
        if ref and (mode, args.augs) in by:
            ratio = by[(mode, args.augs)]["sec_per_step"] / ref["sec_per_step"]
            mem = by[(mode, args.augs)]["peak_mb"] / max(ref["peak_mb"], 1e-9)
            print(f"time {mode} / reference at augs {args.augs}: {ratio:.2f}x   peak memory: {mem:.2f}x")
    lo, hi = (by.get(("lgm_micro", min(mem_augs))), by.get(("lgm_micro", max(mem_augs)))) if mem_augs else (0, 0)
    if lo and hi:
        print(f"micro-batched peak memory augs {max(mem_augs)} / augs {min(mem_augs)}: "
              f"{hi['peak_mb'] / max(lo['peak_mb'], 1e-9):.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
