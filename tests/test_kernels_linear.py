"""linear_logprobs and fused_linear_policy_loss vs float64 references (materialised logits).

Shape x dtype matrix with odd sizes on the chunked PyTorch path; a smaller fp32 matrix through
Triton's interpreter (its tl.dot is not used: GEMMs stay in torch, the kernels are the
streaming epilogues); on CUDA both run compiled (skipped cleanly without a GPU).
"""

import importlib

import pytest
import torch
import zppo_fast.kernels as K
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import (
    BACKENDS,
    HAS_CUDA,
    INTERP,
    NEEDS_INTERPRETER_CHILD,
    fp32_out_gemms,
    run_interpreter_cases_in_child,
)
from numerics import close

# bf16: inputs are rounded to bf16 and the reference uses those same rounded values in float64,
# so the tolerance covers only our arithmetic (fp32 logits; bf16 outputs / bf16 dZ on CUDA).
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def make(n, h, v, dtype, device, seed, logit_scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (logit_scale / h**0.5)
    tgt = torch.randint(0, v, (n,), generator=gen)
    return hidden.to(device, dtype), weight.to(device, dtype), tgt.to(device), gen


def check_linear(n, h, v, dtype, device, backend, temperature=1.0, chunk_rows=None, seed=0, logit_scale=3.0, tol=None):
    hidden, weight, tgt, gen = make(n, h, v, dtype, device, seed, logit_scale)
    tol = tol or TOL[dtype]
    x = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp, ent = K.linear_logprobs(
        x, w, tgt, temperature=temperature, return_entropy=True, backend=backend, chunk_rows=chunk_rows
    )
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == (n,)
    g1 = torch.randn(n, generator=gen)
    g2 = torch.randn(n, generator=gen)
    (logp * g1.to(device)).sum().add((ent * g2.to(device)).sum()).backward()
    xr = hidden.cpu().double().requires_grad_(True)
    wr = weight.cpu().double().requires_grad_(True)
    logp_r, ent_r = K.linear_logprobs_reference(xr, wr, tgt.cpu(), temperature=temperature, return_entropy=True)
    (logp_r * g1.double()).sum().add((ent_r * g2.double()).sum()).backward()
    close(logp, logp_r, "logp", tol)
    close(ent, ent_r, "entropy", tol)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    close(x.grad, xr.grad, "d hidden", tol)
    close(w.grad, wr.grad, "d weight", tol)


def check_fused(
    n,
    h,
    v,
    dtype,
    device,
    backend,
    temperature=1.0,
    chunk_rows=None,
    seed=0,
    normalizer=None,
    logit_scale=3.0,
    tol=None,
    adv_zero=False,
    mask_none=False,
    spread=0.3,
):
    hidden, weight, tgt, gen = make(n, h, v, dtype, device, seed, logit_scale)
    tol = tol or TOL[dtype]
    with torch.no_grad():
        logp0 = K.linear_logprobs_reference(
            hidden.cpu().double(), weight.cpu().double(), tgt.cpu(), temperature=temperature
        ).float()
    old = (logp0 + spread * torch.randn(n, generator=gen)).to(device)
    adv = torch.zeros(n) if adv_zero else torch.randn(n, generator=gen)
    mask = torch.zeros(n, dtype=torch.bool) if mask_none else torch.rand(n, generator=gen) < 0.8
    tgt = torch.where(mask.to(device), tgt, torch.full_like(tgt, -100))  # padding targets are don't-cares
    adv, mask = adv.to(device), mask.to(device)
    x = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, stats = K.fused_linear_policy_loss(
        x,
        w,
        tgt,
        old,
        adv,
        mask,
        temperature=temperature,
        normalizer=normalizer,
        backend=backend,
        chunk_rows=chunk_rows,
    )
    loss.backward()
    xr = hidden.cpu().double().requires_grad_(True)
    wr = weight.cpu().double().requires_grad_(True)
    loss_r, stats_r = K.fused_linear_policy_loss_reference(
        xr, wr, tgt.cpu(), old.cpu(), adv.cpu(), mask.cpu(), temperature=temperature, normalizer=normalizer
    )
    loss_r.backward()
    close(loss, loss_r, "loss", tol)
    close(x.grad, xr.grad, "d hidden", tol)
    close(w.grad, wr.grad, "d weight", tol)
    for k, vr in stats_r.items():
        assert not stats[k].requires_grad
        if k in ("clip_low", "clip_high", "dual_clip") and dtype == torch.bfloat16:
            assert abs(stats[k].item() - vr.item()) <= 2 + 0.02 * n, k  # borderline tokens may flip
        else:
            close(stats[k], vr, k, {"rtol": tol["rtol"] * 10, "atol": tol["atol"] * 10})
    return loss, stats, x.grad, w.grad


SHAPES = [(n, h, v) for n in (1, 7, 300) for h in (16, 72, 256) for v in (1, 33, 5000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_linear_logprobs_torch(n, h, v, dtype):
    check_linear(n, h, v, dtype, "cpu", "torch", temperature=0.9, chunk_rows=64 if n == 300 else None, seed=n + h + v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_fused_torch(n, h, v, dtype):
    check_fused(
        n, h, v, dtype, "cpu", "torch", temperature=1.1, chunk_rows=64 if n == 300 else None, seed=7 * n + h + v
    )


INTERP_SHAPES = [(1, 16, 33), (7, 72, 1), (7, 72, 5000), (300, 16, 33), (300, 256, 5000)]


@INTERP
@pytest.mark.parametrize("n,h,v", INTERP_SHAPES)
def test_linear_logprobs_triton_interp(n, h, v):
    check_linear(n, h, v, torch.float32, "cpu", "triton", temperature=0.9, chunk_rows=128, seed=n + v)


@INTERP
@pytest.mark.parametrize("n,h,v", INTERP_SHAPES)
def test_fused_triton_interp(n, h, v):
    check_fused(n, h, v, torch.float32, "cpu", "triton", temperature=1.1, chunk_rows=128, seed=n + v)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_qwen_vocab_small_n(device, backend):
    """V = 248,320 (Qwen3.5) at small N."""
    check_linear(3, 16, 248_320, torch.float32, device, backend, seed=1)
    check_fused(5, 16, 248_320, torch.float32, device, backend, seed=2, spread=1.0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_logits_of_magnitude_1e4(device, backend):
    hidden, weight, _, _ = make(9, 16, 77, torch.float32, "cpu", 3, logit_scale=3e3)
    assert (hidden @ weight.T).abs().max() > 1e4
    # fp32 logits of size 1e4 carry ~1e-3 absolute rounding (one ulp), so log-probs and ratios
    # can only be right to ~1e-3; an unshifted exp() would give inf / NaN instead
    tol = {"rtol": 2e-3, "atol": 5e-3}
    check_linear(9, 16, 77, torch.float32, device, backend, seed=3, logit_scale=3e3, tol=tol)
    check_fused(9, 16, 77, torch.float32, device, backend, seed=3, logit_scale=3e3, tol=tol, spread=0.0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_near_certain_targets_keep_log_softmax_precision(device, backend):
    """Targets 3 logits above the rest at temperature 0.3 (tempered logits ~1e3, runner-ups 10
    below): log p ~ -1e-3 and its gradient's 1 - p must be as precise as fp32 log_softmax's,
    which a single rounded log-sum-exp of size 1e3 (ulp 6e-5) would lose."""
    n, v, temperature = 12, 40, 0.3
    gen = torch.Generator().manual_seed(5)
    logits = 297.0 - torch.rand(n, v, generator=gen)
    tgt = torch.randint(0, v, (n,), generator=gen)
    logits[torch.arange(n), tgt] = 300.0
    weight = torch.eye(v)  # hidden @ weight.T is exactly the logits above
    g = torch.randn(n, generator=gen)
    ref = {}
    x = logits.clone().to(device).requires_grad_(True)
    logp = K.linear_logprobs(x, weight.to(device), tgt.to(device), temperature=temperature, backend=backend)
    (logp * g.to(device)).sum().backward()
    got = logp, x.grad
    for dtype in (torch.float64, torch.float32):
        xr = logits.clone().to(dtype).requires_grad_(True)
        logp_r = K.linear_logprobs_reference(xr, weight, tgt, temperature=temperature, dtype=dtype)
        (logp_r * g.to(dtype)).sum().backward()
        ref[dtype] = logp_r, xr.grad
    assert ref[torch.float64][0].max() > -1e-2
    for i, what in enumerate(("logp", "d hidden")):
        close(got[i], ref[torch.float64][i], what, {"rtol": 0.0, "atol": 1e-7}, fp32=ref[torch.float32][i])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_many_rows(device, backend):
    """N > 65,535 rows: rows live on grid axis 0 and offsets are int64 (tiny H, V keep it fast)."""
    check_linear(70_000, 4, 3, torch.float32, device, backend, seed=4)
    check_fused(70_000, 4, 3, torch.float32, device, backend, seed=5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_all_masked_and_zero_advantages(device, backend):
    loss, stats, dx, dw = check_fused(17, 16, 33, torch.float32, device, backend, mask_none=True)
    assert loss.item() == 0 and (dx == 0).all() and (dw == 0).all() and stats["tokens"].item() == 0
    loss, stats, dx, dw = check_fused(17, 16, 33, torch.float32, device, backend, adv_zero=True)
    assert loss.item() == 0 and (dx == 0).all() and (dw == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ratios_far_outside_clip_range(device, backend):
    _, stats, _, _ = check_fused(300, 16, 33, torch.float32, device, backend, spread=30.0, seed=8)
    assert stats["clip_low"].item() > 0 and stats["clip_high"].item() > 0 and stats["dual_clip"].item() > 0


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_fused_microbatch_invariance(device, backend):
    hidden, weight, tgt, gen = make(301, 16, 40, torch.float32, device, 9)
    old = -torch.rand(301, generator=gen).to(device) * 4
    adv = torch.randn(301, generator=gen).to(device)
    mask = (torch.rand(301, generator=gen) < 0.7).to(device)
    w1 = weight.clone().requires_grad_(True)
    x1 = hidden.clone().requires_grad_(True)
    full, _st_full = K.fused_linear_policy_loss(x1, w1, tgt, old, adv, mask, backend=backend)
    full.backward()
    w2 = weight.clone().requires_grad_(True)
    x2 = hidden.clone().requires_grad_(True)
    total = mask.sum()
    acc = 0.0
    for sl in (slice(0, 150), slice(150, 151), slice(151, 301)):
        loss, _ = K.fused_linear_policy_loss(
            x2[sl], w2, tgt[sl], old[sl], adv[sl], mask[sl], normalizer=total, backend=backend
        )
        loss.backward()
        acc = acc + loss.detach()
    torch.testing.assert_close(acc, full.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_on_policy_old_logprobs_are_the_forwards_own(device, backend):
    """old_logprobs=None (the first mini-batch, before any optimizer step): every ratio is 1 and the
    loss and gradients are those of passing the same weights' log-probs from a separate pass,
    checked against the float64 reference."""
    hidden, weight, tgt, gen = make(77, 16, 40, torch.float32, device, 11)
    adv = torch.randn(77, generator=gen).to(device)
    mask = (torch.rand(77, generator=gen) < 0.8).to(device)
    x64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    with torch.no_grad():
        old = K.linear_logprobs(hidden, weight, tgt, backend=backend)
    want, _ = K.fused_linear_policy_loss_reference(x64, w64, tgt, old.double(), adv, mask)
    want.backward()
    results = []
    for old_given in (old, None):
        x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, stats = K.fused_linear_policy_loss(x, w, tgt, old_given, adv, mask, backend=backend)
        loss.backward()
        results.append((loss, stats, x.grad, w.grad))
        close(loss, want, "loss", TOL[torch.float32])
        close(x.grad, x64.grad, "d hidden", TOL[torch.float32])
        close(w.grad, w64.grad, "d weight", TOL[torch.float32])
    (_, pass_stats, *_), (_, stats, *_) = results
    assert stats["ratio"].item() == stats["tokens"].item()  # exactly 1 per token
    assert stats["clip_low"].item() == stats["clip_high"].item() == stats["approx_kl"].item() == 0
    torch.testing.assert_close(stats["entropy"], pass_stats["entropy"])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_propagates(device, backend):
    hidden, weight, tgt, _gen = make(6, 16, 20, torch.float32, device, 10)
    hidden[2, 3] = float("nan")
    logp = K.linear_logprobs(hidden, weight, tgt, backend=backend)
    assert torch.isnan(logp[2]) and torch.isfinite(logp[[0, 1, 3, 4, 5]]).all()
    mask = torch.ones(6, dtype=torch.bool, device=device)
    loss, _ = K.fused_linear_policy_loss(
        hidden, weight, tgt, torch.zeros(6, device=device), torch.ones(6, device=device), mask, backend=backend
    )
    assert torch.isnan(loss)
    w = weight.clone()
    w[5, 0] = float("nan")
    loss, _ = K.fused_linear_policy_loss(
        hidden.nan_to_num(), w, tgt, torch.zeros(6, device=device), torch.ones(6, device=device), mask, backend=backend
    )
    assert torch.isnan(loss)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize("n,h,v", [(1, 16, 33), (7, 72, 5000), (300, 256, 5000), (300, 256, 248_320)])
def test_cuda_bf16(n, h, v):
    check_linear(n, h, v, torch.bfloat16, "cuda", "triton", seed=n + v)
    check_fused(n, h, v, torch.bfloat16, "cuda", "triton", seed=n + v)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_cuda_fp32_matrix(n, h, v):
    check_linear(n, h, v, torch.float32, "cuda", "triton", seed=n + h + v)
    check_fused(n, h, v, torch.float32, "cuda", "triton", seed=n + h + v)


def test_bad_inputs():
    h = torch.randn(4, 8)
    w = torch.randn(10, 8)
    t = torch.tensor([0, 1, 2, 9])
    v = torch.zeros(4)
    m = torch.ones(4, dtype=torch.bool)
    with pytest.raises(TypeError, match="hidden"):
        K.linear_logprobs(h.long(), w, t)
    with pytest.raises(TypeError, match="weight"):
        K.linear_logprobs(h, w.double(), t)
    with pytest.raises(ValueError, match="weight"):
        K.linear_logprobs(h, torch.randn(10, 9), t)
    with pytest.raises(ValueError, match="target_ids"):
        K.linear_logprobs(h, w, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="target_ids"):
        K.linear_logprobs(h, w, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="target_ids"):
        K.linear_logprobs(h, w, t[:3])
    with pytest.raises(TypeError, match="target_ids"):
        K.linear_logprobs(h, w, t.float())
    with pytest.raises(ValueError, match="temperature"):
        K.linear_logprobs(h, w, t, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        K.fused_linear_policy_loss(h, w, t, v, v, m, temperature=0.0)
    with pytest.raises(ValueError, match="old_logprobs"):
        K.fused_linear_policy_loss(h, w, t, torch.zeros(5), v, m)
    with pytest.raises(ValueError, match="advantages"):
        K.fused_linear_policy_loss(h, w, t, v, torch.zeros(3), m)
    with pytest.raises(ValueError, match="target_ids"):  # a *valid* token out of range
        K.fused_linear_policy_loss(h, w, torch.tensor([0, 1, 2, 10]), v, v, m)
    with pytest.raises(ValueError, match="weight is on meta"):
        K.linear_logprobs(h, w.to("meta"), t)
    with pytest.raises(ValueError, match="target_ids is on meta"):
        K.linear_logprobs(h, w, t.to("meta"))
    with pytest.raises(ValueError, match="loss_mask is on meta"):
        K.fused_linear_policy_loss(h, w, t, v, v, m.to("meta"))
    # masked-out tokens may carry padding ids such as -100
    K.fused_linear_policy_loss(h, w, torch.tensor([0, 1, 2, -100]), v, v, torch.tensor([1, 1, 1, 0]))
    if HAS_CUDA:
        with pytest.raises(ValueError, match="weight"):
            K.linear_logprobs(h.cuda(), w, t.cuda())
        with pytest.raises(ValueError, match="target_ids"):
            K.linear_logprobs(h, w, t.cuda())


def test_gemm_probe_chooses_and_reports_once(monkeypatch, caplog):
    """The probe runs once per device on tiny tensors, its choice is logged once with the reason;
    on this CPU (no out_dtype GEMMs) it picks the fp32-upcast forms and says why."""
    import logging

    LL = importlib.import_module("zppo_fast.kernels.linear_logprobs")
    monkeypatch.setattr(LL, "_GEMM_MODES", {})
    with caplog.at_level(logging.INFO, logger="zppo_fast.kernels"):
        modes = LL.gemm_modes("cpu")
        assert LL.gemm_modes(torch.device("cpu")) is modes
        x, w, t, _ = make(9, 16, 40, torch.bfloat16, "cpu", seed=3)
        K.linear_logprobs(x, w, t)
    assert (modes.logits, modes.dw) == ("upcast", "upcast")
    assert "NotImplementedError" in modes.reason
    reports = [r.getMessage() for r in caplog.records if "lm_head GEMMs" in r.getMessage()]
    assert len(reports) == 1 and "logits upcast, dW upcast" in reports[0] and "NotImplementedError" in reports[0]


def test_gemm_probe_fast_path_and_rounded_result(monkeypatch):
    """With out_dtype GEMMs available the probe picks them (and the ops then match float64 with
    bf16 operands); a GEMM that rounds its result to bf16 is caught by the probe's exact check."""
    LL = importlib.import_module("zppo_fast.kernels.linear_logprobs")
    monkeypatch.setattr(LL, "_GEMM_MODES", {})
    fp32_out_gemms(monkeypatch, exact=False)
    rounded = LL.gemm_modes("cpu")
    assert (rounded.logits, rounded.dw) == ("upcast", "upcast") and "exact" in rounded.reason
    monkeypatch.setattr(LL, "_GEMM_MODES", {})
    fp32_out_gemms(monkeypatch, exact=True)
    modes = LL.gemm_modes("cpu")
    assert (modes.logits, modes.dw) == ("out_dtype", "inplace")
    monkeypatch.setattr(LL, "_dz_dtype", lambda hidden: hidden.dtype)  # the CUDA layout: bf16 dZ
    check_linear(37, 72, 300, torch.bfloat16, "cpu", "torch", chunk_rows=16, seed=31)
    check_fused(37, 72, 300, torch.bfloat16, "cpu", "torch", chunk_rows=16, seed=32)


@pytest.mark.parametrize("which", ["mm", "addmm"])
def test_out_of_memory_in_the_probe_propagates(monkeypatch, which):
    """torch.OutOfMemoryError is a RuntimeError, the class the probe treats as "unsupported": it
    must propagate (through the public op too) and record no mode, so memory pressure never
    switches the GEMMs to another form; the next call probes again."""
    LL = importlib.import_module("zppo_fast.kernels.linear_logprobs")
    monkeypatch.setattr(LL, "_GEMM_MODES", {})
    fp32_out_gemms(monkeypatch, exact=True)
    real = getattr(torch, which)
    calls = []

    def oom(*args, **kwargs):
        if kwargs.get("out_dtype") is not None:
            calls.append(which)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, which, oom)
    with pytest.raises(torch.OutOfMemoryError):
        LL.gemm_modes("cpu")
    assert calls == [which] and LL._GEMM_MODES == {}
    x, w, t, _ = make(5, 8, 20, torch.bfloat16, "cpu", seed=4)
    with pytest.raises(torch.OutOfMemoryError):
        K.linear_logprobs(x, w, t)
    assert LL._GEMM_MODES == {}
    monkeypatch.setattr(torch, which, real)
    assert (LL.gemm_modes("cpu").logits, LL.gemm_modes("cpu").dw) == ("out_dtype", "inplace")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA"))])
@pytest.mark.parametrize("fused", [False, True])
def test_dw_accumulated_in_the_weights_dtype(monkeypatch, fused, device):
    """dw_accum="weight": a bf16 accumulator (half the fp32 one's memory) that adds one rounded
    product per chunk. Tolerance: the bf16 one plus 2**-8 (one bf16 rounding) per chunk."""
    LL = importlib.import_module("zppo_fast.kernels.linear_logprobs")
    buffers = []
    real_buffer = LL.dw_buffer
    monkeypatch.setattr(LL, "dw_buffer", lambda w, accum: buffers.append(real_buffer(w, accum)) or buffers[-1])
    n, chunk = 45, 8
    tol = {k: v + -(-n // chunk) * 2.0**-8 for k, v in TOL[torch.bfloat16].items()}
    hidden, weight, tgt, gen = make(n, 24, 70, torch.bfloat16, device, seed=41)
    g = torch.randn(n, generator=gen).to(device)
    grads = {}
    for accum in ("fp32", "weight"):
        x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if fused:
            ones = torch.ones(n, dtype=torch.bool, device=device)
            loss, _ = K.fused_linear_policy_loss(x, w, tgt, g, g, ones, chunk_rows=chunk, dw_accum=accum)
        else:
            loss = (K.linear_logprobs(x, w, tgt, chunk_rows=chunk, dw_accum=accum) * g).sum()
        loss.backward()
        grads[accum] = x.grad, w.grad
    xr, wr = hidden.cpu().double().requires_grad_(True), weight.cpu().double().requires_grad_(True)
    tgt, g = tgt.cpu(), g.cpu()
    if fused:
        ones = torch.ones(n, dtype=torch.bool)
        K.fused_linear_policy_loss_reference(xr, wr, tgt, g, g, ones)[0].backward()
    else:
        (K.linear_logprobs_reference(xr, wr, tgt) * g.double()).sum().backward()
    assert [b.dtype for b in buffers] == [torch.float32, torch.bfloat16]
    for accum, (dx, dw) in grads.items():
        assert dw.dtype == torch.bfloat16
        close(dx, xr.grad, f"d hidden ({accum})", tol)
        close(dw, wr.grad, f"d weight ({accum})", tol)
    with pytest.raises(ValueError, match="dw_accum"):
        K.linear_logprobs(hidden, weight, tgt, dw_accum="bf16")


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
def test_cuda_gemm_forms_are_the_tensor_core_ones():
    """What the first GPU run must find: bf16 x bf16 -> fp32 GEMMs for logits and in-place dW."""
    LL = importlib.import_module("zppo_fast.kernels.linear_logprobs")
    modes = LL.gemm_modes(torch.device("cuda"))
    assert (modes.logits, modes.dw) == ("out_dtype", "inplace"), modes.reason


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
def test_cuda_out_of_range_target_is_a_device_side_assert():
    """On CUDA the target check never waits for the GPU: a bad id trips a device-side assert (in a
    child process: the assert ends its CUDA context)."""
    import subprocess
    import sys

    code = (
        "import torch, zppo_fast.kernels as K\n"
        "h = torch.randn(4, 8, device='cuda'); w = torch.randn(10, 8, device='cuda')\n"
        "K.linear_logprobs(h, w, torch.tensor([0, 1, 2, 10], device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode != 0 and "device-side assert" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=INTERP)])
def test_low_precision_dz_path_on_cpu(monkeypatch, backend):
    """The CUDA bf16 layout (dZ stored in bf16, bf16 dX GEMM, fp32 dW accumulation) runs only on
    GPUs; force it on CPU so its logic (and the Triton kernel's bf16 store) is checked here too."""
    LL = importlib.import_module("zppo_fast.kernels.linear_logprobs")
    monkeypatch.setattr(LL, "_dz_dtype", lambda hidden: hidden.dtype)
    check_linear(37, 72, 300, torch.bfloat16, "cpu", backend, chunk_rows=16, seed=23)
    check_fused(37, 72, 300, torch.bfloat16, "cpu", backend, chunk_rows=16, seed=24)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    h=st.integers(1, 24),
    v=st.integers(1, 70),
    temperature=st.floats(0.3, 3.0),
    eps_low=st.floats(0.0, 0.5),
    eps_high=st.floats(0.0, 1.0),
    dual_clip=st.sampled_from([None, 1.5, 10.0]),
    chunk_rows=st.sampled_from([None, 1, 3, 16]),
    seed=st.integers(0, 2**16),
)
def test_property_fused_matches_reference(n, h, v, temperature, eps_low, eps_high, dual_clip, chunk_rows, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen)
    tgt = torch.randint(0, v, (n,), generator=gen)
    old = -torch.rand(n, generator=gen) * 6
    adv = torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.75
    x = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    kw = {"eps_low": eps_low, "eps_high": eps_high, "dual_clip": dual_clip, "temperature": temperature}
    loss, stats = K.fused_linear_policy_loss(x, w, tgt, old, adv, mask, backend="torch", chunk_rows=chunk_rows, **kw)
    loss.backward()
    ref = {}
    for dtype in (torch.float64, torch.float32):
        xr, wr = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
        loss_r, stats_r = K.fused_linear_policy_loss_reference(xr, wr, tgt, old, adv, mask, **kw, dtype=dtype)
        loss_r.backward()
        ref[dtype] = loss_r, stats_r, xr.grad, wr.grad
    (loss_r, stats_r, dx_r, dw_r), (loss_32, _, dx_32, dw_32) = ref[torch.float64], ref[torch.float32]
    tol = TOL[torch.float32]
    close(loss, loss_r, "loss", tol, fp32=loss_32)
    close(x.grad, dx_r, "d hidden", tol, fp32=dx_32)
    close(w.grad, dw_r, "d weight", tol, fp32=dw_32)
    for k in ("clip_low", "clip_high", "dual_clip", "tokens"):
        assert stats[k].item() == stats_r[k].item(), k


if NEEDS_INTERPRETER_CHILD:

    def test_interpreter_cases_in_child_process():
        """Triton was imported before tests/conftest.py could set TRITON_INTERPRET=1, so
        the interpreter cases above skip in this process: run them in a child that has it."""
        run_interpreter_cases_in_child(__file__)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=INTERP)])
def test_bias_and_ignored_rows(backend):
    """lm_head bias (with its gradient) and ignore_index targets: those rows give log-prob and
    entropy 0 and no gradient; the rest match the float64 reference."""
    hidden, weight, tgt, gen = make(29, 40, 301, torch.float32, "cpu", seed=31)
    bias = torch.randn(301, generator=gen)
    tgt[::3] = -100
    x, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    logp, ent = K.linear_logprobs(x, w, tgt, bias=b, return_entropy=True, backend=backend, chunk_rows=8)
    g1, g2 = torch.randn(29, generator=gen), torch.randn(29, generator=gen)
    ((logp * g1).sum() + (ent * g2).sum()).backward()
    keep = tgt != -100
    xr, wr, br = (t.double().requires_grad_(True) for t in (hidden, weight, bias))
    logits = xr @ wr.T + br
    logsm = torch.log_softmax(logits, -1)
    logp_r = torch.where(keep, logsm.gather(-1, tgt.clamp(min=0)[:, None]).squeeze(-1), 0.0)
    ent_r = torch.where(keep, -(logsm.exp() * logsm).sum(-1), 0.0)
    ((logp_r * g1.double()).sum() + (ent_r * g2.double()).sum()).backward()
    tol = TOL[torch.float32]
    for a, e, name in ((logp, logp_r, "logp"), (ent, ent_r, "entropy"), (x.grad, xr.grad, "d hidden"),
                       (w.grad, wr.grad, "d weight"), (b.grad, br.grad, "d bias")):  # fmt: skip
        close(a, e, name, tol)
    assert (logp[~keep] == 0).all() and (x.grad[~keep] == 0).all()
    with pytest.raises(ValueError, match="target_ids"):  # -1 is no ignore_index: still out of range
        K.linear_logprobs(x, w, torch.full_like(tgt, -1))


def test_fp32_lm_head_with_bf16_hidden_states():
    """autocast's mix (bf16 hidden states, fp32 master lm_head) is accepted: the reference sees the
    same bf16 hidden and fp32 weight; d weight comes back fp32, d hidden bf16."""
    hidden, weight, tgt, gen = make(23, 48, 257, torch.float32, "cpu", seed=41)
    x = hidden.bfloat16().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = K.linear_logprobs(x, w, tgt)
    g = torch.randn(23, generator=gen)
    (logp * g).sum().backward()
    xr = x.detach().double().requires_grad_(True)
    wr = weight.double().requires_grad_(True)
    logp_r = K.linear_logprobs_reference(xr, wr, tgt)
    (logp_r * g.double()).sum().backward()
    assert logp.dtype == torch.float32 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    close(logp, logp_r, "logp", TOL[torch.float32])
    close(w.grad, wr.grad, "d weight", TOL[torch.float32])
    close(x.grad, xr.grad, "d hidden", TOL[torch.bfloat16])
    with pytest.raises(TypeError, match="weight"):  # the other way round stays an error
        K.linear_logprobs(hidden, weight.bfloat16(), tgt)
