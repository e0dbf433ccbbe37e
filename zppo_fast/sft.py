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
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from zppo_fast import ownership
from zppo_fast.cli import Parser
from zppo_fast.config import Config, ModelConfig, SFTConfig, TaskConfig
from zppo_fast.data import chat_prompt_ids, tokenizer_corpus
from zppo_fast.distributed import cpu_threads
from zppo_fast.engine import SamplingParams, TransformersEngine
from zppo_fast.eval import heldout_accuracy
from zppo_fast.model import build_tiny_model, load_model, save_model
from zppo_fast.testbed import STUDENT, TEACHER, embedded_task
from zppo_fast.tokenizer import build_tokenizer

CACHE_VERSION = 3  # bump when the warm-up's recipe changes, so stale caches are not reused


def cache_path(model: ModelConfig, task: TaskConfig, sft: SFTConfig, role: str = STUDENT) -> Path:
    """The cache entry of `role`'s warm-up. A task whose two roles see the same data (the arithmetic
    task) keys both as one warm-up, so the teacher's run leaves the student as its early snapshot."""
    shared = embedded_task(task).shared_warmup
    settings = {"v": CACHE_VERSION, "role": "shared" if shared else role, "model": vars(model), "task": vars(task),
                "sft": {k: v for k, v in vars(sft).items() if k != "cache_dir"}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(sft.cache_dir) / f"sft-{key}"


def _sequence(tokenizer, text: str, target: str) -> tuple[list[int], int]:
    prompt = chat_prompt_ids(tokenizer, text)
    answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, len(prompt)


def train_sft(model_cfg: ModelConfig, task_cfg: TaskConfig, sft: SFTConfig, role: str = STUDENT,
              progress: bool = True, snapshots: tuple[int, ...] = ()):
    """Build tokenizer and model, then `sft.steps` AdamW steps of response-only cross-entropy on
    `role`'s warm-up data (`task.warmup_example`: zppo_fast/testbed.py says what each role sees).

    After each step count in `snapshots` the model is cached as if a run of that many steps had
    been asked for (the data order does not depend on the total): for a task whose roles share
    their data, one warm-up yields both the student (early snapshot) and its stronger teacher.
    """
    torch.set_flush_denormal(True)  # Gated-DeltaNet decay products underflow into slow denormals
    task = embedded_task(task_cfg)
    tokenizer = build_tokenizer(tokenizer_corpus(task, seed=sft.seed), vocab_size=model_cfg.vocab_size)
    model = build_tiny_model(model_cfg, tokenizer, seed=sft.seed)
    optim = torch.optim.AdamW(model.parameters(), lr=sft.lr, weight_decay=0.0)
    rng = random.Random(sft.seed)
    model.train()
    bar = tqdm(range(sft.steps), desc=f"sft ({role})", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = [_sequence(tokenizer, text, target) for _, text, target in
                 (task.warmup_example(role, rng, sft.reading_share) for _ in range(sft.batch_size))]
        # The batch's mean token loss, in two halves by length: the short (plain) sequences are not
        # padded to the long (candidate) ones' width. The same gradient as one padded batch.
        batch.sort(key=lambda item: len(item[0]))
        targets = sum(len(seq) - n_prompt for seq, n_prompt in batch)
        total = 0.0
        for half in (batch[: len(batch) // 2], batch[len(batch) // 2 :]):
            if half:
                loss = _token_loss_sum(model, half, tokenizer.pad_token_id) / targets
                loss.backward()
                total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{total:.3f}")
        if step + 1 in snapshots:
            _save_atomically(model, tokenizer, cache_path(model_cfg, task_cfg, replace(sft, steps=step + 1), STUDENT))
    return model, tokenizer


def _token_loss_sum(model, batch: list[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Summed cross-entropy of the response tokens of `batch` ((ids, prompt length) pairs), right-padded
    (with causal attention, pads after a sequence cannot affect its tokens)."""
    width = max(len(seq) for seq, _ in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    for i, (seq, n_prompt) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
    logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum")


def _save_atomically(model, tokenizer, path: Path) -> None:
    """Write the cache entry `path` under a temporary name, marked as zppo_fast's, and move it into
    place; a complete entry already there (same settings, same model) is kept. Only marked folders
    (a crashed write's leftovers) are ever replaced (zppo_fast/ownership.py)."""
    if (path / "config.json").is_file():
        return
    tmp = ownership.claim(path.with_name(path.name + ".tmp"), "sft_cache")
    save_model(model, tokenizer, tmp)
    ownership.replace(tmp, path)


def ensure_warm_start(model_cfg: ModelConfig, task_cfg: TaskConfig, sft: SFTConfig, role: str = STUDENT,
                      progress: bool = True, snapshots: tuple[int, ...] = ()) -> Path:
    """The folder of the cached warm-up of `role` for these settings, training it first if absent."""
    path = cache_path(model_cfg, task_cfg, sft, role)
    if not (path / "config.json").is_file():
        model, tokenizer = train_sft(model_cfg, task_cfg, sft, role, progress=progress, snapshots=snapshots)
        _save_atomically(model, tokenizer, path)
    return path


def prepare_warm_starts(cfg: Config, teacher: bool = True, progress: bool = True) -> tuple[Path, Path | None]:
    """The cached warm-ups a run of `cfg` on the embedded task starts from, trained first where absent:
    (the student's folder, the tiny teacher's folder or None without `teacher`).

    For a task whose roles share their data the teacher's run also leaves the student, as a snapshot.
    Otherwise two absent warm-ups are independent: with a second core the teacher's trains in a child
    process while this one trains the student's, each at its share of `run.cpu_threads` and the cores."""
    teacher_sft = replace(cfg.sft, steps=cfg.zppo.teacher_sft_steps)
    if not teacher:
        return ensure_warm_start(cfg.model, cfg.task, cfg.sft, STUDENT, progress), None
    if embedded_task(cfg.task).shared_warmup:
        teacher_dir = ensure_warm_start(cfg.model, cfg.task, teacher_sft, TEACHER, progress,
                                        snapshots=(cfg.sft.steps,))
        return ensure_warm_start(cfg.model, cfg.task, cfg.sft, STUDENT, progress), teacher_dir
    missing = [role for role, sft in ((STUDENT, cfg.sft), (TEACHER, teacher_sft))
               if not (cache_path(cfg.model, cfg.task, sft, role) / "config.json").is_file()]
    if len(missing) == 2 and (os.cpu_count() or 1) > 1:
        if progress:
            tqdm.write(f"zppo_fast: the teacher's warm-up ({teacher_sft.steps} steps) trains in a child process "
                       "beside the student's (one progress bar: the student's)")
        threads, each = torch.get_num_threads(), cpu_threads(cfg.run.cpu_threads, processes=2)
        torch.set_num_threads(each)
        try:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                child = pool.submit(_child_warm_start, cfg.model, cfg.task, teacher_sft, each)
                student_dir = ensure_warm_start(cfg.model, cfg.task, cfg.sft, STUDENT, progress)
                return student_dir, child.result()
        finally:
            torch.set_num_threads(threads)
    return (ensure_warm_start(cfg.model, cfg.task, cfg.sft, STUDENT, progress),
            ensure_warm_start(cfg.model, cfg.task, teacher_sft, TEACHER, progress))


def _child_warm_start(model_cfg: ModelConfig, task_cfg: TaskConfig, sft: SFTConfig, threads: int) -> Path:
    torch.set_num_threads(threads)
    return ensure_warm_start(model_cfg, task_cfg, sft, TEACHER, progress=False)


def warm_start(model_cfg: ModelConfig, task_cfg: TaskConfig, sft: SFTConfig, role: str = STUDENT,
               progress: bool = True, snapshots: tuple[int, ...] = ()):
    """Return (model, tokenizer, path) of the cached warm-up of `role`, training it if absent."""
    path = ensure_warm_start(model_cfg, task_cfg, sft, role, progress, snapshots)
    model, tokenizer = load_model(path, model_cfg.dtype)
    return model, tokenizer, path


def main(argv: list[str] | None = None) -> None:
    parser = Parser("zppo_fast.sft", __doc__, config=True)
    args = parser.parse_args(argv)
    cfg = parser.load_config(args.config, args.overrides)
    torch.set_num_threads(cpu_threads(cfg.run.cpu_threads))
    task = embedded_task(cfg.task)
    params = SamplingParams(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens)
    student, teacher = prepare_warm_starts(cfg, teacher=True)
    for role, path in ((STUDENT, student), (TEACHER, teacher)):
        model, tokenizer = load_model(path, cfg.model.dtype)
        sets = {name: [task.problem(q) for q in ids] for name, ids in task.heldout_sets(cfg.run.eval_size).items()}
        acc = heldout_accuracy(TransformersEngine(model, tokenizer), tokenizer, sets, params)
        print(f"{role} warm-up at {path}: greedy held-out accuracy " + ", ".join(
            f"{name} {acc[f'eval/{name}_acc']:.3f} +- {acc[f'eval/{name}_se']:.3f} ({len(ps)} questions)"
            for name, ps in sets.items()))


if __name__ == "__main__":
    main()
