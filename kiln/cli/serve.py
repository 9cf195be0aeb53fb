"""``kiln serve RUN``: the model behind an HTTP API (needs the ``serve`` extra: FastAPI, uvicorn)."""

from __future__ import annotations

import argparse
import importlib.util
import os

from kiln.cli.train import add_model_flags
from kiln.errors import KilnError
from kiln.serve.settings import ServeSettings, setting_fields


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``kiln serve``; its server flags come from :class:`~kiln.serve.settings.ServeSettings`."""
    parser = commands.add_parser(
        "serve", help="serve a trained model over HTTP (POST /predict, /docs, a demo page)",
        description="Serve RUN over HTTP: POST /predict takes {\"inputs\": [...], \"parameters\": {...}} and answers "
                    "what 'kiln predict --json' prints; GET /health, /info, /metrics; API docs at /docs and a demo "
                    "page at /. Concurrent requests share micro-batches. Stop with Ctrl-C or SIGTERM (in-flight "
                    "requests finish first).",
    )
    parser.add_argument("run_dir", metavar="RUN", help="run directory (runs/NAME) or model directory")
    group = parser.add_argument_group("server settings")
    for f, kind in setting_fields():
        shown = f.default if f.default not in ("", None) else "none"
        group.add_argument(f.metadata["flag"], dest=f"serve.{f.name}", type=kind, default=None,
                           metavar=kind.__name__.upper().replace("STR", "VALUE"),
                           help=f"{f.metadata['doc']} [default: {shown}]".replace("%", "%%"))
    model = parser.add_argument_group("model settings")
    add_model_flags(model, "generation, clm, span: a decoding default, e.g. --generate num_beams=4 (a "
                           "request's parameters override it for that request)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check the settings and the extra, then serve until stopped."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise KilnError(f"kiln serve needs {' and '.join(missing)}: pip install 'kiln-nlp[serve]'")
    given = {f.name: getattr(args, f"serve.{f.name}") for f, _ in setting_fields()}
    settings = ServeSettings(**{name: value for name, value in given.items() if value is not None})
    settings.api_key = settings.api_key or os.environ.get("KILN_API_KEY", "")  # keeps the key out of `ps`
    settings.check()

    import kiln
    from kiln.model_files import KILN_FILE, model_dir_of
    from kiln.serve.server import serve

    if not (model_dir_of(args.run_dir) / KILN_FILE).is_file():  # before listening: the common slip is one line
        raise KilnError(f"no {KILN_FILE}: not a model kiln saved", model_dir_of(args.run_dir))

    def load() -> object:
        return kiln.load(args.run_dir, device=args.device, precision=getattr(args, "train.precision"),
                         generate=args.generate, batch_tokens=settings.max_batch_tokens or None,
                         compile=getattr(args, "train.compile") or "off")

    serve(load, settings, name=str(args.run_dir), verbose=args.verbose)
    return 0
