"""FusedLinearPolicyLoss against Liger's LigerFusedLinearGRPOLoss: peak extra memory and time of
one forward + backward, the same inputs and settings, in the same run.

Settings (both modules): beta 0.04 with given reference log-probs, given old log-probs,
loss_type "dapo", epsilon 0.2 / 0.28, fp32 [B, T, H] hidden states, an fp32 [V, H] lm_head.
Liger runs with compiled=False (its compiled=True only wraps the per-token math in
torch.compile; its [V, H] gradient buffers are the same).

Each (variant, repetition) runs in a fresh child process, variants alternated, so a peak is that
variant's alone: after one warm-up call the kernel's peak-RSS counter is reset
(/proc/self/clear_refs = 5) and the peak is VmHWM - VmRSS over the measured call (allocator slack
included). CPU only (Linux /proc).

Usage:
  python bench/bench_loss_module.py                         # B=8, T=512, H=256, V=65,536, 2 rounds
  python bench/bench_loss_module.py --shape 4x256x256x16384 --rounds 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_policy_loss import device_name, load_kernels  # noqa: E402
from results import peak_rss_mb, reset_peak_rss  # noqa: E402

K = load_kernels()
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("liger", "ours")
SETTINGS = {"beta": 0.04, "epsilon_low": 0.2, "epsilon_high": 0.28, "loss_type": "dapo"}


def make_inputs(b, t, h, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, generator=g).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_(True)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) < 0.9).float()
    adv = torch.randn(b, generator=g)
    old = -torch.rand(b, t, generator=g) * 8 - 4
    ref = old + 0.1 * torch.randn(b, t, generator=g)
    return x, w, ids, mask, adv, ref, old


def build(name):
    if name == "ours":
        return K.FusedLinearPolicyLoss(**SETTINGS)
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(compiled=False, **SETTINGS)


def step(module, inputs):
    x, w, ids, mask, adv, ref, old = inputs
    x.grad = w.grad = None
    loss, _ = module(x, w, ids, mask, adv, None, ref, old)
    loss.backward()
    return loss.item()


def child(name, shape, threads):
    torch.set_num_threads(threads)
    inputs = make_inputs(*shape)
    module = build(name)
    step(module, inputs)  # warm-up
    inputs[0].grad = inputs[1].grad = None
    base = reset_peak_rss()
    t0 = time.perf_counter()
    loss = step(module, inputs)
    ms = 1e3 * (time.perf_counter() - t0)
    peak = peak_rss_mb(base)
    print("RESULT " + json.dumps({"ms": ms, "peak_mb": peak, "loss": loss}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8x512x256x65536", help="BxTxHxV")
    p.add_argument("--rounds", type=int, default=2, help="alternated runs of each variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split("x"))
    if args.child:
        return child(args.child, shape, args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(
        f"# device: {device_name('cpu')}; fp32; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; "
        f"commit {commit.strip()}; torch {torch.__version__}; {args.threads} thread(s) per run; load average "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (shared machine: times are indicative, memory is not)"
    )
    print(f"# command: python bench/bench_loss_module.py {' '.join(sys.argv[1:])}")
    rows = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            cmd = [sys.executable, __file__, "--child", name, "--shape", args.shape, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
            rows[name].append(json.loads(line[-1][7:]))
    b, t, h, v = shape
    print("| B | T | H | V | variant | peak extra MB (each round) | fwd+bwd s (each round) | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name in VARIANTS:
        r = rows[name]
        peaks = ", ".join(f"{x['peak_mb']:.0f}" for x in r)
        times = ", ".join(f"{x['ms'] / 1e3:.2f}" for x in r)
        print(f"| {b} | {t} | {h} | {v} | {name} | {peaks} | {times} | {r[0]['loss']:.6f} |")
    ours, liger = max(x["peak_mb"] for x in rows["ours"]), min(x["peak_mb"] for x in rows["liger"])
    print(f"\nours / Liger peak extra memory (worst ours over best Liger): {ours / liger:.2f}")


if __name__ == "__main__":
    main()
