"""Progress of long work: a tqdm bar on a terminal, a plain line every few seconds in a log.

tqdm redraws its bar with carriage returns and cursor movements; written to a file (`make
demo > log`, a batch job's output) that is thousands of lines of control codes. `bar` gives
tqdm when the stream is a terminal and otherwise `LogBar`, which prints one plain line at
most every `interval` seconds (and one at the end), with the same `update`, `set_postfix`,
`close` and `write` that the callers use.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

# Seconds between two lines of a LogBar.
INTERVAL = 10.0


def bar(
    total: int | None = None,
    *,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    leave: bool = True,
    file: IO[str] | None = None,
    interval: float = INTERVAL,
    **tqdm_kwargs: Any,
):
    """A progress bar for `total` units: tqdm on a terminal, a `LogBar` otherwise."""
    stream = sys.stderr if file is None else file
    if _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            disable=disable,
            leave=leave,
            file=stream,
            **tqdm_kwargs,
        )
    return LogBar(
        total,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=disable,
        file=stream,
        interval=interval,
    )


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LogBar:
    """Plain progress lines for a log file: 'desc: 120/480 step (25%), 3.1 step/s, k=v'.

    A line is printed when `interval` seconds have passed since the last one, and at `close`
    if anything changed since; `clock` is replaceable for tests.
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        disable: bool = False,
        file: IO[str] | None = None,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self._start_n = initial, initial
        self.disable, self.interval, self._clock = disable, interval, clock
        self._file = file
        self._t0 = self._last = clock()
        self._postfix = ""
        self._dirty = False
        self.lines = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        self._dirty = True
        if self._clock() - self._last >= self.interval:
            self._print()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw) -> None:
        items = {**(ordered_dict or {}), **kw}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._dirty:
            self._print()

    def write(self, text: str) -> None:
        if not self.disable:
            print(text, file=self._stream(), flush=True)

    def __enter__(self) -> LogBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stream(self) -> IO[str]:
        return sys.stderr if self._file is None else self._file

    def _print(self) -> None:
        now = self._clock()
        self._last, self._dirty = now, False
        if self.disable:
            return
        rate = (self.n - self._start_n) / max(now - self._t0, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc + ': ' if self.desc else ''}{done} {self.unit}{pct}"
        text += f", {rate:.3g} {self.unit}/s"
        if self._postfix:
            text += f", {self._postfix}"
        print(text, file=self._stream(), flush=True)
        self.lines += 1
