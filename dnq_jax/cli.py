"""Shared CLI plumbing: turn the library's expected failures into one-paragraph messages.

Exit status: 0 done (or preempted with a checkpoint saved), 2 bad flags or config, 3 bad
data, 4 bad checkpoint or workdir contents, 5 workdir not writable, 6 diverged (train.py);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import re
import sys
import textwrap
import traceback
from collections.abc import Callable

from dnq_jax.checkpoint import CheckpointError
from dnq_jax.config import ConfigError, base_config
from dnq_jax.data import DataError

# Expected failures -> exit status. Anything else is a bug and keeps its traceback.
EXIT_CODES = {ConfigError: 2, DataError: 3, CheckpointError: 4, PermissionError: 5}
USAGE_EXIT = 2


def _print_error(kind: str, message: str, verbose: bool) -> None:
    msg = textwrap.fill(f"error ({kind}): {message}", width=100, break_long_words=False)
    print(msg + ("" if verbose else "\n(run with --verbose for the traceback)"), file=sys.stderr)


def run_guarded(fn: Callable[[], int | None], verbose: bool, extra: dict | None = None) -> int:
    """Run `fn`; print a clear message (traceback only with verbose) for expected errors."""
    codes = {**EXIT_CODES, **(extra or {})}
    try:
        return fn() or 0
    except tuple(codes) as e:
        code = next(v for k, v in codes.items() if isinstance(e, k))
        if verbose:
            traceback.print_exc()
        _print_error(type(e).__name__, str(e), verbose)
        return code


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _unknown_override(argv: list[str]) -> str | None:
    """The first `--config.KEY=...` whose KEY is not a config key, as a message."""
    known = sorted(base_config())
    for arg in argv:
        m = re.match(r"--config\.([A-Za-z_]\w*)", arg)
        if m and m.group(1) not in known:
            key = m.group(1)
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            return f"{key}: unknown config key (given as {arg}).{hint} Known: {', '.join(known)}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser` that reports bad flags and configs in one paragraph and exits 2.

    absl would print a traceback for a config file that raises, or for `--config.KEY` with an
    unknown KEY (the config is locked), before `main` could catch anything.
    """
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            # ml_collections defers a config file that failed to load to its first use.
            flags.FLAGS.config.keys()
        return rest
    except Exception as e:  # every parse failure is a usage error
        verbose = any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv)
        if verbose:
            traceback.print_exc()
        # The innermost ConfigError: config_flags re-raises it with a traceback in the text.
        errors = [x for x in _chain(e) if isinstance(x, ConfigError)]
        config_error = errors[-1] if errors else None
        if config_error is not None:
            _print_error("ConfigError", str(config_error), verbose)
        elif (unknown := _unknown_override(argv)) is not None:
            _print_error("ConfigError", unknown, verbose)
        else:
            text = str(e).split("Traceback (most recent call last)")[0]
            text = " ".join(text.split()) or type(e).__name__
            _print_error(type(e).__name__, f"{text} (see --helpshort for the flags)", verbose)
        sys.exit(USAGE_EXIT)
