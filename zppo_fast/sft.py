"""Supervised warm-up: `python -m zppo_fast.sft` trains a tiny model on the task's worked solutions.

RL from a random model earns no reward, so the embedded default starts from a student that has
seen a few hundred supervised steps. The result is an ordinary Hugging Face folder (safetensors,
config, tokenizer) cached under `sft.cache_dir/<hash of the settings>`; later runs with the same
settings reuse it. It is written to a temporary folder and renamed when complete, so an
interrupted warm-up never leaves a cache entry that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from zppo_fast import ownership
from zppo_fast.cli import Parser
from zppo_fast.config import ModelConfig, SFTConfig, TaskConfig
from zppo_fast.data import chat_prompt_ids, tokenizer_corpus
from zppo_fast.engine import SamplingParams, TransformersEngine
from zppo_fast.eval import accuracy
from zppo_fast.model import build_tiny_model, load_model, save_model
from zppo_fast.task import ArithmeticTask
from zppo_fast.tokenizer import build_tokenizer

CACHE_VERSION = 1  # bump when the warm-up's recipe changes, so stale caches are not reused


def cache_path(model: ModelConfig, task: TaskConfig, sft: SFTConfig, seed: int = 0) -> Path:
    settings = {"v": CACHE_VERSION, "seed": seed, "model": vars(model), "task": vars(task),
                "sft": {k: v for k, v in vars(sft).items() if k != "cache_dir"}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(sft.cache_dir) / f"sft-{key}"


def _sequence(tokenizer, question: str, solution: str) -> tuple[list[int], int]:
    prompt = chat_prompt_ids(tokenizer, question)
    answer = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, len(prompt)


def train_sft(model_cfg: ModelConfig, task_cfg: TaskConfig, sft: SFTConfig, seed: int = 0, progress: bool = True,
              snapshots: tuple[int, ...] = ()):
    """Build tokenizer and model, then `sft.steps` AdamW steps of response-only cross-entropy.

    After each step count in `snapshots` the model is cached as if a run of that many steps had
    been asked for (the data order does not depend on the total), so one warm-up yields both
    the CPU demo's student (early snapshot) and its stronger teacher (the full run).
    """
    torch.set_flush_denormal(True)  # Gated-DeltaNet decay products underflow into slow denormals
    task = ArithmeticTask(**vars(task_cfg))
    tokenizer = build_tokenizer(tokenizer_corpus(task, seed=seed), vocab_size=model_cfg.vocab_size)
    model = build_tiny_model(model_cfg, tokenizer, seed=seed)
    optim = torch.optim.AdamW(model.parameters(), lr=sft.lr, weight_decay=0.0)
    train_ids, rng = task.train_ids(), random.Random(seed)
    model.train()
    bar = tqdm(range(sft.steps), desc="sft", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = [_sequence(tokenizer, p.question, p.solution)
                 for p in (task.problem(q) for q in rng.sample(train_ids, sft.batch_size))]
        width = max(len(s) for s, _ in batch)
        # Right padding: with causal attention, pads after a sequence cannot affect its tokens.
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for i, (seq, n_prompt) in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step + 1 in snapshots:
            _save_atomically(model, tokenizer, cache_path(model_cfg, task_cfg, replace(sft, steps=step + 1), seed))
    return model, tokenizer


def _save_atomically(model, tokenizer, path: Path) -> None:
    """Write the cache entry `path` under a temporary name, marked as zppo_fast's, and move it into
    place; a complete entry already there (same settings, same model) is kept. Only marked folders
    (a crashed write's leftovers) are ever replaced (zppo_fast/ownership.py)."""
    if (path / "config.json").is_file():
        return
    tmp = ownership.claim(path.with_name(path.name + ".tmp"), "sft_cache")
    save_model(model, tokenizer, tmp)
    ownership.replace(tmp, path)


def ensure_warm_start(model_cfg: ModelConfig, task_cfg: TaskConfig, sft: SFTConfig, seed: int = 0,
                      progress: bool = True, snapshots: tuple[int, ...] = ()) -> Path:
    """The folder of the cached warm-up for these settings, training it first if absent."""
    path = cache_path(model_cfg, task_cfg, sft, seed)
    if not (path / "config.json").is_file():
        model, tokenizer = train_sft(model_cfg, task_cfg, sft, seed=seed, progress=progress, snapshots=snapshots)
        _save_atomically(model, tokenizer, path)
    return path


def warm_start(model_cfg: ModelConfig, task_cfg: TaskConfig, sft: SFTConfig, seed: int = 0, progress: bool = True,
               snapshots: tuple[int, ...] = ()):
    """Return (model, tokenizer, path) of the cached warm-up for these settings, training it if absent."""
    path = ensure_warm_start(model_cfg, task_cfg, sft, seed, progress, snapshots)
    model, tokenizer = load_model(path, model_cfg.dtype)
    return model, tokenizer, path


def main(argv: list[str] | None = None) -> None:
    parser = Parser("zppo_fast.sft", __doc__, config=True)
    args = parser.parse_args(argv)
    cfg = parser.load_config(args.config, args.overrides)
    torch.set_num_threads(cfg.run.cpu_threads)
    model, tokenizer, path = warm_start(cfg.model, cfg.task, cfg.sft, seed=cfg.run.seed)
    task = ArithmeticTask(**vars(cfg.task))
    ids = task.heldout_ids()
    heldout = [task.problem(q) for q in random.Random(cfg.run.seed).sample(ids, min(cfg.run.eval_size, len(ids)))]
    acc = accuracy(TransformersEngine(model, tokenizer), tokenizer, heldout,
                   SamplingParams(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens))
    print(f"warm-up model at {path}: held-out greedy accuracy {acc:.3f} on {len(heldout)} questions")


if __name__ == "__main__":
    main()
