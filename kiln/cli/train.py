"""``kiln train``: flags for every setting that declares one come from kiln.config."""

from __future__ import annotations

import argparse
import json
import logging
import typing

from kiln.config import iter_settings, setting_type
from kiln.errors import KilnError
from kiln.tasks import TASKS

TASKS_HELP = " | ".join(TASKS)


def _flag_type(key: str) -> typing.Any:
    declared = setting_type(key)
    kinds = [k for k in typing.get_args(declared) if k is not type(None)] or [declared]
    return kinds[0]


def add_setting_flag(parser: typing.Any, key: str, default: str | None = None) -> None:
    """Add the CLI flag a setting declares, with its doc as help (``dest`` is the dotted key);
    ``default`` says what applies without the flag (else the profile's or the declared default)."""
    f = dict(iter_settings())[key]
    kind = _flag_type(key)
    shown = f.default if f.default not in ("", None) else "none"
    help_text = f"{f.metadata['doc']} [{key}; {default or f'profile default otherwise {shown}'}]"
    if kind is bool:  # a switch: present means true
        parser.add_argument(f.metadata["flag"], dest=key, action="store_const", const=True, default=None,
                            help=help_text.replace("%", "%%"))
        return
    choices = f.metadata.get("choices")
    if choices and "" in choices:  # an optional value: the flag alone means the first real choice
        parser.add_argument(f.metadata["flag"], dest=key, nargs="?", const=choices[1], default=None,
                            choices=choices[1:], help=help_text.replace("%", "%%"))
        return
    parser.add_argument(f.metadata["flag"], dest=key, type=kind, default=None, help=help_text.replace("%", "%%"),
                        choices=choices, metavar=None if choices else kind.__name__.upper().replace("STR", "VALUE"))


def add_model_flags(parser: typing.Any, generate_help: str, compile: bool = True) -> None:
    """The flags of the commands that run a trained model (predict, evaluate, serve): ``--device``,
    ``--precision``, ``--compile`` and ``--generate KEY=VALUE``."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_setting_flag(parser, "train.precision", default="default: fp32, which agrees with transformers; "
                                                        "KILN_PRECISION when set")
    if compile:
        add_setting_flag(parser, "train.compile", default="default: off here; auto compiles on CUDA")
    parser.add_argument("--generate", action="append", default=[], metavar="KEY=VALUE", help=generate_help)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln train``."""
    parser = commands.add_parser(
        "train", help="train a model for a task from a profile",
        description="Train a model for TASK on DATA (a file, split 90/10, or a directory with "
                    "train.* and optionally validation.*/dev.*/valid.* and test.*).",
    )
    parser.add_argument("task", metavar="TASK", help=TASKS_HELP)
    add_training_arguments(parser, sections=("distill",))
    parser.set_defaults(run=run)


def add_training_arguments(parser: typing.Any, sections: tuple[str, ...] = ()) -> None:
    """DATA and every flag of a training run (``kiln train``, ``kiln distill``); settings of the
    ``sections`` named are left to -c."""
    parser.add_argument("data", metavar="DATA", help="data file or directory")
    parser.add_argument("-n", "--name", help="run name; the run goes to OUTPUT_DIR/NAME")
    parser.add_argument("--profile", help="profile name or YAML path (default: the task's own: bert-mini "
                                          "for the encoder tasks, t5-tiny for generation, crammed-bert-mini "
                                          "for mlm, gpt2 for clm, t5-efficient-tiny for span; with --init, "
                                          "the recipe for pretrained starts)")
    parser.add_argument("--init", metavar="DIR", help="start from a local HF checkpoint or kiln run")
    parser.add_argument("--tokenizer", metavar="DIR", help="reuse an existing tokenizer directory")
    parser.add_argument("--output-dir", default="runs", metavar="DIR", help="parent of run directories "
                                                                          "(default: runs)")
    group = parser.add_argument_group("training settings (each also settable as -c KEY=VALUE)")
    exclusive = group.add_mutually_exclusive_group()
    for key, f in iter_settings():
        if f.metadata.get("flag") and key.split(".")[0] not in sections:
            add_setting_flag(exclusive if key in ("train.batch_tokens", "train.batch_size") else group, key)
    group.add_argument("--lora", nargs="?", const="", default=None, metavar="KEY=VALUE,...", help=lora_help())
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint")
    start.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("-c", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting, e.g. -c optim.weight_decay=0 "
                             "-c model.config.num_hidden_layers=2")
    parser.add_argument("--print-config", action="store_true",
                        help="print the merged configuration with each value's source, then exit")
    parser.add_argument("--deepspeed", metavar="FILE",
                        help="read a DeepSpeed config (ds_config.json) and map its ZeRO stage, offload, bf16/fp16, "
                             "batch sizes, gradient accumulation and clipping, optimizer, scheduler and activation "
                             "checkpointing onto kiln's settings (kiln trains with FSDP2); prints the mapping and "
                             "refuses what it cannot honour")
    launch = parser.add_argument_group(
        "processes (kiln starts them through torch.distributed.run; under torchrun these are not needed)")
    for flag, kind, text in LAUNCH_FLAGS:
        launch.add_argument(flag, type=kind, metavar=kind.__name__.upper().replace("STR", "VALUE"), help=text)


# kiln's flag, its type, its help; torchrun's own flag is the same name with underscores.
LAUNCH_FLAGS = (
    ("--nproc", int, "processes on this machine (one per GPU; on CPU each takes a share of the cores)"),
    ("--nnodes", str, "machines in the job, or a range MIN:MAX for an elastic job (default 1)"),
    ("--node-rank", int, "this machine's rank, 0 to nnodes-1 (with --master-addr)"),
    ("--master-addr", str, "address of the machine with node rank 0"),
    ("--master-port", int, "free port on that machine (default 29500)"),
    ("--rdzv-endpoint", str, "host:port of a rendezvous (instead of --master-addr and --node-rank)"),
    ("--rdzv-backend", str, "rendezvous backend, e.g. c10d"),
    ("--rdzv-id", str, "the job's id, the same on every machine"),
)


def launch(args: argparse.Namespace) -> int:
    """Run this same command in ``--nproc`` processes per machine through ``torch.distributed.run``
    (torchrun), and return its exit code. kiln's process waits, and passes Ctrl-C and SIGTERM to the
    workers (they stop at the step's end with a checkpoint; a second Ctrl-C stops them at once)."""
    import contextlib
    import os
    import shlex
    import signal
    import subprocess
    import sys
    from pathlib import Path

    if args.nproc < 1:
        raise KilnError(f"--nproc must be at least 1, got {args.nproc}")
    check_nproc(args.nproc, getattr(args, "train.device"))
    if not args.resume and not Path(args.data).exists():  # one line here, not one per worker
        raise KilnError("no such file or directory", args.data)
    torchrun = ["--nproc_per_node", str(args.nproc)]
    for flag, _, _ in LAUNCH_FLAGS[1:]:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            torchrun += [f"--{flag[2:].replace('-', '_')}", str(value)]
    if len(torchrun) == 2:  # one machine: a private rendezvous on a free port
        torchrun.append("--standalone")
    own = {flag for flag, _, _ in LAUNCH_FLAGS}
    words, kept = shlex.split(args.command_line)[1:], []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in own:
            skip = True
        elif word.split("=", 1)[0] not in own:
            kept.append(word)
    command = [sys.executable, "-m", "kiln.cli.torchrun", *torchrun, "-m", "kiln", *kept]
    logging.getLogger("kiln").debug("launching " + shlex.join(command))
    # torchrun runs in a session of its own, so a terminal's Ctrl-C reaches only this process, which
    # passes each signal straight to the workers: they stop at the step's end with a checkpoint and
    # exit 0, and so does torchrun. Signalled itself, torchrun would count the stop as a failure.
    child = subprocess.Popen(command, start_new_session=True)

    def forward(number: int, frame: object) -> None:
        workers = _children(child.pid)
        for pid in workers or [child.pid]:  # none found (no /proc): torchrun passes the signal on
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if number == signal.SIGHUP else number)

    previous = {number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def check_nproc(nproc: int, device: str | None) -> None:
    """Refuse more processes than this machine has devices for: a GPU each on CUDA (unless
    ``--device cpu`` asks for CPU processes), a core each on CPU. More would not train faster; they
    would fail to find their GPU, or share cores to a crawl."""
    import os

    import torch

    if torch.cuda.is_available() and not (device or "").startswith("cpu"):
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise KilnError(f"--nproc {nproc}: this machine has {gpus} GPU{'s' * (gpus != 1)}, one per process; "
                            f"use --nproc {gpus} or fewer (or --device cpu for CPU processes)")
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if nproc > cores:
        raise KilnError(f"--nproc {nproc}: this machine has {cores} CPU core{'s' * (cores != 1)} and no GPU for "
                        f"kiln, and each process needs a core; use --nproc {cores} or fewer")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux: from /proc; elsewhere none are found)."""
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, ...
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def check_before_launch(args: argparse.Namespace, flags: dict) -> None:
    """The checks every worker would fail alike, made once before any process starts."""
    from kiln.run import resolve_config

    if not args.name:
        raise KilnError("kiln train needs -n NAME (the run directory name)")
    config = resolve_config(args.task, args.profile, args.init, flags, args.overrides).build()
    if config.train.auto_batch:
        raise KilnError("--auto-batch splits micro-batches in one process only (the ranks would have to agree on "
                        "each retry); with several, use a smaller --batch-tokens and more --grad-accum")


def lora_help() -> str:
    """``--lora``'s help, from the ``lora`` section's settings."""
    import dataclasses

    from kiln.config import LORA_RANK, LoraConfig

    keys = "; ".join(f"{f.name}: {f.metadata['doc']}" for f in dataclasses.fields(LoraConfig) if f.name != "r")
    return (f"train LoRA adapters (peft) on the frozen --init start instead of every weight, e.g. --lora "
            f"r=16,alpha=32,targets=query,value [lora.*; the flag alone: r={LORA_RANK}]. Keys: r (rank); "
            f"{keys}").replace("%", "%%")


def run(args: argparse.Namespace) -> int:
    """Train, or print the merged configuration."""
    import os

    if args.lora is not None:  # --lora KEY=VALUE,... is -c lora.KEY=VALUE for each; -c still wins
        from kiln.config import parse_lora

        args.overrides = [*parse_lora(args.lora), *args.overrides]

    launching = args.nproc is not None and "WORLD_SIZE" not in os.environ and not args.print_config
    flags = {key: getattr(args, key) for key, f in iter_settings() if f.metadata.get("flag") and hasattr(args, key)}
    if args.deepspeed:  # before any process starts or anything is written; each worker maps it again
        from kiln.deepspeed import launch_world_size, merge_deepspeed

        world_size = launch_world_size(getattr(args, "nproc", None), getattr(args, "nnodes", None))
        flags, lines = merge_deepspeed(args.deepspeed, flags, args.overrides, world_size)
        for line in [] if launching else lines:  # a launcher's workers print them (rank 0)
            logging.getLogger("kiln").info(line)
    if launching:
        if not args.resume:  # bad settings: one line here, not one per worker and torchrun's report
            check_before_launch(args, flags)
        return launch(args)
    if args.print_config:
        from kiln.run import resolve_config

        builder = resolve_config(args.task, args.profile, args.init, flags, args.overrides)
        width = max(len(key) for key, _, _ in builder.described())
        for key, value, source in builder.described():
            print(f"{key:<{width}}  {value!s:<30}  {source}")
        return 0
    if not args.name:
        raise KilnError("kiln train needs -n NAME (the run directory name)")
    import kiln

    run_ = kiln.train(args.task, args.data, name=args.name, profile=args.profile, init=args.init,
                      tokenizer=args.tokenizer, output_dir=args.output_dir, resume=args.resume,
                      overwrite=args.overwrite, overrides=args.overrides, command=args.command_line, **flags)
    from kiln.metrics import metrics_line

    shown = metrics_line(run_.metrics)
    log = logging.getLogger("kiln")
    log.info(f"model saved to {run_.model_dir}")
    if shown:
        log.info(f"validation: {shown}")
    teacher = json.loads((run_.path / "run.json").read_text()).get("teacher") if run_.path.is_dir() else None
    if teacher and teacher.get("metrics"):  # kiln distill: the student's score beside its teacher's
        log.info(f"teacher:    {metrics_line(teacher['metrics'])} ({teacher['path']})")
    if run_.test_metrics:
        log.info("test: " + metrics_line(run_.test_metrics))
    return 0
