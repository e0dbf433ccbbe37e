"""TRL's GRPOTrainer with zppo_fast's fused lm_head + policy loss in place of its own.

`FusedLossGRPOTrainer` overrides `GRPOTrainer._compute_loss` (the hook `compute_loss` calls in
TRL 1.x): the model returns its last hidden states at the completion positions and
`FusedLinearPolicyLoss` computes the log-probs, the clipped surrogate, the KL to TRL's reference
log-probs and the loss_type's normalisation in one memory-bounded pass (no [B, T, V] logits).
Everything else (generation, rewards, advantages, reference model, optimizer) is TRL's.

Normalisers, so the gradients equal TRL's: "grpo" / "bnpo" / "dr_grpo" divide by the gradient
accumulation steps, as TRL does; "dapo" gets TRL's `num_items_in_batch` rescaled to one
accumulation window (the module divides it by the world size, as TRL divides by num_processes).

Run: `python examples/trl_grpo.py` (two steps on a tiny Qwen3.5 built in-process, CPU).
"""

from __future__ import annotations

import functools
import tempfile
import types
from pathlib import Path

import torch
from trl import GRPOConfig, GRPOTrainer

from zppo_fast.kernels import FusedLinearPolicyLoss


def add_hidden_states_forward(model) -> None:
    """`model(..., hidden_states_only=True)` returns the backbone's last hidden states [B, L, H]
    (no lm_head). Installed on the instance, as TRL installs its fused lm_head, so a DDP / FSDP
    wrapper's forward still runs around it; other calls go to the previous forward."""
    previous = model.forward

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against this signature
    def forward(self, *args, hidden_states_only=False, **kwargs):
        if not hidden_states_only:
            return previous(*args, **kwargs)
        return self.base_model(*args, use_cache=False, **kwargs).last_hidden_state

    model.forward = types.MethodType(forward, model)


class FusedLossGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is `FusedLinearPolicyLoss` (loss types grpo, bnpo, dr_grpo, dapo)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        unsupported = {
            "top_entropy_quantile < 1": a.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": a.off_policy_mask_threshold is not None,
            "entropy_coef / use_adaptive_entropy": self._entropy_bonus_enabled,
            "importance_sampling_level='sequence'": a.importance_sampling_level != "token",
            "an MoE router aux loss": self.aux_loss_enabled,
        }
        used = [k for k, on in unsupported.items() if on]
        if used:
            raise ValueError(f"FusedLossGRPOTrainer does not implement: {', '.join(used)}; use GRPOTrainer for these")
        self.fused_loss = FusedLinearPolicyLoss(
            beta=self.beta,
            use_ref_model=self.beta != 0.0,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            loss_type=self.loss_type,
            max_completion_length=self.max_completion_length,
            temperature=self.temperature,
            delta=a.delta,
            use_bias_correction_kl=a.use_bias_correction_kl,
        )
        add_hidden_states_forward(self.accelerator.unwrap_model(self.model))

    def _compute_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        n = completion_ids.size(1)
        with self.accelerator.autocast():
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, hidden_states_only=True)
        hidden = hidden[:, -n - 1 : -1]  # the state at position t predicts token t + 1
        lm_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        train = self.model.training
        accum = self.current_gradient_accumulation_steps if train else 1
        num_items = None
        if self.loss_type == "dapo":
            num_items = inputs["num_items_in_batch"].float()
            if train:
                num_items = num_items * accum / self.args.steps_per_generation
        is_ratio = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"]
        loss, metrics = self.fused_loss(
            hidden,
            lm_head.weight,
            completion_ids,
            mask,
            inputs["advantages"],
            lm_head.bias,
            inputs.get("ref_per_token_logps"),
            inputs.get("old_per_token_logps"),
            vllm_is_ratio=is_ratio,
            num_items_in_batch=num_items,
        )
        mode = "train" if train else "eval"
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(self.accelerator.gather(metrics[0]).mean().item())
        self._metrics[mode]["clip_ratio/region_mean"].append(self.accelerator.gather(metrics[-1]).mean().item())
        return loss if self.loss_type == "dapo" else loss / accum


# ----------------------------------------------------------------------------- the tiny demo
PROMPTS = [f"What is {a} + {b}?" for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (9, 9))]


def digit_reward(completions, **_) -> list[float]:
    """A toy reward with spread: the number of distinct digits in the completion."""
    return [float(len({c for c in text if c.isdigit()})) for text in completions]


def build_tiny_checkpoint(folder: str | Path) -> str:
    """Save a tiny random Qwen3.5 and its in-process tokenizer to `folder` (TRL builds its
    reference model from the policy's path, so the model goes through a folder)."""
    from zppo_fast.config import ModelConfig
    from zppo_fast.data import tokenizer_corpus
    from zppo_fast.model import build_tiny_model, save_model
    from zppo_fast.task import ArithmeticTask
    from zppo_fast.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_corpus(ArithmeticTask(), size=300) + PROMPTS, vocab_size=300)
    model = build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer, seed=0)
    save_model(model, tokenizer, folder)
    return str(folder)


def make_trainer(checkpoint: str, out_dir: str, trainer_cls=FusedLossGRPOTrainer, **config) -> GRPOTrainer:
    """A CPU GRPO run of two optimizer steps: 4 prompts x 4 completions of up to 8 tokens; the
    batch is used twice (num_iterations=2) so the second step is off-policy and the ratio clips."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    settings = {
        "output_dir": out_dir,
        "use_cpu": True,
        "bf16": False,  # TRL's default is bf16 autocast; fp32 on the CPU, so the test compares at fp32 precision
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 8,
        "num_iterations": 2,
        "learning_rate": 5e-3,
        "beta": 0.04,
        "loss_type": "dapo",
        "epsilon_high": 0.28,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    settings.update(config)
    return trainer_cls(
        model=checkpoint,
        reward_funcs=digit_reward,
        args=GRPOConfig(**settings),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=AutoTokenizer.from_pretrained(checkpoint),
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(build_tiny_checkpoint(Path(tmp) / "tiny"), str(Path(tmp) / "run"))
        trainer.train()
        for row in trainer.state.log_history:
            print(row)


if __name__ == "__main__":
    main()
