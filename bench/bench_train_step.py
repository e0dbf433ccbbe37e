"""Train-step throughput per rank at 1 and 2 ranks (torchrun, gloo on the CPU; NCCL on GPUs), and
the compute spent on padding with packing on and off.

One "train step" is what `Trainer.step` did after the rollouts before issue 15 item 4: the
old-log-prob pass over all I mini-batches (kept, so numbers compare with earlier ones) and I = 4
AdamW steps (FSDP2, the fused linear policy loss) over a fixed synthetic rollout batch of
`--groups` x 8 sequences, prompts of 40-80 tokens and responses of 8-120 (lengths drawn
uniformly, so padding has something to waste). The model is the embedded default's architecture
(hidden 64, 4 layers: 3 Gated DeltaNet + 1 full attention) with random weights; throughput
depends on the shapes, not on what was learned. Tokens/s counts every token of every sequence
(prompt and response) once per pass. The shared-prefix layout (bench/bench_shared_prefix.py) is off
here: these synthetic groups do not share prompts.

Padding: in the padded layout a micro-batch computes rows x longest positions; packed, the
full-attention layers, projections and MLPs compute real tokens only, and only the Gated-DeltaNet
mixers re-pad their sequences (zppo_fast/packing.py), so both fractions are reported.

    python bench/bench_train_step.py [--groups 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def synthetic_batch(vocab: int, groups: int, seed: int = 0):
    from zppo_fast.batch import Rollout, RolloutBatch

    rng = random.Random(seed)
    return RolloutBatch([Rollout([rng.randrange(3, vocab) for _ in range(rng.randint(40, 80))],
                                 [rng.randrange(3, vocab) for _ in range(rng.randint(8, 120))],
                                 float(rng.random() < 0.5), g) for g in range(groups) for _ in range(8)])


def worker(args) -> None:
    import torch

    from zppo_fast.config import load_config
    from zppo_fast.packing import linear_padding
    from zppo_fast.train import Trainer

    cfg = load_config(None, ["--model.path", args.model, "--rl.algo", "grpo", "--run.out_dir", args.run_dir,
                             "--run.overwrite", "true", "--run.tensorboard", "false", "--run.eval_every", "0",
                             "--parallel.packing", str(args.packing), "--parallel.share_prefix", "false",
                             "--parallel.max_tokens_per_microbatch",
                             str(args.max_tokens)])
    trainer = Trainer(cfg, progress=False)
    batch = synthetic_batch(len(trainer.tokenizer), args.groups)
    adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(0))
    # The layout's cost, over this rank's micro-batches of every mini-batch.
    mbs = [mb for rows in batch.minibatches(cfg.rl.num_minibatches) for mb in trainer.microbatches(batch, rows)]
    real = sum(len(batch.rollouts[i]) for mb in mbs for i in mb.rows)
    computed = sum(mb.tokens for mb in mbs if mb.rows)
    linear_pad = sum(linear_padding(mb) * mb.tokens for mb in mbs if mb.rows) / max(computed, 1)
    times = []
    for _ in range(args.repeats + 1):  # the first pass warms up allocators and caches
        t0 = time.perf_counter()
        old, _ = trainer.logprobs(batch)
        trainer.update(batch, old, adv)
        times.append(time.perf_counter() - t0)
    best = min(times[1:])
    if trainer.dist.is_main:
        tokens = sum(len(r) for r in batch.rollouts)
        Path(args.out).write_text(json.dumps({
            "world_size": trainer.dist.world_size, "packing": args.packing, "step_s": best,
            "tokens_per_s_per_rank": 2 * tokens / best / trainer.dist.world_size,  # 2 passes: old log-probs + update
            "padding_frac": 1 - real / max(computed, 1), "linear_padding_frac": linear_pad,
            "microbatches_per_rank": len(mbs)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--packing", default="true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from zppo_fast.config import ModelConfig, TaskConfig
    from zppo_fast.data import tokenizer_corpus
    from zppo_fast.model import build_tiny_model, save_model
    from zppo_fast.testbed import embedded_task
    from zppo_fast.tokenizer import build_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    tokenizer = build_tokenizer(tokenizer_corpus(embedded_task(TaskConfig())), vocab_size=ModelConfig().vocab_size)
    save_model(build_tiny_model(ModelConfig(), tokenizer), tokenizer, tmp / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rows = []
    for world, packing in ((1, "true"), (1, "false"), (2, "true"), (2, "false")):
        out = tmp / f"w{world}_{packing}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               __file__, "--worker", "--model", str(tmp / "model"), "--run-dir", str(tmp / f"run{world}"),
               "--out", str(out), "--packing", packing, "--groups", str(args.groups), "--repeats", str(args.repeats),
               "--max-tokens", str(args.max_tokens)]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows.append(json.loads(out.read_text()))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    print(f"device: {device}; batch {args.groups} groups x 8 sequences; max {args.max_tokens} tokens per micro-batch")
    print("| ranks | packing | step (s) | tokens/s per rank | padding (all layers) | padding (Gated DeltaNet mixers) | micro-batches per rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world_size']} | {'on' if r['packing'] == 'true' else 'off'} | {r['step_s']:.2f} | "
              f"{r['tokens_per_s_per_rank']:.0f} | {r['padding_frac']:.1%} | {r['linear_padding_frac']:.1%} | "
              f"{r['microbatches_per_rank']} |")
    base = next(r for r in rows if r["world_size"] == 1 and r["packing"] == "true")
    for r in rows[1:]:
        print(f"ranks {r['world_size']}, packing {r['packing']}: step time x{r['step_s'] / base['step_s']:.2f} "
              f"of 1 rank packed")


if __name__ == "__main__":
    main()
