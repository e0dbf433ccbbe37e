"""The SGLang engine: its pure parts on any machine, the engine itself where sglang and a GPU are."""

import importlib.util
import subprocess
import sys
import threading
import time

import pytest
import torch

from zppo_fast.engine import KV_CACHE, WEIGHTS, SamplingParams, check_push
from zppo_fast.sglang_engine import (
    EngineDiedError,
    SGLangEngineConfig,
    check_architectures,
    check_sglang_result,
    dead_pids,
    engine_args,
    import_sglang,
    mem_fraction_static,
    model_architectures,
    parse_output,
    request_sampling,
    step_order,
    teacher_placement,
)
from zppo_fast.weight_sync import flatten_bucket, unflatten_bucket

HAS_SGLANG_GPU = torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None


def test_request_sampling_keeps_vision_tokens_out():
    """Every request of a VLM engine bans its vision tokens through SGLang's logit_bias (string keys);
    a text engine's carry none. Seeds differ per request; top_k None becomes SGLang's -1."""
    params = SamplingParams(temperature=0.7, top_k=None, max_new_tokens=5, seed=2)
    vlm = request_sampling(params, 9, [300, 301, 302, 303], 3)
    assert [r["sampling_seed"] for r in vlm] == [2 * 1_000_003 + i for i in range(3)]
    for r in vlm:
        assert r["logit_bias"] == {"300": -1e9, "301": -1e9, "302": -1e9, "303": -1e9}
        assert r["top_k"] == -1 and r["stop_token_ids"] == [9] and r["temperature"] == 0.7
    assert all("logit_bias" not in r for r in request_sampling(params, 9, [], 2))


def node(mode, local_world_size, gpus_per_node, tp=1):
    return [teacher_placement(mode, r, local_world_size, gpus_per_node, tp) for r in range(local_world_size)]


@pytest.mark.parametrize("mode,world,gpus,tp", [("colocated", 8, 8, 1), ("colocated", 8, 8, 2),
                                                ("dedicated", 6, 8, 1), ("dedicated", 6, 8, 2),
                                                ("colocated", 1, 1, 1)])
def test_placement_gpus_in_range(mode, world, gpus, tp):
    engines = [e for p in node(mode, world, gpus, tp) for e in p if e is not None]
    for e in engines:
        assert 0 <= e.base_gpu_id and e.base_gpu_id + e.tp_size <= gpus
        assert e.gpus == list(range(e.base_gpu_id, e.base_gpu_id + e.tp_size))
    students = [p.student for p in node(mode, world, gpus, tp)]
    assert [s.base_gpu_id for s in students] == list(range(world)) and {s.tp_size for s in students} == {1}
    teachers = [e for e in engines if e.role == "teacher"]
    teacher_gpus = [g for t in teachers for g in t.gpus]
    assert len(teacher_gpus) == len(set(teacher_gpus)), "no GPU in two teacher engines"
    if mode == "dedicated":
        assert sorted(teacher_gpus) == list(range(world, gpus)), "teachers on exactly the GPUs training leaves"
    else:
        assert sorted(teacher_gpus) == list(range(world))


def test_placement_examples_and_errors():
    p = teacher_placement("dedicated", 1, 6, 8, teacher_tp_size=1)
    assert p.student.base_gpu_id == 1
    assert (p.teacher.base_gpu_id, p.teacher.tp_size) == (7, 1)
    assert teacher_placement("dedicated", 2, 6, 8).teacher is None  # two teacher engines, owned by ranks 0, 1
    assert teacher_placement("colocated", 3, 8, 8, teacher_tp_size=2).teacher is None
    assert teacher_placement("colocated", 2, 8, 8, teacher_tp_size=2).teacher.gpus == [2, 3]
    with pytest.raises(ValueError, match="'colocated' or 'dedicated'"):
        teacher_placement("shared", 0, 2, 2)
    with pytest.raises(ValueError, match="dedicated teacher"):
        teacher_placement("dedicated", 0, 8, 8)
    with pytest.raises(ValueError, match="dedicated teacher"):
        teacher_placement("dedicated", 0, 5, 8, teacher_tp_size=2)
    with pytest.raises(ValueError, match="colocated teacher"):
        teacher_placement("colocated", 0, 6, 8, teacher_tp_size=4)
    with pytest.raises(ValueError, match="local_rank"):
        teacher_placement("colocated", 8, 8, 8)


def test_mem_fraction_static():
    assert mem_fraction_static(30 << 30, 60 << 30) == 0.5
    with pytest.raises(ValueError):
        mem_fraction_static(70 << 30, 60 << 30)


def test_step_order():
    plain, with_teacher = step_order(False), step_order(True)
    assert [(a.engine, a.op) for a in plain] == [("student", "generate"), ("student", "release"), ("trainer", "train"),
                                                 ("student", "resume"), ("student", "push"),
                                                 ("student", "flush_cache"), ("student", "resume")]
    assert [a.tags for a in plain if a.op == "resume"] == [(WEIGHTS,), (KV_CACHE,)]
    assert not any(a.engine == "teacher" for a in plain)
    ops = [(a.engine, a.op) for a in with_teacher]
    assert ops.index(("teacher", "resume")) < ops.index(("teacher", "generate")) < ops.index(("teacher", "release"))
    assert ops.index(("teacher", "release")) < ops.index(("trainer", "train"))
    # The student's weights are pushed after they are resumed and before the KV cache comes back.
    resumes = [i for i, a in enumerate(with_teacher) if a == ("student", "resume", (WEIGHTS,))]
    assert resumes[0] < ops.index(("student", "push")) < ops.index(("student", "flush_cache")) < len(ops) - 1
    assert with_teacher[-1].tags == (KV_CACHE,)


def test_engine_args_student_and_teacher():
    s, t = teacher_placement("colocated", 1, 2, 2)
    student = engine_args(SGLangEngineConfig("/m/student", s, mem_fraction_static=0.3, port=31000, nccl_port=31001))
    teacher = engine_args(SGLangEngineConfig("/m/teacher", t, deterministic=True, extra_args={"context_length": 4096}))
    assert student["load_format"] == "dummy" and not student["enable_weights_cpu_backup"]
    assert teacher["load_format"] == "auto" and teacher["enable_weights_cpu_backup"]
    for args, p in ((student, s), (teacher, t)):
        assert args["enable_memory_saver"] and args["skip_tokenizer_init"]
        # The engine's process sees only its own GPUs: SGLang counts from 0 there.
        assert (args["base_gpu_id"], args["tp_size"]) == (0, p.tp_size)
    assert (student["port"], student["nccl_port"]) == (31000, 31001)
    assert not student["enable_deterministic_inference"] and teacher["enable_deterministic_inference"]
    assert student["mem_fraction_static"] == 0.3 and teacher["context_length"] == 4096


# What SGLang 0.5.19's ModelRegistry registers for Qwen3.5 (srt/models/qwen3_5.py's EntryClass), and
# two unrelated architectures: the check is against whatever set the installed SGLang reports.
SGLANG_0_5_19_QWEN = {"Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration", "LlamaForCausalLM",
                      "Qwen3ForCausalLM"}


def test_architecture_check_refuses_what_sglang_does_not_serve(tmp_path):
    from zppo_fast.config import ModelConfig
    from zppo_fast.model import build_tiny_model, save_model
    from zppo_fast.tokenizer import build_tokenizer
    from zppo_fast.vlm import build_tiny_vlm

    tokenizer = build_tokenizer(["1 + 2 = 3", "4 + 5 = 9"] * 20, vocab_size=300)
    save_model(build_tiny_model(ModelConfig(hidden_size=32, num_layers=4), tokenizer), tokenizer, tmp_path / "text")
    vlm, _ = build_tiny_vlm(tokenizer)
    save_model(vlm, tokenizer, tmp_path / "vlm")
    assert model_architectures(tmp_path / "text") == ["Qwen3_5ForCausalLM"]
    check_architectures(tmp_path / "vlm", SGLANG_0_5_19_QWEN, "0.5.19")  # served: no error
    with pytest.raises(ValueError, match=r"text/config.json: architectures \['Qwen3_5ForCausalLM'\] are not served by "
                                         r"the installed SGLang 0.5.19 .*Qwen3_5ForCausalLM class is not registered"):
        check_architectures(tmp_path / "text", SGLANG_0_5_19_QWEN, "0.5.19")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text('{"model_type": "qwen3_5"}')
    with pytest.raises(ValueError, match=r'bare/config.json: no "architectures" list'):
        model_architectures(tmp_path / "bare")


def test_sglang_results_are_asserted():
    """The statuses SGLang's control calls return: (success, message) from update_weights_from_tensor,
    FlushCacheReqOutput(success, message) from flush_cache (its fields, as a dataclass here)."""
    from dataclasses import dataclass

    @dataclass
    class FlushCacheReqOutput:
        success: bool
        message: str = ""

    check_sglang_result("update_weights_from_tensor", (True, "Succeeded to update model weights."), "eng")
    check_sglang_result("flush_cache", FlushCacheReqOutput(True), "eng")
    with pytest.raises(RuntimeError, match="eng: update_weights_from_tensor failed: Failed to load: size mismatch"):
        check_sglang_result("update_weights_from_tensor", (False, "Failed to load: size mismatch"), "eng")
    with pytest.raises(RuntimeError, match=r"eng: flush_cache failed: \(no message\)"):
        check_sglang_result("flush_cache", FlushCacheReqOutput(False), "eng")
    with pytest.raises(RuntimeError, match="eng: flush_cache returned None, not a success status"):
        check_sglang_result("flush_cache", None, "eng")


def test_flat_bucket_round_trip():
    g = torch.Generator().manual_seed(0)
    bucket = [("a", torch.randn(3, 5, generator=g)), ("b", torch.randn(7, generator=g)),
              ("c", torch.randn(2, 1, 4, generator=g)), ("d", torch.randn(1, generator=g))]
    flat, entries = flatten_bucket(bucket)
    assert flat.shape == (15 + 7 + 8 + 1,) and flat.dtype == torch.float32
    assert [(e.start_idx, e.end_idx) for e in entries] == [(0, 15), (15, 22), (22, 30), (30, 31)]
    back = unflatten_bucket(flat, entries)
    assert [n for n, _ in back] == ["a", "b", "c", "d"]
    for (_, t), (_, u) in zip(bucket, back):
        assert u.shape == t.shape and torch.equal(u, t)
    with pytest.raises(ValueError, match="one dtype"):
        flatten_bucket([("a", torch.zeros(2)), ("b", torch.zeros(2, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="empty"):
        flatten_bucket([])


def test_push_checks_list_every_unknown_name():
    shapes = {"w": torch.Size([2, 3]), "b": torch.Size([3])}
    check_push([("w", torch.Size([2, 3]))], shapes, "eng")
    with pytest.raises(ValueError, match=r"eng: 2 pushed weight name\(s\) unknown.*\['x', 'y'\]"):
        check_push([("w", torch.Size([2, 3])), ("y", torch.Size([1])), ("x", torch.Size([1]))], shapes, "eng")
    with pytest.raises(ValueError, match=r"b: pushed \(4,\), engine has \(3,\)"):
        check_push([("b", torch.Size([4]))], shapes, "eng")


def test_parse_output():
    out = {"output_ids": [5, 9, 2], "meta_info": {"finish_reason": {"type": "stop", "matched": 2},
                                                  "output_token_logprobs": [(-0.5, 5, None), (-1.25, 9, None),
                                                                            (-0.01, 2, None)]}}
    assert parse_output(out, "eng") == ([5, 9, 2], "stop", [-0.5, -1.25, -0.01])
    out["meta_info"]["finish_reason"] = {"type": "abort", "message": "scheduler gone"}
    with pytest.raises(EngineDiedError, match="eng: .*abort"):
        parse_output(out, "eng")


class RecordingSGLang:
    """Stands in for `sglang.Engine.generate` (SGLang runs on GPUs only): records each call and
    answers every sampling request with one EOS token, its log-prob made from the request's seed."""

    def __init__(self):
        self.calls = []

    def generate(self, input_ids, sampling_params, **kwargs):
        self.calls.append((input_ids, sampling_params))
        if isinstance(sampling_params, dict):  # the prefill-only request
            assert sampling_params["max_new_tokens"] == 0
            return [{"meta_info": {"prompt_tokens": len(p)}} for p in input_ids]
        return [{"meta_info": {"prompt_tokens": len(p), "finish_reason": {"type": "stop"},
                               "output_token_logprobs": [(-sp["sampling_seed"] / 1e7, 2, None)]}}
                for p, sp in zip(input_ids, sampling_params)]


@pytest.mark.parametrize("n", [1, 4])
def test_each_prompt_is_prefilled_once_before_its_samples(n):
    """With n > 1 every prompt goes first as one prefill-only request (SGLang's radix cache then
    holds it for its n copies, as SGLang does for a request with `n`); each copy has its own seed."""
    from batches import tiny_engine_world

    from zppo_fast.engine import SamplingParams
    from zppo_fast.sglang_engine import SGLangEngine

    tokenizer, _, prompts = tiny_engine_world()
    engine = SGLangEngine.__new__(SGLangEngine)  # without starting SGLang
    engine.name, engine.tokenizer, engine._child_pids = "stand-in", tokenizer, []
    engine._released, engine._weights_valid, engine._engine = set(), True, RecordingSGLang()
    engine.forbidden = []  # a text model: no vision tokens to ban
    out = engine.generate(prompts, SamplingParams(n=n, seed=3))
    calls = engine._engine.calls
    assert len(calls) == (2 if n > 1 else 1)
    if n > 1:
        assert calls[0] == (prompts, {"max_new_tokens": 0})
    ids, sampling = calls[-1]
    assert ids == [p for p in prompts for _ in range(n)]
    assert len({sp["sampling_seed"] for sp in sampling}) == len(ids)
    assert [len(g) for g in out] == [n] * len(prompts)


def test_dead_pids_sees_a_killed_process():
    """The liveness check that precedes every SGLang call, on a real child process."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert dead_pids([child.pid]) == []
        child.kill()
        child.wait()  # reaped: /proc has no entry any more
        assert dead_pids([child.pid]) == [child.pid]
    finally:
        child.kill()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while not dead_pids([zombie.pid]):  # exits, and stays a zombie until waited for
        time.sleep(0.01)
    zombie.wait()


def test_missing_sglang_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)  # makes `import sglang` raise ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[sglang\]"'):
        import_sglang()


# ------------------------------------------------------------------------------------------------
# The engine itself (skipped without sglang and a GPU). SGLang serves Qwen3.5 as the
# image-text-to-text model only, so these start the tiny VLM.

gpu = pytest.mark.skipif(not HAS_SGLANG_GPU, reason="needs sglang and a CUDA GPU")


@pytest.fixture
def tiny_vlm(tmp_path):
    from zppo_fast.data import tokenizer_corpus
    from zppo_fast.model import save_model
    from zppo_fast.task import ArithmeticTask
    from zppo_fast.tokenizer import build_tokenizer
    from zppo_fast.vlm import build_tiny_vlm, vlm_prompt

    task = ArithmeticTask(max_operand=50)
    tokenizer = build_tokenizer(tokenizer_corpus(task, size=500), vocab_size=400)
    model, processor = build_tiny_vlm(tokenizer, seed=1)
    save_model(model, tokenizer, tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    prompts = [vlm_prompt(processor, task.problem(q).question).input_ids for q in (3, 1000)]
    return tmp_path, model, processor, prompts


def make_engine(tmp_path, role, model):
    from zppo_fast.sglang_engine import EnginePlacement, start_sglang_engine
    from zppo_fast.weight_sync import weight_shapes

    return start_sglang_engine(SGLangEngineConfig(str(tmp_path / "model"), EnginePlacement(role, 0, 1),
                                                  mem_fraction_static=0.15, log_path=str(tmp_path / f"{role}.log")),
                               weight_shapes(model))


@gpu
def test_student_refuses_to_generate_before_a_push_and_while_released(tiny_vlm):
    from zppo_fast.engine import SamplingParams
    from zppo_fast.weight_sync import iter_weight_buckets

    tmp_path, model, _, prompts = tiny_vlm
    eng = make_engine(tmp_path, "student", model)
    try:
        with pytest.raises(RuntimeError, match="no complete weight push"):
            eng.generate(prompts, SamplingParams())
        eng.update_weights(iter_weight_buckets(model.cuda(), dtype=torch.bfloat16))
        eng.release_memory()
        with pytest.raises(RuntimeError, match="released"):
            eng.generate(prompts, SamplingParams())
        with pytest.raises(RuntimeError, match="resume 'weights' first"):
            eng.update_weights(iter_weight_buckets(model, dtype=torch.bfloat16))
    finally:
        eng.shutdown()


@gpu
def test_teacher_keeps_weights_across_release_and_release_waits_for_generate(tiny_vlm):
    from zppo_fast.engine import SamplingParams

    tmp_path, model, _, prompts = tiny_vlm
    eng = make_engine(tmp_path, "teacher", model)
    try:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
        before = eng.generate(prompts, greedy)
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("out", eng.generate(prompts * 8, greedy)))
        worker.start()
        eng.release_memory()  # waits for the generate in flight, never cuts it
        worker.join()
        assert result["out"][: len(prompts)] == before
        eng.resume_memory()
        assert eng.generate(prompts, greedy) == before
    finally:
        eng.shutdown()


@gpu
def test_image_prompts_are_sampled_from_the_trainers_ids(tiny_vlm):
    """SGLang runs an image prompt as exactly the ids the trainer trains on (the processor's output
    goes with the ids, so SGLang does not re-tokenize them), and samples from it."""
    from PIL import Image

    from zppo_fast.engine import SamplingParams
    from zppo_fast.vlm import vlm_prompt

    tmp_path, model, processor, text_prompts = tiny_vlm
    images = [[Image.new("RGB", (64, 48), (200, 30, 30))], []]
    prompts = [vlm_prompt(processor, "What color is this?", images[0]).input_ids, text_prompts[0]]
    eng = make_engine(tmp_path, "teacher", model)
    try:
        assert eng.call("prompt_ids", prompts, images) == prompts
        groups = eng.generate(prompts, SamplingParams(n=2, max_new_tokens=4), images=images)
        assert [len(g) for g in groups] == [2, 2]
    finally:
        eng.shutdown()


@gpu
def test_a_killed_scheduler_becomes_engine_died_error(tiny_vlm):
    """SGLang's scheduler is killed: its SIGQUIT ends the engine's process (not the trainer's), and
    the next call raises EngineDiedError."""
    import os
    import signal

    from zppo_fast.engine import SamplingParams

    tmp_path, model, _, prompts = tiny_vlm
    eng = make_engine(tmp_path, "teacher", model)
    try:
        children = [int(p) for p in open(f"/proc/{eng.pid}/task/{eng.pid}/children").read().split()]
        os.kill(children[0], signal.SIGKILL)
        with pytest.raises(EngineDiedError):
            for _ in range(30):
                eng.generate(prompts, SamplingParams(max_new_tokens=2))
                time.sleep(1)
    finally:
        eng.shutdown()
