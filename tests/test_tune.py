"""kiln tune: the space checked before any trial, trials as ordinary runs, pruning, the budget,
resuming a killed search, failures, and best.yaml as a profile."""

import json
import sys

import pytest

import kiln
from kiln.cli import main
from kiln.errors import KilnError
from kiln.profiles import builder_for
from kiln.tuning import BEST_FILE, STUDY_FILE, TRIAL_FILE, Dimension, Search, load_space, parse_space

optuna = pytest.importorskip("optuna")

SPACE = "optim.lr: {log: [1.0e-3, 1.0e-2]}\ntrain.batch_size: [8, 16]\n"


def search_options(tiny_profile, tmp_path, space_text=SPACE):
    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    return {"name": "s", "profile": str(tiny_profile), "output_dir": tmp_path / "runs", "space": space,
            "overrides": ["train.max_steps=6", "train.eval_every=3", "train.precision=fp32"]}


def test_the_space_is_checked_with_its_line(tmp_path):
    dims = parse_space({"lr": {"log": [1e-5, 1e-3]}, "train.epochs": {"int": [1, 3]}, "optim.name": ["adamw", "adam"],
                        "model.config.hidden_dropout_prob": {"float": [0.0, 0.3]}})
    assert [(d.key, d.kind) for d in dims] == [("optim.lr", "log"), ("train.epochs", "int"), ("optim.name", "choice"),
                                              ("model.config.hidden_dropout_prob", "float")]
    assert len(load_space(None, pretrained=True)) == 5
    for text, message, line in (("optim.lr: {log: [1e-5, 1e-3]}\ntrain.lrate: [1, 2]\n", "unknown setting", 2),
                                ("train.epochs: {int: [3, 1]}\n", "low < high", 1),
                                ("optim.lr: {log: [0, 1e-3]}\n", "low > 0", 1),
                                ("optim.lr: {log: [1e-5, 1e-3]}\noptim.name: [adamw, sgd]\n", "must be one of", 2),
                                ("train.epochs: 3\n", "list of choices", 1)):
        path = tmp_path / "space.yaml"
        path.write_text(text)
        with pytest.raises(KilnError, match=message) as err:
            load_space(path, pretrained=False)
        assert (err.value.path, err.value.line) == (str(path), line)


def test_a_search_runs_trials_as_runs_and_writes_the_best_as_a_profile(sentiment_dir, tiny_profile, tmp_path):
    options = search_options(tiny_profile, tmp_path)
    study = kiln.tune("sequence", sentiment_dir, trials=3, pruner="none", **options)
    folder = tmp_path / "runs" / "s"
    assert (folder / STUDY_FILE).is_file() and len(study.trials) == 3
    for trial in study.trials:
        run = folder / trial.user_attrs["run"]
        record = json.loads((run / TRIAL_FILE).read_text())
        assert record["state"] == "finished" and record["params"] == trial.params
        assert (run / "model" / "config.json").is_file()  # an ordinary run: predict and report read it
        assert record["value"] == pytest.approx(trial.value)
    best = builder_for(str(folder / BEST_FILE)).build()
    assert best.optim.lr == pytest.approx(study.best_params["optim.lr"])
    assert best.train.batch_size == study.best_params["train.batch_size"]
    assert best.train.max_steps == 6 and best.name == "s-best"  # the settings every trial shared, too
    again = kiln.train("sequence", sentiment_dir, name="again", profile=str(folder / BEST_FILE),
                       output_dir=tmp_path / "runs")
    assert again.metrics["accuracy"] == study.best_value  # fp32 on a CPU: the best trial, exactly

    # kiln report on the search: its trials, with the study's plots on the page.
    assert main(["report", str(folder), "-o", str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text()
    assert "Search: s (sequence, accuracy)" in page and "trial-002" in page
    assert all(title in page for title in ("Optimisation history", "Parameter importances", "Parallel coordinates"))

    # Resume: the three finished trials stay; two more are run.
    before = {t.number: t.value for t in study.trials}
    study = kiln.tune("sequence", sentiment_dir, trials=5, pruner="none", resume=True, **options)
    assert len(study.trials) == 5 and {t.number: t.value for t in study.trials[:3]} == before
    with pytest.raises(KilnError, match="already holds a study"):
        kiln.tune("sequence", sentiment_dir, trials=1, **options)


def test_a_trial_left_running_by_a_killed_search_continues(sentiment_dir, tiny_profile, tmp_path):
    options = search_options(tiny_profile, tmp_path)
    kiln.tune("sequence", sentiment_dir, trials=1, pruner="none", **options)
    storage = f"sqlite:///{tmp_path / 'runs' / 's' / STUDY_FILE}"
    study = optuna.load_study(study_name="s", storage=storage)
    killed = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
                        "train.batch_size": optuna.distributions.CategoricalDistribution([8, 16])})
    killed.set_user_attr("run", "trial-001")  # what was running when the search was killed
    study = kiln.tune("sequence", sentiment_dir, trials=2, pruner="none", resume=True, **options)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]  # the killed one, marked failed and run again
    assert study.trials[2].params == killed.params and study.trials[2].user_attrs["run"] == "trial-001"
    assert json.loads((tmp_path / "runs" / "s" / "trial-001" / TRIAL_FILE).read_text())["state"] == "finished"


def test_a_pruned_trial_stops_early_and_says_where(sentiment_dir, tiny_profile, tmp_path):
    class Told:
        """An optuna trial whose pruner says stop at the first report."""

        number, user_attrs, reports = 4, {}, []

        def suggest_float(self, name, low, high, log=False):
            return 3e-3

        def set_user_attr(self, key, value):
            self.user_attrs[key] = value

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return True

    folder = tmp_path / "runs" / "s"
    folder.mkdir(parents=True)
    search = Search("sequence", str(sentiment_dir), "s", folder, str(tiny_profile), None,
                    [Dimension("optim.lr", "log", (1e-3, 1e-2))], "accuracy",
                    ("train.max_steps=12", "train.eval_every=3", "train.precision=fp32"), None)
    trial = Told()
    with pytest.raises(optuna.TrialPruned):
        search.objective(trial)
    record = json.loads((folder / "trial-004" / TRIAL_FILE).read_text())
    assert record["state"] == "pruned" and record["step"] == 3 and trial.reports[0][0] == 3
    steps = [json.loads(line).get("step") for line in (folder / "trial-004" / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 3  # it stopped at the evaluation that pruned it


def test_a_space_where_every_trial_fails_stops_with_the_reason(sentiment_dir, tiny_profile, tmp_path, capsys):
    options = search_options(tiny_profile, tmp_path, "model.config.hidden_size: [33, 35]\n")  # 2 heads: not divisible
    code = main(["tune", "sequence", str(sentiment_dir), "-n", "s", "--profile", str(tiny_profile), "--trials", "10",
                 "--space", str(options["space"]), "--output-dir", str(tmp_path / "runs"), "-c", "train.max_steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no trial finished; every one failed, the last with:" in err[-1]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'runs' / 's' / STUDY_FILE}")
    assert [t.state.name for t in study.trials] == ["FAIL"] * 3  # stopped after three, not ten
    assert all(t.user_attrs["error"] for t in study.trials)


def test_without_optuna_one_line_says_how_to_install_it(monkeypatch, sentiment_dir, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert main(["tune", "sequence", str(sentiment_dir), "-n", "s", "--output-dir", str(tmp_path)]) == 2
    assert "pip install 'kiln-nlp[tune]'" in capsys.readouterr().err


def test_the_budget_bounds_the_whole_search(sentiment_dir, tiny_profile, tmp_path):
    """A 4-second budget: the trial running when it ends stops there (marked as stopped by the budget),
    and no other starts."""
    import time

    options = {**search_options(tiny_profile, tmp_path), "overrides": ["train.epochs=200", "train.eval_every=5",
                                                                       "train.precision=fp32"]}
    started = time.monotonic()
    with pytest.raises(KilnError, match="no trial finished"):
        kiln.tune("sequence", sentiment_dir, trials=5, budget="4s", pruner="none", **options)
    assert time.monotonic() - started < 60
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'runs' / 's' / STUDY_FILE}")
    assert len(study.trials) == 1 and study.trials[0].state.name == "PRUNED"
    assert study.trials[0].user_attrs["stopped"]["why"] == "budget"


def test_jobs_run_trials_in_parallel_processes_sharing_the_study(sentiment_dir, tiny_profile, tmp_path):
    options = search_options(tiny_profile, tmp_path)
    study = kiln.tune("sequence", sentiment_dir, trials=3, jobs=2, pruner="none", **options)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3
    runs = {t.user_attrs["run"] for t in study.trials}
    assert len(runs) == 3 and all((tmp_path / "runs" / "s" / run / "model").is_dir() for run in runs)


def test_sigterm_stops_the_search_at_a_checkpoint_and_resume_continues_it(sentiment_dir, tiny_profile, tmp_path,
                                                                         monkeypatch):
    import os
    import signal

    from kiln.errors import RunStopped
    from kiln.tuning import TrialCallback

    options = {**search_options(tiny_profile, tmp_path), "overrides": ["train.max_steps=8", "train.eval_every=2",
                                                                       "train.precision=fp32"]}
    kiln.tune("sequence", sentiment_dir, trials=1, pruner="none", **options)
    original = TrialCallback.on_step_end

    def terminate(self, trainer, logs):  # SIGTERM arrives during the second trial's third step
        if trainer.state.step == 3 and self.trial.number == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, trainer, logs)

    monkeypatch.setattr(TrialCallback, "on_step_end", terminate)
    with pytest.raises(RunStopped, match="trial-001 has a checkpoint") as stop:
        kiln.tune("sequence", sentiment_dir, trials=3, pruner="none", resume=True, **options)
    assert stop.value.exit_code == 0
    monkeypatch.setattr(TrialCallback, "on_step_end", original)
    real_train, calls = kiln.run.train, []

    def train(*args, **kwargs):
        calls.append((kwargs["name"], kwargs.get("resume", False)))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(kiln.run, "train", train)
    study = kiln.tune("sequence", sentiment_dir, trials=3, pruner="none", resume=True, **options)
    states = [(t.state.name, t.user_attrs.get("run")) for t in study.trials]
    # The interrupted trial, then its continuation from the checkpoint (same run), then a new one.
    assert states == [("COMPLETE", "trial-000"), ("FAIL", "trial-001"), ("COMPLETE", "trial-001"),
                      ("COMPLETE", "trial-003")]
    assert calls == [("trial-001", True), ("trial-003", False)]  # continued from its checkpoint, not redone


def test_a_setting_fixed_with_c_is_not_searched(sentiment_dir, tiny_profile, tmp_path):
    space = {"optim.lr": {"log": [1e-4, 1e-3]}, "train.epochs": {"int": [2, 4]}}
    with pytest.raises(KilnError, match="-c fixes every setting the space searches"):
        kiln.tune("sequence", sentiment_dir, name="none", output_dir=tmp_path, trials=1, space=space,
                  overrides=["optim.lr=1e-3", "epochs=1"])
    study = kiln.tune("sequence", sentiment_dir, name="fixed", profile=str(tiny_profile), output_dir=tmp_path,
                      trials=1, space=space, overrides=["train.epochs=1"])
    assert set(study.trials[0].params) == {"optim.lr"}
    config = json.loads((tmp_path / "fixed" / "trial-000" / "run.json").read_text())["config"]
    assert config["train"]["epochs"] == 1
    assert config["optim"]["lr"] == pytest.approx(study.trials[0].params["optim.lr"])
