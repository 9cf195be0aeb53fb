"""Readers: formats, header detection, --columns, and path:line errors for bad input."""

import json

import pytest

from kiln.config import Config
from kiln.data import find_splits, holdout
from kiln.data.tables import parse_columns, read_table, write_table
from kiln.errors import KilnError
from kiln.tasks import get_task


def task(name="sequence", columns="", problem_type="auto"):
    return get_task(name, Config().with_settings({"data.columns": columns, "sequence.problem_type": problem_type}))


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_tsv_with_header_and_quotes_is_not_csv_quoting(tmp_path):
    path = write(tmp_path / "a.tsv", 'sentence\tlabel\n"a quoted start\t1\nit\'s "fine" here\t0\n')
    data = task().read(path)
    assert [ex["texts"][0] for ex in data.examples] == ['"a quoted start', 'it\'s "fine" here']
    assert [ex["line"] for ex in data.examples] == [2, 3]


def test_bom_and_label_first_header_with_columns(tmp_path):
    path = write(tmp_path / "mrpc.tsv",
                 "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA b .\tA c .\n0\t3\t4\tX .\tY .\n")
    t = task("sentence-pair", columns="sentence1=#1 String,sentence2=#2 String,label=Quality")
    data = t.read(path)
    assert data.examples[0]["texts"] == ("A b .", "A c .")
    assert [ex["label"] for ex in data.examples] == ["1", "0"]


def test_headerless_columns_by_position(tmp_path):
    path = write(tmp_path / "cola.tsv", "gj04\t1\t\tThe sailors rode the breeze .\ngj04\t0\t*\tThe more .\n")
    data = task(columns="text=3,label=1").read(path)
    assert data.table.header is None
    assert data.examples[1]["texts"] == ("The more .",) and data.examples[1]["label"] == "0"


def test_headerless_two_columns_default_to_text_label(tmp_path):
    path = write(tmp_path / "x.tsv", "good film\tpos\nbad film\tneg\n")
    assert [ex["label"] for ex in task().read(path).examples] == ["pos", "neg"]


def test_csv_uses_quoting(tmp_path):
    path = write(tmp_path / "a.csv", 'text,label\n"hello, world",1\nplain,0\n')
    assert task().read(path).examples[0]["texts"] == ("hello, world",)


def test_jsonl_classy_and_hf_keys(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"sequence": "a", "label": "x"}\n{"sequence": "b", "label": "y"}\n')
    assert [ex["texts"][0] for ex in task().read(path).examples] == ["a", "b"]
    path = write(tmp_path / "b.jsonl", '{"sentence1": "a", "sentence2": "b", "label": 0.5}\n')
    assert task("sentence-pair").read(path).examples[0]["label"] == "0.5"


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        ("sentence\tlabel\ngood\t1\nbad\n", 3, "expected 2 columns"),
        ("sentence\tlabel\ngood\t1\tx\n", 2, "expected 2 columns"),
        ("", None, "file is empty"),
        ("\n\n", 1, "file is empty"),
        ("sentence\tother\ngood\t1\n", 1, "no 'label' column"),
        ("sentence\tlabel\ngood\t\n", 2, "missing label"),
    ],
)
def test_bad_tsv_reports_path_and_line(tmp_path, content, line, message):
    path = write(tmp_path / "bad.tsv", content)
    with pytest.raises(KilnError, match=message) as err:
        task().read(path)
    expected = f"{path}:{line}:" if line else f"{path}:"
    assert str(err.value).startswith(expected)


def test_invalid_utf8_reports_line(tmp_path):
    path = write(tmp_path / "bad.tsv", b"sentence\tlabel\ngood\t1\nbad \xff\xfe\t0\n", "wb")
    with pytest.raises(KilnError, match="invalid UTF-8") as err:
        task().read(path)
    assert str(err.value).startswith(f"{path}:3:")


def test_invalid_json_reports_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label}\n')
    with pytest.raises(KilnError, match="invalid JSON") as err:
        task().read(path)
    assert str(err.value).startswith(f"{path}:2:")


def test_unseen_evaluation_label_is_an_error(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tlabel\na\tx\nb\ty\n")
    dev = write(tmp_path / "dev.tsv", "text\tlabel\na\tx\nb\tz\n")
    t = task()
    t.fit(t.read(train))
    with pytest.raises(KilnError, match="label 'z' never appears") as err:
        t.check(t.read(dev))
    assert str(err.value).startswith(f"{dev}:3:")


def test_unknown_column_name_and_role(tmp_path):
    path = write(tmp_path / "a.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.raises(KilnError, match="no column named 'txt'"):
        task(columns="text=txt").read(path)
    with pytest.raises(KilnError, match="unknown role 'sentence3'"):
        task(columns="sentence3=0").read(path)


def test_parse_columns():
    assert parse_columns("text=3, label=1") == {"text": 3, "label": 1}
    assert parse_columns("sentence1=#1 String") == {"sentence1": "#1 String"}


def test_label_kinds():
    t = task()
    t.fit(type("D", (), {"examples": [{"label": v} for v in ["10", "2", "2", "1"]], "path": "x"})())
    assert t.state == {"problem_type": "classification", "labels": ["1", "2", "10"]}
    t = task()
    t.fit(type("D", (), {"examples": [{"label": v} for v in ["0.0", "3.8", "5.000"]], "path": "x"})())
    assert t.state["problem_type"] == "regression"
    t = task(problem_type="regression")
    t.fit(type("D", (), {"examples": [{"label": v} for v in ["0", "3", "5"]], "path": "x"})())
    assert t.regression


def test_holdout_is_deterministic_and_disjoint():
    items = list(range(100))
    train, validation = holdout(items, 0.1, seed=5)
    assert len(validation) == 10 and not set(train) & set(validation)
    assert holdout(items, 0.1, seed=5) == (train, validation)
    assert holdout(items, 0.1, seed=6) != (train, validation)


def test_find_splits(tmp_path):
    for name in ("train.tsv", "dev.tsv", "test.tsv", "README.md"):
        (tmp_path / name).write_text("x\n")
    splits = find_splits(tmp_path, (".tsv",))
    assert {k: v.name for k, v in splits.items()} == {"train": "train.tsv", "validation": "dev.tsv",
                                                       "test": "test.tsv"}
    with pytest.raises(KilnError, match="no such file"):
        find_splits(tmp_path / "nothing", (".tsv",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KilnError, match="no train file"):
        find_splits(tmp_path / "empty", (".tsv",))


def test_write_table_keeps_format(tmp_path, capsys):
    path = write(tmp_path / "a.jsonl", '{"text": "a", "id": 7}\n')
    table = read_table(path)
    write_table(table, {"label": ["x"], "score": [0.5]})
    assert json.loads(capsys.readouterr().out) == {"text": "a", "id": 7, "label": "x", "score": 0.5}
    path = write(tmp_path / "a.tsv", "text\nhello\n")
    write_table(read_table(path, lambda cells: cells == ["text"]), {"prediction": ["pos"]})
    assert capsys.readouterr().out == "text\tprediction\nhello\tpos\n"
