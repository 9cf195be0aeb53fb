"""Several processes on CPU (gloo), started by ``kiln train --nproc``: DDP and FSDP train like one
process accumulating as many micro-batches, evaluation is sharded and exact, and a run saved at 2
processes resumes at 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_PROFILE, sentiment_rows
from safetensors.torch import load_file

import kiln
from kiln.training import checkpoint as ckpt

# fp32 on the CPU, no dropout: what differs between the runs is only the order of float sums
# (a 2-rank all-reduce against one process's accumulation), hence 1e-5 and not equality.
SETTINGS = {"train.dropout": 0.0, "train.device": "cpu", "train.precision": "fp32", "train.max_steps": 4,
            "train.eval_every": 2, "train.log_every": 1, "train.save_every": "1", "train.keep_last": 4}
RTOL, ATOL = 1e-5, 1e-6


def launch(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``kiln train`` in a subprocess (it re-executes itself through torch.distributed.run)."""
    done = subprocess.run([sys.executable, "-m", "kiln", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def flags(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]


def records(run: Path, split: str | None = None) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split]


def weights(run: Path, step: int | None = None) -> dict:
    checkpoints = run / "checkpoints"
    path = ckpt.step_checkpoint_path(checkpoints, step) if step else ckpt.last_checkpoint(checkpoints)
    return load_file(str(path / "model.safetensors"))


def assert_same_training(a: Path, b: Path) -> None:
    """Weights after every step and every logged loss agree within RTOL; tokens exactly."""
    for step in range(1, 5):
        one, two = weights(a, step), weights(b, step)
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=RTOL, atol=ATOL, msg=f"step {step}: {key}")
    train_a, train_b = records(a), records(b)
    assert [r["step"] for r in train_a] == [r["step"] for r in train_b] == [1, 2, 3, 4]
    for x, y in zip(train_a, train_b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=RTOL)
        assert y["tokens"] == x["tokens"] and y["lr"] == x["lr"]
    for x, y in zip(records(a, "validation"), records(b, "validation"), strict=True):
        assert y["eval_loss"] == pytest.approx(x["eval_loss"], rel=RTOL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One start; one process accumulating 2; 2 processes with DDP; 2 processes with FSDP."""
    root = tmp_path_factory.mktemp("dist")
    (root / "tiny.yaml").write_text(TINY_PROFILE)
    data = root / "sentiment"
    data.mkdir()
    for name, rows in (("train.tsv", sentiment_rows(160, 1)), ("dev.tsv", sentiment_rows(40, 2))):
        (data / name).write_text("\n".join(["sentence\tlabel", *(f"{t}\t{label}" for t, label in rows)]) + "\n")
    env = {"KILN_CACHE": str(root / "cache")}
    os.environ.update(env)
    base = kiln.train("sequence", data, name="base", profile=str(root / "tiny.yaml"), max_steps=1,
                      output_dir=root / "runs")
    common = ["sequence", str(data), "--init", str(base.model_dir), "--output-dir", str(root / "runs"), "-q"]
    kiln.train("sequence", data, name="single", init=base.model_dir, output_dir=root / "runs",
               **{**SETTINGS, "train.grad_accum": 2})
    launch(*common, "-n", "ddp", "--nproc", "2", *flags(SETTINGS), env=env)
    launch(*common, "-n", "fsdp", "--nproc", "2", "--fsdp", "full", *flags(SETTINGS), env=env)
    frozen = {**SETTINGS, "optim.lr": 0.0, "train.max_steps": 2, "train.eval_every": 1}
    kiln.train("sequence", data, name="eval-1", init=base.model_dir, output_dir=root / "runs",
               **{**frozen, "train.grad_accum": 2})
    launch(*common, "-n", "eval-2", "--nproc", "2", *flags(frozen), env=env)
    return {"root": root, "data": data, **{name: root / "runs" / name for name in
                                           ("base", "single", "ddp", "fsdp", "eval-1", "eval-2")}}


def test_two_processes_train_like_one_accumulating_two(runs):
    assert_same_training(runs["single"], runs["ddp"])
    assert not torch.equal(weights(runs["ddp"])["classifier.weight"],
                           load_file(str(runs["base"] / "model" / "model.safetensors"))["classifier.weight"])
    meta = json.loads((runs["ddp"] / "model" / "kiln.json").read_text())
    assert meta["step"] in (2, 4)  # the best of the evaluations was exported, by rank 0 alone


def test_fsdp_trains_like_ddp(runs):
    assert_same_training(runs["ddp"], runs["fsdp"])
    # The export is a plain transformers model again (FSDP's sharded classes do not leak into it).
    config = json.loads((runs["fsdp"] / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]


def test_sharded_evaluation_equals_one_process_exactly(runs):
    one, two = records(runs["eval-1"], "validation"), records(runs["eval-2"], "validation")
    assert len(one) == len(two) == 2 and one == two


def test_a_run_saved_at_two_processes_resumes_at_one(runs, tmp_path):
    moved = tmp_path / "runs" / "ddp"
    shutil.copytree(runs["ddp"], moved)
    checkpoints = moved / "checkpoints"
    for step in (3, 4):  # as if the 2-process job had died after step 2
        shutil.rmtree(ckpt.step_checkpoint_path(checkpoints, step))
    shutil.rmtree(moved / "model")
    resumed = kiln.train("sequence", runs["data"], name="ddp", output_dir=tmp_path / "runs", resume=True)
    final, expected = weights(resumed.path), weights(runs["ddp"])
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=RTOL, atol=ATOL, msg=key)
    assert [r["step"] for r in records(moved)] == [1, 2, 3, 4]  # the log continued, no step twice
    state = json.loads((ckpt.last_checkpoint(checkpoints) / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["grad_accum"] == 2  # the global batch was kept


def test_fsdp_trains_a_masked_lm_with_tied_weights_like_one_process(runs, tmp_path):
    """BERT's MLM decoder shares the word embeddings: the tied pair stays in FSDP's root unit, and
    the sparse MLM head's backward finds its weights gathered. Equal to one process accumulating 2."""
    import random

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "film", "good", "bad", "plot", "cast", "scene", "end"]
    for name, count in (("train.txt", 300), ("valid.txt", 30)):
        (corpus / name).write_text("".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + "\n"
                                           for _ in range(count)))
    settings = {**SETTINGS, "train.batch_tokens": 256, "pretrain.seq_len": 32}
    kiln.train("mlm", corpus, name="mlm-1", profile=str(runs["root"] / "tiny.yaml"), output_dir=tmp_path,
               **{**settings, "train.grad_accum": 2})
    launch("mlm", str(corpus), "--profile", str(runs["root"] / "tiny.yaml"), "--output-dir", str(tmp_path), "-q",
           "-n", "mlm-2", "--nproc", "2", "--fsdp", "full", *flags(settings),
           env={"KILN_CACHE": str(runs["root"] / "cache")})
    assert_same_training(tmp_path / "mlm-1", tmp_path / "mlm-2")


def test_a_two_process_run_with_dropout_resumes_bit_identically(runs, tmp_path):
    """Each rank draws its own dropout masks: every rank's random state is saved and restored, so a
    2-process run cut back to step 2 and resumed ends with exactly the uninterrupted run's weights."""
    env = {"KILN_CACHE": str(runs["root"] / "cache")}
    launch("sequence", str(runs["data"]), "--init", str(runs["base"] / "model"), "--output-dir", str(tmp_path), "-q",
           "-n", "straight", "--nproc", "2", *flags({**SETTINGS, "train.dropout": 0.1}), env=env)
    cut = tmp_path / "cut" / "straight"
    shutil.copytree(tmp_path / "straight", cut)
    for step in (3, 4):
        shutil.rmtree(ckpt.step_checkpoint_path(cut / "checkpoints", step))
    shutil.rmtree(cut / "model")
    launch("sequence", str(runs["data"]), "-n", "straight", "--output-dir", str(cut.parent), "--resume", "-q",
           "--nproc", "2", env=env)
    final, expected = weights(cut), weights(tmp_path / "straight")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.parametrize(("extra", "message"), [
    (["-n", "x", "--auto-batch"], "--auto-batch splits micro-batches in one process only"),
    (["-n", "x", "-c", "train.seq_len=32"], "unknown setting 'train.seq_len' (did you mean pretrain.seq_len?)"),
    ([], "kiln train needs -n NAME"),
])
def test_a_launch_with_bad_settings_is_one_line_before_any_process_starts(extra, message, tiny_profile,
                                                                          sentiment_dir, tmp_path, capsys,
                                                                          monkeypatch):
    import kiln.cli.train
    from kiln.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(kiln.cli.train, "launch", lambda args: pytest.fail("processes were started"))
    code = main(["train", "sequence", str(sentiment_dir), "--profile", str(tiny_profile), "--output-dir",
                 str(tmp_path / "runs"), "--nproc", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "runs").exists()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_of_one_process_each_train_like_one_node_of_two(runs):
    """``--nnodes 2 --node-rank R --master-addr --master-port``, the two-machine command, here with
    both "machines" on this one: the run equals the 2-process run on one node."""
    node = ["sequence", str(runs["data"]), "--init", str(runs["base"] / "model"), "--output-dir",
            str(runs["root"] / "runs"), "-q", "-n", "two-nodes", "--nproc", "1", "--nnodes", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *flags(SETTINGS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILN_CACHE": str(runs["root"] / "cache")}
    nodes = [subprocess.Popen([sys.executable, "-m", "kiln", "train", *node, "--node-rank", str(rank)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for process in nodes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-4000:]
    assert_same_training(runs["ddp"], runs["root"] / "runs" / "two-nodes")


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_to_a_launch_stops_every_rank_with_a_checkpoint_and_exit_0(runs, signal_name):
    """SIGTERM (a scheduler) or Ctrl-C (SIGINT) to ``kiln train --nproc 2``: the workers stop at the
    same step with a checkpoint, and the launch exits 0 with the resume command, not torchrun's
    failure report."""
    import signal
    import time

    run = runs["root"] / "stopped" / signal_name
    command = [sys.executable, "-m", "kiln", "train", "sequence", str(runs["data"]), "--init",
               str(runs["base"] / "model"), "--output-dir", str(run.parent), "-n", run.name, "--nproc", "2",
               *flags({**SETTINGS, "train.max_steps": 100_000, "train.eval_every": 0, "train.save_every": "",
                       "train.epochs": 100_000})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILN_CACHE": str(runs["root"] / "cache")}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert launcher.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    launcher.send_signal(getattr(signal, signal_name))
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-4000:]
    assert "Traceback" not in err and "SignalException" not in err
    stopped = [line for line in err.splitlines() if line.startswith(f"kiln: {signal_name}: stopped at step ")]
    assert len(stopped) == 1 and stopped[0].endswith(f"--output-dir {run.parent} --resume --nproc 2")
    step = int(stopped[0].split("stopped at step ")[1].split()[0])
    checkpoint = ckpt.last_checkpoint(run / "checkpoints")
    ckpt.verify_checkpoint(checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == step and state["world_size"] == 2


@pytest.mark.slow
def test_two_process_runs_end_every_time(runs):
    """Closing the process group once deadlocked about one DDP run in ten (gloo's destructor joined a
    worker thread that waited for the GIL): 20 runs in a row must each end well within a minute."""
    common = ["sequence", str(runs["data"]), "--init", str(runs["base"] / "model"), "--output-dir",
              str(runs["root"] / "again"), "-q", "--nproc", "2", *flags(SETTINGS)]
    for attempt in range(20):
        launch(*common, "-n", f"ddp-{attempt}", env={"KILN_CACHE": str(runs["root"] / "cache")}, timeout=120)
        shutil.rmtree(runs["root"] / "again" / f"ddp-{attempt}")


def test_inference_shares_reassemble_one_process_exactly(tiny_profile, sentiment_dir, tmp_path):
    from kiln.predictor import Predictor
    from kiln.training.inference import run_inference_share

    run = kiln.train("sequence", sentiment_dir, name="r", profile=str(tiny_profile), max_steps=2,
                     output_dir=tmp_path)
    predictor = Predictor(run.model_dir, device="cpu")
    dataset = predictor.read(sentiment_dir / "dev.tsv", labelled=True)
    features = predictor.task.encode(dataset, predictor.tokenizer, 64)
    common = dict(device=torch.device("cpu"), precision="fp32", batch_tokens=64, max_batch_size=4, pad_id=0)
    whole, losses, units = run_inference_share(predictor.model, predictor.task, features, **common)
    assert len(losses) > 3  # several batches, so the shares differ
    merged, merged_losses, merged_units = [None] * len(features), {}, 0
    for rank in range(3):
        part, part_losses, part_units = run_inference_share(predictor.model, predictor.task, features,
                                                            share=(rank, 3), **common)
        for i, value in enumerate(part):
            if value is not None:
                assert merged[i] is None
                merged[i] = value
        merged_losses.update(part_losses)
        merged_units += part_units
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(merged, whole, strict=True))
    assert merged_losses == losses and merged_units == units


PEER = """
import sys, time
import torch
from kiln.training.distributed import strategy_for
strategy = strategy_for(torch.device("cpu"), timeout=float(sys.argv[1]))
if strategy.rank == 0:
    start = time.perf_counter()
    try:
        strategy.all_reduce([1.0])
        print("completed")
    except RuntimeError:
        print(f"failed after {time.perf_counter() - start:.1f}s")
else:
    time.sleep(12)  # a stuck peer: it never joins the collective
"""


def test_a_collective_a_peer_never_joins_fails_after_the_timeout(tmp_path):
    """``train.dist_timeout`` reaches the process group: rank 0 gives up on the stuck rank 1 after
    2 s (without it, it would wait until rank 1 exits, 12 s later)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", PEER, "2"], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    out, err = ranks[0].communicate(timeout=60)
    ranks[1].kill()
    assert out.startswith("failed after"), err[-2000:]
    assert float(out.split()[2].rstrip("s")) < 8


@pytest.mark.gpu
def test_ddp_and_fsdp_in_bf16_on_two_gpus(tiny_profile, sentiment_dir, tmp_path):
    """On CUDA (nccl), in bf16: DDP and FSDP (bf16 layers, fp32 reduction) train, export a model
    transformers loads, and agree to bf16's precision."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    settings = {**SETTINGS, "train.device": "auto", "train.precision": "bf16", "train.save_every": ""}
    common = ["sequence", str(sentiment_dir), "--profile", str(tiny_profile), "--output-dir", str(tmp_path), "-q",
              "--nproc", "2", *flags(settings)]
    launch(*common, "-n", "ddp", env={"OMP_NUM_THREADS": "4"})
    launch(*common, "-n", "fsdp", "--fsdp", "full", env={"OMP_NUM_THREADS": "4"})
    from transformers import AutoModelForSequenceClassification

    for name in ("ddp", "fsdp"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / name / "model")
        assert json.loads((tmp_path / name / "run.json").read_text())["precision"] == "bf16"
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp")
    for key in a:  # bf16 compute: agreement to about its 3 significant digits
        torch.testing.assert_close(b[key], a[key], rtol=2e-2, atol=2e-3, msg=key)
