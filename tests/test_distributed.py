"""Real multi-process runs under torchrun with gloo on the CPU: rank-count invariance, data-parallel
rollouts, crash and resume at the same and at a different world size, and bad distributed input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from numerics import reorder_tol

from zppo_fast.export import export
from zppo_fast.train import Trainer
from zppo_fast.weight_sync import iter_weight_buckets

HERE = Path(__file__).parent
ROOT = HERE.parent
# Several torchrun jobs per test, each up to finish()'s 300 s: above pyproject.toml's per-test limit.
pytestmark = pytest.mark.timeout(1800)


def torchrun(nproc: int, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_two_ranks_take_the_same_optimizer_steps_as_one(tiny_cache, tmp_path):
    """Same rollouts, 2 plain SGD steps: the gradient of each step (rows are dealt to ranks and
    packed differently, then summed over ranks) and the weights after them agree at world size 1
    and 2, and at world size 2 in the shared-prefix layout (each group's prompt once, groups dealt
    whole), within the float32 error of summing the same token terms in another order."""
    results = {}
    for key, n, extra in ((1, 1, ()), (2, 2, ()), ("shared", 2, ("--parallel.share_prefix", "true"))):
        out = tmp_path / f"w{key}.pt"
        finish(torchrun(n, str(HERE / "dist_worker.py"), "update", str(out), tiny_cache, str(tmp_path / f"run{key}"),
                        *extra))
        results[key] = torch.load(out)
    one = results[1]
    tokens = int(one["metrics"]["loss/trained_tokens"])
    terms = tokens * one["longest"]  # of a gradient entry's sum (tests/numerics.py)
    # The weights moved by lr (TINY_OVERRIDES' 1e-3) times the two gradients, each held to the
    # largest gradient entry of its step, plus their own rounding.
    moved = 1e-3 * sum(reorder_tol(terms, max(t.abs().max().item() for t in g.values())) for g in one["grads"])
    for other in (2, "shared"):
        two = results[other]
        assert len(one["grads"]) == len(two["grads"]) == 2 and tokens == two["metrics"]["loss/trained_tokens"]
        for step, (g1, g2) in enumerate(zip(one["grads"], two["grads"]), 1):
            assert g1.keys() == g2.keys()
            if other == "shared":
                # Another computation, not only another order: the Gated-DeltaNet layers run the prompt
                # and the responses as two recurrences joined by the handed-over state. Entries that
                # are sums of large cancelling terms (dt_bias: ~1e-9 out of terms far larger) move by
                # more than their own size, so the gradient is held to its norm, as a whole.
                flat1, flat2 = (torch.cat([g[n].double().flatten() for n in sorted(g1)]) for g in (g1, g2))
                diff, tol = (flat2 - flat1).norm().item(), reorder_tol(terms, flat1.norm().item())
                assert diff <= tol, f"shared, step {step}: |g2 - g1| = {diff:.3g} > {tol:.3g}"
                continue
            for name in g1:
                tol = reorder_tol(terms, g1[name].abs().max().item())
                torch.testing.assert_close(g2[name], g1[name], rtol=0, atol=tol,
                                           msg=lambda m: f"{other}, step {step}, {name}: {m}")
        assert one["weights"].keys() == two["weights"].keys()
        for name, w1 in one["weights"].items():
            torch.testing.assert_close(two["weights"][name], w1, rtol=0,
                                       atol=reorder_tol(1, w1.abs().max().item()) + moved,
                                       msg=lambda m: f"{other}, weights {name}: {m}")
        for key in ("loss/policy", "loss/grad_norm", "loss/approx_kl"):
            ref = one["metrics"][key]
            assert two["metrics"][key] == pytest.approx(ref, rel=0, abs=reorder_tol(terms, abs(ref))), (other, key)
        # A token whose ratio lies within rounding of the clip bound may fall on either side of it.
        assert abs(two["metrics"]["loss/clip_frac_low"] - one["metrics"]["loss/clip_frac_low"]) <= 1 / tokens

    # Data-parallel generate: every rank gets every prompt's group, in prompt order; rank 1 drew
    # the second half with its own seed; with one owner, that rank answers for all.
    groups = json.loads((tmp_path / "w2.pt.json").read_text())
    assert [g[0][0] for g in groups["everyone"]] == [[i, i + 1] for i in range(5)]
    assert [g[0][1] for g in groups["everyone"]] == ["rank0 seed7"] * 2 + [f"rank1 seed{7 + 1_000_003}"] * 3
    assert all(len(g) == 2 for g in groups["everyone"])
    assert {g[0][1] for g in groups["one_owner"]} == {"rank1 seed7"}


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its ranks in sessions of their own)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def train_args(tiny_cache: str, run_dir: Path, *extra: str) -> list[str]:
    sys.path.insert(0, str(HERE))
    from conftest import TINY_OVERRIDES

    return ["-m", "zppo_fast.train", *TINY_OVERRIDES, "--sft.cache_dir", tiny_cache, "--run.out_dir", str(run_dir),
            "--rl.algo", "grpo_replay", "--run.steps", "4", "--run.checkpoint_every", "2", *extra]


def metrics(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


KEYS = ("reward/mean", "loss/policy", "loss/approx_kl", "loss/grad_norm", "replay/size", "rollout/response_len")


def test_kill_9_then_resume_at_the_same_and_another_world_size(tiny_cache, tmp_path):
    reference = tmp_path / "reference"
    finish(torchrun(2, *train_args(tiny_cache, reference)))

    crashed = tmp_path / "crashed"
    proc = torchrun(2, *train_args(tiny_cache, crashed), start_new_session=True)
    deadline = time.time() + 300
    while not (crashed / "checkpoints" / "step_2").is_dir():  # step 2 is complete; step 3 runs next
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    for pid in [proc.pid, *descendants(proc.pid)]:  # the launcher and both ranks, mid step 3
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    assert [p.name for p in (crashed / "checkpoints").iterdir() if p.name.startswith("step_")] in (
        ["step_2"], ["step_2", "step_4.tmp"], ["step_2", "step_3.tmp"])  # nothing after step 2 looks whole
    on_one_rank = tmp_path / "on_one_rank"
    shutil.copytree(crashed, on_one_rank)

    finish(torchrun(2, "-m", "zppo_fast.train", "--resume", str(crashed)))
    ref, got = metrics(reference), metrics(crashed)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in KEYS:
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-6, abs=1e-9), (step, key)

    # The 2-rank checkpoint on 1 rank: the weights it resumes with are the ones the 2 ranks saved.
    exported = export(on_one_rank / "checkpoints" / "step_2", tmp_path / "exported")
    from safetensors.torch import load_file

    saved = load_file(exported / "model.safetensors")
    trainer = Trainer(json_config(on_one_rank), resume=on_one_rank, progress=False)
    assert trainer.step_idx == 2 and trainer.dist.world_size == 1 and len(trainer.buffer) > 0
    for bucket in iter_weight_buckets(trainer.policy.lm):
        for name, tensor in bucket:
            torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)
    history = trainer.fit()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss/policy"])) for h in history)


def json_config(run_dir: Path):
    from zppo_fast.config import load_config

    saved = json.loads((run_dir / "config.json").read_text())
    return load_config(None, [f"--{s}.{k}={v}" for s, part in saved.items() if s != "resolved"  # not a section
                              for k, v in part.items()])


def test_a_world_size_that_does_not_divide_the_batch_fails_before_any_step(tiny_cache, tmp_path):
    proc = torchrun(2, *train_args(tiny_cache, tmp_path / "run", "--rl.batch_size", "3"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "rl.batch_size 3 is not divisible by the world size 2" in out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cpu_threads_split_the_cores_among_local_processes(monkeypatch):
    from zppo_fast.distributed import cpu_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads(2) == 2 and cpu_threads(16) == 8  # never more threads than cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's ranks on this machine share them
    assert cpu_threads(16) == 2 and cpu_threads(1) == 1
    assert cpu_threads(16, processes=16) == 1  # at least one each
    assert cpu_threads(16, processes=3) == 2
