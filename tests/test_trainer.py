"""The loop's correctness-critical parts: loss normalisation under accumulation, exact resume."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import kiln
from kiln.errors import KilnError, RunStopped
from kiln.profiles import builder_for
from kiln.tasks import get_task
from kiln.training import checkpoint as ckpt
from kiln.training.trainer import Callback, Trainer


class FakeTokenizer:
    pad_token_id = 0


def make_trainer(tiny_profile, grad_accum=1):
    config = builder_for(str(tiny_profile), {"train.dropout": 0.0, "train.grad_clip": 0.0, "train.precision": "fp32",
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
    """Interrupt training after ``step``: by raising KeyboardInterrupt, or with a real signal (SIGINT: Ctrl-C)."""

    def __init__(self, step, signal=None):
        self.step = step
        self.signal = signal

    def on_step_end(self, trainer, logs):
        if trainer.state.step == self.step:
            if not self.signal:
                raise KeyboardInterrupt
            import os
            import signal

            os.kill(os.getpid(), getattr(signal, self.signal))


TIMING = ("tokens_per_s", "examples_per_s", "elapsed")


def logged(run) -> list[dict]:
    """metrics.jsonl without its wall-clock fields (the only ones a resumed run cannot repeat)."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run.path / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b) -> None:
    a = load_file(str(ckpt.last_checkpoint(a.path / "checkpoints") / "model.safetensors"))
    b = load_file(str(ckpt.last_checkpoint(b.path / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("stop", ["raised", "SIGINT", "SIGTERM"])
def test_resume_continues_exactly(tiny_profile, sentiment_dir, tmp_path, stop):
    # Dropout on, so the resumed run only matches if the RNG state was restored too.
    common = dict(profile=str(tiny_profile), max_steps=8, eval_every=4, log_every=3, output_dir=tmp_path,
                  **{"train.dropout": 0.1})
    straight = kiln.train("sequence", sentiment_dir, name="straight", **common)
    if stop == "raised":
        with pytest.raises(KeyboardInterrupt):
            kiln.train("sequence", sentiment_dir, name="stopped", callbacks=[StopAt(5)], **common)
    else:  # a signal stops at the step's end with a checkpoint: a planned stop, exit 0 from the CLI
        with pytest.raises(RunStopped, match=f"{stop}: stopped at step 5 .* --resume") as stopped:
            kiln.train("sequence", sentiment_dir, name="stopped", callbacks=[StopAt(5, signal=stop)], **common)
        assert stopped.value.exit_code == 0
    interrupted = ckpt.last_checkpoint(tmp_path / "stopped" / "checkpoints")
    assert json.loads((interrupted / "trainer_state.json").read_text())["step"] == 5
    resumed = kiln.train("sequence", sentiment_dir, name="stopped", resume=True, output_dir=tmp_path)
    same_weights(straight, resumed)
    assert straight.metrics == resumed.metrics
    # The same log: the window cut by the stop (steps 4-6) is logged as one, as without the stop.
    assert logged(resumed) == logged(straight)
    assert [r["step"] for r in logged(resumed) if "split" not in r] == [3, 6, 8]


def test_dropout_draws_from_the_global_rng(tiny_profile):
    # Why the resume test above runs with dropout: only then does a missing RNG restore change the result.
    from kiln.models import set_dropout

    trainer, features = make_trainer(tiny_profile)
    set_dropout(trainer.model, 0.5)
    trainer.model.train()
    batch = trainer.task.collate(features, 0)
    with torch.no_grad():
        torch.manual_seed(0)
        one, two = (trainer.compute_loss(trainer.model, batch) for _ in range(2))
        torch.manual_seed(0)
        again = trainer.compute_loss(trainer.model, batch)
    assert one != two and one == again


def test_second_ctrl_c_stops_without_saving(tiny_profile, sentiment_dir, tmp_path):
    import os
    import signal

    class CtrlCTwice(Callback):
        def on_step_end(self, trainer, logs):
            if trainer.state.step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # the first asks to stop at the step's end...
                os.kill(os.getpid(), signal.SIGINT)  # ...the second stops now: nothing is saved

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        kiln.train("sequence", sentiment_dir, name="twice", profile=str(tiny_profile), max_steps=8,
                   eval_every=100, output_dir=tmp_path, callbacks=[CtrlCTwice()])
    assert ckpt.last_checkpoint(tmp_path / "twice" / "checkpoints") is None
    assert signal.getsignal(signal.SIGINT) is before  # kiln's handler is removed again


def test_resume_skips_a_damaged_latest_checkpoint(tiny_profile, sentiment_dir, tmp_path, caplog):
    common = dict(profile=str(tiny_profile), max_steps=8, eval_every=4, save_every="1", keep_last=2,
                  output_dir=tmp_path)
    straight = kiln.train("sequence", sentiment_dir, name="straight", **common)
    with pytest.raises(KeyboardInterrupt):
        kiln.train("sequence", sentiment_dir, name="crash", callbacks=[StopAt(5)], **common)
    checkpoints = tmp_path / "crash" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "step-00000004", "step-00000005"]
    weights = ckpt.step_checkpoint_path(checkpoints, 5) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit deep in the tensor data: only the manifest's sha256 sees it
    weights.write_bytes(bytes(data))
    resumed = kiln.train("sequence", sentiment_dir, name="crash", resume=True, output_dir=tmp_path)
    assert "step-00000005 is damaged" in caplog.text and "step-00000004" in caplog.text
    same_weights(straight, resumed)
    assert resumed.metrics == straight.metrics


def test_a_rank_without_batches_is_a_clear_error(tiny_profile, sentiment_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "64")  # 6 features cannot give 64 ranks a batch each
    with pytest.raises(KilnError, match="make no batch for each of 64 ranks"):
        make_trainer(tiny_profile)
    with pytest.raises(KilnError, match="make no batch for each of 64 ranks"):
        kiln.train("sequence", sentiment_dir, name="r", profile=str(tiny_profile), output_dir=tmp_path)
    assert not (tmp_path / "r").exists()  # failed before anything was written


def test_same_seed_same_model_different_seed_different(tiny_profile, sentiment_dir, tmp_path):
    runs = [kiln.train("sequence", sentiment_dir, name=f"r{i}", profile=str(tiny_profile), max_steps=3,
                       seed=seed, output_dir=tmp_path) for i, seed in enumerate((1, 1, 2))]
    weights = [load_file(str(r.model_dir / "model.safetensors")) for r in runs]
    key = "classifier.weight"
    assert torch.equal(weights[0][key], weights[1][key])
    assert not torch.equal(weights[0][key], weights[2][key])
    umask = os.umask(0)
    os.umask(umask)
    assert {r.model_dir.stat().st_mode & 0o777 for r in runs} == {0o777 & ~umask}  # not mkdtemp's 0700


def test_max_steps_within_a_budget_ends_the_schedule_on_the_last_step(tiny_profile, sentiment_dir, tmp_path):
    run = kiln.train("sequence", sentiment_dir, name="b", profile=str(tiny_profile), budget="1h", max_steps=8,
                     log_every=1, output_dir=tmp_path)
    lrs = [r["lr"] for r in map(json.loads, (run.path / "metrics.jsonl").read_text().splitlines())
           if "split" not in r]
    assert len(lrs) == 8
    # The linear schedule runs on the steps (they end long before the hour): it warms up, then
    # decays towards zero by step 8, instead of still warming up on the clock.
    assert lrs.index(max(lrs)) < 4 and lrs[-1] < 0.25 * max(lrs)
