"""kiln describe: statistics per task on small synthetic files, findings instead of crashes, the
streaming corpus path, and the self-contained HTML page."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from kiln.cli import main
from kiln.data.corpus import iter_documents
from kiln.describe import (
    LENGTH_LIMITS,
    Findings,
    Fingerprints,
    Lengths,
    SplitStats,
    TokenCounter,
    TopTokens,
    corpus_documents,
    describe,
    describe_documents,
    digest,
    normalise,
)
from kiln.errors import KilnError


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def split(description, name: str) -> SplitStats:
    return next(s for s in description.splits if s.name == name)


def findings(description) -> list[str]:
    return [f"{f.where}: {f.message}" if f.where else f.message for f in description.findings.listed()]


def no_external_urls(page: str) -> None:
    """Nothing on the page is fetched from anywhere: no http(s) in any src or href, no URL at all."""
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?\s*https?:""", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page


# -- sequence ----------------------------------------------------------------------------------
@pytest.fixture
def reviews(tmp_path: Path) -> Path:
    folder = tmp_path / "reviews"
    long_text = " ".join(["word"] * 300)  # 300 whitespace tokens: over 128 and 256, not 512
    write(folder / "train.tsv", ["sentence\tlabel",
                                 "The film is great .\tpos",
                                 "The film is great .\tpos",  # exact duplicate of line 2
                                 "the film is GREAT!\tpos",  # normalised duplicate of line 2
                                 "a dull plot\tneg",
                                 f"{long_text}\tpos",
                                 "warm and funny\tpos",
                                 "charming cast\tpos"])
    write(folder / "dev.tsv", ["sentence\tlabel",
                               "The film is great .\tpos",  # leaks from train, exactly
                               "A dull plot!\tneg",  # leaks from train once normalised
                               "new words here\tneg"])
    write(folder / "test.tsv", ["index\tsentence", "0\tcharming cast", "1\tsomething else"])  # unlabelled (GLUE)
    return folder


def test_sequence_counts_labels_lengths_and_leakage(reviews: Path) -> None:
    description = describe("sequence", reviews)
    train, dev, test = (split(description, name) for name in ("train", "validation", "test"))
    assert (train.examples, dev.examples, test.examples) == (7, 3, 2)
    assert train.labels == {"pos": 6, "neg": 1} and dev.labels == {"pos": 1, "neg": 2}
    assert not test.labelled and not test.labels
    assert train.exact.duplicates == 1 and train.normal.duplicates == 2
    assert train.tokens.above == {128: 1, 256: 1, 512: 0} and train.tokens.high == 300
    assert train.chars.high == len(" ".join(["word"] * 300))
    exact, normal = dev.overlaps["train"]
    assert (exact.count, normal.count) == (1, 2)
    exact, normal = test.overlaps["train"]
    assert (exact.count, normal.count) == (1, 1)
    assert findings(description) == []

    tables = {t.title: t for s in description.sections() for t in s.tables}
    labels = tables["Label distribution"]
    assert labels.rows[0][:2] == ["pos", "6 (85.7%)"] and "train 6.00" in labels.note
    shares = tables["Longer than the limit (whitespace tokens): truncated or windowed in training"]
    assert shares.rows[0] == ["train", "14.3% (1)", "14.3% (1)", "0.0% (0)"]
    leakage = tables["Across splits (leakage)"]
    assert leakage.rows[0][:3] == ["validation in train", "1 (33.3%)", "2 (66.7%)"]


def test_bad_rows_are_findings_and_the_rest_is_described(tmp_path: Path) -> None:
    data = write(tmp_path / "bad" / "train.tsv", ["sentence\tlabel", "good one\tpos", "too\tmany\tcolumns",
                                                  "fine again\tneg", "", "no label here\t ", "last\tneg",
                                                  "   \tpos"])
    description = describe("sequence", data)
    train = split(description, "train")
    assert train.examples == 3 and train.labels == {"pos": 1, "neg": 2}
    found = findings(description)
    assert f"{data}:3: expected 2 columns like the header, found 3" in found
    assert f"{data}:6: missing label" in found
    # The rows training skips (an empty text) are reported as training reports them.
    assert f"{data}: skipped 1 row with an empty text (first at line 8)" in found
    assert not any("kiln-describe-" in f for f in found)  # the temporary copy's name never shows


def test_unseen_validation_labels_are_findings(tmp_path: Path) -> None:
    folder = tmp_path / "labels"
    write(folder / "train.tsv", ["sentence\tlabel", "a\tx", "b\ty", "c\tx"])
    write(folder / "dev.tsv", ["sentence\tlabel", "d\tx", "e\tz", "f\tw"])
    found = findings(describe("sequence", folder))
    assert any(f.startswith(f"{folder / 'dev.tsv'}:3: label 'z' never appears") for f in found)
    assert any(f.startswith(f"{folder / 'dev.tsv'}:4: label 'w' never appears") for f in found)


def test_regression_labels_are_summarised_not_counted(tmp_path: Path) -> None:
    data = write(tmp_path / "scores" / "train.tsv", ["sentence\tscore", "a\t0.5", "b\t1.5", "c\t4.0"])
    sections = describe("sequence", data).sections()
    tables = {t.title: t for s in sections for t in s.tables}
    assert tables["Label scores"].rows[0][1] == 0.5 and tables["Label scores"].rows[0][-1] == 4.0
    assert "Label distribution" not in tables


def test_regression_scores_skip_a_label_that_is_not_a_number(tmp_path: Path) -> None:
    folder = tmp_path / "scores"
    write(folder / "train.tsv", ["sentence\tscore", "a\t0.5", "b\tn/a", "c\t4.0"])
    write(folder / "dev.tsv", ["sentence\tscore", "d\t2.0"])
    description = describe("sequence", folder, overrides=["data.problem_type=regression"])
    assert any("n/a" in f for f in findings(description))  # training would stop there: a finding
    tables = {t.title: t for s in description.sections() for t in s.tables}
    assert tables["Label scores"].rows[0][1] == 0.5 and tables["Label scores"].rows[0][-1] == 4.0


def test_pairs_count_both_texts(tmp_path: Path) -> None:
    data = write(tmp_path / "pairs" / "train.jsonl", [
        json.dumps({"sentence1": "a b c", "sentence2": "d e", "label": "yes"}),
        json.dumps({"sentence1": "a b c", "sentence2": "d e", "label": "yes"}),
        json.dumps({"sentence1": "a b c", "sentence2": "x", "label": "no"})])
    train = split(describe("sentence-pair", data), "train")
    assert train.tokens.high == 5 and train.tokens.low == 4
    assert train.exact.duplicates == 1  # the pair, not one of its texts


# -- token -------------------------------------------------------------------------------------
def conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    lines = ["-DOCSTART- -X- -X- O", ""]
    for sentence in sentences:
        lines += [f"{word} NN O {tag}" for word, tag in sentence] + [""]
    return write(path, lines)


def test_token_entities_and_scheme_problems_with_their_lines(tmp_path: Path) -> None:
    folder = tmp_path / "ner"
    good = [("Alice", "B-PER"), ("met", "O"), ("Bob", "B-PER"), ("Smith", "I-PER"), ("in", "O"),
            ("Paris", "B-LOC")]
    train = conll(folder / "train.txt", [good, good, [("Acme", "B-ORG"), ("rose", "O")],
                                         [("in", "O"), ("Berlin", "I-LOC"), ("today", "O")],  # I- without B-
                                         [("odd", "PER"), ("tag", "O")]])  # neither O nor B-/I-
    valid = conll(folder / "valid.txt", [[("Alice", "B-PER"), ("saw", "O"), ("Zed", "B-MISC")]])
    description = describe("token", folder)
    train_stats, valid_stats = split(description, "train"), split(description, "validation")
    assert train_stats.examples == 5 and train_stats.extra["words"] == 19
    assert train_stats.extra["entities"] == {"PER": 5, "LOC": 3, "ORG": 1}
    assert valid_stats.extra["entities"] == {"PER": 1, "MISC": 1}
    found = findings(description)
    # train.txt: DOCSTART, blank, 6 + blank, 6 + blank, 2 + blank, 3 + blank: "Berlin" is line 21, "odd" 24
    assert f"{train}:21: 'I-LOC' after 'O': a chunk that does not start with B-LOC" in found
    assert f"{train}:24: tag 'PER' is neither O nor B-/I-/E-/S-TYPE" in found
    assert f"{valid}:5: tag 'B-MISC' never appears in the training data" in found
    tables = {t.title for s in description.sections() for t in s.tables}
    assert {"Tag distribution", "Entity type distribution"} <= tables


def test_iob1_data_is_not_flagged(tmp_path: Path) -> None:
    # IOB1: chunks start with I-; B- only separates two adjacent chunks of one type.
    sentence = [("Alice", "I-PER"), ("Bob", "B-PER"), ("in", "O"), ("Paris", "I-LOC")]
    description = describe("token", conll(tmp_path / "iob1" / "train.txt", [sentence] * 3))
    assert not any("chunk that does not start" in f for f in findings(description))
    assert any("iob1" in note for note in description.notes)


# -- qa ----------------------------------------------------------------------------------------
def test_qa_answer_positions_window_and_unanswerable(tmp_path: Path) -> None:
    rows = []
    for i in range(4):
        filler = " ".join(["pad"] * (10 * i))  # the answer starts at word 10 * i + 3
        context = f"{filler} Anna lives in Rome . More text follows here ."
        rows.append({"id": str(i), "context": context.strip(), "question": "Where does Anna live ?",
                     "answers": {"text": ["Rome"], "answer_start": [context.strip().index("Rome")]}})
    rows.append({"id": "x", "context": "No answer in here .", "question": "Who ?",
                 "answers": {"text": [], "answer_start": []}})
    data = write(tmp_path / "qa" / "train.jsonl", [json.dumps(r) for r in rows])
    # window 30: question (5 words) + words up to the answer's end (10i + 4) beyond 30 for i = 3 only
    description = describe("qa", data, overrides=["data.window=30"])
    train = split(description, "train")
    assert train.extra["unanswerable"] == 1 and train.extra["answered"] == 4
    assert train.extra["starts"].low == 3 and train.extra["starts"].high == 33
    assert train.extra["beyond"] == 1
    answers = next(t for s in description.sections() for t in s.tables if t.title.startswith("Answer start"))
    assert answers.rows[0][-1] == "25.0% (1)"


# -- generation --------------------------------------------------------------------------------
def test_generation_lengths_ratio_and_empty_targets(tmp_path: Path) -> None:
    data = write(tmp_path / "gen" / "train.tsv", ["source\ttarget", "a b c d\tx y", "one two\tthree four",
                                                  "keep this\t  ", "more text here\tsome", "last one\t"])
    description = describe("generation", data)
    train = split(description, "train")
    assert train.examples == 3  # the two empty targets are skipped, as in training
    assert train.extra["empty"] == 2
    ratios = train.extra["ratios"]
    assert ratios.low == pytest.approx(1 / 3) and ratios.high == pytest.approx(1.0)
    found = findings(description)
    assert f"{data}:4: empty target (training skips this row)" in found
    assert f"{data}:6: empty target (training skips this row)" in found


# -- corpora -----------------------------------------------------------------------------------
def test_corpus_documents_tokens_top_tokens_and_leakage(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    write(folder / "train.txt", ["the cat sat", "", "the dog sat on the mat", "the cat sat"])
    write(folder / "valid.txt", ["The cat sat!", "a new line"])
    description = describe("mlm", folder)
    train, valid = split(description, "train"), split(description, "validation")
    assert (train.examples, train.extra["tokens"], train.chars.total) == (3, 12, 44)
    assert train.extra["top"].counts.most_common(2) == [("the", 4), ("sat", 3)]
    assert train.exact.duplicates == 1
    exact, normal = valid.overlaps["train"]
    assert (exact.count, normal.count) == (0, 1)
    overview = next(t for s in description.sections() for t in s.tables if t.title == "Documents per split")
    assert overview.rows[0][2:] == [3, 44, 12, 12 / 44]


def test_corpus_bad_lines_are_findings(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "train.txt").write_bytes(b"good line\n\xff\xfe bad bytes\nanother good line\n")
    write(folder / "extra.jsonl", [json.dumps({"text": "a json doc"}), "{not json", json.dumps({"body": "x"})])
    description = describe("clm", folder)
    assert split(description, "train").examples == 3
    found = findings(description)
    assert any(f.startswith(f"{folder / 'train.txt'}:2: not UTF-8 text") for f in found)
    assert any(f.startswith(f"{folder / 'extra.jsonl'}:2: invalid JSON") for f in found)
    assert f"{folder / 'extra.jsonl'}:3: expected a JSON object with a 'text' field; skipped" in found


@pytest.mark.parametrize("paragraphs", [False, True])
def test_corpus_reader_yields_what_training_reads(tmp_path: Path, paragraphs: bool) -> None:
    text = write(tmp_path / "a.txt", ["first doc", "", "  second  ", "third", "", "", "fourth\rfifth"])
    jsonl = write(tmp_path / "b.jsonl", [json.dumps({"text": "json one"}), "", json.dumps({"text": " "}),
                                         json.dumps({"text": "json two"})])
    files = [text, jsonl]
    ours = list(corpus_documents(files, paragraphs, Findings()))
    assert ours == list(iter_documents(files, paragraphs))


def test_corpus_statistics_stream_in_bounded_memory() -> None:
    """A stream of documents (as read from a large file) through the summaries with small caps: the
    peak memory stays well under what holding the documents would take, sampling by hash starts,
    and the duplicate estimate stays close to the truth."""
    documents = 20_000
    filler = " lorem ipsum dolor" * 10

    def stream():  # every 4th document repeats an earlier one: 5,000 duplicates
        for index in range(documents):
            yield f"document number {index // 4 * 4 if index % 4 == 3 else index}{filler}"

    words = len(next(stream()).split())
    stats = SplitStats("train", "stream", chars=Lengths(reservoir=500), tokens=Lengths(LENGTH_LIMITS, 500))
    stats.exact, stats.normal = Fingerprints(cap=512), Fingerprints(cap=512)
    stats.extra["top"] = TopTokens(cap=512)
    tracemalloc.start()
    describe_documents(stats, stream(), TokenCounter())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert stats.examples == documents and stats.extra["tokens"] == words * documents
    assert stats.exact.level > 0 and len(stats.exact.counts) <= 512  # sampled, bounded
    assert len(stats.tokens.sample) == 500
    assert stats.exact.duplicates == pytest.approx(5_000, rel=0.3)
    held = documents * 200  # the documents' characters alone, were they kept
    assert peak < held / 3, f"peak {peak / 2**20:.2f} MiB"


def test_fingerprints_and_normalise() -> None:
    assert normalise("  The  FILM -- is great!!") == "the film is great"
    prints = Fingerprints()
    for text in ("a", "b", "a", "a"):
        prints.add(digest(text), text)
    assert prints.duplicates == 2 and prints.contains(digest("b")) and not prints.contains(digest("c"))


# -- the command and the page --------------------------------------------------------------------
def test_cli_writes_a_self_contained_page(reviews: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    page = tmp_path / "describe.html"
    assert main(["describe", "sequence", str(reviews), "-o", str(page)]) == 0
    out = capsys.readouterr().out
    assert "Label distribution" in out and "validation in train" in out and f"wrote {page}" in out
    html = page.read_text()
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 2  # lengths per split, labels
    assert all(len(image) > 1000 for image in images)
    no_external_urls(html)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["describe", "sequence", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or directory" in err
    data = write(tmp_path / "d" / "train.tsv", ["sentence\tlabel", "a\tb"])
    assert main(["describe", "sequence", str(data), "-o", str(tmp_path / "nowhere" / "x.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    empty = write(tmp_path / "e" / "train.tsv", [""])
    assert main(["describe", "sequence", str(empty)]) == 2
    assert "file is empty" in capsys.readouterr().err


def test_a_tokenizer_counts_its_own_tokens(reviews: Path, tmp_path: Path) -> None:
    from kiln.config import TokenizerConfig
    from kiln.tokenizers import train_tokenizer

    tokenizer, _ = train_tokenizer(TokenizerConfig(vocab_size=120), ["the film is great", "a dull plot"] * 20, 64)
    tokenizer.save_pretrained(tmp_path / "tok")
    description = describe("sequence", reviews, tokenizer=tmp_path / "tok")
    train = split(description, "train")
    plain = split(describe("sequence", reviews), "train")
    assert train.tokens.low > plain.tokens.low  # special tokens, and words split into pieces
    assert description.counter == f"tokens of {tmp_path / 'tok'}"


# -- real data -----------------------------------------------------------------------------------
@pytest.mark.data
@pytest.mark.slow
def test_sst2_reports_train_dev_duplicates(tmp_path: Path) -> None:
    page = tmp_path / "sst2.html"
    assert main(["describe", "sequence", str(SHARED_DATA / "glue" / "SST-2"), "-o", str(page)]) == 0
    html = page.read_text()
    assert "validation in train" in html and html.count("data:image/png;base64,") >= 2
    no_external_urls(html)


def test_a_problem_with_the_whole_file_is_reported_once(tmp_path: Path) -> None:
    # Four columns and no header: no row can be read until --columns says which column is which.
    rows = [f"src{i}\t{i % 2}\t*\tsentence number {i}" for i in range(10)]
    data = write(tmp_path / "cola" / "train.tsv", rows)
    with pytest.raises(KilnError, match="cannot tell which of the 4 columns") as caught:
        describe("sequence", data)
    assert caught.value.path == str(data) and caught.value.line == 1
    described = describe("sequence", data, columns="text=3,label=1")
    assert split(described, "train").labels == {"0": 5, "1": 5} and findings(described) == []


def test_a_long_text_is_worked_through_in_pieces_with_the_same_results(monkeypatch) -> None:
    import kiln.describe.reading as module

    text = "The film -- it is GREAT!!  a\tplot\n" * 40 + "end"
    assert "".join(module.pieces(text, 50)) == text
    assert all(piece[-1].isspace() for piece in list(module.pieces(text, 50))[:-1])  # no word cut
    assert list(module.pieces("x" * 120, 50)) == ["x" * 50, "x" * 50, "x" * 20]  # no whitespace: cut anyway
    whole = (module.words(text), digest(text), module.normal_digest(text))
    assert whole == (len(text.split()), digest(text), digest(normalise(text)))
    monkeypatch.setattr(module, "LONG_TEXT", 64)  # now the text is long: the same numbers, a piece at a time
    assert (module.words(text), digest(text), module.normal_digest(text)) == whole
    assert TokenCounter().count([(text,)]) == [len(text.split())]
    assert [sum(map(len, parts)) for parts in TokenCounter().tokens([text, "a b"])] == [len(text.split()), 2]


def test_describing_one_huge_line_takes_memory_near_its_size(tmp_path, monkeypatch) -> None:
    import kiln.describe.reading as module

    monkeypatch.setattr(module, "LONG_TEXT", 1 << 16)  # pieces small beside the line, as for a 200 MB one
    line = " ".join(f"word{i % 977}" for i in range(400_000))  # 3.2 MB, 400,000 words on one line
    path = tmp_path / "train.tsv"
    path.write_text(f"sentence\tlabel\n{line}\tpos\nshort one\tneg\n")
    tracemalloc.start()
    description = describe("sequence", path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sorted(split(description, "train").tokens.sample) == [2, 400_000]
    # Its words as a list would be ~50 bytes each (20 MB, 6x the line); reading the file holds the
    # line about three times over (bytes, text, row), and describing it adds pieces, not copies.
    assert peak < 4 * len(line), f"peak {peak / 2**20:.1f} MiB for a {len(line) / 2**20:.1f} MiB line"
