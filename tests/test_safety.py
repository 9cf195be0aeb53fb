"""kiln deletes only its own runs, and a damaged file is one line naming it (exit 2), never a traceback."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest

import kiln
from kiln.cli import build_parser, join_dash_values, main
from kiln.errors import KilnError
from kiln.model_files import verify_safetensors


def one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    """The captured stderr, asserted to be one line (no traceback, no usage block) holding ``needles``."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "usage:" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One tiny sequence run: ``(run_dir, data_dir, profile)``; tests copy it before damaging it."""
    from conftest import TINY_PROFILE, sentiment_rows

    base = tmp_path_factory.mktemp("safety")
    profile = base / "tiny.yaml"
    profile.write_text(TINY_PROFILE)
    data = base / "data"
    data.mkdir()
    for name, rows in (("train.tsv", sentiment_rows(160, 1)), ("dev.tsv", sentiment_rows(40, 2))):
        (data / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_CACHE", str(base / "cache"))
        code = main(["train", "sequence", str(data), "-n", "run", "--profile", str(profile),
                     "--output-dir", str(base / "runs"), "--epochs", "1", "-c", "train.keep_checkpoints=true"])
    assert code == 0
    return base / "runs" / "run", data, profile


@pytest.fixture
def run_copy(trained: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    """A private copy of the trained run, free to damage."""
    copy = tmp_path / "runs" / "run"
    shutil.copytree(trained[0], copy)
    return copy


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


# -- run names and --overwrite -------------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's working directory holding their own file and another kiln run under ``runs/``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("years of work")
    other = tmp_path / "runs" / "other"
    other.mkdir(parents=True)
    (other / "run.json").write_text("{}")
    return tmp_path


def survivors_intact(workdir: Path) -> None:
    assert (workdir / "thesis.tex").read_text() == "years of work"
    assert (workdir / "runs" / "other" / "run.json").is_file()


@pytest.mark.parametrize("name", ["..", ".", "other/..", "a/b", "a\\b", "../runs", "x\0y"])
def test_run_name_must_be_a_plain_name(name, workdir, sentiment_dir, tiny_profile, capsys):
    code = main(["train", "sequence", str(sentiment_dir), "-n", name, "--profile", str(tiny_profile),
                 "--overwrite"])  # the default --output-dir runs: `-n ..` would be the cwd
    assert code == 2
    one_line_error(capsys, "plain directory name")
    survivors_intact(workdir)
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["other"]  # nothing written


def test_run_name_may_not_be_absolute(workdir, sentiment_dir, tiny_profile, tmp_path_factory, capsys):
    victim = tmp_path_factory.mktemp("victim")
    (victim / "data.csv").write_text("precious")
    code = main(["train", "sequence", str(sentiment_dir), "-n", str(victim), "--profile", str(tiny_profile),
                 "--overwrite"])
    assert code == 2
    one_line_error(capsys, "plain directory name")
    assert (victim / "data.csv").read_text() == "precious"


def test_api_checks_the_name_too(workdir, sentiment_dir, tiny_profile):
    with pytest.raises(KilnError, match="plain directory name"):
        kiln.train("sequence", sentiment_dir, name="..", profile=str(tiny_profile), overwrite=True)
    survivors_intact(workdir)


def test_overwrite_refuses_a_directory_that_is_not_a_run(workdir, sentiment_dir, tiny_profile, capsys):
    notes = workdir / "runs" / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    code = main(["train", "sequence", str(sentiment_dir), "-n", "notes", "--profile", str(tiny_profile),
                 "--overwrite"])
    assert code == 2
    one_line_error(capsys, "not a kiln run", "will not delete")
    assert (notes / "todo.txt").read_text() == "keep me"
    # Without --overwrite, the hint does not suggest it either.
    assert main(["train", "sequence", str(sentiment_dir), "-n", "notes", "--profile", str(tiny_profile)]) == 2
    assert "--overwrite" not in one_line_error(capsys, "not a kiln run")


def test_overwrite_refuses_a_symlinked_run_dir(workdir, sentiment_dir, tiny_profile, tmp_path_factory, capsys):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "run.json").write_text("{}")  # even a kiln run: it lies outside --output-dir
    (elsewhere / "results.txt").write_text("keep")
    (workdir / "runs" / "link").symlink_to(elsewhere, target_is_directory=True)
    code = main(["train", "sequence", str(sentiment_dir), "-n", "link", "--profile", str(tiny_profile),
                 "--overwrite"])
    assert code == 2
    one_line_error(capsys, "symbolic link", "will not delete")
    assert (elsewhere / "results.txt").read_text() == "keep"


def test_empty_dir_is_reused_and_overwrite_replaces_a_run(workdir, sentiment_dir, tiny_profile, capsys):
    run = workdir / "runs" / "fresh"
    run.mkdir()  # e.g. made by a job script: empty, so not in the way
    args = ["train", "sequence", str(sentiment_dir), "-n", "fresh", "--profile", str(tiny_profile),
            "--epochs", "1"]
    assert main(args) == 0
    assert (run / "run.json").is_file() and (run / "model" / "model.safetensors").is_file()
    (run / "stale.txt").write_text("from the old run")
    capsys.readouterr()  # the training's own report
    assert main(args) == 2  # a run is there: --resume or --overwrite
    one_line_error(capsys, "--overwrite")
    assert main([*args, "--overwrite"]) == 0
    assert not (run / "stale.txt").exists() and (run / "model" / "model.safetensors").is_file()
    survivors_intact(workdir)


# -- damaged files -------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", [truncate, empty])
@pytest.mark.parametrize("command", ["predict", "evaluate", "init"])
def test_damaged_weights_are_one_line(command, damage, trained, run_copy, tmp_path, capsys):
    data = trained[1]
    damage(run_copy / "model" / "model.safetensors")
    argv = {"predict": ["predict", str(run_copy), str(data / "dev.tsv")],
            "evaluate": ["evaluate", str(run_copy), str(data / "dev.tsv")],
            "init": ["train", "sequence", str(data), "-n", "again", "--init", str(run_copy),
                     "--output-dir", str(tmp_path / "out"), "--epochs", "1"]}[command]
    assert main(argv) == 2
    one_line_error(capsys, str(run_copy / "model" / "model.safetensors"))
    assert not (tmp_path / "out").exists()  # --init: nothing written


@pytest.mark.parametrize("name, damage, needle", [
    ("config.json", truncate, "not valid JSON"),
    ("config.json", lambda p: p.write_text("[]"), "expected a JSON object"),
    ("tokenizer.json", empty, "empty file"),
    ("tokenizer.json", truncate, "not valid JSON"),
    ("tokenizer_config.json", truncate, "not valid JSON"),
    ("kiln.json", truncate, "not valid JSON"),
    ("kiln.json", lambda p: p.write_text("{}"), "missing 'task'"),
    ("model.safetensors", lambda p: p.write_bytes(b"not a model" * 10), "not a safetensors file"),
])
def test_damaged_model_files_are_one_line(name, damage, needle, trained, run_copy, capsys):
    damage(run_copy / "model" / name)
    assert main(["predict", str(run_copy), str(trained[1] / "dev.tsv")]) == 2
    one_line_error(capsys, str(run_copy / "model" / name), needle)


@pytest.mark.parametrize("name, damage", [
    ("checkpoints/STEP/trainer_state.json", truncate),
    ("checkpoints/STEP/trainer_state.json", empty),
    ("checkpoints/STEP/trainer_state.json", lambda p: p.write_text('{"step": 3}')),  # no optimizer entry
    ("checkpoints/STEP/optimizer.safetensors", truncate),
    ("checkpoints/STEP/model.safetensors", empty),
    ("checkpoints/best/model.safetensors", truncate),
    ("run.json", truncate),
])
def test_damaged_resume_files_are_one_line(name, damage, run_copy, capsys):
    step = max(p.name for p in (run_copy / "checkpoints").glob("step-*"))  # the only resumable checkpoint
    name = name.replace("STEP", step)
    damage(run_copy / name)
    before = sorted(str(p) for p in run_copy.rglob("*"))
    code = main(["train", "sequence", "unused", "-n", "run", "--output-dir", str(run_copy.parent), "--resume"])
    assert code == 2
    one_line_error(capsys, str(run_copy / name))
    assert sorted(str(p) for p in run_copy.rglob("*")) == before


def test_sharded_weights_are_checked(trained, run_copy, capsys):
    from transformers import AutoModelForSequenceClassification

    model_dir = run_copy / "model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()
    model.save_pretrained(model_dir, max_shard_size="40KB")
    shards = sorted(model_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and (model_dir / "model.safetensors.index.json").is_file()
    dev = str(trained[1] / "dev.tsv")
    assert main(["evaluate", str(run_copy), dev, "--json"]) == 0
    capsys.readouterr()
    truncate(shards[-1])
    assert main(["evaluate", str(run_copy), dev]) == 2
    one_line_error(capsys, str(shards[-1]), "truncated")
    shards[-1].unlink()
    assert main(["evaluate", str(run_copy), dev]) == 2
    one_line_error(capsys, str(shards[-1]), "shard missing")


def test_verify_safetensors_checks_header_and_length(tmp_path):
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(3)}, str(good))
    verify_safetensors(good)
    raw = good.read_bytes()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]

    def header(text: bytes) -> bytes:
        return struct.pack("<Q", len(text)) + text

    cases = {
        "empty file": b"",
        "too short": raw[:5],
        "header alone needs": raw[: header_end - 3],
        "describes": raw[:-1],  # the header is intact: only the length shows the damage
        "unexpected bytes": raw + b"\0\0",
        "no valid header": b"\xff" * 64,
        "header is not JSON": struct.pack("<Q", 4) + b"abcd",
        "data_offsets": header(json.dumps({"a": {"dtype": "F32", "shape": [1]}}).encode()),
        "not a valid safetensors file": header(json.dumps(  # consistent length, impossible shape
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()) + b"\0" * 4,
    }
    for needle, data in cases.items():
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(data)
        with pytest.raises(KilnError, match=needle) as info:
            verify_safetensors(bad)
        assert info.value.path == str(bad)


# -- rough edges ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--budget", "-5m"], "train.budget"),
    (["--lr", "-1"], "optim.lr"),
    (["--lr", "-1e-3"], "optim.lr"),  # not a plain negative number: argparse took it for an option
])
def test_values_starting_with_a_dash(flags, needle, sentiment_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", "sequence", str(sentiment_dir), "-n", "x", "--output-dir", str(out), *flags])
    assert code == 2
    one_line_error(capsys, needle)
    assert not out.exists()


def test_join_dash_values_leaves_options_alone():
    parser = build_parser()
    assert join_dash_values(parser, ["train", "t", "d", "--budget", "--lr", "-1", "--", "-n", "-x"]) == [
        "train", "t", "d", "--budget", "--lr=-1", "--", "-n", "-x"]
    assert join_dash_values(parser, ["train", "t", "d", "--budget", "--epo", "3", "-n", "-r"]) == [
        "train", "t", "d", "--budget", "--epo", "3", "-n=-r"]  # --epo abbreviates --epochs


def test_setting_in_the_wrong_section_suggests_the_right_one(sentiment_dir, tmp_path, capsys):
    code = main(["train", "sequence", str(sentiment_dir), "-n", "x", "--output-dir", str(tmp_path),
                 "-c", "train.lr=abc"])
    assert code == 2
    err = one_line_error(capsys, "did you mean optim.lr")
    assert "train.metric" not in err


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_unwritable_output_fails_before_loading(command, trained, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before -o was checked")

    monkeypatch.setattr(kiln, "load", no_loading)
    data = str(trained[1] / "dev.tsv")
    (tmp_path / "file.txt").write_text("a file")
    assert main([command, str(trained[0]), data, "-o", str(tmp_path / "file.txt" / "sub" / "out.tsv")]) == 2
    one_line_error(capsys, "file.txt is a file, not a directory")
    assert main([command, str(trained[0]), data, "-o", str(tmp_path)]) == 2
    one_line_error(capsys, "is a directory")


# -- a file the user names for output never replaces an input or a run's file ---------------------

def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, needle", [
    (["predict", "{run}", "{data}/dev.tsv", "-o", "{data}/dev.tsv"], "input"),
    (["predict", "{run}", "{data}/dev.tsv", "--json", "-o", "{data}/./dev.tsv"], "input"),
    (["predict", "{run}", "{data}/dev.tsv", "-o", "{tmp}/link.tsv"], "input"),  # a symlink to dev.tsv
    (["predict", "{run}", "{data}/dev.tsv", "-o", "{tmp}/hard.tsv"], "input"),  # a hard link to dev.tsv
    (["evaluate", "{run}", "{data}/dev.tsv", "-o", "{data}/dev.tsv"], "input"),
    (["predict", "{run}", "{data}/dev.tsv", "-o", "{run}/model/config.json"], "input"),
    (["predict", "{tmp}/model", "{data}/dev.tsv", "-o", "{tmp}/model/notes.tsv"], "model directory"),
    (["evaluate", "{tmp}/model", "{data}/dev.tsv", "-o", "{run}/predictions.tsv"], "run directory"),
    (["describe", "sequence", "{data}/train.tsv", "-o", "{data}/train.tsv"], "input"),
    (["describe", "sequence", "{data}", "-o", "{data}/train.tsv"], "input"),
    (["describe", "sequence", "{data}", "-o", "{run}/model/page.html"], "model directory"),
    (["report", "{run}", "-o", "{run}/run.json"], "input"),
    (["report", "{tmp}/model", "-o", "{run}/report.html"], "run directory"),
    (["report", "{run}", "--png", "{run}"], "input"),
    (["report", "{run}", "--png", "{run}/plots"], "run directory"),
])
def test_output_never_replaces_an_input_or_a_runs_file(argv, needle, run_copy, trained, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(trained[1], data)
    shutil.copytree(run_copy / "model", tmp_path / "model")
    (tmp_path / "link.tsv").symlink_to(data / "dev.tsv")
    (tmp_path / "hard.tsv").hardlink_to(data / "dev.tsv")
    before = tree(tmp_path)
    fill = {"run": str(run_copy), "data": str(data), "tmp": str(tmp_path)}
    assert main([arg.format(**fill) for arg in argv]) == 2
    one_line_error(capsys, needle, "choose")
    assert tree(tmp_path) == before


def test_an_output_beside_inputs_is_written(trained, tmp_path, capsys):
    project = tmp_path / "project"  # a folder with a config.json of its own is not a model directory
    project.mkdir()
    (project / "config.json").write_text("{}")
    out = project / "predictions.tsv"
    assert main(["predict", str(trained[0]), str(trained[1] / "dev.tsv"), "-o", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 41
    page = tmp_path / "new" / "plots"
    assert main(["report", str(trained[0]), "--png", str(page)]) == 0
    assert any(page.glob("*.png"))


# -- one line, not a usage block or a traceback ----------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["train", "sequence"], "kiln train: error: the following arguments are required: DATA; see 'kiln train --help'"),
    (["train", "sequence", "x", "-n", "a", "--bogus"], "unrecognized arguments: --bogus; see 'kiln train --help'"),
    (["trian"], "invalid choice: 'trian'"),
    (["predict"], "see 'kiln predict --help'"),
])
def test_argument_errors_are_one_line_pointing_at_help(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    one_line_error(capsys, needle)


@pytest.mark.parametrize("value", ["1.5", "-5", "10x", "1h5"])
def test_save_every_is_steps_or_a_duration_with_its_unit(value, trained, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", "sequence", str(trained[1]), "-n", "x", "--profile", str(trained[2]),
                 "--output-dir", str(runs), f"--save-every={value}"]) == 2
    one_line_error(capsys, f"not '{value}'", "whole number of steps", "10m")
    assert not runs.exists()


def test_predict_with_stdin_closed_is_one_line(trained, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", None)  # what Python gives a process started with `<&-`
    assert main(["predict", str(trained[0])]) == 2
    one_line_error(capsys, "no input", "give DATA")


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_generate_on_a_model_that_does_not_generate_is_refused(command, trained, tmp_path, capsys):
    out = tmp_path / "out.tsv"
    assert main([command, str(trained[0]), str(trained[1] / "dev.tsv"), "--generate", "num_beams=2",
                 "-o", str(out)]) == 2
    one_line_error(capsys, "--generate", "this sequence model does not generate")
    assert not out.exists()


# -- --resume: damaged records, foreign checkpoints, and what a resume may change ---------------

def resume(run_copy: Path, data: Path | str, *flags: str) -> int:
    return main(["train", "sequence", str(data), "-n", "run", "--output-dir", str(run_copy.parent), "--resume",
                 *flags])


@pytest.mark.parametrize("damage, needle", [
    (lambda lines: lines.insert(1, b'{"step": 1, "loss": 0.5, "note": "caf\xe9"}'), "not UTF-8"),
    (lambda lines: lines.insert(1, b'{"step": "abc", "loss": 0.5}'), "'step' is 'abc'"),
    (lambda lines: lines.insert(1, b'{"step": null, "loss": 0.5}'), "'step' is None"),
    (lambda lines: lines.insert(1, b'{"step": 1, "loss'), "not a JSON record"),
])
def test_damaged_metrics_records_are_one_line_on_resume(damage, needle, trained, run_copy, capsys):
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines()
    damage(lines)
    metrics.write_bytes(b"\n".join(lines) + b"\n")
    before = tree(run_copy)
    assert resume(run_copy, trained[1]) == 2
    one_line_error(capsys, f"{metrics}:2: {needle}")
    assert tree(run_copy) == before


@pytest.mark.parametrize("entry, value", [("step", "abc"), ("step", -5), ("step", True), ("epoch", None),
                                          ("world_size", 0), ("window", []), ("train_seconds", "1s")])
def test_trainer_state_entries_are_checked(entry, value, tmp_path):
    from kiln.training.trainer import TrainerState

    good = {"step": 7, "epoch": 1, "best_metric": None, "last_eval_step": -1, "train_seconds": 2.5}
    assert TrainerState.from_saved(good, tmp_path).step == 7
    with pytest.raises(KilnError, match=re.escape(f"'{entry}' is {value!r}")):
        TrainerState.from_saved({**good, entry: value}, tmp_path / "trainer_state.json")


def test_a_checkpoint_of_another_run_is_skipped_and_named(trained, run_copy, tmp_path, capsys, caplog):
    other = tmp_path / "other"
    assert main(["train", "sequence", str(trained[1]), "-n", "run", "--profile", str(trained[2]), "--output-dir",
                 str(other), "--max-steps", "2", "--lr", "1e-2", "-c", "train.keep_checkpoints=true", "-q"]) == 0
    own = max((run_copy / "checkpoints").glob("step-*"))
    foreign = run_copy / "checkpoints" / "step-99999999"
    shutil.copytree(max((other / "run" / "checkpoints").glob("step-*")), foreign)
    assert resume(run_copy, trained[1]) == 0
    warned = caplog.text
    assert f"{foreign} was saved by another run (optim.lr" in warned and f"using {own} instead" in warned
    shutil.rmtree(own)  # now no checkpoint of this run is left: one line naming the foreign one
    capsys.readouterr()
    assert resume(run_copy, trained[1]) == 2
    one_line_error(capsys, str(foreign), "was saved by another run")


def test_resume_refuses_settings_and_data_that_make_another_run(trained, run_copy, tmp_path, capsys):
    before = tree(run_copy)
    assert resume(run_copy, trained[1], "--lr", "0.5") == 2
    one_line_error(capsys, "optim.lr", "-> 0.5", "start a new run")
    assert resume(run_copy, trained[1], "-c", "model.config.hidden_size=48") == 2
    one_line_error(capsys, "model.config.hidden_size")
    assert resume(run_copy, trained[1] / "train.tsv") == 2
    one_line_error(capsys, "the command gives data", "the run's is")
    edited = tmp_path / "edited"
    shutil.copytree(trained[1], edited)
    meta = json.loads((run_copy / "run.json").read_text())
    meta["data"] = str(edited)  # the run's own data directory, whose training file then changes
    meta["data_files"] = {k.replace(str(trained[1].resolve()), str(edited)): v for k, v in meta["data_files"].items()}
    (run_copy / "run.json").write_text(json.dumps(meta))
    with open(edited / "train.tsv", "a") as out:
        out.write("one more review .\tpos\n")
    before = tree(run_copy)
    assert resume(run_copy, edited) == 2
    one_line_error(capsys, str(edited / "train.tsv"), "the data changed since the run started")
    assert tree(run_copy) == before


def test_resume_may_extend_a_run_and_says_so(trained, run_copy, tmp_path, monkeypatch, caplog):
    meta = json.loads((run_copy / "run.json").read_text())
    assert Path(meta["data"]).is_absolute()  # a resume from another directory reads the same data
    steps = int(max((run_copy / "checkpoints").glob("step-*")).name.removeprefix("step-"))
    monkeypatch.chdir(tmp_path)
    assert resume(run_copy, trained[1], "--max-steps", str(steps + 3), "--lr", str(meta["config"]["optim"]["lr"])) == 0
    assert f"resuming with train.max_steps 0 -> {steps + 3}" in caplog.text
    assert json.loads((run_copy / "run.json").read_text())["config"]["train"]["max_steps"] == steps + 3
    assert (run_copy / "checkpoints" / f"step-{steps + 3:08d}").is_dir()


# -- several processes fail as one does ---------------------------------------------------------

def kiln_train(*args: str, nproc: int | None = None) -> tuple[int, str]:
    import os
    import subprocess
    import sys

    launch = ["--nproc", str(nproc)] if nproc else []
    done = subprocess.run([sys.executable, "-m", "kiln", "train", *args, *launch], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return done.returncode, done.stderr.strip()


def test_a_workers_user_error_is_the_one_line_of_one_process(trained, tmp_path):
    ragged = tmp_path / "ragged"
    ragged.mkdir()
    rows = "".join(f"a fine film {i} .\tpos\n" for i in range(20))
    (ragged / "train.tsv").write_text("sentence\tlabel\n" + rows + "a bad\tfilm\tneg\n")
    common = ["sequence", str(ragged), "-n", "r", "--profile", str(trained[2]), "--output-dir", str(tmp_path / "runs")]
    alone = kiln_train(*common)
    assert alone[0] == 2 and alone[1] == f"{ragged / 'train.tsv'}:22: expected 2 columns like the header, found 3"
    assert kiln_train(*common, nproc=2) == alone
    missing = ["sequence", str(trained[1]), "-n", "nothere", "--output-dir", str(tmp_path / "runs"), "--resume"]
    alone = kiln_train(*missing)
    assert alone[0] == 2 and "nothing to resume" in alone[1] and "\n" not in alone[1]
    assert kiln_train(*missing, nproc=2) == alone
    assert not (tmp_path / "runs").exists()


def test_more_processes_than_the_machine_has_are_refused(trained, tmp_path, capsys):
    assert main(["train", "sequence", str(trained[1]), "-n", "r", "--output-dir", str(tmp_path), "--nproc", "999"]) == 2
    one_line_error(capsys, "--nproc 999: this machine has", "use --nproc")
    assert not any(tmp_path.iterdir())


# -- --init: a start without a pad token, an architecture transformers does not know ---------------

def gpt2_start(folder: Path) -> Path:
    """A tiny GPT-2-shaped checkpoint whose tokenizer has no pad token, as GPT-2's has none."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["the", "a", "film", "movie", "plot", "cast", "scene", "is", "was", "great", "good", "fine", "superb",
             "bad", "dull", "awful", "boring", "."]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="[UNK]")
    config = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_start_without_a_pad_token_pads_with_eos(trained, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    start = gpt2_start(tmp_path / "gpt2")
    before = tree(start)
    assert main(["train", "sequence", str(trained[1]), "-n", "g", "--init", str(start), "--output-dir",
                 str(tmp_path / "runs"), "--max-steps", "3", "--precision", "fp32", "-q"]) == 0
    assert tree(start) == before
    model_dir = tmp_path / "runs" / "g" / "model"
    texts = ["the film is great .", "a dull and boring plot", "the cast is superb ."]
    ours = kiln.load(model_dir, precision="fp32").predict(texts)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.pad_token == "<|endoftext|>" and model.config.pad_token_id == tokenizer.pad_token_id == 0
    with torch.no_grad():  # texts of different lengths: the padded batch must give each its own answer
        probs = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    for row, mine in zip(probs, ours, strict=True):
        assert model.config.id2label[int(row.argmax())] == mine["label"]
        assert float(row.max()) == pytest.approx(mine["score"], abs=1e-5)


def test_an_unknown_architecture_is_one_line(trained, tmp_path, capsys):
    start = gpt2_start(tmp_path / "odd")
    config = json.loads((start / "config.json").read_text())
    (start / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    assert main(["train", "sequence", str(trained[1]), "-n", "o", "--init", str(start), "--output-dir",
                 str(tmp_path / "runs")]) == 2
    one_line_error(capsys, str(start / "config.json"), "'frobnicator' is not an architecture transformers knows")
    assert not (tmp_path / "runs").exists()
