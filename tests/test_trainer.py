"""The loop's correctness-critical parts: loss normalisation under accumulation, exact resume."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import kiln
from kiln.errors import KilnError
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
    """Interrupt training after ``step``: by raising KeyboardInterrupt, or with a real SIGINT (Ctrl-C)."""

    def __init__(self, step, signal=False):
        self.step = step
        self.signal = signal

    def on_step_end(self, trainer, logs):
        if trainer.state.step == self.step:
            if not self.signal:
                raise KeyboardInterrupt
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["raised", "sigint"])
def test_resume_continues_exactly(tiny_profile, sentiment_dir, tmp_path, ctrl_c):
    # Dropout on, so the resumed run only matches if the RNG state was restored too.
    common = dict(profile=str(tiny_profile), max_steps=8, eval_every=4, log_every=1, output_dir=tmp_path,
                  **{"train.dropout": 0.1})
    straight = kiln.train("sequence", sentiment_dir, name="straight", **common)
    with pytest.raises(KeyboardInterrupt):
        kiln.train("sequence", sentiment_dir, name="stopped", callbacks=[StopAt(5, signal=ctrl_c)], **common)
    interrupted = tmp_path / "stopped" / "checkpoints" / "last"
    assert json.loads((interrupted / "trainer_state.json").read_text())["step"] == 5
    resumed = kiln.train("sequence", sentiment_dir, name="stopped", resume=True, output_dir=tmp_path)
    a = load_file(str(straight.path / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(resumed.path / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.metrics == resumed.metrics
    logged = [json.loads(line) for line in (resumed.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "split" not in r] == list(range(1, 9))  # one log, continued


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
    assert not (tmp_path / "twice" / "checkpoints" / "last").exists()
    assert signal.getsignal(signal.SIGINT) is before  # kiln's handler is removed again


def test_resume_falls_back_to_the_checkpoint_a_crash_was_replacing(tiny_profile, sentiment_dir, tmp_path):
    common = dict(profile=str(tiny_profile), max_steps=8, eval_every=4, output_dir=tmp_path)
    straight = kiln.train("sequence", sentiment_dir, name="straight", **common)
    with pytest.raises(KeyboardInterrupt):
        kiln.train("sequence", sentiment_dir, name="crash", callbacks=[StopAt(5)], **common)
    checkpoints = tmp_path / "crash" / "checkpoints"
    # A crash between the two renames of a save leaves only the previous checkpoint, as `.last.old`,
    # and half a temporary directory.
    (checkpoints / "last").rename(checkpoints / ".last.old")
    (checkpoints / ".last.tmp-dead").mkdir()
    assert ckpt.last_checkpoint(checkpoints) == checkpoints / ".last.old"
    resumed = kiln.train("sequence", sentiment_dir, name="crash", resume=True, output_dir=tmp_path)
    assert resumed.metrics == straight.metrics
    assert not (checkpoints / ".last.tmp-dead").exists() and not (checkpoints / ".last.old").exists()


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


def test_two_ranks_train_like_one_process_accumulating_two(tiny_profile, sentiment_dir, tmp_path):
    """torchrun with 2 CPU ranks (gloo): rank r takes micro-batches r, r+2, ...; DDP averages the
    gradients and the loss is normalised by the units of both ranks, so each step's gradient equals
    one process accumulating the same two micro-batches."""
    import os
    import subprocess
    import sys

    base = kiln.train("sequence", sentiment_dir, name="base", profile=str(tiny_profile), max_steps=1,
                      output_dir=tmp_path)
    settings = {"train.max_steps": 3, "train.dropout": 0.0, "train.eval_every": 0, "train.device": "cpu",
                "train.precision": "fp32"}  # compared at fp32 tolerances
    single = kiln.train("sequence", sentiment_dir, name="single", profile=str(tiny_profile), init=base.model_dir,
                        output_dir=tmp_path, **{**settings, "train.grad_accum": 2})
    flags = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kiln",
         "train", "sequence", str(sentiment_dir), "-n", "ddp", "--profile", str(tiny_profile),
         "--init", str(base.model_dir), "--output-dir", str(tmp_path), *flags],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(str(single.path / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "checkpoints" / "last" / "model.safetensors"))
    assert not torch.equal(a["classifier.weight"], load_file(str(base.model_dir / "model.safetensors"))[
        "classifier.weight"])  # three steps did move the weights
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    # The log speaks for the whole job: tokens summed over the ranks, the loss of the global batch.
    last = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
             if '"split"' not in line][-1] for name in ("single", "ddp")]
    assert last[0]["step"] == last[1]["step"] == 3 and last[0]["tokens"] == last[1]["tokens"]
    assert last[1]["loss"] == pytest.approx(last[0]["loss"], rel=1e-4)


def test_max_steps_within_a_budget_ends_the_schedule_on_the_last_step(tiny_profile, sentiment_dir, tmp_path):
    run = kiln.train("sequence", sentiment_dir, name="b", profile=str(tiny_profile), budget="1h", max_steps=8,
                     log_every=1, output_dir=tmp_path)
    lrs = [r["lr"] for r in map(json.loads, (run.path / "metrics.jsonl").read_text().splitlines())
           if "split" not in r]
    assert len(lrs) == 8
    # The linear schedule runs on the steps (they end long before the hour): it warms up, then
    # decays towards zero by step 8, instead of still warming up on the clock.
    assert lrs.index(max(lrs)) < 4 and lrs[-1] < 0.25 * max(lrs)
