"""``kiln suite``: one start on every task of a suite, a table and a JSON of the scores, resumable."""

import json
import random
import shutil

import pytest
from conftest import SUBJECTS, sentiment_rows
from test_trainer import StopAt

import kiln
import kiln.run
import kiln.suite
from kiln.cli import main
from kiln.errors import KilnError
from kiln.suite import load_suite, run_suite


@pytest.fixture
def glue_dir(tmp_path):
    """Tiny RTE-like (header, string labels) and CoLA-like (no header, four columns) folders."""
    rng = random.Random(0)
    root = tmp_path / "glue"
    for split, n in (("train", 80), ("dev", 20)):
        (root / "RTE").mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            a, b = rng.choice(SUBJECTS), rng.choice(SUBJECTS)
            rows.append(f"{i}\t{a} is here .\t{b} is here .\t{'entailment' if a == b else 'not_entailment'}")
        (root / "RTE" / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
        (root / "CoLA").mkdir(exist_ok=True)
        cola = [f"src\t{1 if label == 'pos' else 0}\t\t{text}" for text, label in sentiment_rows(n, seed=n)]
        (root / "CoLA" / f"{split}.tsv").write_text("\n".join(cola) + "\n")
    (root / "CoLA" / "test.tsv").write_text("index\tsentence\n0\tthe film is dull .\n")  # GLUE's test layout
    return root


def suite_args(glue_dir, tiny_profile, out, *extra):
    return ["suite", "glue", str(glue_dir), "--profile", str(tiny_profile), "--tasks", "rte,cola", "--recipe",
            "fast", "--output-dir", str(out), "-c", "train.epochs=1", *extra]


def test_suite_trains_each_task_prints_the_table_and_writes_json(glue_dir, tiny_profile, tmp_path, capsys,
                                                                monkeypatch, caplog):
    out = tmp_path / "suite"
    assert main(suite_args(glue_dir, tiny_profile, out)) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [cell.strip() for cell in printed[0].split("|")[1:-1]] == ["CoLA", "RTE", "Avg"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"rte", "cola"} and results["start"]["recipe"] == "fast"
    for name, metric in (("rte", "accuracy"), ("cola", "mcc")):
        entry = results["tasks"][name]
        assert entry["score"] == pytest.approx(100 * entry["metrics"][metric]) and entry["seconds"] > 0
        assert json.loads((out / name / "run.json").read_text())["config"]["train"]["metric"] == metric
    scores = [results["tasks"][n]["score"] for n in ("cola", "rte")]
    assert results["average"] == pytest.approx(sum(scores) / 2)
    assert f"{results['average']:.1f}" in printed[2] and (out / "results.md").read_text().startswith(printed[0])
    # The fast recipe's settings reached the runs (and -c overrides them).
    config = json.loads((out / "rte" / "run.json").read_text())["config"]
    assert config["optim"]["lr"] == 3e-5 and config["train"]["batch_size"] == 16
    assert config["train"]["epochs"] == 1

    # Done tasks are not trained again.
    real_train = kiln.run.train  # what kiln suite calls
    monkeypatch.setattr(kiln.run, "train", lambda *a, **k: pytest.fail("a finished task was trained again"))
    assert main(suite_args(glue_dir, tiny_profile, out)) == 0
    # ...unless the run is gone: then its score would describe nothing there, so it is trained again.
    shutil.rmtree(out / "rte")
    trained = []
    monkeypatch.setattr(kiln.run, "train", lambda *a, **k: trained.append(k["name"]) or real_train(*a, **k))
    assert main(suite_args(glue_dir, tiny_profile, out)) == 0
    assert trained == ["rte"] and (out / "rte" / "model" / "config.json").is_file()
    assert "its run" in caplog.text and "is gone; training it again" in caplog.text


def test_the_fast_recipe_gives_large_sets_token_batches_on_top_of_the_common_settings():
    suite = load_suite("glue")
    small, large = suite.settings("fast", suite.tasks["rte"]), suite.settings("fast", suite.tasks["sst2"])
    assert small["optim.lr"] == 3e-5 and small["train.batch_size"] == 16 and small["train.epochs"] == 5
    assert large["optim.lr"] == 5e-5 and large["train.batch_size"] == 0 and large["train.batch_tokens"] == 1024
    assert large["train.epochs"] == 1 and large["schedule.warmup_ratio"] == small["schedule.warmup_ratio"] == 0.06


def test_a_stopped_task_resumes_and_another_start_is_refused(glue_dir, tiny_profile, tmp_path, monkeypatch):
    out = tmp_path / "suite"
    suite = load_suite("glue")
    real_train, calls = kiln.run.train, []

    def stopping(*args, **kwargs):  # the first task is interrupted after one step, as by Ctrl-C
        return real_train(*args, callbacks=[StopAt(1)], **kwargs)

    def spy(*args, **kwargs):
        calls.append(kwargs.get("resume", False))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(kiln.run, "train", stopping)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, glue_dir, out, tasks="rte", profile=str(tiny_profile), recipe="fast")
    # Another recipe may not take over the stopped run, even before any task finished.
    with pytest.raises(KilnError, match="another start, recipe or data"):
        run_suite(suite, glue_dir, out, tasks="rte", profile=str(tiny_profile), recipe="sane")
    monkeypatch.setattr(kiln.run, "train", spy)
    run_suite(suite, glue_dir, out, tasks="rte", profile=str(tiny_profile), recipe="fast")
    assert calls == [True]


def test_a_run_the_suite_did_not_start_is_neither_adopted_nor_replaced(glue_dir, tiny_profile, tmp_path):
    out = tmp_path / "runs"
    mine = kiln.train("sentence-pair", glue_dir / "RTE", name="rte", profile=str(tiny_profile), max_steps=1,
                      output_dir=out)
    before = (mine.path / "run.json").read_text()
    with pytest.raises(KilnError, match="holds a run this suite did not start"):
        run_suite(load_suite("glue"), glue_dir, out, tasks="rte", profile=str(tiny_profile), recipe="fast")
    assert (mine.path / "run.json").read_text() == before


@pytest.mark.parametrize(("extra", "message"), [
    (["--tasks", "rte,nope"], "suite 'glue' has no task 'nope'"),
    (["--tasks", "sst2"], "no SST-2 folder for suite task 'sst2'"),
    (["--recipe", "slow"], "suite 'glue' has no recipe 'slow'"),
])
def test_bad_suite_requests_are_one_line(glue_dir, tiny_profile, tmp_path, capsys, extra, message):
    args = suite_args(glue_dir, tiny_profile, tmp_path / "s")
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        args[args.index(flag) + 1] = value
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s" / "rte").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("tasks: {a: [unclosed\n", "invalid YAML"),
    ("tasks: {a: {folder: A, task: nope, metric: accuracy, report: [accuracy]}}\n", "task 'a' needs a kiln task"),
    ("tasks: {a: {folder: A, task: sequence, metric: accuracy, report: [accuracy]}}\nrecipes: {r: [1]}\n",
     "recipe 'r' must map"),
])
def test_a_bad_suite_file_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    assert main(["suite", str(path), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1


def test_shipped_suites_load():
    for name in kiln.suite.available():
        suite = load_suite(name)
        for task in suite.tasks.values():
            for recipe in suite.recipes:
                assert suite.settings(recipe, task)


def test_tune_searches_each_small_task_and_trains_it_with_the_best(glue_dir, tiny_profile, tmp_path):
    pytest.importorskip("optuna")
    out = tmp_path / "suite"
    args = ["suite", "glue", str(glue_dir), "--profile", str(tiny_profile), "--tasks", "rte", "--recipe", "fast",
            "--output-dir", str(out), "-c", "train.max_steps=4", "--tune", "2"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    tuned = results["tasks"]["rte"]["tuned"]
    assert set(tuned) == {"optim.lr", "train.epochs", "train.batch_size", "schedule.warmup_ratio"}
    assert len(list((out / "rte-search").glob("trial-*"))) == 2
    for trial in (out / "rte-search").glob("trial-*"):  # each trained with its own draw, not the recipe's
        drawn = json.loads((trial / "tune.json").read_text())["params"]
        trained = json.loads((trial / "run.json").read_text())["config"]
        assert trained["optim"]["lr"] == pytest.approx(drawn["optim.lr"])
        assert trained["train"]["batch_size"] == drawn["train.batch_size"]
        assert trained["schedule"]["warmup_ratio"] == pytest.approx(drawn["schedule.warmup_ratio"])
    config = json.loads((out / "rte" / "run.json").read_text())["config"]
    assert config["optim"]["lr"] == pytest.approx(tuned["optim.lr"]) and config["train"]["metric"] == "accuracy"
    assert config["train"]["batch_size"] == tuned["train.batch_size"] and config["train"]["max_steps"] == 4
