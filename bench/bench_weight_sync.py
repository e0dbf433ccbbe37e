"""Weight resync from the trainer into the rollout engine: seconds per push, per bucket size.

With a CUDA GPU and sglang: a Qwen3.5-architecture student at 0.8B / 2B / 9B scale (random bf16
weights on the GPU; with a one-block vision tower, as SGLang serves Qwen3.5 only as the
image-text-to-text model) is pushed into a colocated SGLang student engine in its own process
(`start_sglang_engine(...).update_weights`: bucketing, flattening, CUDA-IPC send, load, each load's
status checked, one cache flush) at bucket sizes 128 / 512 / 2048 MB.
The target is under 0.5 s for 0.8B on one H100. With a GPU but no sglang: the gather-and-bucket
part only (`iter_weight_buckets` + `flatten_bucket` of each bucket). Without a GPU: the same on the
CPU for the tiny model, in one process and gathered from FSDP2 over 2 gloo ranks; this says nothing
about the GPU target.

The built-in shapes are the Qwen3.5 layout (3 Gated-DeltaNet layers per full-attention layer,
vocab 248,320) at sizes chosen to give about 0.8B / 2B / 9B parameters; they are not the published
configs. Pass `--config DIR` (a local HF folder's config.json) to time a real model's shapes.

    python bench/bench_weight_sync.py            # print the table
    python bench/bench_weight_sync.py --record   # also write the "## Weight sync" section of bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from zppo_fast.weight_sync import flatten_bucket, iter_weight_buckets, weight_shapes

BUCKET_MB = (128, 512, 2048)
REPEATS = 3
# (hidden, layers, intermediate): about 0.8B, 2B and 9B parameters with the Qwen3.5 layout below.
SHAPES = {"0.8B": (1024, 24, 3584), "2B": (2048, 22, 6144), "9B": (4096, 28, 11008)}


def qwen35_config(hidden: int, layers: int, intermediate: int):
    from transformers import Qwen3_5TextConfig

    pattern = ["linear_attention"] * 3 + ["full_attention"]
    return Qwen3_5TextConfig(
        vocab_size=248_320, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        layer_types=[pattern[i % 4] for i in range(layers)], num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 1024), head_dim=256, linear_num_key_heads=16,
        linear_num_value_heads=hidden // 64, linear_key_head_dim=128, linear_value_head_dim=128,
        tie_word_embeddings=hidden <= 2048, dtype="bfloat16")


def random_model(config, device: str):
    """A model of `config` (causal LM, or image-text-to-text with a vision config) with random bf16
    weights on `device`, built without a CPU copy."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def servable_folder(text_config) -> tuple[object, str]:
    """SGLang serves Qwen3.5 only as the image-text-to-text model (its text-only class is not
    registered): `text_config` wrapped with a one-block vision tower and multimodal rotary sections
    as in the published configs, saved with the tiny in-process processor (a push reads no tokens).
    Returns (config, folder)."""
    from transformers import Qwen3_5Config, Qwen3_5VisionConfig

    from zppo_fast.vlm import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, build_processor

    processor = build_processor(tiny_tokenizer())
    tok = processor.tokenizer
    text_config.rope_parameters = {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                                   "mrope_section": [11, 11, 10], "mrope_interleaved": True}
    vision = Qwen3_5VisionConfig(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                                 spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text_config.hidden_size,
                                 num_position_embeddings=64)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           [("vision_start_token_id", VISION_START), ("vision_end_token_id", VISION_END),
            ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD)]}
    config = Qwen3_5Config(text_config=text_config, vision_config=vision, dtype="bfloat16", **ids)
    config.architectures = ["Qwen3_5ForConditionalGeneration"]  # what SGLang picks its model class by
    folder = tempfile.mkdtemp()
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return config, folder


def time_it(fn, sync) -> float:
    """Median seconds of REPEATS calls after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gather_and_bucket(model, bucket_bytes: int) -> None:
    for bucket in iter_weight_buckets(model, bucket_bytes):
        flatten_bucket(bucket)


def bench_gpu(configs: dict, with_sglang: bool) -> list[str]:
    rows = []
    for label, config in configs.items():
        folder = None
        if with_sglang:
            config, folder = servable_folder(config)
        model = random_model(config, "cuda")
        params = sum(p.numel() for p in model.parameters())
        engine = None
        if with_sglang:
            from zppo_fast.sglang_engine import EnginePlacement, SGLangEngineConfig, start_sglang_engine

            engine = start_sglang_engine(SGLangEngineConfig(folder, EnginePlacement("student", 0, 1),
                                                            mem_fraction_static=0.3), weight_shapes(model))
        for mb in BUCKET_MB:
            if engine is not None:
                s = time_it(lambda e=engine, m=model, b=mb << 20: e.update_weights(iter_weight_buckets(m, b)),
                            torch.cuda.synchronize)
            else:
                s = time_it(lambda m=model, b=mb << 20: gather_and_bucket(m, b), torch.cuda.synchronize)
            rows.append(f"| {label} | {params / 1e9:.2f}B | {mb} | {s:.3f} |")
            print(rows[-1], flush=True)
        if engine is not None:
            engine.shutdown()
        model = engine = None  # free this shape's weights before building the next
        torch.cuda.empty_cache()
    return rows


def tiny_tokenizer():
    from zppo_fast.data import tokenizer_corpus
    from zppo_fast.task import ArithmeticTask
    from zppo_fast.tokenizer import build_tokenizer

    return build_tokenizer(tokenizer_corpus(ArithmeticTask(max_operand=20), size=200), vocab_size=300)


def tiny_model(seed: int = 0):
    from zppo_fast.config import ModelConfig
    from zppo_fast.model import build_tiny_model

    return build_tiny_model(ModelConfig(hidden_size=64, num_layers=4), tiny_tokenizer(), seed=seed)


def _fsdp_rank(rank: int, port: int, bucket_bytes: int, out: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = tiny_model()
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    s = time_it(lambda: gather_and_bucket(model, bucket_bytes), dist.barrier)
    if rank == 0:
        out["s"] = s
    dist.destroy_process_group()


def bench_cpu() -> list[str]:
    torch.set_num_threads(1)
    model = tiny_model()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for kb in (4, 64, 4096):
        plain = time_it(lambda b=kb << 10: gather_and_bucket(model, b), lambda: None)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = mp.Manager().dict()
        mp.spawn(_fsdp_rank, args=(port, kb << 10, out), nprocs=2, join=True)
        rows.append(f"| tiny (hidden 64) | {params / 1e6:.2f}M | {kb} KB | {plain * 1e3:.2f} ms | {out['s'] * 1e3:.2f} ms |")
        print(rows[-1], flush=True)
    return rows


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores), CPU only"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record(text: str, path: Path) -> None:
    """Replace (or append) this benchmark's own section of RESULTS.md, leaving the rest alone."""
    old = path.read_text()
    section = "## Weight sync\n\n" + text.strip() + "\n"
    pattern = re.compile(r"^## Weight sync\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    new = pattern.sub(lambda _: section + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + section
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help="write the table to bench/RESULTS.md")
    ap.add_argument("--config", help="a local HF model folder whose config.json gives the shapes to time")
    args = ap.parse_args()
    header = f"Device: {device_name()}. Date: {datetime.date.today().isoformat()}.\n" \
             f"Command: `python bench/bench_weight_sync.py{' --config ' + args.config if args.config else ''}" \
             f"{' --record' if args.record else ''}`. Median of {REPEATS} after one warm-up.\n"
    has_sglang = False
    try:
        import sglang  # noqa: F401

        has_sglang = True
    except ImportError:
        pass
    if torch.cuda.is_available():
        from transformers import AutoConfig

        configs = ({"given": AutoConfig.from_pretrained(args.config, local_files_only=True)} if args.config
                   else {k: qwen35_config(*v) for k, v in SHAPES.items()})
        what = ("push into a colocated SGLang student engine (bucket, flatten, CUDA-IPC send, load, one flush)"
                if has_sglang else "gather-and-bucket only (iter_weight_buckets + flatten_bucket; sglang is "
                "not installed, so no push was timed and the 0.5 s target is unmeasured)")
        body = f"Timed: {what}.\n\n| shape | params | bucket MB | seconds |\n|---|---|---|---|\n"
        body += "\n".join(bench_gpu(configs, has_sglang))
    else:
        body = ("No GPU with SGLang was available on this machine, so the push time of the 0.8B / 2B / 9B shapes "
                "and the 0.5 s target for 0.8B on one H100 are unmeasured. What could be measured: gathering and "
                "bucketing (iter_weight_buckets + flatten_bucket of every bucket) of the tiny model on the CPU, "
                "unsharded in one process and from FSDP2 over 2 gloo ranks (rank 0's time; the gather is an "
                "all-gather per parameter). These CPU times say nothing about the GPU target, and the machine was shared "
                "with other jobs, so they are indicative only.\n\n"
                "| model | params | bucket | one process | FSDP2, 2 gloo ranks |\n|---|---|---|---|---|\n")
        body += "\n".join(bench_cpu())
    text = header + "\n" + body
    print(text)
    if args.record:
        record(text, Path(__file__).resolve().parent / "RESULTS.md")


if __name__ == "__main__":
    main()
