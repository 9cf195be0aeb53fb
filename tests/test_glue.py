"""The GLUE files in ../shared/data load exactly as shipped (with at most a --columns flag)."""

import json

import pytest
from conftest import SHARED_DATA

import kiln
from kiln.cli import main
from kiln.config import Config
from kiln.tasks import get_task

GLUE = SHARED_DATA / "glue"
pytestmark = pytest.mark.data

MRPC_COLUMNS = "sentence1=#1 String,sentence2=#2 String,label=Quality"


def read(task, path, columns=""):
    return get_task(task, Config().with_settings({"data.columns": columns})).read(path)


@pytest.mark.parametrize(("task", "folder", "columns", "train_n", "dev_n"), [
    ("sequence", "SST-2", "", 67349, 872),
    ("sequence", "CoLA", "text=3,label=1", 8551, 1043),
    ("sentence-pair", "MRPC", MRPC_COLUMNS, 3668, 408),
    ("sentence-pair", "RTE", "", 2490, 277),
    ("sentence-pair", "STS-B", "", 5749, 1500),
])
def test_glue_files_load_as_shipped(task, folder, columns, train_n, dev_n):
    train = read(task, GLUE / folder / "train.tsv", columns)
    dev = read(task, GLUE / folder / "dev.tsv", columns)
    assert (len(train), len(dev)) == (train_n, dev_n)
    t = get_task(task, Config().with_settings({"data.columns": columns}))
    t.fit(train)
    t.check(dev)
    expected = {"STS-B": "regression"}.get(folder, "classification")
    assert t.state["problem_type"] == expected
    if folder == "RTE":
        assert t.labels == ["entailment", "not_entailment"]
    if folder == "MRPC":  # BOM stripped, label-first header mapped, quotes kept verbatim
        assert t.labels == ["0", "1"]
        assert any('"' in ex["texts"][0] for ex in train.examples)


def test_sst2_test_split_reads_unlabelled():
    data = get_task("sequence", Config()).read(GLUE / "SST-2" / "test.tsv", labelled=False)
    assert data.table.header == ["index", "sentence"] and data.examples[0]["label"] is None


@pytest.mark.parametrize(("task", "folder", "columns", "metric"), [
    ("sentence-pair", "MRPC", MRPC_COLUMNS, "f1"),
    ("sentence-pair", "STS-B", "", "pearson"),
])
def test_glue_trains_and_evaluates(task, folder, columns, metric, tiny_profile, tmp_path, capsys):
    run = kiln.train(task, GLUE / folder, name=folder, profile=str(tiny_profile), max_steps=6,
                     columns=columns or None, output_dir=tmp_path, precision="fp32")  # as evaluate's default
    assert metric in run.metrics
    assert main(["evaluate", str(run.path), str(GLUE / folder / "dev.tsv"), "--json", "--precision", "fp32"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metric in metrics
    # Six steps leave near-constant predictions, whose correlation is float noise; the loss is not.
    assert metrics["loss"] == pytest.approx(run.metrics["loss"], rel=1e-5)
    assert metrics["n"] == {"MRPC": 408, "STS-B": 1500}[folder]
