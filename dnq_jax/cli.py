"""Shared CLI plumbing: turn the library's expected failures into one-paragraph messages."""

from __future__ import annotations

import sys
import textwrap
import traceback
from collections.abc import Callable

from dnq_jax.checkpoint import CheckpointError
from dnq_jax.config import ConfigError
from dnq_jax.data import DataError

# Expected failures -> exit status. Anything else is a bug and keeps its traceback.
EXIT_CODES = {ConfigError: 2, DataError: 3, CheckpointError: 4, PermissionError: 5}


def run_guarded(fn: Callable[[], int | None], verbose: bool, extra: dict | None = None) -> int:
    """Run `fn`; print a clear message (traceback only with verbose) for expected errors."""
    codes = {**EXIT_CODES, **(extra or {})}
    try:
        return fn() or 0
    except tuple(codes) as e:
        code = next(v for k, v in codes.items() if isinstance(e, k))
        kind = type(e).__name__
        if verbose:
            traceback.print_exc()
        msg = textwrap.fill(f"error ({kind}): {e}", width=100, break_long_words=False)
        print(msg + ("" if verbose else "\n(run with --verbose for the traceback)"),
              file=sys.stderr)
        return code
