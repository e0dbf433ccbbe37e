"""FusedLinearPolicyLoss: against Liger's LigerFusedLinearGRPOLoss on the same inputs, against a
float64 reference of each loss_type written here (TRL's formulas, materialised logits), under
torch.compile(fullgraph=True), and imported from a vendored copy of kernels/ that only has torch.

Tolerances: an fp32 result of a reduction over K terms of size ~scale is within
eps32 * sqrt(K) * scale of exact (rounding errors add like a random walk); we allow 32x that.
Here K = H + V (a logit's dot product, then the log-sum-exp over V). In bf16 the float64
reference sees the same bf16-rounded inputs, so what is left is the rounding of the outputs
(gradients are returned in bf16: eps_bf16 relative) and, for Liger, its bf16 logits and its
bf16 accumulation of d weight over sequences: 8 * eps_bf16 of the largest value.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import zppo_fast.kernels as K
from kernel_cases import INTERP
from numerics import close

B, T, H, V = 3, 7, 24, 97
EPS32 = torch.finfo(torch.float32).eps
EPS_BF16 = torch.finfo(torch.bfloat16).eps
TOL = {
    torch.float32: {"rtol": 0.0, "atol": 32 * EPS32 * (H + V) ** 0.5},
    torch.bfloat16: {"rtol": EPS_BF16, "atol": EPS_BF16},
}
TOL_LIGER_BF16 = {"rtol": 0.0, "atol": 8 * EPS_BF16}
EPS_LOW, EPS_HIGH = 0.2, 0.28


def make_batch(dtype, seed, *, old=True, ref=True, per_token_adv=False):
    """Random [B, T] batch with a ragged mask; old log-probs near the current ones, moved off the
    clip boundaries (a token within 2% of 1 +- eps would flip between clipped and not under
    bf16's own rounding, a difference of the input, not of the implementation)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=gen).to(dtype)
    w = (torch.randn(V, H, generator=gen) * (3.0 / H**0.5)).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.5).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.75
    mask[0] = True  # a full row
    mask[1, 3:] = False  # a short one
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=gen)
    with torch.no_grad():
        logp = reference_logprobs(x, w, b, ids).float()
    batch = {"x": x, "w": w, "b": b, "ids": ids, "mask": mask, "adv": adv, "old": None, "ref": None}
    if old:
        o = logp + 0.3 * torch.randn(B, T, generator=gen)
        r = torch.exp(logp - o)
        near = ((r - (1 - EPS_LOW)).abs() < 0.02) | ((r - (1 + EPS_HIGH)).abs() < 0.02)
        batch["old"] = torch.where(near, logp, o)
    if ref:
        batch["ref"] = logp + 0.2 * torch.randn(B, T, generator=gen)
    return batch


def reference_logprobs(x, w, b, ids):
    logits = x.double() @ w.double().T + b.double()
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)


def reference_loss(batch, loss_type, beta, dual_clip=None, max_len=T):
    """TRL's GRPOTrainer loss in float64 (trl/trainer/grpo_trainer.py, _compute_loss), with the
    dual clip on negative advantages. Returns (loss, kl_mean, clip_ratio, x, w, b) with x, w, b the
    float64 leaves to read the gradients from."""
    x = batch["x"].double().requires_grad_(True)
    w = batch["w"].double().requires_grad_(True)
    b = batch["b"].double().requires_grad_(True)
    m = batch["mask"].double()
    logp = reference_logprobs(x, w, b, batch["ids"])
    old = logp.detach() if batch["old"] is None else batch["old"].double()
    adv = batch["adv"].double()
    adv = adv[:, None] if adv.dim() == 1 else adv
    r = torch.exp(logp - old)
    per_token = -torch.min(r * adv, torch.clamp(r, 1 - EPS_LOW, 1 + EPS_HIGH) * adv)
    if dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * dual_clip), per_token)
    kl = None
    if beta:
        ref = batch["ref"].double()
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type in ("bnpo", "dapo"):  # one process, no num_items_in_batch: the same token mean
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    else:
        loss = (per_token * m).sum() / (B * max_len)
    loss.backward()
    clipped = ((r < 1 - EPS_LOW) & (adv < 0)) | ((r > 1 + EPS_HIGH) & (adv > 0))
    kl_mean = None if kl is None else (kl * m).sum().detach() / m.sum()
    return loss.detach(), kl_mean, (clipped.double() * m).sum() / m.sum(), x, w, b


def run(module, batch, **extra):
    """Loss, metrics and (d x, d w, d b) of ``module`` on ``batch``."""
    x = batch["x"].clone().requires_grad_(True)
    w = batch["w"].clone().requires_grad_(True)
    b = batch["b"].clone().requires_grad_(True)
    loss, metrics = module(
        x, w, batch["ids"], batch["mask"], batch["adv"], b, batch["ref"], batch["old"], **extra
    )
    loss.backward()
    return loss, metrics, (x.grad, w.grad, b.grad)


def check_against_reference(loss, metrics, grads, ref, dtype, beta):
    loss_r, kl_r, clip_r, *leaves = ref
    tol = TOL[dtype]
    close(loss, loss_r, "loss", TOL[torch.float32] if dtype == torch.bfloat16 else tol)
    for g, leaf, name in zip(grads, leaves, ("d input", "d weight", "d bias")):
        assert g.dtype == dtype, name
        close(g, leaf.grad, name, tol)
    if beta:
        close(metrics[0], kl_r, "kl", TOL[torch.float32])
    assert len(metrics) == (2 if beta else 1)
    close(metrics[-1], clip_r, "clip_ratio", {"rtol": 0.0, "atol": 1e-6})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("old", [True, False], ids=["old", "on-policy"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", K.LOSS_TYPES)
def test_matches_liger_and_reference(loss_type, beta, old, dtype):
    liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    batch = make_batch(dtype, seed=K.LOSS_TYPES.index(loss_type) * 4 + 2 * (beta > 0) + old, old=old)
    kw = {"beta": beta, "epsilon_low": EPS_LOW, "epsilon_high": EPS_HIGH, "loss_type": loss_type}
    kw["max_completion_length"] = T + 2
    ours = run(K.FusedLinearPolicyLoss(**kw), batch)
    theirs = run(liger_grpo.LigerFusedLinearGRPOLoss(compiled=False, **kw), batch)
    ref = reference_loss(batch, loss_type, beta, max_len=T + 2)
    check_against_reference(*ours, ref, dtype, beta)
    # Liger against the same float64 reference (so the comparison below is not of two wrong numbers),
    # then against ours directly
    liger_tol = TOL[torch.float32] if dtype == torch.float32 else TOL_LIGER_BF16
    close(theirs[0], ref[0], "Liger loss", liger_tol)
    tol_pair = {k: 2 * v for k, v in liger_tol.items()}
    close(ours[0], theirs[0], "loss vs Liger", tol_pair)
    assert len(ours[1]) == len(theirs[1])
    for a, b_, name in zip(ours[1], theirs[1], ("metric 0", "metric 1")):
        close(a, b_, f"{name} vs Liger", tol_pair)
    for a, b_, name in zip(ours[2], theirs[2], ("d input", "d weight", "d bias")):
        close(a, b_, f"{name} vs Liger", tol_pair)


def test_ref_logprobs_computed_from_ref_model_and_per_token_advantages():
    """ref_input/ref_weight/ref_bias (the reference log-probs computed inside) give what the same
    log-probs passed as ref_per_token_logps give; [B, T] advantages; vllm_is_ratio; the dual clip."""
    batch = make_batch(torch.float32, seed=5, per_token_adv=True)
    gen = torch.Generator().manual_seed(6)
    ref_x = torch.randn(B, T, H, generator=gen)
    ref_w = torch.randn(V, H, generator=gen) * (3.0 / H**0.5)
    ref_b = torch.randn(V, generator=gen)
    batch["ref"] = reference_logprobs(ref_x, ref_w, ref_b, batch["ids"]).float()
    is_ratio = 0.5 + torch.rand(B, T, generator=gen)
    module = K.FusedLinearPolicyLoss(beta=0.1, loss_type="bnpo", epsilon_high=EPS_HIGH, dual_clip=1.3)
    given = run(module, batch, vllm_is_ratio=is_ratio)
    computed = run(
        module, {**batch, "ref": None}, ref_input=ref_x, ref_weight=ref_w, ref_bias=ref_b, vllm_is_ratio=is_ratio
    )
    for a, b_, name in zip([given[0], *given[1], *given[2]], [computed[0], *computed[1], *computed[2]], "lkcxwb"):
        close(a, b_, name, TOL[torch.float32])
    # float64: TRL's formula with the dual clip, the IS ratio applied before the KL term
    x = batch["x"].double().requires_grad_(True)
    logp = reference_logprobs(x, batch["w"], batch["b"], batch["ids"])
    adv = batch["adv"].double()
    r = torch.exp(logp - batch["old"].double())
    pg = -torch.min(r * adv, torch.clamp(r, 1 - EPS_LOW, 1 + EPS_HIGH) * adv)
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * 1.3), pg) * is_ratio.double()
    d = batch["ref"].double() - logp
    m = batch["mask"].double()
    loss = ((pg + 0.1 * (torch.exp(d) - d - 1)) * m).sum() / m.sum()
    loss.backward()
    close(given[0], loss, "loss", TOL[torch.float32])
    close(given[2][0], x.grad, "d input", TOL[torch.float32])
    assert (adv < 0).logical_and(r > 1.3).logical_and(m > 0).any()  # the dual clip binds somewhere


def test_delta_is_the_dual_clip_and_liger_agrees():
    liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    batch = make_batch(torch.float32, seed=7)
    batch["old"] = batch["old"] - 0.8 * (batch["adv"][:, None] < 0)  # ratios above delta on A < 0
    kw = {"beta": 0.0, "epsilon_high": EPS_HIGH, "delta": 1.6}
    ours = run(K.FusedLinearPolicyLoss(**kw), batch)
    theirs = run(liger_grpo.LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=False, **kw), batch)
    ref = reference_loss(batch, "dapo", 0.0, dual_clip=1.6)
    check_against_reference(*ours, ref, torch.float32, 0.0)
    close(ours[0], theirs[0], "loss vs Liger", TOL[torch.float32])
    for a, b_, name in zip(ours[2], theirs[2], ("d input", "d weight", "d bias")):
        close(a, b_, name, TOL[torch.float32])


def test_num_items_in_batch_and_frozen_lm_head():
    batch = make_batch(torch.float32, seed=8)
    module = K.FusedLinearPolicyLoss(beta=0.0, loss_type="dapo", epsilon_high=EPS_HIGH)
    loss_local, _, _ = run(module, batch)
    n = int(batch["mask"].sum())
    loss_global, _, _ = run(module, batch, num_items_in_batch=torch.tensor(4 * n))
    close(loss_global, loss_local / 4, "dapo normalizer", TOL[torch.float32])
    x = batch["x"].clone().requires_grad_(True)  # lm_head frozen (LoRA): no weight gradient
    loss, _ = module(x, batch["w"], batch["ids"], batch["mask"], batch["adv"], batch["b"], None, batch["old"])
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="loss_type"):
        K.FusedLinearPolicyLoss(loss_type="sapo")
    with pytest.raises(ValueError, match="max_completion_length"):
        K.FusedLinearPolicyLoss(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="delta"):
        K.FusedLinearPolicyLoss(delta=1.1, epsilon_high=0.28)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        K.FusedLinearPolicyLoss(importance_sampling_level="sequence")
    batch = make_batch(torch.float32, seed=9)
    module = K.FusedLinearPolicyLoss(beta=0.04)
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        run(module, {**batch, "ref": None})
    with pytest.raises(ValueError, match="attention_mask"):
        run(module, {**batch, "mask": batch["mask"][:, :-1]})
    with pytest.raises(ValueError, match="advantages"):
        run(module, {**batch, "adv": batch["adv"][:-1]})


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_fullgraph_compile_matches_eager(loss_type):
    """A step calling the module compiles with fullgraph=True (the lm_head passes are torch.library
    ops with fake and autograd implementations). aot_eager: Dynamo + AOTAutograd, the part that
    must trace; Inductor's C++ code generation would only add minutes on a 2-core CI machine."""
    batch = make_batch(torch.float32, seed=11)
    gen = torch.Generator().manual_seed(12)
    ref_x, ref_w = torch.randn(B, T, H, generator=gen), torch.randn(V, H, generator=gen) * 0.5
    module = K.FusedLinearPolicyLoss(beta=0.04, loss_type=loss_type, epsilon_high=EPS_HIGH, dual_clip=3.0)

    def step(x, w, b, ids, mask, adv, old, ref_x, ref_w):
        return module(x, w, ids, mask, adv, b, None, old, ref_x, ref_w)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        x = batch["x"].clone().requires_grad_(True)
        w = batch["w"].clone().requires_grad_(True)
        b = batch["b"].clone().requires_grad_(True)
        loss, metrics = fn(x, w, b, batch["ids"], batch["mask"], batch["adv"], batch["old"], ref_x, ref_w)
        loss.backward()
        results.append([loss, *metrics, x.grad, w.grad, b.grad])
    for a, b_, name in zip(*results, ("loss", "kl", "clip_ratio", "d input", "d weight", "d bias")):
        close(a, b_, name, TOL[torch.float32])


@INTERP
def test_triton_interp_matches_reference():
    """The Triton streaming kernels (interpreted) under the module, one small case."""
    batch = make_batch(torch.float32, seed=13)
    kw = {"beta": 0.04, "loss_type": "bnpo", "epsilon_high": EPS_HIGH}
    out = run(K.FusedLinearPolicyLoss(backend="triton", chunk_rows=8, **kw), batch)
    check_against_reference(*out, reference_loss(batch, "bnpo", 0.04), torch.float32, 0.04)


def test_vendored_copy_imports_with_torch_only(tmp_path):
    """Copy kernels/ into another project under another package name and use it in a fresh
    interpreter that cannot import zppo_fast (relative imports only, torch as the one dependency)."""
    import shutil

    src = Path(K.__file__).resolve().parent
    dst = tmp_path / "their_project" / "vendored_loss"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    (dst.parent / "__init__.py").write_text("")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["zppo_fast"] = None  # any import of the trainer now fails
        import torch
        from their_project.vendored_loss import FusedLinearPolicyLoss, linear_logprobs
        x = torch.randn(2, 3, 8, requires_grad=True)
        w = torch.randn(11, 8, requires_grad=True)
        ids = torch.randint(0, 11, (2, 3))
        loss, metrics = FusedLinearPolicyLoss(beta=0.0)(x, w, ids, torch.ones(2, 3), torch.randn(2))
        loss.backward()
        assert x.grad is not None and w.grad is not None and len(metrics) == 1
        assert not [m for m, mod in sys.modules.items() if m.startswith("zppo_fast") and mod is not None]
        print("vendored ok", torch.ops.their_project_vendored_loss.linear_logprobs)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0 and "vendored ok" in out.stdout, out.stdout + out.stderr
