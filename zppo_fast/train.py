"""`python -m zppo_fast.train [--config FILE] [--resume RUN_DIR] [--section.key VALUE ...]`

The RL trainer. One rollout step, read top to bottom in `Trainer.step`:

  1. questions   B_new new question ids from the training stream.
  2. rollouts    G_S samples per question from the rollout engine (temperature 1, top-p 1).
  3. rewards     r in {0, 1}: the last \\boxed{} answer graded against the gold answer.
  4. advantages  A' = r - mean(group); then, by `rl.advantage_mode`, normalized over the
                 rollout batch without the all-equal groups (REINFORCE++ "Norm w/o Zero",
                 default), with them, not at all, or by the group's std (GRPO).
  5. old log-probs  recomputed by the trainer, under the weights that sampled.
  6. update      the batch is split into I mini-batches of whole groups: I AdamW steps, one pass.
                 Token-level clipped surrogate (clip-higher eps_low 0.2 / eps_high 0.28,
                 dual-clip 10 for A < 0), no KL, token-mean whose normalizer is the token count
                 of the whole optimizer step, so micro-batching and ranks do not change it.

The policy loss runs through `zppo_fast.kernels.fused_linear_policy_loss`: the model returns
hidden states and the lm_head weight goes into the fused loss, so no [tokens, vocab] logits
are ever held. Checkpoints every `run.checkpoint_every` steps; `--resume` continues exactly.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from zppo_fast.batch import RolloutBatch, Rollout
from zppo_fast.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from zppo_fast.config import Config, ConfigError, load_config
from zppo_fast.data import QuestionStream, chat_prompt_ids
from zppo_fast.engine import SamplingParams, TransformersEngine
from zppo_fast.eval import accuracy
from zppo_fast.kernels import fused_linear_policy_loss, linear_logprobs, normalize_advantages
from zppo_fast.metrics import MetricsLogger, peak_memory_mb
from zppo_fast.model import load_model
from zppo_fast.reward import grade
from zppo_fast.sft import warm_start
from zppo_fast.task import ArithmeticTask


class Trainer:
    def __init__(self, cfg: Config, resume: str | Path | None = None, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if cfg.run.device == "auto" else cfg.run.device
        )
        torch.manual_seed(cfg.run.seed)
        torch.set_flush_denormal(True)  # Gated-DeltaNet decays underflow; denormals slow CPUs 10x

        # 1. The run folder holds the config, metrics.jsonl and checkpoints.
        self.run_dir = Path(resume if resume is not None else cfg.run.out_dir)
        if resume is None:
            if (self.run_dir / "checkpoints").exists() and not cfg.run.overwrite:
                raise ConfigError(
                    f"run folder {self.run_dir} already holds checkpoints: pass --resume {self.run_dir}, "
                    "choose another --run.out_dir, or set --run.overwrite true"
                )
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir.mkdir(parents=True)
            (self.run_dir / "config.json").write_text(cfg.to_json())

        # 2. The task and the stream of training questions; the held-out questions for evaluation.
        self.task = ArithmeticTask(**vars(cfg.task))
        self.stream = QuestionStream(self.task.train_ids(), seed=cfg.run.seed)
        self.heldout = [self.task.problem(q) for q in self.task.heldout_ids()[: cfg.run.eval_size]]

        # 3. The student: a checkpoint being resumed, a Hugging Face folder, or the cached warm-up.
        self.step_idx, state = 0, None
        if resume is not None:
            self.model, self.tokenizer, state = load_checkpoint(self.run_dir, cfg.model.dtype)
        elif cfg.model.path is not None:
            self.model, self.tokenizer = load_model(cfg.model.path, cfg.model.dtype)
        else:
            self.model, self.tokenizer, _ = warm_start(cfg.model, cfg.task, cfg.sft, cfg.run.seed, progress)
        self.model.to(self.device).train()

        # 4. The rollout engine samples from the very weights being trained (shared module).
        self.engine = TransformersEngine(self.model, self.tokenizer, batch_size=cfg.rollout.batch_size)

        # 5. AdamW over all parameters, constant learning rate.
        rl = cfg.rl
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=rl.lr, betas=(rl.adam_beta1, rl.adam_beta2), eps=rl.adam_eps,
            weight_decay=rl.weight_decay,
        )

        # 6. On resume: optimizer, data position, RNG and step, exactly as they were saved.
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.stream.load_state_dict(state["data"])
            set_rng_state(state["rng"])
            self.step_idx = state["step"]
        self.metrics = MetricsLogger(self.run_dir, cfg.run.tensorboard, resume_step=self.step_idx if state else None)

    # ---------------------------------------------------------------- one rollout step
    def step(self) -> dict[str, float]:
        cfg, t = self.cfg, {}
        self.step_idx += 1

        # 1-3. Questions, rollouts, rewards.
        t0 = time.perf_counter()
        problems = [self.task.problem(q) for q in self.stream.next_batch(cfg.rl.batch_size)]
        batch, samples = self.rollout(problems)
        t["time/rollout"] = time.perf_counter() - t0

        # 4. Advantages over the whole rollout batch, one rollout each.
        advantages = normalize_advantages(
            batch.rewards, batch.group_ids, mode=cfg.rl.advantage_mode, eps=cfg.rl.advantage_eps
        )

        # 5. Old log-probs (and entropy, for metrics) under the sampling weights.
        t0 = time.perf_counter()
        old_logprobs, entropy = self.logprobs(batch)
        t["time/old_logprobs"] = time.perf_counter() - t0

        # 6. I optimizer steps, one per mini-batch of whole groups.
        t0 = time.perf_counter()
        stats = self.update(batch, old_logprobs, advantages)
        t["time/update"] = time.perf_counter() - t0

        return {**self.rollout_metrics(batch, samples, entropy), **stats, **t,
                "perf/tokens_per_s": batch.response_tokens() / max(sum(t.values()), 1e-9),
                "perf/peak_memory_mb": peak_memory_mb(self.device)}

    def rollout(self, problems) -> tuple[RolloutBatch, list]:
        """G_S samples per problem, graded; group g = the g-th problem of the step."""
        cfg = self.cfg
        prompts = [chat_prompt_ids(self.tokenizer, p.question) for p in problems]
        params = SamplingParams(n=cfg.rl.group_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.run.seed * 1_000_003 + self.step_idx)
        groups = self.engine.generate(prompts, params)
        batch = RolloutBatch([Rollout(prompt, s.token_ids, grade(s.text, p.answer), g)
                              for g, (prompt, p, group) in enumerate(zip(prompts, problems, groups)) for s in group])
        return batch, [s for group in groups for s in group]

    def _hidden(self, input_ids: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (N, H) of the positions that predict response tokens, and those tokens (N,)."""
        hidden = self.model.get_decoder()(input_ids=input_ids.to(self.device)).last_hidden_state[:, :-1]
        mask = target_mask.to(self.device)
        return hidden[mask], input_ids[:, 1:].to(self.device)[mask]

    @property
    def lm_head(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight  # (V, H)

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> tuple[list[torch.Tensor], float]:
        """Per-rollout token log-probs [(len_i,)] under the current weights, and the mean entropy."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        entropy_sum = 0.0
        rows = list(range(len(batch)))
        for mb in batch.microbatches(rows, self.cfg.rl.micro_batch_size, self.tokenizer.pad_token_id):
            h, targets = self._hidden(mb.input_ids, mb.target_mask)
            logp, ent = linear_logprobs(h, self.lm_head, targets, temperature=self.cfg.rollout.temperature or 1.0,
                                        return_entropy=True)
            entropy_sum += ent.sum().item()
            for i, chunk in zip(mb.rows, logp.split(mb.target_mask.sum(1).tolist())):
                out[i] = chunk.float()
        return out, entropy_sum / max(batch.response_tokens(), 1)

    def backward_minibatch(self, batch: RolloutBatch, rows: list[int], old_logprobs, advantages) -> dict:
        """Accumulate the gradient of one optimizer step's loss over micro-batches of `rows`.

        The normalizer is the token count of all `rows`, so the gradient is the same however
        the rows are split into micro-batches. Returns the summed loss statistics.
        """
        cfg = self.cfg.rl
        normalizer = float(batch.response_tokens(rows))
        totals: dict[str, float] = {}
        for mb in batch.microbatches(rows, cfg.micro_batch_size, self.tokenizer.pad_token_id):
            h, targets = self._hidden(mb.input_ids, mb.target_mask)
            old = torch.cat([old_logprobs[i] for i in mb.rows]).to(self.device)
            adv = torch.cat([advantages[i].expand(len(old_logprobs[i])) for i in mb.rows]).to(self.device)
            loss, stats = fused_linear_policy_loss(
                h, self.lm_head, targets, old, adv, torch.ones_like(adv, dtype=torch.bool),
                eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip,
                temperature=self.cfg.rollout.temperature or 1.0, normalizer=normalizer,
            )
            loss.backward()
            for k, v in {"loss": loss.detach() * normalizer, **stats}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return totals

    def update(self, batch: RolloutBatch, old_logprobs, advantages: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg.rl
        totals: dict[str, float] = {}
        grad_norms = []
        for rows in batch.minibatches(cfg.num_minibatches):
            for k, v in self.backward_minibatch(batch, rows, old_logprobs, advantages).items():
                totals[k] = totals.get(k, 0.0) + v
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        n = max(totals.get("tokens", 0.0), 1.0)
        return {
            "loss/policy": totals.get("loss", 0.0) / n,
            "loss/clip_frac_low": totals.get("clip_low", 0.0) / n,
            "loss/clip_frac_high": totals.get("clip_high", 0.0) / n,
            "loss/dual_clip_frac": totals.get("dual_clip", 0.0) / n,
            "loss/ratio_mean": totals.get("ratio", 0.0) / n,
            "loss/approx_kl": totals.get("approx_kl", 0.0) / n,
            "loss/grad_norm": sum(grad_norms) / len(grad_norms),
        }

    def rollout_metrics(self, batch: RolloutBatch, samples, entropy: float) -> dict[str, float]:
        g = self.cfg.rl.group_size
        rewards = batch.rewards.view(-1, g)  # (groups, G_S)
        return {
            "reward/mean": rewards.mean().item(),
            "reward/all_wrong_frac": (rewards.sum(1) == 0).float().mean().item(),
            "reward/all_correct_frac": (rewards.sum(1) == g).float().mean().item(),
            "rollout/response_len": batch.response_tokens() / len(batch),
            "rollout/truncated_frac": sum(s.finish_reason == "length" for s in samples) / len(samples),
            "rollout/entropy": entropy,
        }

    # ---------------------------------------------------------------- the run
    def evaluate(self) -> float:
        params = SamplingParams(temperature=0.0, max_new_tokens=self.cfg.rollout.max_new_tokens)
        return accuracy(self.engine, self.tokenizer, self.heldout, params)

    def save(self) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "data": self.stream.state_dict()}
        return save_checkpoint(self.run_dir, self.step_idx, self.model, self.tokenizer, state)

    def fit(self) -> list[dict]:
        cfg, history = self.cfg.run, []
        print(f"zppo_fast: run folder {self.run_dir}, device {self.device}, "
              f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters")
        if self.step_idx == 0 and cfg.eval_every > 0:
            acc = self.evaluate()
            self.metrics.log(0, {"eval/heldout_acc": acc})
            print(f"step 0: held-out accuracy {acc:.3f}")
        bar = tqdm(range(self.step_idx, cfg.steps), initial=self.step_idx, total=cfg.steps, desc="rl",
                   disable=not self.progress, dynamic_ncols=True)
        for _ in bar:
            metrics = self.step()
            if cfg.eval_every > 0 and (self.step_idx % cfg.eval_every == 0 or self.step_idx == cfg.steps):
                metrics["eval/heldout_acc"] = self.evaluate()
                tqdm.write(f"step {self.step_idx}: held-out accuracy {metrics['eval/heldout_acc']:.3f}")
            self.metrics.log(self.step_idx, metrics)
            history.append(metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['loss/approx_kl']:.4f}")
            if self.step_idx % cfg.checkpoint_every == 0 or self.step_idx == cfg.steps:
                self.save()
        self.metrics.close()
        return history


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = config_file = None
    for flag in ("--resume", "--config"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                raise SystemExit(f"{flag} needs a value")
            value = argv.pop(i + 1)
            argv.pop(i)
            resume, config_file = (value, config_file) if flag == "--resume" else (resume, value)
    try:
        if resume is not None:
            saved = Path(resume) / "config.json"
            if not saved.is_file():
                raise ConfigError(f"--resume {resume}: no config.json there, not a run folder")
            cfg = load_config(None, [f"--{s}.{k}={v}" for s, part in json.loads(saved.read_text()).items()
                                     for k, v in part.items()] + argv)
        else:
            cfg = load_config(config_file, argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    print(cfg.to_json())
    Trainer(cfg, resume=resume).fit()


if __name__ == "__main__":
    main()
