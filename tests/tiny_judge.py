"""A real transformers judge for the judge-path tests: a tiny Qwen3.5 taught to emit one verdict.

Judging well is not the point (a model this size cannot compare answers); the point is that
the judge prompt goes through a real tokenizer, chat template and `TransformersEngine`, and that
what the model writes is parsed strictly. A few supervised steps on judge prompts make it
answer `{"verdict": "correct"}` greedily; an untrained copy writes noise (a malformed verdict).
"""

import torch

from zppo_fast.config import ModelConfig
from zppo_fast.data import instruction_prompt_ids
from zppo_fast.model import build_tiny_model
from zppo_fast.prompts import CLOSING_INSTRUCTION, JUDGE_TEMPLATE, build_judge_prompt
from zppo_fast.tokenizer import build_tokenizer

VERDICT_CORRECT = '{"verdict": "correct"}'


def judge_tokenizer():
    corpus = [JUDGE_TEMPLATE, CLOSING_INSTRUCTION, VERDICT_CORRECT, '{"verdict": "wrong"}',
              "What is 2+3? Pick one. 0123456789 \\boxed{5} A. B. C."]
    return build_tokenizer(corpus * 20, vocab_size=600)


def tiny_judge(steps: int = 15, seed: int = 0):
    """(model, tokenizer): trained for `steps` steps to answer VERDICT_CORRECT (0 steps: untrained)."""
    tokenizer = judge_tokenizer()
    model = build_tiny_model(ModelConfig(hidden_size=64, num_layers=4), tokenizer, seed=seed)
    prompt = instruction_prompt_ids(tokenizer, build_judge_prompt("What is 2+3?", None, "\\boxed{5}", "5"))
    target = tokenizer(VERDICT_CORRECT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + target])  # (1, T)
    labels = ids.clone()
    labels[0, : len(prompt)] = -100  # learn the verdict only
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        opt.step()
    return model.eval(), tokenizer
