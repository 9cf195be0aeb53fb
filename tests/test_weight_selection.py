"""Weight selection: a smaller student's start from a larger teacher of the same family."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kiln.tokenizers import wrap
from kiln.weight_selection import evenly, plan, select, student_architecture, transfer_vocabulary

TEACHER = dict(model_type="bert", vocab_size=40, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
               intermediate_size=96, max_position_embeddings=32, num_labels=3)


def bert(**arch) -> BertForSequenceClassification:
    torch.manual_seed(len(arch))
    settings = {k: v for k, v in arch.items() if k != "model_type"}
    return BertForSequenceClassification(BertConfig(**settings)).eval()


def test_evenly_keeps_the_ends_and_spaces_the_rest():
    assert evenly(6, 4) == [0, 2, 3, 5]
    assert evenly(384, 256)[:4] == [0, 2, 3, 5] and evenly(384, 256)[-1] == 383
    assert len(set(evenly(384, 256))) == 256
    assert evenly(12, 8) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert evenly(5, 5) == list(range(5)) and evenly(5, 1) == [0]


def test_a_student_of_the_teachers_shape_starts_as_the_teacher():
    teacher = bert(**TEACHER)
    chosen, why = plan(dict(TEACHER), TEACHER)
    assert why == "" and chosen is not None
    student = bert(**student_architecture(dict(TEACHER), chosen))
    assert select(student, teacher.state_dict(), chosen) == []
    ids = torch.tensor([[1, 5, 9, 2, 0], [1, 7, 2, 0, 0]])
    mask = (ids != 0).long()
    torch.testing.assert_close(student(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits,
                               rtol=0, atol=0)


def test_a_smaller_student_keeps_whole_heads_and_one_subset_of_the_residual_stream():
    teacher = bert(**TEACHER)  # heads of 12 dimensions
    small = {**TEACHER, "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    chosen, _ = plan(small, TEACHER)
    assert chosen is not None and chosen.layers == [0, 2] and chosen.heads == [0, 3]
    arch = student_architecture(small, chosen)
    assert arch["num_attention_heads"] == 2  # the teacher's head size, 12
    student = bert(**arch)
    assert select(student, teacher.state_dict(), chosen) == []
    hidden, neurons = torch.tensor(chosen.hidden), torch.tensor(chosen.intermediate)
    heads = torch.tensor([*range(0, 12), *range(36, 48)])
    mine, theirs = student.state_dict(), teacher.state_dict()
    layer = "bert.encoder.layer.{}."
    assert torch.equal(mine[layer.format(1) + "attention.self.query.weight"],
                       theirs[layer.format(2) + "attention.self.query.weight"][heads][:, hidden])
    assert torch.equal(mine[layer.format(1) + "attention.self.key.bias"],
                       theirs[layer.format(2) + "attention.self.key.bias"][heads])
    assert torch.equal(mine[layer.format(0) + "attention.output.dense.weight"],
                       theirs[layer.format(0) + "attention.output.dense.weight"][hidden][:, heads])
    assert torch.equal(mine[layer.format(0) + "intermediate.dense.weight"],
                       theirs[layer.format(0) + "intermediate.dense.weight"][neurons][:, hidden])
    assert torch.equal(mine[layer.format(1) + "output.dense.weight"],
                       theirs[layer.format(2) + "output.dense.weight"][hidden][:, neurons])
    assert torch.equal(mine["bert.embeddings.LayerNorm.weight"], theirs["bert.embeddings.LayerNorm.weight"][hidden])
    assert torch.equal(mine["classifier.weight"], theirs["classifier.weight"][:, hidden])


@pytest.mark.parametrize(("change", "why"), [
    ({"model_type": "gpt2"}, "the student is gpt2 and the teacher bert"),
    ({"hidden_size": 96}, "hidden_size (96) is larger than the teacher's"),
    ({"num_hidden_layers": 4}, "num_hidden_layers (4) is larger"),
    ({"hidden_size": 30}, "not a multiple of the teacher's head size 12"),
])
def test_students_that_cannot_start_from_the_teacher_say_why(change, why):
    chosen, reason = plan({**TEACHER, **change}, TEACHER)
    assert chosen is None and why in reason


def test_a_vocabulary_of_its_own_takes_the_teachers_rows_for_the_same_text():
    def tokenizer(tokens: list[str]) -> Any:
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *tokens])}
        raw = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return wrap(raw, "bert", 32)

    teacher = tokenizer(["the", "film", "un", "##film", "ing", "##ing", "##s", "movie"])
    student = tokenizer(["movie", "unfilm", "##ings", "the"])
    embeddings = torch.arange(13 * 2, dtype=torch.float32).reshape(13, 2)
    rows = transfer_vocabulary(embeddings, student, teacher)
    vocab, theirs = student.get_vocab(), teacher.get_vocab()

    def mean(*tokens: str) -> torch.Tensor:
        return embeddings[[theirs[t] for t in tokens]].mean(0)

    assert rows.shape == (len(vocab), 2)
    assert torch.equal(rows[vocab["[CLS]"]], mean("[CLS]"))
    assert torch.equal(rows[vocab["movie"]], mean("movie"))
    assert torch.equal(rows[vocab["unfilm"]], mean("un", "##film"))
    assert torch.equal(rows[vocab["##ings"]], mean("##ing", "##s"))  # a continuation, continued
