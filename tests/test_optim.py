import itertools
import math

import pytest
import torch

from kiln.config import OptimConfig, ScheduleConfig
from kiln.training.optim import build_optimizer, lr_multiplier, parameter_groups, warmup_steps


def test_linear_schedule_with_warmup():
    values = [lr_multiplier("linear", s, total_steps=10, warmup=2) for s in range(10)]
    assert values[:2] == [0.5, 1.0]
    assert values[2] == 1.0 and values[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in itertools.pairwise(values[1:]))


def test_cosine_constant_inverse_sqrt():
    assert lr_multiplier("cosine", 5, 10, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier("constant", 9, 10, 2) == 1.0
    assert lr_multiplier("inverse_sqrt", 15, 100, 4) == pytest.approx(math.sqrt(4 / 16))
    # No warmup: transformers decays over a 10,000-step timescale instead of collapsing at once.
    assert lr_multiplier("inverse_sqrt", 9, 100, 0) == pytest.approx(math.sqrt(10_000 / 10_010))
    assert lr_multiplier("inverse_sqrt", 9_999, 20_000, 0) == pytest.approx(math.sqrt(0.5))


def test_warmup_ratio_and_steps():
    assert warmup_steps(ScheduleConfig(warmup_ratio=0.1), 200) == 20
    assert warmup_steps(ScheduleConfig(warmup_ratio=0.1, warmup_steps=7), 200) == 7


def test_no_weight_decay_on_bias_and_layernorm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.relative_attention_bias = torch.nn.Embedding(32, 2)  # T5's: 2-D, but a bias (HF Trainer's rule)
    decay, no_decay = parameter_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["adamw", "adam", "adafactor", "radam"])
def test_every_optimizer_steps(name):
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=0.1))
    before = model.weight.detach().clone()
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)
