import dataclasses

import pytest

from kiln.config import (
    Config,
    ConfigBuilder,
    changed_settings,
    coerce,
    config_from_dict,
    iter_settings,
    parse_override,
    resolve_key,
    sections,
)
from kiln.errors import KilnError
from kiln.profiles import builder_for, load


def test_every_setting_has_a_doc():
    for key, f in iter_settings():
        assert f.metadata.get("doc"), key


def test_layers_record_their_source(tiny_profile):
    builder = builder_for(str(tiny_profile), {"train.epochs": 5}, ["optim.weight_decay=0"])
    sources = {key: source for key, _, source in builder.described()}
    assert sources["train.epochs"] == "flag"
    assert sources["optim.weight_decay"] == "flag"
    assert sources["optim.lr"] == "file"          # set by the user's YAML
    assert sources["tokenizer.kind"] == "profile"  # inherited from the shipped bert-tiny
    assert sources["train.seed"] == "default"
    config = builder.build()
    assert config.train.epochs == 5.0 and config.optim.weight_decay == 0.0
    assert config.model.config["hidden_size"] == 32          # user file overrides one key ...
    assert config.model.config["type_vocab_size"] == 2       # ... and keeps the rest of bert-tiny
    assert sources["model.config.hidden_size"] == "file"
    assert sources["model.config.type_vocab_size"] == "profile"


def test_model_config_override_with_c():
    builder = builder_for("bert-mini", {}, ["model.config.num_hidden_layers=2"])
    config = builder.build()
    assert config.model.config["num_hidden_layers"] == 2
    assert config.model.config["hidden_size"] == 256


def test_coerce_types_and_choices():
    assert coerce("train.epochs", 2) == 2.0
    assert coerce("train.max_steps", 10.0) == 10
    assert coerce("train.dropout", None) is None
    with pytest.raises(KilnError, match="expects int"):
        coerce("train.max_steps", "ten")
    with pytest.raises(KilnError, match="one of"):
        coerce("train.precision", "fp8")
    with pytest.raises(KilnError, match=r"did you mean train\.epochs"):
        coerce("train.epoch", 1)


def test_parse_override_reads_yaml_values():
    assert parse_override("optim.betas=[0.9, 0.98]") == ("optim.betas", [0.9, 0.98])
    assert parse_override("train.dropout=null") == ("train.dropout", None)
    # YAML 1.1 reads 1e-4 (no dot) as text; kiln reads it as the number users mean.
    assert parse_override("optim.lr=1e-4") == ("optim.lr", 1e-4)
    assert parse_override("model.config.layer_norm_eps=1E-5") == ("model.config.layer_norm_eps", 1e-5)
    assert coerce("train.budget", parse_override("train.budget=90")[1]) == "90"  # text settings take numbers
    with pytest.raises(KilnError, match="cannot read the duration '1:30'"):  # YAML 1.1 read this as 90 s
        coerce("train.budget", parse_override("train.budget=1:30")[1])
    with pytest.raises(KilnError):
        parse_override("no-equals-sign")


def test_resolve_key_by_leaf_or_flag_name():
    assert resolve_key("lr") == "optim.lr"
    assert resolve_key("batch_tokens") == "train.batch_tokens"
    assert resolve_key("model.config.hidden_size") == "model.config.hidden_size"
    with pytest.raises(KilnError, match="unknown setting"):
        resolve_key("learning_rate_typo")


def test_roundtrip_through_dict():
    config = load("bert-mini")
    builder = ConfigBuilder()
    builder.apply(config.to_dict(), "file")
    assert builder.build() == config
    # Every section, shared or a task's own, is a top-level key of the saved form.
    tree = Config().to_dict()
    assert set(sections()) <= set(tree) and "task_settings" not in tree
    assert tree["qa"] == dataclasses.asdict(Config().qa)
    # A run saved before a setting had its range still loads (ranges guard new runs, not old ones).
    saved = config.to_dict()
    saved["generate"]["top_p"] = 0.0
    assert config_from_dict(saved).generate.top_p == 0.0
    with pytest.raises(KilnError, match="must be above 0"):
        coerce("generate.top_p", 0.0)


def test_a_token_budget_flag_replaces_a_profiles_fixed_batch_size():
    assert load("crammed-bert-mini").train.batch_size == 32
    budget = builder_for("crammed-bert-mini", {"train.batch_tokens": 2048}).build().train
    assert (budget.batch_size, budget.batch_tokens) == (0, 2048)
    both = builder_for("crammed-bert-mini", {"train.batch_tokens": 2048, "train.batch_size": 8}).build().train
    assert (both.batch_size, both.batch_tokens) == (8, 2048)  # --batch-size given too: it wins, as documented


def test_a_task_owns_its_settings_section_and_the_old_keys_still_load():
    """QA's window lives in the qa section that kiln/tasks/qa.py declares; `data.window`, where kiln 0.1
    kept it, still loads from a saved run, a YAML file and -c."""
    from kiln.tasks import task_class

    assert task_class("qa").settings_class is sections()["qa"]
    assert "qa.window" in dict(iter_settings()) and "data.window" not in dict(iter_settings())
    assert load("bert-mini", **{"qa.window": 200}).qa.window == 200
    saved = load("bert-mini").to_dict()
    del saved["qa"], saved["token"]
    saved["data"].update(window=256, stride=64, tag_scheme="bioes")  # a run directory of kiln 0.1
    old = config_from_dict(saved)
    assert (old.qa.window, old.qa.stride, old.token.tag_scheme) == (256, 64, "bioes")
    assert resolve_key("data.null_threshold") == "qa.null_threshold"
    builder = ConfigBuilder()
    builder.set("data.problem_type", "regression", "flag")
    assert builder.build().sequence.problem_type == "regression"
    with pytest.raises(KilnError, match=r"qa\.window' must be at least 8"):
        coerce("data.window", 4)
    # The old form and the new one are the same run: resuming compares them as equal.
    assert changed_settings(saved, old.to_dict()) == []


def test_a_run_saved_with_task_settings_under_data_predicts_evaluates_and_resumes(sentiment_dir, tiny_profile,
                                                                                  tmp_path):
    """A run directory written before the tasks had their own sections (problem_type under data:)
    still predicts, evaluates and resumes."""
    import json

    import kiln

    run = kiln.train("sequence", sentiment_dir, name="old", profile=str(tiny_profile), output_dir=tmp_path,
                     max_steps=4, eval_every=2, precision="fp32")
    expected = kiln.load(run.path, precision="fp32").predict(["a good film"])

    def older(config: dict) -> dict:
        config = {key: value for key, value in config.items() if key not in sections() or key in (
            "model", "tokenizer", "optim", "schedule", "train", "data", "generate")}
        config["data"] = {**config["data"], "problem_type": "auto"}
        return config

    for path in (run.path / "run.json", run.model_dir / "kiln.json",
                 *(run.path / "checkpoints").glob("*/kiln.json")):
        meta = json.loads(path.read_text())
        meta["config"] = older(meta["config"])
        path.write_text(json.dumps(meta))
    from kiln.model_files import write_manifest

    for manifest in run.path.glob("**/manifest.json"):  # as the older kiln wrote them, consistently
        manifest.unlink()
        write_manifest(manifest.parent)
    old = kiln.load(run.path, precision="fp32")
    assert old.config.sequence.problem_type == "auto"
    assert old.predict(["a good film"]) == expected
    assert 0.0 <= old.evaluate(sentiment_dir / "dev.tsv")["accuracy"] <= 1.0
    resumed = kiln.train("sequence", sentiment_dir, name="old", profile=str(tiny_profile), output_dir=tmp_path,
                         max_steps=6, resume=True, precision="fp32")
    assert json.loads((resumed.model_dir / "kiln.json").read_text())["step"] in (4, 6)
