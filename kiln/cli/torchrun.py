"""``python -m kiln.cli.torchrun ARGS``: torch.distributed.run for ``kiln train --nproc``, reporting
a failed job the way one process does.

torchrun answers any worker failure with its own multi-line report (a traceback, a table of
ranks, a link to its docs). Here a worker's user error (a KilnError: a ragged data file, a run
that is not there) is the same one line, exit code 2, that ``kiln train`` prints in one process:
each worker writes its line to ``KILN_ERROR_DIR`` instead of stderr, and this launcher prints the
distinct lines once. Other failures keep what the workers printed (their tracebacks) and exit
with the first failed worker's code.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ERROR_DIR = "KILN_ERROR_DIR"  # where each worker writes its one-line error, as rank-N


def worker_error(line: str) -> bool:
    """In a worker of this launcher, hand ``line`` to the launcher instead of printing it (each of
    the N ranks would print it); returns whether it was handed over."""
    folder = os.environ.get(ERROR_DIR)
    if not folder or "RANK" not in os.environ:
        return False
    try:
        (Path(folder) / f"rank-{int(os.environ['RANK']):06d}").write_text(line + "\n", encoding="utf-8")
    except OSError:
        return False
    return True


def main(argv: list[str]) -> int:
    """Run torchrun with ``argv``; a failed job is its workers' one-line errors, or their exit code."""
    import logging

    verbose = any(word in ("-v", "-vv", "--verbose") for word in argv)
    if not verbose:  # torchrun's own log of a failure: the workers' lines below replace it
        os.environ.setdefault("LOGLEVEL", "CRITICAL")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not verbose:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)

    with tempfile.TemporaryDirectory(prefix="kiln-errors-") as folder:
        os.environ[ERROR_DIR] = folder  # inherited by the workers
        try:
            run(parse_args(argv))
            return 0
        except ChildFailedError as failed:
            lines = dict.fromkeys(path.read_text(encoding="utf-8").strip()
                                  for path in sorted(Path(folder).glob("rank-*")))
            for line in lines:
                print(line, file=sys.stderr)
            if lines:
                return 2
            _, first = failed.get_first_failure()
            return first.exitcode if first.exitcode > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
