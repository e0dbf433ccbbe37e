"""The RL trainer end to end on the tiny warmed-up student."""

import json
import os

import pytest
import torch
from batches import random_batch
from numerics import reorder_tol

from zppo_fast.batch import Rollout, RolloutBatch
from zppo_fast.checkpoint import CheckpointError
from zppo_fast.config import ConfigError
from zppo_fast.data import QuestionStream
from zppo_fast.engine import SamplingParams
from zppo_fast.eval import accuracy
from zppo_fast.model import ModelLoadError, load_tokenizer
from zppo_fast.train import Trainer


def full_grads(trainer) -> torch.Tensor:
    return torch.cat([p.grad.full_tensor().flatten() for p in trainer.policy.parameters() if p.grad is not None])


def test_gradient_is_invariant_to_micro_batching_and_packing(tiny_config):
    trainer = Trainer(tiny_config("--run.steps", "1"), progress=False)
    batch = random_batch(len(trainer.tokenizer))
    rows = list(range(len(batch)))
    old, _ = trainer.logprobs(batch)
    old = {i: o + 0.3 * torch.randn_like(o) for i, o in old.items()}  # ratios away from 1: clips are active
    adv = torch.randn(len(batch))
    grads, counts = [], []
    # One packed micro-batch, 4 or more, one sequence each, and the padded layout.
    for max_tokens, packed in ((10**6, True), (sum(len(r) for r in batch.rollouts) // 4, True), (1, True),
                               (10**6, False)):
        trainer.cfg.parallel.max_tokens_per_microbatch, trainer.cfg.parallel.packing = max_tokens, packed
        counts.append(len(trainer.microbatches(batch, rows)))
        trainer.optimizer.zero_grad(set_to_none=True)
        stats = trainer.backward_minibatch(batch, rows, old, adv)
        grads.append(full_grads(trainer))
        assert stats["tokens"] == batch.response_tokens()
    assert counts[:3] == [1, counts[1], len(batch)] and counts[1] >= 4
    assert grads[0].abs().sum() > 0
    # The same terms summed in another order: within the float32 error of that (tests/numerics.py),
    # held to the largest gradient entry (a near-zero entry is a cancellation of terms of that size).
    tol = reorder_tol(batch.response_tokens() * max(map(len, batch.rollouts)), grads[0].abs().max().item())
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=0, atol=tol)


def test_first_minibatch_needs_no_old_logprob_pass(tiny_config):
    """The pass covers mini-batches 2..I only (none with one mini-batch); the first mini-batch's
    loss and gradient with its forward's own log-probs equal those with a pass's (fp32 tolerance)."""
    from zppo_fast.train import FIRST_ENTROPY

    trainer = Trainer(tiny_config("--run.steps", "1", "--rl.num_minibatches", "3"), progress=False)
    batch = random_batch(len(trainer.tokenizer))
    parts = batch.minibatches(3)
    full, _ = trainer.logprobs(batch)
    skipped, _ = trainer.logprobs(batch, skip_first=True)
    assert sorted(skipped) == sorted(i for p in parts[1:] for i in p)
    for i in skipped:
        assert torch.equal(skipped[i], full[i])
    adv = torch.randn(len(batch))
    results = []
    for old, on_policy in ((full, False), (skipped, True)):
        trainer.optimizer.zero_grad(set_to_none=True)
        stats = trainer.backward_minibatch(batch, parts[0], old, adv, on_policy=on_policy)
        results.append((stats, full_grads(trainer)))
    (want, want_grad), (got, got_grad) = results
    assert want_grad.abs().sum() > 0
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)  # fp32 logp - logp rounding
    for k in ("loss", "entropy", "ratio"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="old log-probs for 0 of rows"):  # a later mini-batch never is on-policy
        trainer.backward_minibatch(batch, parts[1], {}, adv)
    trainer.optimizer.zero_grad(set_to_none=True)
    assert FIRST_ENTROPY in trainer.update(batch, skipped, adv)

    trainer.cfg.rl.num_minibatches = 1
    forwards = []
    handle = trainer.policy.register_forward_hook(lambda *a: forwards.append(1))
    try:
        assert trainer.logprobs(batch, skip_first=True) == ({}, 0.0) and not forwards
    finally:
        handle.remove()


def test_minibatches_keep_groups_whole():
    batch = RolloutBatch([Rollout([1], [2], 0.0, g) for g in [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]])
    parts = batch.minibatches(4)
    assert len(parts) == 4 and sorted(i for p in parts for i in p) == list(range(10))
    for p in parts:
        groups = {batch.rollouts[i].group for i in p}
        assert all(sum(batch.rollouts[i].group == g for i in p) == 2 for g in groups)


def step_batch() -> RolloutBatch:
    """A step's batch as the trainer lays it out: 6 new, 2 replayed, then 3 BCQ and 5 NCQ groups of 2."""
    kinds = ["new"] * 6 + ["replayed"] * 2 + ["bcq"] * 3 + ["ncq"] * 5
    return RolloutBatch([Rollout([1, g], [2] * (1 + g % 3), 0.0, g, kind=k)
                         for g, k in enumerate(kinds) for _ in range(2)])


def test_minibatches_spread_every_kind_of_group():
    """Cut in batch order, all 8 guided groups would be the last two mini-batches; dealt, each of the
    I = 4 mini-batches holds its share of every kind (counts differ by at most one)."""
    batch = step_batch()
    parts = batch.minibatches(4, seed="0:7")
    assert sorted(i for p in parts for i in p) == list(range(len(batch)))
    kinds = {r.kind for r in batch.rollouts}
    for kind in kinds:
        total = len({r.group for r in batch.rollouts if r.kind == kind})
        per_part = [len({batch.rollouts[i].group for i in p if batch.rollouts[i].kind == kind}) for p in parts]
        assert sum(per_part) == total and max(per_part) - min(per_part) <= 1, (kind, per_part)
    for p in parts:  # whole groups, 4 of the 16 in each
        groups = {batch.rollouts[i].group for i in p}
        assert len(groups) == 4 and len(p) == 8
    assert all(any(batch.rollouts[i].kind in ("bcq", "ncq") for i in p) for p in parts)


def test_minibatch_deal_is_seeded_and_reproducible():
    """The deal is a pure function of the batch and the seed ("run.seed:step"): a resumed run, which
    rebuilds the same batch at the same step, gets the same mini-batches; another step another deal."""
    deal = step_batch().minibatches(4, seed="0:7")
    assert step_batch().minibatches(4, seed="0:7") == deal
    others = [step_batch().minibatches(4, seed=f"0:{s}") for s in range(8, 12)]
    assert any(o != deal for o in others)


def test_trainer_deals_by_run_seed_and_step(tiny_config):
    trainer = Trainer(tiny_config("--run.steps", "1"), progress=False)
    trainer.step_idx = 7
    assert trainer.minibatches(step_batch(), 4) == step_batch().minibatches(4, seed=f"{trainer.cfg.run.seed}:7")


def test_training_accuracy_goes_up(tiny_config):
    """Sampled accuracy on the first half of the questions the run trains on, before and after 20 RL
    steps (a fixed set, so the steps' differing question difficulty does not blur the comparison).
    16 samples per question: at 4, the standard error of the difference (about 0.05) was the size
    of the margin asked for."""
    trainer = Trainer(tiny_config("--run.steps", "20", "--run.checkpoint_every", "100"), progress=False)
    ids = QuestionStream(trainer.task.train_ids(), seed=trainer.cfg.run.seed).next_batch(10 * trainer.cfg.rl.batch_size)
    problems = [trainer.task.problem(q) for q in ids]
    params = SamplingParams(n=16, temperature=1.0, max_new_tokens=trainer.cfg.rollout.max_new_tokens, seed=123)
    before = accuracy(trainer.engine, trainer.tokenizer, problems, params)
    trainer.fit()
    after = accuracy(trainer.engine, trainer.tokenizer, problems, params)
    assert after > before + 0.05, (before, after)


def test_resume_reproduces_the_next_step(tiny_config, tmp_path):
    full = Trainer(tiny_config("--run.steps", "3", "--run.checkpoint_every", "2", "--run.eval_every", "3"),
                   progress=False)
    reference = full.fit()
    run_dir = full.run_dir
    # Simulate a crash after step 2: only the step-2 checkpoint and the metrics up to step 2 survive.
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step_3")
    resumed = Trainer(tiny_config("--run.steps", "3", "--run.eval_every", "3"), resume=run_dir, progress=False)
    assert resumed.step_idx == 2
    (step3,) = resumed.fit()
    # eval/heldout_gain pairs step 3's held-out answers with step 0's, which the checkpoint carries
    for key in ("reward/mean", "loss/policy", "loss/approx_kl", "rollout/response_len", "loss/grad_norm",
                "eval/heldout_acc", "eval/heldout_gain", "eval/heldout_gain_se"):
        assert step3[key] == pytest.approx(reference[2][key], rel=1e-5, abs=1e-7), key
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3]  # step 0: the first evaluation


def test_trains_from_a_hugging_face_folder(tiny_config, tmp_path):
    """A config naming a model folder loads model and tokenizer from it, through the same path; the
    folder is published in bfloat16 (as Qwen3.5 is), trained in float32 masters, and exported in
    bfloat16 by default, or in float32 when --dtype says so."""
    cfg = tiny_config("--run.steps", "1")
    from safetensors import safe_open

    from zppo_fast.model import load_model, save_model
    from zppo_fast.sft import cache_path

    folder = tmp_path / "bf16_model"
    save_model(*load_model(cache_path(cfg.model, cfg.task, cfg.sft), "bfloat16"), folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    trainer = Trainer(tiny_config("--run.steps", "1", "--model.path", str(folder)), progress=False)
    (metrics,) = trainer.fit()
    assert 0.0 <= metrics["reward/mean"] <= 1.0 and metrics["perf/student_tokens"] > 0
    from transformers import AutoModelForCausalLM

    from zppo_fast.export import main as export

    trained = {k: v.full_tensor() for k, v in trainer.policy.lm.state_dict().items()}
    assert trained["lm_head.weight"].dtype == torch.float32  # model.dtype: the masters
    checkpoint = trainer.run_dir / "checkpoints" / "step_1"
    for args, dtype in (([], torch.bfloat16), (["--dtype", "float32"], torch.float32)):
        out = trainer.run_dir / f"exported_{dtype}"
        export([str(checkpoint), str(out), *args])
        assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
        with safe_open(out / "model.safetensors", "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert tensors and {t.dtype for t in tensors.values()} == {dtype}
        for k, t in tensors.items():  # the trained weights, rounded once to the written dtype
            assert torch.equal(t, trained[k].to(dtype)), k
    saved = AutoModelForCausalLM.from_pretrained(trainer.run_dir / "exported_torch.float32")
    # The engine generates with the same weights the trainer holds.
    torch.testing.assert_close(trainer.engine.engine.model.lm_head.weight, saved.lm_head.weight)


def test_refuses_to_clobber_a_run(tiny_config):
    Trainer(tiny_config("--run.steps", "1"), progress=False).fit()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(tiny_config("--run.steps", "1"), progress=False)


def test_bad_model_path_and_corrupt_checkpoint(tiny_config, tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        Trainer(tiny_config("--model.path", str(tmp_path / "nope")), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        Trainer(tiny_config("--model.path", str(tmp_path / "empty")), progress=False)
    for model_type, error in (("llama", "cannot load the tokenizer from"), ("qwen3_5_text", "no tokenizer files")):
        folder = tmp_path / f"no_tokenizer_{model_type}"  # a config.json and nothing else
        folder.mkdir()
        (folder / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
        with pytest.raises(ModelLoadError, match=error):
            load_tokenizer(folder)
    trainer = Trainer(tiny_config("--run.steps", "1"), progress=False)
    trainer.fit()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Trainer(tiny_config(), resume=tmp_path / "empty", progress=False)
    with pytest.raises(CheckpointError, match="different model config.*hidden_size"):
        Trainer(tiny_config("--model.hidden_size", "32"), resume=trainer.run_dir, progress=False)
    shard = next((trainer.run_dir / "checkpoints" / "step_1" / "dcp").glob("*.distcp"))
    saved = shard.read_bytes()
    shard.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        Trainer(tiny_config(), resume=trainer.run_dir, progress=False)
    shard.write_bytes(saved)
    state = trainer.run_dir / "checkpoints" / "step_1" / "trainer_state.pt"
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(tiny_config(), resume=trainer.run_dir, progress=False)


def test_sglang_engine_on_the_cpu_is_a_clear_error(tiny_config):
    with pytest.raises(ConfigError, match="sglang runs on CUDA GPUs"):
        Trainer(tiny_config("--rollout.engine", "sglang"), progress=False)


def test_activation_checkpointing_gives_the_same_gradient(tiny_config):
    """Recomputing each decoder layer in the backward must not change the gradient."""
    grads, forwards = [], []
    for checkpointing in ("false", "true"):
        trainer = Trainer(tiny_config("--run.steps", "1", "--parallel.activation_checkpointing", checkpointing),
                          progress=False)
        batch = random_batch(len(trainer.tokenizer), n_groups=3)
        old, _ = trainer.logprobs(batch)
        saved = []  # tensors the forward keeps for the backward, outside the layers' own checkpoints
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
            trainer.policy(trainer.microbatches(batch, list(range(len(batch))))[0])
        trainer.backward_minibatch(batch, list(range(len(batch))), old, torch.linspace(-1, 1, len(batch)))
        grads.append(full_grads(trainer))
        forwards.append(len(saved))
    assert forwards[1] < forwards[0] / 10  # the layers' activations are recomputed, not kept
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_keeps_only_the_last_checkpoints(tiny_config):
    trainer = Trainer(tiny_config("--run.steps", "3", "--run.checkpoint_every", "1", "--run.keep_last", "2"),
                      progress=False)
    trainer.fit()
    assert sorted(p.name for p in (trainer.run_dir / "checkpoints").iterdir()) == ["step_2", "step_3"]


def test_trains_with_the_engine_in_a_child_process(tiny_config):
    """rollout.engine_process = child: the student's engine lives in a process of its own (weights
    pushed through shared memory, checked by log-probs after the first push) and a step trains."""
    from zppo_fast.engine_process import EngineProcess

    trainer = Trainer(tiny_config("--run.steps", "1", "--rollout.engine_process", "child"), progress=False)
    engine = trainer.engine.engine
    assert isinstance(engine, EngineProcess) and engine.pid != os.getpid()
    assert trainer.check_push() <= 1e-3  # the push check the constructor ran, once more
    metrics = trainer.step()
    assert metrics["loss/trained_tokens"] > 0 and "engine/student_push_s" in metrics
    trainer.shutdown_engines()
    assert engine.process.poll() is not None, "the engine's process ended with training"
