"""``kiln train``: flags for every setting that declares one come from kiln.config."""

from __future__ import annotations

import argparse
import logging
import typing

from kiln.config import SECTIONS, iter_settings
from kiln.errors import KilnError

TASKS_HELP = "sequence | sentence-pair | token | qa | generation | mlm | clm | span"


def _flag_type(key: str) -> typing.Any:
    section, name = key.split(".")
    owner = SECTIONS[section]
    declared = typing.get_type_hints(owner)[name]
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


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln train``."""
    parser = commands.add_parser(
        "train", help="train a model for a task from a profile",
        description="Train a model for TASK on DATA (a file, split 90/10, or a directory with "
                    "train.* and optionally validation.*/dev.*/valid.* and test.*).",
    )
    parser.add_argument("task", metavar="TASK", help=TASKS_HELP)
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
        if f.metadata.get("flag"):
            add_setting_flag(exclusive if key in ("train.batch_tokens", "train.batch_size") else group, key)
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint")
    start.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("-c", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting, e.g. -c optim.weight_decay=0 "
                             "-c model.config.num_hidden_layers=2")
    parser.add_argument("--print-config", action="store_true",
                        help="print the merged configuration with each value's source, then exit")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train, or print the merged configuration."""
    flags = {key: getattr(args, key) for key, f in iter_settings() if f.metadata.get("flag")}
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
    shown = ", ".join(f"{k} {v:.4f}" for k, v in run_.metrics.items() if k != "n")
    log = logging.getLogger("kiln")
    log.info(f"model saved to {run_.model_dir}")
    if shown:
        log.info(f"validation: {shown}")
    if run_.test_metrics:
        log.info("test: " + ", ".join(f"{k} {v:.4f}" for k, v in run_.test_metrics.items() if k != "n"))
    return 0
