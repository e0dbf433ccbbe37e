"""Rollout engines: prompts (token ids) in, n sampled completions each out.

Every engine — transformers here, SGLang on GPUs — implements `RolloutEngine.generate`, returning
per prompt a list of `Sample`s with the sampled token ids, their text, why generation stopped and
the log-probability of each sampled token under the sampling distribution (after temperature and
top-p). The trainer recomputes old log-probs itself; sampling log-probs are kept for metrics and
for engines whose numerics should be checked against the trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 24
    seed: int = 0


@dataclass
class Sample:
    token_ids: list[int]  # the completion only, EOS included when generated
    text: str  # decoded completion, special tokens removed
    finish_reason: str  # "stop" (EOS) | "length" (max_new_tokens reached)
    logprobs: list[float]  # one per token in token_ids


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]: ...


class TransformersEngine:
    """Batched `model.generate` with KV cache and left padding; stops at EOS.

    Sequences are generated `batch_size` at a time; a seeded generator makes the samples a
    function of (weights, prompts, params) only.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        if params.temperature < 0 or not 0 < params.top_p <= 1 or params.n < 1 or params.max_new_tokens < 1:
            raise ValueError(f"invalid sampling parameters: {params}")
        flat = [p for p in prompts for _ in range(params.n)]
        device = next(self.model.parameters()).device
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        greedy = params.temperature == 0
        out: list[Sample] = []
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(params.seed)
            for start in range(0, len(flat), self.batch_size):
                chunk = flat[start : start + self.batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, p in enumerate(chunk):  # left padding: every prompt ends at the same column
                    ids[i, width - len(p) :] = torch.tensor(p)
                    mask[i, width - len(p) :] = 1
                gen = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=not greedy,
                    temperature=None if greedy else params.temperature,
                    top_p=None if greedy else params.top_p,
                    top_k=None,
                    max_new_tokens=params.max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
                new = gen.sequences[:, width:]  # (B, T)
                # scores[t] are the processed logits the sampler drew token t from: (B, V) each,
                # reduced one step at a time so no (B, T, V) tensor is built.
                token_logp = torch.stack(
                    [sc.float().log_softmax(-1).gather(-1, new[:, t : t + 1]).squeeze(-1)
                     for t, sc in enumerate(gen.scores)], 1).cpu()  # (B, T)
                new = new.cpu()
                for row, row_logp in zip(new.tolist(), token_logp.tolist()):
                    n = row.index(eos) + 1 if eos in row else len(row)
                    out.append(
                        Sample(
                            token_ids=row[:n],
                            text=self.tokenizer.decode(row[:n], skip_special_tokens=True),
                            finish_reason="stop" if eos in row[:n] else "length",
                            logprobs=row_logp[:n],
                        )
                    )
        self.model.train(was_training)
        return [out[i : i + params.n] for i in range(0, len(out), params.n)]
