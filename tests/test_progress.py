"""Progress output: tqdm on a terminal, a plain line every few seconds in a log file."""

import io

from dnq_jax import progress


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_log_gets_one_plain_line_per_interval_and_one_at_the_end():
    out, clock = io.StringIO(), _Clock()
    bar = progress.LogBar(1000, desc="train", unit="step", file=out, interval=10.0, clock=clock)
    for i in range(1000):  # 1000 updates over 25 s of the clock
        clock.t = i * 0.025
        bar.update(1)
        bar.set_postfix({"loss": f"{1.0 / (i + 1):.3f}"})
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and bar.lines == 3  # at 10 s, at 20 s, and at the end
    assert lines[0].startswith("train: 401/1000 step (40%), ") and "loss=" in lines[0]
    assert lines[-1].startswith("train: 1000/1000 step (100%)")
    bar.set_postfix_str("x=1")  # the rest of tqdm's interface the callers use
    bar.set_description("eval")
    bar.update(0)
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("eval: 1000/1000") and "x=1" in out.getvalue()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_bar_is_tqdm_on_a_terminal_and_a_log_bar_elsewhere():
    class _Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress.bar(5, file=io.StringIO()), progress.LogBar)
    tty_bar = progress.bar(5, file=_Tty())
    assert type(tty_bar).__name__ == "tqdm" or "tqdm" in type(tty_bar).__module__
    tty_bar.close()
    quiet = progress.bar(5, file=io.StringIO(), disable=True)
    quiet.update(5)
    quiet.close()
    assert quiet.lines == 0
