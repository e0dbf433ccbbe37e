"""examples/: TRL's GRPOTrainer with FusedLinearPolicyLoss against TRL's own loss on the same
batches, and the verl policy loss against a float64 reading of verl's vanilla loss + agg_loss.

Tolerances as in test_kernels_policy_module.py: 32 * eps32 * sqrt(K) of the largest value,
K the length of the longest fp32 reduction (here the lm_head's H + V, or the B * T tokens).
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from numerics import close

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EPS32 = torch.finfo(torch.float32).eps


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- verl
def verl_vanilla_reference(old, logp, adv, mask, mode, eps_low, eps_high, c, weights, info):
    """verl's compute_policy_loss_vanilla + agg_loss (core_algos.py at b178a3cd) in float64."""
    m = mask.double()
    log_r = torch.clamp(logp - old, -20.0, 20.0)
    r = torch.exp(log_r)
    pg1 = -adv * r
    pg2 = -adv * torch.clamp(r, 1 - eps_low, 1 + eps_high)
    clip1 = torch.maximum(pg1, pg2)
    pg3 = -adv * c
    pg = torch.where(adv < 0, torch.min(pg3, clip1), clip1)
    if weights is not None:
        pg = pg * weights
    dp = info.get("dp_size", 1)
    if mode == "token-mean":
        loss = (pg * m).sum() / info.get("batch_num_tokens", m.sum()) * dp
    elif mode == "seq-mean-token-sum-norm":
        loss = (pg * m).sum() / info.get("loss_scale_factor", m.shape[-1])
    else:
        seq = (pg * m).sum(-1)
        if mode == "seq-mean-token-mean":
            seq = seq / (m.sum(-1) + 1e-8)
        loss = seq.sum() / info.get("global_batch_size", (m.sum(-1) > 0).sum()) * dp
    metrics = {
        "actor/pg_clipfrac": ((pg2 > pg1).double() * m).sum() / m.sum(),
        "actor/ppo_kl": (-log_r * m).sum() / m.sum(),
        "actor/pg_clipfrac_lower": (((clip1 > pg3) & (adv < 0)).double() * m).sum() / m.sum(),
    }
    return loss, metrics


@pytest.mark.parametrize("with_info", [False, True], ids=["local", "global-batch-info"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verl_policy_loss_matches_verl_formula(mode, with_info):
    verl = load_example("verl_policy_loss")
    gen = torch.Generator().manual_seed(3)
    B, T = 6, 11
    logp = -torch.rand(B, T, generator=gen) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=gen)
    old[0, :4] = logp[0, :4] - 2.0  # ratios e^2 > clip_ratio_c on some tokens
    adv = torch.randn(B, T, generator=gen)
    adv[0, :4] = -1.0
    mask = torch.rand(B, T, generator=gen) < 0.8
    mask[2] = False  # an empty sequence
    weights = 0.5 + torch.rand(B, T, generator=gen)
    info = {"dp_size": 2, "batch_num_tokens": 97, "global_batch_size": 9, "loss_scale_factor": 16} if with_info else {}
    config = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
    config["global_batch_info"] = info
    x = logp.clone().requires_grad_(True)
    loss, metrics = verl.compute_policy_loss_zppo(old, x, adv, mask, mode, config, rollout_is_weights=weights)
    loss.backward()
    xr = logp.double().requires_grad_(True)
    loss_r, metrics_r = verl_vanilla_reference(
        old.double(), xr, adv.double(), mask, mode, 0.2, 0.28, 3.0, weights.double(), info
    )
    loss_r.backward()
    tol = {"rtol": 0.0, "atol": 32 * EPS32 * (B * T) ** 0.5}
    close(loss, loss_r, "loss", tol)
    close(x.grad, xr.grad, "d log_prob", tol)
    for k, v in metrics_r.items():
        assert abs(metrics[k] - v.item()) <= tol["atol"] * max(1.0, abs(v.item())), k
    assert metrics["actor/pg_clipfrac_lower"] > 0 and metrics["actor/pg_clipfrac"] > 0  # both clips bind
    with pytest.raises(ValueError, match="loss_agg_mode"):
        verl.compute_policy_loss_zppo(old, x, adv, mask, "token-sum", config)


# ----------------------------------------------------------------------------- TRL
def test_trl_grpo_two_steps_match_trls_own_loss(tmp_path):
    """Two GRPOTrainer steps (the second off-policy: num_iterations=2, beta=0.04 with TRL's
    reference model, TRL's default bias-corrected KL): on every micro-batch our loss and its
    gradients equal TRL's own _compute_loss on the same inputs, and the weights move."""
    pytest.importorskip("trl")
    ex = load_example("trl_grpo")
    from trl import GRPOTrainer

    seen = []

    class Compared(ex.FusedLossGRPOTrainer):
        def _compute_loss(self, model, inputs):
            ours = super()._compute_loss(model, inputs)
            theirs = GRPOTrainer._compute_loss(self, model, inputs)
            params = [p for p in model.parameters() if p.requires_grad]
            g_ours = torch.autograd.grad(ours, params, retain_graph=True)
            g_theirs = torch.autograd.grad(theirs, params)
            seen.append((ours.detach(), theirs.detach(), g_ours, g_theirs, "old_per_token_logps" in inputs))
            return ours

    for loss_type in ("dapo", "grpo"):
        seen.clear()
        trainer = ex.make_trainer(
            ex.build_tiny_checkpoint(tmp_path / loss_type), str(tmp_path / f"run-{loss_type}"), Compared,
            loss_type=loss_type,
        )  # fmt: skip
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        assert len(seen) == 2 and seen[-1][4], "two micro-batches, the second with old log-probs"
        V, H = trainer.model.get_output_embeddings().weight.shape
        tol = {"rtol": 0.0, "atol": 32 * EPS32 * (H + V) ** 0.5}
        for step, (ours, theirs, g_ours, g_theirs, _) in enumerate(seen):
            close(ours, theirs, f"{loss_type} loss, step {step}", tol, scale=1.0)
            scale = max(g.abs().max().item() for g in g_theirs)
            for i, (a, b) in enumerate(zip(g_ours, g_theirs)):
                close(a, b, f"{loss_type} gradient {i}, step {step}", tol, scale=scale)
        moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
        assert "lm_head.weight" in moved and len(moved) > len(before) // 2
