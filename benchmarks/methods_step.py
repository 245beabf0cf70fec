"""Benchmark: one LGM step (lgm_ray/core/matching.py) vs one CLP-DD step (lgm_ray/core/clp.py).

Both steps run on the same frozen backbone, synthetic set, real batch and augmentation draws, at
ImageNet-1k's shape — ``classes`` × ``ipc`` synthetic images, ``augs`` views each, ``ipc · augs ·
classes`` real samples (1,000 × 1 × 3: 3,000 views and 3,000 real samples) — micro-batched (two
passes). Each method runs in a fresh process: a warm-up step, then ``--repeats`` timed steps (the
fastest is kept). Peak memory is ``torch.cuda.max_memory_allocated`` above the set-up on a GPU; on
the CPU the process's peak RSS above its level before the first step (tracemalloc does not see
torch's tensor allocations). For CLP it also times the closed form alone (the N_syn × N_syn ridge
solve and its backward, every process's redundant share) and prints each step's ``reduce`` payload.

The backbone is a timm model with random weights (the step's cost does not depend on the weights).

    python benchmarks/methods_step.py                           # CPU: ViT-Ti/16 at 32 px, 1,000 classes
    python benchmarks/methods_step.py --depth 2 --warmup 0      # the same, 2 blocks: minutes on 2 cores
    python benchmarks/methods_step.py --img 64 --res 64
    python benchmarks/methods_step.py --device cuda --model vit_base_patch16_224 --img 224 --res 256 \\
        --micro-batch 500 --amp bf16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

METHODS = ("lgm", "clp")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _backbone(name: str, img: int, dev: torch.device, depth: int | None = None) -> tuple[torch.nn.Module, int]:
    """A frozen timm model with random weights, returning pooled features; and its feature width.

    ``depth`` (ViTs) keeps only that many blocks: a cheaper backbone of the same width, for the CPU.
    """
    import timm

    kw = {"img_size": img} if "vit" in name or "deit" in name else {}
    if depth:
        kw["depth"] = depth
    net = timm.create_model(name, pretrained=False, num_classes=0, **kw).to(dev).eval()
    net.requires_grad_(False)
    return net, int(net.num_features)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run_one(args: argparse.Namespace, method: str) -> dict:
    """One method, timed over ``args.repeats`` steps after a warm-up (in this process)."""
    from lgm_ray.core.augment import AugSpec
    from lgm_ray.core.clp import clp_step
    from lgm_ray.core.matching import lgm_step
    from lgm_ray.core.synset import SyntheticSet

    dev = torch.device(args.device)
    torch.manual_seed(0)
    net, dim = _backbone(args.model, args.img, dev, args.depth)
    spec = AugSpec(crop_res=args.img)
    g = torch.Generator().manual_seed(0)
    syn = SyntheticSet(args.classes, args.ipc, args.res, start_levels=99, seed=0).to(dev)
    n_real = args.ipc * args.augs * args.classes
    x = torch.rand(n_real, 3, args.res, args.res, generator=g).to(dev)
    y = torch.randint(0, args.classes, (n_real,), generator=g).to(dev)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    fn = clp_step if method == "clp" else lgm_step
    kw = dict(num_classes=args.classes, feature_dim=dim, num_images=syn.num_images, real_total=n_real, ipc=args.ipc,
              augs=args.augs, seed=0, spec=spec, micro_batch=args.micro_batch, amp_dtype=amp)
    owned, pos = torch.arange(syn.num_images), torch.arange(n_real)
    losses = []

    def step(t: int) -> None:
        syn.zero_grad(set_to_none=True)
        losses.append(fn(net, syn.render(), owned, x, y, pos, step=t, **kw).loss)

    base_rss = _rss_mb()  # a high-water mark: taken before the first step
    for t in range(args.warmup):
        step(t)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    best = float("inf")
    for t in range(args.warmup, args.warmup + args.repeats):
        t0 = time.perf_counter()
        step(t)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    peak = ((torch.cuda.max_memory_allocated() - base_cuda) / 2**20 if dev.type == "cuda"
            else _rss_mb() - base_rss)
    row = {"method": method, "sec_per_step": best, "peak_mb": peak, "loss": losses[-1], "dim": dim,
           "views": syn.num_images * args.augs, "real": n_real, "device": _device_name(dev),
           "threads": torch.get_num_threads()}
    if method == "clp":
        row["solve_sec"] = _time_closed_form(syn.num_images * args.augs, dim, args, dev)
    return row


def _time_closed_form(n: int, dim: int, args: argparse.Namespace, dev: torch.device) -> float:
    """Seconds of the closed form alone at this size: probe from N_syn features, and ∂/∂features."""
    from lgm_ray.core.clp import closed_form_probe

    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, dim, generator=g).to(dev, torch.float64).requires_grad_(True)
    y = (torch.arange(n) % args.classes).to(dev)
    dw = torch.randn(dim + 1, args.classes, generator=g).to(dev, torch.float64)
    best = float("inf")
    for _ in range(args.repeats + 1):  # the first is a warm-up
        _sync(dev)
        t0 = time.perf_counter()
        torch.autograd.grad(closed_form_probe(z, y, args.classes), z, grad_outputs=dw)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _child(args: argparse.Namespace, method: str) -> dict:
    """One method in a fresh process, so the CPU's peak RSS is its own."""
    cmd = [sys.executable, __file__, "--child", method] + _forward_args(args)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"method": method, "error": (out.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _forward_args(args: argparse.Namespace) -> list[str]:
    keys = ("model", "depth", "device", "classes", "ipc", "augs", "res", "img", "micro_batch", "amp", "warmup",
            "repeats", "threads")
    return [x for k in keys if getattr(args, k) is not None for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224", help="a timm model name (random weights)")
    p.add_argument("--depth", type=int, default=None, help="ViT blocks kept (default: the model's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--augs", type=int, default=3, help="augs_per_batch (ImageNet-1k: 3)")
    p.add_argument("--res", type=int, default=32, help="synthetic and real image side (the paper: 256)")
    p.add_argument("--img", type=int, default=32, help="augmented crop side fed to the backbone (the paper: 224)")
    p.add_argument("--micro-batch", type=int, default=250)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, kernels)")
    p.add_argument("--repeats", type=int, default=1, help="timed steps after the warm-up (the fastest is kept)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    p.add_argument("--json-out", help="also write the rows to this JSON file")
    p.add_argument("--child", metavar="METHOD", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def table(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    """The printed lines: one per method, then CLP / LGM ratios and the reduce payloads."""
    ok = {r["method"]: r for r in rows if "error" not in r}
    first = next(iter(ok.values()), {})
    depth = f", depth {args.depth}" if args.depth else ""
    lines = [f"model {args.model} (random init{depth})  device {first.get('device', args.device)}  threads "
             f"{first.get('threads', '?')}  classes {args.classes}  ipc {args.ipc}  augs {args.augs}  res {args.res}  "
             f"crop {args.img}  micro-batch {args.micro_batch}  amp {args.amp}  warm-up {args.warmup}  best of {args.repeats}",
             f"{'method':<8}{'views':>7}{'real':>7}{'s/step':>10}{'peak MB':>10}{'loss':>10}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:<8}  failed: {r['error']}")
        else:
            lines.append(f"{r['method']:<8}{r['views']:>7}{r['real']:>7}{r['sec_per_step']:>10.3f}"
                         f"{r['peak_mb']:>10.1f}{r['loss']:>10.4f}")
    if "lgm" in ok and "clp" in ok:
        lgm, clp = ok["lgm"], ok["clp"]
        lines.append(f"clp / lgm: time {clp['sec_per_step'] / lgm['sec_per_step']:.2f}x   peak memory "
                     f"{clp['peak_mb'] / max(lgm['peak_mb'], 1e-9):.2f}x")
    if "clp" in ok:
        clp = ok["clp"]
        lines.append(f"clp closed form alone (N_syn {clp['views']} × d {clp['dim']} + bias, float64, forward + "
                     f"backward): {clp['solve_sec']:.3f} s ({100 * clp['solve_sec'] / clp['sec_per_step']:.0f}% of "
                     "its step)")
    if ok:
        d, c, n = first["dim"], args.classes, first["views"]
        lines.append(f"reduce payload per step (floats): lgm {2 * c * (d + 1) + 1:,}   clp {n * d + (d + 1) * c + 2:,}")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_one(args, args.child)))
        return
    rows = [_child(args, m) for m in args.methods.split(",")]
    print("\n".join(table(args, rows)))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
