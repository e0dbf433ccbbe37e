"""Weight buckets for the rollout engine: bounds, dtype grouping, tied weights, and FSDP2 gathering."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from zppo_fast.config import ModelConfig
from zppo_fast.data import tokenizer_corpus
from zppo_fast.distributed import destroy_distributed
from zppo_fast.model import build_tiny_model
from zppo_fast.task import ArithmeticTask
from zppo_fast.tokenizer import build_tokenizer
from zppo_fast.weight_sync import hf_name, iter_weight_buckets, weight_names, weight_shapes


def tiny(seed: int = 0, tie: bool = False):
    task = ArithmeticTask(max_operand=20)
    tokenizer = build_tokenizer(tokenizer_corpus(task, size=200), vocab_size=300)
    model = build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer, seed=seed)
    if tie:
        # transformers ties lm_head to the input embedding when the config asks for it.
        model.config.tie_word_embeddings = True
        model.tie_weights()
    return model


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("bucket_bytes", [1, 2048, 8192, 1 << 30])
def test_buckets_bounded_complete_and_equal(bucket_bytes):
    model = tiny()
    buckets = list(iter_weight_buckets(model, bucket_bytes))
    for b in buckets:
        assert b, "no empty bucket"
        assert len(b) == 1 or sum(nbytes(t) for _, t in b) <= bucket_bytes
    names = [n for b in buckets for n, _ in b]
    expected = dict(model.named_parameters())
    assert sorted(names) == sorted(expected) and len(names) == len(set(names))
    for b in buckets:
        for n, t in b:
            assert torch.equal(t, expected[n])
    if bucket_bytes == 1:  # every tensor exceeds the bound: one bucket each
        assert len(buckets) == len(expected)
    if bucket_bytes == 1 << 30:
        assert len(buckets) == 1
    if bucket_bytes == 8192:  # the bound packs several tensors together, yet splits the model
        assert 1 < len(buckets) < len(expected)


def test_one_dtype_per_bucket_and_cast():
    model = tiny()
    model.model.layers[1].to(torch.bfloat16)
    buckets = list(iter_weight_buckets(model, 4096))
    assert all(len({t.dtype for _, t in b}) == 1 for b in buckets)
    dtypes = {n: t.dtype for b in buckets for n, t in b}
    assert {dtypes[n] for n in dtypes if n.startswith("model.layers.1.")} == {torch.bfloat16}
    assert {dtypes[n] for n in dtypes if not n.startswith("model.layers.1.")} == {torch.float32}
    cast = list(iter_weight_buckets(model, 4096, dtype=torch.bfloat16, keep=()))
    assert {t.dtype for b in cast for _, t in b} == {torch.bfloat16}
    assert sum(nbytes(t) for b in cast for _, t in b) * 2 == sum(p.numel() for p in model.parameters()) * 4


def test_cast_keeps_full_precision_parameters_in_their_own_dtype():
    """Gated-DeltaNet's A_log, which SGLang keeps in fp32, is never cast: fp32 A_log goes in an
    fp32 bucket with its exact values, and every other tensor is cast to the engine's bf16."""
    model = tiny()
    model.model.layers[1].to(torch.bfloat16)
    buckets = list(iter_weight_buckets(model, 4096, dtype=torch.bfloat16))
    assert all(len({t.dtype for _, t in b}) == 1 for b in buckets)
    cast = {n: t for b in buckets for n, t in b}
    params = dict(model.named_parameters())
    a_log = {n for n in cast if n.endswith(".A_log")}
    assert len(a_log) == 3, "three Gated-DeltaNet layers in the tiny Qwen3.5"
    for n, t in cast.items():
        assert t.dtype == (params[n].dtype if n in a_log else torch.bfloat16), n
    assert {cast[n].dtype for n in a_log} == {torch.float32, torch.bfloat16}  # layer 1's is bf16 already
    assert all(torch.equal(cast[n], params[n]) for n in a_log)


def test_tied_weights_yielded_once():
    model = tiny(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [n for b in iter_weight_buckets(model, 1 << 20) for n, _ in b]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert names == weight_names(model)

    # A tie made by sharing memory between two Parameter objects is found by storage.
    untied = tiny()
    untied.lm_head.weight = torch.nn.Parameter(untied.model.embed_tokens.weight.data)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert "lm_head.weight" not in weight_names(untied)
    assert "lm_head.weight" in weight_names(tiny())


def test_wrapper_prefixes_removed():
    model = tiny()
    compiled = torch.compile(model)  # not run: only the wrapper's `_orig_mod.` name prefix matters
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    assert weight_names(compiled) == weight_names(model)
    assert hf_name("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"


def test_bad_bucket_size():
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(iter_weight_buckets(tiny(), 0))


def _fsdp_worker(rank: int, world: int, port: int, out_dir: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _check_fsdp_gather(world)  # its model and mesh are gone when it returns
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    finally:
        destroy_distributed()


def _check_fsdp_gather(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    reference = {n: p.detach().clone() for n, p in tiny(seed=3).named_parameters()}
    model = tiny(seed=3)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    # Sharded for real: rank-local pieces are smaller than the full tensors.
    assert sum(p.to_local().numel() for p in model.parameters()) < sum(t.numel() for t in reference.values())
    assert weight_shapes(model) == {n: t.shape for n, t in reference.items()}
    buckets = list(iter_weight_buckets(model, bucket_bytes=8192))
    got = {n: t for b in buckets for n, t in b}
    assert sorted(got) == sorted(reference) and len(got) == sum(len(b) for b in buckets)
    for n, t in got.items():
        assert not isinstance(t, DTensor) and torch.equal(t, reference[n]), n
    assert len(buckets) > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_gathered_tensors_equal_unsharded_model(tmp_path):
    """Two gloo ranks shard the tiny model with FSDP2 (per layer + root); both gather every full tensor."""
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert sorted(os.listdir(tmp_path)) == ["ok0", "ok1"]
