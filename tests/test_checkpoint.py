"""Checkpoints survive a kill at any instant: manifests, numbered checkpoints, pruning, a full disk."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.files import exchange_dirs, umask
from kiln.training import checkpoint as ckpt

META = {"task": "sequence", "task_state": {}, "max_length": 64, "config": {}}


@pytest.fixture(scope="module")
def tiny() -> tuple:
    """A 2-layer, 32-wide BERT classifier, a word-level tokenizer, and an AdamW with state."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64))
    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "great", "dull"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[2, 4, 3]]), labels=torch.tensor([1])).loss.backward()
    optimizer.step()  # so that the optimizer has moment tensors to save
    return model, tokenizer, optimizer


def save(tiny: tuple, checkpoints: Path, step: int) -> Path:
    """A step checkpoint as the trainer writes one (with optimizer and RNG state)."""
    import torch

    model, tokenizer, optimizer = tiny
    path = ckpt.step_checkpoint_path(checkpoints, step)
    ckpt.save_checkpoint(path, model, tokenizer, {**META, "step": step}, optimizer=optimizer,
                         trainer_state={"step": step}, rng={"torch": torch.get_rng_state()})
    return path


@pytest.fixture(scope="module")
def template(tiny: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoints/ with step-00000100, -200, -300 and best, saved once and copied by each test."""
    checkpoints = tmp_path_factory.mktemp("template") / "checkpoints"
    for step in (100, 200, 300):
        save(tiny, checkpoints, step)
    model, tokenizer, _ = tiny
    ckpt.save_checkpoint(checkpoints / "best", model, tokenizer, {**META, "step": 200}, trainer_state={"step": 200})
    return checkpoints


@pytest.fixture
def checkpoints(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "run" / "checkpoints"))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def leftovers(checkpoints: Path) -> list[str]:
    return sorted(path.name for path in checkpoints.iterdir() if path.name.startswith("."))


def modes(directory: Path) -> set[int]:
    return {stat.S_IMODE(path.stat().st_mode) for path in directory.iterdir()}


def flip_last_byte(path: Path) -> None:
    """Damage inside the tensor data: the safetensors header and length still check out."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_save_writes_a_manifest_whose_hashes_match(checkpoints):
    newest = checkpoints / "step-00000300"
    assert ckpt.step_checkpoint_path(checkpoints, 300) == newest
    manifest = json.loads((newest / ckpt.MANIFEST_FILE).read_text())
    on_disk = {path.name for path in newest.iterdir()} - {ckpt.MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk >= {ckpt.WEIGHTS_FILE, ckpt.OPTIMIZER_FILE, ckpt.STATE_FILE,
                                                 ckpt.KILN_FILE, "config.json", "tokenizer.json"}
    for name, entry in manifest["files"].items():
        data = (newest / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.last_checkpoint(checkpoints) == newest
    assert ckpt.last_checkpoint(checkpoints, "best") == checkpoints / "best"
    ckpt.verify_manifest(checkpoints / "best")  # best is written the same verified way
    assert modes(newest) == {0o666 & ~umask()}  # not safetensors' 0600: a service account reads a model
    assert leftovers(checkpoints) == []


@pytest.mark.parametrize("damage, reason", [
    (lambda path: flip_last_byte(path / ckpt.WEIGHTS_FILE), "model.safetensors: sha256 mismatch"),
    (lambda path: flip_last_byte(path / ckpt.OPTIMIZER_FILE), "optimizer.safetensors: sha256 mismatch"),
    (lambda path: os.truncate(path / ckpt.WEIGHTS_FILE, 1000), "model.safetensors: 1000 bytes, manifest.json says"),
    (lambda path: (path / ckpt.MANIFEST_FILE).unlink(), "manifest.json: file not found: the checkpoint was not "
                                                         "completely written"),
], ids=["weights-byte", "optimizer-byte", "truncated", "no-manifest"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(damage, reason, checkpoints, caplog):
    newest, previous = checkpoints / "step-00000300", checkpoints / "step-00000200"
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        assert ckpt.last_checkpoint(checkpoints) == previous
    assert f"{newest} is damaged ({reason}" in caplog.text
    assert f"); using {previous} instead" in caplog.text
    with pytest.raises(KilnError) as raised:
        ckpt.verify_checkpoint(newest)
    assert Path(raised.value.path).parent == newest and "\n" not in str(raised.value)


def test_state_dicts_round_trip(tiny, tmp_path):
    """What FSDP hands over: the full weights and the optimizer's state dict instead of the objects."""
    import torch
    from safetensors.torch import load_file

    model, tokenizer, optimizer = tiny
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    weights["classifier.bias"] += 1.0  # so that the file shows which weights were written
    bias = weights["classifier.bias"].clone()  # save_pretrained empties the dict as it writes
    path = ckpt.step_checkpoint_path(tmp_path, 7)
    ckpt.save_checkpoint(path, model, tokenizer, {**META, "step": 7}, optimizer=optimizer.state_dict(),
                         trainer_state={"step": 7}, weights=weights)
    assert torch.equal(load_file(path / ckpt.WEIGHTS_FILE)["classifier.bias"], bias)
    state, tensors, _ = ckpt.load_checkpoint_state(path)
    restored = ckpt.optimizer_state_dict(tensors, state["optimizer"])
    expected = optimizer.state_dict()
    assert restored["param_groups"] == json.loads(json.dumps(expected["param_groups"]))  # tuples become lists
    for index, entry in expected["state"].items():
        assert all(torch.equal(torch.as_tensor(restored["state"][index][key]), torch.as_tensor(value))
                   for key, value in entry.items())


def test_verify_manifest_names_the_damaged_file(checkpoints):
    flip_last_byte(checkpoints / "best" / ckpt.WEIGHTS_FILE)
    with pytest.raises(KilnError, match="sha256 mismatch; the file is damaged") as raised:
        ckpt.verify_manifest(checkpoints / "best")
    assert raised.value.path == str(checkpoints / "best" / ckpt.WEIGHTS_FILE)
    # best is not skipped (exporting another model instead would be a quiet surprise): it is found,
    # and the caller's verify_checkpoint, as on --resume, is the error naming the file.
    assert ckpt.last_checkpoint(checkpoints, "best") == checkpoints / "best"
    with pytest.raises(KilnError, match="sha256 mismatch"):
        ckpt.verify_checkpoint(checkpoints / "best")


def test_no_checkpoint_that_verifies_is_none(checkpoints, caplog):
    for step in (100, 200, 300):
        flip_last_byte(ckpt.step_checkpoint_path(checkpoints, step) / ckpt.WEIGHTS_FILE)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        assert ckpt.last_checkpoint(checkpoints) is None
    assert f"{checkpoints / 'step-00000100'} is damaged" in caplog.text
    assert "no other checkpoint verifies" in caplog.text
    with pytest.raises(KilnError, match="sha256 mismatch") as raised:  # --resume must not quietly start over
        ckpt.last_checkpoint(checkpoints, strict=True)
    assert raised.value.path == str(checkpoints / "step-00000300" / ckpt.WEIGHTS_FILE)
    assert ckpt.last_checkpoint(checkpoints.parent / "nothing-here", strict=True) is None


def test_prune_keeps_the_newest_k_and_best_and_nothing_else_is_touched(checkpoints):
    (checkpoints / "notes.txt").write_text("mine")
    (checkpoints / "step-final").mkdir()  # not a name kiln writes
    (checkpoints / ".step-00000050.tmp-dead").mkdir()  # left by a kill mid-save
    ckpt.prune_checkpoints(checkpoints, keep_last=2)
    assert sorted(path.name for path in checkpoints.iterdir()) == [
        "best", "notes.txt", "step-00000200", "step-00000300", "step-final"]
    ckpt.prune_checkpoints(checkpoints, keep_last=1)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best", "notes.txt", "step-00000300", "step-final"]
    with pytest.raises(ValueError, match="at least 1"):
        ckpt.prune_checkpoints(checkpoints, keep_last=0)


def test_prune_counts_only_good_checkpoints(checkpoints):
    flip_last_byte(checkpoints / "step-00000300" / ckpt.WEIGHTS_FILE)
    ckpt.prune_checkpoints(checkpoints, keep_last=1)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best", "step-00000200"]
    flip_last_byte(checkpoints / "step-00000200" / ckpt.WEIGHTS_FILE)
    ckpt.prune_checkpoints(checkpoints, keep_last=1)  # none verifies: nothing is deleted
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best", "step-00000200"]


def test_prune_trusts_the_checkpoints_this_process_wrote_without_hashing_them(checkpoints, monkeypatch):
    newest = checkpoints / "step-00000300"
    hashed = []
    real_verify = ckpt.verify_checkpoint
    monkeypatch.setattr(ckpt, "verify_checkpoint", lambda path: hashed.append(path.name) or real_verify(path))
    ckpt.prune_checkpoints(checkpoints, keep_last=2, written={newest})
    assert hashed == ["step-00000200"]  # only the one this process did not write
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best", "step-00000200", "step-00000300"]


@pytest.mark.parametrize("error, needle", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk full while writing checkpoint {new}; the previous "
                                                       "checkpoint {previous} is intact"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk full while writing checkpoint {new}; "),
    (OSError(errno.EACCES, "Permission denied"), "{new}: could not write the checkpoint (Permission denied); "
                                                 "the previous checkpoint {previous} is intact"),
    (KeyboardInterrupt(), None),
], ids=["enospc", "edquot", "eacces", "ctrl-c"])
def test_a_failed_write_keeps_the_previous_checkpoint(error, needle, tiny, checkpoints, monkeypatch):
    import safetensors.torch

    previous = checkpoints / "step-00000300"
    before = snapshot(previous)
    real = safetensors.torch.save_file

    def fails_half_way(tensors, filename, *args, **kwargs):  # the optimizer's file, after the model's
        real(tensors, filename, *args, **kwargs)
        os.truncate(filename, 100)
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", fails_half_way)
    new = checkpoints / "step-00000400"
    with pytest.raises(type(error) if needle is None else KilnError) as raised:
        save(tiny, checkpoints, 400)
    if needle is not None:
        assert str(raised.value) == str(raised.value).splitlines()[0]
        assert needle.format(new=new, previous=previous) in str(raised.value)
    assert not new.exists() and leftovers(checkpoints) == []
    assert snapshot(previous) == before
    assert ckpt.last_checkpoint(checkpoints) == previous


def test_a_full_disk_keeps_the_previous_checkpoint(tiny, tmp_path):
    """A real 1 MiB tmpfs, filled so that the model's weights, then the optimizer's state, find no
    room (safetensors reports that as its own error, not an OSError)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root in a container that allows it is needed): "
                    f"{mounted.stderr.strip()}")
    try:
        checkpoints = disk / "checkpoints"
        previous = save(tiny, checkpoints, 100)
        before = snapshot(previous)
        weights = (previous / ckpt.WEIGHTS_FILE).stat().st_size
        for headroom in (16 * 1024, weights + 64 * 1024):
            stat = os.statvfs(disk)
            (disk / "filler").write_bytes(bytes(stat.f_bavail * stat.f_frsize - headroom))
            with pytest.raises(KilnError, match=f"disk full while writing checkpoint {checkpoints / 'step-00000200'}; "
                                                f"the previous checkpoint {previous} is intact"):
                save(tiny, checkpoints, 200)
            (disk / "filler").unlink()
            assert sorted(path.name for path in checkpoints.iterdir()) == ["step-00000100"]
            assert snapshot(previous) == before
        assert save(tiny, checkpoints, 200) == ckpt.last_checkpoint(checkpoints)  # with room, it saves
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_the_next_save_removes_stale_temporaries(tiny, checkpoints):
    (checkpoints / ".step-00000250.tmp-dead").mkdir()  # SIGKILL mid-write
    (checkpoints / ".step-00000250.tmp-dead" / ckpt.WEIGHTS_FILE).write_bytes(b"half")
    (checkpoints / ".step-00000300.old").mkdir()  # a kill after a re-save of step 300 was in place
    (checkpoints / ".best.tmp-dead").mkdir()  # only a save of best cleans those
    save(tiny, checkpoints, 400)
    assert leftovers(checkpoints) == [".best.tmp-dead"]


def test_a_save_cut_off_between_two_renames_falls_back_to_the_old_directory(tiny, checkpoints, monkeypatch):
    # Where the file system cannot exchange two directories, replacing step-N is two renames; a
    # kill between them leaves only .step-N.old, which is then the one to resume from.
    (checkpoints / "step-00000300").rename(checkpoints / ".step-00000300.old")
    assert ckpt.last_checkpoint(checkpoints) == checkpoints / ".step-00000300.old"
    monkeypatch.setattr(ckpt, "exchange_dirs", lambda first, second: False)
    save(tiny, checkpoints, 300)  # the same step again: replaces it
    assert ckpt.last_checkpoint(checkpoints) == checkpoints / "step-00000300" and leftovers(checkpoints) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_atomic_dir_replaces_a_directory(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(ckpt, "exchange_dirs", lambda first, second: False)
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    tmp, commit = ckpt.atomic_dir(target)
    (tmp / "new.txt").write_text("new")
    (tmp / "model.safetensors").write_bytes(b"")
    (tmp / "model.safetensors").chmod(0o600)  # as safetensors writes it
    commit()
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
    assert sorted(path.name for path in target.iterdir()) == ["model.safetensors", "new.txt"]
    assert modes(target) == {0o666 & ~umask()}


def test_exchange_swaps_two_directories_in_one_step(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "a").write_text("a")
    if not exchange_dirs(first, second):
        pytest.skip("this platform or file system cannot exchange two directories (two renames are used)")
    assert [path.name for path in second.iterdir()] == ["a"] and not any(first.iterdir())


def test_the_legacy_last_layout_is_still_found(checkpoints):
    # kiln before numbered checkpoints wrote checkpoints/last, without a manifest.
    for path in checkpoints.glob("step-*"):
        if path.name != "step-00000300":
            shutil.rmtree(path)
    (checkpoints / "step-00000300").rename(checkpoints / "last")
    (checkpoints / "last" / ckpt.MANIFEST_FILE).unlink()
    (checkpoints / "best" / ckpt.MANIFEST_FILE).unlink()
    assert ckpt.last_checkpoint(checkpoints) == checkpoints / "last"
    assert ckpt.last_checkpoint(checkpoints, "best") == checkpoints / "best"
    ckpt.prune_checkpoints(checkpoints, keep_last=1)  # not a step checkpoint: left alone
    (checkpoints / "last").rename(checkpoints / ".last.old")  # a crash between its two renames
    assert ckpt.last_checkpoint(checkpoints) == checkpoints / ".last.old"
    # Checked as before: found, and a damaged file is the caller's error, not skipped.
    (checkpoints / ".last.old" / ckpt.WEIGHTS_FILE).write_bytes(b"not a model" * 10)
    assert ckpt.last_checkpoint(checkpoints) == checkpoints / ".last.old"
    with pytest.raises(KilnError, match="not a safetensors file"):
        ckpt.verify_checkpoint(checkpoints / ".last.old")


def test_new_dir_replaces_nothing_and_removes_only_its_own(tmp_path):
    """A user's -o: the rename takes an empty directory's place; a target with files by then is refused
    and kept; siblings named like kiln's leftovers are not cleaned up (they may be the user's)."""
    from kiln.files import new_dir

    lookalikes = [tmp_path / ".out.old", tmp_path / ".out.tmp-mine"]
    for path in lookalikes:
        path.mkdir()
        (path / "keep.txt").write_text("mine\n")
    (tmp_path / "out").mkdir()  # empty: may be replaced
    tmp, commit = new_dir(tmp_path / "out")
    (tmp / "model.onnx").write_text("graph\n")
    commit()
    assert (tmp_path / "out" / "model.onnx").read_text() == "graph\n" and not tmp.exists()
    assert all((path / "keep.txt").read_text() == "mine\n" for path in lookalikes)

    tmp, commit = new_dir(tmp_path / "taken")
    (tmp / "model.onnx").write_text("graph\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "user.txt").write_text("written meanwhile\n")
    with pytest.raises(KilnError, match="not empty"):
        commit()
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["user.txt"]
