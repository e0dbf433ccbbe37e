"""zppo_fast against TRL's GRPOTrainer, end to end: seconds per rollout step on the same model, prompts and settings.

Both train the same local model folder, built here: a tiny Qwen3.5 (hidden 128, 4 layers: 3
Gated DeltaNet + 1 full attention, about 0.9M parameters) with a character-level tokenizer (the
byte-level BPE of zppo_fast/tokenizer.py with no merges, so one token per character), on the same
prompts: "a+b=?" followed by the paper's closing instruction in the chat template (about 240
tokens). Each rollout step samples `--group` completions of at most `--new-tokens` tokens for each
of `--prompts` prompts, grades them (the last \\boxed{} answer), and takes ONE optimizer step on
all of them (TRL: num_iterations 1, steps_per_generation 1; zppo_fast: rl.algo grpo,
rl.num_minibatches 1), with `--threads` intra-op threads each. No KL term (TRL's beta 0, its
default), fp32, no gradient checkpointing (TRL's default is on; zppo_fast's is off), no
evaluation, no checkpoints. Everything else is each trainer's default (TRL: its generation
through transformers' generate with the trained model; zppo_fast: its own engine, then the weight
push into it).

Each trainer runs in a process of its own (bench/alternate.py), and their steps alternate in one
run; after `--warmup` untimed steps each, the medians of `--steps` steps are reported, with
zppo_fast's per-phase split (its own `time/*` metrics: rollout = generation + grading, old
log-probs, update; "other" = the rest of its step: advantages, weight push). The ratio is
zppo_fast's median over TRL's.

    python bench/bench_vs_trl.py [--steps 5] [--warmup 1] [--threads N] [--record]
    python bench/bench_vs_trl.py --profile    # + one profiled step of each: the top ops by self CPU time
    python bench/bench_vs_trl.py --quick      # smoke test: tiny sizes, 1 warm-up + 1 step
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from alternate import StepWorker, alternate, median, print_profiles, trainer_worker
from results import cpu_name, git_commit, record_section

CHAR_VOCAB = 3 + 256  # the tokenizer's special tokens + the byte alphabet: no merges
PAIRS = [(3, 4), (12, 30), (7, 8), (25, 17), (9, 9), (41, 6), (5, 38), (16, 23)]  # a+b, the prompts' operands


def build_model_folder(folder: Path, hidden: int) -> int:
    """Save the tiny Qwen3.5 and its character tokenizer to `folder`; returns its parameter count."""
    from zppo_fast import prompts
    from zppo_fast.config import ModelConfig
    from zppo_fast.model import build_tiny_model, save_model
    from zppo_fast.tokenizer import build_tokenizer

    tokenizer = build_tokenizer([prompts.CLOSING_INSTRUCTION], vocab_size=CHAR_VOCAB)
    model = build_tiny_model(ModelConfig(hidden_size=hidden, num_layers=4), tokenizer, seed=0)
    save_model(model, tokenizer, folder)
    return sum(p.numel() for p in model.parameters())


def questions(n: int) -> list[tuple[str, str]]:
    """(question, answer) pairs: "a+b=?" and a + b, cycling over PAIRS."""
    pairs = [PAIRS[i % len(PAIRS)] for i in range(n)]
    return [(f"{a}+{b}=?", str(a + b)) for a, b in pairs]


def write_setting(folder: Path, hidden: int, prompts: int, group: int, new_tokens: int) -> tuple[int, list[str]]:
    """The model (`folder`/model) and the questions (`folder`/train.jsonl) of the comparison, and
    zppo_fast's config overrides for it (no run.out_dir, no run.cpu_threads); returns the model's
    parameter count and the overrides."""
    params = build_model_folder(folder / "model", hidden)
    data_file = folder / "train.jsonl"
    data_file.write_text("".join(json.dumps({"id": str(i), "question": q, "answer": a}) + "\n"
                                 for i, (q, a) in enumerate(questions(prompts))))
    return params, [
        "--model.path", str(folder / "model"), "--data.train", str(data_file), "--rl.algo", "grpo",
        "--rl.batch_size", str(prompts), "--rl.group_size", str(group), "--rl.num_minibatches", "1",
        "--rollout.max_new_tokens", str(new_tokens), "--run.overwrite", "true", "--run.tensorboard", "false",
        "--run.eval_every", "0"]


# ----------------------------------------------------------------------------- the workers
def trl_worker(conn, folder: str, run_dir: str, settings: dict, total_steps: int) -> None:
    """TRL owns its training loop: a callback waits for each command at the start of a step and
    answers at its end. The driver sends exactly `total_steps` step commands, then "stop"."""
    import torch
    from datasets import Dataset
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alternate import top_ops
    from zppo_fast.prompts import with_closing
    from zppo_fast.reward import final_answer

    torch.set_num_threads(settings["threads"])
    qa = questions(settings["prompts"])
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": with_closing(q)}] for q, _ in qa],
                                 "answer": [a for _, a in qa]})

    def boxed_reward(completions, answer, **_) -> list[float]:
        return [float(final_answer(c[0]["content"]) == a) for c, a in zip(completions, answer)]

    class Stepper(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.profiler = None
            command = conn.recv()
            if command == "stop":  # the driver gave up early (an error elsewhere): end without training on
                conn.send("stopped")
                raise SystemExit(0)
            if command == "profile":
                self.profiler = profile(activities=[ProfilerActivity.CPU])
                self.profiler.__enter__()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            out = {"step": time.perf_counter() - self.t0}
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                out["profile"] = top_ops(self.profiler)
            conn.send(out)

    n = settings["prompts"] * settings["group"]
    config = GRPOConfig(
        output_dir=run_dir, use_cpu=True, bf16=False, max_steps=total_steps, per_device_train_batch_size=n,
        num_generations=settings["group"], max_completion_length=settings["new_tokens"], num_iterations=1,
        steps_per_generation=1, gradient_accumulation_steps=1, gradient_checkpointing=False, beta=0.0,
        epsilon=0.2, epsilon_high=0.28, learning_rate=3e-4, logging_steps=10**6, save_strategy="no",
        report_to="none", seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=folder, reward_funcs=boxed_reward, args=config, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(folder), callbacks=[Stepper()])
    trainer.train()
    if conn.recv() == "stop":
        conn.send("stopped")


# ----------------------------------------------------------------------------- the driver
def table(timed: dict[str, list[dict]]) -> str:
    trl, zppo = timed["TRL GRPOTrainer"], timed["zppo_fast"]
    t, z = median(trl, "step"), median(zppo, "step")
    phases = {k: median(zppo, k) for k in ("rollout", "old_logprobs", "update")}
    other = statistics.median(r["step"] - sum(r.get(k, 0.0) for k in phases) for r in zppo)  # per step, then median
    rng = lambda rows: f"{min(r['step'] for r in rows):.2f}-{max(r['step'] for r in rows):.2f}"  # noqa: E731
    return "\n".join([
        "| trainer | step (s), median | range | rollout | old log-probs | update | other | ratio to TRL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| TRL GRPOTrainer | {t:.3f} | {rng(trl)} | | | | | 1.00 |",
        f"| zppo_fast | {z:.3f} | {rng(zppo)} | {phases['rollout']:.3f} | {phases['old_logprobs']:.3f} | "
        f"{phases['update']:.3f} | {other:.3f} | {z / t:.2f} |",
    ])


def main() -> None:
    import torch

    from zppo_fast.config import RunConfig
    from zppo_fast.data import chat_prompt_ids
    from zppo_fast.model import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per trainer (medians over these)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer first")
    ap.add_argument("--threads", type=int, default=RunConfig().cpu_threads,
                    help="intra-op threads of both (default: zppo_fast's run.cpu_threads default)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, one profiled step of each; print their top ops")
    ap.add_argument("--profile-out", help="also write the profile tables to this file")
    ap.add_argument("--quick", action="store_true", help="smoke test: hidden 32, 2 prompts x 2, 4 tokens, 1+1 steps")
    ap.add_argument("--record", action="store_true", help="write the table to bench/RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.prompts, args.group, args.new_tokens, args.hidden = 1, 1, 2, 2, 4, 32
    settings = {"threads": args.threads, "prompts": args.prompts, "group": args.group, "new_tokens": args.new_tokens}

    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        tmp = Path(tmp)
        folder = tmp / "model"
        params, overrides = write_setting(tmp, args.hidden, args.prompts, args.group, args.new_tokens)
        overrides += ["--run.cpu_threads", str(args.threads), "--run.out_dir", str(tmp / "zppo")]
        prompt_tokens = len(chat_prompt_ids(load_tokenizer(folder), questions(1)[0][0]))
        total = args.warmup + args.steps + args.profile
        workers = [StepWorker("TRL GRPOTrainer", trl_worker, str(folder), str(tmp / "trl"), settings, total),
                   StepWorker("zppo_fast", trainer_worker, overrides)]
        try:
            timed = alternate(workers, args.warmup, args.steps)
            profiles = {w.name: w.step(profile=True)["profile"] for w in workers} if args.profile else {}
        finally:
            for w in workers:
                w.close()

    import trl

    command = "python bench/bench_vs_trl.py " + " ".join(sys.argv[1:])
    header = (
        f"Device: {cpu_name()} ({os.cpu_count()} cores), CPU only, {args.threads} intra-op thread(s) each. "
        f"Date: {datetime.date.today().isoformat()}. Commit: {git_commit()}. torch {torch.__version__}, "
        f"TRL {trl.__version__}.\n"
        f"Command: `{command.strip()}`. Tiny Qwen3.5 (hidden {args.hidden}, 4 layers, {params / 1e6:.2f}M "
        f"parameters, character tokenizer), {args.prompts} prompts x {args.group} completions, at most "
        f"{args.new_tokens} new tokens, prompts of {prompt_tokens} tokens; one optimizer step per rollout step, "
        f"fp32, no KL, no gradient checkpointing. Each trainer in its own process, steps alternated; medians of "
        f"{args.steps} steps after {args.warmup} warm-up step(s). zppo_fast's phases are its own time/* metrics "
        f"(rollout includes grading; other = advantages + weight push).\n")
    text = header + "\n" + table(timed)
    print(text)
    print_profiles(profiles, args.profile_out)
    if args.record:
        record_section("End to end against TRL's GRPOTrainer (CPU)", text)


if __name__ == "__main__":
    main()
