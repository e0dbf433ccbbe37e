"""Data-file loaders: good files in every format, each kind of bad row, streaming, the limits."""

import base64
import io
import json
import tracemalloc

import pytest
from PIL import Image

from zppo_fast.data import chat_prompt_ids
from zppo_fast.datasets import DatasetError, DatasetFile, Record, load_records
from zppo_fast.tokenizer import build_tokenizer


def png_bytes(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows) -> None:
    with open(path, "wb") as f:
        f.writelines(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n" for row in rows)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["How many pens does Ann have? 0123456789", "word " * 50], vocab_size=300)


def test_jsonl_good_rows_all_fields(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    rows = [
        {"id": 1, "question": "What is 1+1?", "answer": "2"},
        {"id": "q2", "question": "Pick one.", "answer": "B", "choices": ["red", "blue"],
         "images": ["img/a.png", {"bytes": base64.b64encode(png_bytes((0, 0, 255))).decode(), "path": None}]},
        {"id": 3, "question": "Answer as int", "answer": 42},
    ]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows[:1])
    with open(path, "ab") as f:
        f.write(b"\n   \n")  # blank lines are not rows, but they count as lines
    write_jsonl(tmp_path / "tail.jsonl", rows[1:])
    path.write_bytes(path.read_bytes() + (tmp_path / "tail.jsonl").read_bytes())

    records, stats = load_records(path)
    assert [r.id for r in records] == ["1", "q2", "3"]
    assert records[2].answer == "42"
    assert records[1].choices == ("red", "blue")
    assert records[1].images[0] == str((tmp_path / "img" / "a.png").resolve())
    assert records[1].images[1] == png_bytes((0, 0, 255))
    assert records[1].source == f"{path}, line 4"
    assert records[1].prompt_text() == "Pick one.\n\nA. red\nB. blue"
    assert records[0].prompt_text() == "What is 1+1?" and records[0].options_text() is None
    assert (stats.rows, stats.kept, stats.too_long, dict(stats.bad)) == (3, 3, 0, {})


GOOD = {"id": "g", "question": "q?", "answer": "1"}
NOT_AN_IMAGE = b"this is text, not a PNG"

# (row as written on line 2, reason, a fragment the message must contain)
BAD_ROWS = [
    ({"question": "q?", "answer": "1"}, "missing_field",
     "missing field 'id' (the id column: data.id_key, --id-key); the row has columns 'question', 'answer'"),
    ({"id": "x", "answer": "1"}, "missing_field", "missing field 'question'"),
    ({"id": "x", "question": "q?", "answer": None}, "missing_field", "missing field 'answer'"),
    ({"id": "x", "question": "q?", "answer": ""}, "empty", "field 'answer' is empty"),
    ({"id": "x", "question": "q?", "answer": "  "}, "empty", "field 'answer' is empty"),
    ({"id": "x", "question": "", "answer": "1"}, "empty", "field 'question' is empty"),
    ({"id": "x", "question": "q?", "answer": 0.1}, "bad_type", "field 'answer' is a float (0.1)"),
    ({"id": True, "question": "q?", "answer": "1"}, "bad_type", "field 'id' must be a string or an integer"),
    ({"id": "x", "question": ["q"], "answer": "1"}, "bad_type", "field 'question' must be a string, got list"),
    ({"id": "x", "question": "q?", "answer": "1", "choices": "AB"}, "bad_type", "field 'choices' must be a list"),
    ({"id": "x", "question": "q?", "answer": "1", "choices": ["only"]}, "bad_choices", "has 1 entries; 2 to 26"),
    ({"id": "x", "question": "q?", "answer": "1", "choices": ["a", " "]}, "bad_choices", "field 'choices[1]' is empty"),
    ({"id": "x", "question": "q?", "answer": "1", "images": ["nope.png"]}, "bad_image", "nope.png does not exist"),
    ({"id": "x", "question": "q?", "answer": "1", "images": ["fake.png"]}, "bad_image",
     "fake.png) is not a readable image: UnidentifiedImageError"),
    ({"id": "x", "question": "q?", "answer": "1", "images": [{"bytes": base64.b64encode(NOT_AN_IMAGE).decode()}]},
     "bad_image", f"images[0] ({len(NOT_AN_IMAGE)} bytes) is not a readable image"),
    ({"id": "x", "question": "q?", "answer": "1", "images": [{"bytes": "%%%"}]}, "bad_image", "not valid base64"),
    ({"id": "x", "question": "q?", "answer": "1", "images": 7}, "bad_type",
     "field 'images' must be a list of images or one image, got int"),
    ({"id": "x", "question": "q?", "answer": "1", "images": "a.png"}, "bad_image", "images[0]: file"),  # one path
    ({"id": "g", "question": "again", "answer": "1"}, "duplicate_id", "duplicate id 'g'"),
    (b'{"id": "x", "question": "caf\xe9", "answer": "1"}\n', "bad_utf8", "not valid UTF-8 (byte 0xe9 at offset 28)"),
    (b'{"id": "x", "question": "\\udc80", "answer": "1"}\n', "bad_utf8", "holds a lone surrogate (\\udc80)"),
    (b'{"id": "x", "question": \n', "bad_json", "not valid JSON: Expecting value"),
    (b'[1, 2]\n', "bad_json", "a JSON list, expected an object"),
]


@pytest.mark.parametrize("row,reason,fragment", BAD_ROWS, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(BAD_ROWS)])
def test_jsonl_bad_row_raises_with_file_and_line_or_is_counted(tmp_path, row, reason, fragment):
    (tmp_path / "fake.png").write_bytes(NOT_AN_IMAGE)
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [GOOD, row, {"id": "after", "question": "q?", "answer": "2"}])

    with pytest.raises(DatasetError) as err:
        list(DatasetFile(path))
    assert str(err.value).startswith(f"{path}, line 2: ")
    assert fragment in str(err.value)
    assert (err.value.where, err.value.reason) == ("line 2", reason)

    # Skipping: the bad row is counted by reason, its message kept, the rows around it survive.
    records, stats = load_records(path, skip_bad_rows=True)
    assert [r.id for r in records] == ["g", "after"]
    assert dict(stats.bad) == {reason: 1} and stats.rows == 3 and stats.kept == 2
    assert fragment in stats.examples[0]
    assert f"skipped bad rows: {reason}=1" in stats.summary()


def test_streaming_yields_rows_before_reading_the_rest(tmp_path):
    path = tmp_path / "s.jsonl"
    write_jsonl(path, [GOOD, b"garbage\n"])
    it = iter(DatasetFile(path))
    assert next(it).id == "g"  # the bad second line has not been read yet
    with pytest.raises(DatasetError, match="line 2"):
        next(it)


def test_streaming_memory_stays_far_below_file_size(tmp_path):
    path = tmp_path / "many.jsonl"
    filler = "x" * 1000
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": i, "question": f"{filler} {i}", "answer": str(i)}) + "\n" for i in range(20_000))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        count = sum(1 for _ in DatasetFile(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 20_000
    assert peak < size / 4, (peak, size)  # the id-hash set grows, the rows do not accumulate


def test_a_2gb_row_is_rejected_without_reading_it_into_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:  # a sparse file: 2 GiB of question text that takes no disk space
        f.write(b'{"id": "huge", "question": "')
        f.truncate(2 * 1024**3)
        f.seek(0, 2)
        f.write(b'", "answer": "1"}\n' + json.dumps(GOOD).encode() + b"\n")
    limit = 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=rf"huge.jsonl, line 1: row of 2147483666 bytes exceeds max_row_bytes={limit}"):
            list(DatasetFile(path, max_row_bytes=limit))
        records, stats = load_records(path, max_row_bytes=limit, skip_bad_rows=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r.id for r in records] == ["g"] and dict(stats.bad) == {"too_large": 1}
    assert peak < 4 * limit


def test_row_of_exactly_the_limit_is_kept(tmp_path):
    row = json.dumps(GOOD).encode()
    path = tmp_path / "edge.jsonl"
    path.write_bytes(row + b"\n" + row.replace(b'"g"', b'"h"'))  # the last line has no newline
    assert [r.id for r in DatasetFile(path, max_row_bytes=len(row))] == ["g", "h"]
    with pytest.raises(DatasetError, match="line 1: row of"):
        list(DatasetFile(path, max_row_bytes=len(row) - 1))


def test_prompt_length_limit_drops_and_counts(tmp_path, tokenizer):
    short, long = "How many pens?", "word " * 300
    path = tmp_path / "len.jsonl"
    write_jsonl(path, [{"id": i, "question": q, "answer": "1"} for i, q in enumerate([short, long, short, long])])
    limit = len(chat_prompt_ids(tokenizer, short))  # the short prompt fits exactly
    assert len(chat_prompt_ids(tokenizer, long)) > limit
    data = DatasetFile(path, tokenizer=tokenizer, max_prompt_tokens=limit)
    assert [r.id for r in data] == ["0", "2"]
    assert (data.stats.too_long, data.stats.kept) == (2, 2)
    assert "dropped 2 over the prompt-length limit" in data.stats.summary()
    # The limit counts the choices the student sees, and one token less drops the short rows too.
    assert list(DatasetFile(path, tokenizer=tokenizer, max_prompt_tokens=limit - 1)) == []
    # Without a tokenizer nothing is measured.
    assert len(list(DatasetFile(path))) == 4


def test_file_level_errors(tmp_path):
    with pytest.raises(DatasetError, match="data file .*missing.jsonl does not exist"):
        DatasetFile(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("id,question,answer\n")
    with pytest.raises(DatasetError, match=r"unknown data format '\.csv'"):
        DatasetFile(tmp_path / "d.csv")
    with pytest.raises(DatasetError, match="not a `datasets` save_to_disk folder"):
        DatasetFile(tmp_path)


def test_missing_optional_packages_say_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(ImportError, match="reading Parquet files needs pyarrow: pip install pyarrow"):
        list(DatasetFile(tmp_path / "d.parquet"))
    with pytest.raises(ImportError, match="needs the datasets package: pip install datasets"):
        list(DatasetFile(tmp_path / "hf"))


def _table_rows(tmp_path):
    (tmp_path / "pic.png").write_bytes(png_bytes())
    return {
        "id": ["a", "b", "c", "d", "e", "a"],
        "question": [b"q1", b"q\xff", b"q3", b"q4", b"x" * 5000, b"q6"],
        "answer": ["1", "2", "", "4", "5", "6"],
        "images": [[{"bytes": png_bytes(), "path": None}], [], [], [{"bytes": None, "path": "pic.png"}],
                   [], [{"bytes": NOT_AN_IMAGE, "path": None}]],
    }


def test_parquet_good_and_bad_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(_table_rows(tmp_path)), path)

    data = DatasetFile(path, skip_bad_rows=True, max_row_bytes=4096)
    assert data.num_rows_hint() == 6
    records = list(data)
    assert [r.id for r in records] == ["a", "d"]
    assert records[0].images == (png_bytes(),)
    assert records[1].images == (str((tmp_path / "pic.png").resolve()),)
    # Row 5 repeats id "a" and holds a non-image: rows are validated before the duplicate check.
    assert dict(data.stats.bad) == {"bad_utf8": 1, "empty": 1, "too_large": 1, "bad_image": 1}
    assert data.stats.examples[0] == f"{path}, row 1: field 'question' is not valid UTF-8 (byte offset 1)"
    assert any(m.startswith(f"{path}, row 4: row of ") and "exceeds max_row_bytes=4096" in m
               for m in data.stats.examples)
    with pytest.raises(DatasetError, match=r"d.parquet, row 1: field 'question' is not valid UTF-8"):
        list(DatasetFile(path))
    # Rows 0 and 5 alone: the non-image is the first problem reached, and the error names it.
    pq.write_table(pa.table({k: v[:1] + v[5:] for k, v in _table_rows(tmp_path).items()} | {"id": ["a", "z"]}), path)
    with pytest.raises(DatasetError, match=r"row 1: images\[0\] \(23 bytes\) is not a readable image"):
        list(DatasetFile(path))


def test_parquet_not_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"d.parquet: not a readable Parquet file"):
        list(DatasetFile(tmp_path / "d.parquet"))


def test_hf_datasets_folder_with_image_feature(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"id": [1, 2], "question": ["q1", "q2"], "answer": ["1", "B"], "choices": [None, ["x", "y"]],
            "images": [[Image.new("RGB", (2, 2))], []]}
    features = datasets.Features({"id": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "images": datasets.Sequence(datasets.Image())})
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    records = list(DatasetFile(tmp_path / "ds"))
    assert [(r.id, r.answer, r.choices) for r in records] == [("1", "1", ()), ("2", "B", ("x", "y"))]
    assert isinstance(records[0].images[0], bytes) and Image.open(io.BytesIO(records[0].images[0])).size == (2, 2)

    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetError, match=r"holds a DatasetDict with splits \['test'\]; pass one split's folder"):
        list(DatasetFile(tmp_path / "dd"))


def test_record_is_frozen():
    r = Record("1", "q", "a")
    with pytest.raises(AttributeError):
        r.answer = "b"
