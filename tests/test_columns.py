"""Column mapping (`data.question_key` ...): a data set with its own column names loads as it is, and
a missing column is an error naming the file, the row and the key."""

import io
import json

import pytest
from PIL import Image

from zppo_fast.datasets import Columns, DatasetError, DatasetFile
from zppo_fast.file_task import FileTask

GSM_STYLE = Columns(id=None, question="problem", answer="solution", images="image", choices="options")


def png_bytes(size=(3, 2)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 128, 255)).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_with_its_own_column_names_and_no_id(tmp_path):
    (tmp_path / "pic.png").write_bytes(png_bytes())
    rows = [{"problem": "What is 2+3?", "solution": "5", "level": 1},
            {"problem": "Which is red?", "solution": "B", "options": ["sky", "rose"], "image": "pic.png"},
            {"problem": "What is 7-7?", "solution": 0, "question": "a column of the same name, not the mapped one"}]
    records = list(DatasetFile(write_jsonl(tmp_path / "gsm.jsonl", rows), columns=GSM_STYLE))
    assert [(r.id, r.question, r.answer) for r in records] == [
        ("line 1", "What is 2+3?", "5"), ("line 2", "Which is red?", "B"), ("line 3", "What is 7-7?", "0")]
    assert records[1].choices == ("sky", "rose") and records[1].images == (str((tmp_path / "pic.png").resolve()),)
    # The mapped id column, when the data set has one: its values are the ids, duplicates refused.
    rows = [{"uid": "a", "problem": "p", "solution": "1"}, {"uid": "a", "problem": "p2", "solution": "2"}]
    with pytest.raises(DatasetError, match=r"ids\.jsonl, line 2: duplicate id 'a'"):
        list(DatasetFile(write_jsonl(tmp_path / "ids.jsonl", rows), columns=Columns(id="uid", question="problem",
                                                                                     answer="solution")))


def test_a_missing_column_names_the_file_the_row_and_the_key(tmp_path):
    rows = [{"problem": "What is 1+1?", "solution": "2"}, {"problem": "What is 2+2?", "solution": "4"},
            {"problem": "What is 3+3?", "answer": "6"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DatasetError) as err:
        list(DatasetFile(path, columns=GSM_STYLE))
    assert str(err.value) == (f"{path}, line 3: missing field 'solution' (the answer column: data.answer_key, "
                              "--answer-key); the row has columns 'problem', 'answer'")
    assert (err.value.path, err.value.where, err.value.reason) == (str(path), "line 3", "missing_field")
    # Unmapped (the default names), every row misses 'question': the training set has no usable rows,
    # and the error shows the first messages, naming what the rows hold instead.
    with pytest.raises(DatasetError, match=r"(?s)train\.jsonl has no usable rows: .*missing_field=3.*line 1: missing "
                                           r"field 'id' \(the id column: data\.id_key, --id-key\); the row has "
                                           r"columns 'problem', 'solution'"):
        FileTask([path])
    with pytest.raises(DatasetError, match=r"line 1: missing field 'question' \(the question column: "
                                           r"data\.question_key, --question-key\); the row has columns 'problem'"):
        FileTask([path], columns=Columns(id=None))
    null = write_jsonl(tmp_path / "null.jsonl", [{"problem": None, "solution": "1"}])
    with pytest.raises(DatasetError, match=r"null\.jsonl, line 1: missing field 'problem' \(null\)$"):
        list(DatasetFile(null, columns=GSM_STYLE))


def test_hugging_face_folder_with_one_image_column(tmp_path):
    """A `datasets` folder as a hub data set is laid out: "problem", "solution", a single `Image`
    column, an extra column, no id. It loads through the mapping, images as their encoded bytes."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"problem": datasets.Value("string"), "solution": datasets.Value("string"),
                                  "image": datasets.Image(), "source": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"problem": ["Area?", "Perimeter?"], "solution": ["6", "10"],
                                     "image": [Image.new("RGB", (3, 2)), Image.new("RGB", (5, 4))],
                                     "source": ["geo", "geo"]}, features=features)
    ds.save_to_disk(str(tmp_path / "geo"))
    records = list(DatasetFile(tmp_path / "geo", columns=GSM_STYLE))
    assert [(r.id, r.question, r.answer) for r in records] == [("row 0", "Area?", "6"), ("row 1", "Perimeter?", "10")]
    assert [Image.open(io.BytesIO(r.images[0])).size for r in records] == [(3, 2), (5, 4)]
    with pytest.raises(DatasetError, match=r"geo, row 0: missing field 'answer' \(the answer column: "
                                           r"data\.answer_key, --answer-key\); the row has columns 'problem', "
                                           r"'solution', 'image', 'source'"):
        list(DatasetFile(tmp_path / "geo", columns=Columns(id=None, question="problem")))
