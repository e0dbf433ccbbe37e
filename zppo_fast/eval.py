"""Evaluation: pass@1 of a model on held-out questions through a rollout engine.

Two entry points:

* `heldout_accuracy(engine, tokenizer, sets, params)` -- the trainer's quick held-out numbers on the
  embedded task's `Problem`s (boxed grader, one generate call): accuracy and standard error per set
  (`accuracy` for one set); `heldout_rewards` and `accuracy_metrics` split it, so that the trainer
  can report each later evaluation's gain over the first, paired by question.
* `evaluate_files(engine, tokenizer, datasets, params, samples, out_dir)` -- the data-file
  evaluation the CLI runs and the trainer can call every N steps: each file streams through
  `zppo_fast.datasets.DatasetFile` (validation, the 4,096-token prompt limit), every question is
  sampled K times, each sample graded by the data set's grader, and pass@1 = the mean over
  questions of the fraction of correct samples (the unbiased pass@1 estimate from K samples).

CLI (same engine as training, the paper's evaluation decoding as defaults):

    python -m zppo_fast.eval --model PATH --data FILE [--data FILE ...] --samples K \\
        [--grader NAME [--grader NAME ...]] [--out DIR] [--judge-model PATH]

`--grader` given once applies to every file; given once per `--data`, it pairs with the files in
order. Writes DIR/eval.json (per-data-set accuracy and the decoding used) and DIR/responses.jsonl
(one line per sample: data set, id, sample index, response, verdict, score).

Decoding defaults to the paper's evaluation setting (temperature 0.6, top-p 0.95, top-k 20,
presence penalty 1.5); eval.json records the decoding used and, per data set, its grader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from zppo_fast import ownership
from zppo_fast.cli import Parser, checked
from zppo_fast.config import ConfigError, Count, GraderName, NonNegative, NonNegativeInt, OpenFraction, RunConfig
from zppo_fast.data import chat_prompt_ids
from zppo_fast.datasets import DEFAULT_MAX_PROMPT_TOKENS, Columns, DatasetError, DatasetFile, Record
from zppo_fast.distributed import cpu_threads
from zppo_fast.engine import RolloutEngine, SamplingParams
from zppo_fast.graders import GradeItem, Grader, get_grader
from zppo_fast.reward import grade
from zppo_fast.task import Problem
from zppo_fast.vlm import record_prompt

# The paper's evaluation decoding (Sec. 4 setup); the maximum response length as in training.
EVAL_TEMPERATURE, EVAL_TOP_P, EVAL_TOP_K, EVAL_PRESENCE_PENALTY = 0.6, 0.95, 20, 1.5
EVAL_MAX_NEW_TOKENS = 12288


def accuracy(
    engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], params: SamplingParams
) -> float:
    """Mean reward over `params.n` samples of each problem (greedy when temperature is 0)."""
    return heldout_accuracy(engine, tokenizer, {"set": problems}, params)["eval/set_acc"]


def heldout_accuracy(engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, sets: Mapping[str, Sequence[Problem]],
                     params: SamplingParams) -> dict[str, float]:
    """Accuracy of each named set of problems and its standard error (`accuracy_metrics`)."""
    return accuracy_metrics(heldout_rewards(engine, tokenizer, sets, params))


def heldout_rewards(engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, sets: Mapping[str, Sequence[Problem]],
                    params: SamplingParams) -> dict[str, list[float]]:
    """Each named set's per-question reward, the mean over `params.n` samples: {name: [len(set)]}.
    All sets go through one generate call."""
    problems = [p for ps in sets.values() for p in ps]
    samples = iter(engine.generate([chat_prompt_ids(tokenizer, p.question) for p in problems], params)) if problems \
        else iter(())
    out = {}
    for name, ps in sets.items():
        out[name] = []
        for p in ps:
            group = next(samples)
            out[name].append(sum(grade(s.text, p.answer) for s in group) / max(len(group), 1))
    return out


def accuracy_metrics(rewards: Mapping[str, Sequence[float]],
                     start: Mapping[str, Sequence[float]] | None = None) -> dict[str, float]:
    """`eval/<name>_acc`, the mean of a set's per-question rewards, and `eval/<name>_se`, its
    standard error over the questions. With `start` (the same sets' rewards, question by question,
    from an earlier evaluation): `eval/<name>_gain`, accuracy now minus then, and `eval/<name>_gain_se`,
    the standard error of the mean per-question difference -- paired, so the questions' spread in
    difficulty, which two independent standard errors would count, cancels."""
    out = {}
    for name, xs in rewards.items():
        out[f"eval/{name}_acc"], out[f"eval/{name}_se"] = _mean_se(xs)
        if start is not None and name in start:
            if len(start[name]) != len(xs):
                raise ValueError(f"set {name!r}: {len(xs)} rewards now against {len(start[name])} at the start")
            out[f"eval/{name}_gain"], out[f"eval/{name}_gain_se"] = _mean_se([x - x0 for x, x0 in zip(xs, start[name])])
    return out


def _mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error, sqrt(population variance / n) (for 0/1 values sqrt(p (1 - p) / n))."""
    n = max(len(xs), 1)
    mean = sum(xs) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / n / n)


def eval_sampling_params(samples: int = 1, max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
                         temperature: float = EVAL_TEMPERATURE, top_p: float = EVAL_TOP_P,
                         top_k: int | None = EVAL_TOP_K, seed: int = 0,
                         presence_penalty: float = EVAL_PRESENCE_PENALTY) -> SamplingParams:
    """The paper's evaluation decoding as `SamplingParams` (n = samples per question; top_k None or 0: off;
    presence_penalty 0: off)."""
    kwargs = {"n": samples, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
              "top_k": top_k if top_k and top_k > 0 else None, "presence_penalty": presence_penalty}
    return SamplingParams(**kwargs)


@dataclass
class EvalSet:
    """One data file to evaluate and its grader; `name` defaults to the file's stem."""

    path: str
    grader: str = "boxed"
    name: str | None = None

    def __post_init__(self):
        self.name = self.name or Path(self.path).stem


@dataclass
class EvalResult:
    """One data set's outcome. accuracy = pass@1 (mean over questions of the correct fraction)."""

    name: str
    path: str
    grader: str
    questions: int
    samples: int  # per question
    accuracy: float
    malformed: int  # judge outputs that were not a strict verdict (scored 0)
    too_long: int  # rows dropped by the prompt-length limit
    bad_rows: int  # rows skipped as invalid (only with skip_bad_rows)
    graded_by: dict[str, int] = dataclasses.field(default_factory=dict)  # samples per grader ("auto" routes)


def _batches(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while batch := list(islice(it, size)):
        yield batch


def evaluate_records(engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, records: Iterable[Record],
                     grader: Grader, params: SamplingParams, *, batch_questions: int = 32,
                     on_sample=None, progress=None, processor=None,
                     graded_by: dict[str, int] | None = None) -> tuple[float, int, int]:
    """Sample `params.n` responses per record and grade them, `batch_questions` records at a time.

    `processor` (a VLM student's, zppo_fast/vlm.py): prompts carry the records' images.

    Returns (sum over questions of the correct fraction, questions, malformed verdicts).
    `on_sample(record, index, sample, verdict)` is called once per sample (for the JSONL log);
    `progress` (a tqdm bar) is advanced by the number of questions. `graded_by`, when given, counts
    the samples each grader scored (the "auto" grader's routes). A row that names its own grader
    is an error unless the grader is "auto", the one that reads it.
    """
    total, count, malformed = 0.0, 0, 0
    for batch in _batches(records, batch_questions):
        named = next((r for r in batch if r.grader), None)
        if named is not None and grader.name != "auto":
            raise ConfigError(f"{named.source}: the row names its grader ({named.grader!r}) but the data set is "
                              f"graded by {grader.name!r}; use the grader 'auto' to grade rows by their grader column")
        if processor is None:
            groups = engine.generate([chat_prompt_ids(tokenizer, r.prompt_text()) for r in batch], params)  # B x n
        else:
            groups = engine.generate([record_prompt(processor, r).input_ids for r in batch], params,
                                     images=[r.images for r in batch])
        items = [GradeItem(r.question, s.text, r.answer, r.choices, r.options_text(), r.grader)
                 for r, group in zip(batch, groups) for s in group]
        verdicts = iter(grader.grade_batch(items))  # one call for the whole batch: the judge batches it
        for r, group in zip(batch, groups):
            scores = []
            for j, s in enumerate(group):
                v = next(verdicts)
                scores.append(v.score)
                if graded_by is not None:
                    graded_by[v.grader or grader.name] = graded_by.get(v.grader or grader.name, 0) + 1
                malformed += v.verdict == "malformed"
                if on_sample is not None:
                    on_sample(r, j, s, v)
            total += sum(scores) / len(scores)
            count += 1
        if progress is not None:
            progress.update(len(batch))
    return total, count, malformed


def evaluate_files(engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, datasets: Sequence[EvalSet | str],
                   params: SamplingParams, samples: int | None = None, out_dir: str | Path | None = None, *,
                   judge_engine: RolloutEngine | None = None, judge_tokenizer: PreTrainedTokenizerBase | None = None,
                   judge_max_new_tokens: int = 512, max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS, skip_bad_rows: bool = False,
                   batch_questions: int = 32, progress: bool = True, meta: dict | None = None,
                   processor=None, columns: Columns = Columns()) -> list[EvalResult]:
    """Evaluate every data set; return one `EvalResult` each, and write them when `out_dir` is set.

    samples: K samples per question (overrides `params.n`; None keeps it). The judge grader uses
    `judge_engine`/`judge_tokenizer`; `processor` (VLM students) puts each record's images in its
    prompt; `columns`: the files' column names (`zppo_fast.datasets.Columns`). With `out_dir`:
    out_dir/eval.json (results, decoding and
    `meta`) and out_dir/responses.jsonl (every sample with its verdict), written as they come.
    `out_dir` must be new, empty or an earlier evaluation's output (which it replaces); any other
    folder is refused (`ownership.NotOursError`), untouched.
    """
    from tqdm.auto import tqdm

    if samples is not None:
        params = dataclasses.replace(params, n=samples)
    sets = [d if isinstance(d, EvalSet) else EvalSet(str(d)) for d in datasets]
    graders: dict[str, Grader] = {}
    for s in sets:  # build each grader once, before any generation, so a missing extra fails fast
        if s.grader not in graders:
            extra = ({"engine": judge_engine, "tokenizer": judge_tokenizer, "max_new_tokens": judge_max_new_tokens}
                     if s.grader in ("judge", "auto") else {})
            graders[s.grader] = get_grader(s.grader, **extra)
    results = []
    with contextlib.ExitStack() as stack:
        log = None
        if out_dir is not None:  # a new folder, or one an earlier evaluation wrote; never the user's
            out_dir = ownership.claim(out_dir, "eval")
            log = stack.enter_context(open(out_dir / "responses.jsonl", "w", encoding="utf-8"))
        for s in sets:
            data = DatasetFile(s.path, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens,
                               skip_bad_rows=skip_bad_rows, columns=columns)

            def write(r: Record, j: int, sample, v, name=s.name) -> None:
                log.write(json.dumps({"dataset": name, "id": r.id, "sample": j, "gold": r.answer,
                                      "response": sample.text, "finish_reason": sample.finish_reason,
                                      "extracted": v.extracted, "verdict": v.verdict, "score": v.score,
                                      "grader": v.grader or s.grader},
                                     ensure_ascii=False) + "\n")

            graded_by: dict[str, int] = {}
            with tqdm(total=data.num_rows_hint(), desc=f"eval {s.name}", unit="q", disable=not progress) as bar:
                total, count, malformed = evaluate_records(engine, tokenizer, data, graders[s.grader], params,
                                                           batch_questions=batch_questions,
                                                           on_sample=write if log else None, progress=bar,
                                                           processor=processor, graded_by=graded_by)
            results.append(EvalResult(s.name, s.path, s.grader, count, params.n, total / count if count else 0.0,
                                      malformed, data.stats.too_long, sum(data.stats.bad.values()), graded_by))
            if data.stats.too_long or data.stats.bad:
                print(data.stats.summary(), file=sys.stderr)
    if out_dir is not None:
        summary = {
            "decoding": {"samples": params.n, "temperature": params.temperature, "top_p": params.top_p,
                         "top_k": params.top_k, "presence_penalty": params.presence_penalty,
                         "max_new_tokens": params.max_new_tokens, "seed": params.seed},
            "datasets": {r.name: dataclasses.asdict(r) for r in results},
            **(meta or {}),
        }
        (out_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results


def format_table(results: Sequence[EvalResult]) -> str:
    """A fixed-width per-data-set accuracy table for the console."""
    header = ("dataset", "grader", "questions", "samples", "pass@1", "malformed", "too_long", "bad_rows")
    rows = [(r.name, r.grader, str(r.questions), str(r.samples), f"{r.accuracy:.4f}", str(r.malformed),
             str(r.too_long), str(r.bad_rows)) for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row) -> str:  # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def pair_graders(data: list[str], graders: list[str] | None) -> list[EvalSet]:
    graders = graders or ["boxed"]
    if len(graders) == 1:
        graders = graders * len(data)
    if len(graders) != len(data):
        raise ConfigError(f"--grader given {len(graders)} times for {len(data)} --data files: give it once "
                         "(for all files) or once per file, in the same order")
    names = [Path(p).stem for p in data]
    # Two files with one stem (a/test.jsonl, b/test.jsonl) get their folder prefixed to stay apart.
    return [EvalSet(p, g, n if names.count(n) == 1 else f"{Path(p).parent.name}/{n}")
            for p, g, n in zip(data, graders, names)]


def main(argv: list[str] | None = None) -> list[EvalResult]:
    ap = Parser("zppo_fast.eval", __doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model folder (zppo_fast.model.load_model)")
    ap.add_argument("--data", action="append", required=True, help="a .jsonl / .parquet file or datasets folder")
    ap.add_argument("--samples", type=checked(Count), default=1,
                    help="K samples per question; pass@1 averages over them")
    ap.add_argument("--grader", action="append", type=checked(GraderName),
                    help="boxed | choice | math_verify | judge | auto | MODULE:FUNCTION "
                    "(a reward function, zppo_fast/user_grader.py); once or per --data")
    ap.add_argument("--out", default="eval_out", help="folder for eval.json and responses.jsonl: new, empty, or an "
                    "earlier evaluation's (replaced); a folder zppo_fast did not make is refused")
    ap.add_argument("--judge-model", help="model folder of the LLM judge (needed by --grader judge)")
    ap.add_argument("--judge-max-new-tokens", type=checked(Count), default=512)
    ap.add_argument("--temperature", type=checked(NonNegative), default=EVAL_TEMPERATURE)
    ap.add_argument("--top-p", type=checked(OpenFraction), default=EVAL_TOP_P)
    ap.add_argument("--top-k", type=checked(NonNegativeInt), default=EVAL_TOP_K, help="0 turns top-k off")
    ap.add_argument("--presence-penalty", type=checked(NonNegative), default=EVAL_PRESENCE_PENALTY,
                    help="subtracted from the logit of every token already generated; 0 turns it off")
    ap.add_argument("--max-new-tokens", type=checked(Count), default=EVAL_MAX_NEW_TOKENS)
    ap.add_argument("--max-prompt-tokens", type=checked(Count), default=DEFAULT_MAX_PROMPT_TOKENS)
    ap.add_argument("--skip-bad-rows", action="store_true", help="count and skip invalid rows instead of stopping")
    for role, default in ((f.name, f.default) for f in dataclasses.fields(Columns)):  # a data set's own column names
        ap.add_argument(f"--{role}-key", default=default,
                        help=f"the column holding the {role} (default {default!r})" + ("; none: no id column, "
                             "row positions are the ids" if role == "id" else ""))
    ap.add_argument("--batch-questions", type=checked(Count), default=32, help="questions per engine call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--cpu-threads", type=checked(Count), default=RunConfig().cpu_threads,
                    help="torch intra-op threads on a CPU (at most the cores)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        ownership.check_claim(args.out, "eval")  # before any model loads
    except ConfigError as e:
        ap.error(str(e))

    import torch

    from zppo_fast.engine import TransformersEngine
    from zppo_fast.model import load_model

    try:
        sets = pair_graders(args.data, args.grader)
    except ConfigError as e:
        ap.error(str(e))
    columns = Columns(**{f.name: getattr(args, f"{f.name}_key") for f in dataclasses.fields(Columns)})
    if columns.id is not None and columns.id.lower() == "none":
        columns = dataclasses.replace(columns, id=None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(cpu_threads(args.cpu_threads))
    model, tokenizer = load_model(args.model, args.dtype)
    engine = TransformersEngine(model.to(device), tokenizer)
    judge_engine = judge_tokenizer = None
    if any(s.grader == "judge" for s in sets) and not args.judge_model:
        ap.error("--grader judge needs --judge-model PATH")
    if any(s.grader in ("judge", "auto") for s in sets) and args.judge_model:  # auto: for its free-form rows
        judge, judge_tokenizer = load_model(args.judge_model, args.dtype)
        judge_engine = TransformersEngine(judge.to(device), judge_tokenizer)
    params = eval_sampling_params(args.samples, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                  args.seed, args.presence_penalty)
    try:
        results = evaluate_files(engine, tokenizer, sets, params, out_dir=args.out, judge_engine=judge_engine,
                                 judge_tokenizer=judge_tokenizer, judge_max_new_tokens=args.judge_max_new_tokens,
                                 max_prompt_tokens=args.max_prompt_tokens,
                                 skip_bad_rows=args.skip_bad_rows, batch_questions=args.batch_questions,
                                 progress=not args.no_progress, columns=columns,
                                 meta={"model": str(args.model), "judge_model": args.judge_model, "device": device})
    except ConfigError as e:  # a grader that cannot be imported: the message says which
        ap.error(str(e))
    except DatasetError as e:  # a bad row: the message names the file and row
        raise SystemExit(f"error: {e}") from None
    print(format_table(results))
    print(f"wrote {Path(args.out) / 'eval.json'} and {Path(args.out) / 'responses.jsonl'}")
    return results


if __name__ == "__main__":
    main()
