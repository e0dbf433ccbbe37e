"""The paper's baselines inside the trainer: the distillation loss's wiring (against an unpacked
float64 reference), the Prefix baseline's forced tokens through the real backward, Hint leaks
counted in a step's metrics, and the shared-vocabulary check. The two-step runs of every algo are
`test_every_algo_runs_two_steps` in tests/test_zppo.py."""

import copy

import pytest
import torch
from batches import hidden_grad, random_batch
from numerics import reorder_tol
from zppo_fast.kernels.distill_loss import fused_linear_jsd_reference

from zppo_fast.batch import RolloutBatch
from zppo_fast.config import ConfigError
from zppo_fast.engine import Sample
from zppo_fast.reward import final_answer
from zppo_fast.task import Problem
from zppo_fast.train import Trainer


@pytest.mark.parametrize("packing", ["true", "false", "shared"])
def test_distill_gradient_matches_an_unpacked_float64_reference(tiny_config, packing):
    """backward_minibatch's JSD (student and teacher on one micro-batch of 24 sequences: one packed
    row, where the teacher's Gated-DeltaNet must be packing-safe, right-padded, or in the shared-prefix
    layout) has the gradient of the float64 reference computed sequence by sequence on unpacked copies
    of both models, with full [T, V] logits, normalized by all tokens."""
    layout = ["--parallel.share_prefix", "true"] if packing == "shared" else ["--parallel.packing", packing]
    trainer = Trainer(tiny_config("--rl.algo", "on_distill", "--zppo.distill_beta", "0.3", *layout), progress=False)
    batch = random_batch(len(trainer.tokenizer))
    if packing == "shared":  # one prompt per group, as the engine samples them
        for r in batch.rollouts:
            r.prompt_ids = batch.rollouts[4 * r.group].prompt_ids
    rows = list(range(len(batch)))
    (mb,) = trainer.microbatches(batch, rows)  # one forward over all sequences: boundaries matter
    assert (mb.input_ids.shape[0] == 1) == (packing != "false") and (mb.shared is not None) == (packing == "shared")
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.backward_minibatch(batch, rows)
    got = {name: p.grad.full_tensor() for name, p in trainer.policy.lm.named_parameters() if p.grad is not None}

    student = copy.deepcopy(trainer.engine.engine.model).requires_grad_(True)  # the pushed weights
    teacher = trainer.teacher_lm.lm
    assert teacher is trainer.teacher_engine.engine.model  # scoring reuses the engine's model
    n_tokens = batch.response_tokens()
    loss = 0.0
    for r in batch.rollouts:
        ids, p = torch.tensor([r.prompt_ids + r.response_ids]), len(r.prompt_ids)
        hs = student.get_decoder()(input_ids=ids).last_hidden_state[0, p - 1 : -1]
        with torch.no_grad():
            ht = teacher.get_decoder()(input_ids=ids).last_hidden_state[0, p - 1 : -1]
        part, _ = fused_linear_jsd_reference(hs, student.lm_head.weight, ht, teacher.lm_head.weight,
                                             torch.ones(len(hs), dtype=torch.bool), beta=0.3, normalizer=n_tokens)
        loss = loss + part
    loss.backward()
    assert stats["tokens"] == n_tokens
    assert stats["loss"] == pytest.approx(float(loss.detach()) * n_tokens, rel=1e-4)
    want = {name: p.grad for name, p in student.named_parameters() if p.grad is not None}
    assert want.keys() == got.keys() and sum(g.abs().sum() for g in want.values()) > 0
    # Packed (or padded) float32 forward and backward against per-sequence ones: the same terms summed
    # in another order (tests/numerics.py), each tensor held to its largest entry. The shared layout
    # also starts the Gated-DeltaNet's fp32 chunks elsewhere (a response's at the response, from the
    # prompt's state), which rounds the decay parameters' small gradients, differences of large
    # terms, by the size of those terms: there the whole gradient's largest entry stands for them.
    terms = n_tokens * max(map(len, batch.rollouts))
    largest = max(g.abs().max().item() for g in want.values())
    for name, grad in want.items():
        scale = largest if packing == "shared" else grad.abs().max().item()
        torch.testing.assert_close(got[name], grad.float(), rtol=0, atol=reorder_tol(terms, scale), msg=name)


def test_distill_update_lowers_the_jsd(tiny_config):
    """One update is one optimizer step on the JSD; repeated on a fixed batch, the JSD falls."""
    trainer = Trainer(tiny_config("--rl.algo", "on_distill", "--rl.num_minibatches", "4"), progress=False)
    batch = random_batch(len(trainer.tokenizer), seed=1)
    before = [p.detach().clone() for p in trainer.optimizer.param_groups[0]["params"]]
    jsd = [trainer.update(batch)["loss/jsd"] for _ in range(6)]
    assert trainer.optimizer.state[trainer.optimizer.param_groups[0]["params"][0]]["step"] == 6  # 1 per update
    assert jsd[-1] < 0.8 * jsd[0], jsd
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.optimizer.param_groups[0]["params"]))


class ScriptedStudent:
    """Stands in for the student's engine in `Trainer.rollout`: every prompt gets the same continuation."""

    def __init__(self, tokenizer, text: str):
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.prompts = []

    def generate(self, prompts, params):
        self.prompts += prompts
        return [[Sample(list(self.ids), "(not read)", "stop", [0.0] * len(self.ids))] * params.n for _ in prompts]


def test_prefix_is_context_graded_with_the_continuation_and_never_trained(tiny_config):
    """A Prefix rollout through the trainer's own rollout, old log-probs and backward_minibatch: the
    engine continues prompt + prefix; the grade reads prefix + continuation (the gold answer is split
    across them); every position that predicts a prompt or prefix token gets exactly zero gradient,
    every position predicting a continuation token gets some."""
    trainer = Trainer(tiny_config("--rl.algo", "grpo_replay_prefix"), progress=False)
    tok = trainer.tokenizer
    prefix = tok("<think>1+1=2</think> \\boxed{", add_special_tokens=False)["input_ids"]
    trainer.engine = ScriptedStudent(tok, "2} ok")
    problem = Problem(0, "Ann has 1 pens, gets 1 more. How many pens does Ann have now?", "2", "")
    batch, _ = trainer.rollout([problem.question, problem.question], [problem, problem], first_group=8,
                               kinds=["prefix", "new"], prefixes=[prefix, []])
    g_s = trainer.cfg.rl.group_size
    forced, plain = batch.rollouts[0], batch.rollouts[g_s]
    assert forced.prompt_ids == plain.prompt_ids + prefix and forced.response_ids == trainer.engine.ids
    assert trainer.engine.prompts[0] == forced.prompt_ids  # the engine continued the prefix
    assert (forced.reward, plain.reward, forced.group, plain.group) == (1.0, 0.0, 8, 9)

    batch = RolloutBatch([forced, plain])
    old, _ = trainer.logprobs(batch)
    grad = hidden_grad(trainer, batch, old, torch.tensor([1.0, -1.0]))[: len(forced)]  # (T,) of the Prefix rollout
    first = len(forced.prompt_ids) - 1  # predicts the first continuation token
    assert (grad[:first] == 0).all() and (grad[first : len(forced) - 1] > 0).all()


class LeakingTeacher:
    """Solves every question; its hint either states the answer (a leak) or does not."""

    def __init__(self, tokenizer, answers: dict[str, str], leak: bool):
        self.tokenizer, self.answers, self.leak = tokenizer, answers, leak

    def generate(self, prompt_ids, params):
        out = []
        for ids in prompt_ids:
            text = self.tokenizer.decode(ids)
            if "Read the solved response below" in text:
                answer = final_answer(text.split("<response>")[1])
                hint = f"The total is {answer}." if self.leak else "Add the two counts."
                out.append([Sample([5], f"<hint>{hint}</hint>", "stop", [0.0])])
            else:
                gold = next(a for q, a in self.answers.items() if q in text)
                out.append([Sample([5], f"<think>ok</think> \\boxed{{{gold}}}", "stop", [0.0])] * params.n)
        return out


@pytest.mark.parametrize("leak", [True, False])
def test_hint_leaks_are_dropped_and_counted_in_a_step(tiny_config, leak):
    trainer = Trainer(tiny_config("--rl.algo", "grpo_replay_hint"), progress=False)
    builder, seen = trainer.guide, {}

    def guide(problems, *args):
        seen["problems"] = problems
        builder.teacher = LeakingTeacher(trainer.tokenizer, {p.question: p.answer for p in problems}, leak)
        return builder(problems, *args)

    trainer.guide = guide
    m = trainer.step()
    hard = round(m["hint/hard_frac"] * len(seen["problems"]))
    chosen = min(hard, 2)  # cap: rho_aug 0.25 * B_new 8
    assert chosen > 0, "the tiny student has hard questions"
    assert m["hint/eligible"] == chosen and m["hint/teacher_acc_on_hard"] == 1.0  # asked for X_aug only
    assert m["hint/dropped_leak"] == (chosen if leak else 0) and m["hint/built"] == (0 if leak else chosen)
    assert ("hint/acc" in m) == (not leak)  # the student sampled on the hint prompts only when some were built


def test_distillation_needs_a_shared_vocabulary(tiny_config, tmp_path):
    from zppo_fast.config import ModelConfig
    from zppo_fast.data import tokenizer_corpus
    from zppo_fast.model import build_tiny_model, save_model
    from zppo_fast.task import ArithmeticTask
    from zppo_fast.tokenizer import build_tokenizer

    tok = build_tokenizer(tokenizer_corpus(ArithmeticTask(max_operand=3), size=100, seed=5), vocab_size=300)
    save_model(build_tiny_model(ModelConfig(hidden_size=32), tok, seed=2), tok, tmp_path / "teacher")
    for algo in ("off_distill", "on_distill_replay"):
        with pytest.raises(ConfigError, match=f"rl.algo = {algo} needs a teacher with the student's tokenizer"):
            Trainer(tiny_config("--rl.algo", algo, "--zppo.teacher_path", str(tmp_path / "teacher")), progress=False)
