"""kiln export: ONNX directories that onnxruntime runs on its own, equal to PyTorch, and that kiln predict,
evaluate and serve take as they take a run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import kiln
from kiln.errors import KilnError
from kiln.export import PARITY_TOLERANCE, export

pytest.importorskip("onnxruntime")

from test_generation import GPT2_TINY as GPT2_GENERATION
from test_generation import T5_TINY as T5_GENERATION
from test_generation import copy_dir  # noqa: F401 (a fixture)
from test_pretrain_predict import PROFILES, PROMPTS, SENTINELS
from test_pretrain_predict import sentences as corpus_sentences
from test_qa import make_examples
from test_token import sentences, write_conll

TEXTS = ["the film is wonderful .", "every scene is dull .", "the cast is bland ."]


def train(tiny_profile, task, data, tmp_path, **flags):
    return kiln.train(task, data, name=task, profile=str(tiny_profile), output_dir=tmp_path / "runs", max_steps=3,
                      precision="fp32", **flags)


def test_sequence_export_runs_in_onnxruntime_alone_and_in_kiln(tiny_profile, sentiment_dir, tmp_path):
    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = train(tiny_profile, "sequence", sentiment_dir, tmp_path)
    out = tmp_path / "exports" / "sst"
    entry = export(run.path, out, eval_data=sentiment_dir / "dev.tsv")
    assert entry["parity_fp32_max_abs_diff"] <= PARITY_TOLERANCE
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "config.json", "kiln.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"])
    assert json.loads((out / "kiln.json").read_text())["export"]["metrics_fp32"]["accuracy"] == \
        entry["metrics_fp32"]["accuracy"]
    assert "## ONNX export" in (out / "README.md").read_text()

    # onnxruntime on its own, with the directory's tokenizer, reproduces transformers on the run's model.
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = tokenizer(TEXTS, return_tensors="np", padding=True)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (logits,) = session.run(None, {name: encoded[name].astype(np.int64) for name in names})
    model = AutoModelForSequenceClassification.from_pretrained(run.model_dir).eval()
    with torch.no_grad():
        reference = model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits.numpy()
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4)

    # kiln predicts and evaluates with the export as with the run.
    on_run, on_export = kiln.load(run.path), kiln.load(out)
    assert on_export.runtime == "onnx"
    ours, theirs = on_run.predict(TEXTS), on_export.predict(TEXTS)
    assert [p["label"] for p in ours] == [p["label"] for p in theirs]
    np.testing.assert_allclose([p["score"] for p in ours], [p["score"] for p in theirs], rtol=0, atol=1e-4)
    assert on_export.evaluate(sentiment_dir / "dev.tsv")["accuracy"] == on_run.evaluate(sentiment_dir / "dev.tsv")[
        "accuracy"]


def test_int8_export_states_both_metrics_and_predicts(tiny_profile, sentiment_dir, tmp_path):
    run = train(tiny_profile, "sequence", sentiment_dir, tmp_path)
    out = tmp_path / "int8"
    entry = export(run.path, out, quantize="int8", eval_data=sentiment_dir / "dev.tsv")
    assert entry["quantize"] == "int8" and {"metrics_fp32", "metrics_int8"} <= set(entry)
    assert entry["metrics_int8"]["n"] == entry["metrics_fp32"]["n"] == 40
    import onnx

    fp32 = tmp_path / "fp32"
    export(run.path, fp32)
    ops = {name: {node.op_type for node in onnx.load(str(path / "model.onnx")).graph.node}
           for name, path in (("int8", out), ("fp32", fp32))}
    assert "MatMulInteger" in ops["int8"] and "MatMulInteger" not in ops["fp32"]  # int8 weights in the matmuls
    assert len(kiln.load(out).predict(TEXTS)) == len(TEXTS)


def test_token_and_qa_exports_predict_as_their_runs(tiny_profile, tmp_path):
    conll = tmp_path / "conll"
    conll.mkdir()
    write_conll(conll / "train.txt", sentences(60, 1))
    write_conll(conll / "valid.txt", sentences(20, 2))
    qa = tmp_path / "qa"
    qa.mkdir()
    for name, rows in (("train.jsonl", make_examples(60, 1)), ("validation.jsonl", make_examples(20, 2))):
        (qa / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task, data, inputs in (("token", conll, ["Alice met Bob in Paris", "Acme went to Berlin today"]),
                               ("qa", qa, [{"question": "Where does Anna live ?",
                                            "context": "it was warm . Anna lives in Rome . sunny ."}])):
        run = train(tiny_profile, task, data, tmp_path)
        out = tmp_path / f"{task}-onnx"
        entry = export(run.path, out)
        assert entry["parity_fp32_max_abs_diff"] <= PARITY_TOLERANCE, task
        assert "metrics_fp32" in entry  # the run's own validation file
        ours, theirs = kiln.load(run.path).predict(inputs), kiln.load(out).predict(inputs)
        if task == "token":
            assert [[(g["entity_group"], g["start"], g["end"]) for g in s] for s in ours] == \
                [[(g["entity_group"], g["start"], g["end"]) for g in s] for s in theirs]
        else:
            assert [(a["answer"], a["start"], a["end"]) for a in ours] == [(a["answer"], a["start"], a["end"])
                                                                           for a in theirs]


def test_refusals_write_nothing(tiny_profile, sentiment_dir, tmp_path, monkeypatch):
    before = [p.name for p in tmp_path.iterdir()]
    run = train(tiny_profile, "sequence", sentiment_dir, tmp_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me\n")
    with pytest.raises(KilnError, match="not an empty directory"):
        export(run.path, taken)
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    with pytest.raises(KilnError, match="takes int8"):
        export(run.path, tmp_path / "x", quantize="int4")
    assert not (tmp_path / "x").exists()
    # A model the exporter fails on: one line, and nothing half-written is left behind.
    def fails(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::mystery\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", fails)
    with pytest.raises(KilnError, match=r"could not export this model \(RuntimeError: unsupported operator"):
        export(run.path, tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "runs", "taken"])


def test_cli_export_one_line_errors(tiny_profile, sentiment_dir, tmp_path):
    run = train(tiny_profile, "sequence", sentiment_dir, tmp_path)
    kiln_cli = [sys.executable, "-m", "kiln"]
    done = subprocess.run([*kiln_cli, "export", str(run.path), "-o", str(tmp_path / "e")], capture_output=True,
                          text=True)
    assert done.returncode == 0 and (tmp_path / "e" / "model.onnx").is_file(), done.stderr
    again = subprocess.run([*kiln_cli, "export", str(run.path), "-o", str(tmp_path / "e")], capture_output=True,
                           text=True)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    missing = subprocess.run([*kiln_cli, "export", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "not a run" in missing.stderr and "Traceback" not in missing.stderr


def test_kiln_serve_answers_from_an_export(tiny_profile, sentiment_dir, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kiln.serve.app import create_app
    from kiln.serve.settings import ServeSettings

    run = train(tiny_profile, "sequence", sentiment_dir, tmp_path)
    out = tmp_path / "served"
    export(run.path, out, quantize="int8")
    predictor = kiln.load(out)
    with TestClient(create_app(predictor, ServeSettings())) as api:
        info = api.get("/info").json()
        assert info["runtime"] == "onnx" and info["num_parameters"] == kiln.load(run.path).num_parameters()
        assert info["precision"] == "int8"
        answer = api.post("/predict", json={"inputs": TEXTS})
        assert answer.status_code == 200
        assert answer.json() == predictor.predict(TEXTS)


def test_without_onnxruntime_one_line_says_how_to_get_it(monkeypatch):
    from kiln.export import onnxruntime

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without the extra has
    with pytest.raises(KilnError, match=r"pip install 'kiln-nlp\[onnx\]'"):
        onnxruntime()


def test_mlm_export_fills_masks_as_its_run(tiny_profile, tmp_path):
    """Fill-mask: the graph gives logits at every position (as transformers' model does); kiln reads the
    masks, as its sparse head does, so the candidates equal the run's."""
    text = tmp_path / "text"
    text.mkdir()
    lines = [f"the {w} sat on the {v} ." for w in ("cat", "dog", "bird", "fox") for v in ("mat", "rug", "sofa")]
    (text / "train.txt").write_text("\n".join(lines * 20) + "\n")
    (text / "valid.txt").write_text("\n".join(lines) + "\n")
    run = kiln.train("mlm", text, name="mlm", profile=str(tiny_profile), output_dir=tmp_path / "runs", max_steps=3,
                     precision="fp32", **{"pretrain.seq_len": 16})
    out = tmp_path / "mlm-onnx"
    entry = export(run.path, out)
    assert entry["parity_fp32_max_abs_diff"] <= PARITY_TOLERANCE and "attention_mask" in entry["inputs"]
    inputs = ["the [MASK] sat on the mat .", "the dog sat [MASK] the [MASK] ."]  # padded together, 3 masks
    ours, theirs = kiln.load(run.path).predict(inputs), kiln.load(out).predict(inputs)
    assert isinstance(ours[0][0], dict) and isinstance(ours[1][0], list)  # one mask: candidates; two: a list each
    for a, b in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]], strict=True):
        assert [c["token"] for c in a] == [c["token"] for c in b]
        np.testing.assert_allclose([c["score"] for c in a], [c["score"] for c in b], rtol=0, atol=1e-4)


def decode_alike(run_dir, export_dir, inputs, beams=3):
    """The run and its export generate the same texts, greedy and with beam search."""
    on_run, on_export = kiln.load(run_dir), kiln.load(export_dir)
    assert on_export.runtime == "onnx"
    greedy = on_run.predict(inputs)
    assert on_export.predict(inputs) == greedy
    assert len({json.dumps(g) for g in greedy}) > len(inputs) // 2  # varied text, not one answer for all
    assert on_export.predict(inputs[:6], {"num_beams": beams}) == on_run.predict(inputs[:6], {"num_beams": beams})


# The decoder-only export in the default run; the seq2seq one (encoder and decoder graphs, 26 s) is slow.
@pytest.mark.parametrize("kind", ["gpt2", pytest.param("t5", marks=pytest.mark.slow)])
def test_generation_export_decodes_as_pytorch(kind, copy_dir, tmp_path):  # noqa: F811
    """Decoder-only and seq2seq: the graphs step with past keys and values, and generate() on them
    gives the PyTorch model's output on 20 inputs (greedy and beams), fp32."""
    import onnxruntime as ort

    profile = tmp_path / f"{kind}.yaml"
    profile.write_text({"gpt2": GPT2_GENERATION, "t5": T5_GENERATION}[kind])
    # Trained on the copy task, the outputs are varied text (a tiny model near its random start, or
    # after a few epochs, gives GPT-2 one answer for every input).
    run = kiln.train("generation", copy_dir, name=kind, profile=str(profile), output_dir=tmp_path / "runs",
                     precision="fp32")
    out = tmp_path / "exports" / kind
    entry = export(run.path, out, eval_data=copy_dir / "dev.tsv")
    graphs = ["decoder_model.onnx"] if kind == "gpt2" else ["encoder_model.onnx", "decoder_model.onnx"]
    assert entry["graphs"] == graphs and entry["parity_fp32_max_abs_diff"] <= PARITY_TOLERANCE
    assert entry["greedy_same_fp32"][0] == entry["greedy_same_fp32"][1] > 0
    assert {"generation_config.json", "config.json", "kiln.json", *graphs} <= {p.name for p in out.iterdir()}
    decoder = ort.InferenceSession(str(out / "decoder_model.onnx"), providers=["CPUExecutionProvider"])
    assert {"past.0.key", "past.1.value"} <= {i.name for i in decoder.get_inputs()}
    assert {"present.0.key", "present.1.value"} <= {o.name for o in decoder.get_outputs()}

    sources = [line.split("\t")[0] for line in (copy_dir / "dev.tsv").read_text().splitlines()[1:]]
    assert len(sources) == 20
    decode_alike(run.path, out, sources)
    ours, theirs = kiln.load(run.path).evaluate(copy_dir / "dev.tsv"), kiln.load(out).evaluate(copy_dir / "dev.tsv")
    assert ours["chrf"] == theirs["chrf"] == pytest.approx(entry["metrics_fp32"]["chrf"], abs=1e-6)  # kiln.json rounds
    assert theirs["loss"] == pytest.approx(ours["loss"], rel=1e-5)


@pytest.mark.slow  # int8 is in the default run for encoders; fp32 generation export too
def test_int8_generation_export_predicts(copy_dir, tmp_path, capsys):  # noqa: F811
    from kiln.cli import main

    profile = tmp_path / "gpt2.yaml"
    profile.write_text(GPT2_GENERATION)
    run = kiln.train("generation", copy_dir, name="gpt2", profile=str(profile), output_dir=tmp_path / "runs",
                     max_steps=3, lr=1e-4, precision="fp32")
    out = tmp_path / "int8"
    entry = export(run.path, out, quantize="int8", eval_data=copy_dir / "dev.tsv")
    assert entry["quantize"] == "int8" and set(entry["metrics_int8"]) == set(entry["metrics_fp32"])
    assert main(["predict", str(out), str(copy_dir / "dev.tsv"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 20 and all(isinstance(r["generated_text"], str) for r in rows)


# span is T5 as generation's t5 case is (in the default run); clm's prompt batching is its own.
@pytest.mark.parametrize("task", ["clm", pytest.param("span", marks=pytest.mark.slow)])
def test_pretraining_exports_generate_as_their_runs(task, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\n".join(corpus_sentences(600)) + "\n")
    (corpus / "valid.txt").write_text("\n".join(corpus_sentences(60, seed=1)) + "\n")
    profile = tmp_path / f"{task}.yaml"
    profile.write_text(PROFILES[task])
    run = kiln.train(task, corpus, name=task, profile=str(profile), output_dir=tmp_path / "runs", max_steps=3,
                     lr=1e-4, precision="fp32")
    out = tmp_path / f"{task}-onnx"
    entry = export(run.path, out)
    assert entry["parity_fp32_max_abs_diff"] <= PARITY_TOLERANCE
    inputs = PROMPTS if task == "clm" else SENTINELS
    on_run, on_export = kiln.load(run.path), kiln.load(out)
    assert on_export.predict(inputs) == on_run.predict(inputs)
    corpus_loss = on_run.evaluate(corpus / "valid.txt")["loss"]
    assert on_export.evaluate(corpus / "valid.txt")["loss"] == pytest.approx(corpus_loss, rel=1e-5)
