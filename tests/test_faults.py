"""Numerical and grading faults are loud: a NaN loss stops the run at its step (the last good
checkpoint resumes) or is skipped and counted; grader exceptions are counted and the first shown;
the kernel backend in use is printed and recorded, and an impossible one is an error."""

import json
import math
import sys
import types

import pytest
import torch

import zppo_fast.train as train_module
from zppo_fast.checkpoint import complete_checkpoints
from zppo_fast.config import ConfigError
from zppo_fast.graders import GradeItem, get_grader
from zppo_fast.task import ArithmeticTask
from zppo_fast.train import NonFiniteError, Trainer

FAST = ["--rl.batch_size", "4", "--rl.group_size", "4", "--rl.num_minibatches", "2"]


def nan_loss_at(steps: set[int], holder: dict):
    """fused_linear_policy_loss whose loss is NaN during the trainer's rollout steps `steps`."""
    real = train_module.fused_linear_policy_loss

    def loss(*args, **kwargs):
        value, stats = real(*args, **kwargs)
        return (value * float("nan"), stats) if holder["trainer"].step_idx in steps else (value, stats)

    return loss


def test_a_nan_loss_stops_the_run_at_its_step_and_the_last_checkpoint_resumes(tiny_config, monkeypatch):
    holder = {}
    monkeypatch.setattr(train_module, "fused_linear_policy_loss", nan_loss_at({2}, holder))
    cfg = tiny_config("--run.steps", "2", "--run.checkpoint_every", "1", *FAST)
    trainer = holder["trainer"] = Trainer(cfg, progress=False)
    with pytest.raises(NonFiniteError, match=r"^step 2: loss/policy is nan, .*grad_norm of optimizer step 1 is nan"):
        trainer.fit()
    run = trainer.run_dir
    assert complete_checkpoints(run) == [1]  # nothing of step 2 was saved
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    trainer.shutdown_engines()

    monkeypatch.undo()
    resumed = Trainer(cfg, resume=run, progress=False)
    assert resumed.step_idx == 1
    (metrics,) = resumed.fit()  # step 2 again, finite now
    assert math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["loss/grad_norm"])
    assert complete_checkpoints(run)[-1] == 2


def test_skip_drops_the_optimizer_steps_and_counts_them(tiny_config, monkeypatch):
    holder = {}
    monkeypatch.setattr(train_module, "fused_linear_policy_loss", nan_loss_at({1}, holder))
    trainer = holder["trainer"] = Trainer(tiny_config("--rl.on_nonfinite", "skip", *FAST), progress=False)
    before = {k: v.full_tensor().clone() for k, v in trainer.policy.lm.state_dict().items()}
    metrics = trainer.step()  # step 1: both mini-batches' losses are NaN
    assert metrics["loss/skipped_steps"] == 2 and "loss/grad_norm" not in metrics
    assert all(torch.equal(v.full_tensor(), before[k]) for k, v in trainer.policy.lm.state_dict().items())
    assert not trainer.optimizer.state  # AdamW never stepped
    metrics = trainer.step()  # step 2: finite again
    assert metrics["loss/skipped_steps"] == 0 and math.isfinite(metrics["loss/grad_norm"])
    assert any(not torch.equal(v.full_tensor(), before[k]) for k, v in trainer.policy.lm.state_dict().items())


def test_grader_errors_score_0_and_are_counted(tiny_config, tmp_path, capsys):
    """A reward function that raises on some responses: those score 0.0, the step counts them in
    reward/grader_errors, and the first is printed with its input."""
    (tmp_path / "picky.py").write_text(
        "CALLS = []\n"
        "def score(response, gold):\n"
        "    CALLS.append(response)\n"
        "    if len(CALLS) % 3 == 0:\n"
        "        raise ValueError('cannot read ' + repr(response[:10]))\n"
        "    return float(len(response) % 2 == 0)\n")
    task = ArithmeticTask(max_operand=2)
    rows = [{"id": f"q{q}", "question": task.problem(q).question, "answer": task.problem(q).answer}
            for q in task.train_ids()[:8]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer(tiny_config("--data.train", str(tmp_path / "train.jsonl"), "--data.grader",
                                  f"{tmp_path / 'picky.py'}:score", *FAST), progress=False)
    metrics = trainer.step()
    graded = 4 * 4  # batch_size x group_size, the one grading of this step
    assert metrics["reward/grader_errors"] == graded // 3
    out = capsys.readouterr().out
    assert out.count("raised ValueError: cannot read") == 1 and "reward/grader_errors" in out and "gold: '" in out
    assert trainer.step()["reward/grader_errors"] == (2 * graded) // 3 - graded // 3


def test_math_verify_exceptions_are_error_verdicts(monkeypatch):
    fake = types.SimpleNamespace(parse=lambda text: (_ for _ in ()).throw(RecursionError("deep")),
                                 verify=lambda gold, got: True)
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    (v,) = get_grader("math_verify").grade_batch([GradeItem("q", r"\boxed{1}", "1")])
    assert (v.score, v.verdict, v.extracted) == (0.0, "error", "RecursionError: deep")


def test_the_kernel_backend_is_recorded_and_an_impossible_one_refused(tiny_config, monkeypatch, capsys):
    trainer = Trainer(tiny_config("--run.steps", "1"), progress=False)
    saved = json.loads((trainer.run_dir / "config.json").read_text())
    assert saved["resolved"] == {"kernel_backend": "torch",
                                 "kernel_backend_reason": "auto: a cpu device (the Triton kernels run on CUDA GPUs)"}
    assert "zppo_fast: kernels: torch (auto: a cpu device" in capsys.readouterr().out
    trainer.fit()  # the saved "resolved" key does not break resuming from the folder's config.json
    train_module.main(["--resume", str(trainer.run_dir), "--run.steps", "2"])
    assert complete_checkpoints(trainer.run_dir)[-1] == 2

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the backend was checked")

    monkeypatch.setattr(train_module, "model_from_config", no_model)
    from zppo_fast.kernels import _triton_utils

    monkeypatch.setattr(_triton_utils, "HAVE_TRITON", False)
    monkeypatch.setattr(_triton_utils, "_TRITON_ERROR", ImportError("No module named 'triton'"))
    with pytest.raises(ConfigError, match=r"kernel_backend = 'triton' cannot run here: .*triton failed to import"):
        Trainer(tiny_config("--parallel.kernel_backend", "triton", "--run.out_dir", str(trainer.run_dir) + "_t"),
                progress=False)
