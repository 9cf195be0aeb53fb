"""The table reader (CSV records, streaming, binary input, line endings) and what tasks make of
its rows: label kinds, unseen-label lines, and skipping rows with nothing to learn from."""

import io
import logging
import random
import types

import pytest

from kiln.config import Config, resolve_key
from kiln.data import skip_empty
from kiln.data.tables import SNIFF_BYTES, decoded_lines, read_table, write_table
from kiln.errors import KilnError, MissingLabels
from kiln.tasks import get_task
from kiln.tasks.base import Dataset


def task(name="sequence", **data):
    return get_task(name, Config().with_settings({resolve_key(k): v for k, v in data.items()}))


@pytest.fixture
def kiln_warnings(caplog):
    """``caplog`` for the ``kiln`` logger, which keeps its records from the root logger."""
    logger = logging.getLogger("kiln")
    logger.addHandler(caplog.handler)
    yield lambda: list({id(r): r.getMessage() for r in caplog.records
                        if r.name.startswith("kiln") and r.levelno == logging.WARNING}.values())
    logger.removeHandler(caplog.handler)


class CountingBytes(io.BytesIO):
    """A byte stream that remembers how much was read from it."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size=-1):
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


# -- CSV ---------------------------------------------------------------------------------------
MULTILINE_CSV = ('text,label\n'
                 '"a review\nover two lines",pos\n'
                 '"she said ""fine"", then left",neg\n'
                 '"one, two",pos\n')


def test_csv_quoted_newline_doubled_quotes_and_delimiter(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text(MULTILINE_CSV)
    data = task().read(path)
    assert [ex["texts"][0] for ex in data.examples] == ["a review\nover two lines", 'she said "fine", then left',
                                                         "one, two"]
    assert [ex["label"] for ex in data.examples] == ["pos", "neg", "pos"]
    assert [ex["line"] for ex in data.examples] == [2, 4, 5]  # the line where each record starts


def test_csv_error_after_a_multiline_record_names_its_start_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('text,label\n"two\nlines",pos\n"three\nmore\nlines",neg,extra\n')
    with pytest.raises(KilnError, match="expected 2 columns like the header, found 3") as err:
        read_table(path, lambda cells: "text" in cells)
    assert str(err.value).startswith(f"{path}:4:")


def test_csv_unclosed_quote_names_the_record(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('text,label\ngood,pos\n"never closed,neg\nbad,neg\n')
    with pytest.raises(KilnError, match="never closed") as err:
        read_table(path)
    assert str(err.value).startswith(f"{path}:3:")


def test_csv_blank_lines_between_records_are_skipped_and_long_fields_read(tmp_path):
    path = tmp_path / "a.csv"
    long_text = "word " * 40_000  # over the csv module's default 128 KiB field limit
    path.write_text(f'text,label\n\n"{long_text}",pos\n   \nshort,neg\n')
    table = read_table(path, lambda cells: "text" in cells)
    assert table.lines == [3, 5] and table.rows[0][0] == long_text


def test_csv_written_by_write_table_reads_back_identically(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text(MULTILINE_CSV)
    table = read_table(path, lambda cells: "text" in cells)
    out = io.StringIO()
    write_table(table, {"prediction": ['say "hi",\nthen go', "plain", "x"]}, out)
    again = tmp_path / "b.csv"
    again.write_text(out.getvalue())
    back = read_table(again, lambda cells: "text" in cells)
    assert back.header == [*table.header, "prediction"]
    assert back.rows == [[*row, added] for row, added in zip(table.rows, ['say "hi",\nthen go', "plain", "x"],
                                                             strict=True)]
    assert back.lines == [2, 5, 6]  # the written prediction spans two lines too


def test_tsv_stays_tab_only(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text('text\tlabel\n"quoted, with comma\tpos\nsay ""x""\tneg\n')
    assert read_table(path, lambda cells: "text" in cells).rows == [['"quoted, with comma', "pos"],
                                                                    ['say ""x""', "neg"]]


# -- streaming, binary input, line endings -----------------------------------------------------
def test_nul_bytes_are_refused_as_binary_after_the_first_read(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"\x00" * (4 << 20))
    with pytest.raises(KilnError, match=r"binary file \(NUL bytes at byte 0\); expected UTF-8 text") as err:
        task().read(path)
    assert str(err.value).startswith(f"{path}: ")
    stream = types.SimpleNamespace(buffer=CountingBytes(b"text\tlabel\n" + b"\x00" * (4 << 20)))
    with pytest.raises(KilnError, match="NUL bytes at byte 11"):
        decoded_lines("<stdin>", stream)  # type: ignore[arg-type]
    assert stream.buffer.bytes_read <= SNIFF_BYTES  # refused before the rest was read


def test_a_nul_byte_further_in_is_a_line_error(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_bytes(b"text\tlabel\n" + b"fine\tpos\n" * 2000 + b"bro\x00ken\tneg\n")
    with pytest.raises(KilnError, match="NUL byte at byte 3 of the line") as err:
        read_table(path)
    assert str(err.value).startswith(f"{path}:2002:")


def test_utf16_is_refused_with_its_name(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_bytes("text\tlabel\n".encode("utf-16"))
    with pytest.raises(KilnError, match="UTF-16"):
        read_table(path)


def test_an_overlong_line_is_refused_without_buffering_it(monkeypatch):
    import kiln.data.tables as tables

    monkeypatch.setattr(tables, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(tables, "SNIFF_BYTES", 100)
    monkeypatch.setattr(tables, "BLOCK_BYTES", 100)
    stream = types.SimpleNamespace(buffer=CountingBytes(b"short\n" + b"x" * 100_000))
    with pytest.raises(KilnError, match="line longer than") as err:
        decoded_lines("big.txt", stream)  # type: ignore[arg-type]
    assert str(err.value).startswith("big.txt:2:") and stream.buffer.bytes_read < 2000


def test_line_endings_lone_cr_crlf_and_lf(tmp_path):
    path = tmp_path / "mac.tsv"
    path.write_bytes(b"\xef\xbb\xbftext\tlabel\rgood\tpos\r\nbad\tneg\r\rfine\tpos\n")
    table = read_table(path, lambda cells: "text" in cells)
    assert table.header == ["text", "label"]
    assert table.rows == [["good", "pos"], ["bad", "neg"], ["fine", "pos"]]
    assert table.lines == [2, 3, 5]
    csv_path = tmp_path / "mac.csv"
    csv_path.write_bytes(b'text,label\r"two\rlines",pos\rnext,neg\r')
    table = read_table(csv_path, lambda cells: "text" in cells)
    assert table.rows == [["two\nlines", "pos"], ["next", "neg"]] and table.lines == [2, 4]


def test_line_splitting_does_not_depend_on_block_boundaries(monkeypatch):
    import kiln.data.tables as tables

    rng = random.Random(0)
    data = "".join(rng.choice(["a", "é", "\r", "\n", "\r\n", " "]) for _ in range(3000)).encode()
    expected = [(n, text) for n, text in enumerate(data.decode().replace("\r\n", "\n").replace("\r", "\n")
                                                   .split("\n"), 1)]
    if expected[-1][1] == "":
        expected.pop()
    for block in (1, 2, 3, 7, 64):
        monkeypatch.setattr(tables, "SNIFF_BYTES", block)
        monkeypatch.setattr(tables, "BLOCK_BYTES", block)
        stream = types.SimpleNamespace(buffer=io.BytesIO(data))  # "é" and "\r\n" get cut by blocks
        assert decoded_lines("x", stream) == expected  # type: ignore[arg-type]


def test_text_streams_and_stdin_buffers_read_alike():
    text = "\ufefftext\tlabel\rgood\tpos\r\nbad\tneg\n"
    from_text = read_table("<stdin>", lambda cells: "text" in cells, stream=io.StringIO(text), fmt="tsv")
    stdin = io.TextIOWrapper(io.BytesIO(text.encode()), encoding="utf-8")
    from_bytes = read_table("<stdin>", lambda cells: "text" in cells, stream=stdin, fmt="tsv")
    assert from_text.rows == from_bytes.rows == [["good", "pos"], ["bad", "neg"]]
    assert from_text.lines == from_bytes.lines == [2, 3]


# -- labels ------------------------------------------------------------------------------------
def scores_file(tmp_path, bad_at: int | None, n: int = 40, name: str = "train.tsv"):
    """A regression file of ``n`` fractional scores, one replaced by 'abc' (row ``bad_at``)."""
    rows = [f"text number {i}\t{(i % 50) / 10}" if i != bad_at else f"text number {i}\tabc" for i in range(n)]
    path = tmp_path / name
    path.write_text("sentence\tscore\n" + "\n".join(rows) + "\n")
    return path


def test_a_non_numeric_score_is_an_error_wherever_the_row_falls(tmp_path):
    for bad_at in (0, 17, 39):  # whichever side of a hold-out it would land on
        with pytest.raises(KilnError, match=r"label 'abc' is not a number, but the other labels are "
                                            r"\(regression\)") as err:
            task().read(scores_file(tmp_path, bad_at))
        assert str(err.value).startswith(f"{tmp_path / 'train.tsv'}:{bad_at + 2}:")
    with pytest.raises(KilnError, match="'abc' is not a number") as err:  # a validation file of its own
        task().read(scores_file(tmp_path, 5, name="dev.tsv"))
    assert str(err.value).startswith(f"{tmp_path / 'dev.tsv'}:7:")


def test_a_non_numeric_score_in_the_train_part_or_after_training(tmp_path):
    t = task()
    clean = t.read(scores_file(tmp_path, None))
    mixed = Dataset(clean.path, [*clean.examples[:3], {"texts": ("x",), "label": "abc", "line": 99}])
    with pytest.raises(KilnError, match="'abc' is not a number") as err:
        t.fit(mixed)  # a train part built without read() is checked as well
    assert str(err.value).startswith(f"{clean.path}:99:")
    t.fit(clean)
    assert t.regression
    dev = t.read(scores_file(tmp_path, 3, name="dev.tsv"))  # the problem type is fixed by now
    with pytest.raises(KilnError, match="but the training labels are") as err:
        t.check(dev)
    assert str(err.value).startswith(f"{tmp_path / 'dev.tsv'}:5:")


def test_mostly_integer_labels_with_a_stray_value(tmp_path):
    path = tmp_path / "stars.tsv"
    path.write_text("text\tlabel\n" + "".join(f"t{i}\t{i % 5}\n" for i in range(10)) + "t\tn/a\n")
    with pytest.raises(KilnError, match=r"'n/a' is not a number, but 10 of the 11 labels are integer") as err:
        task().read(path)
    assert str(err.value).startswith(f"{path}:12:")
    data = task(problem_type="classification").read(path)  # a deliberate mix is allowed
    t = task(problem_type="classification")
    t.fit(data)
    assert t.labels == sorted({str(i) for i in range(5)} | {"n/a"})
    t = task()  # a hold-out part is not judged by its own majority (the file's was checked)
    t.fit(Dataset("x", [{"label": v, "line": n} for n, v in enumerate(["1", "2", "1", "name"], 1)]))
    assert t.labels == ["1", "2", "name"]


def test_string_and_integer_classes_are_unaffected(tmp_path):
    path = tmp_path / "rte.tsv"
    path.write_text("sentence1\tsentence2\tlabel\n" + "a\tb\tentailment\nc\td\tnot_entailment\n" * 3
                    + "e\tf\t0\n")  # names in the majority: a digit can be a class name
    t = task("sentence-pair")
    t.fit(t.read(path))
    assert not t.regression and t.labels == ["0", "entailment", "not_entailment"]
    path.write_text("text\tlabel\n" + "".join(f"t{i}\t{i % 3}\n" for i in range(9)))
    t = task()
    t.fit(t.read(path))
    assert t.labels == ["0", "1", "2"]


def test_unseen_labels_name_their_own_line(tmp_path):
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_text("text,label\na,x\nb,y\n")
    dev.write_text('text,label\n"a\nlong one",x\nb,z\n')
    t = task()
    t.fit(t.read(train))
    with pytest.raises(KilnError, match="label 'z' never appears") as err:
        t.check(t.read(dev))
    assert str(err.value).startswith(f"{dev}:4:")


def test_unseen_conll_tag_names_the_words_line(tmp_path):
    train, dev = tmp_path / "train.conll", tmp_path / "dev.conll"
    train.write_text("EU B-ORG\nrejects O\n\nPeter B-PER\n")
    dev.write_text("-DOCSTART- O\n\nEU B-ORG\nrejects O\nGerman B-MISC\ncall O\n")
    t = task("token")
    t.fit(t.read(train))
    with pytest.raises(KilnError, match="tag 'B-MISC' never appears") as err:
        t.check(t.read(dev))
    assert str(err.value).startswith(f"{dev}:5:")  # the word's line, not the sentence's first (3)


# -- rows with nothing to learn from -----------------------------------------------------------
def test_empty_texts_are_skipped_with_one_warning(tmp_path, kiln_warnings):
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\ngood\tpos\n \tneg\nbad\tneg\n\tpos\n")
    data = task().read(path)
    assert [ex["line"] for ex in data.examples] == [2, 4]
    assert data.table.lines == [2, 4] and len(data.table.rows) == 2  # evaluate --output stays aligned
    assert kiln_warnings() == [f"{path}: skipped 2 rows with an empty text (first at line 3)"]
    unlabelled = task().read(path, labelled=False)  # predict keeps every row
    assert len(unlabelled) == 4 and len(kiln_warnings()) == 1


def test_a_blank_sentence_of_a_pair_is_skipped(tmp_path, kiln_warnings):
    path = tmp_path / "train.tsv"
    path.write_text("sentence1\tsentence2\tlabel\na\tb\t1\nc\t \t0\ne\tf\t0\n")
    assert len(task("sentence-pair").read(path)) == 2
    assert kiln_warnings() == [f"{path}: skipped 1 row with an empty sentence2 (first at line 3)"]


def test_a_text_column_empty_everywhere_is_refused(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("id\ttext\tlabel\n1\t\tpos\n2\t \tneg\n")
    with pytest.raises(KilnError, match=r"no usable rows: all 2 have an empty text \(check the file and "
                                        r"--columns\)") as err:
        task().read(path)
    assert str(err.value).startswith(f"{path}:2:")


def test_generation_skips_empty_targets_and_sources(tmp_path, kiln_warnings):
    path = tmp_path / "train.tsv"
    path.write_text("source\ttarget\nhello\thallo\nyes\t \n \tleer\nno\tnein\n")
    t = task("generation")
    data = t.read(path)
    assert [ex["target"] for ex in data.examples] == ["hallo", "nein"] and data.table.lines == [2, 5]
    assert kiln_warnings() == [f"{path}: skipped 2 rows with an empty target or an empty source "
                               "(first at line 3)"]
    assert len(t.read(path, labelled=False)) == 4
    path.write_text("source\ttarget\nhello\t\nyes\t \n")
    with pytest.raises(KilnError, match="all 2 have an empty target") as err:
        t.read(path)
    assert str(err.value).startswith(f"{path}:2:")


def test_parallel_files_skip_empty_pairs(tmp_path, kiln_warnings):
    (tmp_path / "train.en").write_text("a cat\n\na dog\n")
    (tmp_path / "train.de").write_text("eine Katze\n\nein Hund\n")
    data = task("generation", pair="en-de").read(tmp_path / "train.en")
    assert [ex["line"] for ex in data.examples] == [1, 3]
    assert kiln_warnings() == [f"{tmp_path / 'train.en'}: skipped 1 row with an empty source (first at line 2)"]


def test_token_and_qa_skip_empty_inputs(tmp_path, kiln_warnings):
    path = tmp_path / "train.jsonl"
    path.write_text('{"tokens": ["EU"], "tags": ["B-ORG"]}\n{"tokens": [], "tags": []}\n')
    assert len(task("token").read(path)) == 1
    path = tmp_path / "qa.tsv"
    path.write_text("Anna lives in Paris.\tWhere?\t14\t19\nAnna lives in Paris.\t \t0\t0\n")
    assert len(task("qa").read(path)) == 1
    assert kiln_warnings() == [f"{tmp_path / 'train.jsonl'}: skipped 1 row with an empty token sequence "
                               "(first at line 2)",
                               f"{path}: skipped 1 row with an empty question (first at line 2)"]


def test_skip_empty_keeps_everything_when_nothing_is_empty(kiln_warnings):
    examples = [{"line": 1, "text": "a"}, {"line": 2, "text": "b"}]
    assert skip_empty("x", examples, lambda ex: None) == (examples, None)
    assert kiln_warnings() == []


def test_an_unlabelled_file_reads_with_the_runs_label_mapping(tmp_path):
    path = tmp_path / "test.tsv"  # MRPC's test.tsv: the training --columns name a label it lacks
    path.write_text("index\t#1 String\t#2 String\n0\tA b .\tA c .\n")
    t = task("sentence-pair", columns="sentence1=#1 String,sentence2=#2 String,label=Quality")
    data = t.read(path, labelled=False)
    assert data.table.header == ["index", "#1 String", "#2 String"]
    assert data.examples[0]["texts"] == ("A b .", "A c .") and data.examples[0]["label"] is None
    with pytest.raises(MissingLabels, match="label=Quality: this file has no such column"):
        t.read(path)  # labelled: an error, of the kind a test split is skipped for
