"""Every encoder family trains each fine-tuning task end to end (tiny shapes, one step)."""

import json

import pytest

import kiln

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 80}
FAMILIES = {
    "bert-tiny": TINY,
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 80},
    "roberta-base": TINY,
    "xlm-roberta-base": TINY,
    "deberta-base": TINY,
    "squeezebert": {**TINY, "embedding_size": 32},
}


def write_data(folder):
    folder.mkdir()
    (folder / "train.tsv").write_text("".join(f"a good film {i}\tpos\nsuch a dull film {i}\tneg\n" for i in range(20)))
    (folder / "token.tsv").write_text("".join(f"Anna met Bob {i}\tB-PER O B-PER O\n" for i in range(40)))
    rows = [{"context": f"Anna lives in Paris {i} .", "question": "Where?",
             "answers": {"text": ["Paris"], "answer_start": [14]}} for i in range(40)]
    (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("profile", list(FAMILIES))
def test_family_trains_every_task(profile, tmp_path):
    data = tmp_path / "data"
    write_data(data)
    overrides = [f"model.config.{k}={v}" for k, v in FAMILIES[profile].items()]
    overrides += ["tokenizer.vocab_size=200", "train.batch_tokens=512"]
    for task, source in (("sequence", data / "train.tsv"), ("token", data / "token.tsv"), ("qa", data / "qa.jsonl")):
        run = kiln.train(task, source, name=f"{task}", profile=profile, max_steps=1, overrides=overrides,
                         output_dir=tmp_path / "runs")
        assert (run.model_dir / "model.safetensors").is_file()
        model = kiln.load(run.path)
        assert model.model.config.model_type == kiln.load(run.path).config.model.type
