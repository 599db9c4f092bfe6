"""What every command line shares: absl flag parsing that reports bad flags in one
paragraph (exit status 2), `run_guarded` (expected errors: one paragraph, the status
`dnq_jax.errors.EXIT_CODES` gives them, a traceback only with --verbose; anything else is a
bug and keeps its traceback), the multi-host flags, and quiet logs.

Several hosts: `--coordinator_address`, `--num_processes` and `--process_id` are passed to
`jax.distributed.initialize`; `--distributed` alone lets JAX read them from the cluster's
environment (SLURM, Open MPI, Cloud TPU pods, ...). Without any of them: one process.
"""

from __future__ import annotations

import re
import sys
import textwrap
import traceback
from collections.abc import Callable

from dnq_jax import errors
from dnq_jax.train import config as config_lib

DISTRIBUTED_FLAGS = ("distributed", "coordinator_address", "num_processes", "process_id")


def define_distributed_flags() -> None:
    from absl import flags

    flags.DEFINE_bool(
        "distributed",
        False,
        "Run as one of several processes: call jax.distributed.initialize(), which reads the "
        "cluster's environment (SLURM, Open MPI, TPU pod) unless the flags below are given.",
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 (implies --distributed)."
    )
    flags.DEFINE_integer("num_processes", None, "Number of processes (implies --distributed).")
    flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1.")


def start_distributed(f) -> None:
    """`jax.distributed.initialize` when asked for; before anything touches a JAX backend."""
    given = {
        k: getattr(f, k)
        for k in ("coordinator_address", "num_processes", "process_id")
        if getattr(f, k) is not None
    }
    if not (f.distributed or given):
        return
    import jax

    # CPU devices of several processes talk through gloo; GPU/TPU ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**given)


def list_in_help(*names: str) -> None:
    """absl's --help lists the flags of the program's main module; these are defined here."""
    from absl import flags

    for name in names:
        flags.FLAGS.register_flag_by_module(sys.argv[0], flags.FLAGS[name])


def quiet_logs() -> None:
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console


def run_guarded(fn: Callable[[], int | None], verbose: bool) -> int:
    """Run `fn`; print a clear message (traceback only with verbose) for expected errors."""
    try:
        return fn() or errors.EXIT_OK
    except tuple(errors.EXIT_CODES) as e:
        if verbose:
            traceback.print_exc()
        print_error(type(e).__name__, str(e), verbose)
        return errors.exit_code(e)


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
        found = [x for x in _chain(e) if isinstance(x, errors.ConfigError)]
        if found:
            print_error("ConfigError", str(found[-1]), verbose)
        elif (unknown := _unknown_override(argv)) is not None:
            print_error("ConfigError", unknown, verbose)
        else:
            text = str(e).split("Traceback (most recent call last)")[0]
            text = " ".join(text.split()) or type(e).__name__
            print_error(type(e).__name__, f"{text} (see --helpshort for the flags)", verbose)
        sys.exit(errors.USAGE_EXIT)


def print_error(kind: str, message: str, verbose: bool) -> None:
    # Breaking only at spaces keeps a path or a command whole (copied, it still works).
    msg = textwrap.fill(
        f"error ({kind}): {message}", width=100, break_long_words=False, break_on_hyphens=False
    )
    print(msg + ("" if verbose else "\n(run with --verbose for the traceback)"), file=sys.stderr)


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _unknown_override(argv: list[str]) -> str | None:
    """The first `--config.KEY=...` whose KEY is not a config key, as a message."""
    known = set(config_lib.flat(config_lib.base_config()))
    for arg in argv:
        m = re.match(r"--config\.([A-Za-z_][\w.]*?)(=|$)", arg)
        if m and m.group(1) not in known:
            return config_lib.unknown_key_message(m.group(1), f"given as {arg}")
    return None


def parse_into(fv, argv: list[str], required: tuple[str, ...] = ()) -> list[str]:
    """Parse `argv` (program name first) into the absl FlagValues `fv`; returns the
    positional arguments. `--help` prints the flags and exits 0; a bad or missing flag
    prints one paragraph and exits with status 2. A FlagValues of its own per call keeps
    the command callable more than once in a process (tests, notebooks)."""
    if any(a in ("--help", "-h", "--helpshort") for a in argv[1:]):
        print(f"usage: {argv[0]} [flags]\n\n{fv.get_help()}")
        sys.exit(errors.EXIT_OK)
    verbose = any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv)
    try:
        rest = fv(argv)
    except Exception as e:  # every parse failure is a usage error
        if verbose:
            traceback.print_exc()
        text = " ".join(str(e).split()) or type(e).__name__
        print_error(type(e).__name__, f"{text} (see --help for the flags)", verbose)
        sys.exit(errors.USAGE_EXIT)
    missing = [name for name in required if fv[name].value is None]
    if missing:
        print_error("UsageError", f"--{missing[0]} is required (see --help)", verbose)
        sys.exit(errors.USAGE_EXIT)
    return rest[1:]
