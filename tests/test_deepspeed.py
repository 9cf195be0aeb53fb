"""``kiln train --deepspeed``: every DeepSpeed key is mapped, kept as kiln's ("auto"), listed as not
used, or refused in one line; a mapped file gives the same run as the equivalent explicit flags."""

import json
import subprocess
import sys

import pytest

from kiln.cli import main
from kiln.deepspeed import launch_world_size, merge_deepspeed, settings_from_deepspeed
from kiln.errors import KilnError

# The ZeRO-3 example of the HF DeepSpeed docs, with bf16 (every value HF fills in is "auto").
HF_ZERO3 = {
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR",
                  "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


def write(tmp_path, config, name="ds_config.json"):
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=2))
    return path


def mapped(tmp_path, config, world_size=1):
    return settings_from_deepspeed(write(tmp_path, config), world_size)


def refused(tmp_path, config, world_size=1):
    """The one-line error, checked to name the file and (when given) the line."""
    path = write(tmp_path, config)
    with pytest.raises(KilnError) as err:
        settings_from_deepspeed(path, world_size)
    message = str(err.value)
    assert message.startswith(f"{path}:") and "\n" not in message
    return message


@pytest.mark.parametrize(("stage", "fsdp"), [(0, ""), (1, "grad-op"), (2, "grad-op"), (3, "full")])
def test_zero_stage(tmp_path, stage, fsdp):
    settings, lines = mapped(tmp_path, {"zero_optimization": {"stage": stage}})
    assert settings == {"train.fsdp": fsdp}
    if stage == 1:  # honoured, not refused: FSDP shards more than stage 1 asks, which only saves memory
        assert "FSDP shards gradients too" in lines[0]
    assert lines[0].startswith(f"deepspeed: zero_optimization.stage {stage} → ")


def test_offload(tmp_path):
    zero = {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    settings, lines = mapped(tmp_path, {"zero_optimization": zero})
    assert settings == {"train.fsdp": "grad-op", "train.cpu_offload": True}
    assert "deepspeed: zero_optimization.offload_optimizer.device \"cpu\" → --cpu-offload" in "\n".join(lines)
    assert any("not used: zero_optimization.offload_optimizer.pin_memory" in line for line in lines)
    settings, _ = mapped(tmp_path, {"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}})
    assert settings == {"train.fsdp": "full"}
    # DeepSpeed offloads parameters at stage 3 only: at stage 2 the key does nothing, and says so
    settings, lines = mapped(tmp_path, {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})
    assert "train.cpu_offload" not in settings
    assert any("zero_optimization.offload_param.device (DeepSpeed offloads parameters at stage 3" in line
               for line in lines)


def test_refusals_name_the_key_and_its_line(tmp_path):
    message = refused(tmp_path, {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})
    assert ":5: zero_optimization.offload_param.device: \"nvme\": kiln offloads to CPU memory only" in message
    assert "zero_optimization.offload_optimizer.device: offloading needs ZeRO stage 1, 2 or 3" in refused(
        tmp_path, {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}})
    assert ":2: bogus_key: not a DeepSpeed setting kiln knows" in refused(tmp_path, {"bogus_key": 1})
    assert "zero_optimization.stage3_shiny: not a ZeRO setting" in refused(
        tmp_path, {"zero_optimization": {"stage": 3, "stage3_shiny": 1}})
    assert "optimizer.type: \"OneBitAdam\": kiln maps Adam, AdamW and RAdam" in refused(
        tmp_path, {"optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}})
    assert "fp16.loss_scale: 128: kiln's fp16 loss scale is dynamic" in refused(
        tmp_path, {"fp16": {"enabled": True, "loss_scale": 128}})
    assert "scheduler.type: \"OneCycle\"" in refused(tmp_path, {"scheduler": {"type": "OneCycle", "params": {}}})
    assert "pipeline: kiln has no pipeline parallelism" in refused(tmp_path, {"pipeline": {"stages": 2}})
    assert "zero_optimization.zero_quantized_gradients: quantized communication changes results" in refused(
        tmp_path, {"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}})
    assert "gradient_clipping: -1: setting 'train.grad_clip' must be at least 0" in refused(
        tmp_path, {"gradient_clipping": -1})


def test_bad_json_names_the_line(tmp_path):
    assert ":3: not valid JSON" in refused(tmp_path, '{\n  "train_micro_batch_size_per_gpu": 8,\n}\n')
    assert "key 'stage' appears twice" in refused(tmp_path, '{"zero_optimization": {"stage": 2, "stage": 3}}')
    assert "a DeepSpeed config is a JSON object, found list" in refused(tmp_path, "[1, 2]")
    with pytest.raises(KilnError, match="file not found"):
        settings_from_deepspeed(tmp_path / "absent.json")


@pytest.mark.parametrize(("blocks", "precision"), [
    ({"bf16": {"enabled": True}}, "bf16"),
    ({"bfloat16": {"enabled": True}}, "bf16"),  # the old name
    ({"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}, "fp16"),
    ({"fp16": {"enabled": False}, "bf16": {"enabled": False}}, "fp32"),  # DeepSpeed's default: fp32
    ({"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}, None),
])
def test_precision(tmp_path, blocks, precision):
    settings, lines = mapped(tmp_path, blocks)
    assert settings.get("train.precision") == precision
    if precision is None:
        assert "\"auto\", so kiln's own settings stand: bf16.enabled and fp16.enabled (train.precision)" in lines[-1]


def test_precision_refusals(tmp_path):
    assert "bf16 and fp16 are both enabled" in refused(tmp_path, {"bf16": {"enabled": True},
                                                                  "fp16": {"enabled": True}})
    # a fixed scale with fp16 on "auto" would apply whenever kiln's own precision picks fp16
    assert "fp16.loss_scale" in refused(tmp_path, {"fp16": {"enabled": "auto", "loss_scale": 1024}})


@pytest.mark.parametrize(("config", "world_size", "micro", "accum"), [
    ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 1, 8, 4),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 2, 8, 4),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, 2, 8, 4),  # accumulation derived
    ({"train_batch_size": 64, "gradient_accumulation_steps": 2}, 4, 8, 2),  # micro-batch derived
    ({"train_batch_size": 32}, 4, 8, 1),  # as DeepSpeed: no accumulation, the rest per process
])
def test_batch_sizes(tmp_path, config, world_size, micro, accum):
    settings, lines = mapped(tmp_path, config, world_size)
    assert settings == {"train.batch_size": micro, "train.grad_accum": accum}
    if "train_batch_size" in config:
        assert any(f"= {micro} per micro-batch × {accum} accumulated × {world_size} process" in line
                   for line in lines)


def test_inconsistent_batch_sizes_are_refused(tmp_path):
    config = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}
    message = refused(tmp_path, config, world_size=1)
    assert ":2: train_batch_size: 64 is not train_micro_batch_size_per_gpu 8 × gradient_accumulation_steps 4" \
           " × 1 process = 32" in message
    assert "64 is not a whole multiple of train_micro_batch_size_per_gpu 12 × 1 process" in refused(
        tmp_path, {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 12})
    assert "not \"auto\"" in refused(tmp_path, {"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto"})


def test_world_size_prefers_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch_world_size() == 1 and launch_world_size(4, "2") == 8 and launch_world_size(4, "2:2") == 8
    assert launch_world_size(4, "1:4") is None  # elastic: known once torchrun starts the workers
    with pytest.raises(KilnError, match="--nnodes must be a number or a range MIN:MAX"):
        launch_world_size(4, "two")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert launch_world_size(4, "2") == 16


def test_an_elastic_launcher_leaves_train_batch_size_to_the_workers(tmp_path):
    config = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}
    settings, lines = mapped(tmp_path, config, world_size=None)
    assert settings == {"train.batch_size": 8} and "train_batch_size (checked once the processes start" in lines[-1]


def test_a_launch_refuses_before_any_process_starts(tmp_path, tiny_profile, sentiment_dir, capsys, monkeypatch):
    import kiln.cli.train

    launched = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(kiln.cli.train, "launch", lambda args: launched.append(args) or 0)
    config = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}
    path = write(tmp_path, config)
    command = ["train", "sequence", str(sentiment_dir), "-n", "ds", "--profile", str(tiny_profile),
               "--output-dir", str(tmp_path / "runs"), "--deepspeed", str(path)]
    assert main([*command, "--nproc", "2"]) == 2  # 8 × 2 × 2 processes is 32, not 64
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:2: train_batch_size: 64 is not") and len(err.strip().splitlines()) == 1
    assert not launched and not (tmp_path / "runs").exists()
    assert main([*command, "--nproc", "2", "--nnodes", "2"]) == 0  # 8 × 2 × 4: the workers start
    assert len(launched) == 1 and "deepspeed:" not in capsys.readouterr().err  # rank 0 prints the mapping


@pytest.mark.parametrize(("optimizer", "expected"), [
    ({"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1}},
     {"optim.name": "adamw", "optim.lr": 3e-4, "optim.betas": [0.9, 0.95], "optim.eps": 1e-6,
      "optim.weight_decay": 0.1}),
    # DeepSpeed's "Adam" decouples weight decay unless adam_w_mode is false; "AdamW" always does
    ({"type": "Adam", "params": {"lr": 1e-4}}, {"optim.name": "adamw"}),
    ({"type": "Adam", "params": {"adam_w_mode": False}}, {"optim.name": "adam"}),
    ({"type": "AdamW", "params": {"adam_w_mode": False}}, {"optim.name": "adamw"}),
    # omitted parameters are DeepSpeed's (FusedAdam's) defaults, not kiln's
    ({"type": "AdamW"}, {"optim.lr": 1e-3, "optim.betas": [0.9, 0.999], "optim.eps": 1e-8, "optim.weight_decay": 0}),
    ({"type": "RAdam", "params": {"lr": 2e-3}}, {"optim.name": "radam", "optim.lr": 2e-3}),
])
def test_optimizer(tmp_path, optimizer, expected):
    settings, _ = mapped(tmp_path, {"optimizer": optimizer})
    assert {key: settings[key] for key in expected} == expected


@pytest.mark.parametrize(("scheduler", "expected"), [
    ({"type": "WarmupLR", "params": {"warmup_num_steps": 100, "warmup_max_lr": 1e-3, "warmup_type": "linear"}},
     {"schedule.name": "constant", "schedule.warmup_steps": 100, "optim.lr": 1e-3}),
    ({"type": "WarmupDecayLR", "params": {"warmup_num_steps": 0, "total_num_steps": 500, "warmup_max_lr": 2e-4}},
     {"schedule.name": "linear", "schedule.warmup_steps": 0, "schedule.warmup_ratio": 0.0, "train.max_steps": 500,
      "optim.lr": 2e-4}),
    ({"type": "WarmupCosineLR", "params": {"warmup_num_steps": 50, "total_num_steps": "auto"}},
     {"schedule.name": "cosine", "schedule.warmup_steps": 50}),
])
def test_scheduler(tmp_path, scheduler, expected):
    settings, lines = mapped(tmp_path, {"scheduler": scheduler})
    assert settings == expected
    if scheduler["type"] == "WarmupCosineLR":  # DeepSpeed's log-shaped warmup and cosine floor are named
        assert any("kiln has no log-shaped warmup" in line for line in lines)
        assert any("scheduler.params.cos_min_ratio (kiln's cosine ends at 0" in line for line in lines)


def test_scheduler_refusals(tmp_path):
    assert "scheduler.params.warmup_min_lr: 1e-05: kiln warms up from 0" in refused(
        tmp_path, {"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-5}}})
    assert "cos_min_ratio: 0.1: kiln's cosine decays to 0" in refused(
        tmp_path, {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "cos_min_ratio": 0.1}}})
    # WarmupLR sets the lr itself: a peak unlike the optimizer's lr would train at the former
    assert "warmup_max_lr: absent: DeepSpeed's default 0.001, but optimizer.params.lr is 3e-05" in refused(
        tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 3e-5}}, "scheduler": {"type": "WarmupLR"}})
    assert "total_num_steps: WarmupDecayLR needs it" in refused(
        tmp_path, {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}})


def test_activation_checkpointing(tmp_path):
    settings, lines = mapped(tmp_path, {"activation_checkpointing": {"partition_activations": True,
                                                                     "contiguous_memory_optimization": False,
                                                                     "profile": False}})
    assert settings == {"train.grad_checkpoint": True}
    assert lines[0].startswith("deepspeed: activation_checkpointing {\"partition_activations\": true} → "
                               "--grad-checkpoint")
    settings, lines = mapped(tmp_path, {"activation_checkpointing": {"partition_activations": False}})
    assert settings == {} and "activation_checkpointing (every switch in it is off)" in lines[-1]


def test_hf_zero3_offload_bf16_example(tmp_path):
    settings, lines = mapped(tmp_path, HF_ZERO3)
    # "auto" keeps kiln's own values: only what the file fixes is mapped
    assert settings == {"train.fsdp": "full", "train.cpu_offload": True, "optim.name": "adamw",
                        "schedule.name": "constant"}
    text = "\n".join(lines)
    for key in ("bf16.enabled (train.precision)", "optimizer.params.lr (optim.lr)", "train_batch_size",
                "gradient_clipping (train.grad_clip)", "scheduler.params.warmup_num_steps"):
        assert key in text.split("kiln's own settings stand: ")[1].split("\n")[0], key
    for key in ("zero_optimization.overlap_comm", "zero_optimization.stage3_prefetch_bucket_size",
                "zero_optimization.sub_group_size", "steps_per_print", "wall_clock_breakdown",
                "zero_optimization.stage3_gather_16bit_weights_on_model_save"):
        assert any(line.startswith("deepspeed: not used: ") and key in line for line in lines), key
    assert any("FSDP2 sizes its own buckets" in line for line in lines)


def test_disabled_features_are_listed_not_refused(tmp_path):
    settings, lines = mapped(tmp_path, {"progressive_layer_drop": {"enabled": False}, "amp": {"enabled": False}})
    assert settings == {} and lines == ["deepspeed: not used: progressive_layer_drop, amp (enabled: false)"]


def test_explicit_flags_must_agree(tmp_path):
    path = write(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                            "train_micro_batch_size_per_gpu": 8})
    flags = {"optim.lr": None, "train.batch_size": None, "train.batch_tokens": None}
    merged, _ = merge_deepspeed(path, {**flags, "optim.lr": 0.001})  # equal: fine
    assert merged["optim.lr"] == 0.001 and merged["train.batch_size"] == 8
    with pytest.raises(KilnError) as err:
        merge_deepspeed(path, {**flags, "optim.lr": 3e-4})
    assert str(err.value).startswith(f"{path}:5: optimizer.params.lr: means --lr 0.001, which conflicts with "
                                     "--lr 0.0003 (optim.lr)")
    with pytest.raises(KilnError, match=r"conflicts with -c optim.lr=2e-3"):
        merge_deepspeed(path, flags, ["optim.lr=2e-3"])
    with pytest.raises(KilnError, match=r"conflicts with --batch-tokens 4096: kiln batches either by examples"):
        merge_deepspeed(path, {**flags, "train.batch_tokens": 4096})
    # a DeepSpeed default for an omitted parameter gives way to an explicit flag, and says so
    merged, lines = merge_deepspeed(path, {**flags, "optim.weight_decay": 0.1})
    assert merged["optim.weight_decay"] == 0.1
    assert ("deepspeed: optimizer.params.weight_decay is absent; -c optim.weight_decay=0.1 stands over "
            "DeepSpeed's default 0.0") in lines


def test_cli_refusal_is_one_line_before_anything_is_written(tmp_path, tiny_profile, sentiment_dir, capsys):
    path = write(tmp_path, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})
    code = main(["train", "sequence", str(sentiment_dir), "-n", "ds", "--profile", str(tiny_profile),
                 "--output-dir", str(tmp_path / "runs"), "--deepspeed", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"{path}:5: zero_optimization.offload_optimizer.device")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_print_config_equals_the_explicit_flags(tmp_path, tiny_profile, capsys, monkeypatch):
    """The canonical ZeRO-3 + offload + bf16 file with numbers instead of "auto", on 2 processes."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = {**HF_ZERO3, "bf16": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.9, 0.98], "eps": 1e-6,
                                                        "weight_decay": 0.01}},
              "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 100, "total_num_steps": 1000,
                                                                 "warmup_type": "linear", "cos_min_ratio": 0}},
              "activation_checkpointing": {"partition_activations": True},
              "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "gradient_clipping": 0.5}
    common = ["train", "sequence", "unused", "--profile", str(tiny_profile), "--print-config"]
    assert main([*common, "--nproc", "2", "--deepspeed", str(write(tmp_path, config))]) == 0
    through_deepspeed = capsys.readouterr()
    assert main([*common, "--fsdp", "full", "--cpu-offload", "--precision", "bf16", "--batch-size", "4",
                 "--grad-accum", "2", "--lr", "3e-5", "--max-steps", "1000", "--grad-checkpoint",
                 "-c", "train.grad_clip=0.5", "-c", "optim.name=adamw", "-c", "optim.betas=[0.9, 0.98]",
                 "-c", "optim.eps=1e-6", "-c", "optim.weight_decay=0.01", "-c", "schedule.name=cosine",
                 "-c", "schedule.warmup_steps=100"]) == 0
    explicit = capsys.readouterr()
    assert through_deepspeed.out == explicit.out
    assert "deepspeed: zero_optimization.stage 3 → --fsdp full" in through_deepspeed.err


def test_a_stage0_run_matches_the_explicit_flags_bit_for_bit(tmp_path, tiny_profile, sentiment_dir):
    from safetensors.torch import load_file

    config = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}, "fp16": {"enabled": False},
              "train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
              "gradient_clipping": 0.5,
              "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.98], "eps": 1e-6,
                                                        "weight_decay": 0.05}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 2e-3,
                                                                "warmup_num_steps": 2, "total_num_steps": 6,
                                                                "warmup_type": "linear"}},
              "steps_per_print": 10}
    common = ["train", "sequence", str(sentiment_dir), "--profile", str(tiny_profile),
              "--output-dir", str(tmp_path / "runs")]
    assert main([*common, "-n", "deepspeed", "--deepspeed", str(write(tmp_path, config))]) == 0
    assert main([*common, "-n", "explicit", "--precision", "fp32", "--batch-size", "8", "--grad-accum", "2",
                 "--lr", "2e-3", "--max-steps", "6", "-c", "train.fsdp=", "-c", "train.grad_clip=0.5",
                 "-c", "optim.name=adamw", "-c", "optim.betas=[0.9, 0.98]", "-c", "optim.eps=1e-6",
                 "-c", "optim.weight_decay=0.05", "-c", "schedule.name=linear",
                 "-c", "schedule.warmup_steps=2"]) == 0
    runs = tmp_path / "runs"
    assert (runs / "deepspeed" / "config.yaml").read_text() == (runs / "explicit" / "config.yaml").read_text()
    a = load_file(str(runs / "deepspeed" / "model" / "model.safetensors"))
    b = load_file(str(runs / "explicit" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[key].equal(b[key]) for key in a)


def test_help_lists_deepspeed_and_stays_light():
    # CPU time, not wall time: what kiln costs, whatever else the machine is running
    code = ("import sys, time; t = time.process_time(); import kiln.deepspeed; from kiln.cli import build_parser; "
            "text = build_parser()._subparsers._group_actions[0].choices['train'].format_help(); "
            "assert '--deepspeed FILE' in text, text; assert 'torch' not in sys.modules; "
            "print(time.process_time() - t)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 0.5
