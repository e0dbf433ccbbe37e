"""Each group's prompt computed once (issue 15): the update step and generation, shared against
computing the prompt for every sample, as ratios.

  update   `Trainer.logprobs` + `Trainer.update` (I = 4 AdamW steps) on one synthetic rollout batch
           of `--groups` groups x `--group-size` samples (one prompt of `--prompt-len` tokens per
           group, responses of 1..`--response-len` tokens), in three layouts: shared prefix
           (`parallel.share_prefix`), packed and padded (every sequence whole).
  generate the transformers engine's `generate` (n = group size, `--response-len` new tokens) with
           `prefill_once` on and off, and with its steps through the model's forward instead of the
           lean Qwen3.5 step (`lean_decode` off), same seed (so the same samples: the same decode
           work), and what a user would otherwise call: transformers' `model.generate` on the same
           left-padded prompts (num_return_sequences = n, sampling at temperature 1 without top-k,
           sequences only).
  memory   the peak resident memory one update (as above, the first in its process) adds, in a fresh
           process per layout and round: Linux's VmHWM, reset once the trainer and the batch are built.

The model is the embedded default's architecture (Qwen3.5: 3 Gated DeltaNet + 1 full attention
layers) with random weights; times depend on the shapes, not on what was learned. Layouts are
alternated within each repeat and the median is reported.

    python bench/bench_shared_prefix.py [--groups 8] [--group-size 8] [--prompt-len 230]
                                        [--response-len 24] [--repeats 3] [--memory-rounds 2] [--threads N]
                                        [--record]
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zppo_fast.config import RunConfig  # noqa: E402  (after the path: runnable from a checkout)

LAYOUTS = {"shared": ("--parallel.share_prefix", "true"), "packed": ("--parallel.share_prefix", "false",
                                                                     "--parallel.packing", "true"),
           "padded": ("--parallel.share_prefix", "false", "--parallel.packing", "false")}


def synthetic_batch(vocab: int, args, seed: int = 0):
    from zppo_fast.batch import Rollout, RolloutBatch

    rng = random.Random(seed)
    token = lambda: rng.randrange(3, vocab)
    rollouts = []
    for g in range(args.groups):
        prompt = [token() for _ in range(args.prompt_len)]
        rollouts += [Rollout(prompt, [token() for _ in range(rng.randint(1, args.response_len))],
                             float(rng.random() < 0.5), g) for _ in range(args.group_size)]
    return RolloutBatch(rollouts)


def make_trainer(layout: str, model_dir: Path, out_dir: Path, args):
    """A GRPO trainer on the model folder with `layout`'s flags (`LAYOUTS`)."""
    from zppo_fast.config import load_config
    from zppo_fast.train import Trainer

    base = ["--model.path", str(model_dir), "--rl.algo", "grpo", "--run.tensorboard", "false",
            "--run.eval_every", "0", "--run.overwrite", "true", "--run.cpu_threads", str(args.threads),
            "--rl.group_size", str(args.group_size), "--run.out_dir", str(out_dir)]
    return Trainer(load_config(None, base + list(LAYOUTS[layout])), progress=False)


def update(trainer, batch, adv) -> None:
    """What the update phase runs: old log-probs of mini-batches 2..I, then I optimizer steps."""
    old, _ = trainer.logprobs(batch, skip_first=True)
    trainer.update(batch, old, adv)


def memory_child(args) -> None:
    """One layout's first update in this fresh process: print its peak extra resident MB."""
    import json

    import torch

    from results import peak_rss_mb, reset_peak_rss

    torch.set_num_threads(args.threads)
    trainer = make_trainer(args.memory_child, Path(args.model_dir), Path(tempfile.mkdtemp(prefix="bench_sp_mem_")), args)
    batch = synthetic_batch(len(trainer.tokenizer), args)
    adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(0))
    base = reset_peak_rss()
    update(trainer, batch, adv)
    print("RESULT " + json.dumps({"peak_mb": peak_rss_mb(base)}))


def peak_memory(model_dir: Path, args) -> dict[str, list[float]]:
    """Peak extra MB of each layout's update, one fresh process per layout and round, alternated."""
    import json
    import subprocess

    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}"
             for k in ("groups", "group_size", "prompt_len", "response_len", "threads")]
    peaks: dict[str, list[float]] = {}
    for _ in range(args.memory_rounds):
        for layout in LAYOUTS:
            run = subprocess.run([sys.executable, __file__, "--memory-child", layout, "--model-dir", str(model_dir),
                                  *flags], capture_output=True, text=True)
            results = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode != 0 or not results:
                raise RuntimeError(f"the {layout} memory run failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
            peaks.setdefault(layout, []).append(json.loads(results[-1][7:])["peak_mb"])
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=230)
    parser.add_argument("--response-len", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-rounds", type=int, default=2, help="fresh processes per layout for the peak memory")
    parser.add_argument("--threads", type=int, default=RunConfig().cpu_threads,
                        help="intra-op threads (default: zppo_fast's run.cpu_threads default)")
    parser.add_argument("--record", action="store_true", help="write the table to bench/RESULTS.md")
    parser.add_argument("--memory-child", choices=LAYOUTS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)

    import torch

    from zppo_fast.config import ModelConfig, TaskConfig
    from zppo_fast.data import tokenizer_corpus
    from zppo_fast.engine import SamplingParams, TransformersEngine, left_padded
    from zppo_fast.model import build_tiny_model, save_model
    from zppo_fast.testbed import embedded_task
    from zppo_fast.tokenizer import build_tokenizer

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_shared_prefix_"))
    tokenizer = build_tokenizer(tokenizer_corpus(embedded_task(TaskConfig())),
                                vocab_size=ModelConfig().vocab_size)
    model = build_tiny_model(ModelConfig(), tokenizer)
    save_model(model, tokenizer, tmp / "model")
    trainers = {name: make_trainer(name, tmp / "model", tmp / name, args) for name in LAYOUTS}
    batch = synthetic_batch(len(tokenizer), args)
    adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(0))
    prompts = [batch.rollouts[g * args.group_size].prompt_ids for g in range(args.groups)]
    params = SamplingParams(n=args.group_size, max_new_tokens=args.response_len, seed=1)
    engines = {"prefill once": TransformersEngine(model, tokenizer),
               "every sample": TransformersEngine(model, tokenizer, prefill_once=False),
               "model forward": TransformersEngine(model, tokenizer, lean_decode=False)}
    ids, mask = left_padded(prompts, tokenizer.pad_token_id)

    def transformers_generate():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                           num_return_sequences=args.group_size, max_new_tokens=args.response_len,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    times: dict[str, list[float]] = {}
    for rep in range(args.repeats + 1):  # the first round warms up allocators and caches
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            update(trainer, batch, adv)
            times.setdefault(f"update {name}", []).append(time.perf_counter() - t0)
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.generate(prompts, params)
            times.setdefault(f"generate {name}", []).append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        transformers_generate()
        times.setdefault("generate model.generate", []).append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    peaks = peak_memory(tmp / "model", args)

    from results import cpu_name, git_commit

    command = "python bench/bench_shared_prefix.py " + " ".join(sys.argv[1:])
    lines = [f"Device: {cpu_name()} ({os.cpu_count()} cores), CPU only, {args.threads} thread(s). "
             f"Date: {datetime.date.today().isoformat()}. Commit: {git_commit()}. Command: `{command.strip()}`. "
             f"{args.groups} groups x "
             f"{args.group_size} samples, prompts of {args.prompt_len} tokens, responses of 1..{args.response_len}; "
             f"update = old log-probs of mini-batches 2..I + I = 4 AdamW steps; medians of {args.repeats}. "
             f"Peak memory: what one update adds to the resident memory (VmHWM), the first in a fresh "
             f"process per layout, each of {args.memory_rounds} round(s).", "",
             "| phase | layout | seconds | shared / unshared |", "|---|---|---:|---|"]
    for phase, shared, others in (("update", "update shared", ("update packed", "update padded")),
                                  ("generate", "generate prefill once",
                                   ("generate every sample", "generate model forward", "generate model.generate"))):
        for k in (shared, *others):
            ratio = ("" if k != shared else
                     ", ".join(f"{med[shared] / med[o]:.2f}x vs {o.split(' ', 1)[1]}" for o in others))
            lines.append(f"| {phase} | {k.split(' ', 1)[1]} | {med[k]:.3f} | {ratio} |")
    lines += ["", "| layout | update peak extra MB (each round) | shared / this (worst shared over best) |", "|---|---|---:|"]
    for layout, mb in peaks.items():
        ratio = "" if layout == "shared" else f"{max(peaks['shared']) / min(mb):.2f}x"
        lines.append(f"| {layout} | {', '.join(f'{x:.0f}' for x in mb)} | {ratio} |")
    text = "\n".join(lines)
    print(text)
    if args.record:
        from results import record_section

        record_section("Shared prefix: each group's prompt computed once (CPU)", text)

if __name__ == "__main__":
    main()
