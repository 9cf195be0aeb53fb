import copy
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


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_fused_step_equals_foreach(name):
    """The fused kernel (kiln's default on CPU and CUDA) computes the multi-tensor path's update: 20 steps
    of clipped gradients, weight decay and a warm-up LR, in fp32, agree within 1e-6 (the kernels order
    their float operations differently, so bit-equality is not expected)."""
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 3))
    models = {kind: copy.deepcopy(reference) for kind in ("fused", "foreach")}
    config = OptimConfig(name=name, lr=1e-2, weight_decay=0.1)
    optimizers = {kind: build_optimizer(m, config, "cpu", fused=kind == "fused") for kind, m in models.items()}
    assert optimizers["fused"].defaults["fused"] and not optimizers["foreach"].defaults["fused"]
    for step in range(20):
        x, y = torch.randn(8, 16), torch.randint(0, 3, (8,))
        for kind, model in models.items():
            for group in optimizers[kind].param_groups:
                group["lr"] = 1e-2 * min(1.0, (step + 1) / 5)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizers[kind].step()
            optimizers[kind].zero_grad(set_to_none=True)
    for (_, a), (_, b) in zip(models["fused"].named_parameters(), models["foreach"].named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The state is laid out alike, so a checkpoint of either path resumes on the other.
    assert optimizers["fused"].state_dict()["state"].keys() == optimizers["foreach"].state_dict()["state"].keys()
