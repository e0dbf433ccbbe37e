"""policy_loss: PyTorch path, Triton kernel (interpreter on CPU, compiled on CUDA) vs a float64 reference."""

import math
import sys
from pathlib import Path

import pytest
import torch
import zppo_fast.kernels as K
from kernel_cases import BACKENDS, CUDA_TORCH, NEEDS_INTERPRETER_CHILD, run_interpreter_cases_in_child

BACKENDS = BACKENDS + [CUDA_TORCH]  # the PyTorch path is checked on CUDA too
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-3}}


def make_inputs(n, dtype, device, gen, spread=0.3, mask_p=0.7):
    logp = (-torch.rand(n, generator=gen) * 5).to(dtype)
    old = (logp.float() + spread * torch.randn(n, generator=gen)).to(dtype)
    adv = torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) < mask_p
    return [t.to(device) for t in (logp, old, adv, mask)]


def run_both(logp, old, adv, mask, backend, **kw):
    x = logp.detach().clone().requires_grad_(True)
    loss, stats = K.policy_loss(x, old, adv, mask, backend=backend, **kw)
    loss.backward()
    xr = logp.detach().cpu().double().requires_grad_(True)
    ref_kw = dict(kw)
    if isinstance(ref_kw.get("normalizer"), torch.Tensor):
        ref_kw["normalizer"] = ref_kw["normalizer"].cpu().double()
    loss_r, stats_r = K.policy_loss_reference(xr, old.cpu(), adv.cpu(), mask.cpu(), **ref_kw)
    loss_r.backward()
    return (loss, stats, x.grad), (loss_r, stats_r, xr.grad)


def check(out, ref, dtype):
    (loss, stats, grad), (loss_r, stats_r, grad_r) = out, ref
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.cpu().double(), loss_r.detach(), **tol)
    assert grad.dtype == dtype
    scale = grad_r.abs().max().item() + 1e-30
    torch.testing.assert_close(grad.cpu().double(), grad_r, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0))
    assert set(stats) == set(K.STAT_NAMES)
    for k in K.STAT_NAMES:
        assert stats[k].dtype == torch.float32 and not stats[k].requires_grad
        torch.testing.assert_close(stats[k].cpu().double(), stats_r[k], rtol=1e-4, atol=1e-3, msg=k)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 300, 5000])
def test_matches_reference(device, backend, dtype, n):
    gen = torch.Generator().manual_seed(1000 + n)
    inputs = make_inputs(n, dtype, device, gen)
    check(*run_both(*inputs, backend), dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_clips_are_exercised_and_counted(device, backend):
    gen = torch.Generator().manual_seed(7)
    n = 2000
    logp, old, adv, mask = make_inputs(n, torch.float32, device, gen, spread=1.5, mask_p=0.8)
    (loss, stats, grad), ref = run_both(logp, old, adv, mask, backend, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    for k in ("clip_low", "clip_high", "dual_clip"):
        assert stats[k].item() > 10, k  # every branch is hit, so the test can fail on any of them
    check((loss, stats, grad), ref, torch.float32)
    # a clipped token has exactly zero gradient
    r = torch.exp(logp.cpu() - old.cpu())
    clipped = ((adv.cpu() > 0) & (r > 1.28)) | ((adv.cpu() < 0) & ((r < 0.8) | (r > 3.0)))
    assert (grad.cpu()[clipped & mask.cpu()] == 0).all()
    assert (grad.cpu()[~mask.cpu()] == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ratios_far_outside_clip_range(device, backend):
    gen = torch.Generator().manual_seed(3)
    n = 257
    logp, old, adv, mask = make_inputs(n, torch.float32, device, gen)
    old = logp + torch.linspace(-80, 80, n, device=device)  # log-ratios of +-80 -> clamped at +-20
    out, ref = run_both(logp, old, adv, mask, backend)
    check(out, ref, torch.float32)
    assert all(math.isfinite(v.item()) for v in out[1].values())


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_all_masked_and_zero_advantages(device, backend):
    gen = torch.Generator().manual_seed(5)
    logp, old, adv, mask = make_inputs(33, torch.float32, device, gen)
    out, ref = run_both(logp, old, adv, torch.zeros_like(mask), backend)
    assert out[0].item() == 0.0 and (out[2] == 0).all() and out[1]["tokens"].item() == 0
    check(out, ref, torch.float32)
    out, ref = run_both(logp, old, torch.zeros_like(adv), mask, backend)
    assert out[0].item() == 0.0 and (out[2] == 0).all()
    assert out[1]["clip_low"].item() == out[1]["clip_high"].item() == out[1]["dual_clip"].item() == 0
    check(out, ref, torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_float_mask_and_leading_shape(device, backend):
    gen = torch.Generator().manual_seed(9)
    logp, old, adv, mask = make_inputs(4 * 37, torch.float32, device, gen)
    shp = (4, 37)
    x = logp.reshape(shp).clone().requires_grad_(True)
    loss, _ = K.policy_loss(x, old.reshape(shp), adv.reshape(shp), mask.reshape(shp).float(), backend=backend)
    loss.backward()
    (loss1, _, g1), _ = run_both(logp, old, adv, mask, backend)
    torch.testing.assert_close(loss, loss1)
    assert x.grad.shape == shp
    torch.testing.assert_close(x.grad.reshape(-1), g1)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_microbatch_invariance(device, backend):
    """Splitting a step into micro-batches with the global token count as normalizer gives the
    same loss and gradient as one batch."""
    gen = torch.Generator().manual_seed(11)
    logp, old, adv, mask = make_inputs(301, torch.float32, device, gen)
    total = mask.sum()
    x = logp.clone().requires_grad_(True)
    full, stats_full = K.policy_loss(x, old, adv, mask, backend=backend)
    full.backward()
    y = logp.clone().requires_grad_(True)
    parts, acc = 0.0, {k: 0.0 for k in K.STAT_NAMES}
    for sl in (slice(0, 100), slice(100, 101), slice(101, 301)):
        loss, st = K.policy_loss(y[sl], old[sl], adv[sl], mask[sl], backend=backend, normalizer=total)
        loss.backward()
        parts = parts + loss.detach()
        acc = {k: v + st[k] for k, v in acc.items()}
    torch.testing.assert_close(parts, full.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-6, atol=1e-9)
    for k, v in acc.items():
        torch.testing.assert_close(v, stats_full[k], rtol=1e-5, atol=1e-4)
    # a float normalizer works the same
    z = logp.clone().requires_grad_(True)
    l2, _ = K.policy_loss(z, old, adv, mask, backend=backend, normalizer=float(total))
    torch.testing.assert_close(l2, full.detach())


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_propagates_from_valid_tokens_only(device, backend):
    gen = torch.Generator().manual_seed(13)
    logp, old, adv, mask = make_inputs(50, torch.float32, device, gen)
    mask[3] = True
    mask[4] = False
    for which in range(3):
        ins = [logp.clone(), old.clone(), adv.clone()]
        ins[which][3] = float("nan")
        loss, _ = K.policy_loss(*ins, mask, backend=backend)
        assert torch.isnan(loss), f"NaN in input {which} did not reach the loss"
        ins = [logp.clone(), old.clone(), adv.clone()]
        ins[which][4] = float("nan")  # padding may hold anything
        loss, _ = K.policy_loss(*ins, mask, backend=backend)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_many_tokens(device, backend):
    """N > 65,535: more blocks than a y/z grid axis may hold; int64 offsets."""
    gen = torch.Generator().manual_seed(17)
    out, ref = run_both(*make_inputs(70_001, torch.float32, device, gen), backend)
    check(out, ref, torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_approx_kl_is_accurate_for_tiny_log_ratios(device, backend):
    """k3 = exp(d) - 1 - d vs float64 (expm1) for d = +-1e-8 .. +-1e-1 and across the series'
    edge (|d| = 0.5) up to 3, one token per call so each d is checked alone. In fp32,
    exp(d) - 1 - d would be 0 or noise below |d| ~ 3e-4. Tolerance: 16 fp32 roundings of k3
    (Horner's seven steps, the clamp, the sum), plus beyond the series 4 roundings of exp(d)'s
    size, amplified by |d| (exp's argument error), and of 1."""
    eps32 = torch.finfo(torch.float32).eps
    ds = torch.logspace(-8, -1, 15, dtype=torch.float64).tolist() + [0.3, 0.499, 0.501, 1.0, 3.0]
    cases = [(sign * d, 0.0) for d in ds for sign in (1, -1)]
    cases += [(sign * d, -2.0) for d in ds if d >= 1e-6 for sign in (1, -1)]  # logp = fl(old + d)
    one = torch.ones(1, device=device)
    mask = torch.ones(1, dtype=torch.bool, device=device)
    for d, old in cases:
        old32 = torch.tensor([old], dtype=torch.float32)
        logp32 = (old32.double() + d).float()
        _, stats = K.policy_loss(logp32.to(device), old32.to(device), one, mask, backend=backend)
        _, ref = K.policy_loss_reference(logp32, old32, one.cpu(), mask.cpu())
        k3, d_exact = ref["approx_kl"].item(), (logp32.double() - old32.double()).item()
        tol = 16 * eps32 * k3
        if abs(d_exact) >= 0.5:
            tol += 4 * eps32 * (math.exp(d_exact) * (2 + abs(d_exact)) + 1)
        got = stats["approx_kl"].item()
        assert k3 > 0 and abs(got - k3) <= tol, f"d = {d_exact:.3e} (old {old}): k3 {got:.9e} vs float64 {k3:.9e}"


def test_bad_inputs():
    x = torch.randn(5)
    m = torch.ones(5, dtype=torch.bool)
    with pytest.raises(ValueError, match="old_logprobs"):
        K.policy_loss(x, torch.randn(6), x, m)
    with pytest.raises(ValueError, match="loss_mask"):
        K.policy_loss(x, x, x, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="logprobs"):
        K.policy_loss(torch.ones(5, dtype=torch.int64), x, x, m)
    with pytest.raises(ValueError, match="eps_low"):
        K.policy_loss(x, x, x, m, eps_low=1.5)
    with pytest.raises(ValueError, match="dual_clip"):
        K.policy_loss(x, x, x, m, dual_clip=0.5)
    with pytest.raises(ValueError, match="normalizer"):
        K.policy_loss(x, x, x, m, normalizer=0.0)
    with pytest.raises(ValueError, match="backend"):
        K.policy_loss(x, x, x, m, backend="cuda")
    meta = torch.randn(5, device="meta")  # a second device even on a CPU-only machine
    with pytest.raises(ValueError, match="advantages is on meta"):
        K.policy_loss(x, x, meta, m)


def test_dual_clip_none_matches_reference():
    gen = torch.Generator().manual_seed(19)
    logp, old, adv, mask = make_inputs(400, torch.float32, "cpu", gen, spread=2.0)
    out, ref = run_both(logp, old, adv, mask, "torch", dual_clip=None)
    check(out, ref, torch.float32)
    assert out[1]["dual_clip"].item() == 0


def test_cpu_paths_work_without_triton():
    """kernels/ must import and run its PyTorch paths where `import triton` fails."""
    import subprocess

    root = Path(__file__).resolve().parents[1] / "kernels"
    code = f"""
import sys, importlib.util, torch
sys.modules['triton'] = None  # any `import triton` now raises ImportError
spec = importlib.util.spec_from_file_location('zppo_fast.kernels', {str(root / "__init__.py")!r},
                                              submodule_search_locations=[{str(root)!r}])
K = importlib.util.module_from_spec(spec); sys.modules['zppo_fast.kernels'] = K; spec.loader.exec_module(K)
assert not K.HAVE_TRITON
x = torch.randn(8, requires_grad=True)
loss, _ = K.policy_loss(x, x.detach(), torch.randn(8), torch.ones(8, dtype=torch.bool)); loss.backward()
h = torch.randn(5, 4, requires_grad=True); w = torch.randn(7, 4)
K.fused_linear_policy_loss(h, w, torch.arange(5), torch.zeros(5), torch.ones(5), torch.ones(5))[0].backward()
K.linear_logprobs(h, w, torch.arange(5))
K.normalize_advantages(torch.rand(6), torch.tensor([0, 0, 1, 1, 2, 2]))
try:
    K.policy_loss(x, x, x, torch.ones(8), backend='triton')
    raise SystemExit('expected an error')
except RuntimeError as e:
    assert 'triton' in str(e)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


if NEEDS_INTERPRETER_CHILD:

    def test_interpreter_cases_in_child_process():
        """Triton was imported before tests/conftest.py could set TRITON_INTERPRET=1, so
        the interpreter cases above skip in this process: run them in a child that has it."""
        run_interpreter_cases_in_child(__file__)
