import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from kiln.models import first_token_last_layer, max_positions


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta"])
def test_first_token_last_layer_is_exact(model_type):
    config = AutoConfig.for_model(model_type, vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1)
    torch.manual_seed(0)
    full = AutoModelForSequenceClassification.from_config(config)
    fast = copy.deepcopy(full)
    assert first_token_last_layer(fast)
    ids = torch.randint(3, 60, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padded rows must still match
    mask[3, 2:] = 0
    ids[mask == 0] = 1
    labels = torch.tensor([0, 2, 1, 2])
    outputs = []
    for model in (full, fast):
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        outputs.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-6)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-4, atol=1e-6)


def test_first_token_skips_other_architectures():
    config = AutoConfig.for_model("distilbert", vocab_size=60, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    assert not first_token_last_layer(AutoModelForSequenceClassification.from_config(config))


def test_max_positions_accounts_for_roberta_offset():
    assert max_positions(AutoConfig.for_model("roberta", max_position_embeddings=514)) == 512
    assert max_positions(AutoConfig.for_model("bert", max_position_embeddings=512)) == 512
