"""``kiln profiles`` and ``kiln profiles show NAME``."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln profiles``."""
    parser = commands.add_parser("profiles", help="list profiles, or show one",
                                 description="List the shipped profiles, or print one merged profile.")
    parser.add_argument("action", nargs="?", choices=["show"], help="show NAME: print the full profile")
    parser.add_argument("name", nargs="?", metavar="NAME", help="profile name or YAML path")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the table or one profile."""
    from kiln import profiles
    from kiln.errors import KilnError

    if args.action == "show":
        if not args.name:
            raise KilnError("usage: kiln profiles show NAME")
        import yaml

        print(yaml.safe_dump(profiles.load(args.name).to_dict(), sort_keys=False), end="")
        return 0
    rows = [("name", "family", "parameters", "tasks")]
    for name in profiles.available():
        config = profiles.load(name)
        rows.append((name, config.family, f"{config.params / 1e6:.2f}M", ", ".join(config.tasks)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) if i != 2 else cell.rjust(widths[i])
                        for i, cell in enumerate(row)).rstrip())
    return 0
