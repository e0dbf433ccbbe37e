"""Training questions from the user's data files: `[data] train = ["a.jsonl", "b.parquet", ...]`.

    task = FileTask(["train.jsonl"], tokenizer=tok, skip_bad_rows=True)   # one validating pass
    print(task.report())                     # per file: rows kept, bad rows by reason, too-long rows
    task.problem(7)                          # Problem(id=7, question, answer, images=(...), choices=(...))
    grade_item(task.problem(7), response)    # what a `zppo_fast.graders` grader scores

`FileTask` has the face of `zppo_fast.task.ArithmeticTask` (`problem(id)`, `train_ids()`,
`heldout_ids()`), so the trainer's step does not know where its questions come from. Held-out
files are not part of it: the trainer evaluates them with `zppo_fast.eval.evaluate_files`.

Ids. The replay buffer stores int64 ids, so each kept record gets one: its position in the
validated, kept order -- files in the configured order, rows in file order, bad rows and rows over
the prompt limit left out. The record's own `id` field (any string) stays in its `Record` for
messages. Every rank makes the same pass over the same files, so the ids agree without sending
records around; `fingerprint` (a hash of every kept record's id, question and answer, not of the
paths) lets the trainer check that the ranks, and a resumed run, see the same data.

Validation. The pass runs once, at startup, before any step: fields, UTF-8, duplicate ids within a
file, and every image identified and verified by PIL (`zppo_fast.datasets` lists the checks). A bad
row either stops the run there (`skip_bad_rows=False`: DatasetError naming file, row and field) or
is skipped and counted; a row whose plain prompt is over `max_prompt_tokens` is dropped and counted
(text tokens: image tokens are not counted). A file (or all of them) with no usable row is an error.
So no training step ever meets a bad row.

Memory. Every kept `Record` is held, on every rank: its text (question, answer, choices), its image
paths, and any image bytes embedded in the file -- stored as encoded, never decoded; image files
named by path are read only when a rollout needs them. That is the text of the files plus their
embedded image bytes plus about 0.5 KB of Python objects per record: about 80 MB for the paper's
77K triples with images as files. A file of embedded images costs its own size in RAM per rank;
keep large image sets as files next to the data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from zppo_fast.datasets import (
    CHOICE_LETTERS,
    DEFAULT_MAX_PROMPT_TOKENS,
    Columns,
    DatasetError,
    DatasetFile,
    LoadStats,
    Record,
)
from zppo_fast.graders import GradeItem
from zppo_fast.task import Problem


class FileTask:
    """The kept records of `paths`, addressed by integer id 0 .. len - 1 (all of them train).
    `columns`: the files' column names (`data.question_key` ...), the same for every file."""

    def __init__(self, paths: Sequence[str | os.PathLike], *, tokenizer: PreTrainedTokenizerBase | None = None,
                 max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS, skip_bad_rows: bool = True,
                 columns: Columns = Columns()):
        if not paths:
            raise DatasetError("no training data files given ([data] train is empty)", "")
        self.records: list[Record] = []
        self.stats: list[LoadStats] = []
        for path in paths:
            data = DatasetFile(path, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens,
                               skip_bad_rows=skip_bad_rows, columns=columns)
            self.records.extend(data)
            self.stats.append(data.stats)
            if data.stats.kept == 0:
                why = "it is empty" if data.stats.rows == 0 else data.stats.summary()
                raise DatasetError(f"training data file {path} has no usable rows: {why}"
                                   + "".join(f"\n  {e}" for e in data.stats.examples), str(path))
        digest = hashlib.sha256()
        for r in self.records:
            digest.update(f"{r.id}\0{r.question}\0{r.answer}\n".encode())
        self.fingerprint = digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.records)

    def train_ids(self) -> list[int]:
        return list(range(len(self.records)))

    def heldout_ids(self) -> list[int]:
        """None: held-out data lives in its own files (`[data] heldout`)."""
        return []

    def heldout_sets(self, size: int, seed: int = 0) -> dict[str, list[int]]:
        return {}

    def record(self, qid: int) -> Record:
        if not 0 <= qid < len(self.records):
            raise KeyError(f"question id {qid} is outside the data's range [0, {len(self.records)})")
        return self.records[qid]

    def problem(self, qid: int) -> Problem:
        r = self.record(qid)
        return Problem(qid, r.prompt_text(), r.answer, images=r.images, choices=r.choices, grader=r.grader)

    @property
    def has_images(self) -> bool:
        return any(r.images for r in self.records)

    def counts(self) -> dict[str, float]:
        """Totals over the files, as metrics: rows read, kept, dropped as too long, skipped as bad."""
        return {"data/rows": float(sum(s.rows for s in self.stats)), "data/kept": float(len(self.records)),
                "data/too_long": float(sum(s.too_long for s in self.stats)),
                "data/bad_rows": float(sum(sum(s.bad.values()) for s in self.stats))}

    def report(self) -> str:
        """One line per file (`LoadStats.summary`), then the first bad-row messages."""
        lines = [s.summary() for s in self.stats]
        lines += [f"  {e}" for s in self.stats for e in s.examples]
        return "\n".join(lines)


def grade_item(problem: Problem, response: str) -> GradeItem:
    """What a grader needs to score `response` to `problem` (multiple choice: the lettered options)."""
    options = "\n".join(f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(problem.choices)) or None
    return GradeItem(problem.question, response, problem.answer, problem.choices, options, problem.grader)
