"""normalize_advantages: PyTorch path and the one-launch Triton kernel vs a float64 Python reference."""

import pytest
import torch
import zppo_fast.kernels as K
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import BACKENDS, HAS_CUDA, INTERP, NEEDS_INTERPRETER_CHILD, run_interpreter_cases_in_child

MODES = K.ADVANTAGE_MODES


def random_batch(n_groups, gen, binary=True, max_size=9, shuffle=True):
    sizes = torch.randint(1, max_size + 1, (n_groups,), generator=gen)
    ids = torch.randint(-(2**62), 2**62, (n_groups,), generator=gen)  # arbitrary int64 values
    gid = torch.repeat_interleave(ids, sizes)
    n = gid.numel()
    rewards = torch.randint(0, 2, (n,), generator=gen).float() if binary else torch.randn(n, generator=gen)
    if shuffle:
        perm = torch.randperm(n, generator=gen)
        gid, rewards = gid[perm], rewards[perm]
    return rewards, gid


def check(rewards, gid, mode, device, backend, atol=2e-5):
    out = K.normalize_advantages(rewards.to(device), gid.to(device), mode=mode, backend=backend)
    ref = K.advantages_reference(rewards, gid, mode=mode)
    assert out.dtype == torch.float32 and out.shape == rewards.shape and out.device.type == device
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=atol)
    return out.cpu()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_groups,binary", [(1, True), (7, True), (60, True), (60, False), (700, True)])
def test_matches_reference(device, backend, mode, n_groups, binary):
    gen = torch.Generator().manual_seed(n_groups * 31 + binary)
    rewards, gid = random_batch(n_groups, gen, binary=binary)
    out = check(rewards, gid, mode, device, backend)
    if mode in ("batch_wo_zero", "batch_w_zero", "group", "none"):
        # trivial groups get exactly 0
        for g in gid.unique():
            sel = gid == g
            if (rewards[sel] == rewards[sel][0]).all():
                assert (out[sel] == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_all_trivial_and_single_rollouts(device, backend, mode):
    gid = torch.tensor([5, 5, 5, -1, -1, 9], dtype=torch.int64)
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.3])
    out = check(rewards, gid, mode, device, backend)
    assert (out == 0).all()
    out = check(torch.tensor([0.7]), torch.tensor([3]), mode, device, backend)
    assert (out == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_batch_wo_zero_is_standardised_over_nontrivial(device, backend):
    gen = torch.Generator().manual_seed(2)
    rewards, gid = random_batch(200, gen)
    out = check(rewards, gid, "batch_wo_zero", device, backend)
    nz = out != 0
    assert abs(out[nz].mean().item()) < 1e-4 and abs(out[nz].std(unbiased=False).item() - 1) < 1e-3


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_many_rollouts(device, backend):
    """65,536+ rollouts, contiguous equal groups of 8 (the common layout) and shuffled."""
    gen = torch.Generator().manual_seed(4)
    n = 70_000
    gid = torch.arange(n) // 8
    rewards = torch.randint(0, 2, (n,), generator=gen).float()
    for mode in ("batch_wo_zero", "group"):
        check(rewards, gid, mode, device, backend)
    perm = torch.randperm(n, generator=gen)
    check(rewards[perm], gid[perm] * 7919 - 3, "batch_wo_zero", device, backend)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-3, 3), st.sampled_from([0.0, 1.0, 0.5, -2.0])), min_size=1, max_size=40),
    st.sampled_from(MODES),
)
def test_property_torch(pairs, mode):
    gid = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    rewards = torch.tensor([p[1] for p in pairs])
    check(rewards, gid, mode, "cpu", "torch")


def test_bad_inputs():
    r = torch.rand(4)
    g = torch.arange(4)
    with pytest.raises(ValueError, match="mode"):
        K.normalize_advantages(r, g, mode="batch")
    with pytest.raises(ValueError, match="group_ids"):
        K.normalize_advantages(r, torch.arange(5))
    with pytest.raises(TypeError, match="group_ids"):
        K.normalize_advantages(r, g.float())
    with pytest.raises(TypeError, match="rewards"):
        K.normalize_advantages(g, g)
    with pytest.raises(ValueError, match="group_ids is on meta"):
        K.normalize_advantages(r, g.to("meta"))
    assert K.normalize_advantages(torch.empty(0), torch.empty(0, dtype=torch.int64)).numel() == 0


@INTERP
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_programs", [2, 5])
def test_multi_program_logic_interp(mode, n_programs):
    """The GPU launch uses one program per SM with grid barriers; the interpreter cannot run a
    grid barrier, so run the same phases as separate launches over several programs."""
    from zppo_fast.kernels.advantages import _advantages_triton

    gen = torch.Generator().manual_seed(n_programs)
    rewards, gid = random_batch(900, gen)
    out = _advantages_triton(rewards, gid, mode, 1e-6, n_programs=n_programs, launch="phased")
    torch.testing.assert_close(out, K.advantages_reference(rewards, gid, mode=mode), rtol=1e-4, atol=2e-5)


@INTERP
@pytest.mark.parametrize("mode", MODES)
def test_cooperative_single_launch_interp(mode):
    """The cooperative path: all five phases in one launch, through every grid barrier (one
    program: the interpreter runs programs one after another, so more would wait forever), with
    the cooperative launch option passed as on the GPU; and the same batch phased."""
    from zppo_fast.kernels.advantages import _advantages_triton

    gen = torch.Generator().manual_seed(17)
    rewards, gid = random_batch(300, gen, max_size=5)
    ref = K.advantages_reference(rewards, gid, mode=mode)
    for launch in ("cooperative", "phased"):
        out = _advantages_triton(rewards, gid, mode, 1e-6, n_programs=1, launch=launch)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5, msg=lambda m, launch=launch: f"{launch}: {m}")
    with pytest.raises(ValueError, match="launch"):
        _advantages_triton(rewards, gid, mode, 1e-6, launch="persistent")


def test_launch_choice_off_the_gpu_is_phased():
    """Off CUDA (and in the interpreter) the kernel can only run phased; nothing is probed."""
    from zppo_fast.kernels.advantages import _LAUNCH, advantages_launch

    assert advantages_launch(torch.device("cpu")) == "phased" and "cpu" not in _LAUNCH


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
def test_cuda_launch_probe_lets_out_of_memory_through(monkeypatch):
    """An OutOfMemoryError in the cooperative probe propagates and records no launch mode."""
    from zppo_fast.kernels import advantages as AD

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(AD, "_LAUNCH", {})
    monkeypatch.setattr(AD, "_run_kernel", oom)
    with pytest.raises(torch.OutOfMemoryError):
        AD.advantages_launch(torch.device("cuda"))
    assert AD._LAUNCH == {}


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
def test_cuda_phased_and_cooperative_match(monkeypatch, caplog):
    """Both launches on the GPU: the probed default (reported once) and forced phased."""
    import logging

    from zppo_fast.kernels import advantages as AD

    gen = torch.Generator().manual_seed(8)
    rewards, gid = random_batch(3000, gen)
    monkeypatch.setattr(AD, "_LAUNCH", {})
    with caplog.at_level(logging.INFO, logger="zppo_fast.kernels"):
        for mode in MODES:
            check(rewards, gid, mode, "cuda", "triton")
    chosen = AD._LAUNCH[str(rewards.cuda().device)]
    assert sum("normalize_advantages" in r.getMessage() and chosen in r.getMessage() for r in caplog.records) == 1
    for mode in MODES:
        out = AD._advantages_triton(rewards.cuda(), gid.cuda(), mode, 1e-6, launch="phased")
        torch.testing.assert_close(out.cpu(), K.advantages_reference(rewards, gid, mode=mode), rtol=1e-4, atol=2e-5)
    monkeypatch.setattr(AD, "_LAUNCH", {})
    monkeypatch.setenv("ZPPO_ADVANTAGES_PHASED", "1")
    check(rewards, gid, "batch_wo_zero", "cuda", "triton")
    assert AD._LAUNCH[str(rewards.cuda().device)] == "phased"


if NEEDS_INTERPRETER_CHILD:

    def test_interpreter_cases_in_child_process():
        """Triton was imported before tests/conftest.py could set TRITON_INTERPRET=1, so
        the interpreter cases above skip in this process: run them in a child that has it."""
        run_interpreter_cases_in_child(__file__)
