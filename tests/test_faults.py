"""Faults during training: a kill at any instant, SIGTERM, a damaged checkpoint, non-finite steps, out of memory.

The claim under test: a CPU run with a fixed seed, stopped by any of these and continued with
``--resume`` (as often as it takes), ends with bit-identical weights and the same ``metrics.jsonl``
(less its wall-clock fields) as the run that was never stopped. Kills are real: the run is a
``python -m kiln`` subprocess and gets SIGKILL, so nothing in kiln can clean up after itself.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_PROFILE, sentiment_rows
from safetensors.torch import load_file

import kiln
from kiln.errors import KilnError, RunStopped
from kiln.training import checkpoint as ckpt
from kiln.training.trainer import Callback, Trainer

STEPS = 16  # two epochs of 10 micro-batches: the resumed runs also cross an epoch's end
# Every step saves, so a kill lands in a checkpoint write as often as in a step; evaluations (and
# `best`) every 4 steps; dropout on, so only a restored RNG resumes exactly; every step logged.
TRAIN_FLAGS = ["--max-steps", str(STEPS), "--save-every", "1", "--keep-last", "2", "-c", "train.dropout=0.1",
               "-c", "train.eval_every=4", "-c", "train.log_every=1", "-c", "train.precision=fp32",
               "-c", "train.device=cpu"]
TIMING = ("tokens_per_s", "examples_per_s", "elapsed")  # wall clock: the only fields a resumed run cannot repeat
PINNED = {"train.precision": "fp32", "train.device": "cpu"}


# -- helpers ------------------------------------------------------------------------------------


class Workspace:
    """A profile, a data set and the environment that ``python -m kiln`` subprocesses share."""

    def __init__(self, root: Path, cache: Path):
        self.root = root
        self.runs = root / "runs"
        self.profile = root / "tiny.yaml"
        self.data = root / "sentiment"
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "KILN_CACHE": str(cache)}
        self.profile.write_text(TINY_PROFILE)
        self.data.mkdir()
        for name, rows in (("train.tsv", sentiment_rows(160, 1)), ("dev.tsv", sentiment_rows(40, 2))):
            (self.data / name).write_text("\n".join(["sentence\tlabel", *(f"{t}\t{lab}" for t, lab in rows)]) + "\n")
        self.launched = 0

    def command(self, name: str, resume: bool = False) -> list[str]:
        """``python -m kiln train`` of run ``name``: the whole command, or its ``--resume``."""
        if resume:  # what a stopped run prints: the run directory knows the rest
            words = ["train", "sequence", str(self.data), "-n", name, "--output-dir", str(self.runs), "--resume"]
        else:
            words = ["train", "sequence", str(self.data), "-n", name, "--profile", str(self.profile),
                     "--output-dir", str(self.runs), *TRAIN_FLAGS]
        return [sys.executable, "-m", "kiln", *words]

    def start(self, argv: list[str]) -> subprocess.Popen:
        """Start ``argv``; its stderr goes to a file (a pipe nobody reads could block it)."""
        self.launched += 1
        stderr = open(self.root / f"stderr-{self.launched:03d}.txt", "w+")  # noqa: SIM115 (closed by finish)
        process = subprocess.Popen(argv, cwd=self.root, env=self.env, stdout=subprocess.DEVNULL, stderr=stderr)
        process.stderr_file = stderr
        return process

    def run(self, argv: list[str], timeout: float = 300) -> tuple[int, str]:
        """Run ``argv`` to its end; its exit code and stderr."""
        return finish(self.start(argv), timeout)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for ``process``; its exit code and stderr."""
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    process.stderr_file.seek(0)
    text = process.stderr_file.read()
    process.stderr_file.close()
    return code, text


def kill_when(process: subprocess.Popen, condition: Callable[[], bool], pause: float = 0.001,
              timeout: float = 300) -> bool:
    """SIGKILL ``process`` as soon as ``condition()`` holds; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if condition():
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return process.returncode == -signal.SIGKILL
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"{process.args} did not reach the kill point in {timeout}s")
        time.sleep(pause)
    return False


def logged_step(run_dir: Path) -> int:
    """The last step with a record in ``metrics.jsonl`` (0 when none); the file may be mid-write."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    step = 0
    for line in text.splitlines():
        with_step = re.match(r'\{"step": (\d+)', line)
        if with_step:
            step = max(step, int(with_step[1]))
    return step


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensors_equal(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys(), (a, b)
    for key in first:
        assert torch.equal(first[key], second[key]), f"{a} != {b} at {key}"


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bit-identical exported weights, last checkpoint (weights and optimizer state), and log."""
    tensors_equal(run_dir / "model" / ckpt.WEIGHTS_FILE, reference / "model" / ckpt.WEIGHTS_FILE)
    last, expected = ckpt.last_checkpoint(run_dir / "checkpoints"), ckpt.last_checkpoint(reference / "checkpoints")
    assert last.name == expected.name == f"step-{STEPS:08d}"
    for name in (ckpt.WEIGHTS_FILE, ckpt.OPTIMIZER_FILE):
        tensors_equal(last / name, expected / name)
    assert records(run_dir) == records(reference)


def leftovers(run_dir: Path) -> list[str]:
    """What interrupted writes left behind: temporary directories and files, ``.old`` directories."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*"))


def checkpoint_step(run_dir: Path) -> int:
    """The step of the checkpoint ``--resume`` would take (0: none), which must verify."""
    last = ckpt.last_checkpoint(run_dir / "checkpoints")
    if last is None:
        return 0
    ckpt.verify_checkpoint(last)
    return json.loads((last / ckpt.STATE_FILE).read_text())["step"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    # The autouse fixture sets KILN_CACHE per test, after module fixtures: use the same folder.
    return Workspace(tmp_path_factory.mktemp("faults"), tmp_path_factory.getbasetemp() / "kiln-cache")


@pytest.fixture(scope="module")
def reference(workspace: Workspace) -> Path:
    """The run that nothing interrupts."""
    code, err = workspace.run(workspace.command("reference"))
    assert code == 0, err
    return workspace.runs / "reference"


# -- kills, signals, damage: the CLI ------------------------------------------------------------


def test_killed_run_resumes_bit_identically(workspace, reference):
    rng = random.Random(7)  # a different instant would do as well: the run must not care
    kill_at, extra = rng.randint(3, 10), rng.uniform(0, 0.05)
    run_dir = workspace.runs / "killed"
    process = workspace.start(workspace.command("killed"))

    def due() -> bool:
        if logged_step(run_dir) < kill_at:
            return False
        time.sleep(extra)  # into the step's checkpoint, evaluation or the next step
        return True

    assert kill_when(process, due), finish(process)
    finish(process)
    assert not (run_dir / "model").exists() and 0 < checkpoint_step(run_dir) < STEPS
    code, err = workspace.run(workspace.command("killed", resume=True))
    assert code == 0, err
    assert "damaged" not in err
    assert_same_run(run_dir, reference)
    assert leftovers(run_dir) == []


def test_sigterm_stops_with_a_checkpoint_and_the_printed_command_resumes(workspace, reference):
    run_dir = workspace.runs / "term"
    process = workspace.start(workspace.command("term"))
    while logged_step(run_dir) < 5 and process.poll() is None:
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    code, err = finish(process)
    assert code == 0, err
    stopped = re.search(r"kiln: SIGTERM: stopped at step (\d+) with a checkpoint; continue with: (kiln train .*)$",
                        err, re.MULTILINE)
    assert stopped, err
    step = int(stopped[1])
    assert 5 <= step < STEPS
    assert ckpt.last_checkpoint(run_dir / "checkpoints").name == f"step-{step:08d}" == \
        ckpt.step_checkpoint_path(run_dir / "checkpoints", checkpoint_step(run_dir)).name
    assert logged_step(run_dir) == step and not (run_dir / "model").exists()
    command = shlex.split(stopped[2])
    assert command[-1] == "--resume"
    code, err = workspace.run([sys.executable, "-m", *command])
    assert code == 0, err
    assert_same_run(run_dir, reference)


def test_resume_from_the_cli_skips_a_damaged_checkpoint(workspace, reference):
    run_dir = workspace.runs / "damaged"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "model")
    newest = ckpt.step_checkpoint_path(run_dir / "checkpoints", STEPS)
    optimizer = newest / ckpt.OPTIMIZER_FILE
    data = bytearray(optimizer.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data: only the manifest's sha256 notices
    optimizer.write_bytes(bytes(data))
    code, err = workspace.run(workspace.command("damaged", resume=True))
    assert code == 0, err
    previous = ckpt.step_checkpoint_path(run_dir / "checkpoints", STEPS - 1)
    assert f"{newest} is damaged (optimizer.safetensors: sha256 mismatch" in err
    assert f"using {previous} instead" in err
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_twenty_kills_at_random_instants(workspace, reference, caplog):
    """Kill the run 20 times, each time ``--resume`` (which may be killed in turn): just after a
    random step, right as a checkpoint's (or the export's) temporary directory appears, that is
    mid-write, or at a random instant while a resumed process loads."""
    rng = random.Random(2024)
    name, run_dir = "kills", workspace.runs / "kills"
    checkpoints = run_dir / "checkpoints"
    # Where each kill falls, in order: spread over the whole run, its export included. The first
    # one comes as step 1's checkpoint is written: the run dies with nothing to resume from yet.
    plan = [1, *sorted(rng.randint(1, STEPS) for _ in range(19))]
    kills, mid_write, history, launched = 0, 0, [], workspace.launched

    def temporaries() -> set[str]:
        return {str(p.relative_to(run_dir)) for folder in (run_dir, checkpoints) if folder.is_dir()
                for p in folder.iterdir() if ".tmp-" in p.name}

    while kills < 20:
        assert workspace.launched - launched < 40, history  # each kill takes a process or two, not more
        first = not run_dir.exists()
        mode = "save" if first else rng.choice(["step", "step", "save", "save", "load"])
        target = plan[kills]
        delay = {"step": rng.uniform(0, 0.1), "load": rng.uniform(0, 5)}.get(mode, 0)
        before = temporaries()
        process = workspace.start(workspace.command(name, resume=not first))
        started, training = time.monotonic(), [False]

        def due(mode=mode, target=target, delay=delay, started=started, before=before, training=training,
                stderr=Path(process.stderr_file.name)) -> bool:
            if mode == "load":
                return time.monotonic() - started >= delay
            if not training[0]:  # the summary is printed once set-up (and the resume's cut of the log) is done
                training[0] = "kiln train sequence" in stderr.read_text()
                if not training[0]:
                    return False
            if logged_step(run_dir) < target:
                return False
            if mode == "step":
                time.sleep(delay)  # into the step's checkpoint, an evaluation, the next step or the export
                return True
            return bool(temporaries() - before)  # a new checkpoint, prune or export is being written

        killed = kill_when(process, due, pause=0.0002 if mode == "save" else 0.001)
        code, err = finish(process)
        assert "damaged" not in err and "Traceback" not in err, (history, err)
        if not killed:  # it finished first (the run is complete): resume it again, to be killed in its export
            assert code == 0, (history, err)
            history.append(f"{mode}@{target}:finished")
            continue
        kills += 1
        history.append(f"{mode}@{target}:{logged_step(run_dir)}")
        if temporaries() - before:
            mid_write += 1
            history[-1] += "(mid-write)"
        with caplog.at_level("WARNING", logger="kiln"):
            checkpoint_step(run_dir)  # the newest checkpoint verifies: a kill damages none
        assert "damaged" not in caplog.text, (history, caplog.text)
    code, err = workspace.run(workspace.command(name, resume=True))
    assert code == 0, (history, err)
    assert mid_write >= 3, history
    assert_same_run(run_dir, reference)
    assert leftovers(run_dir) == [], history
    print("kills:", history)


# -- non-finite steps and out of memory: in-process, with a patched loss -------------------------


def nan_at(monkeypatch: pytest.MonkeyPatch, steps: set[int] | None) -> None:
    """Make the loss NaN at the (1-based) optimizer ``steps``, or at every step when None."""
    real = Trainer.compute_loss

    def compute_loss(self, model, batch):
        loss = real(self, model, batch)
        return loss * float("nan") if steps is None or self.state.step + 1 in steps else loss

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)


def test_a_non_finite_step_is_skipped_not_applied(tiny_profile, sentiment_dir, tmp_path, monkeypatch, caplog):
    nan_at(monkeypatch, {3, 4})
    run = kiln.train("sequence", sentiment_dir, name="nan", profile=str(tiny_profile), max_steps=6, save_every="1",
                     keep_last=10, log_every=1, output_dir=tmp_path, **PINNED)
    checkpoints = run.path / "checkpoints"

    def at(step: int, file: str = ckpt.WEIGHTS_FILE) -> Path:
        return ckpt.step_checkpoint_path(checkpoints, step) / file

    tensors_equal(at(2), at(4))  # steps 3 and 4 changed nothing: not the weights...
    tensors_equal(at(2, ckpt.OPTIMIZER_FILE), at(4, ckpt.OPTIMIZER_FILE))  # ...nor Adam's moments
    assert not torch.equal(load_file(str(at(4)))["classifier.weight"], load_file(str(at(5)))["classifier.weight"])
    windows = [r for r in records(run.path) if "split" not in r]
    assert [r["step"] for r in windows] == [1, 2, 3, 4, 5, 6]
    assert [r.get("skipped_steps", 0) for r in windows] == [0, 0, 1, 2, 2, 2]
    state = json.loads(at(6, ckpt.STATE_FILE).read_text())
    assert (state["skipped_steps"], state["nonfinite_streak"]) == (2, 0)
    assert "step 3: loss or gradient not finite; the update was skipped (1 skipped so far)" in caplog.text
    assert "step 4: loss or gradient not finite; the update was skipped (2 skipped so far)" in caplog.text


def test_too_many_non_finite_steps_stop_with_the_last_finite_weights(tiny_profile, sentiment_dir, tmp_path,
                                                                      monkeypatch):
    nan_at(monkeypatch, None)
    initial = {}

    class Initial(Callback):
        def on_train_begin(self, trainer):
            initial.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    with pytest.raises(RunStopped, match=r"not finite for 3 steps in a row \(to step 3\).*"
                                                 r"--init \S+/checkpoints/step-00000003") as stopped:
        kiln.train("sequence", sentiment_dir, name="nan", profile=str(tiny_profile), max_steps=8,
                   output_dir=tmp_path, callbacks=[Initial()], **{"train.nonfinite_limit": 3}, **PINNED)
    assert stopped.value.exit_code == 1
    last = ckpt.last_checkpoint(tmp_path / "nan" / "checkpoints")
    assert last.name == "step-00000003"
    saved = load_file(str(last / ckpt.WEIGHTS_FILE))
    assert saved.keys() <= initial.keys()
    for key, value in saved.items():
        assert torch.equal(value, initial[key]), key


def test_cli_exits_1_with_one_line_when_the_loss_stays_non_finite(workspace):
    # An absurd learning rate: step 1 is finite and applied, and every loss after it is NaN.
    argv = [*workspace.command("diverged")[:-len(TRAIN_FLAGS)], "--max-steps", "8", "-c", "optim.lr=1e30",
            "-c", "train.nonfinite_limit=3", "-c", "train.precision=fp32", "-c", "train.device=cpu"]
    code, err = workspace.run(argv)
    assert code == 1, err
    assert "Traceback" not in err
    final = err.strip().splitlines()[-1]
    assert re.fullmatch(r"kiln: the loss or gradient was not finite for 3 steps in a row \(to step 4\); .* "
                        r"--init \S+/checkpoints/step-00000004 to keep the progress\)", final), err
    assert ckpt.last_checkpoint(workspace.runs / "diverged" / "checkpoints").name == "step-00000004"


def oom_above(monkeypatch: pytest.MonkeyPatch, examples: int) -> list[int]:
    """Make a micro-batch of more than ``examples`` examples run out of (CUDA) memory; returns the
    sizes of the micro-batches that ran."""
    real, sizes = Trainer.compute_loss, []

    def compute_loss(self, model, batch):
        size = len(batch["labels"])
        if size > examples:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        sizes.append(size)
        return real(self, model, batch)

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)
    return sizes


def test_out_of_memory_names_the_options(tiny_profile, sentiment_dir, tmp_path, monkeypatch):
    oom_above(monkeypatch, 4)
    with pytest.raises(KilnError, match=r"CUDA out of memory at step 1;") as err:
        kiln.train("sequence", sentiment_dir, name="oom", profile=str(tiny_profile), max_steps=4,
                   output_dir=tmp_path, **PINNED)
    assert "--auto-batch" in err.value.message and "--grad-checkpoint" in err.value.message
    assert "\n" not in str(err.value)
    # With --auto-batch, but not even one example fits: splitting stops there, with the same message.
    oom_above(monkeypatch, 0)
    with pytest.raises(KilnError, match=r"CUDA out of memory at step 1;.*--auto-batch"):
        kiln.train("sequence", sentiment_dir, name="oom1", profile=str(tiny_profile), max_steps=4,
                   output_dir=tmp_path, auto_batch=True, **PINNED)


def test_auto_batch_splits_micro_batches_and_trains_the_same(tiny_profile, sentiment_dir, tmp_path, monkeypatch,
                                                             caplog):
    common = dict(profile=str(tiny_profile), max_steps=6, output_dir=tmp_path, **PINNED,
                  **{"train.dropout": 0.0})
    whole = kiln.train("sequence", sentiment_dir, name="whole", **common)
    sizes = oom_above(monkeypatch, 4)
    split = kiln.train("sequence", sentiment_dir, name="split", auto_batch=True, **common)
    assert sizes and max(sizes) <= 4
    assert "micro-batches now run in 4 pieces" in caplog.text
    expected = load_file(str(whole.model_dir / ckpt.WEIGHTS_FILE))
    for key, value in load_file(str(split.model_dir / ckpt.WEIGHTS_FILE)).items():
        # The same examples per step; only the order of the float sums differs.
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
    losses = [r["loss"] for r in records(split.path) if "split" not in r]
    assert losses == pytest.approx([r["loss"] for r in records(whole.path) if "split" not in r], rel=1e-5)
    # The split is part of the saved state: a resumed run does not hit the same OOM again first.
    state = json.loads((ckpt.last_checkpoint(split.path / "checkpoints") / "trainer_state.json").read_text())
    assert state["micro_split"] == 4


def test_a_crash_before_the_first_checkpoint_resumes_from_the_start(tiny_profile, sentiment_dir, tmp_path):
    """A run that dies before it saved anything: ``--resume`` starts over, and the log must not keep
    the dead run's lines (they would be written twice)."""

    class Crash(BaseException):
        """Dies like a kill: neither an Exception nor a KeyboardInterrupt, so kiln saves nothing."""

    class CrashAt(Callback):
        def on_step_end(self, trainer, logs):
            if trainer.state.step == 3:
                raise Crash

    common = dict(profile=str(tiny_profile), max_steps=6, eval_every=4, log_every=1, output_dir=tmp_path,
                  **{"train.dropout": 0.1}, **PINNED)
    straight = kiln.train("sequence", sentiment_dir, name="straight", **common)
    with pytest.raises(Crash):
        kiln.train("sequence", sentiment_dir, name="crash", callbacks=[CrashAt()], **common)
    assert ckpt.last_checkpoint(tmp_path / "crash" / "checkpoints") is None
    assert logged_step(tmp_path / "crash") == 3
    resumed = kiln.train("sequence", sentiment_dir, name="crash", resume=True, output_dir=tmp_path)
    tensors_equal(resumed.model_dir / ckpt.WEIGHTS_FILE, straight.model_dir / ckpt.WEIGHTS_FILE)
    assert records(resumed.path) == records(straight.path)


def test_resuming_a_finished_run_keeps_one_test_record(tiny_profile, sentiment_dir, tmp_path):
    """A kill after the test split was scored (while the model card is written), or ``--resume`` of a
    run that had finished: the run ends as it was, with the test split's record in the log once."""
    shutil.copy(sentiment_dir / "dev.tsv", sentiment_dir / "test.tsv")
    run = kiln.train("sequence", sentiment_dir, name="done", profile=str(tiny_profile), max_steps=4, log_every=1,
                     output_dir=tmp_path, **PINNED)
    finished = records(run.path)
    assert [r["split"] for r in finished if "split" in r] == ["validation", "test"]
    again = kiln.train("sequence", sentiment_dir, name="done", resume=True, output_dir=tmp_path)
    assert again.test_metrics == run.test_metrics
    assert records(again.path) == finished


def test_resuming_a_run_that_stopped_early_does_not_train_on(tiny_profile, sentiment_dir, tmp_path):
    """Early stopping (patience) ended the run; ``--resume`` (say, to rebuild model/ after a kill
    during the export) must end at the same step with the same best checkpoint."""
    run = kiln.train("sequence", sentiment_dir, name="patient", profile=str(tiny_profile), max_steps=200,
                     eval_every=1, patience=1, lr=0.0, output_dir=tmp_path, **PINNED)  # lr 0: never improves
    logged = records(run.path)
    stopped_at = max(r["step"] for r in logged)
    assert stopped_at == 2  # the second evaluation did not improve on the first
    shutil.rmtree(run.path / "model")
    again = kiln.train("sequence", sentiment_dir, name="patient", resume=True, output_dir=tmp_path)
    assert records(again.path) == logged
    assert json.loads((again.path / "model" / "kiln.json").read_text())["step"] == 1


def test_a_non_finite_metric_is_never_the_best(tiny_profile, sentiment_dir, tmp_path, monkeypatch):
    from kiln.tasks.sequence import SequenceTask

    real, calls = SequenceTask.metrics, []

    def metrics(self, predictions, dataset):
        calls.append(1)
        found = real(self, predictions, dataset)
        return {**found, "accuracy": float("nan")} if len(calls) == 1 else found  # the first evaluation overflowed

    monkeypatch.setattr(SequenceTask, "metrics", metrics)
    run = kiln.train("sequence", sentiment_dir, name="nan-eval", profile=str(tiny_profile), max_steps=4,
                     eval_every=2, output_dir=tmp_path, **PINNED)
    assert json.loads((run.path / "model" / "kiln.json").read_text())["step"] == 4
    assert run.metrics["accuracy"] == run.metrics["accuracy"]  # a number, not NaN


def test_an_evaluation_logged_after_the_checkpoint_is_written_again_once(tmp_path):
    from kiln.training.trainer import _cut_metrics

    log = tmp_path / "metrics.jsonl"
    lines = [{"step": 4, "loss": 1.0}, {"step": 4, "split": "validation", "eval_loss": 0.9},
             {"step": 5, "loss": 0.8}]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    _cut_metrics(log, 4, evaluated=False)  # the checkpoint at step 4 was saved before its evaluation
    assert [json.loads(line) for line in log.read_text().splitlines()] == lines[:1]


def test_out_of_memory_in_the_optimizer_step_is_not_retried_in_pieces(tiny_profile, sentiment_dir, tmp_path,
                                                                      monkeypatch, caplog):
    def step(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(KilnError, match=r"CUDA out of memory at step 1;"):
        kiln.train("sequence", sentiment_dir, name="oom-step", profile=str(tiny_profile), max_steps=2,
                   output_dir=tmp_path, auto_batch=True, **PINNED)
    assert "now run in" not in caplog.text  # smaller micro-batches cannot shrink the optimizer's memory
