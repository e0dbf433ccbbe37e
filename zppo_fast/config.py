"""Typed run configuration: one dataclass per component, loaded from TOML, overridden from the CLI.

    cfg = load_config("configs/tiny_cpu.toml", ["--rl.group_size", "8", "--run.steps=20"])

Every key is checked: an unknown section or key is an error that names it and the closest valid
ones, and values are converted to the field's declared type (so `--rl.lr 3e-3` is a float) and
checked against what the type declares -- a Literal's choices, an `Annotated` range (`Bounds`), a
grader's name -- when the config is loaded, before anything is built. Floats are always finite.
The comment beside or above each field is its documentation: `--help` prints it (zppo_fast/cli.py).
The defaults are the embedded CPU demo; the paper's Table 8 values live in configs/qwen3_5_*.toml.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied; the message names the key."""


@dataclass(frozen=True)
class Bounds:
    """The range a numeric field must lie in (`Annotated[float, Bounds(0, 1)]`); None: unbounded.
    Like every check in an `Annotated` field type: `check` raises ConfigError, `describe` is for --help."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, value: float, key: str) -> None:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (low_ok and high_ok):
            raise ConfigError(f"config key '{key}' must be {self}, got {value!r}")

    def describe(self, base: str) -> str:
        return f"{base} {self}"

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


class GraderSpec:
    """A grader: a registered name (zppo_fast/graders.py) or the user's reward function,
    "MODULE:FUNCTION" / "path/to/file.py:FUNCTION" (imported when the trainer starts)."""

    def check(self, value: str, key: str) -> None:
        from zppo_fast.graders import GRADERS  # the registry fills as graders.py is imported

        module, colon, function = value.rpartition(":")
        if value not in GRADERS and not (colon and module and function):
            raise ConfigError(f"config key '{key}' must be one of {', '.join(sorted(GRADERS))} or MODULE:FUNCTION "
                              f"(a reward function of yours), got {value!r}")

    def describe(self, base: str) -> str:
        from zppo_fast.graders import GRADERS

        return " | ".join([*sorted(GRADERS), "MODULE:FUNCTION"])


Count = Annotated[int, Bounds(1)]
NonNegativeInt = Annotated[int, Bounds(0)]
NonNegative = Annotated[float, Bounds(0)]
Positive = Annotated[float, Bounds(0, low_open=True)]
Fraction = Annotated[float, Bounds(0, 1)]
OpenFraction = Annotated[float, Bounds(0, 1, low_open=True)]  # top-p, memory fractions: 0 is nothing
Beta = Annotated[float, Bounds(0, 1, high_open=True)]  # Adam's moment decays
GraderName = Annotated[str, GraderSpec()]
# zppo_fast/zppo.py's ALGOS says what each does, and zppo_fast/kernels/advantages.py's MODES computes
# each mode (tests/test_cli.py checks both against these).
AlgoName = Literal["grpo", "grpo_replay", "grpo_both", "grpo_replay_bcq", "grpo_replay_ncq", "zppo",
                   "grpo_replay_hint", "grpo_replay_prefix", "off_distill", "off_distill_replay", "on_distill",
                   "on_distill_replay"]
AdvantageMode = Literal["batch_wo_zero", "batch_w_zero", "none", "group"]


@dataclass
class ModelConfig:
    path: str | None = None  # a Hugging Face model directory; None builds the tiny model below
    hidden_size: Count = 64
    num_layers: Count = 4  # linear:full attention = 3:1, as in Qwen3.5
    vocab_size: Count = 1024  # of the in-process tokenizer
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # of the weights the trainer holds


@dataclass
class TaskConfig:
    """The embedded task (used when `[data] train` is empty): the testbed's easy and hard families
    (zppo_fast/testbed.py: the paper's premise at toy scale, the default), or the older one-family
    arithmetic task (zppo_fast/task.py)."""

    kind: Literal["testbed", "arithmetic"] = "testbed"
    max_operand: Count = 9  # operands in [0, max_operand] (testbed: of each step after the first number)
    max_value: Count = 19  # testbed: every partial result and answer in [0, max_value]
    num_terms: Annotated[int, Bounds(2)] = 2  # arithmetic: operands per question
    # share of the facts held out (all their wordings); testbed: of the hard family's facts
    heldout_fraction: Annotated[float, Bounds(0, 1, high_open=True)] = 0.15
    easy_heldout_fraction: Annotated[float, Bounds(0, 1, low_open=True, high_open=True)] = 0.3  # testbed
    num_facts: Count = 2048  # arithmetic: distinct questions (each in several wordings)
    seed: int = 0  # of the question generator


@dataclass
class DataConfig:
    """Training and held-out questions from the user's files (zppo_fast/file_task.py). With no
    `train` files (the default, or `--data.train []`) the run uses the embedded task ([task], the
    testbed by default) and its warm-ups. Every named file is checked to exist before any model loads."""

    train: list[str] = field(default_factory=list)  # .jsonl / .parquet files or datasets folders
    heldout: list[str] = field(default_factory=list)  # evaluated every run.eval_every steps
    # boxed (mathruler's rules on the last \boxed{}) | choice | math_verify | judge (the teacher judges) |
    # auto (the paper's: rules where the gold answer parses as math or the row has choices, the judge
    # otherwise; a row's grader column decides first; zppo_fast/graders.py), in training; or a reward
    # function of the user's, "my_module:my_fn" / "path/to/file.py:my_fn" (zppo_fast/user_grader.py)
    grader: GraderName = "boxed"
    heldout_grader: GraderName | None = None  # None: the same as `grader`
    skip_bad_rows: bool = True  # count and skip invalid rows (reported at startup) instead of stopping
    max_prompt_tokens: Count = 4096  # plain prompts longer than this are dropped at load, and counted
    # The columns holding each field, for a Hugging Face data set's own names (train and heldout files
    # alike); id_key none: no id column, each row's position ("line 3", "row 7") is its id
    question_key: str = "question"
    answer_key: str = "answer"
    id_key: str | None = "id"
    images_key: str = "images"  # a list of images, or one image (a datasets.Image column)
    choices_key: str = "choices"
    grader_key: str = "grader"  # a row's own grader (boxed | choice | math_verify | judge), read by grader = "auto"
    # Each image is resized to a pixel count within these bounds (aspect ratio kept, sides multiples
    # of the patch x merge size), the paper's 256*32^2 .. 1280*32^2: set on every vision-language
    # processor of the run (student and teacher; training, rollouts and evaluation alike, so the
    # placeholder counts agree). None: the processor's own bound.
    image_min_pixels: int | None = 256 * 32 * 32
    image_max_pixels: int | None = 1280 * 32 * 32


@dataclass
class SFTConfig:
    """The supervised warm-up that gives RL a student which earns some reward."""

    steps: NonNegativeInt = 500  # the student's (arithmetic: the teacher is the same warm-up at zppo.teacher_sft_steps)
    batch_size: Count = 32
    lr: Positive = 3e-3
    # of the warm-ups (data order, initial weights), apart from run.seed, so runs of several seeds
    # start from one student and one teacher
    seed: int = 0
    # testbed: the share of the student's warm-up examples that are BCQ / NCQ prompts (zppo_fast/testbed.py)
    reading_share: Fraction = 0.5
    cache_dir: str = ".cache/zppo_fast"  # warm-up checkpoints, keyed by a hash of their settings


@dataclass
class RolloutConfig:
    engine: Literal["transformers", "sglang"] = "transformers"  # sglang: on GPUs, pip install -e ".[sglang]"
    # sglang: where the teacher's engines run: colocated on the training GPUs (time-shared) or
    # dedicated on the node's GPUs that torchrun leaves free (the paper's 6 + 2 per node)
    teacher_placement: Literal["colocated", "dedicated"] = "colocated"
    teacher_tp_size: Count = 1  # GPUs per teacher engine (sglang)
    student_mem_fraction: OpenFraction = 0.35  # sglang mem_fraction_static, of the GPU memory free at start
    teacher_mem_fraction: OpenFraction = 0.35
    temperature: NonNegative = 1.0  # of the rollouts; 0 is greedy
    top_p: OpenFraction = 1.0
    max_new_tokens: Count = 32  # per rollout (a hard testbed solution takes 25 tokens)
    batch_size: Count = 256  # sequences generated together
    # The transformers engine in the trainer's process, or in a child process of its own with the
    # weights pushed through shared memory: the process architecture every SGLang engine has
    # (zppo_fast/engine_process.py). SGLang engines always run in their own processes.
    engine_process: Literal["inline", "child"] = "inline"
    # Reproducible rollouts. SGLang uses sampling seeds only with its deterministic inference, which
    # this turns on (batch-invariant kernels, slower); false: SGLang rollouts are not reproducible.
    # The transformers engine samples from a seeded generator either way.
    reproducible: bool = False
    # The largest mean |engine - trainer| log-prob per token on a fixed prompt after the first push;
    # None: by the lower precision of the two (zppo_fast/engine.py, PUSH_CHECK_TOLERANCE)
    push_check_tolerance: NonNegative | None = None


@dataclass
class RLConfig:
    # the paper's Table 3 (grpo .. zppo) and its baselines (hint, prefix, off/on-policy distillation,
    # with or without the replay buffer); the table with what each does is in zppo_fast/zppo.py
    algo: AlgoName = "zppo"
    batch_size: Count = 16  # B_new: new questions per rollout step
    group_size: Count = 8  # G_S: rollouts per question
    num_minibatches: Count = 4  # I: optimizer steps per rollout step, one pass (distillation: always 1)
    eps_low: NonNegative = 0.2  # the ratio is clipped below at 1 - eps_low
    eps_high: NonNegative = 0.28  # and above at 1 + eps_high (clip-higher)
    dual_clip: Annotated[float, Bounds(1, low_open=True)] = 10.0  # bound on the loss of a negative advantage, in ratios
    # normalization of r - mean(group): over the batch without all-equal groups (REINFORCE++), with
    # them, none, or by the group's std (GRPO); zppo_fast/kernels/advantages.py
    advantage_mode: AdvantageMode = "batch_wo_zero"
    advantage_eps: NonNegative = 1e-6  # added to the std that divides the advantages
    lr: Positive = 3e-4  # tiny models need far more than the paper's 1e-6; demo: 5e-4 degenerated in 2 of 3 seeds
    weight_decay: NonNegative = 0.1  # AdamW's, decoupled
    adam_beta1: Beta = 0.9
    adam_beta2: Beta = 0.999
    adam_eps: NonNegative = 1e-8
    grad_clip: Positive = 1.0  # the largest global gradient norm of an optimizer step
    # A loss or gradient norm that is NaN or infinite: stop = end the run with an error naming the
    # step and the metric (nothing of that step is saved, so the last checkpoint is the last good
    # state); skip = drop that optimizer step (no weight or AdamW change) and count it in
    # loss/skipped_steps (it reads the loss and norm from the device before each optimizer step)
    on_nonfinite: Literal["stop", "skip"] = "stop"


@dataclass
class ZPPOConfig:
    """The teacher, the reformulated / guided prompts, distillation and the replay buffer (used by
    the algos that need them; names shared with `zppo_fast.baselines.GuidanceSettings` mean the same)."""

    teacher_path: str | None = None  # None: the tiny student architecture with a longer warm-up
    teacher_sft_steps: NonNegativeInt = 800  # the tiny teacher's warm-up (teacher_path None)
    teacher_group_size: Count = 4  # G_T: fresh teacher rollouts per hard question, every visit
    teacher_temperature: NonNegative = 1.0
    teacher_top_p: OpenFraction = 1.0
    teacher_max_new_tokens: Count = 32
    # teacher: the paper's summary prompt (GPU configs) | none: the raw candidate text (the CPU
    # default: a tiny teacher cannot follow the summary instruction, and its rollouts are one line)
    compression: Literal["teacher", "none"] = "none"
    compression_max_tokens: Count = 512  # of one summary
    compression_temperature: NonNegative = 0.0  # unspecified by the paper; greedy summaries
    rho_aug: Fraction = 0.25  # reformulated instances per step, as a fraction of B_new
    rho_replay: Fraction = 0.25  # replayed questions per step, as a fraction of B_new
    replay_capacity: Count = 10_000  # questions the buffer holds; the oldest is evicted beyond
    # Hard: plain-rollout accuracy below this (the paper's 0.5). Read by BCQ / NCQ selection, the Hint /
    # Prefix baselines and the replay buffer (admitted below it, graduated at or above it).
    hard_threshold: Fraction = 0.5
    # Hint baseline: the teacher's hint request (Fig. 19). Unspecified by the paper: greedy, as the
    # compressions are, and capped like them.
    hint_temperature: NonNegative = 0.0
    hint_max_new_tokens: Count = 512
    prefix_fraction: Fraction = 0.4  # Prefix baseline: share of a teacher-correct rollout's tokens forced
    # Distillation (off_distill / on_distill): beta of the per-token generalized JSD between teacher P
    # and student Q (0 = KL(P||Q), 1 = KL(Q||P); zppo_fast/kernels/distill_loss.py). 0.5, the symmetric
    # JSD, is bounded by log 2 per token, so tokens where the tiny/early student is far from the
    # teacher cannot dominate the gradient (the paper does not state its beta).
    distill_beta: Fraction = 0.5


@dataclass
class ParallelConfig:
    """FSDP2 and the layout of the training forward; torchrun sets the number of ranks."""

    # compute dtype: auto = bfloat16 on CUDA, float32 on the CPU
    param_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer
    # Sequences of a micro-batch packed into one row (no padding) or right-padded. None: packed
    # on CUDA; padded on the CPU, where the packed row's block-diagonal attention mask costs more
    # than the padding it saves (bench/RESULTS.md, "Train step").
    packing: bool | None = None
    # Each group's prompt computed once, its responses after it (zppo_fast/shared_prefix.py; exact:
    # the same log-probs and gradients as every sequence whole). None: on the CPU (SDPA with a
    # dense mask); on CUDA opt in with true (FlexAttention block mask; checked by bench/gpu_check.sh).
    share_prefix: bool | None = None
    max_tokens_per_microbatch: Count = 4096  # positions per forward; does not change the gradient
    # The trained model's attention kernel: auto = flash_attention_2 (varlen over packed rows) on
    # CUDA when flash-attn is installed, else sdpa; or any transformers attn_implementation name.
    attention: str = "auto"
    weight_bucket_mb: Count = 512  # bucket size of the weight push into the rollout engine
    # The loss and log-prob kernels (zppo_fast/kernels): auto = Triton on CUDA when it imports, else
    # chunked PyTorch; triton where Triton cannot run is an error. The choice and its reason are
    # printed at start and saved in RUN_DIR/config.json under "resolved".
    kernel_backend: Literal["auto", "torch", "triton"] = "auto"


@dataclass
class RunConfig:
    steps: Count = 20  # rollout steps of RL
    seed: int = 0
    out_dir: str = "runs/default"  # the run folder: config, metrics, checkpoints
    checkpoint_every: Count = 10  # steps between checkpoints (and one at the end)
    keep_last: NonNegativeInt = 2  # complete checkpoints kept; older ones are deleted; 0 keeps all
    eval_every: NonNegativeInt = 5  # steps between held-out evaluations; 0: none
    # embedded task: held-out questions per set (testbed: per family), greedy, one sample each. 512:
    # the demo's hard-family gain at step 20 is 2.4-4.4 paired standard errors in each of run.seed
    # 0-3 (at 256: 1.3-2.3)
    eval_size: Count = 512
    # data.heldout files: the decoding (the paper's evaluation defaults); responses capped at
    # rollout.max_new_tokens, as in training. eval_samples: K samples per question; the reported
    # pass@1 is the mean over questions of each one's fraction of correct samples (K > 1 lowers its
    # variance, not its expectation).
    eval_samples: Count = 1
    eval_temperature: NonNegative = 0.6
    eval_top_p: OpenFraction = 0.95
    eval_top_k: NonNegativeInt = 20  # 0: no top-k
    # Subtracted from the raw logit of every token already in the response (before temperature and
    # top-k / top-p; SGLang's presence_penalty); the paper's 1.5. 0: off.
    eval_presence_penalty: NonNegative = 1.5
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when a GPU is visible
    # Intra-op threads per process on the CPU, at most its share of the cores (processes: the ranks
    # on this machine; the two warm-ups when they train side by side). 2 from bench/bench_threads.py
    # on an idle 2-core machine (bench/RESULTS.md): both settings faster than at 1 thread.
    cpu_threads: Count = 2
    tensorboard: bool = True  # used when the tensorboard package is installed
    # Weights & Biases beside metrics.jsonl: offline (files under RUN_DIR/wandb, `wandb sync` them later)
    # unless the environment sets WANDB_MODE=online; needs `pip install wandb` (an error when missing)
    wandb: bool = False
    wandb_project: str = "zppo_fast"
    overwrite: bool = False  # replace an existing run folder instead of refusing


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    zppo: ZPPOConfig = field(default_factory=ZPPOConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _closest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else f" (valid: {', '.join(sorted(options))})"


def coerce(value: object, kind: object, key: str) -> object:
    """Convert a TOML or command-line value to the declared field type and check it against what the
    type declares, or raise naming the key. Idempotent, so it also checks a value already typed."""
    if typing.get_origin(kind) is Annotated:
        base, *checks = typing.get_args(kind)
        value = coerce(value, base, key)
        for check in checks:
            check.check(value, key)
        return value
    if typing.get_origin(kind) is Literal:
        if value in typing.get_args(kind):
            return value
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, typing.get_args(kind)))}, "
                          f"got {value!r}")
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, args[0], key)
    if typing.get_origin(kind) is list:
        # TOML gives a list; the command line a JSON list ('["a.jsonl", "b.jsonl"]') or comma-separated text.
        if isinstance(value, str):
            text = value.strip()
            try:
                value = json.loads(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
            except json.JSONDecodeError as e:
                raise ConfigError(f"config key '{key}' expects a list, got {value!r}: {e}") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (item,) = typing.get_args(kind)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                return number
            raise OverflowError  # nan or inf: named below
        if kind is str:
            return str(value)
    except OverflowError:
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}") from None
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"config key '{key}' expects {getattr(kind, '__name__', kind)}, got {value!r}")


def _apply(cfg: Config, section: str, key: str, value: object, origin: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    if section not in sections:
        raise ConfigError(f"{origin}: unknown config section '{section}'{_closest(section, sections)}")
    part = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(part)}
    if key not in fields:
        dotted = [f"{section}.{k}" for k in fields]
        raise ConfigError(f"{origin}: unknown config key '{section}.{key}'{_closest(f'{section}.{key}', dotted)}")
    hints = typing.get_type_hints(type(part), include_extras=True)
    setattr(part, key, coerce(value, hints[key], f"{section}.{key}"))


def check_config(cfg: Config) -> Config:
    """Check every value against its declared type, choices and range (a config built in code, or
    changed with dataclasses.replace, skips load_config's checks); raise ConfigError naming the key."""
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(part), include_extras=True)
        for f in dataclasses.fields(part):
            coerce(getattr(part, f.name), hints[f.name], f"{section.name}.{f.name}")
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- TOML file <- `--section.key value` / `--section.key=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key '{section}' must be a [section] table")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(path))
    items = list(overrides)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"command line: expected --section.key VALUE, got '{arg}'")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise ConfigError(f"command line: '{arg}' needs a value")
            value, i = items[i + 1], i + 1
        section, _, key = name.partition(".")
        _apply(cfg, section, key, value, "command line")
        i += 1
    return check_config(cfg)
