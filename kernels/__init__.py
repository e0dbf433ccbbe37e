"""zppo_fast.kernels - fused RL post-training ops. Depends on torch (and, optionally, triton).

Ops (each file: Triton kernel(s) + launcher + autograd.Function + PyTorch reference):
    policy_loss               policy_loss.py               clipped surrogate on given log-probs
    normalize_advantages      advantages.py                group / batch advantage normalisation
    linear_logprobs           linear_logprobs.py           lm_head log-probs (+ entropy), no [N, V]
    fused_linear_policy_loss  fused_linear_policy_loss.py  lm_head + policy loss, no [N, V]
    fused_linear_jsd          distill_loss.py              teacher/student generalized JSD, no [N, V]
                                                           (chunked PyTorch on every device for now)
    FusedLinearPolicyLoss     policy_loss_module.py        nn.Module drop-in for Liger's GRPO loss
Dispatch: Triton on CUDA; chunked PyTorch on CPU (``backend="triton"`` on CPU runs Triton's
interpreter, for tests).
"""

from ._triton_utils import HAVE_TRITON, describe_backend
from .advantages import MODES as ADVANTAGE_MODES
from .advantages import advantages_reference, normalize_advantages
from .distill_loss import DISTILL_STAT_NAMES, fused_linear_jsd, fused_linear_jsd_reference
from .fused_linear_policy_loss import fused_linear_policy_loss, fused_linear_policy_loss_reference
from .linear_logprobs import linear_logprobs, linear_logprobs_reference
from .policy_loss import STAT_NAMES, policy_loss, policy_loss_reference
from .policy_loss_module import LOSS_TYPES, FusedLinearPolicyLoss

__all__ = [
    "ADVANTAGE_MODES",
    "DISTILL_STAT_NAMES",
    "LOSS_TYPES",
    "FusedLinearPolicyLoss",
    "HAVE_TRITON",
    "STAT_NAMES",
    "advantages_reference",
    "describe_backend",
    "fused_linear_jsd",
    "fused_linear_jsd_reference",
    "fused_linear_policy_loss",
    "fused_linear_policy_loss_reference",
    "linear_logprobs",
    "linear_logprobs_reference",
    "normalize_advantages",
    "policy_loss",
    "policy_loss_reference",
]
