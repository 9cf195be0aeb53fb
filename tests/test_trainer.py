"""The loop's correctness-critical parts: loss normalisation under accumulation, exact resume."""

import pytest
import torch
from safetensors.torch import load_file

import kiln
from kiln.profiles import builder_for
from kiln.tasks import get_task
from kiln.training.trainer import Callback, Trainer


class FakeTokenizer:
    pad_token_id = 0


def make_trainer(tiny_profile, grad_accum=1):
    config = builder_for(str(tiny_profile), {"train.dropout": 0.0, "train.grad_clip": 0.0,
                                             "train.grad_accum": grad_accum}).build()
    task = get_task("sequence", config, {"problem_type": "classification", "labels": ["a", "b", "c"]})
    torch.manual_seed(0)
    from kiln.models import hf_config

    model = task.build_model(hf_config("bert", {**config.model.config, "vocab_size": 50}, **task.model_kwargs()))
    generator = torch.Generator().manual_seed(1)
    features = []
    for i, length in enumerate([3, 9, 5, 12, 4, 7]):  # unequal lengths -> unequal padding per micro-batch
        ids = torch.randint(1, 50, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "token_type_ids": [0] * length, "example": i, "label": i % 3})
    trainer = Trainer(model, task, config, FakeTokenizer(), features)
    trainer.setup()
    return trainer, features


def gradient_of(trainer, micro_batches):
    captured = {}

    def capture(*args, **kwargs):
        captured.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.optimizer.step = capture
    trainer.training_step(micro_batches)
    return captured


def test_accumulation_matches_one_big_batch(tiny_profile):
    trainer, features = make_trainer(tiny_profile)
    task = trainer.task
    whole = gradient_of(trainer, [task.collate(features, 0)])
    # 1 example + 5 examples: a per-micro-batch mean would weight the lone example 5x too much.
    split = gradient_of(trainer, [task.collate(features[:1], 0), task.collate(features[1:], 0)])
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=1e-6)

    # The naive normalisation (mean per micro-batch, then averaged) really is different here.
    naive = {}
    for part in (features[:1], features[1:]):
        trainer.model.zero_grad()
        batch = task.collate(part, 0)
        (trainer.compute_loss(trainer.model, batch) / len(part) / 2).backward()
        for n, p in trainer.model.named_parameters():
            if p.grad is not None:
                naive[n] = naive.get(n, 0) + p.grad.clone()
    classifier = "classifier.weight"
    assert not torch.allclose(naive[classifier], whole[classifier], rtol=1e-3, atol=1e-6)


def test_training_step_returns_mean_loss_per_unit(tiny_profile):
    trainer, features = make_trainer(tiny_profile)
    batch = trainer.task.collate(features, 0)
    with torch.no_grad():
        expected = trainer.compute_loss(trainer.model, batch) / len(features)
    trainer.optimizer.step = lambda *a, **k: None
    loss = trainer.training_step([trainer.task.collate(features[:2], 0), trainer.task.collate(features[2:], 0)])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, logs):
        if trainer.state.step == self.step:
            raise KeyboardInterrupt


def test_resume_continues_exactly(tiny_profile, sentiment_dir, tmp_path):
    common = dict(profile=str(tiny_profile), max_steps=8, eval_every=4, output_dir=tmp_path)
    straight = kiln.train("sequence", sentiment_dir, name="straight", **common)
    with pytest.raises(KeyboardInterrupt):
        kiln.train("sequence", sentiment_dir, name="stopped", callbacks=[StopAt(5)], **common)
    interrupted = tmp_path / "stopped" / "checkpoints" / "last"
    assert '"step": 5' in (interrupted / "trainer_state.json").read_text()
    resumed = kiln.train("sequence", sentiment_dir, name="stopped", resume=True, output_dir=tmp_path)
    a = load_file(str(straight.path / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(resumed.path / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.metrics == resumed.metrics
    steps = [line for line in (resumed.path / "metrics.jsonl").read_text().splitlines() if '"split"' not in line]
    assert steps  # the log continues in the same file


def test_same_seed_same_model_different_seed_different(tiny_profile, sentiment_dir, tmp_path):
    runs = [kiln.train("sequence", sentiment_dir, name=f"r{i}", profile=str(tiny_profile), max_steps=3,
                       seed=seed, output_dir=tmp_path) for i, seed in enumerate((1, 1, 2))]
    weights = [load_file(str(r.model_dir / "model.safetensors")) for r in runs]
    key = "classifier.weight"
    assert torch.equal(weights[0][key], weights[1][key])
    assert not torch.equal(weights[0][key], weights[2][key])
