"""Trackers (train.report_to): tiny runs reported to TensorBoard and MLflow, read back with each
library's own reader and compared with metrics.jsonl, number by number."""

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

import kiln
from kiln.cli import main
from kiln.errors import KilnError
from kiln.training.callbacks import Callback

# How TensorBoard groups a metrics.jsonl record's keys: train/loss, eval/accuracy (eval_accuracy), test/…
GROUPS = {None: "train", "validation": "eval", "test": "test"}
TINY = dict(max_steps=12, eval_every=4, log_every=2, report_to="tensorboard,mlflow")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def tensorboard_points(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What metrics.jsonl holds, as TensorBoard tags: ``{"train/loss": [(step, value), …]}``."""
    points: dict[str, list] = {}
    for record in records(run_dir):
        group = GROUPS[record.get("split")]
        for key, value in numbers(record).items():
            points.setdefault(f"{group}/{key.removeprefix(group + '_')}", []).append((record["step"], value))
    return points


def read_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()


def mlflow_run(tracking_uri: str, name: str, experiment: str = "kiln"):
    """``(client, run)`` of the MLflow run named ``name``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment)
    [run] = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    return client, run


@pytest.fixture
def no_mlflow_env(monkeypatch, tmp_path):
    """The default store (no MLFLOW_* settings), and a fresh working directory to prove it stays empty."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One tiny run reported to both trackers, with a labelled test split: ``(Run, output_dir, cwd)``."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from conftest import TINY_PROFILE, sentiment_rows

    base = tmp_path_factory.mktemp("tracking")
    (base / "tiny.yaml").write_text(TINY_PROFILE)
    data = base / "data"
    data.mkdir()
    for name, seed in (("train.tsv", 1), ("dev.tsv", 2), ("test.tsv", 3)):
        rows = sentiment_rows(160 if name == "train.tsv" else 40, seed)
        (data / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in rows))
    cwd = base / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        patch.setenv("KILN_CACHE", str(base / "cache"))
        patch.chdir(cwd)
        run = kiln.train("sequence", data, name="tracked", profile=str(base / "tiny.yaml"),
                         output_dir=base / "runs", **TINY)
    return run, base / "runs", cwd


def test_tensorboard_scalars_are_metrics_jsonl(tracked):
    run, _, _ = tracked
    expected = tensorboard_points(run.path)
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/accuracy", "eval/loss", "test/accuracy"} \
        <= set(expected)
    assert [step for step, _ in expected["train/loss"]] == [2, 4, 6, 8, 10, 12]
    events = read_events(run.path)
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert set(expected) <= set(logged)
    for tag, points in expected.items():
        assert [step for step, _ in logged[tag]] == [step for step, _ in points], tag
        # TensorBoard stores float32
        assert [value for _, value in logged[tag]] == pytest.approx([value for _, value in points], rel=1e-6), tag


def test_tensorboard_config_text_and_hparams(tracked):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run, _, _ = tracked
    events = read_events(run.path)
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    task: sequence\n" in text and "    report_to: tensorboard,mlflow\n" in text
    content = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(run.config.optim.lr)
    assert start.hparams["model.config.hidden_size"].number_value == 32
    assert start.hparams["task"].string_value == "sequence"
    assert start.hparams["optim.betas"].string_value == "[0.9,0.999]"  # a list, as JSON text
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"best/accuracy", "best/loss"} <= {metric.name.tag for metric in experiment.metric_infos}
    assert events.Scalars("best/accuracy")[-1].value == pytest.approx(run.metrics["accuracy"], rel=1e-6)


def test_mlflow_run_mirrors_the_kiln_run(tracked):
    from kiln.config import iter_settings

    run, output, cwd = tracked
    client, found = mlflow_run(f"sqlite:///{(output / 'mlflow.db').as_posix()}", "tracked")  # the default store
    assert found.info.status == "FINISHED"
    assert json.loads((run.path / "mlflow.json").read_text())["run_id"] == found.info.run_id
    params = found.data.params
    assert {key for key, _ in iter_settings() if key != "model.config"} <= set(params)
    assert params["optim.lr"] == "0.003" and params["model.config.hidden_size"] == "32"
    assert params["train.report_to"] == "tensorboard,mlflow" and params["optim.betas"] == "[0.9,0.999]"
    assert found.data.tags["task"] == "sequence" and found.data.tags["profile"] == "test-tiny"
    assert found.data.tags["kiln_version"] == kiln.__version__ and found.data.tags["init"] == "scratch"
    expected: dict[str, list] = {}
    for record in records(run.path):
        for key, value in numbers(record).items():
            expected.setdefault(key, []).append((record["step"], value))
    assert {"loss", "lr", "eval_accuracy", "test_accuracy"} <= set(expected)
    assert set(found.data.metrics) == set(expected)  # the same names as metrics.jsonl, nothing else
    for key, points in expected.items():
        history = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(found.info.run_id, key))
        assert [(step, value) for step, _, value in history] == points, key
    names = {Path(item.path).name for item in client.list_artifacts(found.info.run_id, "model")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "kiln.json", "README.md"} <= names
    # Artifacts beside the store, never in the working directory (MLflow's default is ./mlruns).
    artifacts = Path(unquote(urlparse(found.info.artifact_uri).path))
    assert artifacts.is_relative_to((output / "mlartifacts").resolve())
    assert (artifacts / "model" / "model.safetensors").is_file()
    assert not any(cwd.iterdir())


class CtrlCTwice(Callback):
    """Two Ctrl-Cs at ``step``: training stops at once, without saving (as after a crash, the steps
    since the last checkpoint run again on --resume)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, logs):
        if trainer.state.step == self.step:
            import signal

            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


def test_resume_continues_the_same_tracked_run(tiny_profile, sentiment_dir, tmp_path, no_mlflow_env,
                                               monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    output = tmp_path / "runs"
    store = tmp_path / "elsewhere" / "tracking.db"  # MLflow's own settings, when set, win
    store.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store.as_posix()}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "kiln-tests")
    with pytest.raises(KeyboardInterrupt):  # at step 10; the last checkpoint is step 8's evaluation
        kiln.train("sequence", sentiment_dir, name="resumed", profile=str(tiny_profile), output_dir=output,
                   callbacks=[CtrlCTwice(10)], **TINY)
    _, stopped = mlflow_run(f"sqlite:///{store.as_posix()}", "resumed", "kiln-tests")
    assert stopped.info.status == "KILLED"
    resumed = kiln.train("sequence", sentiment_dir, name="resumed", resume=True, output_dir=output)
    logged = records(resumed.path)  # the first session's step 10 is cut: the resumed one logged it again
    assert [r["step"] for r in logged if "split" not in r] == [2, 4, 6, 8, 10, 12]
    client, found = mlflow_run(f"sqlite:///{store.as_posix()}", "resumed", "kiln-tests")  # one run, continued
    assert found.info.run_id == stopped.info.run_id and found.info.status == "FINISHED"
    # MLflow cannot delete a metric's points: its history keeps the first session's step 10 too.
    history = [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "loss")]
    assert sorted(step for step, _ in history) == [2, 4, 6, 8, 10, 10, 12]
    assert {(r["step"], r["loss"]) for r in logged if "loss" in r} <= set(history)
    # TensorBoard hides the first session's step 10: each step once, with the resumed session's value.
    events = read_events(resumed.path)
    for tag, points in tensorboard_points(resumed.path).items():
        latest = dict(points)  # per step, the last value logged
        shown = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [step for step, _ in shown] == sorted(latest), tag
        assert [value for _, value in shown] == pytest.approx([latest[step] for step, _ in shown], rel=1e-6), tag
    assert Path(unquote(urlparse(found.info.artifact_uri).path)).is_relative_to(store.parent / "mlartifacts")
    assert not (output / "mlflow.db").exists() and not any(no_mlflow_env.iterdir())


def test_mlflow_status_says_how_training_ended():
    from kiln.errors import RunStopped
    from kiln.training.callbacks import _run_status

    assert _run_status(None) == "FINISHED"  # finished, or stopped early by patience or a budget
    assert _run_status(KeyboardInterrupt()) == "KILLED"
    assert _run_status(RunStopped("SIGTERM: stopped", exit_code=0)) == "KILLED"
    assert _run_status(RunStopped("not finite", exit_code=1)) == "FAILED"
    assert _run_status(RuntimeError("a bug")) == "FAILED"


def test_one_tensorboard_callback_for_several_runs_logs_each_in_its_own_directory(tiny_profile, sentiment_dir,
                                                                                  tmp_path):
    pytest.importorskip("tensorboard")
    from kiln.training.callbacks import TensorBoardCallback

    board = TensorBoardCallback()  # as a sweep passes it to every kiln.train call
    runs = [kiln.train("sequence", sentiment_dir, name=name, profile=str(tiny_profile), output_dir=tmp_path,
                       callbacks=[board], max_steps=2, log_every=1) for name in ("a", "b")]
    for run in runs:
        steps = [e.step for e in read_events(run.path).Scalars("train/loss")]
        assert steps == [1, 2], run.path


def test_an_unusable_mlflow_store_is_one_line_and_a_failing_server_does_not_end_training(
        tiny_profile, sentiment_dir, tmp_path, no_mlflow_env, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from kiln.training.callbacks import MLflowCallback

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")  # a file where the store's directory should be
    uri = f"sqlite:///{(blocked / 'mlflow.db').as_posix()}"
    expected = f"^MLflow tracking store {uri}: .*File exists.*--report-to none trains without it"
    with pytest.raises(KilnError, match=expected):
        kiln.train("sequence", sentiment_dir, name="x", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                   callbacks=[MLflowCallback(tracking_uri=uri)], max_steps=2)

    def down(*args, **kwargs):
        raise MlflowException("API request failed: connection refused")

    class ServerDownAt2(Callback):  # the server goes away in the middle of training
        def on_step_end(self, trainer, logs):
            if trainer.state.step == 1:
                monkeypatch.setattr(MlflowClient, "log_batch", down)

    run = kiln.train("sequence", sentiment_dir, name="y", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                     callbacks=[ServerDownAt2()], max_steps=3, log_every=1, report_to="mlflow")
    assert [r["step"] for r in records(run.path) if "loss" in r] == [1, 2, 3]  # training went on, all logged
    assert "MLflow: step 2 not logged (API request failed: connection refused); metrics.jsonl has it" in caplog.text


@pytest.mark.parametrize(("tracker", "shown"), [("tensorboard", "TensorBoard"), ("mlflow", "MLflow")])
def test_missing_tracker_package_is_one_line_before_anything_is_written(
        tracker, shown, tiny_profile, sentiment_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed: find_spec says None, import fails
    message = f"report_to '{tracker}' needs {shown}: pip install 'kiln-nlp[{tracker}]'"
    with pytest.raises(KilnError) as caught:
        kiln.train("sequence", sentiment_dir, name="x", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                   report_to=tracker)
    assert str(caught.value) == message
    assert not (tmp_path / "runs").exists()
    code = main(["train", "sequence", str(sentiment_dir), "-n", "x", "--profile", str(tiny_profile),
                 "--output-dir", str(tmp_path / "runs"), "--report-to", f"{tracker},{tracker}"])
    assert code == 2
    assert capsys.readouterr().err == f"kiln: {message}\n"
    assert not (tmp_path / "runs").exists()


def test_help_and_building_trackers_import_neither_library():
    code = """
import sys
from kiln.cli import main
from kiln.errors import KilnError
from kiln.training.callbacks import tracking_callbacks
for argv in (["--help"], ["train", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
try:
    tracking_callbacks("tensorboard,mlflow")  # started only by a run: nothing imported yet
except KilnError:
    pass  # not installed here
print(sorted(m for m in sys.modules if m.split(".")[0] in ("mlflow", "tensorboard", "tensorboardX")
             or m.startswith("torch.utils.tensorboard")))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
