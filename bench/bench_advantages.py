"""normalize_advantages: one-launch Triton kernel vs the eager PyTorch composition.

eager = unique(return_inverse) + index_add / scatter_reduce + where (kernels/advantages.py's
PyTorch path, ~20 kernels and a host sync inside unique). ours = the single-program Triton
kernel (CUDA only; on CPU the Triton path would run in the interpreter, which says nothing
about speed, so CPU reports the eager path alone). Also counts kernel launches with the profiler.

Usage: python bench/bench_advantages.py [--device cuda] [--sizes 1024 65536] [--group 8]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_policy_loss import device_name, load_kernels

K = load_kernels()


def make(n, group, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    gid = torch.arange(n) // group
    perm = torch.randperm(n, generator=g)  # any order
    rewards = torch.randint(0, 2, (n,), generator=g).float()
    return rewards.to(device), (gid[perm] * 7919 + 11).to(device)


def timeit(fn, device, reps):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 1e6 * ts[len(ts) // 2]


def count_launches(fn, device):
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        # GPU kernels only (memcpy / memset are not kernel launches)
        return sum(
            e.count
            for e in prof.key_averages()
            if str(e.device_type).endswith("CUDA") and "Memcpy" not in e.key and "Memset" not in e.key
        )
    except Exception as e:  # noqa: BLE001 - the profiler is a nicety: never lose the timings over it
        return f"? ({type(e).__name__})"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="*", default=[1024, 8192, 65536, 262144])
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--mode", default="batch_wo_zero")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    dev = args.device
    print(
        f"# device: {device_name(dev)}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; "
        f"torch {torch.__version__}; mode {args.mode}; groups of {args.group}, shuffled"
    )
    print(f"# command: python {' '.join(sys.argv)}")
    print("| rollouts | eager us | eager launches | ours us | ours launches | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        r, g = make(n, args.group, dev)
        eager = lambda r=r, g=g: K.normalize_advantages(r, g, mode=args.mode, backend="torch")
        t_e = timeit(eager, dev, args.reps)
        l_e = count_launches(eager, dev)
        if dev == "cuda":
            ours = lambda r=r, g=g: K.normalize_advantages(r, g, mode=args.mode, backend="triton")
            t_o = timeit(ours, dev, args.reps)
            l_o = count_launches(ours, dev)
            diff = (ours() - eager()).abs().max().item()
            print(f"| {n} | {t_e:.0f} | {l_e} | {t_o:.0f} | {l_o} | {t_e / t_o:.1f}x | {diff:.1e} |", flush=True)
        else:
            print(f"| {n} | {t_e:.0f} | | n/a (needs CUDA) | | | |", flush=True)


if __name__ == "__main__":
    main()
