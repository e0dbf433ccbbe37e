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


def _package_elsewhere():
    """The spec of another package named `kernels` on sys.path when this folder is imported under that
    bare name, else None.

    This folder is zppo_fast.kernels. It is found as the bare `kernels` only when the checkout's root is
    on sys.path (python -m from the root, the bench scripts), and that name is a PyPI package which
    transformers imports as its models load (a dependency from 5.25 on, and GPU users install it for
    transformers' hub kernels): that import gets the package. Without one, transformers still probes
    the name and finds this folder, which then imports as itself, as it always has.
    """
    if __name__ != "kernels":
        return None
    import importlib.machinery
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != root])


_elsewhere = _package_elsewhere()
if _elsewhere is not None:
    import importlib.util
    import sys

    _module = importlib.util.module_from_spec(_elsewhere)
    sys.modules["kernels"] = _module  # what the import statement hands out once this file has run
    _elsewhere.loader.exec_module(_module)
else:
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
