"""User data sets from local files: JSONL, Parquet, and Hugging Face `datasets` saved to disk.

Every format yields the same `Record`s, one at a time (never the whole file in memory):

    for record in DatasetFile("train.jsonl", tokenizer=tok):   # streams, validates, filters
        ...
    records, stats = load_records("heldout.parquet", tokenizer=tok)   # small files: a list
    DatasetFile("gsm8k", columns=Columns(question="problem", answer="solution", id=None))  # HF names

Row schema (one JSON object per line, or one table row). The names are the default `Columns`; a data
set with its own (a Hugging Face data set's "problem", "solution", "image", ...) is read through
`Columns` (the trainer's `data.question_key`, `data.answer_key`, `data.id_key`, `data.images_key`,
`data.choices_key`, `data.grader_key`; the eval CLI's --question-key ...) without being rewritten, and messages name
its own column names. Other columns are ignored.

    id        str or int, non-empty; unique within the file. `Columns(id=None)`: the data set has
              no id column, and each row's position ("line 3", "row 7") is its id
    question  str, non-empty
    answer    str or int (a float is refused: write "0.1" to keep its exact digits), non-empty
    images    optional list, or one image (a `datasets.Image` column); each image a path (str,
              relative to the file's folder unless absolute), raw bytes (Parquet/Arrow binary), or an
              object {"bytes": ..., "path": ...} as `datasets.Image` stores it (in JSONL, "bytes" is
              base64 text)
    choices   optional list of 2..26 non-empty str; the student sees them lettered A., B., ...
              under the question (`Record.prompt_text`)
    grader    optional, one of `ROW_GRADERS` (boxed, choice, math_verify, judge): how this row is
              graded when the run's grader is "auto" (`zppo_fast.graders.AutoGrader`)

Bad input and what happens to it. Each of these is a *bad row*: with `skip_bad_rows=False`
(the default) loading raises `DatasetError` naming the file, the row and the field; with
`skip_bad_rows=True` the row is skipped and counted in `LoadStats.bad` by reason (the first
few messages are kept in `LoadStats.examples`). All checks run when the row is read, before it
can join a training batch, so a bad row never stops a step halfway.

    missing_field   id / question / answer absent or null (an absent column: the message lists
                    the row's columns, to pick the right `Columns` name from)
    bad_type        a field of the wrong type (e.g. a float answer, choices not a list)
    empty           empty (or all-whitespace) id, question or answer. An empty gold answer
                    can never be matched (the graders score it 0 for every response), so such a
                    question would sit in the replay buffer forever: refused, not kept.
    bad_utf8        a JSONL line that is not UTF-8, or text holding lone surrogates ("\\udc80"
                    escapes) that no tokenizer can encode; a Parquet/Arrow binary cell that
                    does not decode as UTF-8 where text is expected
    bad_json        a JSONL line that is not a JSON object
    bad_image       an image path that does not exist, or a file/bytes that PIL cannot
                    identify and verify as an image (including decompression bombs)
    duplicate_id    an id already seen in this file (the first row with it is kept)
    too_large       a row over `max_row_bytes` (64 MiB by default), see below
    bad_choices     more than 26 choices, fewer than 2, or an empty one

Rows whose plain prompt (question + lettered choices + the closing instruction, in the
student's chat template, via `zppo_fast.data.chat_prompt_ids`) is longer than
`max_prompt_tokens` (4,096 by default, the paper's limit) are valid but dropped; they are
counted in `LoadStats.too_long` and never raise. The limit is enforced only when a tokenizer is
given. Image tokens are not counted (text-only students).

Row size. JSONL lines are read with a bounded `readline`, so a 2 GB line is never held whole:
the first `max_row_bytes + 1` bytes show it is too large, and the rest of the line is skipped by
searching a memory map of the file for the next newline (no copy into Python). Parquet and Arrow rows are measured on Arrow's
buffers (`RecordBatch.slice(i, 1).nbytes`) before any Python object is built, so an oversized
cell is never copied into Python; Arrow itself must decode the page holding it (Parquet) or
memory-map it (`datasets` folders, which costs no RAM).

Duplicate ids are detected with a set of the ids' 64-bit hashes (about 70 bytes per row, not the
ids themselves). Two distinct ids share a hash with probability about n^2 / 2^65 (3e-8 for a
million rows); such a row would be reported as a duplicate.

Row numbers in messages: "line N" for JSONL (1-based, as an editor shows it; blank lines are
skipped but counted); "row N" for Parquet and Arrow (0-based, as `table[N]` indexes it).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import mmap
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from zppo_fast.data import chat_prompt_ids

__all__ = [
    "CHOICE_LETTERS",
    "Columns",
    "DEFAULT_MAX_PROMPT_TOKENS",
    "DEFAULT_MAX_ROW_BYTES",
    "DatasetError",
    "DatasetFile",
    "LoadStats",
    "Record",
    "load_records",
]

DEFAULT_MAX_PROMPT_TOKENS = 4096  # the paper's maximum prompt length
DEFAULT_MAX_ROW_BYTES = 64 << 20  # room for a few large base64 images in a JSONL line
CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ARROW_BATCH_ROWS = 256  # rows converted to Python at a time from Parquet/Arrow
_MAX_EXAMPLES = 5  # bad-row messages kept for the report when skipping


@dataclass(frozen=True)
class Columns:
    """The column (JSON key) holding each field of a row. id None: no id column (row positions)."""

    id: str | None = "id"
    question: str = "question"
    answer: str = "answer"
    images: str = "images"
    choices: str = "choices"
    grader: str = "grader"  # optional: the row's own grader (ROW_GRADERS), read by data.grader = "auto"


# What a row's grader column may name (zppo_fast/graders.py registers them).
ROW_GRADERS = ("boxed", "choice", "math_verify", "judge")


@dataclass(frozen=True)
class Record:
    """One validated question.

    images: each a `str` (an absolute path, already resolved against the file's folder) or
    `bytes` (an encoded image: PNG, JPEG, ...); never decoded pixels, so a record stays small.
    source: "FILE, line N" / "FILE, row N", for messages that must point back at the data.
    """

    id: str
    question: str
    answer: str
    images: tuple[str | bytes, ...] = ()
    choices: tuple[str, ...] = ()
    source: str = ""
    grader: str | None = None  # the row's grader column (one of ROW_GRADERS); None: not given

    def prompt_text(self) -> str:
        """What the student is asked (before the closing instruction): the question, then, for a
        multiple-choice row, a blank line and one "A. text" line per choice."""
        if not self.choices:
            return self.question
        return self.question + "\n\n" + "\n".join(f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(self.choices))

    def options_text(self) -> str | None:
        """The lettered choices alone (the judge prompt's "Answer Options"), None without choices."""
        return "\n".join(f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(self.choices)) or None


class DatasetError(ValueError):
    """A file that cannot be read, or one bad row; the message names the file and the row."""

    def __init__(self, message: str, path: str, where: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.path, self.where, self.reason = path, where, reason


class _BadRow(Exception):
    """Internal: one row failed validation for `reason` (a `LoadStats.bad` key)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class LoadStats:
    """What one pass over a file saw. rows = kept + too_long + sum(bad.values())."""

    path: str
    rows: int = 0
    kept: int = 0
    too_long: int = 0
    bad: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.path}: kept {self.kept} of {self.rows} rows"]
        if self.too_long:
            parts.append(f"dropped {self.too_long} over the prompt-length limit")
        if self.bad:
            parts.append("skipped bad rows: " + ", ".join(f"{k}={v}" for k, v in sorted(self.bad.items())))
        return "; ".join(parts)


class DatasetFile:
    """A re-iterable stream of `Record`s from one file (or `datasets` folder).

    Each `iter()` reads the file afresh and resets `stats`. Format by name: `*.jsonl` (also
    `*.json` holding one object per line), `*.parquet`, or a folder written by
    `datasets.Dataset.save_to_disk` (pyarrow / datasets are optional: `pip install pyarrow datasets`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
        skip_bad_rows: bool = False,
        max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
        check_images: bool = True,
        columns: Columns = Columns(),
    ):
        self.path, self.columns = Path(path), columns
        self.tokenizer, self.max_prompt_tokens = tokenizer, max_prompt_tokens
        self.skip_bad_rows, self.max_row_bytes, self.check_images = skip_bad_rows, max_row_bytes, check_images
        self.format = _detect_format(self.path)
        self.stats = LoadStats(str(self.path))

    def num_rows_hint(self) -> int | None:
        """Row count from metadata when the format has it cheaply (Parquet, Arrow); else None."""
        if self.format == "parquet":
            return _pyarrow_parquet().ParquetFile(self.path).metadata.num_rows
        if self.format == "hf_disk":
            return len(_load_hf_dataset(self.path))
        return None

    def __iter__(self) -> Iterator[Record]:
        self.stats = stats = LoadStats(str(self.path))
        seen: set[int] = set()
        rows = {"jsonl": self._jsonl_rows, "parquet": self._parquet_rows, "hf_disk": self._hf_rows}[self.format]()
        for where, raw in rows:
            stats.rows += 1
            try:
                if isinstance(raw, _BadRow):
                    raise raw
                record = self._validate(raw, where)
                key = hash(record.id)
                if key in seen:
                    raise _BadRow("duplicate_id", f"duplicate id {record.id!r} (an earlier row has it)")
                seen.add(key)
            except _BadRow as bad:
                message = f"{self.path}, {where}: {bad}"
                if not self.skip_bad_rows:
                    raise DatasetError(message, str(self.path), where, bad.reason) from None
                stats.bad[bad.reason] += 1
                if len(stats.examples) < _MAX_EXAMPLES:
                    stats.examples.append(message)
                continue
            if self._too_long(record):
                stats.too_long += 1
                continue
            stats.kept += 1
            yield record

    def _too_long(self, record: Record) -> bool:
        """Is the plain prompt, as the student's chat template renders it, over the token limit?"""
        if self.tokenizer is None or self.max_prompt_tokens is None:
            return False
        return len(chat_prompt_ids(self.tokenizer, record.prompt_text())) > self.max_prompt_tokens

    # --- readers: yield (where, raw row dict | _BadRow) ---------------------------------------

    def _jsonl_rows(self) -> Iterator[tuple[str, dict | _BadRow]]:
        limit = self.max_row_bytes
        with open(self.path, "rb") as f:
            line_no = 0
            while True:
                line = f.readline(limit + 1)  # bounded: never more than limit + 1 bytes in memory
                if not line:
                    return
                line_no += 1
                where = f"line {line_no}"
                if len(line) > limit and not line.endswith(b"\n"):  # more than `limit` bytes before the newline
                    size = len(line) + _skip_line(f)
                    yield where, _BadRow("too_large", f"row of {size} bytes exceeds max_row_bytes={limit}")
                    continue
                if line_no == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, _BadRow("bad_utf8", f"not valid UTF-8 (byte 0x{line[e.start]:02x} at offset {e.start})")
                    continue
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError as e:
                    yield where, _BadRow("bad_json", f"not valid JSON: {e.msg} at column {e.colno}")
                    continue
                if not isinstance(raw, dict):
                    yield where, _BadRow("bad_json", f"a JSON {type(raw).__name__}, expected an object")
                    continue
                yield where, raw

    def _arrow_rows(self, batches) -> Iterator[tuple[str, dict | _BadRow]]:
        """Rows of Arrow record batches, each measured on Arrow's buffers before conversion."""
        index = 0
        for batch in batches:
            for start in range(0, batch.num_rows, _ARROW_BATCH_ROWS):
                part = batch.slice(start, _ARROW_BATCH_ROWS)
                sizes = [part.slice(i, 1).nbytes for i in range(part.num_rows)]
                if max(sizes, default=0) <= self.max_row_bytes:
                    pylist = part.to_pylist()
                else:  # convert the small rows one by one, never the oversized ones
                    pylist = [part.slice(i, 1).to_pylist()[0] if s <= self.max_row_bytes else None
                              for i, s in enumerate(sizes)]
                for size, raw in zip(sizes, pylist):
                    where = f"row {index}"
                    index += 1
                    if raw is None:
                        yield where, _BadRow("too_large", f"row of {size} bytes exceeds max_row_bytes={self.max_row_bytes}")
                    else:
                        yield where, raw

    def _parquet_rows(self) -> Iterator[tuple[str, dict | _BadRow]]:
        pq = _pyarrow_parquet()
        try:
            parquet = pq.ParquetFile(self.path)
        except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid, OSError, ...: the user needs the cause
            raise DatasetError(f"{self.path}: not a readable Parquet file: {e}", str(self.path)) from None
        yield from self._arrow_rows(parquet.iter_batches(batch_size=_ARROW_BATCH_ROWS))

    def _hf_rows(self) -> Iterator[tuple[str, dict | _BadRow]]:
        # The arrow table of a saved dataset is memory-mapped: batches are views, not copies.
        # Reading the Arrow table directly keeps `datasets` from decoding Image columns into PIL.
        table = _load_hf_dataset(self.path).data.table
        yield from self._arrow_rows(table.to_batches(max_chunksize=_ARROW_BATCH_ROWS))

    # --- validation ----------------------------------------------------------------------------

    def _validate(self, raw: dict, where: str) -> Record:
        col = self.columns
        if col.id is None:
            qid = where
        else:
            qid = _required(raw, col.id, "id")
            if isinstance(qid, bool) or not isinstance(qid, (str, int, bytes)):
                raise _BadRow("bad_type", f"field {col.id!r} must be a string or an integer, got {type(qid).__name__}")
            qid = _text(qid, col.id) if not isinstance(qid, int) else str(qid)
        question = _required(raw, col.question, "question")
        if not isinstance(question, (str, bytes)):
            raise _BadRow("bad_type", f"field {col.question!r} must be a string, got {type(question).__name__}")
        question = _text(question, col.question)
        answer = _required(raw, col.answer, "answer")
        if isinstance(answer, float):
            raise _BadRow("bad_type", f"field {col.answer!r} is a float ({answer!r}): write it as a string to keep "
                                      "its digits")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, bytes)):
            raise _BadRow("bad_type",
                          f"field {col.answer!r} must be a string or an integer, got {type(answer).__name__}")
        answer = _text(answer, col.answer) if not isinstance(answer, int) else str(answer)
        choices = self._choices(raw.get(col.choices))
        images = self._images(raw.get(col.images))
        grader = raw.get(col.grader)
        if grader is not None and grader not in ROW_GRADERS:
            raise _BadRow("bad_grader", f"field {col.grader!r} must be one of {', '.join(ROW_GRADERS)} (or absent), "
                                        f"got {grader!r}")
        return Record(qid, question, answer, images, choices, f"{self.path}, {where}", grader)

    def _choices(self, value) -> tuple[str, ...]:
        key = self.columns.choices
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)):
            raise _BadRow("bad_type", f"field {key!r} must be a list of strings, got {type(value).__name__}")
        if not 2 <= len(value) <= len(CHOICE_LETTERS):
            raise _BadRow("bad_choices", f"field {key!r} has {len(value)} entries; 2 to {len(CHOICE_LETTERS)} allowed")
        out = []
        for i, c in enumerate(value):
            if not isinstance(c, (str, bytes)):
                raise _BadRow("bad_type", f"{key}[{i}] must be a string, got {type(c).__name__}")
            try:
                out.append(_text(c, f"{key}[{i}]"))
            except _BadRow as e:
                raise _BadRow("bad_choices" if e.reason == "empty" else e.reason, str(e)) from None
        return tuple(out)

    def _images(self, value) -> tuple[str | bytes, ...]:
        key = self.columns.images
        if value is None:
            return ()
        if isinstance(value, (dict, str, bytes, bytearray, memoryview)):
            value = [value]  # one image, as a `datasets.Image` column (not a Sequence of them) holds it
        if not isinstance(value, (list, tuple)):
            raise _BadRow("bad_type",
                          f"field {key!r} must be a list of images or one image, got {type(value).__name__}")
        out: list[str | bytes] = []
        for i, item in enumerate(value):
            if isinstance(item, dict):  # `datasets.Image` storage: {"bytes": ..., "path": ...}; bytes win
                data = item.get("bytes")
                if isinstance(data, str):  # JSON has no bytes type: there "bytes" holds base64 text
                    try:
                        data = base64.b64decode(data, validate=True)
                    except (binascii.Error, ValueError):
                        raise _BadRow("bad_image", f"{key}[{i}].bytes is not valid base64") from None
                item = data or item.get("path")
            if isinstance(item, str):
                path = Path(item) if os.path.isabs(item) else self.path.parent / item
                if not path.is_file():
                    raise _BadRow("bad_image", f"{key}[{i}]: file {path} does not exist")
                image: str | bytes = str(path.resolve())
            elif isinstance(item, (bytes, bytearray, memoryview)):
                image = bytes(item)
            else:
                raise _BadRow("bad_type",
                              f"{key}[{i}] must be a path, bytes or {{bytes, path}}, got {type(item).__name__}")
            if self.check_images:
                _verify_image(image, f"{key}[{i}]")
            out.append(image)
        return tuple(out)


def _skip_line(f) -> int:
    """Advance binary file `f` past the next newline (or to EOF); return the bytes skipped.

    Searches a read-only memory map of the file: the kernel pages the line in and out as
    `find` scans it (at memchr speed), nothing is copied into Python objects, however long it is.
    """
    pos = f.tell()
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        newline = mm.find(b"\n", pos)
        end = len(mm) if newline < 0 else newline + 1
    f.seek(end)
    return end - pos


def _required(raw: dict, key: str, role: str):
    """raw[key]: the row's `role` (id / question / answer) under the data set's column name `key`."""
    if key not in raw:  # the message says which setting names the column, and what the row offers instead
        raise _BadRow("missing_field", f"missing field {key!r} (the {role} column: data.{role}_key, "
                                       f"--{role}-key); the row has {_listing(raw)}")
    if raw[key] is None:
        raise _BadRow("missing_field", f"missing field {key!r} (null)")
    return raw[key]


def _listing(raw: dict, limit: int = 12) -> str:
    keys = [repr(k) for k in list(raw)[:limit]]
    more = f" and {len(raw) - limit} more" if len(raw) > limit else ""
    return ("columns " + ", ".join(keys) + more) if keys else "no columns"


def _text(value: str | bytes, key: str) -> str:
    """A field's text: bytes decoded strictly as UTF-8, lone surrogates refused, not blank."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadRow("bad_utf8", f"field {key!r} is not valid UTF-8 (byte offset {e.start})") from None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _BadRow("bad_utf8", f"field {key!r} holds a lone surrogate (\\u{ord(value[e.start]):04x}) at {e.start}") from None
    if not value.strip():
        raise _BadRow("empty", f"field {key!r} is empty")
    return value


def _verify_image(image: str | bytes, label: str) -> None:
    """Identify the image and check its file structure (PIL's `verify`, no pixel decoding)."""
    from PIL import Image  # a dependency of matplotlib, so installed with the default extras

    try:
        with Image.open(image if isinstance(image, str) else io.BytesIO(image)) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, SyntaxError, DecompressionBombError
        what = image if isinstance(image, str) else f"{len(image)} bytes"
        raise _BadRow("bad_image", f"{label} ({what}) is not a readable image: {type(e).__name__}: {e}") from None


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf_disk"
        raise DatasetError(f"{path} is a folder but not a `datasets` save_to_disk folder (no dataset_info.json)",
                           str(path))
    if not path.is_file():
        raise DatasetError(f"data file {path} does not exist", str(path))
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise DatasetError(f"{path}: unknown data format {suffix!r}; use .jsonl, .parquet or a datasets folder", str(path))


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet files needs pyarrow: pip install pyarrow") from None
    return pq


def _load_hf_dataset(path: Path):
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"reading {path} (a `datasets` folder) needs the datasets package: pip install datasets"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DatasetError(f"{path} holds a DatasetDict with splits {sorted(ds)}; pass one split's folder, e.g. "
                           f"{path / min(ds)}", str(path))
    return ds


def load_records(path: str | os.PathLike, **kwargs) -> tuple[list[Record], LoadStats]:
    """All kept records of a (small) file and the pass's stats; kwargs as for `DatasetFile`."""
    data = DatasetFile(path, **kwargs)
    records = list(data)
    return records, data.stats
