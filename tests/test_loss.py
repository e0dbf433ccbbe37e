"""The trainer's loss and advantages against hand-computed float64 cases (independent of kernels/)."""

import math

import pytest
import torch
from zppo_fast.kernels import normalize_advantages, policy_loss


def test_policy_loss_hand_cases():
    # (log-ratio, advantage, masked?, expected per-token loss, expected d loss / d logp)
    r = math.exp
    cases = [
        (0.1, 1.0, True, -r(0.1), -r(0.1)),  # inside the trust region: -A * ratio
        (0.5, 1.0, True, -1.28, 0.0),  # clip-higher active: ratio 1.65 > 1 + 0.28
        (0.2, 1.0, True, -r(0.2), -r(0.2)),  # 1.22 < 1.28: clip-higher not active (would be at 1.2)
        (-0.5, -1.0, True, 0.8, 0.0),  # lower clip for A < 0: ratio 0.61 < 1 - 0.2
        (math.log(2.0), -1.0, True, 2.0, 2.0),  # A < 0, ratio 2: unclipped, below dual clip
        (3.0, -1.0, True, 10.0, 0.0),  # dual-clip: ratio 20 > 10 caps the loss at -A * 10
        (-0.5, 2.0, True, -2 * r(-0.5), -2 * r(-0.5)),  # A > 0, low ratio: no clip applies
        (0.7, 0.0, True, 0.0, 0.0),  # zero advantage
        (5.0, 3.0, False, 0.0, 0.0),  # masked out
    ]
    old = torch.zeros(len(cases), dtype=torch.float64)
    logp = torch.tensor([c[0] for c in cases], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    mask = torch.tensor([c[2] for c in cases])
    normalizer = 11.0
    loss, stats = policy_loss(logp.float(), old.float(), adv.float(), mask, normalizer=normalizer)
    expected = sum(c[3] for c in cases) / normalizer
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    lp32 = logp.detach().float().requires_grad_()
    policy_loss(lp32, old.float(), adv.float(), mask, normalizer=normalizer)[0].backward()
    torch.testing.assert_close(lp32.grad.double(), torch.tensor([c[4] for c in cases], dtype=torch.float64) / normalizer,
                               rtol=1e-5, atol=1e-7)
    assert stats["tokens"].item() == 8
    assert stats["clip_high"].item() == 1 and stats["clip_low"].item() == 1 and stats["dual_clip"].item() == 1


def test_policy_loss_default_normalizer_and_empty_mask():
    logp = torch.tensor([0.1, -0.2, 0.3])
    adv = torch.tensor([1.0, -1.0, 0.5])
    mask = torch.tensor([True, True, False])
    loss, _ = policy_loss(logp, torch.zeros(3), adv, mask)
    assert loss.item() == pytest.approx((-math.exp(0.1) + math.exp(-0.2)) / 2, rel=1e-6)
    empty, stats = policy_loss(logp, torch.zeros(3), adv, torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0 and stats["tokens"].item() == 0


# Groups given out of order: 0 = {1,0,0,1}, 1 = all-correct {1,1}, 2 = all-wrong {0,0,0}, 3 = single {1}.
GROUPS = [0, 1, 2, 0, 2, 3, 0, 1, 2, 0]
REWARDS = [1, 1, 0, 0, 0, 1, 0, 1, 0, 1]
CENTERED = [0.5, 0, 0, -0.5, 0, 0, -0.5, 0, 0, 0.5]  # A' = r - group mean


@pytest.mark.parametrize(
    "mode, expected",
    [
        # S = group 0 only: A' = +-0.5, mean 0, population std 0.5.
        ("batch_wo_zero", [a / (0.5 + 1e-6) for a in CENTERED]),
        # S = all ten rollouts: mean 0, population std sqrt(4 * 0.25 / 10).
        ("batch_w_zero", [a / (math.sqrt(0.1) + 1e-6) for a in CENTERED]),
        ("none", CENTERED),
        # Group std: 0.5 for group 0, 0 elsewhere (A' = 0 there, so A = 0).
        ("group", [a / (0.5 + 1e-6) for a in CENTERED]),
    ],
)
def test_advantage_modes_hand_cases(mode, expected):
    adv = normalize_advantages(torch.tensor(REWARDS, dtype=torch.float32), torch.tensor(GROUPS), mode=mode, eps=1e-6)
    torch.testing.assert_close(adv.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_advantages_all_trivial_groups_are_zero():
    adv = normalize_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1]))
    assert torch.equal(adv, torch.zeros(4))
