"""``kiln train --deepspeed ds_config.json``: read a DeepSpeed config, as HF Trainer users keep
them, and map what it can onto kiln's own settings.

kiln shards with FSDP2, not DeepSpeed, so the file is translated, never handed to DeepSpeed. Every
key in it is accounted for, in one of four ways:

- mapped onto a kiln setting (a ZeRO stage onto ``train.fsdp``, ``bf16`` onto ``train.precision``...);
- ``"auto"``: kiln's own value stands, as HF Trainer fills ``"auto"`` from its own arguments;
- not used: a knob that changes speed or memory but not results (bucket sizes, prefetching,
  logging), listed in the lines printed;
- refused, in one line naming the file and the key, when kiln cannot honour it (NVMe offload, a
  fixed fp16 loss scale, an optimizer kiln lacks, an unknown key).

A key absent from the file leaves kiln's setting alone, except inside an ``optimizer`` or
``scheduler`` block: DeepSpeed builds those from its own defaults for what they omit (weight
decay 0, lr 1e-3, 1000 warmup steps), so those defaults are mapped too, giving way to an explicit
kiln flag.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from kiln.config import coerce, iter_settings, parse_override
from kiln.errors import KilnError

AUTO = "auto"

# Why a group of keys is not used; each group prints as one line.
BUCKETS = "FSDP2 sizes its own buckets and schedules its own communication"
LOGGING = "kiln logs every train.log_every steps and reports with --report-to"
OFFLOAD_TUNING = "FSDP2's CPU offload has no such tuning"
SAVING = "kiln always saves the full model and writes its own checkpoints"
LOSS_SCALER = "kiln's fp16 loss scaling is torch's dynamic GradScaler"
ENGINE = "DeepSpeed engine options with no FSDP2 counterpart"

ZERO_UNUSED = {
    **dict.fromkeys((
        "overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "allgather_partitions",
        "allgather_bucket_size", "use_multi_rank_bucket_allreduce", "sub_group_size", "round_robin_gradients",
        "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
        "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_module_granularity_threshold",
        "stage3_use_all_reduce_for_fetch_params", "zero_hpz_partition_size", "mics_shard_size",
        "mics_hierarchical_params_gather", "memory_efficient_linear", "legacy_stage1"), BUCKETS),
    **dict.fromkeys(("stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
                     "load_from_fp32_weights", "elastic_checkpoint", "pipeline_loading_checkpoint"), SAVING),
    **dict.fromkeys(("ignore_unused_parameters", "override_module_apply", "log_trace_cache_warnings",
                     "cpu_offload_use_pin_memory"), ENGINE),
}
# ZeRO++ quantized communication changes the numbers: accepted only when off.
ZERO_QUANTIZED = ("zero_quantized_weights", "zero_quantized_gradients", "zero_quantized_nontrainable_weights")
OFFLOAD_UNUSED = ("pin_memory", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "fast_init",
                  "pipeline_read", "pipeline_write", "ratio")
TOP_UNUSED = {
    **dict.fromkeys(("steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "tensorboard",
                     "wandb", "csv_monitor", "comet", "flops_profiler", "comms_logger"), LOGGING),
    **dict.fromkeys(("communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
                     "gradient_predivide_factor", "sparse_gradients", "disable_allgather"), BUCKETS),
    **dict.fromkeys(("checkpoint", "aio"), SAVING),
    **dict.fromkeys(("zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer"), ENGINE),
}
# Features kiln does not have: refused when on, listed as not used when the block says enabled: false.
UNSUPPORTED = {
    "amp": "Apex AMP (use bf16 or fp16 instead)",
    "pipeline": "pipeline parallelism",
    "tensor_parallel": "tensor parallelism",
    "sparse_attention": "DeepSpeed sparse attention",
    "elasticity": "elastic training",
    "autotuning": "DeepSpeed autotuning",
    "compression_training": "compression training",
    "data_efficiency": "data efficiency (curriculum, token dropping)",
    "curriculum_learning": "curriculum learning",
    "progressive_layer_drop": "progressive layer drop",
    "eigenvalue": "eigenvalue computation",
    "hybrid_engine": "the hybrid engine",
}
ZERO_STAGES = {0: "", 1: "grad-op", 2: "grad-op", 3: "full"}
OPTIMIZERS = {"adam": "adamw", "adamw": "adamw", "radam": "radam"}  # adam: adam_w_mode (default true)
OPTIMIZER_DEFAULTS = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}  # FusedAdam's
SCHEDULERS = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}
SCHEDULER_PARAMS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"},
    "WarmupDecayLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration",
                      "total_num_steps"},
    "WarmupCosineLR": {"warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type",
                       "last_batch_iteration", "total_num_steps"},
}
COS_MIN_RATIO_DEFAULT = 1e-4  # DeepSpeed's; kiln's cosine ends at 0, a difference of 0.01% of the peak lr
# A setting the file sets, and the explicit kiln setting it would silently override.
RIVALS = {
    "train.batch_size": ("train.batch_tokens", "kiln batches either by examples or by tokens"),
    "schedule.warmup_steps": ("schedule.warmup_ratio", "warmup steps override a warmup ratio"),
    "train.max_steps": ("train.epochs", "max_steps overrides epochs"),
}


def launch_world_size(nproc: int | None = None, nnodes: int | str | None = None) -> int | None:
    """Processes in the job: torchrun's ``WORLD_SIZE`` when set, else ``nproc`` × ``nnodes`` (``--nnodes``
    is ``N`` or an elastic range ``MIN:MAX``, whose size is unknown until torchrun starts: None)."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    low, _, high = str(nnodes or 1).partition(":")
    if high and high != low:
        return None
    try:
        return (nproc or 1) * int(low)
    except ValueError:
        raise KilnError(f"--nnodes must be a number or a range MIN:MAX, got '{nnodes}'") from None


def settings_from_deepspeed(path: str | Path, world_size: int | None = 1) -> tuple[dict[str, Any], list[str]]:
    """The kiln settings (dotted keys) a DeepSpeed config file asks for, and the lines that say how
    each key was read (``deepspeed: zero_optimization.stage 3 → --fsdp full``); ``world_size`` checks
    ``train_batch_size`` (None: not known yet, not checked). Raises a one-line KilnError for what kiln
    cannot honour."""
    mapping = _Mapping(Path(path), world_size)
    mapping.read()
    return dict(mapping.settings), mapping.report()


def merge_deepspeed(path: str | Path, flags: dict[str, Any], overrides: Iterable[str] = (),
                    world_size: int | None = 1) -> tuple[dict[str, Any], list[str]]:
    """``flags`` (dotted keys; None: not given) with a DeepSpeed file's settings merged in, and the
    lines to print. A setting given both in the file and by a flag or ``-c`` must agree (HF Trainer
    refuses such mismatches too); a DeepSpeed default for a key the file omits gives way."""
    mapping = _Mapping(Path(path), world_size)
    mapping.read()
    explicit = {key: (value, _flag_text(key, value)) for key, value in flags.items() if value is not None}
    for text in overrides:  # after the flags, as builder_for applies them: the last one counts
        key, value = parse_override(text)
        explicit[key] = (value, f"-c {text}")
    merged = dict(flags)
    lines = mapping.report()
    for key, value in mapping.settings.items():
        origin = mapping.origins[key]
        rival = RIVALS.get(key)
        if key in mapping.weak and (key in explicit or (rival is not None and rival[0] in explicit)):
            shown = explicit[key if key in explicit or rival is None else rival[0]][1]
            lines.append(f"deepspeed: {origin} is absent; {shown} stands over DeepSpeed's default {_json(value)}")
            continue
        if key in explicit:
            given, shown = explicit[key]
            if coerce(key, given, ranges=False) != value:
                mapping.refuse(origin, f"means {_flag_text(key, value)}, which conflicts with {shown} ({key}); "
                                       "make them equal, drop one, or write \"auto\" in the file to keep kiln's")
        if rival and value and rival[0] in explicit:
            mapping.refuse(origin, f"means {_flag_text(key, value)}, which conflicts with {explicit[rival[0]][1]}: "
                                   f"{rival[1]}; drop one")
        merged[key] = value
    return merged, lines


class _Mapping:
    """One DeepSpeed file being read: what it sets, where each setting came from, and what to say."""

    def __init__(self, path: Path, world_size: int | None) -> None:
        self.path = path
        self.world_size = world_size
        self.text = ""
        self.settings: dict[str, Any] = {}
        self.origins: dict[str, str] = {}  # setting -> the DeepSpeed key that set it
        self.weak: set[str] = set()  # settings that are DeepSpeed's defaults for omitted keys
        self.lines: list[str] = []
        self.autos: list[str] = []
        self.unused: dict[str, list[str]] = {}  # reason -> keys

    # -- reporting -----------------------------------------------------------------------------

    def refuse(self, key: str, message: str) -> NoReturn:
        """A one-line error naming the file, the key's line (when found) and the key."""
        raise KilnError(f"{key}: {message}", self.path, self._line(key))

    def _line(self, key: str) -> int | None:
        """The line of ``a.b.c``: the first ``"c":`` after the first ``"b":`` after ``"a":`` (JSON
        parsers keep no positions; this finds the key unless a sibling nests one of the same name)."""
        position = 0
        for part in key.split("."):
            found = re.compile(rf'"{re.escape(part)}"\s*:').search(self.text, position)
            if found is None:
                return None
            position = found.start()
        return self.text.count("\n", 0, position) + 1

    def set(self, origin: str, key: str, value: Any, note: str = "", *, shown: Any = None,
            weak: bool = False) -> None:
        """Map ``origin`` (its value ``shown``, default ``value``) onto the kiln setting ``key``."""
        try:
            value = coerce(key, value)
        except KilnError as err:
            self.refuse(origin, f"{_json(value if shown is None else shown)}: {err.message}")
        self.settings[key] = value
        self.origins[key] = origin
        if weak:
            self.weak.add(key)
        else:
            self.weak.discard(key)
        given = "absent, so DeepSpeed's default" if weak else _json(value if shown is None else shown)
        self.lines.append(f"deepspeed: {origin} {given} → {_flag_text(key, value)}{f' ({note})' if note else ''}")

    def auto(self, origin: str, key: str | None = None) -> None:
        self.autos.append(f"{origin} ({key})" if key else origin)

    def not_used(self, origin: str, reason: str) -> None:
        self.unused.setdefault(reason, []).append(origin)

    def report(self) -> list[str]:
        """The lines to print: each mapping, then "auto" keys, then unused keys by reason."""
        lines = list(self.lines)
        if self.autos:
            lines.append(f"deepspeed: \"auto\", so kiln's own settings stand: {', '.join(self.autos)}")
        lines += [f"deepspeed: not used: {', '.join(keys)} ({reason})" for reason, keys in self.unused.items()]
        return lines

    # -- reading -------------------------------------------------------------------------------

    def read(self) -> None:
        """Read the file and map every key in it."""
        config = self._load()
        handlers = {"zero_optimization": self._zero, "optimizer": self._optimizer,
                    "activation_checkpointing": self._activation_checkpointing}
        for key, value in config.items():
            if key in handlers:
                handlers[key](value)
            elif key in TOP_UNUSED:
                self.not_used(key, TOP_UNUSED[key])
            elif key in UNSUPPORTED:
                self._unsupported(key, value)
            elif key == "data_types":
                self._data_types(value)
            elif key not in ("fp16", "bf16", "bfloat16", "train_batch_size", "train_micro_batch_size_per_gpu",
                             "gradient_accumulation_steps", "gradient_clipping", "scheduler"):
                self.refuse(key, "not a DeepSpeed setting kiln knows; remove it (kiln maps ZeRO, offload, "
                                 "bf16/fp16, batch sizes, clipping, optimizer, scheduler and activation "
                                 "checkpointing)")
        self._precision(config)
        self._batch(config)
        self._clipping(config.get("gradient_clipping"))
        if "scheduler" in config:  # after the optimizer: its peak lr must agree with the optimizer's
            self._scheduler(config["scheduler"])

    def _load(self) -> dict:
        if not self.path.is_file():
            raise KilnError("file not found", self.path)
        try:
            self.text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise KilnError("not UTF-8 text", self.path) from None
        if not self.text.strip():
            raise KilnError("empty file; a DeepSpeed config is a JSON object", self.path)

        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
            seen: dict[str, Any] = {}
            for key, value in pairs:  # DeepSpeed refuses a repeated key too: which one would count?
                if key in seen:
                    raise KilnError(f"key '{key}' appears twice in one object; keep one", self.path)
                seen[key] = value
            return seen

        try:
            config = json.loads(self.text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as err:
            raise KilnError(f"not valid JSON ({err.msg}, column {err.colno})", self.path, err.lineno) from None
        if not isinstance(config, dict):
            raise KilnError(f"a DeepSpeed config is a JSON object, found {type(config).__name__}", self.path)
        return config

    def _block(self, key: str, value: Any) -> dict:
        if not isinstance(value, dict):
            self.refuse(key, f"expected a JSON object, got {_json(value)}")
        return value

    def _unsupported(self, key: str, value: Any) -> None:
        if isinstance(value, dict) and value.get("enabled") is False:
            self.not_used(key, "enabled: false")
        else:
            self.refuse(key, f"kiln has no {UNSUPPORTED[key]}; remove the block or set \"enabled\": false")

    def _data_types(self, value: Any) -> None:
        for key, dtype in self._block("data_types", value).items():
            if key != "grad_accum_dtype" or dtype not in (None, "fp32"):
                self.refuse(f"data_types.{key}", "kiln accumulates gradients in fp32; remove it")
        self.not_used("data_types", "kiln accumulates gradients in fp32")

    def _zero(self, value: Any) -> None:
        node = self._block("zero_optimization", value)
        stage = node.get("stage", 0)
        if stage == AUTO:
            self.auto("zero_optimization.stage", "train.fsdp")
        elif stage not in ZERO_STAGES or isinstance(stage, bool):
            self.refuse("zero_optimization.stage", f"{_json(stage)}: expected 0, 1, 2 or 3")
        else:
            note = ("FSDP shards gradients too, which stage 1 leaves whole: less memory, same results"
                    if stage == 1 else "")
            self.set("zero_optimization.stage", "train.fsdp", ZERO_STAGES[stage], note, shown=stage)
        for key, item in node.items():
            where = f"zero_optimization.{key}"
            if key == "stage":
                continue
            if key in ("offload_optimizer", "offload_param"):
                self._offload(key, self._block(where, item), stage)
            elif key in ("cpu_offload", "cpu_offload_param"):  # deprecated spellings of the two blocks
                if item is True:
                    self._offload(key, {"device": "cpu"}, stage)
                elif item not in (False, None):
                    self.refuse(where, f"{_json(item)}: expected true or false")
            elif key in ZERO_UNUSED:
                self.not_used(where, ZERO_UNUSED[key])
            elif key in ZERO_QUANTIZED:
                if item:
                    self.refuse(where, "quantized communication changes results; kiln communicates at full "
                                       "precision: set it to false")
                self.not_used(where, "off")
            elif key == "zeropp_loco_param":
                if item:
                    self.refuse(where, "ZeRO++ LoCo quantized communication changes results; remove it")
                self.not_used(where, "off")
            else:
                self.refuse(where, "not a ZeRO setting kiln knows; remove it")

    def _offload(self, key: str, node: dict, stage: Any) -> None:
        where = f"zero_optimization.{key}"
        device = node.get("device", "none")
        for sub in node:
            if sub in OFFLOAD_UNUSED:
                self.not_used(f"{where}.{sub}", OFFLOAD_TUNING)
            elif sub != "device":
                self.refuse(f"{where}.{sub}", "not an offload setting kiln knows; remove it")
        if key in ("offload_optimizer", "offload_param"):
            where += ".device"
        if device == "none":
            return
        if device == "nvme":
            self.refuse(where, "\"nvme\": kiln offloads to CPU memory only (FSDP2); use \"cpu\" or \"none\"")
        if device != "cpu":
            self.refuse(where, f"{_json(device)}: expected \"cpu\", \"nvme\" or \"none\"")
        parameters = key in ("offload_param", "cpu_offload_param")
        if stage == AUTO:  # kiln's own sharding decides; offloading without sharding is refused there
            pass
        elif parameters and stage != 3:
            self.not_used(where, "DeepSpeed offloads parameters at stage 3 only")
            return
        elif stage == 0:
            self.refuse(where, "offloading needs ZeRO stage 1, 2 or 3 (kiln offloads through FSDP); raise "
                               "zero_optimization.stage or set the device to \"none\"")
        note = "" if parameters else "kiln's FSDP offload keeps the sharded parameters in CPU memory too"
        self.set(where, "train.cpu_offload", True, note, shown=device if key.startswith("offload_") else True)

    def _precision(self, config: dict) -> None:
        if "bf16" in config and "bfloat16" in config:
            self.refuse("bfloat16", "given with bf16, its newer name; keep bf16")
        blocks = {name: (block, self._block(block, config[block]))
                  for name, block in (("bf16", "bf16"), ("bf16", "bfloat16"), ("fp16", "fp16")) if block in config}
        enabled, origins = {}, {}
        for name, (block, node) in blocks.items():
            enabled[name], origins[name] = node.get("enabled", False), f"{block}.enabled"
            if enabled[name] not in (True, False, AUTO):
                self.refuse(origins[name], f"{_json(enabled[name])}: expected true, false or \"auto\"")
            for key, item in node.items():
                where = f"{block}.{key}"
                if key == "enabled" or (name == "fp16" and key == "loss_scale" and item == 0):
                    continue
                if name == "fp16" and key == "loss_scale":
                    if enabled[name] is False:
                        self.not_used(where, "fp16 is off")
                        continue
                    self.refuse(where, f"{_json(item)}: kiln's fp16 loss scale is dynamic (torch's GradScaler); "
                                       "set loss_scale to 0 (dynamic) or use bf16")
                if name == "fp16" and key in ("auto_cast", "initial_scale_power", "loss_scale_window", "hysteresis",
                                              "consecutive_hysteresis", "min_loss_scale"):
                    self.not_used(where, LOSS_SCALER)
                elif name == "bf16" and key == "immediate_grad_update":
                    self.not_used(where, ENGINE)
                else:
                    self.refuse(where, f"not a {name} setting kiln knows; remove it")
        if enabled.get("bf16") is True and enabled.get("fp16") is True:
            self.refuse("fp16.enabled", "bf16 and fp16 are both enabled (DeepSpeed refuses this too); keep one")
        for name in ("bf16", "fp16"):
            if enabled.get(name) is True:
                self.set(origins[name], "train.precision", name, shown=True)
                return
        if AUTO in enabled.values():
            self.auto(" and ".join(origins[name] for name, on in enabled.items() if on == AUTO), "train.precision")
        elif enabled:  # DeepSpeed trains in fp32 unless a block enables bf16 or fp16
            self.set(" and ".join(origins.values()), "train.precision", "fp32", shown=False)

    def _batch(self, config: dict) -> None:
        """DeepSpeed's rule: train_batch_size = micro-batch × accumulation × world size; given two,
        it derives the third; given all three, they must agree."""
        keys = {"micro": ("train_micro_batch_size_per_gpu", "train.batch_size"),
                "accum": ("gradient_accumulation_steps", "train.grad_accum")}
        values: dict[str, Any] = {}
        for name, (origin, key) in keys.items():
            value = config.get(origin)
            if value == AUTO:
                self.auto(origin, key)
            elif value is not None:
                values[name] = self._count(origin, value)
        total = config.get("train_batch_size")
        if total == AUTO or total is None:
            if total == AUTO:
                self.auto("train_batch_size")
            for name, value in values.items():
                self.set(keys[name][0], keys[name][1], value)
            return
        total = self._count("train_batch_size", total)
        if self.world_size is None:  # an elastic job's launcher: each worker checks it with its WORLD_SIZE
            self.not_used("train_batch_size", "checked once the processes start and their number is known")
            for name, value in values.items():
                self.set(keys[name][0], keys[name][1], value)
            return
        if any(config.get(origin) == AUTO for origin, _ in keys.values()):
            self.refuse("train_batch_size", f"{total} needs train_micro_batch_size_per_gpu and "
                                            "gradient_accumulation_steps as numbers (or absent), not \"auto\": "
                                            "kiln cannot check it against its own batches; set it to \"auto\"")
        derived = {name for name in keys if name not in values}
        if derived == {"micro", "accum"}:
            values["accum"] = 1
        if "micro" in derived:
            values["micro"] = total // (self.world_size * values["accum"])
        elif "accum" in derived:
            values["accum"] = total // (self.world_size * values["micro"])
        micro, accum = values["micro"], values["accum"]
        if micro < 1 or accum < 1 or micro * accum * self.world_size != total:
            given = " × ".join([*(f"{keys[name][0]} {values[name]}" for name in keys if name not in derived),
                                f"{self.world_size} process{'es' if self.world_size > 1 else ''}"])
            problem = (f"is not a whole multiple of {given}" if derived else
                       f"is not {given} = {micro * accum * self.world_size}")
            self.refuse("train_batch_size", f"{total} {problem}; make them agree, as DeepSpeed requires "
                                            "(the world size is --nproc × --nnodes, or WORLD_SIZE)")
        for name in ("micro", "accum"):
            origin, key = keys[name]
            note = "derived from train_batch_size" if name in derived else ""
            self.set(origin, key, values[name], note)
        self.lines.append(f"deepspeed: train_batch_size {total} = {micro} per micro-batch × {accum} accumulated × "
                          f"{self.world_size} process{'es' if self.world_size > 1 else ''} (checked)")

    def _count(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() \
                or value < 1:
            self.refuse(key, f"{_json(value)}: expected a whole number of at least 1, or \"auto\"")
        return int(value)

    def _clipping(self, value: Any) -> None:
        if value == AUTO:
            self.auto("gradient_clipping", "train.grad_clip")
        elif value is not None:
            self.set("gradient_clipping", "train.grad_clip", value, "0: off" if value == 0 else "")

    def _optimizer(self, value: Any) -> None:
        node = self._block("optimizer", value)
        kind = node.get("type")
        if not isinstance(kind, str) or kind.lower() not in OPTIMIZERS:
            self.refuse("optimizer.type", f"{_json(kind)}: kiln maps Adam, AdamW and RAdam; use one of them, or "
                                          "remove the optimizer block to use kiln's own (optim.name)")
        for key in node:
            if key not in ("type", "params"):
                self.refuse(f"optimizer.{key}", "not an optimizer setting kiln knows; remove it")
        params = dict(self._block("optimizer.params", node.get("params", {})))
        name = OPTIMIZERS[kind.lower()]
        torch_adam = False
        if kind.lower() != "radam":
            adam_w_mode = params.pop("adam_w_mode", True)
            torch_adam = params.pop("torch_adam", False)
            if not isinstance(adam_w_mode, bool) or not isinstance(torch_adam, bool):
                self.refuse("optimizer.params.adam_w_mode", "adam_w_mode and torch_adam are true or false")
            if kind.lower() == "adam" and not adam_w_mode:  # DeepSpeed: AdamW is decoupled whatever adam_w_mode says
                name = "adam"
            if torch_adam:
                self.not_used("optimizer.params.torch_adam", "kiln always uses torch's optimizers")
        note = {"adamw": "decoupled weight decay" + (": DeepSpeed's Adam has adam_w_mode true by default"
                                                     if kind.lower() == "adam" else ""),
                "adam": "L2 weight decay, as adam_w_mode false asks", "radam": "torch's RAdam"}[name]
        self.set("optimizer.type", "optim.name", name, note, shown=kind)
        for key in ("bias_correction", "amsgrad"):
            if key in params:
                item = params.pop(key)
                if item is not (key == "bias_correction"):
                    self.refuse(f"optimizer.params.{key}", f"{_json(item)}: kiln's Adam has bias correction "
                                                           "and no AMSGrad; remove it")
        if "max_grad_norm" in params:
            self.refuse("optimizer.params.max_grad_norm", "use the top-level gradient_clipping (DeepSpeed "
                                                          "refuses it here too)")
        for key in params:
            if key not in OPTIMIZER_DEFAULTS:
                self.refuse(f"optimizer.params.{key}", "not an optimizer parameter kiln maps; remove it")
        defaults = dict(OPTIMIZER_DEFAULTS)
        if torch_adam and name == "adamw":
            defaults["weight_decay"] = 0.01  # torch.optim.AdamW's
        for key, default in defaults.items():
            origin = f"optimizer.params.{key}"
            if params.get(key) == AUTO:
                self.auto(origin, f"optim.{key}")
            elif key in params:
                self.set(origin, f"optim.{key}", params[key])
            else:
                self.set(origin, f"optim.{key}", default, weak=True)

    def _activation_checkpointing(self, value: Any) -> None:
        node = self._block("activation_checkpointing", value)
        switches = ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization",
                    "number_checkpoints")
        for key in node:
            where = f"activation_checkpointing.{key}"
            if key in ("synchronize_checkpoint_boundary", "profile"):
                self.not_used(where, ENGINE)
            elif key not in switches:
                self.refuse(where, "not an activation checkpointing setting kiln knows; remove it")
        on = {key: node[key] for key in switches if node.get(key)}
        if not on:
            self.not_used("activation_checkpointing", "every switch in it is off")
            return
        note = "kiln recomputes each layer's activations in the backward pass"
        if node.get("cpu_checkpointing"):
            note += "; they stay on the device, not in CPU memory"
        self.set("activation_checkpointing", "train.grad_checkpoint", True, note, shown=on)

    def _scheduler(self, value: Any) -> None:
        node = self._block("scheduler", value)
        kind = node.get("type")
        if kind not in SCHEDULERS:
            self.refuse("scheduler.type", f"{_json(kind)}: kiln maps WarmupLR (constant), WarmupDecayLR (linear) "
                                          "and WarmupCosineLR (cosine); remove the scheduler block to use "
                                          "kiln's own (schedule.name)")
        for key in node:
            if key not in ("type", "params"):
                self.refuse(f"scheduler.{key}", "not a scheduler setting kiln knows; remove it")
        params = self._block("scheduler.params", node.get("params", {}))
        for key in params:
            if key not in SCHEDULER_PARAMS[kind]:
                self.refuse(f"scheduler.params.{key}", f"not a {kind} parameter; remove it")
        if params.get("last_batch_iteration", -1) != -1:
            self.refuse("scheduler.params.last_batch_iteration", "kiln resumes with --resume; remove it")
        warmup_type = params.get("warmup_type", "log")
        if warmup_type not in ("log", "linear"):
            self.refuse("scheduler.params.warmup_type", f"{_json(warmup_type)}: expected \"log\" or \"linear\"")
        self.set("scheduler.type", "schedule.name", SCHEDULERS[kind], shown=kind)
        # The floor the warmup starts from and the decay ends at: kiln's is 0.
        floor = "warmup_min_ratio" if kind == "WarmupCosineLR" else "warmup_min_lr"
        if params.get(floor) == AUTO:  # HF fills it with 0
            self.auto(f"scheduler.params.{floor}", "0")
        elif params.get(floor, 0) != 0:
            self.refuse(f"scheduler.params.{floor}", f"{_json(params[floor])}: kiln warms up from 0; set it to 0")
        if kind == "WarmupCosineLR":
            ratio = params.get("cos_min_ratio", COS_MIN_RATIO_DEFAULT)
            if ratio == AUTO or isinstance(ratio, bool) or not isinstance(ratio, (int, float)) \
                    or not 0 <= ratio <= COS_MIN_RATIO_DEFAULT:
                self.refuse("scheduler.params.cos_min_ratio", f"{_json(ratio)}: kiln's cosine decays to 0; set "
                                                              f"it to at most {COS_MIN_RATIO_DEFAULT} (DeepSpeed's "
                                                              "default)")
            if ratio:
                self.not_used("scheduler.params.cos_min_ratio", f"kiln's cosine ends at 0, not {ratio} × lr")
        else:
            self._peak_lr(params)
        self._warmup(params, warmup_type)
        if kind != "WarmupLR":
            total = params.get("total_num_steps")
            if total == AUTO:
                self.auto("scheduler.params.total_num_steps", "the run's own length")
            elif total is None:
                self.refuse("scheduler.params.total_num_steps", f"{kind} needs it (DeepSpeed too); give the "
                                                                "run's length in steps, or \"auto\"")
            else:
                total = self._count("scheduler.params.total_num_steps", total)
                self.set("scheduler.params.total_num_steps", "train.max_steps", total,
                         "the schedule reaches its end on the run's last step, as HF requires")

    def _peak_lr(self, params: dict) -> None:
        """WarmupLR and WarmupDecayLR set the lr themselves, peaking at warmup_max_lr whatever the
        optimizer's lr says: the two must agree."""
        origin = "scheduler.params.warmup_max_lr"
        peak = params.get("warmup_max_lr", 1e-3)
        if peak == AUTO:  # HF fills it with the optimizer's lr
            if "optim.lr" not in self.settings or "optim.lr" in self.weak:
                self.auto(origin, "optim.lr")
            return
        if "optim.lr" in self.settings and "optim.lr" not in self.weak and self.settings["optim.lr"] != peak:
            given = "absent: DeepSpeed's default 0.001" if "warmup_max_lr" not in params else _json(peak)
            self.refuse(origin, f"{given}, but optimizer.params.lr is {_json(self.settings['optim.lr'])}: "
                                "DeepSpeed's schedule would train at the former; make them equal")
        if "optim.lr" in self.settings and "optim.lr" not in self.weak and "warmup_max_lr" not in params:
            return  # agrees with the optimizer's, already mapped
        self.set(origin, "optim.lr", peak, weak="warmup_max_lr" not in params)

    def _warmup(self, params: dict, warmup_type: str) -> None:
        origin = "scheduler.params.warmup_num_steps"
        steps = params.get("warmup_num_steps", 1000)
        if steps == AUTO:
            self.auto(origin, "schedule.warmup_steps, schedule.warmup_ratio")
            return
        weak = "warmup_num_steps" not in params
        if isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps == 0:
            # kiln's warmup_steps 0 means "use warmup_ratio": no warmup takes both at 0
            self.set(origin, "schedule.warmup_steps", 0, weak=weak)
            self.set(origin, "schedule.warmup_ratio", 0.0, "no warmup", shown=0, weak=weak)
            return
        note = ("linear: kiln has no log-shaped warmup, DeepSpeed's default warmup_type" if warmup_type == "log"
                else "")
        self.set(origin, "schedule.warmup_steps", steps, note, weak=weak)


def _json(value: Any) -> str:
    return json.dumps(value)


def _flag_text(key: str, value: Any) -> str:
    """The kiln flag (else ``-c``) that sets ``key`` to ``value``: what the user could type instead."""
    flag = dict(iter_settings())[key].metadata.get("flag") if "." in key else None
    if key == "train.fsdp" and value == "":
        return "DDP (no --fsdp)"
    if flag and value is True:
        return flag
    if flag and not isinstance(value, (bool, list)):
        return f"{flag} {value}"
    shown = json.dumps(value) if isinstance(value, (bool, list)) or value is None else value
    return f"-c {key}={shown}"
