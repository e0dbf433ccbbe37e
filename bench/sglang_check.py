"""SGLang on one GPU under torchrun, as the trainer runs it: a student and a teacher engine (each in
a process of its own), a checked weight push into the student, and a release / resume cycle.

The model is the tiny Qwen3.5 image-text-to-text model (SGLang serves Qwen3.5 only in that form,
zppo_fast/sglang_engine.py), built in-process: no download. Steps, each one printed:
  1. both engines start (`start_sglang_engine`) under torchrun's environment;
  2. the student gets the trainer's weights (bf16 buckets; fp32 ones for what SGLang keeps in
     fp32), the push's statuses asserted by the adapter, then checked by sampling log-probs on a
     fixed prompt (`check_push_took_effect`, the trainer's check);
  3. both engines release their memory and resume it (the student as the trainer does: weights,
     a push, then its KV cache); greedy completions are the same after;
  4. both engines shut down.
Exits non-zero on the first failure. Used by bench/gpu_check.sh:

    python -m torch.distributed.run --standalone --nproc_per_node 1 bench/sglang_check.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from zppo_fast.data import tokenizer_corpus
from zppo_fast.engine import KV_CACHE, PUSH_CHECK_TOLERANCE, WEIGHTS, SamplingParams, check_push_took_effect
from zppo_fast.model import save_model
from zppo_fast.sglang_engine import SGLangEngineConfig, start_sglang_engine, teacher_placement
from zppo_fast.task import ArithmeticTask
from zppo_fast.tokenizer import build_tokenizer
from zppo_fast.vlm import build_tiny_vlm, vlm_prompt
from zppo_fast.weight_sync import iter_weight_buckets, weight_names, weight_shapes


def say(t0: float, what: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f} s] {what}", flush=True)


def main(out: Path) -> None:
    t0 = time.perf_counter()
    if "TORCHELASTIC_USE_AGENT_STORE" not in os.environ:
        raise SystemExit("run under torchrun: the check is that torchrun's environment does not reach the engines")
    task = ArithmeticTask(max_operand=50)
    tokenizer = build_tokenizer(tokenizer_corpus(task, size=500), vocab_size=400)
    models, processors = {}, {}
    for role, seed in (("student", 1), ("teacher", 2)):
        models[role], processors[role] = build_tiny_vlm(tokenizer, seed=seed)
        save_model(models[role], tokenizer, out / role)  # the student's weights in it are never read: pushed
        processors[role].save_pretrained(out / role)
    prompts = [vlm_prompt(processors["student"], task.problem(q).question).input_ids for q in (3, 1000)]
    placement = teacher_placement("colocated", 0, 1, torch.cuda.device_count())
    engines = {}
    try:
        for role, where in (("student", placement.student), ("teacher", placement.teacher)):
            cfg = SGLangEngineConfig(str(out / role), where, mem_fraction_static=0.15, log_path=str(out / f"{role}.log"))
            engines[role] = start_sglang_engine(cfg, weight_shapes(models[role]))
            say(t0, f"{role} engine started (log: {out / f'{role}.log'})")
        student, teacher = engines["student"], engines["teacher"]
        model = models["student"].cuda()

        def push() -> None:  # as Trainer.push_weights: bf16 buckets, every name checked first
            student.update_weights(iter_weight_buckets(model, dtype=torch.bfloat16), names=weight_names(model))

        push()
        say(t0, "student push: every status asserted")

        def trainer_logprobs(prompt: list[int], completion: list[int]) -> torch.Tensor:
            ids = torch.tensor([prompt + completion], device="cuda")
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            return logits.log_softmax(-1).gather(-1, torch.tensor(completion, device="cuda")[:, None])[:, 0]

        gap = check_push_took_effect(student, prompts[0], trainer_logprobs,
                                     SamplingParams(temperature=1.0, max_new_tokens=8, seed=0),
                                     PUSH_CHECK_TOLERANCE[torch.bfloat16], "the student's engine")
        say(t0, f"student push checked: sampling log-probs within {gap:.3f} nats/token of the trainer's")
        greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
        before = {role: [[s.token_ids for s in g] for g in eng.generate(prompts, greedy)] for role, eng in engines.items()}
        for eng in engines.values():
            eng.release_memory()
        say(t0, "both engines released their memory")
        teacher.resume_memory()
        student.resume_memory((WEIGHTS,))  # resumed weights hold garbage until the next push
        push()
        student.resume_memory((KV_CACHE,))
        after = {role: [[s.token_ids for s in g] for g in eng.generate(prompts, greedy)] for role, eng in engines.items()}
        for role in engines:
            if after[role] != before[role]:
                raise SystemExit(f"{role}: greedy completions changed across release / resume: {before[role]} -> "
                                 f"{after[role]}")
        say(t0, "both engines resumed; greedy completions unchanged")
    finally:
        for role, eng in engines.items():
            eng.shutdown()
            say(t0, f"{role} engine shut down")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    main(out_dir)
