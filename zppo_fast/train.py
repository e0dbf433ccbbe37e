"""`python -m zppo_fast.train [--config FILE] [--resume RUN_DIR] [--section.key VALUE ...]`

The RL trainer for ZPPO and its baselines (`rl.algo`, see zppo_fast/zppo.py). One rollout
step, read top to bottom in `Trainer.step`:

  1. questions   B_new new question ids from the training stream, plus round(rho_replay * B_new)
                 drawn uniformly from the replay buffer (algos with a buffer).
  2. rollouts    G_S samples per question from the rollout engine (temperature 1, top-p 1);
                 reward r in {0, 1}: the last \\boxed{} answer graded against the gold answer.
  3. reformulate hard questions (accuracy < 0.5) get G_T fresh teacher rollouts; compressed
                 candidates make BCQ / NCQ prompts (capped at rho_aug * B_new, lowest accuracy
                 first); the student samples G_S rollouts on each, as groups of their own.
  4. advantages  A' = r - mean(group); then, by `rl.advantage_mode`, normalized over the
                 rollout batch without the all-equal groups (REINFORCE++ "Norm w/o Zero",
                 default), with them, not at all, or by the group's std (GRPO).
  5. old log-probs  recomputed by the trainer, under the weights that sampled.
  6. update      the batch is split into I mini-batches of whole groups: I AdamW steps, one pass.
                 Token-level clipped surrogate (clip-higher eps_low 0.2 / eps_high 0.28,
                 dual-clip 10 for A < 0), no KL, token-mean whose normalizer is the token count
                 of the whole optimizer step, so micro-batching and ranks do not change it.
                 Only the student's own completion tokens are in the loss mask.
  7. replay      plain-rollout accuracies admit (< 0.5) and graduate (>= 0.5) buffer entries.

The policy loss runs through `zppo_fast.kernels.fused_linear_policy_loss`: the model returns
hidden states and the lm_head weight goes into the fused loss, so no [tokens, vocab] logits
are ever held. Checkpoints every `run.checkpoint_every` steps; `--resume` continues exactly.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import replace
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
from zppo_fast.replay import PromptReplayBuffer
from zppo_fast.report import write_report
from zppo_fast.reward import final_answer, grade
from zppo_fast.sft import warm_start
from zppo_fast.task import ArithmeticTask
from zppo_fast.zppo import ALGOS, Reformulator, aug_cap, replay_count


class Trainer:
    def __init__(self, cfg: Config, resume: str | Path | None = None, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if cfg.run.device == "auto" else cfg.run.device
        )
        torch.manual_seed(cfg.run.seed)
        torch.set_flush_denormal(True)  # Gated-DeltaNet decay products underflow into slow denormals
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.run.cpu_threads)
        if cfg.rl.algo not in ALGOS:
            raise ConfigError(f"rl.algo must be one of {', '.join(ALGOS)}, got {cfg.rl.algo!r}")
        self.algo = ALGOS[cfg.rl.algo]

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
        # A seeded sample, not a prefix: consecutive ids are one fact in its 24 wordings.
        heldout = self.task.heldout_ids()
        self.heldout = [self.task.problem(q) for q in
                        sorted(random.Random(cfg.run.seed).sample(heldout, min(cfg.run.eval_size, len(heldout))))]

        # 3. The frozen teacher (algos with BCQ/NCQ): a Hugging Face folder, or the tiny student
        #    architecture with a longer warm-up whose early snapshot is the student.
        self.reformulator = None
        if self.algo.kinds:
            if cfg.zppo.teacher_path is not None:
                teacher, teacher_tok = load_model(cfg.zppo.teacher_path, cfg.model.dtype)
            else:
                teacher_sft = replace(cfg.sft, steps=cfg.zppo.teacher_sft_steps)
                teacher, teacher_tok, _ = warm_start(cfg.model, cfg.task, teacher_sft, cfg.run.seed, progress,
                                                     snapshots=(cfg.sft.steps,))
            teacher.to(self.device).eval().requires_grad_(False)
            self.reformulator = Reformulator(TransformersEngine(teacher, teacher_tok, cfg.rollout.batch_size),
                                             teacher_tok, cfg.zppo, self.algo.kinds, seed=cfg.run.seed)

        # 4. The student: a checkpoint being resumed, a Hugging Face folder, or the cached warm-up.
        self.step_idx, state = 0, None
        if resume is not None:
            self.model, self.tokenizer, state = load_checkpoint(self.run_dir, cfg.model.dtype)
        elif cfg.model.path is not None:
            self.model, self.tokenizer = load_model(cfg.model.path, cfg.model.dtype)
        else:
            self.model, self.tokenizer, _ = warm_start(cfg.model, cfg.task, cfg.sft, cfg.run.seed, progress)
        self.model.to(self.device).train()

        # 5. The rollout engine samples from the very weights being trained (shared module).
        self.engine = TransformersEngine(self.model, self.tokenizer, batch_size=cfg.rollout.batch_size)

        # 6. AdamW over all parameters, constant learning rate.
        rl = cfg.rl
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=rl.lr, betas=(rl.adam_beta1, rl.adam_beta2), eps=rl.adam_eps,
            weight_decay=rl.weight_decay,
        )

        # 7. The prompt replay buffer of hard questions (algos with a buffer).
        self.buffer = None
        if self.algo.replay:
            self.buffer = PromptReplayBuffer(cfg.zppo.replay_capacity, seed=cfg.run.seed,
                                             threshold=cfg.zppo.hard_threshold)

        # 8. On resume: optimizer, data position, buffer, RNG and step, exactly as they were saved.
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.stream.load_state_dict(state["data"])
            if self.buffer is not None:
                self.buffer.load_state_dict(state["replay"])
            set_rng_state(state["rng"])
            self.step_idx = state["step"]
        self.metrics = MetricsLogger(self.run_dir, cfg.run.tensorboard, resume_step=self.step_idx if state else None)

    # ---------------------------------------------------------------- one rollout step
    def step(self) -> dict[str, float]:
        cfg, t, m = self.cfg, {}, {}
        self.step_idx += 1
        b_new = cfg.rl.batch_size

        # 1. Questions: new ones, plus replayed hard ones (sampled without removal).
        new = self.stream.next_batch(b_new)
        replayed = []
        if self.buffer is not None:
            replayed = [int(q) for q in self.buffer.sample(replay_count(b_new, cfg.zppo.rho_replay)) if q not in new]
        problems = [self.task.problem(q) for q in new + replayed]

        # 2. Plain rollouts, graded; group g is the g-th question.
        t0 = time.perf_counter()
        batch, samples = self.rollout([p.question for p in problems], problems, first_group=0)
        g_s = cfg.rl.group_size
        rewards = [[r.reward for r in batch.rollouts[i * g_s : (i + 1) * g_s]] for i in range(len(problems))]
        accuracy = [sum(r) / g_s for r in rewards]
        t["time/rollout"] = time.perf_counter() - t0

        # 3. Reformulations: teacher rollouts on the hard questions, BCQ / NCQ prompts, and the
        #    student's rollouts on them as groups of their own.
        if self.reformulator is not None:
            t0 = time.perf_counter()
            texts = [[s.text for s in samples[i * g_s : (i + 1) * g_s]] for i in range(len(problems))]
            reforms, zm = self.reformulator(problems, texts, rewards, aug_cap(b_new, cfg.zppo.rho_aug), self.step_idx)
            t["time/teacher"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            extra, extra_samples = self.rollout([r.text for r in reforms], [problems[r.question] for r in reforms],
                                                first_group=len(problems))
            t["time/rollout"] += time.perf_counter() - t0
            m.update(zm)
            m.update(self.reformulation_metrics(reforms, extra, extra_samples))
            batch.rollouts += extra.rollouts

        # 4. Advantages over the whole rollout batch, one per rollout.
        advantages = normalize_advantages(
            batch.rewards, batch.group_ids, mode=cfg.rl.advantage_mode, eps=cfg.rl.advantage_eps
        )

        # 5. Old log-probs (and entropy, for metrics) under the sampling weights.
        t0 = time.perf_counter()
        old_logprobs, entropy = self.logprobs(batch)
        t["time/old_logprobs"] = time.perf_counter() - t0

        # 6. I optimizer steps, one per mini-batch of whole groups.
        t0 = time.perf_counter()
        m.update(self.update(batch, old_logprobs, advantages))
        t["time/update"] = time.perf_counter() - t0

        # 7. The replay buffer learns from the plain rollouts only.
        if self.buffer is not None:
            u = self.buffer.update([p.id for p in problems], accuracy, self.step_idx)
            m.update({"replay/size": len(self.buffer), "replay/admitted": len(u.admitted),
                      "replay/graduated": len(u.graduated), "replay/evicted": len(u.evicted),
                      "replay/replayed": len(replayed)})

        return {**m, **self.rollout_metrics(batch, accuracy, samples, entropy), **t,
                "perf/student_tokens": batch.response_tokens(),
                "perf/tokens_per_s": batch.response_tokens() / max(sum(t.values()), 1e-9),
                "perf/peak_memory_mb": peak_memory_mb(self.device)}

    def rollout(self, prompt_texts: list[str], problems, first_group: int) -> tuple[RolloutBatch, list]:
        """G_S graded samples per prompt; the k-th prompt is group `first_group + k`."""
        cfg = self.cfg
        prompts = [chat_prompt_ids(self.tokenizer, text) for text in prompt_texts]
        params = SamplingParams(n=cfg.rl.group_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens,
                                seed=(cfg.run.seed * 1_000_003 + self.step_idx) * 2 + (first_group > 0))
        groups = self.engine.generate(prompts, params) if prompts else []
        batch = RolloutBatch([Rollout(prompt, s.token_ids, grade(s.text, p.answer), first_group + g)
                              for g, (prompt, p, group) in enumerate(zip(prompts, problems, groups)) for s in group])
        return batch, [s for group in groups for s in group]

    def reformulation_metrics(self, reforms, batch: RolloutBatch, samples) -> dict[str, float]:
        g_s, out = self.cfg.rl.group_size, {}
        for kind in ("bcq", "ncq"):
            rows = [k * g_s + j for k, r in enumerate(reforms) if r.kind == kind for j in range(g_s)]
            if rows:
                out[f"zppo/{kind}_acc"] = sum(batch.rollouts[i].reward for i in rows) / len(rows)
                out[f"zppo/{kind}_copies_candidate"] = sum(
                    final_answer(samples[i].text) in reforms[i // g_s].candidate_answers for i in rows) / len(rows)
        return out

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

    def rollout_metrics(self, batch: RolloutBatch, accuracy: list[float], samples, entropy: float) -> dict[str, float]:
        rewards = batch.rewards.view(-1, self.cfg.rl.group_size)  # (groups, G_S), plain and reformulated
        return {
            "reward/mean": sum(accuracy) / len(accuracy),  # plain rollouts: the student's own accuracy
            "reward/all_wrong_frac": (rewards.amax(1) == 0).float().mean().item(),
            "reward/all_correct_frac": (rewards.amin(1) == 1).float().mean().item(),
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
        if self.buffer is not None:
            state["replay"] = self.buffer.state_dict()
            self.write_replay_telemetry()
        return save_checkpoint(self.run_dir, self.step_idx, self.model, self.tokenizer, state)

    def write_replay_telemetry(self) -> None:
        """replay_history.jsonl (one line per exit) and replay_live.jsonl, read by zppo_fast.report."""
        exits = [{"id": int(r["qid"]), "step_admitted": int(r["step_admitted"]), "acc_admitted": float(r["acc_admitted"]),
                  "exit_step": int(r["exit_step"]), "exit": "graduated" if r["graduated"] else "evicted",
                  "visits": int(r["visits"])} for r in self.buffer.history()]
        live = self.buffer.state_dict()["live"]
        alive = [{"id": int(q), "step_admitted": int(s), "acc_admitted": float(a), "visits": int(v)}
                 for q, s, a, v in zip(live["qid"], live["step_admitted"], live["acc_admitted"], live["visits"])]
        for name, rows in (("replay_history.jsonl", exits), ("replay_live.jsonl", alive)):
            tmp = self.run_dir / (name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.rename(self.run_dir / name)

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
        if self.buffer is not None and history:
            write_report(self.run_dir)
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
