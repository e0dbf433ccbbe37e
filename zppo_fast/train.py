"""`[torchrun --nproc_per_node=N -m | python -m] zppo_fast.train [--config FILE] [--resume RUN_DIR] [--section.key VALUE ...]`

The RL trainer for ZPPO and its baselines (`rl.algo`, see zppo_fast/zppo.py). One rollout
step, read top to bottom in `Trainer.step`:

  1. questions   B_new new question ids from the training stream, plus round(rho_replay * B_new)
                 drawn uniformly from the replay buffer (algos with a buffer).
  2. rollouts    G_S samples per question from the rollout engine (temperature 1, top-p 1);
                 reward r in {0, 1} from the grader (`data.grader`; by default the last \\boxed{}
                 answer against the gold answer). Image questions carry their images (VLM students).
  3. teacher     hard questions (accuracy < zppo.hard_threshold, 0.5) get G_T fresh teacher rollouts; compressed
                 candidates make BCQ / NCQ prompts (zppo), or one teacher-correct rollout makes a
                 Hint prompt or a forced Prefix (baselines); capped at rho_aug * B_new, lowest
                 accuracy first; the student samples G_S rollouts on each, as groups of their own.
                 Off-policy distillation instead takes G_T teacher rollouts of every question and
                 trains on the graded-correct ones (the student's rollouts then only feed the
                 replay buffer and the metrics).
  4. advantages  A' = r - mean(group); then, by `rl.advantage_mode`, normalized over the
                 rollout batch without the all-equal groups (REINFORCE++ "Norm w/o Zero",
                 default), with them, not at all, or by the group's std (GRPO).
  5. old log-probs  recomputed by the trainer, under the weights that sampled, for mini-batches
                 2..I only: the first mini-batch is trained before any optimizer step, so its
                 forward's own log-probs are its old ones (ratio 1, as TRL does with one mini-batch);
                 with I = 1 there is no such pass.
  6. update      the batch is split into I mini-batches of whole groups, each kind (new, replayed,
                 BCQ, NCQ, ...) dealt evenly over them by a seeded shuffle: I AdamW steps, one pass.
                 Token-level clipped surrogate (clip-higher eps_low 0.2 / eps_high 0.28,
                 dual-clip 10 for A < 0), no KL, token-mean whose normalizer is the token count
                 of the whole optimizer step, so micro-batching and ranks do not change it.
                 Only the student's own completion tokens are in the loss mask.
                 Distillation (off_distill, on_distill) skips 4-5 and takes ONE optimizer step on
                 the per-token generalized JSD to the frozen teacher's distribution
                 (`zppo.distill_beta`), over the teacher's correct rollouts (off) or the student's
                 own (on): the teacher's hidden states for the same packed micro-batch and its
                 lm_head weight go into the fused JSD. It is a token mean over all of the step's
                 target tokens (the paper averages per question; README, "Where zppo_fast differs").
  7. replay      plain-rollout accuracies admit (< hard_threshold) and graduate (>= it) buffer entries.
  8. resync      the new weights are pushed into the rollout engine, bucket by bucket.
                 With SGLang the engines time-share the GPUs with training: the student's releases
                 its memory after the rollouts and takes it back around the push; the teacher's is
                 resumed only for step 3 (zppo_fast/sglang_engine.py, `step_order`).

Questions: the embedded task (the testbed, zppo_fast/testbed.py: held-out accuracy per family as
`eval/hard_acc` and `eval/easy_acc` with standard errors; or the arithmetic task, zppo_fast/task.py),
or the user's files (`[data] train`,
zppo_fast/file_task.py: validated in one pass at startup, bad rows skipped and counted). Held-out
files (`[data] heldout`) are evaluated every `run.eval_every` steps through the student's engine
(`zppo_fast.eval.evaluate_files`: per-file accuracy as `eval/<name>_acc`, responses under
RUN_DIR/eval/step_N). A vision-language student (`model.path` with a vision tower, zppo_fast/vlm.py)
sees each question's images in every prompt, plain or guided, and in the training forward.

Parallelism: every run is a torch.distributed world (of one without torchrun). The student is
sharded with FSDP2 (zppo_fast/parallelize.py); rollouts are data parallel (each rank samples
its share of the prompts, then all ranks hold the whole step: zppo_fast/data_parallel.py), so
questions, advantages and replay decisions are computed identically on every rank. Each
mini-batch is dealt to the ranks balanced by tokens and packed into micro-batches of at most
`parallel.max_tokens_per_microbatch` positions (zppo_fast/batch.py, zppo_fast/packing.py); with
`parallel.share_prefix` (the CPU default) a group's prompt is laid out once, its responses after it
(zppo_fast/shared_prefix.py), and the rollout engine prefills each prompt once for its G samples.

The policy loss runs through `zppo_fast.kernels.fused_linear_policy_loss` (distillation:
`fused_linear_jsd`): the model returns hidden states and the lm_head weight goes into the fused
loss, so no [tokens, vocab] logits are ever held, of the student or the teacher. Checkpoints
(torch.distributed.checkpoint) every `run.checkpoint_every` steps; `--resume` continues exactly,
at any world size.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from zppo_fast import ownership
from zppo_fast.baselines import GuidanceSettings, HintPrefixBuilder, check_shared_vocab, distillation_data
from zppo_fast.batch import Rollout, RolloutBatch
from zppo_fast.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_sharded,
    read_trainer_state,
    save_checkpoint,
    set_rng_state,
)
from zppo_fast.cli import Parser
from zppo_fast.config import Config, ConfigError, check_config
from zppo_fast.data import QuestionStream, chat_prompt_ids
from zppo_fast.data_parallel import DataParallelEngine
from zppo_fast.datasets import Columns, DatasetError, DatasetFile
from zppo_fast.distributed import cpu_threads, destroy_distributed, init_distributed
from zppo_fast.engine import (
    KV_CACHE,
    PUSH_CHECK_TOLERANCE,
    WEIGHTS,
    SamplingParams,
    TransformersEngine,
    build_transformers_engine,
    check_push_took_effect,
)
from zppo_fast.engine_process import EngineProcess
from zppo_fast.eval import accuracy_metrics, eval_sampling_params, evaluate_files, heldout_rewards, pair_graders
from zppo_fast.file_task import FileTask, grade_item
from zppo_fast.graders import CountingGrader, get_grader
from zppo_fast.kernels import (
    describe_backend,
    fused_linear_jsd,
    fused_linear_policy_loss,
    linear_logprobs,
    normalize_advantages,
)
from zppo_fast.metrics import MetricsLogger, import_wandb, peak_memory_mb
from zppo_fast.model import (
    ModelLoadError,
    Policy,
    attention_kernel,
    declared_dtype,
    load_model,
    load_tokenizer,
    model_from_config,
    read_state_dict,
)
from zppo_fast.parallelize import load_full_state, parallelize
from zppo_fast.replay import PromptReplayBuffer
from zppo_fast.report import format_table, write_report
from zppo_fast.reward import final_answer
from zppo_fast.sft import prepare_warm_starts
from zppo_fast.task import ArithmeticTask, Problem
from zppo_fast.testbed import TestbedTask, embedded_task
from zppo_fast.vlm import VLMPolicy, VLMPrompt, is_vlm, load_processor, vlm_prompt
from zppo_fast.weight_sync import iter_weight_buckets, weight_names, weight_shapes
from zppo_fast.zppo import ALGOS, Reformulator, aug_cap, grader_scores, replay_count

# Loss statistics, summed over tokens by the fused losses -> metric names (token means).
POLICY_METRICS = {"loss": "loss/policy", "clip_low": "loss/clip_frac_low", "clip_high": "loss/clip_frac_high",
                  "dual_clip": "loss/dual_clip_frac", "ratio": "loss/ratio_mean", "approx_kl": "loss/approx_kl"}
DISTILL_METRICS = {"loss": "loss/jsd", "forward_kl": "loss/forward_kl", "reverse_kl": "loss/reverse_kl"}
# config.json's key for what the run chose where the config left it open (not a config section).
RESOLVED = "resolved"
# `update`'s entropy sum (all ranks) over its first mini-batch, computed before any optimizer step;
# `step` folds it into rollout/entropy, as the old-log-prob pass no longer covers that mini-batch.
FIRST_ENTROPY = "entropy_sum/first_minibatch"


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient norm (rl.on_nonfinite = "stop"); the message names the
    step and the metric."""


def check_same_vision(algo: str, student, teacher_processor, teacher_dir: Path) -> None:
    """Distillation of a VLM student: the teacher scores the student's image rows (its pixel patches and
    their placeholders), so it must be a VLM whose vision tower cuts images as the student's does."""
    if teacher_processor is None:
        raise ConfigError(f"rl.algo = {algo} with a vision-language student needs a vision-language teacher to "
                          f"score its image questions; {teacher_dir} has no vision tower")
    keys = ("patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels")
    s = student.config.vision_config
    t = model_from_config(teacher_dir, "float32", meta=True).config.vision_config
    diff = {k: (getattr(s, k, None), getattr(t, k, None)) for k in keys if getattr(s, k, None) != getattr(t, k, None)}
    if diff:
        raise ConfigError(f"rl.algo = {algo}: the teacher ({teacher_dir}) cuts images unlike the student; "
                          f"(student, teacher) vision settings that differ: {diff}")


class Trainer:
    def __init__(self, cfg: Config, resume: str | Path | None = None, progress: bool = True):
        self.cfg = check_config(cfg)  # load_config checked it; a config changed in code is checked here
        self.algo = ALGOS[cfg.rl.algo]
        if cfg.run.wandb:
            import_wandb()  # a missing package fails now, not after the models have loaded
        # The data files must exist (and be of a known format) before any model loads: a GPU recipe
        # run without its data stops here, naming the file, and never trains on the embedded task,
        # which only an empty data.train asks for.
        for path in [*cfg.data.train, *cfg.data.heldout]:
            DatasetFile(path)

        # 0. The process group (a world of one without torchrun) and this rank's device.
        self.dist = dist = init_distributed(cfg.run.device)
        self.device = dist.device
        self.progress = progress and dist.is_main
        if cfg.rl.batch_size % dist.world_size:
            raise ConfigError(f"rl.batch_size {cfg.rl.batch_size} is not divisible by the world size "
                              f"{dist.world_size}: each rank samples an equal share of the new questions")
        torch.manual_seed(cfg.run.seed)
        torch.set_flush_denormal(True)  # Gated-DeltaNet decay products underflow into slow denormals
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(cfg.run.cpu_threads))
        try:  # the loss and log-prob kernels' backend, and why: printed now and kept in config.json
            self.kernel_backend, why = describe_backend(cfg.parallel.kernel_backend, self.device)
        except RuntimeError as e:
            raise ConfigError(f"parallel.kernel_backend = {cfg.parallel.kernel_backend!r} cannot run here: {e}"
                              ) from None
        self.resolved = {"kernel_backend": self.kernel_backend, "kernel_backend_reason": why}
        if dist.is_main:
            tqdm.write(f"zppo_fast: kernels: {self.kernel_backend} ({why})")

        # 1. The run folder holds the config, metrics.jsonl and checkpoints (rank 0 writes them).
        self.run_dir = Path(resume if resume is not None else cfg.run.out_dir)
        checkpoint = state = None
        if resume is None:
            # Only a folder this trainer made (it holds the ownership marker) is ever replaced: a
            # folder of the user's is refused whatever run.overwrite says (zppo_fast/ownership.py).
            ownership.check_claim(self.run_dir, "run", overwrite=cfg.run.overwrite)
            if (self.run_dir / "checkpoints").exists() and not cfg.run.overwrite:
                raise ConfigError(
                    f"run folder {self.run_dir} already holds checkpoints: pass --resume {self.run_dir}, "
                    "choose another --run.out_dir, or set --run.overwrite true"
                )
            dist.barrier()  # every rank has looked before rank 0 clears the folder
            if dist.is_main:
                ownership.claim(self.run_dir, "run", overwrite=cfg.run.overwrite)
                (self.run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), RESOLVED: self.resolved},
                                                                     indent=2))
        else:
            checkpoint = latest_checkpoint(self.run_dir)
            if dist.is_main:  # this machine's choices replace the earlier ones; the settings stay
                saved = self.run_dir / "config.json"
                saved.write_text(json.dumps({**json.loads(saved.read_text()), RESOLVED: self.resolved}, indent=2))
            state = read_trainer_state(checkpoint)
            if state.get("model_config", asdict(cfg.model)) != asdict(cfg.model):
                diff = {k: (v, getattr(cfg.model, k, None)) for k, v in state["model_config"].items()
                        if getattr(cfg.model, k, None) != v}
                raise CheckpointError(f"checkpoint {checkpoint} is from a different model config "
                                      f"(checkpoint vs now: {diff})")

        # 2. The graders, and the folders the models come from: the frozen teacher's (algos with one,
        #    and the LLM judge when a grader is "judge"): a Hugging Face folder, or the tiny student
        #    architecture with a longer warm-up whose early snapshot is the student; the student's: the
        #    checkpoint being resumed, model.path, or that cached warm-up. Only the tokenizer is read now.
        self.image_pixels = (cfg.data.image_min_pixels, cfg.data.image_max_pixels)  # every VLM processor's bounds
        self.train_grader = cfg.data.grader if cfg.data.train else "boxed"
        self.heldout_grader = cfg.data.heldout_grader or cfg.data.grader
        for name in (cfg.data.grader, self.heldout_grader):
            if ":" in name:  # the user's reward function: imported now, so a typo fails before any model loads
                get_grader(name)
        # "auto" may call the judge (its free-form rows): the teacher is loaded for it, and called only for them.
        judge = bool({"judge", "auto"} & {self.train_grader, *([self.heldout_grader] if cfg.data.heldout else [])})
        tiny_teacher = (self.algo.teacher or judge) and not cfg.zppo.teacher_path
        if (self.algo.distill and tiny_teacher and cfg.model.path
                and is_vlm(model_from_config(cfg.model.path, cfg.model.dtype, meta=True))):
            # Known before the teacher's warm-up is trained (minutes): the warm-up teacher is a text model.
            raise ConfigError(f"rl.algo = {cfg.rl.algo} with a vision-language student needs a vision-language "
                              "teacher to score its image questions; set zppo.teacher_path (the embedded warm-up "
                              "teacher has no vision tower)")
        student_dir, teacher_dir = (self.warm_starts(tiny_teacher) if tiny_teacher or not (checkpoint or cfg.model.path)
                                    else (None, None))
        if self.algo.teacher or judge:
            teacher_dir = cfg.zppo.teacher_path or teacher_dir
        source = checkpoint or Path(cfg.model.path or student_dir)
        self.tokenizer = load_tokenizer(source)

        # 3. The questions, before any model is built (the data files need only the tokenizer): the
        #    user's files, validated in one pass now, or the embedded task; the stream of training
        #    ids, which must hold enough for a step of distinct questions; the embedded task's held-out
        #    sets (testbed: "easy" and "hard"; arithmetic: "heldout"; files: checked to exist at the start
        #    of __init__, and evaluated by zppo_fast.eval).
        self.task = self.make_task()
        self.check_data_size()
        self.stream = QuestionStream(self.task.train_ids(), seed=cfg.run.seed)
        self.heldout = {name: [self.task.problem(q) for q in ids]
                        for name, ids in self.task.heldout_sets(cfg.run.eval_size, cfg.run.seed).items()}
        self.heldout_sets = pair_graders(cfg.data.heldout, [self.heldout_grader]) if cfg.data.heldout else []
        self.heldout_start: dict[str, list[float]] | None = None  # per-question rewards at the first evaluation

        # 4. The frozen teacher's engine (algos with one, and the judge), a full copy on every rank
        #    (the folder above). An image-text-to-text teacher (its config has a vision tower) is
        #    loaded with its processor and sees the questions' images.
        self.teacher_engine = teacher_tok = self.teacher_processor = None
        if teacher_dir is not None:
            teacher_tok = load_tokenizer(teacher_dir)
            if is_vlm(model_from_config(teacher_dir, cfg.model.dtype, meta=True)):
                self.teacher_processor = load_processor(teacher_dir, self.image_pixels)
            self.teacher_engine = self.make_engine("teacher", teacher_dir)
            self.teacher_engine.release_memory()  # a step starts with the teacher's memory free
        self.teacher_tokenizer = teacher_tok

        # 5. The student, built on the meta device, sharded by FSDP2, then filled: from the
        #    checkpoint being resumed (each rank reads its shards), or from a Hugging Face folder /
        #    the cached warm-up (rank 0 reads, every rank receives its shards). A vision-language
        #    student (its config has a vision tower) also needs its processor, from model.path, and
        #    `VLMPolicy`, which runs its image micro-batches through the vision tower.
        self.declared_dtype = declared_dtype(source)  # what checkpoints declare, for export (model.dtype: the masters')
        lm = model_from_config(source, cfg.model.dtype, meta=True,
                               attention=attention_kernel(cfg.parallel.attention, self.device, self.share_prefix))
        self.processor = load_processor(cfg.model.path, self.image_pixels) if is_vlm(lm) else None
        if getattr(self.task, "has_images", False) and self.processor is None:
            row = next(r for r in self.task.records if r.images)
            raise ConfigError(f"{row.source}: a row with images, but the student is a text model; set model.path "
                              "to an image-text-to-text model folder (zppo_fast/vlm.py)")
        self.policy = parallelize((VLMPolicy if self.processor else Policy)(lm), dist.mesh, cfg.parallel, self.device)
        # Responses the grader raises on score 0.0 and are counted (reward/grader_errors); the first is shown.
        self.grader = CountingGrader(get_grader(self.train_grader, **self.judge_kwargs(self.train_grader)),
                                     log=tqdm.write if dist.is_main else lambda _: None)

        # 6. AdamW over the parameter shards, constant learning rate.
        rl = cfg.rl
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=rl.lr, betas=(rl.adam_beta1, rl.adam_beta2), eps=rl.adam_eps,
            weight_decay=rl.weight_decay,
        )
        if checkpoint is not None:
            load_sharded(checkpoint, self.policy, self.optimizer)
        else:
            load_full_state(self.policy, read_state_dict(source) if dist.is_main else None)

        # 7. The student's rollout engine holds its own full copy of the weights, set by pushes.
        self.engine = self.make_engine("student", source)

        # 8. The teacher's part of a step: BCQ / NCQ prompts (Reformulator), Hint or Prefix prompts
        #    (HintPrefixBuilder), or distillation, which compares the two models' distributions id by
        #    id: one shared vocabulary, checked here, and the teacher kept as a model that scores
        #    tokens (`scoring_teacher`).
        #    The teacher's rollouts are graded by the training grader, as the student's are.
        self.guide = self.teacher_lm = None
        teacher_kw = {"seed": cfg.run.seed, "processor": self.teacher_processor, "grade_fn": grader_scores(self.grader)}
        if {"bcq", "ncq"} & set(self.algo.kinds):
            self.guide = Reformulator(self.teacher_engine, teacher_tok, cfg.zppo, self.algo.kinds, **teacher_kw)
        elif self.algo.kinds:  # ("hint",) or ("prefix",)
            self.guide = HintPrefixBuilder(self.algo.kinds[0], self.teacher_engine, teacher_tok, self.tokenizer,
                                           GuidanceSettings.from_config(cfg.zppo), **teacher_kw)
        if self.algo.distill:
            if self.processor is not None:  # the teacher scores the student's image rows: it must read them alike
                check_same_vision(cfg.rl.algo, self.policy.lm, self.teacher_processor, teacher_dir)
            try:
                check_shared_vocab(self.tokenizer, teacher_tok)
            except ValueError as e:
                raise ConfigError(f"rl.algo = {cfg.rl.algo} needs a teacher with the student's tokenizer: {e}") from None
            self.teacher_lm = self.scoring_teacher(teacher_dir)
            if self.teacher_lm.lm_head.shape[0] != self.policy.lm_head.shape[0]:
                raise ConfigError(f"rl.algo = {cfg.rl.algo}: the teacher's lm_head has {self.teacher_lm.lm_head.shape[0]} "
                                  f"rows but the student's {self.policy.lm_head.shape[0]}; they must share one vocabulary")

        # 9. The prompt replay buffer of hard questions (algos with a buffer), the same on every rank.
        self.buffer = None
        if self.algo.replay:
            self.buffer = PromptReplayBuffer(cfg.zppo.replay_capacity, seed=cfg.run.seed,
                                             threshold=cfg.zppo.hard_threshold)

        # 10. On resume: data position, buffer, RNG and step, exactly as they were saved (the data
        #    files must still hold the same records: replayed ids index them), and the first held-out
        #    evaluation's per-question rewards, which later gains are paired with.
        self.step_idx = 0
        if state is not None:
            if state.get("data_fingerprint") != getattr(self.task, "fingerprint", None):
                raise CheckpointError(f"checkpoint {checkpoint} was trained on other data (fingerprint "
                                      f"{state.get('data_fingerprint')}, now {getattr(self.task, 'fingerprint', None)}): "
                                      "the [data] train files or their settings changed")
            self.stream.load_state_dict(state["data"])
            if self.buffer is not None:
                self.buffer.load_state_dict(state["replay"])
            set_rng_state(state["rng"])
            self.step_idx = state["step"]
            self.heldout_start = state.get("heldout_start")
        self.metrics = MetricsLogger(self.run_dir, cfg.run.tensorboard, resume_step=self.step_idx if state else None,
                                     wandb=cfg.run.wandb, wandb_project=cfg.run.wandb_project,
                                     config=cfg.to_dict()) if dist.is_main else None

        # 11. The engine starts from the trainer's weights, and must be seen to sample from them.
        self.push_weights()
        self.check_push()

    def make_engine(self, role: str, folder: Path) -> DataParallelEngine:
        """This rank's rollout engine for `role` ("student" | "teacher"), wrapped for data-parallel
        calls. The student's starts with arbitrary weights until the first push; the teacher's are
        read from `folder` and never change. SGLang engines always run in processes of their own
        (zppo_fast/engine_process.py); the transformers engine in this process or, with
        `rollout.engine_process = "child"`, in one of its own as well."""
        cfg, dist = self.cfg.rollout, self.dist
        processor_path = str(self.cfg.model.path) if role == "student" and self.processor is not None else None
        log_path = self.run_dir / "logs" / f"{role}_rank{dist.rank}.log"
        if cfg.engine == "transformers":
            if cfg.engine_process == "inline":
                engine = build_transformers_engine(str(folder), role, self.cfg.model.dtype, str(self.device),
                                                   cfg.batch_size, processor_path, self.image_pixels, dist.is_main)
                return DataParallelEngine(engine, dist)
            # In its own process the engine sees this rank's GPU only, as cuda:0.
            cuda = self.device.type == "cuda"
            factory = partial(build_transformers_engine, str(folder), role, self.cfg.model.dtype,
                              "cuda" if cuda else "cpu", cfg.batch_size, processor_path, self.image_pixels, dist.is_main)
            return DataParallelEngine(EngineProcess(factory, f"transformers {role} engine (rank {dist.rank})",
                                                    gpus=[dist.local_rank] if cuda else None, log_path=log_path), dist)
        from zppo_fast.sglang_engine import SGLangEngineConfig, import_sglang, start_sglang_engine, teacher_placement

        if self.device.type != "cuda":
            raise ConfigError("rollout.engine = sglang runs on CUDA GPUs; use rollout.engine = transformers on the CPU")
        import_sglang()  # fails here, naming the extra to install, before any engine starts
        placement = teacher_placement(cfg.teacher_placement, dist.local_rank,
                                      int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)),
                                      torch.cuda.device_count(), cfg.teacher_tp_size)
        mine = placement.student if role == "student" else placement.teacher
        owners = [r for r, owns in enumerate(dist.all_gather(mine is not None)) if owns]
        engine = None
        if mine is not None:
            engine = start_sglang_engine(
                SGLangEngineConfig(str(folder), mine, cfg.student_mem_fraction if role == "student"
                                   else cfg.teacher_mem_fraction, random_seed=self.cfg.run.seed,
                                   deterministic=cfg.reproducible, processor_path=processor_path,
                                   image_pixels=self.image_pixels, log_path=str(log_path)),
                expected=weight_shapes(self.policy.lm) if role == "student" else {})
        return DataParallelEngine(engine, dist, owners)

    def shutdown_engines(self) -> None:
        """Shut down the engines that run in processes of their own (those left at exit are ended
        by their finalizers, without a graceful engine shutdown)."""
        for wrapped in (self.engine, self.teacher_engine):
            if isinstance(getattr(wrapped, "engine", None), EngineProcess):
                wrapped.engine.shutdown()

    def scoring_teacher(self, folder: Path) -> Policy:
        """The frozen teacher as the distillation loss reads it: a packed micro-batch in, final
        hidden states out (`Policy` makes its Gated-DeltaNet mixers packing-safe), plus lm_head.

        With the transformers engine this is the engine's own model (no extra memory). SGLang keeps
        its weights outside this process, so a copy is loaded for scoring only: a full teacher on
        every rank, resident for the run, at `model.dtype` (2 bytes per parameter in bfloat16, e.g.
        18 GB for a 9B teacher, 54 GB for 27B) on top of the SGLang engines' memory fractions.
        """
        engine = self.teacher_engine.engine
        if isinstance(engine, TransformersEngine):
            model = engine.model
        else:
            model = load_model(folder, self.cfg.model.dtype)[0].to(self.device).eval().requires_grad_(False)
        return (VLMPolicy if is_vlm(model) else Policy)(model)  # a VLM teacher reads image rows with their images

    def warm_starts(self, teacher: bool) -> tuple[Path, Path | None]:
        """The cached warm-up folders (student, tiny teacher or None); rank 0 trains what is absent
        while the others wait (zppo_fast.sft.prepare_warm_starts)."""
        if self.dist.is_main:
            prepare_warm_starts(self.cfg, teacher, self.progress)
        self.dist.barrier()
        return prepare_warm_starts(self.cfg, teacher, progress=False)

    def make_task(self) -> TestbedTask | ArithmeticTask | FileTask:
        """The embedded task ([task]), or the `[data] train` files' records. Every rank reads the files
        (the same pass gives the same ids, checked here); rank 0 reports the counts."""
        cfg = self.cfg
        self.data_counts: dict[str, float] = {}
        if not cfg.data.train:
            return embedded_task(cfg.task)
        task = FileTask(cfg.data.train, tokenizer=self.tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens,
                        skip_bad_rows=cfg.data.skip_bad_rows, columns=self.columns())
        if len(set(self.dist.all_gather(task.fingerprint))) > 1:
            raise DatasetError(f"the ranks read different records from {cfg.data.train}: every rank needs the same "
                               "files (a shared file system, or identical copies)", str(cfg.data.train[0]))
        named = next((r for r in task.records if r.grader), None)
        if named is not None and cfg.data.grader != "auto":
            raise ConfigError(f"{named.source}: the row names its grader ({named.grader!r}) but data.grader = "
                              f"{cfg.data.grader!r}; set data.grader = \"auto\" to grade rows by their grader column")
        self.data_counts = task.counts()
        if self.dist.is_main:
            tqdm.write(task.report())
        return task

    def check_data_size(self) -> None:
        """Every step takes rl.batch_size distinct new questions, and the replay algos up to
        round(rho_replay * batch_size) more from the buffer, distinct from those: a data set with fewer
        usable questions is an error now, before any model is built."""
        cfg, usable = self.cfg, len(self.task.train_ids())
        replayed = replay_count(cfg.rl.batch_size, cfg.zppo.rho_replay) if self.algo.replay else 0
        if usable < cfg.rl.batch_size + replayed:
            where = (f"the [data] train files ({', '.join(cfg.data.train)}: "
                     + ", ".join(f"{k[5:]} {int(v)}" for k, v in self.data_counts.items()) + ")"
                     if cfg.data.train else f"the {cfg.task.kind} task's training split ([task])")
            need = f"rl.batch_size {cfg.rl.batch_size}" + (
                f" + {replayed} replayed (zppo.rho_replay {cfg.zppo.rho_replay}, rl.algo {cfg.rl.algo})"
                if replayed else "")
            raise ConfigError(f"{where} has {usable} usable questions, but a step needs {need} = "
                              f"{cfg.rl.batch_size + replayed} distinct ones; lower rl.batch_size or add data")

    def columns(self) -> Columns:
        """The data files' column names (`data.question_key` ...), for train and held-out files alike."""
        d = self.cfg.data
        return Columns(id=d.id_key, question=d.question_key, answer=d.answer_key, images=d.images_key,
                       choices=d.choices_key, grader=d.grader_key)

    def judge_kwargs(self, grader: str) -> dict:
        """The judge grader's engine ("judge", or "auto" for its free-form rows): the teacher's, with
        the teacher's tokenizer."""
        if grader not in ("judge", "auto"):
            return {}
        return {"engine": self.teacher_engine, "tokenizer": self.teacher_tokenizer}

    # ---------------------------------------------------------------- one rollout step
    def step(self) -> dict[str, float]:
        cfg, t, m = self.cfg, {}, {}
        self.step_idx += 1
        b_new = cfg.rl.batch_size

        # 1. Questions: new ones, plus replayed hard ones (sampled without removal).
        new = self.stream.next_batch(b_new)
        replayed = []
        if self.buffer is not None:
            replayed = [int(q) for q in self.buffer.sample(replay_count(b_new, cfg.zppo.rho_replay)) if q not in new]
        problems = [self.task.problem(q) for q in new + replayed]

        # 2. Plain rollouts, graded; group g is the g-th question.
        t0 = time.perf_counter()
        batch, samples = self.rollout([p.question for p in problems], problems, first_group=0,
                                      kinds=["new"] * len(new) + ["replayed"] * len(replayed))
        g_s = cfg.rl.group_size
        rewards = [[r.reward for r in batch.rollouts[i * g_s : (i + 1) * g_s]] for i in range(len(problems))]
        accuracy = [sum(r) / g_s for r in rewards]
        t["time/rollout"] = time.perf_counter() - t0
        # Plain accuracy per testbed family, and on the replayed questions (do guided prompts transfer?).
        for name, accs in (*((f, [a for p, a in zip(problems, accuracy) if p.family == f])
                             for f in sorted({p.family for p in problems} - {""})),
                           ("replayed", accuracy[len(new):])):
            if accs:
                m[f"reward/{name}_mean"] = sum(accs) / len(accs)

        # 3. The teacher's part. Guided prompts (BCQ / NCQ, or Hint / Prefix) on the hard questions,
        #    and the student's rollouts on them as groups of their own (a Prefix rollout continues the
        #    forced prefix, which is context in its training rollout: never a target).
        if self.guide is not None:
            t0 = time.perf_counter()
            texts = [[s.text for s in samples[i * g_s : (i + 1) * g_s]] for i in range(len(problems))]
            self.teacher_engine.resume_memory()
            guided, zm = self.guide(problems, texts, rewards, aug_cap(b_new, cfg.zppo.rho_aug), self.step_idx)
            self.teacher_engine.release_memory()
            t["time/teacher"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            extra, extra_samples = self.rollout([g.text for g in guided], [problems[g.question] for g in guided],
                                                first_group=len(problems), kinds=[g.kind for g in guided],
                                                prefixes=[getattr(g, "prefix_ids", []) for g in guided])
            t["time/rollout"] += time.perf_counter() - t0
            m.update(zm)
            m.update(self.guided_metrics(guided, extra, extra_samples))
            batch.rollouts += extra.rollouts
        #    Off-policy distillation: the teacher's graded-correct rollouts of every question (new and
        #    replayed) are what the student trains on; its own rollouts only feed replay and metrics.
        train = batch
        if self.algo.loss == "off_distill":
            t0 = time.perf_counter()
            self.teacher_engine.resume_memory()
            examples, dm = distillation_data(self.teacher_engine, self.tokenizer, problems,
                                             GuidanceSettings.from_config(cfg.zppo), self.step_idx, seed=cfg.run.seed,
                                             grade_fn=grader_scores(self.grader), processor=self.teacher_processor)
            self.teacher_engine.release_memory()
            t["time/teacher"] = time.perf_counter() - t0
            m.update(dm)
            # The student trains on its own prompt (with a VLM student, its encoding of the images).
            student_prompts = {i: self.prompt(problems[i].question, problems[i])
                               for i in {e.question for e in examples}}
            train = RolloutBatch([Rollout(student_prompts[e.question].input_ids, e.response_ids, 1.0, e.question,
                                          student_prompts[e.question].images) for e in examples])

        self.engine.release_memory()  # training gets the GPU memory the student's engine held

        entropy = advantages = old_logprobs = None
        if not self.algo.distill:
            # 4. Advantages over the whole rollout batch, one per rollout.
            advantages = normalize_advantages(
                batch.rewards, batch.group_ids, mode=cfg.rl.advantage_mode, eps=cfg.rl.advantage_eps
            )

            # 5. Old log-probs (and entropy, for metrics) under the sampling weights, for mini-batches
            #    2..I only: the first is trained before any optimizer step, so its forward gives its own.
            t0 = time.perf_counter()
            old_logprobs, entropy = self.logprobs(batch, skip_first=True)
            t["time/old_logprobs"] = time.perf_counter() - t0

        # 6. I optimizer steps, one per mini-batch of whole groups (distillation: one step).
        t0 = time.perf_counter()
        m.update(self.update(train, old_logprobs, advantages))
        t["time/update"] = time.perf_counter() - t0
        if entropy is not None:  # the first mini-batch's entropy came from its update forward
            entropy = (entropy + m.pop(FIRST_ENTROPY)) / max(batch.response_tokens(), 1)

        # 7. The replay buffer learns from the plain rollouts only.
        if self.buffer is not None:
            u = self.buffer.update([p.id for p in problems], accuracy, self.step_idx)
            m.update({"replay/size": len(self.buffer), "replay/admitted": len(u.admitted),
                      "replay/graduated": len(u.graduated), "replay/evicted": len(u.evicted),
                      "replay/replayed": len(replayed)})

        # 8. The rollout engine gets the new weights.
        t0 = time.perf_counter()
        self.push_weights()
        t["time/weight_push"] = time.perf_counter() - t0

        m["reward/grader_errors"] = self.grader.pop_errors()  # this step's, of the student's and the teacher's rollouts
        for role, engine in (("student", self.engine), ("teacher", self.teacher_engine)):
            m.update({f"engine/{role}_{k}": v for k, v in (engine.pop_timings() if engine else {}).items()})
        return {**m, **self.rollout_metrics(batch, accuracy, samples, entropy), **t,
                "perf/student_tokens": batch.response_tokens(),
                "perf/tokens_per_s": batch.response_tokens() / max(sum(t.values()), 1e-9),
                "perf/peak_memory_mb": peak_memory_mb(self.device)}

    def rollout(self, prompt_texts: list[str], problems, first_group: int, kinds: list[str],
                prefixes: list[list[int]] | None = None) -> tuple[RolloutBatch, list]:
        """G_S graded samples per prompt; the k-th prompt is group `first_group + k` of kind `kinds[k]`
        (new | replayed | bcq | ncq | hint | prefix: how `RolloutBatch.minibatches` spreads them).

        `prefixes` (Prefix baseline): token ids forced at the start of the k-th prompt's answer. The
        student continues them; the grade reads prefix + continuation; the training rollout carries
        them at the end of its prompt ids, so they are context and never a loss target.
        """
        cfg = self.cfg
        prefixes = prefixes or [[] for _ in prompt_texts]
        prompts = [self.prompt(text, p) for text, p in zip(prompt_texts, problems)]
        params = SamplingParams(n=cfg.rl.group_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens,
                                seed=(cfg.run.seed * 1_000_003 + self.step_idx) * 2 + (first_group > 0))
        images = {"images": [p.images for p in problems]} if self.processor is not None else {}
        groups = self.engine.generate([q.input_ids + prefix for q, prefix in zip(prompts, prefixes)], params,
                                      **images) if prompts else []

        def answer(s, prefix) -> str:
            return self.tokenizer.decode(prefix + s.token_ids, skip_special_tokens=True) if prefix else s.text

        rewards = iter(self.grade([grade_item(p, answer(s, prefix))
                                   for prefix, p, group in zip(prefixes, problems, groups) for s in group]))
        batch = RolloutBatch([Rollout(q.input_ids + prefix, s.token_ids, next(rewards), first_group + g, q.images, kind)
                              for g, (q, prefix, group, kind) in enumerate(zip(prompts, prefixes, groups, kinds))
                              for s in group])
        return batch, [s for group in groups for s in group]

    def prompt(self, text: str, problem: Problem) -> VLMPrompt:
        """The student's chat prompt for `text` (the question, or a guided prompt built on it): with
        a VLM student, the question's images go in front of the text, their placeholders expanded."""
        if self.processor is None:
            return VLMPrompt(chat_prompt_ids(self.tokenizer, text), None)
        return vlm_prompt(self.processor, text, problem.images)

    def grade(self, items) -> list[float]:
        """Rewards in {0, 1} from the training grader, one batched call (the judge: on the teacher's engine)."""
        judge = self.train_grader == "judge" or (self.train_grader == "auto" and self.grader.needs_judge(items))
        if judge:
            self.teacher_engine.resume_memory()
        verdicts = self.grader.grade_batch(items)
        if judge:
            self.teacher_engine.release_memory()
        return [v.score for v in verdicts]

    def guided_metrics(self, guided, batch: RolloutBatch, samples) -> dict[str, float]:
        """The student's accuracy on each kind of guided prompt; for BCQ / NCQ also how often it
        answers with one of the candidates' answers."""
        g_s, out = self.cfg.rl.group_size, {}
        for kind in self.algo.kinds:
            rows = [k * g_s + j for k, r in enumerate(guided) if r.kind == kind for j in range(g_s)]
            if not rows:
                continue
            acc = sum(batch.rollouts[i].reward for i in rows) / len(rows)
            if kind in ("bcq", "ncq"):
                out[f"zppo/{kind}_acc"] = acc
                out[f"zppo/{kind}_copies_candidate"] = sum(
                    final_answer(samples[i].text) in guided[i // g_s].candidate_answers for i in rows) / len(rows)
            else:
                out[f"{kind}/acc"] = acc
        return out

    def minibatches(self, batch: RolloutBatch, n: int) -> list[list[int]]:
        """The step's `n` mini-batches of whole groups, each kind spread evenly, dealt by a seed of
        run.seed and the step (`RolloutBatch.minibatches`): the same on every rank and on resume."""
        return batch.minibatches(n, seed=f"{self.cfg.run.seed}:{self.step_idx}")

    @property
    def share_prefix(self) -> bool:
        """Whether micro-batches lay each group's prompt out once (`parallel.share_prefix`; None: on the CPU)."""
        setting = self.cfg.parallel.share_prefix
        return setting if setting is not None else self.device.type != "cuda"

    def microbatches(self, batch: RolloutBatch, rows: list[int]):
        """This rank's micro-batches of `rows` (a mini-batch), on the device."""
        p = self.cfg.parallel
        return [mb.to(self.device) for mb in batch.microbatches(
            rows, self.dist.rank, self.dist.world_size, p.max_tokens_per_microbatch,
            packed=p.packing if p.packing is not None else self.device.type == "cuda", share_prefix=self.share_prefix,
            pad_id=self.tokenizer.pad_token_id)]

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, skip_first: bool = False) -> tuple[dict[int, torch.Tensor], float]:
        """Token log-probs {row: (len_row,)} of this rank's rows under the current weights, laid out
        exactly as the update will lay them out; and the entropy summed over the rows covered (all
        ranks). `skip_first`: leave out the first mini-batch (the update's first forward gives its
        log-probs: `update`); with one mini-batch nothing is computed."""
        out: dict[int, torch.Tensor] = {}
        entropy_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # read once, at the end
        parts = self.minibatches(batch, self.cfg.rl.num_minibatches)
        if skip_first:
            parts = parts[1:]
            if not parts:
                return out, 0.0
        for rows in parts:
            for mb in self.microbatches(batch, rows):
                logp, ent = linear_logprobs(self.policy(mb), self.policy.lm_head, mb.targets,
                                            temperature=self.cfg.rollout.temperature or 1.0, return_entropy=True,
                                            backend=self.kernel_backend)
                entropy_sum += (ent * mb.loss_mask).sum()
                for i, chunk in zip(mb.rows, logp.float().split(mb.response_lengths)):
                    out[i] = chunk
        self.policy.reshard()  # the root stays gathered after a forward without backward
        return out, self.dist.sum({"e": entropy_sum.item()})["e"]

    def backward_minibatch(self, batch: RolloutBatch, rows: list[int], old_logprobs=None, advantages=None,
                           on_policy: bool = False) -> dict:
        """Accumulate the gradient of one optimizer step's loss over this rank's micro-batches of `rows`:
        the clipped policy loss, or (distillation) the JSD to the teacher on the same tokens.
        `on_policy` (the first mini-batch: the weights still are the sampling ones): rows without
        old log-probs take the forward's own (ratio 1), so no separate pass computes them.

        The normalizer is the token count of all `rows` on all ranks, so the gradient is the same
        however the rows are split into micro-batches and ranks. Returns this rank's summed statistics
        as 0-dim device tensors: nothing here waits for the GPU (the caller reads them once per step).
        """
        cfg = self.cfg.rl
        normalizer = float(batch.response_tokens(rows))
        totals: dict[str, torch.Tensor] = {}
        for mb in self.microbatches(batch, rows):
            if self.algo.distill:
                # The teacher reads the same packed micro-batch; only its (N, H) hidden states and its
                # lm_head weight enter the loss, which tiles the vocabulary for both models.
                with torch.no_grad():
                    teacher_hidden = self.teacher_lm(mb)
                loss, stats = fused_linear_jsd(self.policy(mb), self.policy.lm_head, teacher_hidden,
                                               self.teacher_lm.lm_head, mb.loss_mask, beta=self.cfg.zppo.distill_beta,
                                               normalizer=normalizer)
            else:
                given = [i in (old_logprobs or {}) for i in mb.rows]
                if mb.rows and (any(given) != all(given) or not (all(given) or on_policy)):
                    raise ValueError(f"backward_minibatch: old log-probs for {sum(given)} of rows {mb.rows}; every "
                                     "row needs them, except in the on-policy first mini-batch, where none may")
                # None: on-policy, the kernel's own log-probs are the old ones (also for a filler)
                old = torch.cat([old_logprobs[i] for i in mb.rows]).to(self.device) if mb.rows and all(given) else None
                adv = torch.cat([advantages[i].expand(n) for i, n in zip(mb.rows, mb.response_lengths)]).to(
                    self.device) if mb.rows else torch.zeros(len(mb.targets), device=self.device)
                loss, stats = fused_linear_policy_loss(
                    self.policy(mb), self.policy.lm_head, mb.targets, old, adv, mb.loss_mask,
                    eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip,
                    temperature=self.cfg.rollout.temperature or 1.0, normalizer=normalizer,
                    backend=self.kernel_backend,
                )
            loss.backward()
            for k, v in {"loss": loss.detach() * normalizer, **stats}.items():
                totals[k] = totals[k] + v if k in totals else v.double()
        return totals

    def update(self, batch: RolloutBatch, old_logprobs=None, advantages: torch.Tensor | None = None) -> dict[str, float]:
        """I optimizer steps (distillation: one), one per mini-batch of whole groups; the step's
        loss statistics as token means. A NaN or infinite loss or gradient norm stops the run
        (`NonFiniteError`, before anything of this step is saved or pushed) or, with
        rl.on_nonfinite = "skip", drops that optimizer step and counts it."""
        cfg = self.cfg.rl
        if not len(batch):  # off-policy distillation when no teacher rollout of the step was correct
            return {}
        if advantages is not None:  # on the device once per step: the micro-batches index it there
            advantages = advantages.to(self.device, non_blocking=True)  # pageable source: no stream sync
        skip = cfg.on_nonfinite == "skip"
        sums: dict[str, torch.Tensor] = {}
        grad_norms, skipped = [], 0
        # Distillation takes one optimizer step per rollout step, as the paper's baselines do.
        for k_mb, rows in enumerate(self.minibatches(batch, 1 if self.algo.distill else cfg.num_minibatches)):
            totals = self.backward_minibatch(batch, rows, old_logprobs, advantages, on_policy=k_mb == 0)
            if k_mb == 0 and "entropy" in totals:  # under the sampling weights: no optimizer step yet
                sums[FIRST_ENTROPY] = totals["entropy"]
            norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
            norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).double()
            # skip: the one mode that reads the device per optimizer step, to decide before it; the
            # norm is the same on every rank, the loss is summed over them, so all ranks agree.
            if skip and not (math.isfinite(norm.item())
                             and math.isfinite(self.dist.sum({"loss": totals["loss"].item()})["loss"])):
                skipped += 1
            else:
                self.optimizer.step()
                grad_norms.append(norm)
                for k, v in totals.items():
                    sums[k] = sums[k] + v if k in sums else v
            self.optimizer.zero_grad(set_to_none=True)
        # the step's one read of the device: every statistic and grad norm in one copy
        keys = sorted(sums)
        values = torch.stack([sums[k].to(self.device) for k in keys] + grad_norms).tolist() if keys else []
        totals = self.dist.sum(dict(zip(keys, values)))
        grad_norms = values[len(keys):]
        n = max(totals.get("tokens", 0.0), 1.0)
        names = DISTILL_METRICS if self.algo.distill else POLICY_METRICS
        out = {**{name: totals.get(k, 0.0) / n for k, name in names.items()},
               **({FIRST_ENTROPY: totals[FIRST_ENTROPY]} if FIRST_ENTROPY in totals else {}),
               "loss/trained_tokens": totals.get("tokens", 0.0)}
        if grad_norms:  # none when every optimizer step of this rollout step was skipped
            out["loss/grad_norm"] = sum(grad_norms) / len(grad_norms)
        if skip:
            out["loss/skipped_steps"] = float(skipped)
        else:
            bad = [(k, v) for k, v in out.items() if not math.isfinite(v)]
            bad += [(f"loss/grad_norm of optimizer step {i + 1}", g) for i, g in enumerate(grad_norms)
                    if not math.isfinite(g)]
            if bad:
                raise NonFiniteError(
                    f"step {self.step_idx}: {', '.join(f'{k} is {v}' for k, v in bad)}; the run stops before "
                    f"saving or pushing this step, so its last checkpoint is the last good state (resume it with "
                    f"--resume {self.run_dir}); rl.on_nonfinite = skip drops such optimizer steps instead")
        return out

    def push_weights(self) -> None:
        """The student's engine gets the trainer's weights: its weight memory back, every bucket
        (each rank gathers the full tensors; the engine owners load them), then its KV cache.
        SGLang gets bf16 buckets (its compute dtype) but fp32 ones for the parameters it keeps in
        fp32 (`weight_sync.FULL_PRECISION`, e.g. A_log); the transformers engine every parameter in
        its own dtype."""
        lm, sglang = self.policy.lm, self.cfg.rollout.engine == "sglang"
        self.engine.resume_memory((WEIGHTS,))
        self.engine.update_weights(iter_weight_buckets(lm, self.cfg.parallel.weight_bucket_mb << 20,
                                                       dtype=torch.bfloat16 if sglang else None),
                                   names=weight_names(lm))
        self.engine.resume_memory((KV_CACHE,))

    def check_push(self) -> float:
        """Raise unless the student's engine samples from the pushed weights: its sampling log-probs
        on a fixed prompt against the trainer's own (`engine.check_push_took_effect`). Every rank
        takes part (a data-parallel generate, then the trainer's forward). Returns the mean gap."""
        cfg = self.cfg
        low = (cfg.rollout.engine == "sglang" or self.device.type == "cuda" or cfg.model.dtype == "bfloat16"
               or cfg.parallel.param_dtype == "bfloat16")
        tolerance = cfg.rollout.push_check_tolerance or PUSH_CHECK_TOLERANCE[torch.bfloat16 if low else torch.float32]
        prompt = chat_prompt_ids(self.tokenizer, "What is 12 + 30?")
        params = SamplingParams(temperature=cfg.rollout.temperature or 1.0, max_new_tokens=8, seed=cfg.run.seed)

        def trainer_logprobs(prompt: list[int], completion: list[int]) -> torch.Tensor:
            # One row per rank, so every rank's forward has work; all rows are the same sequence.
            rows = RolloutBatch([Rollout(prompt, completion, 0.0, 0) for _ in range(self.dist.world_size)])
            mine, _ = self.logprobs(rows)
            return torch.tensor([r for part in self.dist.all_gather([v.tolist() for v in mine.values()])
                                 for r in part][0])

        return check_push_took_effect(self.engine, prompt, trainer_logprobs, params, tolerance, "the student's engine")

    def rollout_metrics(self, batch: RolloutBatch, accuracy: list[float], samples, entropy: float | None
                        ) -> dict[str, float]:
        rewards = batch.rewards.view(-1, self.cfg.rl.group_size)  # (groups, G_S), plain and reformulated
        return {
            "reward/mean": sum(accuracy) / len(accuracy),  # plain rollouts: the student's own accuracy
            "reward/all_wrong_frac": (rewards.amax(1) == 0).float().mean().item(),
            "reward/all_correct_frac": (rewards.amin(1) == 1).float().mean().item(),
            "rollout/response_len": batch.response_tokens() / len(batch),
            "rollout/truncated_frac": sum(s.finish_reason == "length" for s in samples) / len(samples),
            **({} if entropy is None else {"rollout/entropy": entropy}),  # distillation computes none
        }

    # ---------------------------------------------------------------- the run
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy metrics. `[data] heldout` files: pass@1 over `run.eval_samples` samples
        with the evaluation decoding, `eval/<name>_acc` per file; every rank calls the engine with
        the same prompts (data-parallel generate), rank 0 writes RUN_DIR/eval/step_N. Otherwise the
        embedded task's held-out sets, greedy: `eval/<set>_acc` and its standard error `eval/<set>_se`
        (testbed: easy and hard; arithmetic: heldout; {} with neither), and after the run's first
        evaluation `eval/<set>_gain` over it with its paired standard error `eval/<set>_gain_se`."""
        cfg, run = self.cfg, self.cfg.run
        if not self.heldout_sets:
            params = SamplingParams(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens)
            rewards = heldout_rewards(self.engine, self.tokenizer, self.heldout, params)
            metrics = accuracy_metrics(rewards, self.heldout_start)
            if self.heldout_start is None:  # later evaluations report their gain over this one
                self.heldout_start = rewards
            return metrics
        params = eval_sampling_params(run.eval_samples, cfg.rollout.max_new_tokens, run.eval_temperature,
                                      run.eval_top_p, run.eval_top_k, seed=run.seed * 1_000_003 + self.step_idx,
                                      presence_penalty=run.eval_presence_penalty)
        judge = self.heldout_grader in ("judge", "auto")
        if judge:
            self.teacher_engine.resume_memory()
        kw = self.judge_kwargs(self.heldout_grader)
        results = evaluate_files(
            self.engine, self.tokenizer, self.heldout_sets, params,
            out_dir=self.run_dir / "eval" / f"step_{self.step_idx}" if self.dist.is_main else None,
            judge_engine=kw.get("engine"), judge_tokenizer=kw.get("tokenizer"),
            max_prompt_tokens=cfg.data.max_prompt_tokens, skip_bad_rows=cfg.data.skip_bad_rows,
            progress=self.progress, processor=self.processor, meta={"step": self.step_idx}, columns=self.columns())
        if judge:
            self.teacher_engine.release_memory()
        return {f"eval/{r.name}_acc": r.accuracy for r in results}

    def save(self) -> Path:
        state = {"data": self.stream.state_dict(), "model_config": asdict(self.cfg.model),
                 "data_fingerprint": getattr(self.task, "fingerprint", None), "heldout_start": self.heldout_start}
        if self.buffer is not None:
            state["replay"] = self.buffer.state_dict()
            if self.dist.is_main:
                self.write_replay_telemetry()
        return save_checkpoint(self.run_dir, self.step_idx, self.policy, self.optimizer, self.tokenizer, state,
                               self.dist, keep_last=self.cfg.run.keep_last, config_dtype=self.declared_dtype)

    def write_replay_telemetry(self) -> None:
        """replay_history.jsonl (one line per exit) and replay_live.jsonl, read by zppo_fast.report."""
        exits = [{"id": int(r["qid"]), "step_admitted": int(r["step_admitted"]), "acc_admitted": float(r["acc_admitted"]),
                  "exit_step": int(r["exit_step"]), "exit": "graduated" if r["graduated"] else "evicted",
                  "visits": int(r["visits"])} for r in self.buffer.history()]
        live = self.buffer.state_dict()["live"]
        alive = [{"id": int(q), "step_admitted": int(s), "acc_admitted": float(a), "visits": int(v)}
                 for q, s, a, v in zip(live["qid"], live["step_admitted"], live["acc_admitted"], live["visits"])]
        for name, rows in (("replay_history.jsonl", exits), ("replay_live.jsonl", alive)):
            tmp = self.run_dir / (name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.rename(self.run_dir / name)

    def fit(self) -> list[dict]:
        cfg, history, main_rank = self.cfg.run, [], self.dist.is_main
        say = tqdm.write if main_rank else (lambda _: None)
        say(f"zppo_fast: run folder {self.run_dir}, {self.dist.world_size} rank(s) on {self.device.type}, "
            f"{sum(p.numel() for p in self.policy.parameters()) / 1e6:.2f}M parameters")
        if self.step_idx == 0:
            start = dict(self.data_counts)  # data files: rows read, kept, too long, bad (startup pass)
            if cfg.eval_every > 0:
                evaluation = self.evaluate()
                start.update(evaluation)
                if evaluation:
                    say("step 0: " + ", ".join(f"{k} {v:.3f}" for k, v in evaluation.items()))
            if main_rank and start:
                self.metrics.log(0, start)
        bar = tqdm(range(self.step_idx, cfg.steps), initial=self.step_idx, total=cfg.steps, desc="rl",
                   disable=not self.progress, dynamic_ncols=True)
        for _ in bar:
            metrics = self.step()
            if cfg.eval_every > 0 and (self.step_idx % cfg.eval_every == 0 or self.step_idx == cfg.steps):
                evaluation = self.evaluate()
                metrics.update(evaluation)
                if evaluation:
                    say(f"step {self.step_idx}: " + ", ".join(f"{k} {v:.3f}" for k, v in evaluation.items()))
            if main_rank:
                self.metrics.log(self.step_idx, metrics)
            history.append(metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}",
                            **{k[5:]: f"{metrics[k]:.4f}" for k in ("loss/approx_kl", "loss/jsd") if k in metrics})
            if self.step_idx % cfg.checkpoint_every == 0 or self.step_idx == cfg.steps:
                self.save()
        if main_rank:
            self.metrics.close()
            if self.buffer is not None and history:
                say(f"replay buffer, by accuracy at admission ({self.run_dir / 'report.json'}):\n"
                    + format_table(write_report(self.run_dir)))
        return history


def main(argv: list[str] | None = None) -> None:
    parser = Parser("zppo_fast.train", __doc__, config=True)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint, with the "
                        "config.json it saved (overrides still apply)")
    args = parser.parse_args(argv)
    saved: list[str] = []
    if args.resume is not None:
        if args.config is not None:
            parser.error("--resume takes the run's own config.json; give overrides, not --config, with it")
        path = Path(args.resume) / "config.json"
        if not path.is_file():
            parser.error(f"--resume {args.resume}: no config.json there, not a run folder")
        saved = [f"--{s}.{k}={json.dumps(v) if isinstance(v, list) else v}"
                 for s, part in json.loads(path.read_text()).items() if s != RESOLVED for k, v in part.items()]
    cfg = parser.load_config(args.config, saved + args.overrides)
    try:
        _train(cfg, args.resume)
    except ConfigError as e:  # a value that only conflicts with the machine (world size, device)
        parser.error(str(e))
    except (CheckpointError, ModelLoadError, DatasetError, ImportError, NonFiniteError) as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        destroy_distributed()


def _train(cfg: Config, resume: str | None) -> None:
    """Builds and runs the trainer; returning drops it (model, mesh, optimizer) before main()
    destroys the process group, as destroy_distributed() asks."""
    trainer = Trainer(cfg, resume=resume)
    if trainer.dist.is_main:
        print(cfg.to_json())
    try:
        trainer.fit()
    finally:
        trainer.shutdown_engines()


if __name__ == "__main__":
    main()
