"""CoNLL-2003 from ../shared/data: kiln's entity scores equal seqeval's on the same predictions."""

import json

import pytest
from conftest import SHARED_DATA
from seqeval.metrics import f1_score, precision_score, recall_score

import kiln
from kiln.cli import main

# Slow: seqeval parity runs on synthetic tags in the default run (test_token); this is the real corpus.
pytestmark = [pytest.mark.data, pytest.mark.slow]
CONLL = SHARED_DATA / "conll2003"


def test_conll_evaluate_matches_seqeval(tiny_profile, tmp_path, capsys):
    run = kiln.train("token", CONLL, name="ner", profile=str(tiny_profile), max_steps=150, batch_tokens=1024,
                     output_dir=tmp_path)
    predictions = tmp_path / "valid.pred.txt"
    assert main(["evaluate", str(run.path), str(CONLL / "valid.txt"), "--json", "-o", str(predictions)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    gold, pred = [], []
    sentence_gold, sentence_pred = [], []
    for line in [*predictions.read_text().splitlines(), ""]:
        if not line.strip():
            if sentence_gold:
                gold.append(sentence_gold)
                pred.append(sentence_pred)
            sentence_gold, sentence_pred = [], []
            continue
        cells = line.split()
        sentence_gold.append(cells[-2])
        sentence_pred.append(cells[-1])
    assert metrics["n"] == len(gold) == 3250
    assert metrics["f1"] > 0  # 150 steps find some entities, so the comparison is not 0 == 0
    assert metrics["f1"] == pytest.approx(f1_score(gold, pred), abs=1e-12)
    assert metrics["precision"] == pytest.approx(precision_score(gold, pred), abs=1e-12)
    assert metrics["recall"] == pytest.approx(recall_score(gold, pred), abs=1e-12)
