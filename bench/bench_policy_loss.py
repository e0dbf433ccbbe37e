"""Fused linear policy loss: fwd+bwd time and peak extra memory, side by side in one run.

Variants (same inputs, same math; loss.backward() to hidden and weight):
  eager      materialised logits [N, V] (fp32) + policy_loss_reference
  compile    torch.compile of eager
  chunked    our chunked PyTorch path   (fused_linear_policy_loss(backend="torch"))
  liger      LigerFusedLinearGRPOLoss (beta=0, bnpo = token mean, no dual clip; optional)
  ours       fused_linear_policy_loss(backend="auto") = Triton epilogues on CUDA (CPU: same as chunked)
  floor      only the plain GEMMs ours must do, timed alone, per chunk exactly as ours runs them:
             logits, recomputed logits, dX = dZ @ W, dW += dZ^T @ X
Peak extra memory = peak allocated during fwd+bwd minus what was allocated before (inputs).
On CUDA: torch.cuda.max_memory_allocated. On CPU: each (shape, variant) runs in a fresh child
process; after the warm-up (which includes torch.compile's own work) the kernel's peak-RSS
counter is reset (/proc/self/clear_refs = 5) and the peak is VmHWM - VmRSS (so numbers include
allocator slack).

Usage:
  python bench/bench_policy_loss.py                       # CPU, fp32, small shapes
  python bench/bench_policy_loss.py --device cuda         # bf16, N in {4096,16384,65536}, H in {1024,4096}, V=248320
  python bench/bench_policy_loss.py --device cuda --shapes 4096x1024x248320 --reps 3
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_kernels():
    try:
        import zppo_fast.kernels as K
    except ImportError:  # not installed: load the folder under its package name
        spec = importlib.util.spec_from_file_location(
            "zppo_fast.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        K = importlib.util.module_from_spec(spec)
        sys.modules["zppo_fast.kernels"] = K
        spec.loader.exec_module(K)
    return K


K = load_kernels()
from zppo_fast.kernels.linear_logprobs import addmm_, choose_chunk_rows, gemm_operand, mm_f32
from results import peak_rss_mb, reset_peak_rss  # noqa: E402  (bench/ is on the path: run as a script)

EPS_LOW, EPS_HIGH, DUAL = 0.2, 0.28, 10.0
SEQ = 1024  # tokens per sequence for Liger, which takes [B, T] tensors and per-sequence advantages


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def make_inputs(n, h, v, dtype, device, seed=0):
    """Generated on ``device`` itself (a [V, H] weight is ~1e9 elements at the GPU shapes: made
    on the host it would cost seconds per shape), once per shape and shared by every variant."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = {"generator": g, "device": device}
    hidden = torch.randn(n, h, **kw).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, **kw) / h**0.5).to(dtype).requires_grad_(True)
    tgt = torch.randint(0, v, (n,), **kw)
    old = -torch.rand(n, **kw) * 8 - 4  # plausible log-probs
    n_seq = max(1, n // SEQ)
    adv_seq = torch.randn(n_seq, **kw)
    adv = adv_seq.repeat_interleave(n // n_seq)[:n]
    if adv.numel() < n:
        adv = torch.cat([adv, adv_seq[-1].expand(n - adv.numel())])
    mask = torch.rand(n, **kw) < 0.9
    return hidden, weight, tgt, old, adv, mask, adv_seq


def eager_loss(hidden, weight, tgt, old, adv, mask):
    logits = (hidden @ weight.T).float()  # [N, V]: the memory wall
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tgt[:, None]).squeeze(-1)
    loss, _ = K.policy_loss_reference(logp, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip=DUAL)
    return loss


_compiled = None


def compiled_loss(*args):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(eager_loss)
    return _compiled(*args)


def chunked_loss(hidden, weight, tgt, old, adv, mask):
    return K.fused_linear_policy_loss(
        hidden, weight, tgt, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip=DUAL, backend="torch"
    )[0]


def ours_loss(hidden, weight, tgt, old, adv, mask):
    return K.fused_linear_policy_loss(
        hidden, weight, tgt, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip=DUAL
    )[0]


_liger = None


def liger_loss(hidden, weight, tgt, old, adv, mask, adv_seq):
    global _liger
    if _liger is None:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        _liger = LigerFusedLinearGRPOLoss(
            beta=0.0, use_ref_model=False, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type="bnpo"
        )
    n, h = hidden.shape
    b = adv_seq.numel()
    t = n // b
    out = _liger(
        hidden[: b * t].view(b, t, h),
        weight,
        tgt[: b * t].view(b, t),
        mask[: b * t].view(b, t).float(),
        adv_seq,
        old_per_token_logps=old[: b * t].view(b, t),
    )
    return out[0] if isinstance(out, tuple) else out


def floor_gemms(hidden, weight, tgt, old, adv, mask):
    """The GEMMs of ours, chunk by chunk, with nothing between them."""
    with torch.no_grad():
        n, _ = hidden.shape
        v = weight.shape[0]
        chunk = choose_chunk_rows(n, v, hidden.device)
        w_op = gemm_operand(weight)
        dz_dtype = hidden.dtype if hidden.is_cuda else torch.float32
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device)
        dx = torch.empty_like(hidden)
        dz = None
        for s in range(0, n, chunk):
            h_c = gemm_operand(hidden[s : s + chunk])
            z = mm_f32(h_c, w_op.t())  # forward logits
            del z
            z = mm_f32(h_c, w_op.t())  # recomputed in the backward
            if dz is None or dz.shape[0] != z.shape[0]:
                dz = z.to(dz_dtype) if dz_dtype != torch.float32 else z
            del z
            dx[s : s + chunk] = mm_f32(dz, w_op).to(hidden.dtype)
            addmm_(dw, dz.t(), h_c)


VARIANTS = ["eager", "compile", "chunked", "liger", "ours", "floor"]


def run_variant(name, inputs, device):
    hidden, weight, tgt, old, adv, mask, adv_seq = inputs
    hidden.grad = None
    weight.grad = None
    if name == "floor":
        floor_gemms(hidden, weight, tgt, old, adv, mask)
        return
    fn = {"eager": eager_loss, "compile": compiled_loss, "chunked": chunked_loss, "ours": ours_loss}.get(name)
    loss = (
        liger_loss(hidden, weight, tgt, old, adv, mask, adv_seq)
        if name == "liger"
        else fn(hidden, weight, tgt, old, adv, mask)
    )
    loss.backward()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name, inputs, device, reps, warmup):
    """Returns dict(ms=median fwd+bwd ms, peak_mb=peak extra MB) or dict(error=...)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(warmup):
            run_variant(name, inputs, device)
        sync(device)
        if device != "cuda":
            inputs[0].grad = inputs[1].grad = None
            base = reset_peak_rss()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run_variant(name, inputs, device)
            sync(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        inputs[0].grad = inputs[1].grad = None  # the next variant starts from the inputs alone
        return {"error": "OOM"}
    except ImportError as e:
        return {"error": f"skipped: {e.name or e} not installed"}
    except Exception as e:  # noqa: BLE001 - report, keep going: one broken baseline must not hide the others
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_rss_mb(base)
    times.sort()
    return {"ms": 1e3 * times[len(times) // 2], "peak_mb": peak}


def child_main(args):
    n, h, v = map(int, args.child_shape.split("x"))
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    res = measure(args.child, make_inputs(n, h, v, torch.float32, "cpu"), "cpu", args.reps, args.warmup)
    print("RESULT " + json.dumps(res))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="*", help="NxHxV ...")
    p.add_argument("--variants", nargs="*", default=VARIANTS)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile-max-n", type=int, default=1 << 30, help="skip torch.compile above this N")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads per child (0 = all cores); 1 is far less noisy when other processes share the cores",
    )
    p.add_argument("--json", help="append one JSON line per measurement to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-shape", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)
    dev = args.device
    if args.shapes:
        shapes = [tuple(map(int, s.split("x"))) for s in args.shapes]
    elif dev == "cuda":
        shapes = [(n, h, 248_320) for h in (1024, 4096) for n in (4096, 16384, 65536)]
    else:
        shapes = [(1024, 256, 16_384), (4096, 256, 65_536)]
    reps = args.reps or (3 if dev == "cuda" else 1)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    print(
        f"# device: {device_name(dev)}; dtype {str(dtype).replace('torch.', '')}; "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; torch {torch.__version__}"
    )
    print(f"# command: python {' '.join(sys.argv)}")
    if dev == "cpu":
        print(
            f"# threads per run: {args.threads or os.cpu_count()}; load average at start: {os.getloadavg()[0]:.2f} "
            f"on {os.cpu_count()} cores (CPU timings are noisy "
            f"when other processes share the cores; memory numbers are not)"
        )
    print("| N | H | V | variant | fwd+bwd ms | TFLOP/s (8NHV) | x floor | peak extra MB | vs eager peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, h, v in shapes:
        results = {}
        inputs = None
        if dev != "cpu":  # on the CPU each variant's child process makes its own
            try:
                inputs = make_inputs(n, h, v, dtype, dev)
            except torch.OutOfMemoryError:
                print(f"| {n} | {h} | {v} | inputs | OOM | | | | |", flush=True)
                continue
        for name in args.variants:
            if name == "ours" and dev == "cpu":
                results[name] = {"error": "on CPU = chunked (PyTorch path)"}
                continue
            if name == "compile" and n > args.compile_max_n:
                results[name] = {"error": f"skipped (N > {args.compile_max_n})"}
                continue
            if name == "liger" and dev == "cpu":
                results[name] = {"error": "skipped: Liger's kernels need CUDA"}
                continue
            if dev == "cpu":  # fresh process per variant so the peak RSS is this variant's alone
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        name,
                        "--child-shape",
                        f"{n}x{h}x{v}",
                        "--reps",
                        str(reps),
                        "--warmup",
                        str(args.warmup),
                        "--threads",
                        str(args.threads),
                    ],
                    check=False,
                    capture_output=True,
                    text=True,
                )
                line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
                results[name] = (
                    json.loads(line[-1][7:])
                    if line
                    else {"error": (out.stderr.strip().splitlines() or ["crashed"])[-1][:120]}
                )
            else:
                results[name] = measure(name, inputs, dev, reps, args.warmup)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(
                        json.dumps(
                            {"device": device_name(dev), "N": n, "H": h, "V": v, "variant": name, **results[name]}
                        )
                        + "\n"
                    )
        floor = results.get("floor", {}).get("ms")
        eager_peak = results.get("eager", {}).get("peak_mb")
        for name in args.variants:
            r = results[name]
            if "error" in r:
                print(f"| {n} | {h} | {v} | {name} | {r['error']} | | | | |")
                continue
            tflops = 8 * n * h * v / (r["ms"] * 1e-3) / 1e12
            xf = f"{r['ms'] / floor:.2f}" if floor else ""
            vs = f"{100 * r['peak_mb'] / eager_peak:.1f}%" if eager_peak else ""
            print(
                f"| {n} | {h} | {v} | {name} | {r['ms']:.1f} | {tflops:.2f} | {xf} | {r['peak_mb']:.0f} | {vs} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
