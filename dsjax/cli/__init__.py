"""Command-line entry points (``dsjax-train``, ``dsjax-generate``, ``dsjax-serve``, ``dsjax-convert``,
``dsjax-aot``, ``dsjax-params``, ``dsjax-launch``; or ``python -m dsjax.cli.<name>``). Each parses its arguments,
calls the library, and turns the library's errors into one line on stderr and an exit status: 2 for
bad input (a config, a path, a checkpoint, an argument), 1 when training itself failed.
``DSJAX_DEBUG=1`` shows the traceback instead."""

from __future__ import annotations

import functools
import os
import sys


class UsageError(ValueError):
    """An argument the command cannot use; the message names it."""


def one_line(e: BaseException) -> str:
    """The error's message on one line: a message listing several problems keeps the first."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[0]} {lines[1]} (and {len(lines) - 2} more)"


def reports_errors(main):
    """``main(argv) -> status`` with the library's errors as one line on stderr (module docstring)."""
    from dsjax.config import ConfigError
    from dsjax.hf import CheckpointError
    from dsjax.train.checkpoint import RestoreError, SaveError
    from dsjax.train.data import DataError
    from dsjax.train.loop import TrainingError

    bad_input = (ConfigError, DataError, CheckpointError, UsageError, OSError)
    failed = (TrainingError, RestoreError, SaveError)

    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except bad_input + failed as e:
            if os.environ.get("DSJAX_DEBUG"):
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2 if isinstance(e, bad_input) else 1

    return run
