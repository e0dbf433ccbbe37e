"""Evaluation throughput on the CPU: questions/s of `zppo_fast.eval.evaluate_files` with the tiny model.

The tiny model is the embedded default's architecture (Qwen3.5 layout, hidden 64, 4 layers, the
in-process BPE tokenizer of the arithmetic task) with random weights: throughput depends on the
shapes, not on what was learned, and random weights rarely sample EOS, so nearly every sample
runs to --max-new-tokens (a worst case for the tokens generated). The data set is the task's
held-out questions written as a JSONL file, read back through the loader (validation, the
4,096-token prompt check with the student's tokenizer), graded by the boxed grader; K samples per
question with the paper's evaluation decoding. The time includes loading, prompting, generation,
grading and the JSONL log.

    python bench/bench_eval.py            # print the numbers
    python bench/bench_eval.py --record   # also append a section to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from zppo_fast.config import ModelConfig
from zppo_fast.data import tokenizer_corpus
from zppo_fast.engine import TransformersEngine
from zppo_fast.eval import eval_sampling_params, evaluate_files
from zppo_fast.model import build_tiny_model
from zppo_fast.task import ArithmeticTask
from zppo_fast.tokenizer import build_tokenizer


class CountingEngine:
    """Delegates to an engine and counts the completion tokens it returns."""

    def __init__(self, engine):
        self.engine, self.tokens = engine, 0

    def generate(self, prompts, params):
        out = self.engine.generate(prompts, params)
        self.tokens += sum(len(s.token_ids) for group in out for s in group)
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)  # the embedded default's rollout length
    ap.add_argument("--batch-questions", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    task = ArithmeticTask(max_operand=9)
    tokenizer = build_tokenizer(tokenizer_corpus(task), vocab_size=ModelConfig().vocab_size)
    model = build_tiny_model(ModelConfig(), tokenizer)
    engine = CountingEngine(TransformersEngine(model, tokenizer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the top-k warning: recorded in the output instead
        params = eval_sampling_params(args.samples, args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "heldout.jsonl"
        with open(data, "w") as f:
            for qid in task.heldout_ids()[: args.questions]:
                p = task.problem(qid)
                f.write(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n")
        evaluate_files(engine, tokenizer, [str(data)], params, batch_questions=args.batch_questions,
                       out_dir=Path(tmp) / "warmup", progress=False)  # first-call costs out of the timing
        engine.tokens = 0
        start = time.perf_counter()
        [result] = evaluate_files(engine, tokenizer, [str(data)], params, batch_questions=args.batch_questions,
                                  out_dir=Path(tmp) / "out", progress=False)
        wall = time.perf_counter() - start
    n = result.questions
    top_k = getattr(params, "top_k", None)
    lines = [
        (f"questions {n}, samples/question {args.samples}, max new tokens {args.max_new_tokens}, "
         f"batch {args.batch_questions} questions, torch threads {args.threads}, top-k {top_k}"),
        (f"wall {wall:.2f} s: {n / wall:.2f} questions/s, {n * args.samples / wall:.1f} samples/s, "
         f"{engine.tokens / wall:.0f} generated tokens/s"),
    ]
    print("\n".join(lines))
    if args.record:
        device = f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"
        command = "python bench/bench_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)
        section = (f"\n## Evaluation throughput (CPU)\n\n{datetime.date.today()}, {device}.\n"
                   f"Command: `{command.strip()}`\n\n"
                   "Tiny Qwen3.5-layout model (hidden 64, 4 layers, random weights: nearly every sample runs to the token "
                   "cap), arithmetic held-out questions from a JSONL file through `evaluate_files` (loader, boxed "
                   "grader, JSONL log), transformers engine.\n\n"
                   + "\n".join(f"- {x}" for x in lines) + "\n")
        results = Path(__file__).with_name("RESULTS.md")
        with open(results, "a") as f:  # append only: other sections belong to other benchmarks
            f.write(section)
        print(f"appended to {results}")


if __name__ == "__main__":
    main()
