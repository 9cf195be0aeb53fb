"""kiln report: two tiny real runs overlaid, tables that agree with metrics.jsonl, the config diff,
--png, a run still in progress, and directories that are not runs."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from conftest import TINY_PROFILE, sentiment_rows

import kiln
from kiln.cli import main
from kiln.report import load_run, report, run_names


def train_runs(base: Path) -> tuple[Path, Path]:
    """Two tiny sequence runs that differ only in the learning rate (a few seconds each)."""
    data = base / "data"
    data.mkdir()
    for name, rows in (("train.tsv", sentiment_rows(160, 1)), ("dev.tsv", sentiment_rows(40, 2))):
        (data / name).write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    (base / "tiny.yaml").write_text(TINY_PROFILE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_CACHE", str(base / "kiln-cache"))
        return tuple(kiln.train("sequence", data, name=name, profile=str(base / "tiny.yaml"), epochs=2, lr=lr,
                                eval_every=5, output_dir=base / "runs").path
                     for name, lr in (("fast", 3e-3), ("slow", 1e-3)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_runs(tmp_path_factory.mktemp("report"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_page_and_pngs_overlay_every_curve_of_both_runs(runs: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    page, pngs = tmp_path / "report.html", tmp_path / "plots"
    assert main(["report", *map(str, runs), "-o", str(page), "--png", str(pngs)]) == 0
    out = capsys.readouterr().out
    assert "fast" in out and "slow" in out and "Configuration differences" in out

    result = report(runs)
    curves = [name for name, _ in result.curves()]
    assert {"loss", "lr", "tokens_per_s", "eval_accuracy", "eval_f1", "eval_mcc"} <= set(curves)
    assert "grad_norm" not in curves or any("grad_norm" in r for r in records(runs[0]))
    html = page.read_text()
    images = re.findall(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]+"', html)
    assert len(images) == len(curves)  # one plot per curve, the runs overlaid in it
    assert not re.search(r"""(?:src|href)\s*=\s*["']?https?:""", html) and "http://" not in html
    assert "https://" not in html
    assert sorted(p.name for p in pngs.iterdir()) == sorted(f"{name}.png" for name in curves)
    assert all((pngs / f"{name}.png").read_bytes().startswith(b"\x89PNG") for name in curves)
    for name, title in result.curves():
        by_step, by_time = result.figure(name, title).axes
        for axis in (by_step, by_time):
            labels = [text.get_text() for text in axis.get_legend().get_texts()]
            assert any(label.startswith("fast") for label in labels) and any(label.startswith("slow")
                                                                          for label in labels), (name, labels)
    loss_labels = [t.get_text() for t in result.figure("loss", "loss").axes[0].get_legend().get_texts()]
    assert {"fast train", "fast validation", "slow train", "slow validation"} == set(loss_labels)


def test_best_and_last_agree_with_metrics_jsonl(runs: tuple[Path, Path]) -> None:
    table = report(runs).metrics_table()
    for run in runs:
        evals = [r for r in records(run) if r.get("split") == "validation"]
        train = [r for r in records(run) if "loss" in r and "split" not in r]
        rows = {row[1]: row[2:] for row in table.rows if row[0] == run.name}
        for metric in ("accuracy", "f1", "macro_f1", "mcc", "loss"):
            values = [(r["step"], r[f"eval_{metric}"]) for r in evals]
            pick = min if metric == "loss" else max
            best = pick(values, key=lambda item: item[1])
            shown = rows["accuracy (main)" if metric == "accuracy" else metric]
            assert shown[:4] == [best[1], best[0], values[-1][1], values[-1][0]], metric
        assert rows["training loss"][2:4] == [train[-1]["loss"], train[-1]["step"]]


def test_config_diff_shows_only_the_differing_keys(runs: tuple[Path, Path]) -> None:
    diff, *configs = report(runs).config_tables()
    assert diff.title == "Configuration differences"
    assert diff.rows == [["optim.lr", "0.003", "0.001"]]
    assert [t.title for t in configs] == ["Configuration of fast", "Configuration of slow"]
    settings = dict(configs[0].rows)
    assert settings["task"] == "sequence" and settings["optim.lr"] == "0.003"


def test_parameters_come_from_the_safetensors_header(runs: tuple[Path, Path]) -> None:
    from kiln.card import parameter_count

    run = load_run(runs[0])
    assert run.parameters == parameter_count(runs[0] / "model") and run.parameters_from == "model"
    summary = report(runs[:1]).summary_table()
    assert summary.rows[0][3] == "finished" and summary.rows[0][9] == run.parameters


def test_a_run_in_progress_is_reported_as_it_stands(runs: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    live = tmp_path / "live"
    shutil.copytree(runs[0], live)
    shutil.rmtree(live / "model")
    text = (live / "metrics.jsonl").read_text()
    (live / "metrics.jsonl").write_text(text[:-25])  # the trainer is half-way through writing a line
    page = tmp_path / "live.html"
    assert main(["report", str(live), "-o", str(page)]) == 0
    assert "no model/ yet" in capsys.readouterr().out and page.is_file()
    run = load_run(live)
    kept = len(run.train) + len(run.evals) + len(run.tests)
    assert kept == len(records(runs[0])) - 1
    lines = text.count("\n")
    assert run.findings == [f"{live / 'metrics.jsonl'}:{lines}: last line incomplete (the run is writing it), "
                            "left out"]
    # Counted in the newest checkpoint instead: the same weights' shapes as the model's.
    assert not run.finished and run.parameters_from == "checkpoints/best"
    assert run.parameters == load_run(runs[0]).parameters


def test_directories_that_are_not_runs_are_one_line_errors(runs: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a kiln run (no run.json)" in err and "Traceback" not in err
    assert main(["report", str(runs[0] / "model")]) == 2
    assert "looks like a model directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")
    assert main(["report", str(tmp_path / "broken")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_eval_times_grad_norm_resumed_steps_and_bad_lines(tmp_path: Path) -> None:
    run = tmp_path / "synthetic"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"task": "sequence", "config": {"optim": {"lr": 0.1}}}))
    lines = [{"step": 10, "loss": 2.0, "lr": 0.1, "elapsed": 5.0, "grad_norm": 3.0},
             {"step": 5, "split": "validation", "eval_accuracy": 0.5, "eval_loss": 1.5},
             {"step": 20, "loss": 1.9, "lr": 0.1, "elapsed": 10.0, "grad_norm": 2.0},
             {"step": 20, "loss": 1.0, "lr": 0.1, "elapsed": 10.0, "grad_norm": 1.0},  # logged again after --resume
             {"step": 15, "split": "validation", "eval_accuracy": 0.7, "eval_loss": 1.2}]
    text = [json.dumps(line) for line in lines]
    text.insert(2, "garbage")
    (run / "metrics.jsonl").write_text("\n".join(text) + "\n")
    loaded = load_run(run)
    assert [r["loss"] for r in loaded.train] == [2.0, 1.0]
    assert loaded.elapsed_at([r["step"] for r in loaded.evals]) == [2.5, 7.5]
    assert loaded.findings == [f"{run / 'metrics.jsonl'}:3: not a JSON record, left out"]
    result = report([run])
    assert [name for name, _ in result.curves()] == ["loss", "lr", "grad_norm", "eval_accuracy"]
    rows = {row[1].removesuffix(" (main)"): row for row in result.metrics_table().rows}
    assert rows["accuracy"][2:6] == [0.7, 15, 0.7, 15] and rows["loss"][2:4] == [1.2, 15]


def test_nan_losses_damaged_records_and_a_bad_config_are_handled(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "diverged"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"task": "sequence", "config": {}}))
    lines = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 1.5},
             {"step": 4, "loss": float("nan")}, {"step": 5, "split": [], "loss": 0.1}]  # the last: not kiln's
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    row = next(r for r in report([run]).metrics_table().rows if r[1] == "training loss")
    assert row[2:4] == [1.5, 3] and math.isnan(row[4]) and row[5] == 4  # best among the finite ones
    only_nan = tmp_path / "only-nan"
    shutil.copytree(run, only_nan)
    (only_nan / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": float("nan")}) + "\n")
    assert not [r for r in report([only_nan]).metrics_table().rows if r[1] == "training loss"]
    (run / "run.json").write_text(json.dumps({"task": "sequence", "config": []}))
    assert main(["report", str(run)]) == 2
    assert capsys.readouterr().err == f"{run / 'run.json'}: 'config' must be an object\n"


def test_runs_with_the_same_name_are_told_apart() -> None:
    assert run_names([Path("/a/runs/x"), Path("/b/runs/x"), Path("/a/runs/y")]) == ["a/runs/x", "b/runs/x", "y"]
    assert run_names([Path("/runs/x"), Path("/a/runs/x")]) == ["/runs/x", "a/runs/x"]
    assert run_names([Path("/a/runs/x"), Path("/a/runs/x")]) == ["x", "x #2"]


def test_parameters_are_counted_from_headers_without_hashing_checkpoints(runs: tuple[Path, Path], tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.training import checkpoint

    live = tmp_path / "live"
    shutil.copytree(runs[0], live)
    shutil.rmtree(live / "model")
    shutil.rmtree(live / "checkpoints" / "best")
    monkeypatch.setattr(checkpoint, "verify_checkpoint", lambda path: pytest.fail("a checkpoint was hashed"))
    run = load_run(live)
    assert run.parameters == load_run(runs[0]).parameters and run.parameters_from.startswith("checkpoints/step-")


def test_describe_counts_tokens_with_a_runs_tokenizer(runs: tuple[Path, Path]) -> None:
    from kiln.describe import describe

    data = runs[0].parent.parent / "data"
    counted = describe("sequence", data, tokenizer=runs[0])
    assert counted.counter == f"tokens of {runs[0] / 'model'}"
    train = next(s for s in counted.splits if s.name == "train")
    words = next(s for s in describe("sequence", data).splits if s.name == "train")
    assert train.tokens.low >= words.tokens.low + 2  # [CLS] and [SEP] at least


def test_a_long_runs_training_records_are_thinned_in_one_pass(runs, tmp_path, monkeypatch):
    import kiln.report as module

    monkeypatch.setattr(module, "TRAIN_POINTS", 100)
    run = tmp_path / "long"
    shutil.copytree(runs[0], run)
    with open(run / "metrics.jsonl", "w") as out:
        for step in range(10, 10_010, 10):  # logged every 10 steps, 1,000 records
            out.write(json.dumps({"step": step, "loss": 1 / step, "lr": 0.1, "elapsed": step / 100}) + "\n")
        for step in (9_990, 10_000, 10_003):  # a resume logs its last steps again; the budget's last step
            out.write(json.dumps({"step": step, "loss": 2.0, "lr": 0.1, "elapsed": step / 100}) + "\n")
    log = load_run(run)
    steps = [r["step"] for r in log.train]
    assert 50 <= len(steps) <= 101 and steps == sorted(steps)
    assert len({b - a for a, b in itertools.pairwise(steps[:-1])}) == 1  # evenly spaced
    assert steps[-1] == 10_003 and log.train[-1]["loss"] == 2.0  # the last is always kept
    kept = {r["step"]: r for r in log.train}
    assert 10_000 not in kept or kept[10_000]["loss"] == 2.0  # the later record of a step wins
    assert any("1,003 training records; the curves show every" in f for f in log.findings)
